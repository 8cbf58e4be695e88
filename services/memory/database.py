"""The memory shard's SQLite file: every agent's entries, durable, with a full-text index.

One file per shard (`memory.db` in the shard's directory), not one per agent: 2,000 agents arriving at once made
creating, opening and closing their files most of the memory service's time, and one file lets a group of writes
from many agents commit with one fsync (services/durable_sqlite.py: GroupCommit).

An agent is known by its key (a hash of its id: entry ids carry it, and the raw id may hold any character); every
statement names the caller's key, which the memory service takes from the kernel. An entry's number counts up per
agent and is never reused, so "oldest first" and "the block of an entry" follow from it.

Search matches within the caller's entries (the key is a column of the index the match is restricted to) and
ranks by BM25 computed from the caller's entries alone (services/durable_sqlite.py `ranked`): FTS5's own bm25()
weighs words by the whole shard, which would tell an agent what other agents' entries hold.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from services.durable_sqlite import connect_durable, fts_query, ranked, transaction
from services.errors import PermissionDenied

log = logging.getLogger("aios.memory")

FILE_NAME = "memory.db"
SCHEMA = """
CREATE TABLE IF NOT EXISTS agents (
    key TEXT PRIMARY KEY,            -- agent_key(agent_id): what its entry ids carry
    agent_id TEXT NOT NULL,
    last_number INTEGER NOT NULL     -- the highest entry number given so far: numbers are never reused
);
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- the row, for the full-text index; not the entry's number
    key TEXT NOT NULL,               -- the agent's
    number INTEGER NOT NULL,         -- 1, 2, ... per agent
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,          -- JSON object of strings
    role TEXT NOT NULL DEFAULT '',   -- '' for a note; user/assistant for a conversation turn
    size INTEGER NOT NULL,           -- MemoryEntry.size, for the service's byte counters
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    UNIQUE (key, number)
);
CREATE INDEX IF NOT EXISTS turns ON entries (key, number) WHERE role != '';
CREATE VIRTUAL TABLE IF NOT EXISTS entries_fts USING fts5(text, key, content='entries', content_rowid='id');
CREATE TRIGGER IF NOT EXISTS entries_ai AFTER INSERT ON entries BEGIN
    INSERT INTO entries_fts (rowid, text, key) VALUES (new.id, new.text, new.key);
END;
CREATE TRIGGER IF NOT EXISTS entries_ad AFTER DELETE ON entries BEGIN
    INSERT INTO entries_fts (entries_fts, rowid, text, key) VALUES ('delete', old.id, old.text, old.key);
END;
CREATE TRIGGER IF NOT EXISTS entries_au AFTER UPDATE OF text ON entries BEGIN
    INSERT INTO entries_fts (entries_fts, rowid, text, key) VALUES ('delete', old.id, old.text, old.key);
    INSERT INTO entries_fts (rowid, text, key) VALUES (new.id, new.text, new.key);
END;
CREATE TABLE IF NOT EXISTS requests (  -- adds that carried a request id, so that a retry adds nothing twice
    key TEXT NOT NULL,
    request_id TEXT NOT NULL,
    number INTEGER NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (key, request_id)
);
CREATE INDEX IF NOT EXISTS requests_by_age ON requests (created_at);
"""
# The tables that hold an agent's data, each with the column naming the agent (what a reshard moves).
AGENT_TABLES = (("agents", "key"), ("entries", "key"), ("requests", "key"))
# How long an add's request id is remembered: a retry later than this adds again.
REQUEST_ID_TTL_S = 24 * 3600
COLUMNS = "number, text, metadata, role, created_at, updated_at"
OLD_AGENT_FILE = re.compile(r"[0-9a-f]{16}\.sqlite3")  # one agent's file, as memory was kept before shard files


@dataclass
class MemoryEntry:
    number: int  # per agent: 1, 2, ...
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
    """The agent's key in entry ids and rows: stable, and not the raw agent id (which may hold any character)."""
    return hashlib.sha256(agent_id.encode()).hexdigest()[:16]


def open_database(directory: Path) -> sqlite3.Connection:
    """The shard's file with today's schema; agent files of an older AIOS in `directory` are moved in first."""
    db = connect_durable(directory / FILE_NAME)
    db.executescript(SCHEMA)
    removed = False
    for path in sorted(directory.iterdir()):
        if OLD_AGENT_FILE.fullmatch(path.name):
            _import_agent_file(db, path)
        elif not (path.suffix == ".new" or path.name.startswith(".empty-")):
            continue  # (else: a half-made agent file or the template of the old layout)
        _remove_database(path)
        removed = True
    if removed:
        fd = os.open(directory, os.O_RDONLY)  # the old files stay gone, so a power cut cannot import them again
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return db


