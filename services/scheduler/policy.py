"""Scheduling policies: which waiting syscall a resource serves next.

A policy is a plain container with no clock or I/O of its own, so it can be
unit-tested on its own; the ResourceQueue asks it whom to dispatch.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")


class SchedulingPolicy(Protocol[T]):
    name: str

    def push(self, item: T) -> None:
        """A syscall starts waiting."""

    def pop(self) -> T:
        """The syscall to dispatch next; raises IndexError when none waits."""

    def remove(self, item: T) -> None:
        """A waiting syscall left (its caller went away)."""

    def __len__(self) -> int: ...


class FifoPolicy(Generic[T]):
    """First come, first served: the paper's baseline."""

    name = "fifo"

    def __init__(self) -> None:
        self._items: deque[T] = deque()

    def push(self, item: T) -> None:
        self._items.append(item)

    def pop(self) -> T:
        return self._items.popleft()

    def remove(self, item: T) -> None:
        self._items.remove(item)

    def __len__(self) -> int:
        return len(self._items)


POLICIES: dict[str, type] = {FifoPolicy.name: FifoPolicy}


def make_policy(name: str) -> SchedulingPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown scheduling policy {name!r}; choose one of {', '.join(POLICIES)}") from None
