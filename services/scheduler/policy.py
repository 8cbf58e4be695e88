"""Scheduling policies: which waiting syscall a resource serves next, and whom to preempt for it.

A policy is a plain container with no clock or I/O of its own (callers pass
`now`), so it is unit-tested with a simulated clock. The ResourceQueue asks it
whom to dispatch (`pop`), tells it what service a syscall received (`charge`),
and, when every place is taken and someone waits, asks whether a running
syscall should yield (`victim`).
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import Callable, Iterable, Protocol


class Schedulable(Protocol):
    """What a policy reads from a syscall record."""

    agent_id: str
    priority: int  # 0..10, higher first
    weight: float  # fair-share weight, > 0
    slice_used: int  # tokens generated since its last dispatch
    enqueued_at: float  # when it last started waiting
    submitted_at: float  # when the syscall was made (monotonic)


class SchedulingPolicy(Protocol):
    name: str

    def push(self, item: Schedulable, now: float) -> None:
        """A syscall starts waiting (new, or back after a preemption)."""

    def pop(self, now: float) -> Schedulable:
        """The syscall to dispatch next; raises IndexError when none waits."""

    def remove(self, item: Schedulable) -> None:
        """A waiting syscall left (its caller went away)."""

    def charge(self, item: Schedulable, tokens_in: int, tokens_out: int) -> None:
        """A dispatched syscall received this much service."""

    def done(self, item: Schedulable) -> None:
        """A dispatched syscall left its place (finished, failed, or preempted: it is pushed again then)."""

    def victim(self, running: Iterable[Schedulable], now: float) -> Schedulable | None:
        """A running syscall that should yield its place to the next waiting one, if any."""

    def __len__(self) -> int: ...


class FifoPolicy:
    """First come, first served, never preempts: the paper's baseline."""

    name = "fifo"

    def __init__(self) -> None:
        self._items: deque[Schedulable] = deque()

    def push(self, item: Schedulable, now: float) -> None:
        self._items.append(item)

    def pop(self, now: float) -> Schedulable:
        return self._items.popleft()

    def remove(self, item: Schedulable) -> None:
        self._items.remove(item)

    def charge(self, item: Schedulable, tokens_in: int, tokens_out: int) -> None:
        pass

    def done(self, item: Schedulable) -> None:
        pass

    def victim(self, running: Iterable[Schedulable], now: float) -> Schedulable | None:
        return None

    def __len__(self) -> int:
        return len(self._items)


class RoundRobinPolicy(FifoPolicy):
    """FIFO order, but a syscall that has generated `slice_tokens` since dispatch yields to a waiting one."""

    name = "rr"

    def __init__(self, slice_tokens: int = 32) -> None:
        super().__init__()
        if slice_tokens < 1:
            raise ValueError("slice_tokens must be at least 1")
        self.slice_tokens = slice_tokens

    def victim(self, running: Iterable[Schedulable], now: float) -> Schedulable | None:
        expired = [r for r in running if r.slice_used >= self.slice_tokens]
        return max(expired, key=lambda r: r.slice_used, default=None)


class _Ordered:
    """Waiting items ordered by a key computed at pop time; ties go to the earliest pushed."""

    def __init__(self) -> None:
        self._items: dict[Schedulable, int] = {}
        self._order = itertools.count()

    def push(self, item: Schedulable, now: float) -> None:
        self._items[item] = next(self._order)

    def pop_best(self, key: Callable[[Schedulable], float]) -> Schedulable:
        if not self._items:
            raise IndexError("no syscall waits")
        best = min(self._items, key=lambda item: (key(item), self._items[item]))
        del self._items[best]
        return best

    def remove(self, item: Schedulable) -> None:
        del self._items[item]

    def done(self, item: Schedulable) -> None:
        pass

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


class PriorityPolicy(_Ordered):
    """Highest priority first. A syscall's effective priority grows by `aging_per_s` levels per
    second since it was made, so a low priority cannot starve (a preemption does not reset its
    age). A waiting syscall whose effective priority beats a running one's by at least one
    level preempts it once it has run `min_run_tokens` (which bounds thrashing)."""

    name = "priority"

    def __init__(self, aging_per_s: float = 0.2, min_run_tokens: int = 8) -> None:
        super().__init__()
        self.aging_per_s = aging_per_s
        self.min_run_tokens = min_run_tokens

    def effective(self, item: Schedulable, now: float) -> float:
        return item.priority + self.aging_per_s * max(0.0, now - item.submitted_at)

    def pop(self, now: float) -> Schedulable:
        return self.pop_best(lambda item: -self.effective(item, now))

    def charge(self, item: Schedulable, tokens_in: int, tokens_out: int) -> None:
        pass

    def victim(self, running: Iterable[Schedulable], now: float) -> Schedulable | None:
        if not len(self):
            return None
        best = max(self.effective(item, now) for item in self)
        candidates = [
            r for r in running if r.slice_used >= self.min_run_tokens and best >= self.effective(r, now) + 1
        ]
        return min(candidates, key=lambda r: (self.effective(r, now), -r.slice_used), default=None)


