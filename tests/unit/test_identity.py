"""Token checks against a real redis-server: two AgentRegistry objects on one Redis stand for two kernel replicas."""

from __future__ import annotations

import asyncio
import collections
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import pytest

from services import redis_state
from services.errors import Unauthenticated
from services.scheduler.identity import EPOCH_CHECK_S, OPERATOR, AgentRegistry

OPERATOR_TOKEN = "aios_op_test"


def counted(registry: AgentRegistry) -> collections.Counter:
    """The registry's reads of Redis, counted by command (its real client does the work)."""
    counts: collections.Counter = collections.Counter()
    for name in ("get", "hget", "hmget"):
        def wrapper(*args: Any, _real: Any = getattr(registry.redis, name), _name: str = name, **kwargs: Any) -> Any:
            counts[_name] += 1
            return _real(*args, **kwargs)
        setattr(registry.redis, name, wrapper)
    return counts


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def refused_soon(registry: AgentRegistry, token: str) -> None:
    """Polls until `registry` refuses `token`; fails if it still takes it after a few epoch checks."""
    deadline = time.monotonic() + 8 * EPOCH_CHECK_S
    while True:
        try:
            await registry.authenticate(bearer(token))
        except Unauthenticated:
            return
        assert time.monotonic() < deadline, "the other kernel still takes the token"
        await asyncio.sleep(0.01)  # polling: the other kernel's watcher announces nothing


@asynccontextmanager
async def two_kernels(url: str) -> AsyncIterator[tuple[AgentRegistry, AgentRegistry]]:
    one, other = (AgentRegistry(redis_state.connect(url), OPERATOR_TOKEN) for _ in range(2))
    try:
        yield one, other
    finally:
        for registry in (one, other):
            await registry.close()
            await registry.redis.aclose()


def test_steady_calls_read_no_token_from_redis_and_a_revocation_elsewhere_ends_the_token(redis_url: str):
    async def scenario() -> None:
        async with two_kernels(redis_url) as (one, other):
            agent, token = await one.register(OPERATOR, "worker")
            assert (await other.authenticate(bearer(token))).agent.id == agent.id  # looked up once, then cached
            reads, deadline = counted(other), time.monotonic() + 40 * EPOCH_CHECK_S
            while reads["get"] < 4:  # four checks of the epoch: a second of steady calls
                assert (await other.authenticate(bearer(token))).agent.id == agent.id
                assert time.monotonic() < deadline, "the kernel does not watch the epoch"
                await asyncio.sleep(0)
            assert reads["hget"] == reads["hmget"] == 0  # no read per token, however many agents call

            await one.revoke(agent.id)
            with pytest.raises(Unauthenticated):  # at once on the kernel that revoked it
                await one.authenticate(bearer(token))
            await refused_soon(other, token)  # on the other, once its watcher sees the epoch move
            assert reads["hmget"] == 1  # every cached token checked again in one read

    asyncio.run(scenario())


def test_a_reissued_token_replaces_the_old_one_on_every_kernel_and_registrations_do_not_move_the_epoch(redis_url: str):
    async def scenario() -> None:
        async with two_kernels(redis_url) as (one, other):
            agent, old = await one.register(OPERATOR, "worker")
            await other.authenticate(bearer(old))
            epoch = await one.redis.get("aios:agents:epoch")
            await one.register(OPERATOR, "newcomer")  # a new token ends no other: cached tokens stay unchecked
            assert await one.redis.get("aios:agents:epoch") == epoch
            _, new = await one.issue_token(agent.id)
            assert (await other.authenticate(bearer(new))).agent.id == agent.id
            await refused_soon(other, old)

    asyncio.run(scenario())