def _database_files(path: Path) -> tuple[Path, Path, Path]:
    """A SQLite database's file and its write-ahead log and shared-memory files."""
    return path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")


def _remove_database(path: Path) -> None:
    for leftover in _database_files(path):
        leftover.unlink(missing_ok=True)


def _import_agent_file(db: sqlite3.Connection, path: Path) -> None:
    """One agent's file of the old layout copied into the shard's file (entry numbers kept). A file that never got
    its owner (a crash while it was made) holds nothing acknowledged; one that cannot be read is kept aside."""
    try:
        old = sqlite3.connect(path)
        try:
            if old.execute("SELECT 1 FROM sqlite_master WHERE name='owner'").fetchone() is None:
                return
            owner = old.execute("SELECT agent_id FROM owner").fetchone()
            if owner is None:
                return
            rows = old.execute("SELECT id, text, metadata, role, size, created_at, updated_at FROM entries").fetchall()
            has_requests = old.execute("SELECT 1 FROM sqlite_master WHERE name='requests'").fetchone()
            requests = old.execute("SELECT request_id, entry_id, created_at FROM requests").fetchall() if has_requests else []
            sequence = old.execute("SELECT seq FROM sqlite_sequence WHERE name='entries'").fetchone()
            last = max([sequence[0] if sequence else 0, *(row[0] for row in rows)])
        finally:
            old.close()
    except sqlite3.DatabaseError as exc:
        log.error("memory file %s cannot be read (%s); kept as %s.unreadable, not imported", path, exc, path.name)
        for part in _database_files(path):
            if part.exists():
                part.replace(part.with_name(part.name + ".unreadable"))
        return
    key = agent_key(owner[0])
    if db.execute("SELECT 1 FROM agents WHERE key=?", (key,)).fetchone() is not None:
        return  # imported before (its removal did not survive a crash): the shard's copy is the newer
    with transaction(db):
        db.execute("INSERT INTO agents VALUES (?, ?, ?)", (key, owner[0], last))
        db.executemany("INSERT INTO entries (key, number, text, metadata, role, size, created_at, updated_at) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [(key, *row) for row in rows])
        db.executemany("INSERT INTO requests VALUES (?, ?, ?, ?)", [(key, *row) for row in requests])


class MemoryDatabase:
    """Statements on the shard's file, each for one agent. Not thread-safe: the memory store runs them on its
    group-commit thread, inside its transactions."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def _entry(self, agent_id: str, row: tuple) -> MemoryEntry:
        number, text, metadata, role, created_at, updated_at = row
        return MemoryEntry(number, agent_id, text, json.loads(metadata), role, created_at, updated_at)

    def add(self, agent_id: str, text: str, metadata: dict[str, str], role: str, now: float,
            request_id: str = "") -> MemoryEntry:
        """A new entry under the next number; with `request_id`, remembered with it (see `added_by`)."""
        key = agent_key(agent_id)
        row = self.db.execute("INSERT INTO agents VALUES (?, ?, 1) ON CONFLICT (key) DO UPDATE SET "
                              "last_number = last_number + 1 RETURNING agent_id, last_number", (key, agent_id)).fetchone()
        if row[0] != agent_id:  # a 64-bit hash collision: refuse rather than mix two agents' memory
            raise PermissionDenied("this agent's memory key belongs to another agent id; register under another name")
        number = int(row[1])
        self.db.execute(
            "INSERT INTO entries (key, number, text, metadata, role, size, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (key, number, text, json.dumps(metadata), role, MemoryEntry(0, "", text, metadata).size, now, now),
        )
        if request_id:
            self.db.execute("INSERT INTO requests VALUES (?, ?, ?, ?)", (key, request_id, number, now))
            self.db.execute("DELETE FROM requests WHERE created_at < ?", (now - REQUEST_ID_TTL_S,))
        return MemoryEntry(number, agent_id, text, dict(metadata), role, now, now)

    def added_by(self, key: str, request_id: str) -> int | None:
        """The entry number an earlier add with this request id made, if any."""
        row = self.db.execute("SELECT number FROM requests WHERE key=? AND request_id=?", (key, request_id)).fetchone()
        return None if row is None else int(row[0])

    def update(self, key: str, entry: MemoryEntry) -> None:
        self.db.execute(
            "UPDATE entries SET text=?, metadata=?, size=?, updated_at=? WHERE key=? AND number=?",
            (entry.text, json.dumps(entry.metadata), entry.size, entry.updated_at, key, entry.number),
        )

    def delete(self, key: str, number: int) -> None:
        self.db.execute("DELETE FROM entries WHERE key=? AND number=?", (key, number))

    def range(self, agent_id: str, first: int, last: int) -> list[MemoryEntry]:
        """The agent's entries with first <= number <= last (a block)."""
        rows = self.db.execute(f"SELECT {COLUMNS} FROM entries WHERE key=? AND number BETWEEN ? AND ? ORDER BY number",
                               (agent_key(agent_id), first, last))
        return [self._entry(agent_id, row) for row in rows]

    def numbers_after(self, key: str, after: int, limit: int) -> list[int]:
        rows = self.db.execute("SELECT number FROM entries WHERE key=? AND number > ? ORDER BY number LIMIT ?",
                               (key, after, limit))
        return [number for (number,) in rows]

    def last_turns(self, key: str, limit: int) -> list[int]:
        """Numbers of the agent's newest `limit` conversation turns, oldest first."""
        rows = self.db.execute("SELECT number FROM entries WHERE key=? AND role != '' ORDER BY number DESC LIMIT ?",
                               (key, limit))
        return sorted(number for (number,) in rows)

    def holds(self, key: str, number: int) -> bool:
        return self.db.execute("SELECT 1 FROM entries WHERE key=? AND number=?", (key, number)).fetchone() is not None

    def search(self, agent_id: str, query: str, limit: int, metadata: dict[str, str]) -> list[SearchHit]:
        """The agent's entries ranked by BM25 over its own entries (resident in RAM or not)."""
        words = fts_query(query)
        if not words:
            return []
        key = agent_key(agent_id)
        where, params = "entries_fts MATCH ?", [f'key:"{key}" AND text:({words})']
        for name, value in metadata.items():
            where += " AND json_extract(e.metadata, ?) = ?"
            params += ['$."' + name.replace('"', '""') + '"', value]
        rows = self.db.execute(
            f"SELECT {', '.join('e.' + c.strip() for c in COLUMNS.split(','))}, "
            f"snippet(entries_fts, 0, '[', ']', '...', 12) "
            f"FROM entries_fts JOIN entries e ON e.id = entries_fts.rowid WHERE {where} ORDER BY e.number", params,
        ).fetchall()
        (documents,) = self.db.execute("SELECT count(*) FROM entries WHERE key=?", (key,)).fetchone()

        def frequency(word: str) -> int:
            return self.db.execute("SELECT count(*) FROM entries_fts WHERE entries_fts MATCH ?",
                                   (f'key:"{key}" AND text:"{word}"',)).fetchone()[0]

        hits = ranked(query, [(row, row[1]) for row in rows], documents, frequency)[:limit]
        return [SearchHit(self._entry(agent_id, row[:6]), score, row[6]) for row, score in hits]

    def agents(self) -> list[tuple[str, str, int, int]]:
        """(key, agent id, entries, bytes of text and metadata) per agent: read at start-up for the counters."""
        return self.db.execute(
            "SELECT a.key, a.agent_id, count(e.number), coalesce(sum(e.size), 0) FROM agents a "
            "LEFT JOIN entries e ON e.key = a.key GROUP BY a.key").fetchall()

    def blocks(self, entries_per_block: int) -> list[tuple[str, int]]:
        """(agent key, block number) of every block holding an entry."""
        return self.db.execute("SELECT DISTINCT key, (number - 1) / ? FROM entries", (entries_per_block,)).fetchall()


def entries_on_disk(directory: Path, agent_id: str) -> int:
    """How many entries of `agent_id` the shard file in `directory` holds, read-only (for operators and tests)."""
    db = sqlite3.connect(f"file:{directory / FILE_NAME}?mode=ro", uri=True)
    try:
        return db.execute("SELECT count(*) FROM entries e JOIN agents a ON a.key = e.key WHERE a.agent_id=?",
                          (agent_id,)).fetchone()[0]
    finally:
        db.close()
