"""One queue per resource: at most `capacity` syscalls run at once, the policy picks the next.

For the LLM the queue also preempts: when every place is taken and someone
waits, it asks the policy for a victim after each piece of service and calls
`preempt(victim)` (which asks the LLM core to context-switch it out). The
victim's generate loop then calls `requeue`, giving its place to the next
syscall and waiting, PREEMPTED, for its own next turn.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

from services.scheduler.policy import SchedulingPolicy
from services.scheduler.syscalls import Resource, SyscallRecord, SyscallState

# Waits a queue remembers for its percentiles (GetStatus, `aios top`).
RECENT_WAITS = 1000


class ResourceQueue:
    def __init__(
        self,
        resource: Resource,
        policy: SchedulingPolicy,
        capacity: int,
        preempt: Callable[[SyscallRecord], None] | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.resource = resource
        self.policy = policy
        self.capacity = capacity
        self.preempt = preempt
        self.running: set[SyscallRecord] = set()
        self.completed = 0
        self.preemptions = 0
        self._grants: dict[SyscallRecord, asyncio.Future[None]] = {}
        self._waits: deque[float] = deque(maxlen=RECENT_WAITS)  # seconds each of the last dispatched ones waited
        self._refusal: Callable[[], BaseException] | None = None  # set once closed

    @property
    def queued(self) -> int:
        return len(self.policy)

    @property
    def waiting_to_resume(self) -> int:
        return sum(1 for r in list(self._grants) if r.state == SyscallState.PREEMPTED)  # list(): see waiting_in_line

    def wait_percentiles(self) -> tuple[float, float]:
        """Median and 99th percentile of the last RECENT_WAITS waits, in seconds (0 before any)."""
        waits = sorted(self._waits)
        if not waits:
            return 0.0, 0.0
        return waits[(len(waits) - 1) // 2], waits[math.ceil(0.99 * len(waits)) - 1]

    def counts_of(self, agent_id: str) -> tuple[int, int]:
        """One agent's syscalls waiting (preempted ones included) and running here."""
        waiting = sum(1 for r in self._grants if r.agent_id == agent_id)
        return waiting, sum(1 for r in self.running if r.agent_id == agent_id)

    @asynccontextmanager
    async def turn(self, record: SyscallRecord) -> AsyncIterator[None]:
        """Waits until the policy dispatches `record`, holds a running place while inside."""
        await self._wait_for_grant(record)
        try:
            yield
        finally:
            if self._leave(record):
                self.completed += 1
                self._dispatch()

    async def requeue(self, record: SyscallRecord) -> None:
        """Gives up the running place after a preemption and waits, PREEMPTED, for the next one."""
        self._leave(record)
        record.preempt_requested = False
        record.preempt()
        await self._wait_for_grant(record)

    def progress(self, record: SyscallRecord, tokens_in: int, tokens_out: int) -> None:
        """Accounts service a running syscall received; may order a preemption."""
        record.slice_used += tokens_out
        self.policy.charge(record, tokens_in, tokens_out)
        self._maybe_preempt()

    def resize(self, capacity: int) -> None:
        """Runs at most `capacity` at once from now on (LLM cores drained, down or back; 0 while none serves): more
        are dispatched at once if it grew; if it shrank, those running finish and no one replaces them meanwhile."""
        self.capacity = capacity
        self._dispatch()

    def close(self, refusal: Callable[[], BaseException]) -> None:
        """Takes no more turns (the kernel is stopping): whoever waits for one, or asks later, gets `refusal()`;
        the running syscalls go on."""
        self._refusal = refusal
        for record, granted in list(self._grants.items()):
            self.policy.remove(record)
            del self._grants[record]
            if not granted.done():  # a caller cancelled in this instant cleans up after itself
                granted.set_exception(refusal())

    async def _wait_for_grant(self, record: SyscallRecord) -> None:
        if self._refusal is not None:
            raise self._refusal()
        granted = asyncio.get_running_loop().create_future()
        self._grants[record] = granted
        record.pushed_at = time.monotonic()
        self.policy.push(record, record.pushed_at)
        self._dispatch()
        try:
            await granted
        except BaseException:
            if self._grants.pop(record, None) is not None:  # still waiting: the policy still holds it
                self.policy.remove(record)
            elif self._leave(record):  # dispatched in the same instant the caller left
                self._dispatch()
            raise
        record.start()

    def _leave(self, record: SyscallRecord) -> bool:
        """Gives up `record`'s running place, if it holds one (the policy hears it); True if it did."""
        if record not in self.running:
            return False
        self.running.discard(record)
        self.policy.done(record)
        return True

    def _dispatch(self) -> None:
        while len(self.running) < self.capacity and len(self.policy):
            now = time.monotonic()
            record = self.policy.pop(now)
            future = self._grants.pop(record)
            if future.done():  # its caller was cancelled a moment ago and has not cleaned up yet: skip it
                self.policy.done(record)
                continue
            self._waits.append(now - record.pushed_at)
            self.running.add(record)
            future.set_result(None)
        self._maybe_preempt()

    def _maybe_preempt(self) -> None:
        if self.preempt is None or len(self.running) < self.capacity:
            return
        pending = sum(1 for r in self.running if r.preempt_requested)
        if len(self.policy) <= pending:
            return
        candidates = [r for r in self.running if r.preemptible and not r.preempt_requested]
        victim = self.policy.victim(candidates, time.monotonic())
        if victim is not None:
            victim.preempt_requested = True
            self.preemptions += 1
            self.preempt(victim)
