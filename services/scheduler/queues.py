"""One queue per resource: at most `capacity` syscalls run at once, the policy picks the next."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import AsyncIterator

from services.scheduler.policy import SchedulingPolicy
from services.scheduler.syscalls import Resource, SyscallRecord


class ResourceQueue:
    def __init__(self, resource: Resource, policy: SchedulingPolicy, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.resource = resource
        self.policy = policy
        self.capacity = capacity
        self.running = 0
        self.completed = 0
        self._grants: dict[SyscallRecord, asyncio.Future[None]] = {}

    @property
    def queued(self) -> int:
        return len(self.policy)

    @asynccontextmanager
    async def turn(self, record: SyscallRecord) -> AsyncIterator[None]:
        """Waits until the policy dispatches `record`, holds a running place while inside."""
        granted = asyncio.get_running_loop().create_future()
        self._grants[record] = granted
        self.policy.push(record)
        self._dispatch()
        try:
            await granted
        except BaseException:
            self._grants.pop(record, None)
            if granted.done() and not granted.cancelled():
                self._release()  # dispatched in the same instant the caller left
            else:
                self.policy.remove(record)
            raise
        record.start()
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        self.running -= 1
        self.completed += 1
        self._dispatch()

    def _dispatch(self) -> None:
        while self.running < self.capacity and len(self.policy):
            record = self.policy.pop()
            future = self._grants.pop(record)
            self.running += 1
            future.set_result(None)
