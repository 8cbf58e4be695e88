"""RecordStore: durable records in SQLite and key rules."""

import pytest

from services.errors import InvalidArgument, NotFound, ResourceExhausted
from services.storage.core import RecordStore, validate_key


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
