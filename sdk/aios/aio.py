"""The asyncio SDK (on grpc.aio), with the same surface as the synchronous one: most agent frameworks are async.

    import aios.aio
    async with aios.aio.connect() as kernel:
        agent = await kernel.register("researcher")
        async for chunk in agent.generate("Once upon a time", max_tokens=32):
            print(chunk.text, end="")
        await agent.memory_add("a note")
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import grpc

from aios.batched import CallBatcher, CallFailed
from aios.client import SYSCALL_RETRY_POLICY, SyscallError, open_channel, resolve, syscall_error
from aios.syscalls import (
    Completion,
    Messages,
    ResumableStream,
    SyscallMethods,
    bearer,
    completion_of,
    generate_request,
    same,
    syscall_request,
    traceparent,
    traced,
)
from aios.v1 import kernel_pb2, kernel_pb2_grpc, llm_core_pb2, memory_pb2

__all__ = ["Agent", "Connection", "SyscallError", "connect"]

# A syscall the kernel could not take (it is gone, restarting, or stopping and saying when to come back) is made
# again, waiting for the kernel in between, as often as the synchronous SDK's channel does (SYSCALL_RETRY_POLICY).
SYSCALL_ATTEMPTS = SYSCALL_RETRY_POLICY["methodConfig"][0]["retryPolicy"]["maxAttempts"]


def connect(
    address: str | None = None,
    *,
    token: str | None = None,
    root_certificates: bytes | str | Path | None = None,
    home: str | Path | None = None,
) -> "Connection":
    """As aios.connect, for asyncio: call it inside the event loop that will use the connection."""
    return Connection(*resolve(address, token, root_certificates, home))


class Connection:
    """An asyncio connection to the kernel, calling with one token (the operator's or an agent's).

    Its unary calls, every agent's syscalls included, travel on one Batched stream (aios.batched): the calls that
    wait together go to the kernel as one message, each with its own token, which the kernel checks as it checks a
    unary call's. Generations stream on their own calls."""

    def __init__(self, address: str, token: str | None = None, root_certificates: bytes | None = None,
                 server_name: str | None = None) -> None:
        self.address = address
        self.token = token
        self.channel = open_channel(address, root_certificates, server_name, aio=True)
        self.stub = kernel_pb2_grpc.KernelStub(self.channel)
        self._batcher = CallBatcher(self.channel, kernel_pb2.DESCRIPTOR.services_by_name["Kernel"])

    async def call(self, method: str, request: Any, token: str | None = None, timeout: float | None = 30) -> Any:
        return await self.batched(method, request, bearer(token or self.token), timeout)

    async def batched(self, method: str, request: Any, metadata: tuple[tuple[str, str], ...], timeout: float | None,
                      retried: bool = False) -> Any:
        """A unary kernel call on the connection's Batched stream, with the credential in `metadata`. With
        `retried`, a call the kernel could not take is made again once it is back, within `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        for attempt in range(1, SYSCALL_ATTEMPTS + 1):
            remaining = None if deadline is None else deadline - loop.time()
            try:
                if remaining is not None and remaining <= 0:
                    raise asyncio.TimeoutError
                return await self._batcher.call(method, request, remaining, metadata[0][1] if metadata else "",
                                                traceparent())
            except asyncio.TimeoutError:
                raise SyscallError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
            except CallFailed as failed:
                # Again if the kernel went away (no answer) or is stopping (it says when to come back).
                again = failed.code == grpc.StatusCode.UNAVAILABLE and (not failed.answered or bool(failed.retry_after))
                if not (retried and again) or attempt == SYSCALL_ATTEMPTS:
                    raise SyscallError(failed.code, failed.details, failed.retry_after) from None
                wait = failed.retry_after or 0.0
            await asyncio.sleep(wait)  # the kernel's pushback: it is stopping, and said when to ask again
            try:  # and then wait for it to be back, as the synchronous SDK's calls do (waitForReady)
                left = None if deadline is None else max(0.0, deadline - loop.time())
                await asyncio.wait_for(self.channel.channel_ready(), left)
            except asyncio.TimeoutError:
                raise SyscallError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None

    async def register(
        self, name: str, priority: int = 0, weight: float = 0.0, *,
        tokens_per_minute: int = 0, concurrent_syscalls: int = 0, tool_slots: int = 0,
    ) -> "Agent":
        quota = kernel_pb2.AgentQuota(tokens_per_minute=tokens_per_minute, concurrent_syscalls=concurrent_syscalls,
                                      tool_slots=tool_slots)
        reply = await self.call("RegisterAgent", kernel_pb2.RegisterAgentRequest(
            name=name, priority=priority, weight=weight, quota=quota))
        return Agent(self, reply.agent_id, name, reply.token)

    async def agent(self, token: str | None = None) -> "Agent":
        token = token or self.token
        info = await self.call("WhoAmI", kernel_pb2.WhoAmIRequest(), token)
        if info.role != "agent":
            raise SyscallError(grpc.StatusCode.INVALID_ARGUMENT, "that token is the operator's, not an agent's")
        return Agent(self, info.agent.id, info.agent.name, token or "")

    async def whoami(self) -> kernel_pb2.CallerInfo:
        return await self.call("WhoAmI", kernel_pb2.WhoAmIRequest())

    async def agents(self, include_revoked: bool = False) -> list[kernel_pb2.AgentInfo]:
        reply = await self.call("ListAgents", kernel_pb2.ListAgentsRequest(include_revoked=include_revoked))
        return list(reply.agents)

    async def revoke(self, agent_id: str) -> kernel_pb2.AgentInfo:
        return await self.call("RevokeAgent", kernel_pb2.RevokeAgentRequest(agent_id=agent_id))

    async def issue_token(self, agent_id: str) -> "Agent":
        reply = await self.call("IssueToken", kernel_pb2.IssueTokenRequest(agent_id=agent_id))
        return Agent(self, reply.agent_id, reply.agent.name, reply.token)

    async def status(self, max_agents: int = 0) -> kernel_pb2.KernelStatus:
        """The kernel's view of the system (an agent: its own part); the operator's lists the `max_agents` busiest
        agents (0: 100)."""
        return await self.call("GetStatus", kernel_pb2.GetStatusRequest(max_agents=max_agents), timeout=10)

    async def close(self) -> None:
        await self._batcher.close()
        await self.channel.close()

    async def __aenter__(self) -> "Connection":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Agent(SyscallMethods):
    """One registered agent; every method is a coroutine (or an async iterator) making a syscall."""

    async def generate(self, prompt: str = "", messages: Messages = (), *, timeout: float | None = None,
                       **options: Any) -> AsyncIterator[llm_core_pb2.GenerateChunk]:
        """Streams chunks as tokens are generated (options as aios.Agent.generate)."""
        generation = ResumableStream(generate_request(prompt, messages, **options), timeout)
        while True:
            call = self.kernel.stub.Generate(generation.request, timeout=generation.remaining(),
                                             metadata=traced(self._metadata))
            try:
                async for chunk in call:
                    if generation.fresh(chunk):
                        yield chunk
                return
            except grpc.aio.AioRpcError as exc:
                generation.opened(await call.initial_metadata())
                wait = generation.retry_after(exc)
                if wait is None:
                    raise syscall_error(exc) from None
            finally:
                call.cancel()
            await asyncio.sleep(wait)  # the kernel's pushback: it is stopping, and said when to ask again
            try:  # the kernel went away mid-stream: continue once it is back
                await asyncio.wait_for(self.kernel.channel.channel_ready(), generation.back_within())
            except asyncio.TimeoutError:
                pass  # the next attempt fails with UNAVAILABLE and says so

    async def complete(self, prompt: str = "", messages: Messages = (), **options: Any) -> Completion:
        last = llm_core_pb2.GenerateChunk()
        async for chunk in self.generate(prompt, messages, whole=True, **options):
            last = chunk
        return completion_of(last)

    async def chat(self, messages: Messages, **options: Any) -> str:
        return (await self.complete(messages=messages, **options)).text

    async def _syscall(self, then: Callable[[Any], Any] = same, timeout: float | None = 60, **call: Any) -> Any:
        (kind,) = call
        reply = await self.kernel.batched("Syscall", syscall_request(**call), self._metadata, timeout, retried=True)
        return then(getattr(reply, kind))

    async def memory_list(self, page_size: int = 0) -> AsyncIterator[memory_pb2.MemoryEntry]:
        token = ""
        while True:
            page = await self._syscall(memory_list=memory_pb2.MemoryListRequest(page_size=page_size, page_token=token))
            for entry in page.entries:
                yield entry
            token = page.next_page_token
            if not token:
                return
