"""Durable, versioned per-agent records in SQLite (WAL mode, fsync on commit).

Every write adds a version; nothing is overwritten. A delete adds a tombstone
version (the history stays and a rollback can undo it) unless it purges the
record, which erases every version and frees its bytes. A rollback copies an
old version forward as a new one. The newest version of each text record is
indexed for full-text search (FTS5, BM25). Another agent reads a record, its
versions and metadata only under a grant from its owner, for that key or a
prefix; a read-write grant also lets it write, delete and roll back there
(charged to the owner's quota). Quotas count the bytes of every stored version
and the number of live records per agent.

A write is acknowledged only after its transaction committed, so it survives
`kill -9` of the service or a crash of the machine.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import sqlite3
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from services.durable_sqlite import GroupCommit, connect_durable, fts_query, grouped, ranked
from services.errors import InvalidArgument, NotFound, PermissionDenied, ResourceExhausted, require

MAX_KEY_CHARS = 256
DEFAULT_MAX_RECORD_BYTES = 16 * 1024 * 1024
DEFAULT_QUOTA_BYTES = 256 * 1024 * 1024
DEFAULT_QUOTA_RECORDS = 10_000
MAX_SEARCH_RESULTS = 100
MAX_VERSION = 2**63 - 1  # SQLite's largest integer
# Characters that make two different keys look the same in a listing: bidi controls and zero-width characters.
INVISIBLE = frozenset("\u200b\u200c\u200d\u2060\ufeff\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u061c\u200e\u200f")

SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    agent_id TEXT NOT NULL,
    key TEXT NOT NULL,
    version INTEGER NOT NULL,        -- 1, 2, ... per record
    data BLOB NOT NULL,              -- empty for a tombstone
    metadata TEXT NOT NULL,          -- JSON object of strings
    deleted INTEGER NOT NULL,        -- 1: a tombstone
    restored_from INTEGER,           -- set on a version a rollback made: the version it copied
    created_at REAL NOT NULL,
    PRIMARY KEY (agent_id, key, version)
);
CREATE TABLE IF NOT EXISTS usage (
    agent_id TEXT PRIMARY KEY,
    bytes INTEGER NOT NULL,          -- data of every stored version
    records INTEGER NOT NULL         -- records whose newest version is not a tombstone
);
CREATE TABLE IF NOT EXISTS grants (
    owner TEXT NOT NULL,
    grantee TEXT NOT NULL,
    key TEXT NOT NULL,
    prefix INTEGER NOT NULL,         -- 1: every key starting with `key`
    access INTEGER NOT NULL DEFAULT 1, -- Access: 1 read, 2 read-write
    PRIMARY KEY (owner, grantee, key, prefix)
);
CREATE INDEX IF NOT EXISTS grants_by_grantee ON grants (grantee, owner);
CREATE VIRTUAL TABLE IF NOT EXISTS search USING fts5(body, agent_id UNINDEXED, key UNINDEXED);
CREATE TABLE IF NOT EXISTS search_rows (  -- the search row of each record: found by key, not by scanning the index
    agent_id TEXT NOT NULL,
    key TEXT NOT NULL,
    row INTEGER NOT NULL,              -- rowid in search
    PRIMARY KEY (agent_id, key)
);
CREATE TABLE IF NOT EXISTS requests (  -- the replies of writes that carried a request id, for a retry to get again
    agent_id TEXT NOT NULL,            -- the caller
    request_id TEXT NOT NULL,
    reply TEXT NOT NULL,               -- JSON of the RecordInfo answered
    created_at REAL NOT NULL,
    PRIMARY KEY (agent_id, request_id)
);
CREATE INDEX IF NOT EXISTS requests_by_age ON requests (created_at);
"""
# How long a write's request id is remembered: a retry later than this writes again.
REQUEST_ID_TTL_S = 24 * 3600


@dataclass
class RecordInfo:
    key: str
    size: int
    version: int
    metadata: dict[str, str] = field(default_factory=dict)
    updated_at: float = 0.0
    deleted: bool = False
    restored_from: int = 0
    owner: str = ""


