"""What each agent uses now against the limits the operator gave it.

Plain objects with the clock passed in, so they are unit-tested without a
socket. Over a limit, a call gets RESOURCE_EXHAUSTED with a retry-after hint;
other agents are not affected (every counter is per agent).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from contextlib import asynccontextmanager
from typing import AsyncIterator

from services.errors import ResourceExhausted
from services.scheduler.identity import Agent

# The hint given when a limit frees up only as other calls finish (no clock to read it from).
RETRY_WHEN_BUSY_S = 1.0


class TokenBucket:
    """Holds up to `capacity` units and refills at `rate` per second; may be charged below zero."""

    def __init__(self, capacity: float, rate: float, now: float) -> None:
        self.capacity = capacity
        self.rate = rate
        self.level = capacity
        self._at = now

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self._at) * self.rate)
        self._at = now

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until `amount` units are there (0: now)."""
        self._refill(now)
        return max(0.0, (amount - self.level) / self.rate)

    def take(self, amount: float, now: float) -> float:
        """Takes `amount` if it is there and returns 0; else takes nothing and returns the seconds to wait."""
        wait = self.wait_for(amount, now)
        if wait == 0.0:
            self.level -= amount
        return wait

    def charge(self, amount: float, now: float) -> None:
        """Takes `amount` whether or not it is there (service already given)."""
        self._refill(now)
        self.level -= amount


class AgentUsage:
    """Per agent: syscalls in flight, the LLM token bucket, and a line per tool as wide as its tool slots."""

    def __init__(self) -> None:
        self.in_flight: Counter[str] = Counter()
        self._tokens: dict[str, TokenBucket] = {}
        self._tool_lines: dict[tuple[str, str], asyncio.Semaphore] = {}
        self._in_line: Counter[tuple[str, str]] = Counter()  # (agent id, tool) -> calls waiting in its line

    def enter(self, agent: Agent) -> None:
        """A syscall of `agent` starts; RESOURCE_EXHAUSTED past its concurrent-syscall limit."""
        limit = agent.quota.concurrent_syscalls
        if limit and self.in_flight[agent.id] >= limit:
            raise ResourceExhausted(
                f"this agent already has {self.in_flight[agent.id]} syscalls in flight, its limit; wait for one to "
                "finish (the operator sets the limit)", retry_after=RETRY_WHEN_BUSY_S)
        self.in_flight[agent.id] += 1

    def leave(self, agent: Agent) -> None:
        self.in_flight[agent.id] -= 1
        if self.in_flight[agent.id] <= 0:
            del self.in_flight[agent.id]

    def admit_generation(self, agent: Agent, now: float) -> None:
        """An LLM syscall may start while the agent's bucket of tokens per minute is not empty."""
        bucket = self._bucket(agent, now)
        if bucket is None:
            return
        wait = bucket.wait_for(1, now)
        if wait > 0:
            raise ResourceExhausted(
                f"this agent used its {agent.quota.tokens_per_minute} LLM tokens per minute; retry in {wait:.1f} s",
                retry_after=wait)

    def charge_tokens(self, agent: Agent, tokens: int, now: float) -> None:
        """Prompt and generated tokens a generation of `agent` used."""
        bucket = self._bucket(agent, now)
        if bucket is not None and tokens:
            bucket.charge(tokens, now)

    @asynccontextmanager
    async def tool_turn(self, agent: Agent, tool: str) -> AsyncIterator[None]:
        """Holds one of the agent's `tool_slots` places for `tool`, waiting in the agent's own line for it, so an
        agent's extra calls wait behind its own, not in front of other agents'."""
        if not agent.quota.tool_slots:
            yield
            return
        key = (agent.id, tool)
        line = self._tool_lines.get(key)
        if line is None:
            line = self._tool_lines[key] = asyncio.Semaphore(agent.quota.tool_slots)
        self._in_line[key] += 1
        try:
            await line.acquire()
        finally:
            self._in_line[key] -= 1
            if not self._in_line[key]:
                del self._in_line[key]
        try:
            yield
        finally:
            line.release()

    def waiting_in_line(self, tool: str, agent_id: str | None = None) -> int:
        """Calls of `tool` waiting in agents' own lines (one agent's, or all)."""
        # list(): a copy made at once, since the metrics' scrape thread reads this while the event loop writes it
        return sum(n for (a, t), n in list(self._in_line.items()) if t == tool and agent_id in (None, a))

    def _bucket(self, agent: Agent, now: float) -> TokenBucket | None:
        per_minute = agent.quota.tokens_per_minute
        if not per_minute:
            return None
        bucket = self._tokens.get(agent.id)
        if bucket is None or bucket.capacity != per_minute:
            bucket = self._tokens[agent.id] = TokenBucket(per_minute, per_minute / 60.0, now)
        return bucket
