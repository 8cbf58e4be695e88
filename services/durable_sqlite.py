"""SQLite plumbing shared by the memory and storage managers.

Connections are opened for durability: WAL journal, fsync on every commit. A
transaction that returned is in the WAL on disk: it survives `kill -9` of the
process (and a machine crash); one that did not return leaves nothing behind.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def connect_durable(path: Path) -> sqlite3.Connection:
    """A connection usable from any thread (callers serialise), in autocommit mode: a statement is
    a transaction; use `transaction` for several."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK if the block raises."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def fts_query(text: str) -> str:
    """Free text as an FTS5 query: every word quoted (no operator syntax), any of them may match."""
    return " OR ".join(f'"{w}"' for w in re.findall(r"\w+", text.lower()))
