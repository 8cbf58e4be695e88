"""Registered agents, kept in Redis so every kernel replica and restart sees them."""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.errors import InvalidArgument, NotFound, Unavailable

AGENTS_KEY = "aios:agents"
MAX_NAME_CHARS = 64
MAX_PRIORITY = 10
MAX_WEIGHT = 100.0


@dataclass(frozen=True)
class Agent:
    id: str
    name: str
    registered_at: float
    priority: int = 0
    weight: float = 1.0


class AgentRegistry:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._cache: dict[str, Agent] = {}

    async def register(self, name: str, priority: int = 0, weight: float = 0.0) -> Agent:
        """`weight` 0 means the default 1.0."""
        name = name.strip()
        if not 1 <= len(name) <= MAX_NAME_CHARS:
            raise InvalidArgument(f"agent name must be 1-{MAX_NAME_CHARS} characters")
        if not 0 <= priority <= MAX_PRIORITY:
            raise InvalidArgument(f"priority is {priority}; it must be 0 (default) to {MAX_PRIORITY}")
        if not (weight == weight and 0.0 <= weight <= MAX_WEIGHT):  # weight == weight refuses NaN
            raise InvalidArgument(f"weight is {weight}; it must be in (0, {MAX_WEIGHT:g}], or 0 for the default 1")
        agent = Agent(f"agt-{secrets.token_hex(6)}", name, time.time(), priority, weight or 1.0)
        fields = {"name": name, "registered_at": agent.registered_at, "priority": agent.priority, "weight": agent.weight}
        try:
            await self.redis.hset(AGENTS_KEY, agent.id, json.dumps(fields))
        except (RedisError, OSError) as exc:
            raise Unavailable(f"cannot record the agent: Redis is unreachable ({exc})") from None
        self._cache[agent.id] = agent
        return agent

    async def get(self, agent_id: str) -> Agent:
        if not agent_id:
            raise InvalidArgument("agent_id is required; call RegisterAgent first")
        agent = self._cache.get(agent_id)
        if agent is not None:
            return agent
        try:
            raw = await self.redis.hget(AGENTS_KEY, agent_id)
        except (RedisError, OSError) as exc:
            raise Unavailable(f"cannot look up the agent: Redis is unreachable ({exc})") from None
        if raw is None:
            raise NotFound(f"unknown agent id {agent_id!r}; call RegisterAgent to get one")
        data = json.loads(raw)
        agent = Agent(agent_id, data["name"], data["registered_at"], data.get("priority", 0), data.get("weight", 1.0))
        self._cache[agent_id] = agent
        return agent

    async def count(self) -> int:
        try:
            return int(await self.redis.hlen(AGENTS_KEY))
        except (RedisError, OSError):
            return len(self._cache)
