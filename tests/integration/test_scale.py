"""Many agents at once against one kernel: none is lost, each gets its own answers."""

from __future__ import annotations

import asyncio
import collections

import aios.aio

AGENTS = 2000  # gRPC's default server limits cancelled calls past 1,000 waiting: this many all arrive together


def test_two_thousand_agents_arriving_at_once_all_register_remember_store_and_compute(cluster):
    async def one(kernel: aios.aio.Connection, i: int, errors: collections.Counter) -> tuple[str, str, bytes, int]:
        try:
            agent = await kernel.register(f"crowd-{i}")
            entry = await agent.memory_add(f"note of agent {i}")
            await agent.storage_write("mine", f"agent {i}")
            result = await agent.call_tool("calculator", expression=f"{i} * 3")
            return agent.id, (await agent.memory_get(entry.id)).text, await agent.storage_read("mine"), result["result"]
        except aios.SyscallError as error:
            errors[error.code.name] += 1
            raise

    async def crowd() -> tuple[list, collections.Counter]:
        errors: collections.Counter = collections.Counter()
        async with aios.aio.connect(cluster.kernel_address, token=cluster.operator_token) as kernel:
            answers = await asyncio.gather(*(one(kernel, i, errors) for i in range(AGENTS)), return_exceptions=True)
        return answers, errors

    answers, errors = asyncio.run(crowd())
    assert not errors, f"{sum(errors.values())} of {AGENTS} agents failed: {dict(errors)}"
    assert len({agent_id for agent_id, *_ in answers}) == AGENTS
    for i, (_, note, stored, product) in enumerate(answers):
        assert (note, stored, product) == (f"note of agent {i}", f"agent {i}".encode(), 3 * i)
