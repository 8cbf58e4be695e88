"""LruKCache on hand-written reference strings; the expected victims are worked out beside each case."""

from __future__ import annotations

import pytest

from services.memory.lru_k import LruKCache


def replay(cache: LruKCache, capacity: int, refs: list[tuple[float, str]]) -> tuple[int, list[str]]:
    """Feeds (time, key) references to a buffer of `capacity` keys; returns (hits, victims in order)."""
    hits, victims = 0, []
    for now, key in refs:
        hits += cache.reference(key, now)
        while len(cache) > capacity:
            victim = cache.victim(now)
            cache.evict(victim)
            victims.append(victim)
    return hits, victims


def at_steps(keys: str) -> list[tuple[float, str]]:
    """'AAB' -> [(1, 'A'), (2, 'A'), (3, 'B')]: one reference per time step."""
    return [(t, key) for t, key in enumerate(keys, start=1)]


def test_a_key_seen_fewer_than_k_times_goes_first_where_lru_would_evict_the_oldest():
    # t1 A, t2 A, t3 B, t4 C, t5 D; room for 3.
    # At t5: A's 2nd most recent reference is t1; B and C have one reference (infinitely old).
    # LRU-2 evicts B (infinite, and least recently used of B and C). LRU evicts A (last used at t2).
    refs = at_steps("AABCD")
    assert replay(LruKCache(k=2), 3, refs)[1] == ["B"]
    assert replay(LruKCache(k=1), 3, refs)[1] == ["A"]


def test_the_oldest_kth_reference_is_evicted():
    # t1 A, t2 B, t3 A, t4 B, t5 C, t6 C, t7 A, t8 D; room for 3 (crp 0, so every reference counts).
    # At t8: 2nd most recent references: A t3, B t2, C t5; D is new and protected. Victim B.
    assert replay(LruKCache(k=2), 3, at_steps("ABABCCAD"))[1] == ["B"]
    # LRU-3 at t8: A's 3rd most recent is t1; B has 2 references, C 2: both infinite -> the least
    # recently used of them, B (t4) before C (t6).
    assert replay(LruKCache(k=3), 3, at_steps("ABABCCAD"))[1] == ["B"]


def test_a_sequential_scan_flushes_lrus_hot_set_but_not_lru_2s():
    # Hot keys H and J alternate, a scan S T U passes once, then H and J come back. Room for 3.
    # LRU-2: at t6 (T) the scan key S is the only infinite one besides T -> S; at t7 (U) -> T.
    #   H and J stay resident: hits at t3, t4, t8, t9 = 4.
    # LRU: t6 evicts H (last t3), t7 evicts J (t4), t8 H faults (evicts S), t9 J faults (evicts T):
    #   hits at t3, t4 = 2.
    refs = at_steps("HJHJSTUHJ")
    hits_lru2, victims_lru2 = replay(LruKCache(k=2), 3, refs)
    hits_lru, victims_lru = replay(LruKCache(k=1), 3, refs)
    assert (hits_lru2, victims_lru2) == (4, ["S", "T"])
    assert (hits_lru, victims_lru) == (2, ["H", "J", "S", "T"])


def test_a_burst_inside_the_correlated_period_counts_as_one_reference():
    # A at t1 and t2, B at t10, C at t20; room for 2.
    # Without a correlated period A has two references (2nd most recent: t1) and B one -> B goes.
    # With a period of 2, A's second touch is the same burst: A has one reference like B, and the
    # tie goes to the least recently used, A (last touched t2).
    refs = [(1, "A"), (2, "A"), (10, "B"), (20, "C")]
    assert replay(LruKCache(k=2, correlated_period=0), 2, refs)[1] == ["B"]
    assert replay(LruKCache(k=2, correlated_period=2), 2, refs)[1] == ["A"]


def test_a_key_inside_its_correlated_period_is_not_evicted():
    # A at t1 and t10 (two uncorrelated references), B at t14, C at t15; room for 2, period 3.
    # By distance B (one reference) would go, but B was touched 1 step ago, inside its period:
    # only A is eligible.
    refs = [(1, "A"), (10, "A"), (14, "B"), (15, "C")]
    assert replay(LruKCache(k=2, correlated_period=3), 2, refs)[1] == ["A"]
    assert replay(LruKCache(k=2, correlated_period=0), 2, refs)[1] == ["B"]


def test_history_of_an_evicted_key_is_retained():
    # Room for 2; every key but A is referenced once. t3 evicts A, t4 B. A faults back at t5 with its
    # t1 reference remembered (2nd most recent: t1), so the single-reference keys go around it:
    # t5 evicts C, t6 D, t7 E, t8 F.
    # Forgetting evicted keys' history (retained_keys=0), A is one more single reference and, as the
    # least recently used, goes at t7 (then E at t8).
    refs = at_steps("ABCDAEFG")
    assert replay(LruKCache(k=2), 2, refs)[1] == ["A", "B", "C", "D", "E", "F"]
    assert replay(LruKCache(k=2, retained_keys=0), 2, refs)[1] == ["A", "B", "C", "D", "A", "E"]


def test_forgotten_keys_lose_their_history_and_empty_caches_have_no_victim():
    cache = LruKCache(k=2)
    assert cache.victim(0) is None
    cache.reference("A", 1)
    cache.reference("A", 2)
    cache.forget("A")
    assert "A" not in cache and cache.victim(3) is None
    assert cache.reference("A", 4) is False  # a miss, with a fresh history
    assert cache.kth_reference("A") == float("-inf")


def test_k_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        LruKCache(k=0)