@dataclass
class SearchHit:
    info: RecordInfo
    score: float  # BM25, higher is better
    snippet: str


class Access(enum.IntEnum):
    """What a grant lets its grantee do; mirrors aios.v1.GrantAccess."""

    READ = 1
    READ_WRITE = 2


@dataclass
class Grant:
    grantee: str
    key: str
    prefix: bool
    access: Access = Access.READ
    owner: str = ""


@dataclass
class Usage:
    bytes: int
    records: int
    quota_bytes: int
    quota_records: int


def validate_key(key: str) -> str:
    """Keys are relative, "/"-separated names; anything path-like that escapes is refused."""
    require(bool(key), "storage key is required")
    _check_name(key, "storage key")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidArgument(f"storage key {key!r} has an empty, '.' or '..' segment; use names like 'notes/today'")
    return key


def validate_prefix(prefix: str) -> str:
    """A key prefix such as "shared/" or "notes/2026-": a key's rules, but it may end anywhere."""
    require(bool(prefix), "a prefix grant needs a non-empty prefix (granting everything is not supported)")
    _check_name(prefix, "prefix")
    if any(segment in (".", "..") for segment in prefix.split("/")) or "//" in prefix:
        raise InvalidArgument(f"prefix {prefix!r} has an empty, '.' or '..' segment")
    return prefix


