"""Waiting for a state another process reaches asynchronously."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], within_s: float = 10.0, what: str = "condition") -> T:
    """Polls `condition` until it returns something truthy; fails after `within_s`.

    Used for states another process reaches asynchronously (a slot freed after a
    cancellation): the condition itself is the synchronisation, the deadline bounds it.
    """
    deadline = time.monotonic() + within_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not reached within {within_s} s (last: {value!r})"
        time.sleep(0.02)
