"""The Redis client the kernel and the LLM cores share, against a real redis-server."""

from __future__ import annotations

import asyncio

from deploy.cluster import Cluster
from services import redis_state


def test_a_restarted_redis_is_up_at_the_first_command_not_after_each_pooled_connection_failed_once(
        redis_alone: Cluster) -> None:
    async def scenario() -> None:
        client = redis_state.connect(redis_alone.redis_url)
        try:
            await asyncio.gather(*(client.set(f"aios:key-{n}", n) for n in range(4)))  # four pooled connections
            old = redis_alone.processes["redis"].popen
            old.terminate()  # it dies (writing its append-only file) and is restarted as the supervisor does it:
            old.wait()
            redis_alone.restart_service("redis")  # same port, same file
            assert redis_alone.redis_url.endswith(f":{redis_alone.processes['redis'].address.rsplit(':', 1)[1]}/0")
            assert await redis_state.is_up(client)  # a connection to the old process is no sign of Redis down
            assert await asyncio.gather(*(client.get(f"aios:key-{n}") for n in range(4))) == [b"0", b"1", b"2", b"3"]
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_a_stopped_redis_is_down() -> None:
    async def scenario() -> None:
        client = redis_state.connect("redis://127.0.0.1:1/0")  # nothing listens on port 1
        try:
            assert not await redis_state.is_up(client)
        finally:
            await client.aclose()

    asyncio.run(scenario())