def _check_name(name: str, what: str) -> None:
    require(len(name) <= MAX_KEY_CHARS, f"{what} is {len(name)} characters; the limit is {MAX_KEY_CHARS}")
    if any(c in INVISIBLE for c in name):
        raise InvalidArgument(f"{what} {name!r} contains a bidi control or zero-width character (it could spoof a name)")
    if unicodedata.normalize("NFC", name) != name:
        raise InvalidArgument(f"{what} {name!r} is not in Unicode NFC form; normalise it first")
    if any(not segment.strip() for segment in name.split("/") if segment):
        raise InvalidArgument(f"{what} {name!r} has a segment of only whitespace")
    if any(ord(c) < 32 or c in "\\\x7f" for c in name):
        raise InvalidArgument(f"{what} {name!r} contains a backslash or control character")
    if name.startswith("/"):
        raise InvalidArgument(f"{what} {name!r} must be relative (no leading '/')")


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _text(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def index_search_rows(db: sqlite3.Connection, agent_id: str = "") -> None:
    """search_rows made again from the search index (of one agent, or all): for a database from before search_rows,
    and after `aios reshard` copied an agent's search rows under new rowids."""
    where, params = ("WHERE agent_id=?", (agent_id,)) if agent_id else ("", ())
    db.execute(f"DELETE FROM search_rows {where}", params)
    db.execute(f"INSERT INTO search_rows SELECT agent_id, key, rowid FROM search {where}", params)


class RecordStore:
    """All agents' records in one database; each call runs in a savepoint of a group commit (one transaction and
    one fsync for all the calls that arrived together) and returns once that committed."""

    def __init__(
        self,
        path: Path,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
        quota_bytes: int = DEFAULT_QUOTA_BYTES,
        quota_records: int = DEFAULT_QUOTA_RECORDS,
    ) -> None:
        self.max_record_bytes = max_record_bytes
        self.quota_bytes = quota_bytes
        self.quota_records = quota_records
        self.path = path
        self._db = connect_durable(path)
        with self._db:
            if self._db.execute("SELECT 1 FROM sqlite_master WHERE name='grants'").fetchone() and not any(
                column[1] == "access" for column in self._db.execute("PRAGMA table_info(grants)")
            ):  # a database from before read-write grants: its grants were read-only
                self._db.execute("ALTER TABLE grants ADD COLUMN access INTEGER NOT NULL DEFAULT 1")
            indexed = self._db.execute("SELECT 1 FROM sqlite_master WHERE name='search_rows'").fetchone()
            self._db.executescript(SCHEMA)
            if not indexed:  # a database from before search_rows
                index_search_rows(self._db)
        self.commits = GroupCommit(self._db, "storage")

    # ---- writes ----------------------------------------------------------------------

    @grouped
    def write(
        self, agent_id: str, key: str, data: bytes, metadata: dict[str, str] | None = None, owner: str = "",
        request_id: str = "",
    ) -> RecordInfo:
        """A new version of `owner`'s record (default: the caller's own; another's needs a read-write grant).
        With `request_id`, a repeat of the same call (a retry) answers what the first did and writes nothing."""
        require(bool(agent_id), "agent_id is required")
        validate_key(key)
        if len(data) > self.max_record_bytes:
            raise ResourceExhausted(f"record is {len(data)} bytes; the limit is {self.max_record_bytes} bytes per record")
        owner = owner or agent_id
        def write() -> RecordInfo:
            self._check_access(agent_id, owner, key, Access.READ_WRITE)
            return self._add_version(owner, key, data, dict(metadata or {}), deleted=False, restored_from=None)

        return self._once(agent_id, request_id, write)

    @grouped
    def rollback(self, agent_id: str, key: str, version: int, owner: str = "", request_id: str = "") -> RecordInfo:
        """Makes `version`'s content the newest again, as a new version (once per `request_id`)."""
        validate_key(key)
        require(0 < version <= MAX_VERSION, "version must be a positive version number (see the record's history)")
        owner = owner or agent_id
        def roll_back() -> RecordInfo:
            self._check_access(agent_id, owner, key, Access.READ_WRITE)
            data, metadata, deleted = self._version(owner, key, version)
            return self._add_version(owner, key, data, json.loads(metadata), deleted=bool(deleted),
                                     restored_from=version)

        return self._once(agent_id, request_id, roll_back)

    @grouped
    def delete(self, agent_id: str, key: str, purge: bool = False, owner: str = "", request_id: str = "") -> RecordInfo:
        """Adds a tombstone (the history stays), or with `purge` erases every version (once per `request_id`)."""
        validate_key(key)
        owner = owner or agent_id
        return self._once(agent_id, request_id, lambda: self._delete(agent_id, owner, key, purge))

    def _once(self, agent_id: str, request_id: str, write: Callable[[], RecordInfo]) -> RecordInfo:
        """`write()`, once per request id: a repeat answers the reply remembered with the first,
        in the same transaction, so a retry never writes twice."""
        require(len(request_id) <= 128, "request_id is at most 128 characters")
        if request_id:
            row = self._db.execute("SELECT reply FROM requests WHERE agent_id=? AND request_id=?",
                                   (agent_id, request_id)).fetchone()
            if row is not None:
                return RecordInfo(**json.loads(row[0]))
        reply = write()
        if request_id:
            now = time.time()
            self._db.execute("INSERT INTO requests VALUES (?, ?, ?, ?)",
                             (agent_id, request_id, json.dumps(dataclasses.asdict(reply)), now))
            self._db.execute("DELETE FROM requests WHERE created_at < ?", (now - REQUEST_ID_TTL_S,))
        return reply

    def _delete(self, agent_id: str, owner: str, key: str, purge: bool) -> RecordInfo:
        self._check_access(agent_id, owner, key, Access.READ_WRITE)
        agent_id = owner  # from here on, the namespace the record lives in
        head = self._head(agent_id, key)
        if head is None or (head.deleted and not purge):
            raise NotFound(f"no record {key!r} in this agent's storage")
        if not purge:
            return self._add_version(agent_id, key, b"", {}, deleted=True, restored_from=None)
        (size,) = self._db.execute(
            "SELECT coalesce(sum(length(data)), 0) FROM versions WHERE agent_id=? AND key=?", (agent_id, key)
        ).fetchone()
        self._db.execute("DELETE FROM versions WHERE agent_id=? AND key=?", (agent_id, key))
        self._unindex(agent_id, key)
        self._account(agent_id, -size, -1 if not head.deleted else 0)
        return head

    @grouped
    def grant(self, owner: str, grantee: str, key: str, prefix: bool, access: Access = Access.READ) -> Grant:
        """`owner` (always the caller: an agent grants only its own records) lets `grantee` in; again: new access."""
        require(bool(grantee), "grantee_agent_id is required")
        require(grantee != owner, "an agent always reads its own records; grant to another agent")
        validate_prefix(key) if prefix else validate_key(key)
        self._db.execute(
            "INSERT INTO grants VALUES (?, ?, ?, ?, ?) ON CONFLICT (owner, grantee, key, prefix) "
            "DO UPDATE SET access = excluded.access", (owner, grantee, key, int(prefix), int(access)))
        return Grant(grantee, key, prefix, Access(access), owner)

    @grouped
    def revoke(self, owner: str, grantee: str, key: str, prefix: bool) -> Grant:
        row = self._db.execute(
            "DELETE FROM grants WHERE owner=? AND grantee=? AND key=? AND prefix=? RETURNING access",
            (owner, grantee, key, int(prefix))).fetchone()
        if row is None:
            raise NotFound(f"no such grant of {key!r}{' (prefix)' if prefix else ''} to {grantee!r}")
        return Grant(grantee, key, prefix, Access(row[0]), owner)

    # ---- reads -----------------------------------------------------------------------

    @grouped
    def read(self, agent_id: str, key: str, version: int = 0, owner: str = "", offset: int = 0,
             length: int = 0) -> tuple[RecordInfo, bytes]:
        """The newest version (or `version`) of a record of `owner` (default: the caller's own); with `offset` and
        `length` (0: to the end) a range of its bytes, so that a client with a small message limit reads it in parts.
        The info's size is the whole record's."""
        validate_key(key)
        owner = owner or agent_id
        require(version <= MAX_VERSION, f"version {version} does not exist (versions stay below 2^63)")
        self._check_access(agent_id, owner, key)
        if version:
            row = self._db.execute(
                "SELECT version, data, metadata, deleted, restored_from, created_at FROM versions "
                "WHERE agent_id=? AND key=? AND version=?", (owner, key, version)
            ).fetchone()
            if row is None:
                raise NotFound(f"record {key!r} has no version {version}")
        else:
            row = self._db.execute(
                "SELECT version, data, metadata, deleted, restored_from, created_at FROM versions "
                "WHERE agent_id=? AND key=? ORDER BY version DESC LIMIT 1", (owner, key)
            ).fetchone()
            if row is None or row[3]:
                raise NotFound(f"no record {key!r} in {'this agent' if owner == agent_id else 'the owner'}'s storage")
        number, data, metadata, deleted, restored_from, created_at = row
        require(offset <= len(data), f"offset {offset} is past the end of {key!r} ({len(data)} bytes)")
        info = RecordInfo(key, len(data), number, json.loads(metadata), created_at, bool(deleted), restored_from or 0, owner)
        return info, bytes(data[offset:offset + length] if length else data[offset:])

    @grouped
    def history(self, agent_id: str, key: str, owner: str = "") -> list[RecordInfo]:
        validate_key(key)
        owner = owner or agent_id
        self._check_access(agent_id, owner, key)
        rows = self._db.execute(
            "SELECT version, length(data), metadata, deleted, restored_from, created_at FROM versions "
            "WHERE agent_id=? AND key=? ORDER BY version", (owner, key)
        ).fetchall()
        if not rows:
            raise NotFound(f"no record {key!r} in this agent's storage")
        return [RecordInfo(key, size, v, json.loads(m), t, bool(d), r or 0, owner) for v, size, m, d, r, t in rows]

    @grouped
    def list(self, agent_id: str, prefix: str = "") -> list[RecordInfo]:
        """Live records (newest version not a tombstone), by key."""
        rows = self._db.execute(
            "SELECT key, version, length(data), metadata, deleted, restored_from, created_at FROM versions v "
            "WHERE agent_id=? AND key LIKE ? ESCAPE '\\' AND version = "
            "(SELECT max(version) FROM versions WHERE agent_id=v.agent_id AND key=v.key) ORDER BY key",
            (agent_id, _like_prefix(prefix)),
        ).fetchall()
        return [RecordInfo(k, size, v, json.loads(m), t, False, r or 0, agent_id) for k, v, size, m, d, r, t in rows if not d]

    @grouped
    def search(
        self, agent_id: str, query: str, limit: int = 10, prefix: str = "", metadata: dict[str, str] | None = None
    ) -> list[SearchHit]:
        """The caller's live text records ranked by BM25 over its own records (`ranked`: never other agents'
        statistics), with a snippet around the matches."""
        require(bool(query.strip()), "the search query must not be empty")
        require(0 < limit <= MAX_SEARCH_RESULTS, f"limit must be between 1 and {MAX_SEARCH_RESULTS}")
        match = fts_query(query)
        if not match:
            return []
        where = "search MATCH ? AND s.agent_id = ? AND s.key LIKE ? ESCAPE '\\'"
        params: list[object] = [match, agent_id, _like_prefix(prefix)]
        for name, value in (metadata or {}).items():
            where += " AND json_extract(v.metadata, ?) = ?"
            params += ['$."' + name.replace('"', '""') + '"', value]
        rows = self._db.execute(
            "SELECT s.key, v.version, length(v.data), v.metadata, v.restored_from, v.created_at, s.body, "
            "snippet(search, 0, '[', ']', '...', 12) FROM search s JOIN versions v ON v.agent_id = s.agent_id "
            "AND v.key = s.key AND v.version = (SELECT max(version) FROM versions WHERE agent_id = s.agent_id "
            f"AND key = s.key) WHERE {where} ORDER BY s.key", params,
        ).fetchall()
        (documents,) = self._db.execute("SELECT count(*) FROM search_rows WHERE agent_id=?", (agent_id,)).fetchone()

        def frequency(word: str) -> int:
            return self._db.execute("SELECT count(*) FROM search WHERE search MATCH ? AND agent_id=?",
                                    (f'"{word}"', agent_id)).fetchone()[0]

        return [
            SearchHit(RecordInfo(k, size, v, json.loads(m), t, False, r or 0, agent_id), score, snippet)
            for (k, v, size, m, r, t, _, snippet), score in ranked(query, [(row, row[6]) for row in rows], documents,
                                                                    frequency)[:limit]
        ]

    @grouped
    def grants(self, agent_id: str) -> tuple[list[Grant], list[Grant]]:
        """The grants `agent_id` gave (by grantee, key) and those it received (by owner, key)."""
        given = self._db.execute(
            "SELECT grantee, key, prefix, access, owner FROM grants WHERE owner=? ORDER BY grantee, key", (agent_id,)
        ).fetchall()
        received = self._db.execute(
            "SELECT grantee, key, prefix, access, owner FROM grants WHERE grantee=? ORDER BY owner, key", (agent_id,)
        ).fetchall()
        return ([Grant(g, k, bool(p), Access(a), o) for g, k, p, a, o in given],
                [Grant(g, k, bool(p), Access(a), o) for g, k, p, a, o in received])

    @grouped
    def usage(self, agent_id: str) -> Usage:
        used_bytes, records = self._used(agent_id)
        return Usage(used_bytes, records, self.quota_bytes, self.quota_records)

    @grouped
    def totals(self) -> dict[str, int]:
        """The store's size over all agents (for its metrics)."""
        agents, stored, records = self._db.execute(
            "SELECT count(*), coalesce(sum(bytes), 0), coalesce(sum(records), 0) FROM usage").fetchone()
        return {"agents": agents, "stored_bytes": stored, "records": records,
                "file_bytes": sum(p.stat().st_size for p in self.path.parent.glob(self.path.name + "*"))}

    def close(self) -> None:
        self.commits.close()

    # ---- internals -------------------------------------------------------------------

    def _head(self, agent_id: str, key: str) -> RecordInfo | None:
        row = self._db.execute(
            "SELECT version, length(data), metadata, deleted, restored_from, created_at FROM versions "
            "WHERE agent_id=? AND key=? ORDER BY version DESC LIMIT 1", (agent_id, key)
        ).fetchone()
        if row is None:
            return None
        v, size, m, d, r, t = row
        return RecordInfo(key, size, v, json.loads(m), t, bool(d), r or 0, agent_id)

    def _version(self, agent_id: str, key: str, version: int) -> tuple[bytes, str, int]:
        row = self._db.execute(
            "SELECT data, metadata, deleted FROM versions WHERE agent_id=? AND key=? AND version=?", (agent_id, key, version)
        ).fetchone()
        if row is None:
            raise NotFound(f"record {key!r} has no version {version}")
        return bytes(row[0]), row[1], row[2]

    def _used(self, agent_id: str) -> tuple[int, int]:
        row = self._db.execute("SELECT bytes, records FROM usage WHERE agent_id=?", (agent_id,)).fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    def _account(self, agent_id: str, size: int, records: int) -> None:
        self._db.execute(
            "INSERT INTO usage VALUES (?, ?, ?) ON CONFLICT (agent_id) DO UPDATE "
            "SET bytes = bytes + excluded.bytes, records = records + excluded.records",
            (agent_id, size, records),
        )

    def _add_version(
        self, agent_id: str, key: str, data: bytes, metadata: dict[str, str], deleted: bool, restored_from: int | None
    ) -> RecordInfo:
        head = self._head(agent_id, key)
        live_before = head is not None and not head.deleted
        new_records = int(not deleted) - int(live_before)
        used_bytes, records = self._used(agent_id)
        if used_bytes + len(data) > self.quota_bytes:
            raise ResourceExhausted(
                f"this agent's storage holds {used_bytes} bytes (every version counts); {len(data)} more would pass "
                f"its quota of {self.quota_bytes}. Purge records you no longer need (delete with purge)."
            )
        if records + new_records > self.quota_records:
            raise ResourceExhausted(f"this agent has {records} records, its quota; delete some before adding more")
        version = head.version + 1 if head else 1
        now = time.time()
        self._db.execute(
            "INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (agent_id, key, version, data, json.dumps(metadata), int(deleted), restored_from, now),
        )
        self._unindex(agent_id, key)
        text = None if deleted else _text(data)
        if text is not None:
            row = self._db.execute("INSERT INTO search (body, agent_id, key) VALUES (?, ?, ?)", (text, agent_id, key))
            self._db.execute("INSERT INTO search_rows VALUES (?, ?, ?)", (agent_id, key, row.lastrowid))
        self._account(agent_id, len(data), new_records)
        return RecordInfo(key, len(data), version, metadata, now, deleted, restored_from or 0, agent_id)

    def _unindex(self, agent_id: str, key: str) -> None:
        """Takes the record's text out of the search index (by its row: a filter on the index's unindexed columns
        would read every agent's rows)."""
        row = self._db.execute("DELETE FROM search_rows WHERE agent_id=? AND key=? RETURNING row", (agent_id, key)).fetchone()
        if row is not None:
            self._db.execute("DELETE FROM search WHERE rowid=?", row)

    def _check_access(self, agent_id: str, owner: str, key: str, needed: Access = Access.READ) -> None:
        if owner == agent_id:
            return
        granted = self._db.execute(
            "SELECT max(access) FROM grants WHERE owner=? AND grantee=? AND ((prefix=0 AND key=?) OR "
            "(prefix=1 AND substr(?, 1, length(key)) = key))", (owner, agent_id, key, key)
        ).fetchone()[0]
        if granted is None:
            raise PermissionDenied(f"the owner has not granted this agent access to {key!r}; ask the owner to grant it")
        if granted < needed:
            raise PermissionDenied(
                f"the owner granted this agent read access to {key!r}, not write; ask the owner for a read-write grant"
            )
