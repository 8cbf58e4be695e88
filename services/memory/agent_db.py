"""One SQLite file per agent: the durable copy of its memory, and its full-text index.

The file is named by a hash of the agent id, and the memory service opens only
the caller's file (the kernel sets the caller), so no request can read another
agent's file. Entry ids are the file's AUTOINCREMENT row ids: never reused,
increasing, so "oldest first" and "the block of an entry" follow from the id.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from services.durable_sqlite import connect_durable, fts_query, transaction
from services.errors import PermissionDenied

SCHEMA = """
CREATE TABLE IF NOT EXISTS owner (agent_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,          -- JSON object of strings
    role TEXT NOT NULL DEFAULT '',   -- '' for a note; user/assistant for a conversation turn
    size INTEGER NOT NULL,           -- MemoryEntry.size, for the service's byte counters
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS turns ON entries (id) WHERE role != '';
CREATE VIRTUAL TABLE IF NOT EXISTS entries_fts USING fts5(text, content='entries', content_rowid='id');
CREATE TRIGGER IF NOT EXISTS entries_ai AFTER INSERT ON entries BEGIN
    INSERT INTO entries_fts (rowid, text) VALUES (new.id, new.text);
END;
CREATE TRIGGER IF NOT EXISTS entries_ad AFTER DELETE ON entries BEGIN
    INSERT INTO entries_fts (entries_fts, rowid, text) VALUES ('delete', old.id, old.text);
END;
CREATE TRIGGER IF NOT EXISTS entries_au AFTER UPDATE OF text ON entries BEGIN
    INSERT INTO entries_fts (entries_fts, rowid, text) VALUES ('delete', old.id, old.text);
    INSERT INTO entries_fts (rowid, text) VALUES (new.id, new.text);
END;
CREATE TABLE IF NOT EXISTS requests (  -- adds that carried a request id, so that a retry adds nothing twice
    request_id TEXT PRIMARY KEY,
    entry_id INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_by_age ON requests (created_at);
"""
# Raised whenever SCHEMA changes: a file with a lower PRAGMA user_version gets SCHEMA on opening. Every statement is
# IF NOT EXISTS, so that adds tables, indexes and triggers; a changed column needs a migration of its own.
SCHEMA_VERSION = 1
# How long an add's request id is remembered: a retry later than this adds again.
REQUEST_ID_TTL_S = 24 * 3600

COLUMNS = "id, text, metadata, role, created_at, updated_at"
# SCHEMA one statement at a time (a trigger's body holds semicolons), to run inside one transaction.
SCHEMA_STATEMENTS = [statement for statement in re.split(r";\s*\n(?=CREATE)", SCHEMA.strip()) if statement.strip()]


def apply_schema(db: sqlite3.Connection) -> None:
    """SCHEMA and its version, within the caller's transaction."""
    for statement in SCHEMA_STATEMENTS:
        db.execute(statement)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def remove_database(path: Path) -> None:
    """A database file and its WAL and shared-memory files, if there."""
    for leftover in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        leftover.unlink(missing_ok=True)


@dataclass
class MemoryEntry:
    number: int  # the row id in the agent's file
    agent_id: str
    text: str
    metadata: dict[str, str] = field(default_factory=dict)
    role: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0

    @property
    def size(self) -> int:
        """Bytes it holds in RAM, as the budget counts them: text and metadata."""
        return len(self.text.encode()) + sum(len(k.encode()) + len(v.encode()) for k, v in self.metadata.items())


@dataclass
class SearchHit:
    entry: MemoryEntry
    score: float  # BM25, higher is better
    snippet: str


def agent_key(agent_id: str) -> str:
    """The agent's file name and id prefix: stable, and not the raw agent id (which may hold any character)."""
    return hashlib.sha256(agent_id.encode()).hexdigest()[:16]


class AgentDatabase:
    """One agent's file. Not thread-safe: the memory store serialises calls."""

    def __init__(self, path: Path, agent_id: str) -> None:
        """Opens the agent's file, which `AgentDatabases` created whole (schema and owner)."""
        self.agent_id = agent_id
        self.db = connect_durable(path)
        if self.db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:  # a file from before it was set
            with transaction(self.db):
                apply_schema(self.db)
                self.db.execute("INSERT INTO owner SELECT ? WHERE NOT EXISTS (SELECT 1 FROM owner)", (agent_id,))
        (owner,) = self.db.execute("SELECT agent_id FROM owner").fetchone()
        if owner != agent_id:  # a 64-bit hash collision: refuse rather than mix two agents' memory
            self.db.close()
            raise PermissionDenied("this agent's memory file belongs to another agent id; register under another name")

    @staticmethod
    def owner_of(path: Path) -> str:
        """The agent a file belongs to (read at start-up to rebuild the service's counters)."""
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            (owner,) = db.execute("SELECT agent_id FROM owner").fetchone()
            return str(owner)
        finally:
            db.close()

    def _entry(self, row: tuple) -> MemoryEntry:
        number, text, metadata, role, created_at, updated_at = row
        return MemoryEntry(number, self.agent_id, text, json.loads(metadata), role, created_at, updated_at)

    def add(self, text: str, metadata: dict[str, str], role: str, now: float, request_id: str = "") -> MemoryEntry:
        """A new entry; with `request_id`, remembered with it in the same transaction (see `added_by`)."""
        with transaction(self.db):
            cursor = self.db.execute(
                "INSERT INTO entries (text, metadata, role, size, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                (text, json.dumps(metadata), role, MemoryEntry(0, "", text, metadata).size, now, now),
            )
            number = int(cursor.lastrowid or 0)
            if request_id:
                self.db.execute("INSERT INTO requests VALUES (?, ?, ?)", (request_id, number, now))
                self.db.execute("DELETE FROM requests WHERE created_at < ?", (now - REQUEST_ID_TTL_S,))
        return MemoryEntry(number, self.agent_id, text, dict(metadata), role, now, now)

    def added_by(self, request_id: str) -> int | None:
        """The entry an earlier add with this request id made, if any."""
        row = self.db.execute("SELECT entry_id FROM requests WHERE request_id=?", (request_id,)).fetchone()
        return None if row is None else int(row[0])

    def update(self, entry: MemoryEntry) -> None:
        self.db.execute(
            "UPDATE entries SET text=?, metadata=?, size=?, updated_at=? WHERE id=?",
            (entry.text, json.dumps(entry.metadata), entry.size, entry.updated_at, entry.number),
        )

    def delete(self, number: int) -> None:
        self.db.execute("DELETE FROM entries WHERE id=?", (number,))

    def range(self, first: int, last: int) -> list[MemoryEntry]:
        """Entries with first <= id <= last (a block)."""
        rows = self.db.execute(f"SELECT {COLUMNS} FROM entries WHERE id BETWEEN ? AND ? ORDER BY id", (first, last))
        return [self._entry(row) for row in rows]

    def numbers_after(self, after: int, limit: int) -> list[int]:
        rows = self.db.execute("SELECT id FROM entries WHERE id > ? ORDER BY id LIMIT ?", (after, limit))
        return [number for (number,) in rows]

    def last_turns(self, limit: int) -> list[int]:
        """Ids of the newest `limit` conversation turns, oldest first."""
        rows = self.db.execute("SELECT id FROM entries WHERE role != '' ORDER BY id DESC LIMIT ?", (limit,))
        return sorted(number for (number,) in rows)

    def search(self, query: str, limit: int, metadata: dict[str, str]) -> list[SearchHit]:
        """Ranked by BM25 over the whole file: entries resident in RAM or not."""
        match = fts_query(query)
        if not match:
            return []
        where, params = "entries_fts MATCH ?", [match]
        for key, value in metadata.items():
            where += " AND json_extract(e.metadata, ?) = ?"
            params += ['$."' + key.replace('"', '""') + '"', value]
        rows = self.db.execute(
            f"SELECT {', '.join('e.' + c.strip() for c in COLUMNS.split(','))}, bm25(entries_fts), "
            f"snippet(entries_fts, 0, '[', ']', '...', 12) "
            f"FROM entries_fts JOIN entries e ON e.id = entries_fts.rowid WHERE {where} "
            f"ORDER BY bm25(entries_fts) LIMIT ?",
            (*params, limit),
        )
        return [SearchHit(self._entry(row[:6]), -row[6], row[7]) for row in rows]

    def totals(self) -> tuple[int, int]:
        """(entries, bytes of text and metadata) — read once at start-up for the service's counters."""
        count, size = self.db.execute("SELECT count(*), coalesce(sum(size), 0) FROM entries").fetchone()
        return int(count), int(size)

    def block_numbers(self, entries_per_block: int) -> list[int]:
        rows = self.db.execute("SELECT DISTINCT (id - 1) / ? FROM entries", (entries_per_block,))
        return [block for (block,) in rows]

    def close(self) -> None:
        self.db.close()


class AgentDatabases:
    """Open files by agent, at most `max_open` at once (least recently used closed first)."""

    def __init__(self, directory: Path, max_open: int = 128) -> None:
        self.directory = directory
        self.max_open = max_open
        directory.mkdir(parents=True, exist_ok=True)
        self._open: OrderedDict[str, AgentDatabase] = OrderedDict()
        self._lock = threading.Lock()

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.sqlite3"

    def get(self, agent_id: str) -> AgentDatabase:
        key = agent_key(agent_id)
        with self._lock:
            db = self._open.pop(key, None)
            if db is None:
                if not self.path(key).exists():
                    self._create(self.path(key), agent_id)
                db = AgentDatabase(self.path(key), agent_id)
            self._open[key] = db
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)[1].close()
            return db

    def _create(self, path: Path, agent_id: str) -> None:
        """A new agent's file: a copy of an empty one holding the schema (creating the schema costs several times
        a copy: 2,000 agents arriving at once made it most of the memory service's time), its owner written in before
        the file takes its name, so a file under an agent's name is always whole, even after a crash."""
        template = self.directory / f".empty-v{SCHEMA_VERSION}.db"  # not *.sqlite3: never taken for an agent's file
        if not template.exists():
            building = template.with_suffix(".tmp")
            remove_database(building)
            db = connect_durable(building)
            with transaction(db):
                apply_schema(db)
            db.close()
            building.replace(template)
        fresh = path.with_suffix(".new")
        remove_database(fresh)  # a crash's leftover, with its WAL, which SQLite would replay into the new copy
        shutil.copyfile(template, fresh)
        db = connect_durable(fresh)
        db.execute("INSERT INTO owner VALUES (?)", (agent_id,))
        db.close()
        fresh.replace(path)
        directory = os.open(self.directory, os.O_RDONLY)  # the new name is durable before any write is acknowledged
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def holds(self, key: str, number: int) -> bool:
        """Whether the file with that key has entry `number`, read-only and without opening it for use."""
        path = self.path(key)
        if not path.exists():
            return False
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return db.execute("SELECT 1 FROM entries WHERE id=?", (number,)).fetchone() is not None
        finally:
            db.close()

    def existing(self) -> list[Path]:
        return sorted(self.directory.glob("*.sqlite3"))

    def close(self) -> None:
        with self._lock:
            for db in self._open.values():
                db.close()
            self._open.clear()
