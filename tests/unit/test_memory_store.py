"""MemoryStore: entries, paging under a RAM budget with LRU-K, restarts, search, and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.errors import InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from services.memory.database import agent_key
from services.memory.core import MemoryStore, entry_id

NOTE = "a note of about fifty bytes, padded out to that...."  # 50 bytes


def store_at(path: Path, **options: int) -> MemoryStore:
    return MemoryStore(path, **{"ram_budget_bytes": 1 << 20, "entries_per_block": 4, **options})


@pytest.fixture
def store(tmp_path: Path):
    s = store_at(tmp_path)
    yield s
    s.close()


def fill(store: MemoryStore, agent: str, n: int) -> list[str]:
    return [entry_id(store.add(agent, f"{NOTE[:-3]}{i:03d}")) for i in range(n)]


def test_entries_round_trip_and_list_oldest_first_in_pages(store):
    ids = fill(store, "alice", 10)
    assert len(set(ids)) == 10
    first = store.get("alice", ids[0])
    assert first.text == NOTE[:-3] + "000" and first.created_at == first.updated_at > 0

    updated = store.update("alice", ids[0], text="changed", metadata={"topic": "rivers"})
    assert (updated.text, updated.metadata) == ("changed", {"topic": "rivers"})
    again = store.update("alice", ids[0], metadata={"mood": "calm"}, remove_metadata=["topic"])
    assert (again.text, again.metadata) == ("changed", {"mood": "calm"})
    assert store.get("alice", ids[0]).metadata == {"mood": "calm"}

    store.delete("alice", ids[1])
    with pytest.raises(NotFound):
        store.get("alice", ids[1])

    pages, token = [], ""
    while True:
        page, token = store.list("alice", page_size=4, page_token=token)
        pages.append([entry_id(e) for e in page])
        if not token:
            break
    assert pages == [[ids[0], *ids[2:5]], ids[5:9], ids[9:]]
    assert store.stats()["entries"] == 9


def test_resident_bytes_stay_under_the_budget_and_spilled_entries_come_back_on_touch(tmp_path):
    # 4 entries of 50 bytes per block = 200 bytes a block; a budget of 500 bytes holds 2 blocks.
    store = store_at(tmp_path, ram_budget_bytes=500)
    ids = fill(store, "alice", 40)  # 10 blocks
    stats = store.stats()
    assert stats["resident_bytes"] <= 500
    assert (stats["blocks_resident"], stats["blocks_spilled"]) == (2, 8)
    assert stats["evictions"] == 8

    faults = stats["faults"]
    assert store.get("alice", ids[0]).text.endswith("000")  # block 0 was spilled: a page fault
    after = store.stats()
    assert after["faults"] == faults + 1 and after["resident_bytes"] <= 500
    store.get("alice", ids[1])  # same block: now a hit
    assert store.stats()["hits"] == after["hits"] + 1
    store.close()


def test_lru_2_keeps_a_hot_block_through_a_scan_that_flushes_it_under_lru(tmp_path):
    def hot_block_survives_scan(k: int, path: Path) -> bool:
        store = store_at(path, ram_budget_bytes=500, k=k)  # room for 2 blocks of 4
        ids = fill(store, "alice", 40)
        for _ in range(3):  # block 0 is hot: touched in several requests
            store.get("alice", ids[0])
        for i in range(4, 40, 4):  # a scan: every other block once
            store.get("alice", ids[i])
        faults = store.stats()["faults"]
        store.get("alice", ids[1])
        survived = store.stats()["faults"] == faults
        store.close()
        return survived

    assert hot_block_survives_scan(2, tmp_path / "lru2")
    assert not hot_block_survives_scan(1, tmp_path / "lru")


def test_everything_acknowledged_is_there_after_a_restart(tmp_path):
    store = store_at(tmp_path, ram_budget_bytes=500)
    ids = fill(store, "alice", 21)
    bob = store.add("bob", "bob's only note", {"k": "v"}, role="user")
    store.delete("alice", ids[20])
    before = store.stats()
    store.close()

    reopened = store_at(tmp_path, ram_budget_bytes=500)
    stats = reopened.stats()
    for key in ("agents", "entries", "total_bytes"):
        assert stats[key] == before[key]
    assert stats["agents"] == 2 and stats["entries"] == 21
    assert (stats["resident_bytes"], stats["blocks_resident"], stats["blocks_spilled"]) == (0, 0, 6)
    assert [reopened.get("alice", i).text[-3:] for i in ids[:20]] == [f"{i:03d}" for i in range(20)]
    assert reopened.get("bob", entry_id(bob)).metadata == {"k": "v"}
    new = reopened.add("alice", "after the restart")
    assert entry_id(new) not in ids  # ids are never reused, not even the deleted one
    reopened.close()


def test_search_ranks_by_bm25_over_resident_and_spilled_entries_without_paging_them_in(tmp_path):
    store = store_at(tmp_path, ram_budget_bytes=300)
    store.add("alice", "the river Danube flows to the Black Sea; the river is long", {"kind": "fact"})
    store.add("alice", "a river runs through the city", {"kind": "fact"})
    fill(store, "alice", 20)  # pushes the first block out
    store.add("alice", "rivers of Europe: notes", {"kind": "todo"})
    store.add("bob", "the river Thames")
    faults = store.stats()["faults"]

    hits = store.search("alice", "river Danube")
    assert [h.entry.text[:13] for h in hits] == ["the river Dan", "a river runs "]
    assert hits[0].score > hits[1].score > 0
    assert "[Danube]" in hits[0].snippet
    assert [h.entry.text for h in store.search("alice", "river", metadata={"kind": "todo"})] == []
    assert [h.entry.text for h in store.search("alice", "notes", metadata={"kind": "todo"})] == ["rivers of Europe: notes"]
    assert store.search("alice", "Thames") == []  # bob's entry is in bob's file
    assert store.stats()["faults"] == faults
    store.close()


def test_recent_turns_are_the_newest_entries_with_a_role_oldest_first(store):
    store.add("alice", "What is the capital of France?", role="user")
    store.add("alice", "a note, not a turn")
    store.add("alice", "Paris.", role="assistant")
    store.add("alice", "And of Italy?", role="user")
    assert [(e.role, e.text) for e in store.recent_turns("alice", 2)] == [("assistant", "Paris."), ("user", "And of Italy?")]
    assert len(store.recent_turns("alice", 10)) == 3


def test_an_agent_sees_and_finds_only_its_own_entries_numbered_from_one(store):
    alice = store.add("alice", "alice's secret plan for the shopping trip")
    bob = store.add("bob", "bob's shopping list")
    assert (alice.number, bob.number) == (1, 1)  # numbers count per agent
    assert [hit.entry.text for hit in store.search("alice", "shopping")] == [alice.text]
    assert [hit.entry.text for hit in store.search("bob", "shopping plan")] == [bob.text]
    assert store.search("bob", "secret") == []
    assert [e.text for e in store.list("bob")[0]] == [bob.text]
    with pytest.raises(PermissionDenied):
        store.get("bob", entry_id(alice))


def test_search_scores_tell_nothing_of_what_other_agents_wrote(store):
    """BM25 over the whole shard would weigh a word by every agent's entries: an agent could test guessed words
    against others' memory by watching its own scores move. Scores come from the caller's own entries only."""
    store.add("mallory", "my guess is hunter2")
    store.add("mallory", "something else entirely")
    before = [(h.entry.text, h.score) for h in store.search("mallory", "hunter2 guess")]
    store.add("alice", "my password is hunter2")
    store.add("alice", "hunter2 again, hunter2")
    assert [(h.entry.text, h.score) for h in store.search("mallory", "hunter2 guess")] == before
    assert before[0][1] > 0


def test_bad_input_gets_a_clear_error_and_loses_nothing(store):
    [mine] = fill(store, "alice", 1)
    theirs = entry_id(store.add("bob", "bob's note"))
    with pytest.raises(InvalidArgument, match="must not be empty"):
        store.add("alice", "   ")
    with pytest.raises(ResourceExhausted, match="limit is 65536 bytes"):
        store.add("alice", "x" * 70_000)
    with pytest.raises(InvalidArgument, match="role"):
        store.add("alice", "hi", role="wizard")
    with pytest.raises(PermissionDenied, match="another agent"):
        store.get("alice", theirs)
    with pytest.raises(PermissionDenied):
        store.delete("alice", theirs)
    with pytest.raises(NotFound):
        store.get("alice", mine[:-1] + "9")
    with pytest.raises(NotFound):  # a well-formed id of an agent that does not exist
        store.get("alice", "mem-0123456789abcdef-1")
    with pytest.raises(InvalidArgument, match="not a memory entry id"):
        store.get("alice", "mem-../../etc/passwd")
    with pytest.raises(InvalidArgument, match="page_token"):
        store.list("alice", page_token=theirs)
    with pytest.raises(InvalidArgument, match="page_size"):
        store.list("alice", page_size=5000)
    with pytest.raises(InvalidArgument, match="query"):
        store.search("alice", " ")
    with pytest.raises(ResourceExhausted):
        store.update("alice", mine, text="y" * 70_000)
    assert store.get("alice", mine).text == NOTE[:-3] + "000"
    assert store.get("bob", theirs).text == "bob's note"
    assert store.stats()["entries"] == 2


def test_an_agents_quota_refuses_growth_past_it_frees_on_delete_and_spares_other_agents(tmp_path):
    store = store_at(tmp_path, quota_bytes=1000)
    ids = [entry_id(store.add("alice", "x" * 300)) for _ in range(3)]
    with pytest.raises(ResourceExhausted, match="quota of 1000"):
        store.add("alice", "x" * 200)
    with pytest.raises(ResourceExhausted, match="quota"):
        store.update("alice", ids[0], text="y" * 500)
    store.update("alice", ids[0], text="short")  # shrinking is always allowed
    store.add("bob", "b" * 900)  # another agent's quota is its own
    store.delete("alice", ids[1])
    store.add("alice", "z" * 500)
    assert store.stats()["quota_bytes_per_agent"] == 1000
    assert sum(len(e.text) for e in store.list("alice")[0]) == 5 + 300 + 500
    store.close()


def test_an_add_repeated_with_its_request_id_adds_once_even_after_a_restart(tmp_path):
    store = store_at(tmp_path)
    first = store.add("alice", "remember the milk", request_id="req-1")
    store.close()
    store = store_at(tmp_path)
    again = store.add("alice", "remember the milk", request_id="req-1")
    assert entry_id(again) == entry_id(first) and store.stats()["entries"] == 1
    assert entry_id(store.add("alice", "remember the milk", request_id="req-2")) != entry_id(first)
    assert entry_id(store.add("bob", "remember the milk", request_id="req-1")) != entry_id(first)  # per agent
    assert store.stats()["entries"] == 3


OLD_AGENT_FILE_SCHEMA = """
CREATE TABLE owner (agent_id TEXT NOT NULL);
CREATE TABLE entries (id INTEGER PRIMARY KEY AUTOINCREMENT, text TEXT NOT NULL, metadata TEXT NOT NULL,
    role TEXT NOT NULL DEFAULT '', size INTEGER NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE requests (request_id TEXT PRIMARY KEY, entry_id INTEGER NOT NULL, created_at REAL NOT NULL);
"""


def test_agent_files_of_the_old_layout_are_moved_into_the_shard_file_with_their_entry_ids(tmp_path):
    """Memory was kept as one SQLite file per agent before: such files are imported at start-up (numbers, request
    ids and the next number kept) and removed, and a half-made one of a crash is dropped."""
    import sqlite3
    import time

    old = tmp_path / f"{agent_key('veteran')}.sqlite3"
    db = sqlite3.connect(old)
    db.executescript(OLD_AGENT_FILE_SCHEMA)
    now = time.time()
    db.execute("INSERT INTO owner VALUES ('veteran')")
    db.executemany("INSERT INTO entries (text, metadata, role, size, created_at, updated_at) VALUES (?, '{}', ?, ?, ?, ?)",
                   [("first words", "user", 11, now, now), ("deleted later", "", 13, now, now), ("kept", "", 4, now, now)])
    db.execute("DELETE FROM entries WHERE id=2")
    db.execute("INSERT INTO requests VALUES ('r-1', 1, ?)", (now,))
    db.commit()
    db.close()
    torn = tmp_path / f"{agent_key('newcomer')}.new"
    torn.write_bytes(b"torn")
    torn.with_name(torn.name + "-wal").write_bytes(b"a stale WAL")
    s = store_at(tmp_path)
    try:
        assert s.stats()["entries"] == 2 and s.stats()["agents"] == 1
        assert s.get("veteran", f"mem-{agent_key('veteran')}-3").text == "kept"
        assert [e.text for e in s.recent_turns("veteran", 5)] == ["first words"]
        assert s.add("veteran", "again", request_id="r-1").number == 1  # the request id came along
        assert s.add("veteran", "new").number == 4  # numbers are never reused, not even a deleted one's
        assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".sqlite3", ".new", ".new-wal")) == []
    finally:
        s.close()
    again = store_at(tmp_path)
    try:
        assert again.stats()["entries"] == 3
    finally:
        again.close()
