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
import math
import queue
import re
import sqlite3
import threading
import unicodedata
from collections import Counter
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
    return " OR ".join(f'"{w}"' for w in search_words(text))


def search_words(text: str) -> list[str]:
    """The words of a text as the full-text index sees them: lower case, without diacritics."""
    plain = "".join(c for c in unicodedata.normalize("NFKD", text.lower()) if not unicodedata.combining(c))
    return re.findall(r"\w+", plain)


BM25_K1, BM25_B = 1.2, 0.75  # FTS5's


def ranked(query: str, candidates: list[tuple[T, str]], documents: int,
           document_frequency: Callable[[str], int]) -> list[tuple[T, float]]:
    """`candidates` (item, text) ranked by Okapi BM25, most relevant first, computed from the caller's own documents
    only: `documents` of theirs, `document_frequency(word)` among them, lengths from the candidates. FTS5's own bm25()
    weighs words by the whole table, every agent's rows, and so would tell an agent which words other agents'
    texts hold."""
    terms = sorted(set(search_words(query)))
    words = [(item, search_words(text)) for item, text in candidates]
    average = sum(len(w) for _, w in words) / len(words) if words else 1.0
    idf = {t: math.log(1 + (documents - df + 0.5) / (df + 0.5)) for t in terms for df in [document_frequency(t)]}
    scored = []
    for item, text_words in words:
        counts = Counter(text_words)
        norm = BM25_K1 * (1 - BM25_B + BM25_B * len(text_words) / (average or 1.0))
        scored.append((item, sum(idf[t] * counts[t] * (BM25_K1 + 1) / (counts[t] + norm) for t in terms if counts[t])))
    return sorted(scored, key=lambda pair: -pair[1])  # ties keep the candidates' order


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
    A group whose commit fails (a full disk) is rolled back and every piece of it answered UNAVAILABLE; `reload`
    (run on the thread) then brings the store's state in RAM back in line with the file. Only if that fails too does
    the committer refuse all work until the service is restarted."""

    def __init__(self, db: sqlite3.Connection, name: str, reload: Callable[[], None] | None = None) -> None:
        self.db = db
        self.name = name
        self.reload = reload
        self.groups = 0  # transactions committed
        self.pieces = 0  # pieces of work run
        self._queue: queue.SimpleQueue[_Piece | None] = queue.SimpleQueue()
        self._failed: str = ""
        self._closing = False
        self._lock = threading.Lock()  # orders submissions against close()
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
        with self._lock:
            closing, self._closing = self._closing, True
            if not closing:
                self._queue.put(None)  # the last item: nothing is submitted after it
        self._thread.join()
        if not closing:
            self.db.close()

    def _submit(self, piece: _Piece) -> None:
        with self._lock:
            if self._failed or self._closing:
                raise Unavailable(self._failed or f"the {self.name} database is closed")
            self._queue.put(piece)

    def _loop(self) -> None:
        group: list[_Piece | None] = []
        try:
            while True:
                group = [self._queue.get()]
                while len(group) < MAX_GROUP and not self._queue.empty():
                    group.append(self._queue.get())
                pieces = [piece for piece in group if piece is not None]
                if pieces:
                    self._run_group(pieces)
                    _answer(pieces)
                if None in group:
                    return
        except BaseException as exc:  # a bug here would leave callers waiting forever: answer them all first
            log.critical("the %s committer stopped: %s", self.name, exc)
            with self._lock:
                self._failed = f"the {self.name} database's committer stopped ({exc}); restart the service"
                while not self._queue.empty():
                    group.append(self._queue.get())
            left = [piece for piece in group if piece is not None and not piece.done.done()]
            for piece in left:
                piece.error = Unavailable(self._failed)
            _answer(left)
            raise

    def _run_group(self, pieces: list[_Piece]) -> None:
        db = self.db
        if self._failed:
            for piece in pieces:
                piece.error = Unavailable(self._failed)
            return
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
            log.critical("the %s database failed to commit a group of %d calls: %s", self.name, len(pieces), exc)
            for piece in pieces:
                piece.error = Unavailable(f"the {self.name} database failed to commit ({exc}); nothing of this call "
                                          "was kept; retry (and check the disk)")
            try:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                if self.reload is not None:
                    self.reload()  # what the group changed in RAM is gone with it
            except Exception as again:  # noqa: BLE001 - the state in RAM cannot be trusted any more
                self._failed = (f"the {self.name} database failed to commit ({exc}) and to recover ({again}); "
                                "restart the service: it reads its state from the file again")
        self.groups += 1
        self.pieces += len(pieces)


def _answer(pieces: list[_Piece]) -> None:
    """Hands each piece's outcome to its caller: threads at once, each event loop with one wake-up for all."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Piece]] = {}
    for piece in pieces:
        if piece.loop is None:
            _settle([piece])
        else:
            by_loop.setdefault(piece.loop, []).append(piece)
    for loop, settled in by_loop.items():
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
