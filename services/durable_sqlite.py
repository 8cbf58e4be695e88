"""SQLite opened for durability: WAL journal, fsync on every commit.

A transaction that returned is in the WAL on disk: it survives `kill -9` of the
process (and a machine crash); one that did not return leaves nothing behind.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path


def connect_durable(path: Path) -> sqlite3.Connection:
    """A connection usable from any thread (callers serialise), in autocommit mode: use `with conn:`
    blocks or explicit BEGIN/COMMIT for multi-statement transactions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db
