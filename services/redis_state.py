"""The Redis connection the kernel and LLM core share (agents now, snapshots next)."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.exceptions import RedisError


def connect(url: str) -> aioredis.Redis:
    """A client with short timeouts, so a dead Redis shows up fast instead of hanging calls."""
    return aioredis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)


async def is_up(client: aioredis.Redis) -> bool:
    try:
        return bool(await client.ping())
    except (RedisError, OSError):
        return False
