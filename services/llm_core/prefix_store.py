"""Prefixes in host RAM: the KV of finished sequences whose seq_id was needed for another, kept for prompts that
start the same way.

An agent's next call usually extends its last one (the same context plus a new turn). With more agents than
resident seq_ids, the cached prefix of an agent's last call is dropped before its next call arrives, and the whole
context would be prefilled again: for 500 tokens, over a second on a small CPU. Copying the same KV back from RAM
takes milliseconds. This store keeps those prefixes (llama.cpp sequence state, the bytes a snapshot holds) under a
byte budget, least recently used first out, like llama-server's `--cache-ram`. Unlike the resident prefixes
(where a shared system prompt serves every agent), an entry here serves only the agent whose it was: kept for
minutes and thousands of entries, a store shared across agents would let one probe what others sent and got.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

import numpy as np


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


class HostPrefixCache:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self.hits = 0  # prefixes given back to a sequence
        self._entries: OrderedDict[int, tuple[str, np.ndarray, memoryview]] = OrderedDict()  # owner, tokens, KV; LRU first
        self._keys = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, owner: str, tokens: np.ndarray, kv: memoryview) -> bool:
        """Keeps `kv`, the KV of `tokens`, for `owner`; an entry of the owner's that is a prefix of `tokens` gives
        nothing more and goes. False when it is larger than the whole budget."""
        if len(kv) > self.budget_bytes:
            return False
        for key, (whose, held, _) in list(self._entries.items()):
            if whose == owner and len(held) <= len(tokens) and common_prefix(held, tokens) == len(held):
                self.drop(key)
        while self.used_bytes + len(kv) > self.budget_bytes:
            self.drop(next(iter(self._entries)))
        self._entries[next(self._keys)] = (owner, tokens, kv)
        self.used_bytes += len(kv)
        return True

    def longest(self, owner: str, want: np.ndarray) -> tuple[int, int]:
        """(tokens, key) of the owner's entry sharing the longest prefix with `want`; (0, -1) if none."""
        best, best_key = 0, -1
        for key, (whose, held, _) in self._entries.items():
            n = common_prefix(held, want) if whose == owner else 0
            if n > best:
                best, best_key = n, key
        return best, best_key

    def take(self, key: int) -> memoryview:
        """The KV of entry `key`, now the most recently used (it stays: the owner's calls may branch)."""
        self._entries.move_to_end(key)
        self.hits += 1
        return self._entries[key][2]

    def drop(self, key: int) -> None:
        _, _, kv = self._entries.pop(key)
        self.used_bytes -= len(kv)