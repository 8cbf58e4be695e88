"""Paced load: `n` callers each making one call a second, spread evenly over the second.

The scale part paces AIOS's agents this way and, in the same run, the bare
two-hop relay (bench/relay.py), so that a p99 under paced load is read beside
what the transport alone reaches on the same machine at the same rate.
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable

import numpy as np

# Each caller's first call is due this long after the pacing starts (time for every caller to be scheduled).
LEAD_S = 0.5


async def pace(n: int, seconds: float, call: Callable[[int, float], Awaitable[None]]) -> float:
    """Runs `call(i, due)` for caller i once a second for `seconds`, caller i's k-th call due at start + k + i/n, and
    returns the wall time from the first call's due time. A call that starts late (the previous one of its caller
    still running) counts its wait when `call` times from `due`."""
    start = time.monotonic() + LEAD_S

    async def caller(i: int) -> None:
        for k in range(int(seconds)):
            due = start + k + i / n
            await asyncio.sleep(max(0.0, due - time.monotonic()))  # the pacing itself: one call a second
            await call(i, due)

    await asyncio.gather(*(caller(i) for i in range(n)))
    return time.monotonic() - start


def latency_ms(latencies: list[float]) -> dict[str, float]:
    """p50 and p99 of `latencies` (seconds) in ms, as the scale part and the relay report them (0 when none)."""
    return {f"p{q}_ms": 1000 * float(np.percentile(latencies, q)) if latencies else 0.0 for q in (50, 99)}
