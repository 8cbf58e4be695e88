"""The kernel core: identity check, syscall record, resource queue, dispatch.

Every syscall takes the same path: check the agent, create its record, wait for
its turn in its resource's queue, call the manager that owns the resource, and
close the record with the outcome. Managers' gRPC errors come back to the agent
with the same status code, prefixed with the manager's name.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import grpc

from aios.v1 import (
    common_pb2,
    kernel_pb2,
    llm_core_pb2,
    llm_core_pb2_grpc,
    memory_pb2,
    memory_pb2_grpc,
    storage_pb2_grpc,
    tools_pb2,
    tools_pb2_grpc,
)
from services.errors import (
    AiosError,
    DeadlineExceeded,
    ForwardedError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from services.scheduler.agents import AgentRegistry
from services.scheduler.policy import SchedulingPolicy
from services.scheduler.queues import ResourceQueue
from services.scheduler.syscalls import Resource, SyscallRecord, SyscallTable

log = logging.getLogger("aios.kernel")

# SyscallRequest.call field -> (resource, manager RPC method).
SYSCALLS: dict[str, tuple[Resource, str]] = {
    "memory_add": (Resource.MEMORY, "Add"),
    "memory_get": (Resource.MEMORY, "Get"),
    "memory_list": (Resource.MEMORY, "List"),
    "memory_delete": (Resource.MEMORY, "Delete"),
    "memory_update": (Resource.MEMORY, "Update"),
    "memory_search": (Resource.MEMORY, "Search"),
    "memory_turns": (Resource.MEMORY, "RecentTurns"),
    "storage_write": (Resource.STORAGE, "Write"),
    "storage_read": (Resource.STORAGE, "Read"),
    "storage_list": (Resource.STORAGE, "List"),
    "storage_delete": (Resource.STORAGE, "Delete"),
    "storage_history": (Resource.STORAGE, "History"),
    "storage_rollback": (Resource.STORAGE, "Rollback"),
    "storage_search": (Resource.STORAGE, "Search"),
    "storage_grant": (Resource.STORAGE, "Grant"),
    "storage_revoke": (Resource.STORAGE, "Revoke"),
    "storage_grants": (Resource.STORAGE, "ListGrants"),
    "storage_usage": (Resource.STORAGE, "Usage"),
    "tool_list": (Resource.TOOLS, "ListTools"),
    "tool_call": (Resource.TOOLS, "CallTool"),
}

MANAGER_NAMES = {
    Resource.LLM: "llm_core",
    Resource.MEMORY: "memory",
    Resource.STORAGE: "storage",
    Resource.TOOLS: "tools",
}

STUBS = {
    Resource.LLM: llm_core_pb2_grpc.LLMCoreStub,
    Resource.MEMORY: memory_pb2_grpc.MemoryStub,
    Resource.STORAGE: storage_pb2_grpc.StorageStub,
    Resource.TOOLS: tools_pb2_grpc.ToolsStub,
}


def manager_error(resource: Resource, exc: grpc.aio.AioRpcError) -> AiosError:
    name = MANAGER_NAMES[resource]
    code = exc.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"the {name} service is unavailable ({exc.details()}); retry when it is back")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"the {name} service did not answer before the deadline")
    return ForwardedError(code, f"{name}: {exc.details()}")


def _remaining(deadline: float | None) -> float | None:
    """Seconds left until the caller's deadline; DEADLINE_EXCEEDED once it has passed."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("the caller's deadline passed while its generation was preempted")
    return left


