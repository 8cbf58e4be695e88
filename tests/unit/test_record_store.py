"""RecordStore: durable records in SQLite and key rules."""

import pytest

from services.errors import InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from services.storage.core import Access, RecordStore, validate_key


@pytest.mark.parametrize("key", ["../x", "a/../../etc", "/etc/passwd", "a//b", "./a", "a/.", "a\\b", "nul\x00", ""])
def test_path_tricks_are_refused(key):
    with pytest.raises(InvalidArgument):
        validate_key(key)


@pytest.mark.parametrize("key", ["notes", "notes/today.txt", "a/b/c", "...hidden", "é"])
def test_ordinary_names_are_accepted(key):
    assert validate_key(key) == key


def test_records_survive_reopening_the_database(tmp_path):
    store = RecordStore(tmp_path / "s.db")
    store.write("agt-a", "notes/one", b"first", {"lang": "en"})
    store.write("agt-a", "notes/one", b"second")
    store.write("agt-b", "notes/one", b"other agent")
    store.close()
    reopened = RecordStore(tmp_path / "s.db")
    info, data = reopened.read("agt-a", "notes/one")
    assert data == b"second" and info.size == 6
    assert reopened.read("agt-b", "notes/one")[1] == b"other agent"


def test_list_by_prefix_treats_sql_wildcards_literally(tmp_path):
    store = RecordStore(tmp_path / "s.db")
    for key in ["a_1", "ab", "a%", "b/x"]:
        store.write("agt-a", key, b".")
    assert [r.key for r in store.list("agt-a", "a_")] == ["a_1"]
    assert [r.key for r in store.list("agt-a", "a%")] == ["a%"]
    assert [r.key for r in store.list("agt-a")] == ["a%", "a_1", "ab", "b/x"]
    assert store.list("agt-b") == []


def test_delete_and_missing_records(tmp_path):
    store = RecordStore(tmp_path / "s.db", max_record_bytes=4)
    store.write("agt-a", "k", b"1234")
    store.delete("agt-a", "k")
    with pytest.raises(NotFound):
        store.read("agt-a", "k")
    with pytest.raises(NotFound):
        store.delete("agt-a", "k")
    with pytest.raises(ResourceExhausted):
        store.write("agt-a", "k", b"12345")


def test_every_write_is_a_version_and_rollback_is_one_more(tmp_path):
    store = RecordStore(tmp_path / "s.db")
    assert [store.write("agt-a", "plan", text.encode()).version for text in ("v1", "v2", "v3")] == [1, 2, 3]
    assert store.read("agt-a", "plan")[1] == b"v3"
    assert store.read("agt-a", "plan", version=1)[1] == b"v1"
    rolled = store.rollback("agt-a", "plan", 1)
    assert (rolled.version, rolled.restored_from) == (4, 1)
    assert store.read("agt-a", "plan")[1] == b"v1"
    history = store.history("agt-a", "plan")
    assert [(h.version, h.size, h.restored_from) for h in history] == [(1, 2, 0), (2, 2, 0), (3, 2, 0), (4, 2, 1)]
    with pytest.raises(NotFound, match="no version 9"):
        store.rollback("agt-a", "plan", 9)


def test_a_delete_is_a_tombstone_that_a_rollback_undoes_and_a_purge_erases(tmp_path):
    store = RecordStore(tmp_path / "s.db")
    store.write("agt-a", "draft", b"text that matters")
    tombstone = store.delete("agt-a", "draft")
    assert (tombstone.version, tombstone.deleted) == (2, True)
    with pytest.raises(NotFound):
        store.read("agt-a", "draft")
    assert store.list("agt-a") == [] and store.search("agt-a", "matters") == []
    assert store.usage("agt-a").records == 0
    store.rollback("agt-a", "draft", 1)  # undelete
    assert store.read("agt-a", "draft")[1] == b"text that matters"
    assert [h.info.key for h in store.search("agt-a", "matters")] == ["draft"]
    store.delete("agt-a", "draft", purge=True)
    with pytest.raises(NotFound):
        store.history("agt-a", "draft")
    assert (store.usage("agt-a").bytes, store.usage("agt-a").records) == (0, 0)


