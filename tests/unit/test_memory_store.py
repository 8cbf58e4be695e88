"""MemoryStore: per-agent entries, ownership and limits."""

import pytest

from services.errors import InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from services.memory.core import MemoryStore


def test_add_get_list_delete_round_trip():
    store = MemoryStore()
    a = store.add("agt-a", "likes tea", {"kind": "preference"})
    b = store.add("agt-a", "lives in Lisbon")
    assert store.get("agt-a", a.id).metadata == {"kind": "preference"}
    entries, token = store.list("agt-a")
    assert [e.text for e in entries] == ["likes tea", "lives in Lisbon"] and token == ""
    store.delete("agt-a", a.id)
    assert [e.id for e in store.list("agt-a")[0]] == [b.id]
    assert store.stats()["entries"] == 1 and store.resident_bytes == b.size


def test_listing_pages_through_all_entries_in_order():
    store = MemoryStore()
    for i in range(7):
        store.add("agt-a", f"note {i}")
    seen, token = [], ""
    while True:
        page, token = store.list("agt-a", page_size=3, page_token=token)
        seen += [e.text for e in page]
        if not token:
            break
    assert seen == [f"note {i}" for i in range(7)]


def test_other_agents_entries_are_denied_and_unknown_ids_not_found():
    store = MemoryStore()
    entry = store.add("agt-a", "secret")
    with pytest.raises(PermissionDenied):
        store.get("agt-b", entry.id)
    with pytest.raises(PermissionDenied):
        store.delete("agt-b", entry.id)
    with pytest.raises(NotFound):
        store.get("agt-a", "mem-999")
    assert store.get("agt-a", entry.id).text == "secret"


def test_empty_and_oversized_entries_are_refused():
    store = MemoryStore(max_entry_bytes=16)
    with pytest.raises(InvalidArgument):
        store.add("agt-a", "   ")
    with pytest.raises(ResourceExhausted, match="16 bytes"):
        store.add("agt-a", "x" * 17)
    with pytest.raises(InvalidArgument):
        store.list("agt-a", page_token="not-a-token")
    assert store.stats()["entries"] == 0
