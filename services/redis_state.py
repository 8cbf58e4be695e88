"""The Redis connection the kernel and LLM core share (agents now, snapshots next)."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError, RedisError


# Connections to Redis at most; a command finding them all busy waits up to POOL_WAIT_S for one. redis-py's own pool
# refuses the 101st at once ("Too many connections"): 2,000 agents registering at once reach the kernel together.
MAX_CONNECTIONS = 64
POOL_WAIT_S = 10.0


def connect(url: str) -> aioredis.Redis:
    """A client with short timeouts, so a dead Redis shows up fast instead of hanging calls, whose commands queue for
    a connection rather than fail when many run at once. A command that finds its pooled connection broken (Redis
    restarted since it was used) goes again once on a new one: without it each pooled connection failed one command
    after a restart (a pool given to the client gets no retry of redis-py's; a timeout is not retried, so a hung Redis
    still shows up within socket_timeout)."""
    return aioredis.Redis.from_pool(aioredis.BlockingConnectionPool.from_url(  # the client owns (closes) its pool
        url, max_connections=MAX_CONNECTIONS, timeout=POOL_WAIT_S, socket_timeout=2.0, socket_connect_timeout=2.0,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))))


async def is_up(client: aioredis.Redis) -> bool:
    try:
        return bool(await client.ping())
    except (RedisError, OSError):
        return False
