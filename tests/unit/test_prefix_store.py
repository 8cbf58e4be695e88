"""The host-RAM store of prefixes (services/llm_core/prefix_store.py), without a model."""

from __future__ import annotations

import numpy as np

from services.llm_core.prefix_store import HostPrefixCache, common_prefix


def tokens(*ids: int) -> np.ndarray:
    return np.array(ids, dtype=np.int32)


def kv(size: int) -> memoryview:
    return memoryview(bytearray(size))


def test_common_prefix_counts_the_leading_tokens_two_prompts_share():
    assert common_prefix(tokens(1, 2, 3), tokens(1, 2, 4, 5)) == 2
    assert common_prefix(tokens(1, 2), tokens(1, 2, 3)) == 2
    assert common_prefix(tokens(), tokens(1)) == 0
    assert common_prefix(tokens(9), tokens(1)) == 0


def test_the_longest_shared_prefix_wins_and_stays_for_others():
    store = HostPrefixCache(budget_bytes=1000)
    store.put("a", tokens(1, 2, 3, 4), kv(100))
    store.put("a", tokens(1, 2, 9), kv(100))
    n, key = store.longest("a", tokens(1, 2, 3, 4, 5, 6))
    assert n == 4 and len(store.take(key)) == 100
    assert store.longest("a", tokens(1, 2, 3, 4, 5, 6))[0] == 4 and store.hits == 1  # taking does not remove it
    assert store.longest("a", tokens(7, 8)) == (0, -1)


def test_an_entry_that_a_new_one_extends_is_dropped():
    store = HostPrefixCache(budget_bytes=1000)
    store.put("a", tokens(1, 2, 3), kv(100))
    store.put("a", tokens(1, 2, 3, 4, 5), kv(150))  # the agent's next call, grown: the old one gives nothing more
    assert len(store) == 1 and store.used_bytes == 150


def test_the_least_recently_used_go_first_when_the_budget_is_reached():
    store = HostPrefixCache(budget_bytes=300)
    store.put("a", tokens(1, 1), kv(100))
    store.put("a", tokens(2, 2), kv(100))
    store.put("a", tokens(3, 3), kv(100))
    store.take(store.longest("a", tokens(1, 1, 5))[1])  # 1 is used again: 2 is now the oldest
    store.put("a", tokens(4, 4), kv(100))
    assert store.longest("a", tokens(2, 2))[0] == 0
    assert all(store.longest("a", tokens(t, t))[0] == 2 for t in (1, 3, 4))
    assert store.used_bytes == 300
    assert not store.put("a", tokens(5, 5), kv(301)) and len(store) == 3  # larger than the whole budget: not kept


def test_an_agent_finds_only_its_own_prefixes():
    """A hostile agent cannot probe what another sent or got: the other's entry is not a source for it, and its own
    longer entry does not push the other's out as redundant."""
    store = HostPrefixCache(budget_bytes=1000)
    store.put("victim", tokens(1, 2, 3, 4), kv(100))
    assert store.longest("thief", tokens(1, 2, 3, 4, 5)) == (0, -1)
    store.put("thief", tokens(1, 2, 3, 4, 5), kv(100))
    assert len(store) == 2 and store.longest("victim", tokens(1, 2, 3, 4, 9))[0] == 4