# How long a syscall waits for a manager that is not connected before UNAVAILABLE.
CONNECT_TIMEOUT_S = 2.0
CHANNEL_OPTIONS = [
    # Reconnect quickly to a manager that restarts instead of backing off for up to 2 minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


@dataclass
class Managers:
    """gRPC channels to the manager services, one per resource."""

    addresses: dict[Resource, str]

    def __post_init__(self) -> None:
        self.channels = {r: grpc.aio.insecure_channel(a, options=CHANNEL_OPTIONS) for r, a in self.addresses.items()}
        self.stubs: dict[Resource, Any] = {r: STUBS[r](self.channels[r]) for r in self.addresses}

    async def connected(self, resource: Resource) -> None:
        """Returns once the manager's channel is ready; UNAVAILABLE after CONNECT_TIMEOUT_S."""
        channel = self.channels[resource]
        if channel.get_state(try_to_connect=True) == grpc.ChannelConnectivity.READY:
            return
        try:
            await asyncio.wait_for(channel.channel_ready(), CONNECT_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise Unavailable(
                f"the {MANAGER_NAMES[resource]} service at {self.addresses[resource]} is unreachable "
                f"(no connection within {CONNECT_TIMEOUT_S:.0f} s); check `aios status`"
            ) from None

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()


class Kernel:
    def __init__(
        self,
        agents: AgentRegistry,
        managers: Managers,
        queues: dict[Resource, ResourceQueue],
        new_policy: Callable[[], SchedulingPolicy],
    ) -> None:
        self.agents = agents
        self.managers = managers
        self.queues = queues
        self.new_policy = new_policy
        # One queue per tool, as wide as the tool's declared concurrency (read from the tool service).
        self.tool_queues: dict[str, ResourceQueue] = {}
        self.queues[Resource.LLM].preempt = self._preempt
        self.table = SyscallTable()
        self._background: set[asyncio.Task] = set()

    async def register(self, name: str, priority: int = 0, weight: float = 0.0) -> str:
        return (await self.agents.register(name, priority, weight)).id

    @asynccontextmanager
    async def _syscall(
        self, agent_id: str, kind: str, resource: Resource, queue: ResourceQueue | None = None
    ) -> AsyncIterator[SyscallRecord]:
        """Opens the record, waits for the resource (or `queue`), and closes the record with the outcome."""
        agent = await self.agents.get(agent_id)
        record = self.table.create(agent_id, kind, resource, agent.priority, agent.weight)
        try:
            async with (queue or self.queues[resource]).turn(record):
                await self.managers.connected(resource)
                try:
                    yield record
                except grpc.aio.AioRpcError as exc:
                    raise manager_error(resource, exc) from None
        except AiosError as exc:
            record.finish(exc.code.name, exc.message)
            raise
        except BaseException as exc:
            record.finish("CANCELLED", f"the caller went away ({type(exc).__name__})")
            raise
        else:
            record.finish()
        finally:
            self.table.count_finished(record)

    async def syscall(self, request: kernel_pb2.SyscallRequest, timeout: float | None) -> kernel_pb2.SyscallResponse:
        kind = request.WhichOneof("call")
        if kind is None:
            raise InvalidArgument(f"SyscallRequest sets no call; set one of: {', '.join(SYSCALLS)}")
        resource, method = SYSCALLS[kind]
        inner = getattr(request, kind)
        if "agent_id" in inner.DESCRIPTOR.fields_by_name:
            inner.agent_id = request.agent_id
        queue = await self._tool_queue(inner.name) if kind == "tool_call" else None
        async with self._syscall(request.agent_id, kind, resource, queue) as record:
            result = await getattr(self.managers.stubs[resource], method)(inner, timeout=timeout)
        response = kernel_pb2.SyscallResponse(syscall_id=record.id)
        getattr(response, kind).CopyFrom(result)
        return response

    async def _tool_queue(self, name: str) -> ResourceQueue | None:
        """The tool's own queue; None (the tools queue) for a tool the tool service does not list."""
        if name not in self.tool_queues:
            try:
                await self.managers.connected(Resource.TOOLS)
                listed = await self.managers.stubs[Resource.TOOLS].ListTools(tools_pb2.ListToolsRequest(), timeout=CONNECT_TIMEOUT_S)
            except (grpc.aio.AioRpcError, AiosError):
                return None  # the call itself will meet the same trouble and report it
            for tool in listed.tools:
                if tool.name not in self.tool_queues:
                    self.tool_queues[tool.name] = ResourceQueue(Resource.TOOLS, self.new_policy(), tool.concurrency or 1)
        return self.tool_queues.get(name)

    async def generate(
        self, request: kernel_pb2.KernelGenerateRequest, timeout: float | None
    ) -> AsyncIterator[llm_core_pb2.GenerateChunk]:
        """One LLM syscall, as one uninterrupted stream for the agent across any number of preemptions."""
        deadline = None if timeout is None else time.monotonic() + timeout
        queue = self.queues[Resource.LLM]
        stub = self.managers.stubs[Resource.LLM]
        messages = await self._with_history(request, timeout)
        reply: list[str] = []
        token_ids: list[int] = []
        finished = False
        async with self._syscall(request.agent_id, "llm_generate", Resource.LLM) as record:
            message = llm_core_pb2.GenerateRequest(
                agent_id=request.agent_id,
                prompt=request.prompt,
                messages=messages,
                sampling=request.sampling,
                syscall_id=record.id,
            )
            parked = False  # the core holds a preempted sequence of ours
            try:
                while True:
                    call = stub.Generate(message, timeout=_remaining(deadline))
                    parked = False
                    record.preemptible = True
                    try:
                        async for chunk in call:
                            if chunk.finish_reason == llm_core_pb2.FINISH_REASON_PREEMPTED:
                                parked = True
                                break
                            chunk.syscall_id = record.id
                            new_tokens = chunk.completion_tokens - record.tokens_out
                            record.tokens_out = chunk.completion_tokens
                            record.tokens_in = chunk.prompt_tokens or record.tokens_in
                            if chunk.finish_reason:
                                record.preemptible = False
                                finished = True
                            reply.append(chunk.text)
                            if chunk.HasField("token_id"):
                                token_ids.append(chunk.token_id)
                            if not request.whole:
                                yield chunk
                            elif finished:
                                chunk.text = "".join(reply)
                                chunk.token_ids.extend(token_ids)
                                yield chunk
                            queue.progress(record, chunk.prompt_tokens, new_tokens)
                    finally:
                        record.preemptible = False
                        call.cancel()
                    if not parked:
                        break
                    await queue.requeue(record)
                    await self.managers.connected(Resource.LLM)
                    message = llm_core_pb2.GenerateRequest(agent_id=request.agent_id, syscall_id=record.id, resume=True)
            finally:
                if parked:  # the caller left (or the deadline passed) while we were switched out
                    self._spawn(self._discard(request.agent_id, record.id))
        if request.remember and finished:
            await self._remember(request, "".join(reply), None if deadline is None else max(0.0, deadline - time.monotonic()))

    async def _with_history(self, request: kernel_pb2.KernelGenerateRequest, timeout: float | None) -> list[common_pb2.ChatMessage]:
        """The request's messages with the agent's newest turns from memory after its system messages."""
        messages = list(request.messages)
        if not (request.history_turns or request.remember):
            return messages
        if not messages:
            raise InvalidArgument("history_turns and remember work on chat turns: send `messages`, not a raw `prompt`")
        await self.agents.get(request.agent_id)  # an unknown agent must not reach its memory
        if not request.history_turns:
            return messages
        turns = await self._memory("RecentTurns", memory_pb2.MemoryTurnsRequest(agent_id=request.agent_id, limit=request.history_turns), timeout)
        system = next((i for i, m in enumerate(messages) if m.role != "system"), len(messages))
        history = [common_pb2.ChatMessage(role=e.role, content=e.text) for e in turns.entries]
        return messages[:system] + history + messages[system:]

    async def _remember(self, request: kernel_pb2.KernelGenerateRequest, reply: str, timeout: float | None) -> None:
        """Stores the call's user/assistant messages and the reply as conversation turns, in order."""
        turns = [(m.role, m.content) for m in request.messages if m.role in ("user", "assistant")]
        if reply.strip():
            turns.append(("assistant", reply))
        for role, text in turns:
            await self._memory("Add", memory_pb2.MemoryAddRequest(agent_id=request.agent_id, text=text, role=role), timeout)

    async def _memory(self, method: str, message: Any, timeout: float | None) -> Any:
        """A memory call the kernel makes for an LLM syscall (history), with the memory service's errors."""
        await self.managers.connected(Resource.MEMORY)
        try:
            return await getattr(self.managers.stubs[Resource.MEMORY], method)(message, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise manager_error(Resource.MEMORY, exc) from None

    def _preempt(self, record: SyscallRecord) -> None:
        self._spawn(self._ask_core_to_preempt(record))

    async def _ask_core_to_preempt(self, record: SyscallRecord) -> None:
        try:
            reply = await self.managers.stubs[Resource.LLM].Preempt(
                llm_core_pb2.PreemptRequest(syscall_id=record.id), timeout=CONNECT_TIMEOUT_S
            )
            preempted = reply.preempted
        except grpc.aio.AioRpcError as exc:
            log.warning("preempting %s failed: %s", record.id, exc.details())
            preempted = False
        if not preempted:  # it finished first, or is not decoding yet: let the policy choose again later
            record.preempt_requested = False

    async def _discard(self, agent_id: str, syscall_id: str) -> None:
        try:
            await self.managers.stubs[Resource.LLM].Discard(
                llm_core_pb2.DiscardRequest(syscall_id=syscall_id, agent_id=agent_id), timeout=CONNECT_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("could not discard preempted %s (its snapshot will expire): %s", syscall_id, exc.details())

    def _spawn(self, work) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def get_syscall(self, agent_id: str, syscall_id: str) -> SyscallRecord:
        record = self.table.get(syscall_id)
        if record is None:
            raise NotFound(f"no syscall {syscall_id!r} (unknown, or finished long ago)")
        if record.agent_id != agent_id:
            raise PermissionDenied(f"syscall {syscall_id!r} belongs to another agent")
        return record