def test_search_ranks_the_newest_text_versions_by_bm25(tmp_path):
    store = RecordStore(tmp_path / "s.db")
    store.write("agt-a", "notes/rivers", b"The Danube and the Rhine are rivers; the Danube is longer.", {"topic": "geo"})
    store.write("agt-a", "notes/trip", b"We crossed the Danube once.", {"topic": "travel"})
    store.write("agt-a", "notes/old", b"the Danube, in an old version")
    store.write("agt-a", "notes/old", b"nothing about it any more")
    store.write("agt-a", "blob", bytes([0xFF, 0xFE, 0x00]))  # not text: stored, not indexed
    store.write("agt-b", "theirs", b"the Danube")
    hits = store.search("agt-a", "Danube")
    assert [h.info.key for h in hits] == ["notes/rivers", "notes/trip"]
    assert hits[0].score > hits[1].score > 0 and "[Danube]" in hits[0].snippet
    assert [h.info.key for h in store.search("agt-a", "Danube", metadata={"topic": "travel"})] == ["notes/trip"]
    assert [h.info.key for h in store.search("agt-a", "Danube", prefix="notes/t")] == ["notes/trip"]
    assert store.search("agt-a", "Danube")[0].info.version == 1


def test_search_scores_tell_nothing_of_what_other_agents_stored(tmp_path):
    """Every agent's text shares one index; its own bm25() would weigh words by all of them, so an agent could test
    guessed words against others' records through its scores. Scores come from the caller's own records only."""
    store = RecordStore(tmp_path / "s.db")
    store.write("agt-mallory", "guess", b"is the password hunter2")
    store.write("agt-mallory", "other", b"nothing to see")
    before = [(h.info.key, h.score) for h in store.search("agt-mallory", "hunter2 password")]
    store.write("agt-alice", "secret", b"my password is hunter2")
    store.write("agt-alice", "again", b"hunter2 hunter2")
    assert [(h.info.key, h.score) for h in store.search("agt-mallory", "hunter2 password")] == before
    store.close()


def test_another_agent_reads_only_what_the_owner_granted(tmp_path):
    store = RecordStore(tmp_path / "s.db")
    store.write("agt-owner", "shared/report", b"numbers")
    store.write("agt-owner", "private/diary", b"secrets")
    store.write("agt-owner", "single", b"one record")
    with pytest.raises(PermissionDenied, match="has not granted"):
        store.read("agt-guest", "shared/report", owner="agt-owner")
    store.grant("agt-owner", "agt-guest", "shared/", prefix=True)
    store.grant("agt-owner", "agt-guest", "single", prefix=False)
    assert store.read("agt-guest", "shared/report", owner="agt-owner")[1] == b"numbers"
    assert store.read("agt-guest", "single", owner="agt-owner")[1] == b"one record"
    assert [v.version for v in store.history("agt-guest", "shared/report", owner="agt-owner")] == [1]
    with pytest.raises(PermissionDenied):
        store.read("agt-guest", "private/diary", owner="agt-owner")
    with pytest.raises(PermissionDenied):
        store.read("agt-other", "shared/report", owner="agt-owner")
    given, received = store.grants("agt-owner")
    assert [(g.grantee, g.key, g.prefix, g.access) for g in given] == [
        ("agt-guest", "shared/", True, Access.READ), ("agt-guest", "single", False, Access.READ)]
    assert received == [] and [g.owner for g in store.grants("agt-guest")[1]] == ["agt-owner", "agt-owner"]
    store.revoke("agt-owner", "agt-guest", "shared/", prefix=True)
    with pytest.raises(PermissionDenied):
        store.read("agt-guest", "shared/report", owner="agt-owner")
    with pytest.raises(NotFound):
        store.revoke("agt-owner", "agt-guest", "shared/", prefix=True)
    with pytest.raises(InvalidArgument):
        store.grant("agt-owner", "agt-owner", "single", prefix=False)


