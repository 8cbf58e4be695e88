"""SQLite plumbing shared by the memory and storage managers.

Connections are opened for durability: WAL journal, fsync on every commit. A
transaction that returned is in the WAL on disk: it survives `kill -9` of the
process (and a machine crash); one that did not return leaves nothing behind.
A service commits its writes in groups (`GroupCommit`): many writes, one fsync,
each acknowledged only once its group is durable.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import queue
import re
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from services.errors import Unavailable

log = logging.getLogger("aios.sqlite")


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


T = TypeVar("T")
MAX_GROUP = 512  # pieces of work in one transaction at most: one commit's wait stays short


@dataclass
class _Piece:
    work: Callable[[], Any]
    done: concurrent.futures.Future | asyncio.Future
    loop: asyncio.AbstractEventLoop | None = None  # set for an asyncio future
    result: Any = None
    error: BaseException | None = None


class GroupCommit:
    """Group commit: one thread owns a connection and runs the work submitted to it in groups, each group one
    transaction (so one fsync for many writes), each piece in its own savepoint (a piece that raises undoes only
    itself). A piece's result is handed back only after its group committed: nothing is acknowledged before it is
    durable. Work runs one piece at a time on that thread, so a store's state in RAM needs no lock of its own.

    Stores call `run_sync` from their public methods (inline when already on the thread), servicers `await run`.
    A failed commit leaves RAM ahead of the file: the committer then refuses all work (UNAVAILABLE) until the
    service is restarted and reads its file again."""

    def __init__(self, db: sqlite3.Connection, name: str) -> None:
        self.db = db
        self.name = name
        self.groups = 0  # transactions committed
        self.pieces = 0  # pieces of work run
        self._queue: queue.SimpleQueue[_Piece | None] = queue.SimpleQueue()
        self._failed: str = ""
        self._thread = threading.Thread(target=self._loop, name=f"{name}-commits", daemon=True)
        self._thread.start()

    def run_sync(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`function(*args, **kwargs)` run in a group; returns (or raises) once the group committed. From any
        thread."""
        if threading.get_ident() == self._thread.ident:
            return function(*args, **kwargs)
        piece = _Piece(functools.partial(function, *args, **kwargs), concurrent.futures.Future())
        self._submit(piece)
        return piece.done.result()  # type: ignore[return-value]

    async def run(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """The same for asyncio callers: the event loop keeps serving while the group commits."""
        loop = asyncio.get_running_loop()
        piece = _Piece(functools.partial(function, *args, **kwargs), loop.create_future(), loop)
        self._submit(piece)
        return await piece.done

    def queued(self) -> int:
        """Pieces waiting for the next group."""
        return self._queue.qsize()

    def close(self) -> None:
        """Runs what was submitted, then stops the thread and closes the connection."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self.db.close()

    def _submit(self, piece: _Piece) -> None:
        if self._failed or not self._thread.is_alive():
            raise Unavailable(self._failed or f"the {self.name} database is closed")
        self._queue.put(piece)

    def _loop(self) -> None:
        while True:
            group = [self._queue.get()]
            while len(group) < MAX_GROUP and not self._queue.empty():
                group.append(self._queue.get())
            pieces = [piece for piece in group if piece is not None]
            if pieces:
                self._run_group(pieces)
            if None in group:
                return

    def _run_group(self, pieces: list[_Piece]) -> None:
        db = self.db
        if self._failed:
            for piece in pieces:
                piece.error = Unavailable(self._failed)
        else:
            try:
                db.execute("BEGIN")
                for piece in pieces:
                    db.execute("SAVEPOINT piece")
                    try:
                        piece.result = piece.work()
                    except BaseException as exc:  # handed to its caller; the others' work stands
                        piece.error = exc
                        db.execute("ROLLBACK TO piece")  # raises if SQLite gave up the whole transaction
                    db.execute("RELEASE piece")
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                log.critical("the %s database failed to commit: %s", self.name, exc)
                self._failed = (f"the {self.name} database failed to commit ({exc}); restart the service, "
                                "it reads its state from the file again")
                if db.in_transaction:
                    db.execute("ROLLBACK")
                for piece in pieces:
                    piece.error = Unavailable(self._failed)
            self.groups += 1
            self.pieces += len(pieces)
        by_loop: dict[asyncio.AbstractEventLoop, list[_Piece]] = {}
        for piece in pieces:
            if piece.loop is None:
                _settle([piece])
            else:
                by_loop.setdefault(piece.loop, []).append(piece)
        for loop, settled in by_loop.items():  # one wake-up per event loop for the whole group
            try:
                loop.call_soon_threadsafe(_settle, settled)
            except RuntimeError:  # that loop is closed: no one waits any more
                pass


def _settle(pieces: list[_Piece]) -> None:
    for piece in pieces:
        if piece.done.done():  # an asyncio caller that gave up (cancelled)
            continue
        if piece.error is not None:
            piece.done.set_exception(piece.error)
        else:
            piece.done.set_result(piece.result)


def grouped(method: Callable[..., T]) -> Callable[..., T]:
    """A store method that runs on the store's `commits` (a GroupCommit) and returns once its group committed."""

    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> T:
        return self.commits.run_sync(method, self, *args, **kwargs)

    return call
