"""LRU-K replacement (O'Neil, O'Neil and Weikum, SIGMOD 1993), as a plain table of reference history.

The victim is the resident key whose K-th most recent reference is oldest (its
"backward K-distance" is largest). A key referenced fewer than K times has an
infinite distance and goes first; ties among those go to the least recently
used. So a sequential scan, whose keys are each referenced once, cannot flush a
hot set that is referenced again and again; LRU (K = 1) lets it.

Time is whatever the caller counts in (the memory service counts requests).
References to a key within `correlated_period` of its last reference are
correlated (one burst, e.g. one request touching a block many times): they
count as one, and the key cannot be evicted during that period. History of
evicted keys is retained (up to `retained_keys`), so a key that comes back soon
after eviction is judged by its past, as in the paper's retained information
period.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field


@dataclass
class _History:
    refs: list[float] = field(default_factory=list)  # uncorrelated reference times, most recent first (at most K)
    last: float = 0.0  # the most recent reference, correlated or not


class LruKCache:
    """Which keys to keep: `reference` every touch, `evict` when over budget. Holds no values."""

    def __init__(self, k: int = 2, correlated_period: float = 0, retained_keys: int = 10_000) -> None:
        if k < 1:
            raise ValueError("k must be at least 1 (k = 1 is plain LRU)")
        self.k = k
        self.correlated_period = correlated_period
        self.retained_keys = retained_keys
        self._resident: dict[Hashable, _History] = {}
        self._retained: OrderedDict[Hashable, _History] = OrderedDict()  # evicted keys' history, oldest first

    def __contains__(self, key: Hashable) -> bool:
        return key in self._resident

    def __len__(self) -> int:
        return len(self._resident)

    def reference(self, key: Hashable, now: float) -> bool:
        """Records a reference; returns True if the key was resident (a hit), False if it became resident."""
        history = self._resident.get(key)
        hit = history is not None
        if history is None:
            history = self._retained.pop(key, None) or _History()
            self._resident[key] = history
        if hit and now - history.last <= self.correlated_period:
            history.last = now  # the same burst
            return True
        # The paper shifts older references by the length of the burst that just ended, so a long
        # burst does not look like a gap between them.
        burst = history.last - history.refs[0] if hit else 0
        history.refs = ([now] + [t + burst for t in history.refs])[: self.k]
        history.last = now
        return hit

    def kth_reference(self, key: Hashable) -> float:
        """The key's K-th most recent uncorrelated reference; -inf with fewer than K."""
        refs = self._resident[key].refs
        return refs[self.k - 1] if len(refs) >= self.k else float("-inf")

    def victim(self, now: float) -> Hashable | None:
        """The key to evict next (None if nothing is resident); keys inside their correlated period
        are spared while any other key is resident."""
        if not self._resident:
            return None
        eligible = [key for key, h in self._resident.items() if now - h.last > self.correlated_period]
        candidates = eligible or list(self._resident)
        return min(candidates, key=lambda key: (self.kth_reference(key), self._resident[key].last))

    def evict(self, key: Hashable) -> None:
        """Forgets that `key` is resident, keeping its history for a while."""
        self._retained[key] = self._resident.pop(key)
        while len(self._retained) > self.retained_keys:
            self._retained.popitem(last=False)

    def forget(self, key: Hashable) -> None:
        """Drops a key and its history (its data is gone)."""
        self._resident.pop(key, None)
        self._retained.pop(key, None)