def test_a_read_grant_does_not_write_and_a_read_write_grant_writes_into_the_owners_namespace(tmp_path):
    store = RecordStore(tmp_path / "s.db", quota_bytes=100)
    store.write("agt-owner", "shared/plan", b"v1")
    store.grant("agt-owner", "agt-guest", "shared/", prefix=True)
    for attempt in (lambda: store.write("agt-guest", "shared/plan", b"v2", owner="agt-owner"),
                    lambda: store.delete("agt-guest", "shared/plan", owner="agt-owner"),
                    lambda: store.rollback("agt-guest", "shared/plan", 1, owner="agt-owner")):
        with pytest.raises(PermissionDenied, match="not write"):
            attempt()
    with pytest.raises(PermissionDenied, match="has not granted"):
        store.write("agt-stranger", "shared/plan", b"v2", owner="agt-owner")
    store.grant("agt-owner", "agt-guest", "shared/", prefix=True, access=Access.READ_WRITE)  # again: upgrades
    info = store.write("agt-guest", "shared/plan", b"v2 by the guest", owner="agt-owner")
    assert (info.owner, info.version) == ("agt-owner", 2)
    assert store.read("agt-owner", "shared/plan")[1] == b"v2 by the guest"
    assert store.usage("agt-owner").bytes == 2 + 15 and store.usage("agt-guest").bytes == 0  # the owner's quota pays
    assert store.list("agt-guest") == []  # nothing landed in the guest's own namespace
    with pytest.raises(ResourceExhausted):
        store.write("agt-guest", "shared/big", b"x" * 100, owner="agt-owner")
    store.rollback("agt-guest", "shared/plan", 1, owner="agt-owner")
    store.delete("agt-guest", "shared/plan", owner="agt-owner")
    assert [v.deleted for v in store.history("agt-owner", "shared/plan")] == [False, False, False, True]
    with pytest.raises(PermissionDenied):  # a grant covers its prefix only
        store.write("agt-guest", "private/x", b"x", owner="agt-owner")


def test_quotas_count_every_version_and_live_records(tmp_path):
    store = RecordStore(tmp_path / "s.db", quota_bytes=10, quota_records=2)
    store.write("agt-a", "a", b"12345")
    store.write("agt-a", "a", b"1234")  # 9 bytes stored: both versions count
    with pytest.raises(ResourceExhausted, match="quota of 10"):
        store.write("agt-a", "b", b"12")
    store.write("agt-a", "b", b"1")
    with pytest.raises(ResourceExhausted, match="records"):
        store.write("agt-a", "c", b"")
    store.write("agt-b", "c", b"1234567890")  # quotas are per agent
    store.delete("agt-a", "a", purge=True)
    assert (store.usage("agt-a").bytes, store.usage("agt-a").records) == (1, 1)
    store.write("agt-a", "c", b"123456789")
    assert store.read("agt-a", "b")[1] == b"1"


def test_a_write_repeated_with_its_request_id_happens_once_even_after_a_restart(tmp_path):
    """What the kernel's retry after a storage crash relies on: the first call committed, its reply was lost."""
    store = RecordStore(tmp_path / "s.db")
    first = store.write("agt-a", "plan", b"v1", request_id="req-1")
    store.close()
    store = RecordStore(tmp_path / "s.db")
    assert store.write("agt-a", "plan", b"v1", request_id="req-1") == first  # answered again, not written again
    assert [i.version for i in store.history("agt-a", "plan")] == [1]
    assert store.write("agt-b", "plan", b"v1", request_id="req-1").owner == "agt-b"  # ids are per caller
    second = store.write("agt-a", "plan", b"v2", request_id="req-2")
    assert second.version == 2
    rolled = store.rollback("agt-a", "plan", 1, request_id="req-3")
    assert store.rollback("agt-a", "plan", 1, request_id="req-3") == rolled
    deleted = store.delete("agt-a", "plan", request_id="req-4")
    assert store.delete("agt-a", "plan", request_id="req-4") == deleted  # not NOT_FOUND: the same answer
    assert [i.version for i in store.history("agt-a", "plan")] == [1, 2, 3, 4]
    with pytest.raises(PermissionDenied):
        store.write("agt-a", "shared/x", b"", owner="agt-c", request_id="req-5")  # a refusal is not remembered
    store.grant("agt-c", "agt-a", "shared/", prefix=True, access=Access.READ_WRITE)
    assert store.write("agt-a", "shared/x", b"now", owner="agt-c", request_id="req-5").version == 1
    with pytest.raises(InvalidArgument):
        store.write("agt-a", "plan", b"x", request_id="r" * 129)