class FairSharePolicy(_Ordered):
    """Virtual token counter (VTC; Sheng et al., OSDI'24): each agent's counter grows by the
    weighted tokens it is served divided by its weight; the waiting syscall of the agent with
    the smallest counter goes first. An agent that comes back after idling is lifted to the
    smallest counter among waiting agents, so idling earns no credit. A running syscall yields
    when its agent is ahead of the neediest waiting agent by more than one slice of service.

    Dispatch charges one slice in advance (service then draws on it first; what a syscall
    leaves unused is refunded when it leaves its place). Without it, places freed at the same
    instant would all go to the one agent with the smallest counter, whose counter does not
    move until tokens flow: agents with many calls would be served a burst at a time, and
    everyone else's first answer would wait behind those bursts. With it, agents at equal
    virtual time are interleaved one call each."""

    name = "fair"

    def __init__(self, slice_tokens: int = 32, input_weight: float = 1.0, output_weight: float = 2.0) -> None:
        super().__init__()
        self.slice_tokens = slice_tokens
        self.input_weight = input_weight
        self.output_weight = output_weight
        self.counters: dict[str, float] = {}
        self.advances: dict[Schedulable, float] = {}  # dispatched syscalls' unused advance, in counter units
        self.reserved: dict[str, float] = {}  # per agent, the sum of its advances

    def served(self, agent_id: str) -> float:
        """Its counter without what is only reserved: the service it actually received."""
        return self.counters.get(agent_id, 0.0) - self.reserved.get(agent_id, 0.0)

    def push(self, item: Schedulable, now: float) -> None:
        waiting_agents = {other.agent_id for other in self}
        if item.agent_id not in waiting_agents:
            floor = min((self.served(a) for a in waiting_agents), default=None)
            if floor is not None and self.served(item.agent_id) < floor:
                self.counters[item.agent_id] = floor + self.reserved.get(item.agent_id, 0.0)
            self.counters.setdefault(item.agent_id, 0.0)
        super().push(item, now)

    def pop(self, now: float) -> Schedulable:
        item = self.pop_best(lambda item: self.counters.get(item.agent_id, 0.0))
        self._reserve(item, self.output_weight * self.slice_tokens / item.weight)
        return item

    def charge(self, item: Schedulable, tokens_in: int, tokens_out: int) -> None:
        cost = (self.input_weight * tokens_in + self.output_weight * tokens_out) / item.weight
        prepaid = min(cost, self.advances.get(item, 0.0))
        self._reserve(item, -prepaid)  # the advance becomes service received
        self.counters[item.agent_id] = self.counters.get(item.agent_id, 0.0) + cost

    def done(self, item: Schedulable) -> None:
        self._reserve(item, -self.advances.get(item, 0.0))  # refunded: it left before using all of it
        self.advances.pop(item, None)

    def _reserve(self, item: Schedulable, amount: float) -> None:
        """Moves `item`'s advance (and its agent's counter and reservation) by `amount`."""
        if amount:
            self.advances[item] = self.advances.get(item, 0.0) + amount
            self.counters[item.agent_id] = self.counters.get(item.agent_id, 0.0) + amount
            self.reserved[item.agent_id] = self.reserved.get(item.agent_id, 0.0) + amount

    def victim(self, running: Iterable[Schedulable], now: float) -> Schedulable | None:
        if not len(self):
            return None
        neediest = min(self.served(item.agent_id) for item in self)
        margin = self.output_weight * self.slice_tokens
        candidates = [
            r for r in running if r.slice_used >= self.slice_tokens and self.served(r.agent_id) - neediest > margin
        ]
        return max(candidates, key=lambda r: self.served(r.agent_id), default=None)


POLICIES: dict[str, type] = {p.name: p for p in (FifoPolicy, RoundRobinPolicy, PriorityPolicy, FairSharePolicy)}


def make_policy(name: str, slice_tokens: int = 32) -> SchedulingPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown scheduling policy {name!r}; choose one of {', '.join(POLICIES)}")
    if name in (RoundRobinPolicy.name, FairSharePolicy.name):
        return POLICIES[name](slice_tokens=slice_tokens)
    return POLICIES[name]()
