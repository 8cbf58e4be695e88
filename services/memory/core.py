"""Per-agent working memory held in RAM.

This is the first, resident-only version: entries live in an ordered dict per
agent. Paging to disk under a RAM budget (LRU-K) builds on this class.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field

from services.errors import InvalidArgument, NotFound, PermissionDenied, ResourceExhausted, require

DEFAULT_MAX_ENTRY_BYTES = 64 * 1024
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


@dataclass
class MemoryEntry:
    id: str
    agent_id: str
    text: str
    metadata: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0

    @property
    def size(self) -> int:
        return len(self.text.encode()) + sum(len(k) + len(v) for k, v in self.metadata.items())


class MemoryStore:
    """Entries by agent, ids unique across agents so a foreign id is recognisable."""

    def __init__(self, max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES) -> None:
        self.max_entry_bytes = max_entry_bytes
        self._by_agent: dict[str, dict[str, MemoryEntry]] = {}
        self._owner: dict[str, str] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.resident_bytes = 0

    def add(self, agent_id: str, text: str, metadata: dict[str, str] | None = None) -> MemoryEntry:
        require(bool(agent_id), "agent_id is required")
        require(bool(text.strip()), "memory text must not be empty")
        entry = MemoryEntry("", agent_id, text, dict(metadata or {}))
        if entry.size > self.max_entry_bytes:
            raise ResourceExhausted(
                f"memory entry is {entry.size} bytes; the limit is {self.max_entry_bytes} bytes per entry"
            )
        with self._lock:
            entry.id = f"mem-{next(self._ids)}"
            entry.created_at = entry.updated_at = time.time()
            self._by_agent.setdefault(agent_id, {})[entry.id] = entry
            self._owner[entry.id] = agent_id
            self.resident_bytes += entry.size
        return entry

    def get(self, agent_id: str, entry_id: str) -> MemoryEntry:
        with self._lock:
            return self._find(agent_id, entry_id)

    def list(self, agent_id: str, page_size: int = 0, page_token: str = "") -> tuple[list[MemoryEntry], str]:
        """Entries oldest first; the token is the offset of the next page."""
        size = page_size or DEFAULT_PAGE_SIZE
        require(0 < size <= MAX_PAGE_SIZE, f"page_size must be between 1 and {MAX_PAGE_SIZE}")
        try:
            start = int(page_token) if page_token else 0
        except ValueError:
            raise InvalidArgument(f"page_token {page_token!r} is not one this service issued") from None
        require(start >= 0, "page_token must not be negative")
        with self._lock:
            entries = list(self._by_agent.get(agent_id, {}).values())
        page = entries[start : start + size]
        next_token = str(start + size) if start + size < len(entries) else ""
        return page, next_token

    def delete(self, agent_id: str, entry_id: str) -> MemoryEntry:
        with self._lock:
            entry = self._find(agent_id, entry_id)
            del self._by_agent[agent_id][entry_id]
            del self._owner[entry_id]
            self.resident_bytes -= entry.size
            return entry

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "agents": sum(1 for entries in self._by_agent.values() if entries),
                "entries": len(self._owner),
                "resident_bytes": self.resident_bytes,
            }

    def _find(self, agent_id: str, entry_id: str) -> MemoryEntry:
        require(bool(entry_id), "memory entry id is required")
        owner = self._owner.get(entry_id)
        if owner is None:
            raise NotFound(f"memory entry {entry_id!r} does not exist (deleted, or never added)")
        if owner != agent_id:
            raise PermissionDenied(f"memory entry {entry_id!r} belongs to another agent")
        return self._by_agent[agent_id][entry_id]
