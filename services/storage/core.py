"""Durable per-agent records in SQLite (WAL mode, synchronous=FULL).

A write is acknowledged only after SQLite has committed it to the WAL with
fsync, so it survives a crash of the process or the machine.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.durable_sqlite import connect_durable
from services.errors import InvalidArgument, NotFound, ResourceExhausted, require

MAX_KEY_CHARS = 256
DEFAULT_MAX_RECORD_BYTES = 16 * 1024 * 1024


@dataclass
class RecordInfo:
    key: str
    size: int
    metadata: dict[str, str] = field(default_factory=dict)
    updated_at: float = 0.0


def validate_key(key: str) -> str:
    """Keys are relative, "/"-separated names; anything path-like that escapes is refused."""
    require(bool(key), "storage key is required")
    require(len(key) <= MAX_KEY_CHARS, f"storage key is {len(key)} characters; the limit is {MAX_KEY_CHARS}")
    if any(ord(c) < 32 or c in "\\\x7f" for c in key):
        raise InvalidArgument(f"storage key {key!r} contains a backslash or control character")
    if key.startswith("/"):
        raise InvalidArgument(f"storage key {key!r} must be relative (no leading '/')")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidArgument(
                f"storage key {key!r} has an empty, '.' or '..' segment; use names like 'notes/today'"
            )
    return key


class RecordStore:
    """Named records per agent namespace; one SQLite database for all agents."""

    def __init__(self, path: Path, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> None:
        self.max_record_bytes = max_record_bytes
        self._db = connect_durable(path)
        self._db.execute(
            """CREATE TABLE IF NOT EXISTS records (
                   agent_id TEXT NOT NULL,
                   key TEXT NOT NULL,
                   data BLOB NOT NULL,
                   metadata TEXT NOT NULL,
                   updated_at REAL NOT NULL,
                   PRIMARY KEY (agent_id, key))"""
        )
        self._lock = threading.Lock()

    def write(self, agent_id: str, key: str, data: bytes, metadata: dict[str, str] | None = None) -> RecordInfo:
        require(bool(agent_id), "agent_id is required")
        validate_key(key)
        if len(data) > self.max_record_bytes:
            raise ResourceExhausted(
                f"record is {len(data)} bytes; the limit is {self.max_record_bytes} bytes per record"
            )
        info = RecordInfo(key, len(data), dict(metadata or {}), time.time())
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?, ?)",
                (agent_id, key, data, json.dumps(info.metadata), info.updated_at),
            )
        return info

    def read(self, agent_id: str, key: str) -> tuple[RecordInfo, bytes]:
        validate_key(key)
        with self._lock:
            row = self._db.execute(
                "SELECT data, metadata, updated_at FROM records WHERE agent_id=? AND key=?", (agent_id, key)
            ).fetchone()
        if row is None:
            raise NotFound(f"no record {key!r} in this agent's storage")
        data, metadata, updated_at = row
        return RecordInfo(key, len(data), json.loads(metadata), updated_at), bytes(data)

    def list(self, agent_id: str, prefix: str = "") -> list[RecordInfo]:
        escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        with self._lock:
            rows = self._db.execute(
                "SELECT key, length(data), metadata, updated_at FROM records "
                "WHERE agent_id=? AND key LIKE ? ESCAPE '\\' ORDER BY key",
                (agent_id, escaped + "%"),
            ).fetchall()
        return [RecordInfo(k, size, json.loads(m), t) for k, size, m, t in rows]

    def delete(self, agent_id: str, key: str) -> str:
        validate_key(key)
        with self._lock:
            cursor = self._db.execute("DELETE FROM records WHERE agent_id=? AND key=?", (agent_id, key))
        if cursor.rowcount == 0:
            raise NotFound(f"no record {key!r} in this agent's storage")
        return key

    def close(self) -> None:
        with self._lock:
            self._db.close()
