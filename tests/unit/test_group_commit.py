"""GroupCommit: many writes, one transaction; each answered only once durable; one failing piece undoes only itself;
a failed commit fails its group and the store reloads (or, if it cannot, refuses work until restarted)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from services.durable_sqlite import GroupCommit, connect_durable
from services.errors import InvalidArgument, Unavailable


def committer(path: Path) -> GroupCommit:
    db = connect_durable(path)
    db.execute("CREATE TABLE IF NOT EXISTS notes (n INTEGER PRIMARY KEY)")
    return GroupCommit(db, "test")


def rows_seen_by_another_connection(path: Path) -> set[int]:
    other = sqlite3.connect(path)
    try:
        return {n for (n,) in other.execute("SELECT n FROM notes")}
    finally:
        other.close()


def test_writes_arriving_together_commit_in_fewer_groups_and_each_answer_comes_after_its_commit(tmp_path):
    path = tmp_path / "db.sqlite3"
    commits = committer(path)
    entered, gate = threading.Event(), threading.Event()
    answers: dict[int, set[int]] = {}

    def insert(n: int) -> int:
        if n == 0:  # the first piece holds its group until every other writer has queued behind it
            entered.set()
            gate.wait()
        commits.db.execute("INSERT INTO notes VALUES (?)", (n,))
        return n

    def writer(n: int) -> None:
        assert commits.run_sync(insert, n) == n
        answers[n] = rows_seen_by_another_connection(path)  # what is on disk when the answer arrives

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(50)]
    threads[0].start()
    assert entered.wait(30)  # the first piece runs alone in the first group, so the others all queue behind it
    for thread in threads[1:]:
        thread.start()
    while commits.queued() < 49:  # polls a count, not a clock: the committer thread is held at the gate
        threading.Event().wait(0.001)
    gate.set()
    for thread in threads:
        thread.join()
    assert all(n in seen for n, seen in answers.items())  # committed (visible to another connection) before answered
    assert commits.pieces == 50 and commits.groups <= 2
    commits.close()
    assert rows_seen_by_another_connection(path) == set(range(50))
    with pytest.raises(Unavailable, match="closed"):
        commits.run_sync(insert, 99)


def test_a_piece_that_raises_is_undone_alone_and_its_error_reaches_only_its_caller(tmp_path):
    path = tmp_path / "db.sqlite3"
    commits = committer(path)

    def insert_then_fail(n: int) -> None:
        commits.db.execute("INSERT INTO notes VALUES (?)", (n,))
        raise InvalidArgument("refused after writing")

    async def together() -> list:
        return await asyncio.gather(
            commits.run(commits.db.execute, "INSERT INTO notes VALUES (1)"),
            commits.run(insert_then_fail, 2),
            commits.run(commits.db.execute, "INSERT INTO notes VALUES (3)"),
            return_exceptions=True)

    results = asyncio.run(together())
    assert isinstance(results[1], InvalidArgument) and not isinstance(results[0], Exception)
    commits.close()
    assert rows_seen_by_another_connection(path) == {1, 3}


def failing_commits(tmp_path: Path, reload) -> tuple[GroupCommit, sqlite3.Connection]:
    """A database where a group holding a child without its parent fails at COMMIT (a deferred foreign key), as a
    full disk would make a commit fail."""
    db = connect_durable(tmp_path / "db.sqlite3")
    db.executescript("PRAGMA foreign_keys=ON; CREATE TABLE parents (id INTEGER PRIMARY KEY); "
                     "CREATE TABLE children (parent INTEGER REFERENCES parents (id) DEFERRABLE INITIALLY DEFERRED);")
    return GroupCommit(db, "test", reload=reload), db


def test_a_failed_commit_fails_its_group_only_and_the_store_reloads_its_state(tmp_path):
    reloads = []
    commits, db = failing_commits(tmp_path, reload=lambda: reloads.append(1))
    with pytest.raises(Unavailable, match="failed to commit"):
        commits.run_sync(db.execute, "INSERT INTO children VALUES (7)")
    assert reloads == [1]  # the store's state in RAM is read again from the file
    commits.run_sync(db.execute, "INSERT INTO parents VALUES (7)")  # later work goes on
    assert commits.run_sync(lambda: db.execute("SELECT count(*) FROM children").fetchone()[0]) == 0
    commits.close()


def test_a_store_that_cannot_reload_after_a_failed_commit_refuses_work_until_a_restart(tmp_path):
    def reload() -> None:
        raise OSError("the file cannot be read either")

    commits, db = failing_commits(tmp_path, reload)
    with pytest.raises(Unavailable, match="failed to commit"):
        commits.run_sync(db.execute, "INSERT INTO children VALUES (7)")
    with pytest.raises(Unavailable, match="restart the service"):
        commits.run_sync(db.execute, "INSERT INTO parents VALUES (7)")
    commits.close()
