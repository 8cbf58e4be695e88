"""The asyncio SDK (aios.aio) against the real kernel: the same surface as the synchronous one."""

from __future__ import annotations

import asyncio

import grpc
import pytest

import aios.aio
from aios.v1 import common_pb2


def test_an_async_agent_streams_remembers_stores_and_calls_tools(cluster):
    async def session() -> None:
        async with aios.aio.connect(cluster.kernel_address, token=cluster.operator_token) as kernel:
            agent = await kernel.register("async-agent")
            chunks = [c async for c in agent.generate("1, 2, 3,", max_tokens=5, ignore_eos=True)]
            assert len([c for c in chunks if c.HasField("token_id")]) == 5 and chunks[-1].finish_reason
            done = await agent.complete(messages=[("user", "Name a colour.")], max_tokens=8, remember=True)
            assert (await agent.syscall(done.syscall_id)).state == common_pb2.SYSCALL_STATE_DONE
            entry = await agent.memory_add("async note")
            assert [e.id async for e in agent.memory_list()][-1] == entry.id
            assert [t.role for t in await agent.memory_turns(10)][:1] == ["user"]
            await agent.storage_write("k", "v")
            assert await agent.storage_read("k") == b"v"
            assert (await agent.call_tool("calculator", expression="2*21"))["result"] == 42
            assert "calculator" in {t.name for t in await agent.tools()}
            reply = await agent.complete("A JSON object:", max_tokens=40, json_schema={"type": "object"})
            assert reply.text.startswith("{")
            with pytest.raises(aios.SyscallError) as error:
                await agent.storage_read("missing")
            assert error.value.code == grpc.StatusCode.NOT_FOUND
            same = await aios.aio.Connection(cluster.kernel_address, agent.token).agent()
            assert same.id == agent.id
            # Several syscalls of one agent at once, as an async framework makes them.
            results = await asyncio.gather(*(agent.call_tool("calculator", expression=f"{i}+1") for i in range(5)))
            assert [r["result"] for r in results] == [1, 2, 3, 4, 5]

    asyncio.run(session())
