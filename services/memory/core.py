"""Per-agent working memory under a RAM budget, paged by LRU-K, durable on every write.

Every public method runs on the store's group-commit thread (`grouped`), one at
a time: the state in RAM needs no lock, and a method returns once the group it
ran in committed.

Where entries live:
- on disk, always: the shard's SQLite file (services/memory/database.py). A
  write is committed there (WAL, fsync, in a group with the writes that arrived
  with it) before it is acknowledged, so an acknowledged entry survives
  `kill -9`, and a write that was not acknowledged leaves all or nothing.
- in RAM, in blocks: a block is `entries_per_block` consecutive ids of one
  agent. Fixed id ranges, not one block per agent: an agent with a long
  history keeps its recent block resident without its whole past, and the
  block of any id is known without a lookup. RAM is a write-through cache: a
  resident block is updated after its write commits, so evicting a block never
  writes and a "page fault" is one indexed read of the block's id range.

When resident bytes exceed the budget, blocks are evicted by LRU-K (K = 2 by
default; K = 1 is plain LRU). The clock counts requests: touches of one block
within one request are one correlated reference. Search runs on the full-text
index of the file, so it sees every entry, resident or not, and does
not pull blocks into RAM (a search is a scan; it should not flush the hot set).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.errors import InvalidArgument, NotFound, PermissionDenied, ResourceExhausted, require
from services.durable_sqlite import GroupCommit, grouped
from services.memory.database import MemoryDatabase, MemoryEntry, SearchHit, agent_key, open_database
from services.memory.lru_k import LruKCache

log = logging.getLogger("aios.memory")

DEFAULT_MAX_ENTRY_BYTES = 64 * 1024
DEFAULT_RAM_BUDGET_BYTES = 64 * 1024 * 1024
DEFAULT_QUOTA_BYTES = 16 * 1024 * 1024  # per agent: text and metadata of all its entries
DEFAULT_ENTRIES_PER_BLOCK = 32
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_SEARCH_RESULTS = 100
MAX_TURNS = 1000
ROLES = ("", "system", "user", "assistant", "tool")  # a note, or a conversation turn a prompt can replay
ENTRY_ID = re.compile(r"mem-([0-9a-f]{16})-([1-9][0-9]{0,17})")

BlockKey = tuple[str, int]  # (agent key, block number)


@dataclass
class Block:
    entries: dict[int, MemoryEntry] = field(default_factory=dict)  # by number, in id order
    size: int = 0


@dataclass
class PagingCounters:
    hits: int = 0
    faults: int = 0
    evictions: int = 0


def entry_id(entry: MemoryEntry) -> str:
    return f"mem-{agent_key(entry.agent_id)}-{entry.number}"


class MemoryStore:
    def __init__(
        self,
        directory: Path,
        ram_budget_bytes: int = DEFAULT_RAM_BUDGET_BYTES,
        entries_per_block: int = DEFAULT_ENTRIES_PER_BLOCK,
        k: int = 2,
        correlated_period: int = 0,
        max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
        quota_bytes: int = DEFAULT_QUOTA_BYTES,
    ) -> None:
        require(ram_budget_bytes > 0, "the RAM budget must be positive")
        require(entries_per_block > 0, "entries_per_block must be positive")
        self._file = MemoryDatabase(open_database(directory))
        self.ram_budget_bytes = ram_budget_bytes
        self.entries_per_block = entries_per_block
        self.max_entry_bytes = max_entry_bytes
        self.quota_bytes = quota_bytes
        self.policy = LruKCache(k=k, correlated_period=correlated_period)
        self.counters = PagingCounters()
        self._clock = 0
        self._scan()
        self.commits = GroupCommit(self._file.db, "memory", reload=self._scan)

    def _scan(self) -> None:
        """The state in RAM from the file on disk, nothing resident: at start, and after a group failed to commit
        (so that nothing of the group stays)."""
        started = time.monotonic()
        self.policy = LruKCache(k=self.policy.k, correlated_period=self.policy.correlated_period)
        self.resident_bytes = 0
        self._resident: dict[BlockKey, Block] = {}
        self._on_disk: set[BlockKey] = set()  # blocks holding at least one entry
        self._entries: dict[str, int] = {}  # agent key -> entries
        self._bytes: dict[str, int] = {}  # agent key -> bytes of text and metadata on disk
        self._owners: dict[str, str] = {}  # agent key -> the agent id it belongs to
        for key, agent_id, entries, size in self._file.agents():
            self._owners[key], self._entries[key], self._bytes[key] = agent_id, entries, size
        self._on_disk.update(self._file.blocks(self.entries_per_block))
        if self._entries:
            log.info("found %d agents' memory (%d entries) in %.2f s", len(self._entries), sum(self._entries.values()),
                     time.monotonic() - started)

    def _key(self, agent_id: str) -> str:
        """The agent's key, refused if it is another agent id's (a 64-bit hash collision: never mix two agents)."""
        require(bool(agent_id), "agent_id is required")
        key = agent_key(agent_id)
        if self._owners.get(key, agent_id) != agent_id:
            raise PermissionDenied("this agent's memory key belongs to another agent id; register under another name")
        return key

    # ---- API -------------------------------------------------------------------------

    @grouped
    def add(self, agent_id: str, text: str, metadata: dict[str, str] | None = None, role: str = "",
            request_id: str = "") -> MemoryEntry:
        """A new entry. With `request_id`, a repeat of the call (a retry) answers with the entry the first made."""
        require(bool(agent_id), "agent_id is required")
        metadata = dict(metadata or {})
        self._check_content(text, metadata)
        require(role in ROLES, f"role {role!r} is not one of {', '.join(repr(r) for r in ROLES)}")
        require(len(request_id) <= 128, "request_id is at most 128 characters")
        key = self._key(agent_id)
        earlier = self._file.added_by(key, request_id) if request_id else None
        if earlier is not None:
            return self._find(agent_id, f"mem-{key}-{earlier}", self._tick())
        self._check_quota(key, MemoryEntry(0, agent_id, text, metadata, role).size)
        now = self._tick()
        entry = self._file.add(agent_id, text, metadata, role, time.time(), request_id)
        self._owners[key] = agent_id
        self._entries[key] = self._entries.get(key, 0) + 1
        self._bytes[key] = self._bytes.get(key, 0) + entry.size
        block_key = self._block_key(key, entry.number)
        self._on_disk.add(block_key)
        if block_key not in self._resident and (entry.number - 1) % self.entries_per_block == 0:
            # The first entry of a new block: the block starts in RAM, with nothing to read back.
            self._resident[block_key] = Block({entry.number: entry}, entry.size)
            self.resident_bytes += entry.size
            self.policy.reference(block_key, now)
            self._evict_over_budget(now)
        else:
            self._write_through(key, entry.number, entry)
            self._touch(agent_id, entry.number, now)
        return entry

    @grouped
    def get(self, agent_id: str, entry_id: str) -> MemoryEntry:
        return self._find(agent_id, entry_id, self._tick())

    @grouped
    def update(
        self, agent_id: str, entry_id: str, text: str = "", metadata: dict[str, str] | None = None,
        remove_metadata: list[str] | None = None,
    ) -> MemoryEntry:
        """Replaces the text (if given), sets the given metadata keys and removes the listed ones."""
        now = self._tick()
        old = self._find(agent_id, entry_id, now)
        merged = {k: v for k, v in old.metadata.items() if k not in set(remove_metadata or [])}
        merged.update(metadata or {})
        new_text = text or old.text
        self._check_content(new_text, merged)
        new = MemoryEntry(old.number, agent_id, new_text, merged, old.role, old.created_at, time.time())
        key = agent_key(agent_id)
        self._check_quota(key, new.size - old.size)
        self._file.update(key, new)
        self._bytes[key] += new.size - old.size
        self._write_through(key, new.number, new)
        self._evict_over_budget(now)
        return new

    @grouped
    def delete(self, agent_id: str, entry_id: str) -> MemoryEntry:
        now = self._tick()
        entry = self._find(agent_id, entry_id, now)
        key = agent_key(agent_id)
        self._file.delete(key, entry.number)
        self._entries[key] -= 1
        self._bytes[key] -= entry.size
        self._write_through(key, entry.number, None)
        return entry

    @grouped
    def list(self, agent_id: str, page_size: int = 0, page_token: str = "") -> tuple[list[MemoryEntry], str]:
        """Entries oldest first; the token is the last id of the page."""
        size = page_size or DEFAULT_PAGE_SIZE
        require(0 < size <= MAX_PAGE_SIZE, f"page_size must be between 1 and {MAX_PAGE_SIZE}")
        after = 0
        if page_token:
            match = ENTRY_ID.fullmatch(page_token)
            if match is None or match.group(1) != self._key(agent_id):
                raise InvalidArgument(f"page_token {page_token!r} is not one this service issued to this agent")
            after = int(match.group(2))
        now = self._tick()
        numbers = self._file.numbers_after(self._key(agent_id), after, size + 1)
        entries = self._load(agent_id, numbers[:size], now)
        return entries, entry_id(entries[-1]) if len(numbers) > size else ""

    @grouped
    def recent_turns(self, agent_id: str, limit: int) -> list[MemoryEntry]:
        """The newest `limit` conversation turns (entries with a role), oldest first: a prompt's history."""
        require(0 < limit <= MAX_TURNS, f"the number of turns must be between 1 and {MAX_TURNS}")
        now = self._tick()
        return self._load(agent_id, self._file.last_turns(self._key(agent_id), limit), now)

    @grouped
    def search(self, agent_id: str, query: str, limit: int = 10, metadata: dict[str, str] | None = None) -> list[SearchHit]:
        require(bool(query.strip()), "the search query must not be empty")
        require(0 < limit <= MAX_SEARCH_RESULTS, f"limit must be between 1 and {MAX_SEARCH_RESULTS}")
        self._key(agent_id)
        self._tick()
        return self._file.search(agent_id, query, limit, dict(metadata or {}))

    @grouped
    def stats(self) -> dict[str, int | float]:
        c = self.counters
        touches = c.hits + c.faults
        return {
            "agents": sum(1 for n in self._entries.values() if n > 0),
            "entries": sum(self._entries.values()),
            "resident_bytes": self.resident_bytes,
            "ram_budget_bytes": self.ram_budget_bytes,
            "total_bytes": sum(self._bytes.values()),
            "blocks_resident": len(self._resident),
            "blocks_spilled": len(self._on_disk) - len(self._resident),  # resident blocks are on disk too
            "hits": c.hits,
            "faults": c.faults,
            "evictions": c.evictions,
            "hit_ratio": c.hits / touches if touches else 0.0,
            "lru_k": self.policy.k,
            "quota_bytes_per_agent": self.quota_bytes,
        }

    def close(self) -> None:
        self.commits.close()

    # ---- paging ----------------------------------------------------------------------

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _block_key(self, key: str, number: int) -> BlockKey:
        return key, (number - 1) // self.entries_per_block

    def _touch(self, agent_id: str, number: int, now: int) -> Block:
        """The resident block holding `number`, faulting it in from the file if needed."""
        key = self._block_key(agent_key(agent_id), number)
        self.policy.reference(key, now)
        block = self._resident.get(key)
        if block is not None:
            self.counters.hits += 1
            self._evict_over_budget(now)  # a write may have grown it
            return block
        self.counters.faults += 1
        first = key[1] * self.entries_per_block + 1
        entries = self._file.range(agent_id, first, first + self.entries_per_block - 1)
        block = Block({e.number: e for e in entries}, sum(e.size for e in entries))
        if not entries:  # nothing there (all deleted): nothing to keep resident
            self.policy.forget(key)
            return block
        self._resident[key] = block
        self.resident_bytes += block.size
        self._evict_over_budget(now)
        return block

    def _evict_over_budget(self, now: int) -> None:
        while self.resident_bytes > self.ram_budget_bytes and len(self._resident) > 1:
            victim = self.policy.victim(now)
            self.policy.evict(victim)
            self.resident_bytes -= self._resident.pop(victim).size  # already on disk: nothing to write
            self.counters.evictions += 1

    def _write_through(self, key: str, number: int, entry: MemoryEntry | None) -> None:
        """Applies a committed write (None: a delete) to the block's resident copy, if it is resident.

        Updates and deletes found the entry first, so their block is resident; an add to a spilled
        block faults it in afterwards, reading the committed entry with it."""
        bkey = self._block_key(key, number)
        block = self._resident.get(bkey)
        if block is None:
            return
        old = block.entries.get(number)
        change = (entry.size if entry else 0) - (old.size if old else 0)
        if entry is None:
            del block.entries[number]
        else:
            block.entries[number] = entry  # in place for an update; appended (highest id) for an add
        block.size += change
        self.resident_bytes += change
        if not block.entries:  # its last entry was deleted: the block is gone
            del self._resident[bkey]
            self.policy.forget(bkey)
            self._on_disk.discard(bkey)

    def _load(self, agent_id: str, numbers: list[int], now: int) -> list[MemoryEntry]:
        """Entries by number, touching each block once (one reference per block per request)."""
        blocks: dict[int, Block] = {}
        entries = []
        for n in numbers:
            index = (n - 1) // self.entries_per_block
            if index not in blocks:
                blocks[index] = self._touch(agent_id, n, now)
            entries.append(blocks[index].entries[n])
        return entries

    # ---- checks ----------------------------------------------------------------------

    def _check_content(self, text: str, metadata: dict[str, str]) -> None:
        require(bool(text.strip()), "memory text must not be empty")
        size = MemoryEntry(0, "", text, metadata).size
        if size > self.max_entry_bytes:
            raise ResourceExhausted(
                f"memory entry is {size} bytes (text and metadata); the limit is {self.max_entry_bytes} bytes per entry"
            )

    def _check_quota(self, key: str, growth: int) -> None:
        used = self._bytes.get(key, 0)
        if growth > 0 and used + growth > self.quota_bytes:
            raise ResourceExhausted(
                f"this agent's memory holds {used} bytes; {growth} more would pass its quota of {self.quota_bytes} "
                "bytes. Delete entries it no longer needs."
            )

    def _find(self, agent_id: str, entry_id: str, now: int) -> MemoryEntry:
        require(bool(agent_id), "agent_id is required")
        require(bool(entry_id), "memory entry id is required")
        match = ENTRY_ID.fullmatch(entry_id)
        if match is None:
            raise InvalidArgument(f"{entry_id!r} is not a memory entry id (they look like mem-<16 hex>-<number>)")
        owner, number = match.group(1), int(match.group(2))
        if owner != self._key(agent_id):
            if self._file.holds(owner, number):
                raise PermissionDenied(f"memory entry {entry_id!r} belongs to another agent")
            raise NotFound(f"memory entry {entry_id!r} does not exist (deleted, or never added)")
        entry = self._touch(agent_id, number, now).entries.get(number)
        if entry is None:
            raise NotFound(f"memory entry {entry_id!r} does not exist (deleted, or never added)")
        return entry
