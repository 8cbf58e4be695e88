"""The kernel core: limits, syscall record, resource queue, dispatch.

Every syscall takes the same path: the servicer has authenticated the calling
agent from its token; the kernel checks the agent's limits, creates the
syscall's record, waits for its turn in its resource's queue, calls the manager
that owns the resource as that agent (with the cluster credential), and closes
the record with the outcome. Managers' gRPC errors come back to the agent with
the same status code, prefixed with the manager's name.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from contextlib import AsyncExitStack, asynccontextmanager
from typing import AsyncGenerator, AsyncIterator, Awaitable, Callable

import grpc

from aios.v1 import (
    common_pb2,
    kernel_pb2,
    llm_core_pb2,
    llm_core_pb2_grpc,
    memory_pb2,
    memory_pb2_grpc,
    storage_pb2,
    storage_pb2_grpc,
    tools_pb2,
    tools_pb2_grpc,
)
from services.errors import (AiosError, DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound,
                             PermissionDenied, ResourceExhausted, Unavailable, require)
from services import tracing
from services.manager_client import CONNECT_TIMEOUT_S, ManagerClient
from services.shards import ShardedManager, parse_named_addresses, sharded_manager
from services.scheduler.cores import CoreRouter, CoreState, LLMCoreReplica, prefix_key
from services.scheduler.identity import Agent, AgentRegistry, Caller
from services.scheduler.journal import RecordJournal
from services.scheduler.quotas import AgentUsage
from services.scheduler.policy import SchedulingPolicy
from services.scheduler.queues import ResourceQueue
from services.scheduler.suspensions import SuspendedGenerations, Suspension
from services.scheduler.syscalls import Resource, SyscallRecord, SyscallTable, about

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

# Calls the kernel repeats when their manager is UNAVAILABLE (it restarts): reads and upserts change nothing when
# repeated; the writes in WRITES_ONCE_PER_REQUEST_ID only with a request id, which the manager remembers.
RETRIED_ALWAYS = {"memory_get", "memory_list", "memory_search", "memory_turns", "memory_update", "storage_read",
                  "storage_list", "storage_history", "storage_search", "storage_grant", "storage_grants",
                  "storage_usage", "tool_list"}
WRITES_ONCE_PER_REQUEST_ID = {"memory_add", "storage_write", "storage_delete", "storage_rollback"}
MANAGER_RETRIES = 3  # attempts after the first, each once the manager answers its health check again
MANAGER_BACK_S = 30.0  # how long one retry waits for the manager to be restarted

STUBS = {
    Resource.MEMORY: memory_pb2_grpc.MemoryStub,
    Resource.STORAGE: storage_pb2_grpc.StorageStub,
    Resource.TOOLS: tools_pb2_grpc.ToolsStub,
}
# Their services: the kernel's calls to them travel on a Batched stream each (services/batched.py).
SERVICES = {
    Resource.MEMORY: memory_pb2.DESCRIPTOR.services_by_name["Memory"],
    Resource.STORAGE: storage_pb2.DESCRIPTOR.services_by_name["Storage"],
    Resource.TOOLS: tools_pb2.DESCRIPTOR.services_by_name["Tools"],
}

# The largest LLM syscall the kernel takes (prompt, messages, schema): far above any context the LLM core holds, and
# refused before any work, so one agent's 30 MB request costs the others nothing.
MAX_GENERATE_BYTES = 4 * 1024 * 1024
DEFAULT_LISTED_SYSCALLS = 100  # ListSyscalls without a limit
MAX_LISTED_SYSCALLS = 1000
MAX_RECOVERIES = 3  # times one generation is rebuilt after its core died, before the agent gets UNAVAILABLE
CORE_RECOVERY_WAIT_S = 120.0  # how long a generation waits for a core to serve again (model load included)
DRAIN_CORE_S = 60.0  # how long `aios drain` waits for a core's generations to move, unless the call says less
CORE_CHECK_S = 1.0  # how often the kernel asks every serving LLM core's health, busy or idle
CORE_CHECK_MISSES = 2  # health checks in a row a serving core must fail to be marked DOWN (one may be slow)
CORE_POLL_S = 0.1  # how often a waiting call asks a restarting manager's health
STOPPING = ("AIOS is stopping (`aios down`) and takes no syscalls; the SDKs ask again by themselves once it is back "
            "(and continue a generation it suspended from where it stopped)")
STOPPING_RETRY_S = 3.0  # the pushback sent with STOPPING: gRPC's 5 attempts then outlast a drain and its grace
DRAIN_S = 8.0  # how long a stopping kernel waits for its generations to be switched out of the core
DRAIN_POLL_S = 0.05  # how often it asks again for those still prefilling or replaying (not switchable yet)
# Tokens per message from the core when the agent takes the whole reply at the end (GenerateRequest.tokens_per_chunk).
# A message per token cost ~0.2 ms of CPU (kernel and core together), taken from the model's threads on a machine whose
# every core runs llama.cpp: 8 per message cut the kernel's CPU in a 64-agent bench run from 2.0-2.5 s to 1.4-1.8 s and
# the core's event loop's from 1.0-1.2 s to 0.7-0.8 s. Policies hear of progress (a slice's end) at most this late.
WHOLE_TOKENS_PER_CHUNK = 8


def _replaying(first: llm_core_pb2.GenerateRequest, delivered: list[int], in_batch: bool = False
               ) -> llm_core_pb2.GenerateRequest:
    """The generation `first` to rebuild on a core: the same request, with the tokens already delivered (which
    the core may prefill `in_batch` when the generation was not decoding alone)."""
    message = llm_core_pb2.GenerateRequest()
    message.CopyFrom(first)
    message.replay_token_ids.extend(delivered)
    message.replay_in_batch = in_batch
    return message


async def _one_token_each(call: AsyncIterator[llm_core_pb2.GenerateChunk]
                          ) -> AsyncGenerator[llm_core_pb2.GenerateChunk, None]:
    """The core's chunks, each one that carries several tokens (GenerateRequest.tokens_per_chunk) split into one
    chunk per token, so that delivery goes by token index whatever the core packed."""
    async for chunk in call:
        if not chunk.token_texts:
            yield chunk
            continue
        first = chunk.completion_tokens - len(chunk.token_ids)
        for index, (token, text) in enumerate(zip(chunk.token_ids, chunk.token_texts), start=first + 1):
            yield llm_core_pb2.GenerateChunk(text=text, token_id=token, completion_tokens=index, slot=chunk.slot)


def _core_lost_it(exc: grpc.aio.AioRpcError, resuming: bool) -> bool:
    """Whether the LLM core lost the generation (it died, was restarted and holds no trace of a parked one, or
    cannot restore its snapshot: a core of another shape), so that the kernel should rebuild it rather than fail
    the syscall."""
    return exc.code() == grpc.StatusCode.UNAVAILABLE or (
        resuming and exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION))

# Syscalls whose answer is spread over every shard of their manager.
FANNED_OUT = {"storage_grants"}
# Storage calls that name another agent the kernel must check exists (a grant to nobody is a mistake).
NAMES_A_GRANTEE = ("storage_grant",)


def manager_shards(options: dict[Resource, list[str]], cluster_secret: str) -> dict[Resource, ShardedManager]:
    """Each manager from its `[NAME=]HOST:PORT` options (one per shard), every call carrying the cluster credential."""
    return {r: sharded_manager(values, r.name.lower(), STUBS[r], cluster_secret, SERVICES[r])
            for r, values in options.items()}


def core_router(options: list[str], slots: int, cluster_secret: str) -> CoreRouter:
    """The LLM cores from their `[NAME=]HOST:PORT` options, each decoding `slots` generations at once."""
    return CoreRouter([LLMCoreReplica(name, address, slots, ManagerClient(
        name, address, llm_core_pb2_grpc.LLMCoreStub, cluster_secret))
        for name, address in parse_named_addresses(options, "llm_core")])


def _remaining(deadline: float | None) -> float | None:
    """Seconds left until the caller's deadline; DEADLINE_EXCEEDED once it has passed."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("the caller's deadline passed while the syscall waited (preempted, or its manager "
                               "restarting)")
    return left


class Kernel:
    def __init__(
        self,
        agents: AgentRegistry,
        managers: dict[Resource, ShardedManager],
        cores: CoreRouter,
        queues: dict[Resource, ResourceQueue],
        new_policy: Callable[[], SchedulingPolicy],
        journal: RecordJournal,
        suspensions: SuspendedGenerations,
    ) -> None:
        self.agents = agents
        self.managers = managers  # memory, storage, tools: each one or more shards
        self.cores = cores  # the LLM cores
        self.queues = queues
        self.new_policy = new_policy
        self.usage = AgentUsage()
        # One queue per tool, as wide as the tool's declared concurrency (read from the tool service).
        self.tool_queues: dict[str, ResourceQueue] = {}
        self.queues[Resource.LLM].preempt = self._preempt
        self.cores.on_capacity = self.queues[Resource.LLM].resize
        self.journal = journal
        self.suspensions = suspensions
        self.table = SyscallTable(on_change=journal.changed)
        self.draining = False  # set once by drain(): the kernel is stopping
        self._background: set[asyncio.Task] = set()

    def _admit(self) -> None:
        if self.draining:
            raise Unavailable(STOPPING, retry_after=STOPPING_RETRY_S)

    @asynccontextmanager
    async def _syscall(
        self, agent: Agent, kind: str, resource: Resource, queue: ResourceQueue | None = None, tool: str = "",
        priority: int | None = None, syscall_id: str = "", opened: Callable[[str], Awaitable[None]] | None = None,
    ) -> AsyncIterator[SyscallRecord]:
        """Opens the record (with `syscall_id`, continuing a suspended syscall, else a new id; `opened` hears it),
        waits for the resource (or `queue`, after the agent's own line for `tool`), and closes the record with the
        outcome."""
        self.usage.enter(agent)
        priority = agent.priority if priority is None else min(priority, agent.priority)  # less, never more
        with tracing.span(f"syscall {kind}", attributes={"aios.agent_id": agent.id, "aios.kind": kind}) as span:
            record = self.table.create(agent.id, kind, resource, priority, agent.weight, syscall_id)
            record.trace_id = tracing.trace_id(span)
            if span is not None:
                span.set_attribute("aios.syscall_id", record.id)
            try:
                async with AsyncExitStack() as stack:
                    if opened is not None:
                        await opened(record.id)
                    if tool:
                        await stack.enter_async_context(self.usage.tool_turn(agent, tool))
                    with tracing.span(f"queue {resource.name.lower()}"):
                        await stack.enter_async_context((queue or self.queues[resource]).turn(record))
                    yield record
            except AiosError as exc:
                record.finish(exc.code.name, exc.message)
                raise
            except BaseException as exc:
                record.finish("CANCELLED", f"the caller went away ({type(exc).__name__})")
                raise
            else:
                record.finish()
            finally:
                self.usage.leave(agent)
                self.table.count_finished(record)

    async def syscall(
        self, agent: Agent, request: kernel_pb2.SyscallRequest, timeout: float | None
    ) -> kernel_pb2.SyscallResponse:
        """A memory, storage or tool syscall of `agent` (authenticated); inner requests act as `agent` only."""
        self._admit()
        kind = request.WhichOneof("call")
        if kind is None:
            raise InvalidArgument(f"SyscallRequest sets no call; set one of: {', '.join(SYSCALLS)}")
        resource, method = SYSCALLS[kind]
        inner = getattr(request, kind)
        if "agent_id" in inner.DESCRIPTOR.fields_by_name:
            inner.agent_id = agent.id  # whatever the request said: the caller is who the token proves
        if kind in NAMES_A_GRANTEE and inner.grantee_agent_id and inner.grantee_agent_id != agent.id:
            await self.agents.get(inner.grantee_agent_id)  # NOT_FOUND for a grant to nobody
        queue, tool = None, ""
        if kind == "tool_call":
            queue, tool = await self._tool_queue(inner.name), inner.name
        if kind in WRITES_ONCE_PER_REQUEST_ID:
            if len(request.request_id) > 128:
                raise InvalidArgument("request_id is at most 128 characters")
            inner.request_id = request.request_id  # whatever the inner request said
        retry = kind in RETRIED_ALWAYS or (kind in WRITES_ONCE_PER_REQUEST_ID and bool(request.request_id))
        deadline = None if timeout is None else time.monotonic() + timeout
        # The shard that holds the data: the owner's, for a record another agent granted.
        owner = getattr(inner, "owner_agent_id", "")
        if kind in FANNED_OUT:
            return await self._fanned_out(agent, kind, inner, timeout)
        async with self._syscall(agent, kind, resource, queue, tool) as record:
            manager = self.managers[resource].for_agent(owner or agent.id)
            for attempt in range(MANAGER_RETRIES + 1 if retry else 1):
                try:
                    result = await manager.call(method, inner, _remaining(deadline))
                    break
                except Unavailable:
                    if attempt == MANAGER_RETRIES or not retry or not await self._back(manager, deadline):
                        raise
                    record.retries += 1
        response = kernel_pb2.SyscallResponse(syscall_id=record.id)
        getattr(response, kind).CopyFrom(result)
        return response

    async def _fanned_out(self, agent: Agent, kind: str, inner, timeout: float | None) -> kernel_pb2.SyscallResponse:
        """A syscall whose answer is spread over every shard (the grants others gave the agent live with their
        data): asked of each shard, the answers merged."""
        resource, method = SYSCALLS[kind]
        async with self._syscall(agent, kind, resource) as record:
            replies = await asyncio.gather(*(shard.call(method, inner, timeout)
                                             for shard in self.managers[resource].clients))
        response = kernel_pb2.SyscallResponse(syscall_id=record.id)
        merged = getattr(response, kind)
        for reply in replies:
            merged.MergeFrom(reply)
        merged.grants.sort(key=lambda g: (g.grantee_agent_id, g.key))  # in order, as one shard answers
        merged.received.sort(key=lambda g: (g.owner_agent_id, g.key))
        return response

    async def mount_tools(self, request: tools_pb2.MountRequest, timeout: float | None) -> tools_pb2.MountResponse:
        """Mounts an MCP server on the tool manager; its tools get their queues on first use."""
        return await self._tools.call("Mount", request, timeout)

    @property
    def _tools(self) -> ManagerClient:
        return self.managers[Resource.TOOLS].for_agent("")  # the tool manager is not sharded: one process

    async def unmount_tools(self, request: tools_pb2.UnmountRequest, timeout: float | None) -> tools_pb2.MountResponse:
        reply = await self._tools.call("Unmount", request, timeout)
        for name in reply.tools:  # a queue no tool stands behind any more (a later mount makes a fresh one)
            self.tool_queues.pop(name, None)
        return reply

    async def _tool_queue(self, name: str) -> ResourceQueue | None:
        """The tool's own queue; None (the tools queue) for a tool the tool service does not list."""
        if name not in self.tool_queues:
            try:
                listed = await self._tools.call("ListTools", tools_pb2.ListToolsRequest(), CONNECT_TIMEOUT_S)
            except AiosError:
                return None  # the call itself will meet the same trouble and report it
            for tool in listed.tools:
                if tool.name not in self.tool_queues:
                    self.tool_queues[tool.name] = ResourceQueue(Resource.TOOLS, self.new_policy(), tool.concurrency or 1)
        return self.tool_queues.get(name)

    async def generate(
        self, agent: Agent, request: kernel_pb2.KernelGenerateRequest, timeout: float | None,
        opened: Callable[[str], Awaitable[None]] | None = None,
    ) -> AsyncIterator[llm_core_pb2.GenerateChunk]:
        """One LLM syscall of `agent`, as one uninterrupted stream across any number of preemptions, core deaths and
        (through the SDK) kernel restarts. `opened` hears the syscall id before any chunk."""
        self._admit()
        deadline = None if timeout is None else time.monotonic() + timeout
        queue = self.queues[Resource.LLM]
        size = request.ByteSize()
        if size > MAX_GENERATE_BYTES:
            raise ResourceExhausted(f"the generation request is {size} bytes; the limit is {MAX_GENERATE_BYTES} "
                                    "(no context holds more). Shorten the prompt.")
        if request.remember and (request.received_token_ids or request.resume_syscall_id):
            raise InvalidArgument("a generation with `remember` cannot be continued from received tokens")
        self.usage.admit_generation(agent, time.monotonic())
        await self._a_core_serves(deadline)
        suspended = None
        if request.resume_syscall_id:  # suspended by a kernel that stopped gracefully: go on from its snapshot
            suspended = await self.suspensions.take(request.resume_syscall_id, agent.id)
        messages = [] if suspended else await self._with_history(agent, request, timeout)
        reply: list[str] = []  # one text per token chunk, then the last chunk's
        token_ids: list[int] = []
        finished = handed_over = False
        hint = request.priority if request.HasField("priority") else None
        try:
            async with self._syscall(agent, "llm_generate", Resource.LLM, priority=hint, opened=opened,
                                     syscall_id=suspended.syscall_id if suspended else "") as record:
                if suspended:
                    first, message = self._continuing(record, suspended, list(request.received_token_ids))
                    token_ids.extend(suspended.token_ids)
                    reply.extend(suspended.texts)
                    if not request.whole:  # the tokens streamed before the stop that the agent did not get
                        for index in range(len(request.received_token_ids), len(token_ids)):
                            yield llm_core_pb2.GenerateChunk(text=reply[index], token_id=token_ids[index],
                                                             completion_tokens=index + 1, syscall_id=record.id)
                else:
                    first = self._first_request(agent, request, messages, record.id)
                    message = first
                    if request.received_token_ids:  # the agent's stream broke before (the kernel died): go on
                        token_ids.extend(request.received_token_ids)
                        reply.extend([""] * len(token_ids))  # their texts are the agent's; one entry per token
                        record.tokens_out, record.recoveries = len(token_ids), 1
                        message = _replaying(first, token_ids)
                handed_over = True
                parked = False  # a core holds a preempted sequence of ours
                crashes = 0  # times this kernel rebuilt it after its core died (bounded; suspensions are not)
                prefix = prefix_key(first.prompt, first.messages[0].content if first.messages else "")
                replica: LLMCoreReplica | None = None  # the core it last streamed from
                try:
                    while True:
                        replica = await self._place(record, prefix, replica if message.resume else None, deadline)
                        message.tokens_per_chunk = WHOLE_TOKENS_PER_CHUNK if request.whole else 1
                        call = replica.client.stream("Generate", message, _remaining(deadline))
                        self.cores.started(replica, record.id, agent.id, prefix)
                        record.core = replica.name
                        parked = lost = False
                        moved_at, record.moved_at = record.moved_at, 0.0  # it moved here (else 0)
                        record.preemptible = True
                        chunks = _one_token_each(call)
                        try:
                            async for chunk in chunks:
                                if moved_at:  # the first sign of life on the core it moved to
                                    replica.migration_seconds += time.monotonic() - moved_at
                                    moved_at = 0.0
                                if chunk.finish_reason == llm_core_pb2.FINISH_REASON_PREEMPTED:
                                    parked = True
                                    break
                                if chunk.HasField("token_id") and chunk.completion_tokens <= record.tokens_out:
                                    continue  # delivered already (by token index), before a recovery
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
                        except grpc.aio.AioRpcError as exc:
                            if not _core_lost_it(exc, message.resume) or crashes >= MAX_RECOVERIES:
                                raise replica.client.error(exc) from None
                            lost = True
                        finally:
                            record.preemptible = False
                            call.cancel()
                            await chunks.aclose()
                            alone = replica.running == {record.id}  # decoding alone on its core
                            # Switched out to move (swap_out): its snapshot is in Redis, the core keeps nothing.
                            self.cores.stopped(replica, record.id, parked and not record.moving)
                        if parked and record.moving and not self.draining and self.cores.has_room():
                            # Keeps its place in the queue and continues on another core.
                            record.moving = record.preempt_requested = False
                            message = llm_core_pb2.GenerateRequest(agent_id=agent.id, syscall_id=record.id, resume=True)
                        elif parked:
                            record.moving, record.moved_at = False, 0.0  # a move that waits for a turn starts then
                            try:
                                await queue.requeue(record)  # refused at once while the kernel is stopping
                            except Unavailable:
                                parked = False  # not discarded: kept for the agent to continue after a restart
                                await self._suspend(record, first, token_ids, reply)
                                raise
                            message = llm_core_pb2.GenerateRequest(agent_id=agent.id, syscall_id=record.id,
                                                                   resume=True)
                        elif lost:
                            # The core died (or lost the sequence): rebuild it on a core that serves (another one,
                            # or this one once it is back), from the prompt and the tokens the agent already has;
                            # the stream goes on from the next index. Exactly when it decoded alone
                            # (token-identical); with others, its numerics depended on the batch anyway, and the
                            # core may rebuild it the fast way.
                            crowd = not alone
                            crashes += 1
                            record.recoveries += 1
                            record.preempt_requested = record.moving = False  # asked of the dead core: died with it
                            record.moved_at = 0.0
                            log.warning("syscall %s: LLM core %s lost it after %d tokens; recovering (recovery %d)",
                                        record.id, replica.name, len(token_ids), record.recoveries, extra=about(record))
                            if not await replica.client.healthy():
                                self._core_down(replica)
                            message = _replaying(first, token_ids, in_batch=crowd)
                        else:
                            break
                finally:
                    self.usage.charge_tokens(agent, record.tokens_in + record.tokens_out, time.monotonic())
                    if parked:  # the caller left (or the deadline passed) while we were switched out
                        self._spawn(self._discard(agent.id, record.id, replica))
        finally:
            if suspended and not handed_over:  # refused before it could go on (the kernel stopping again)
                await self.suspensions.put(suspended)
        if request.remember and finished:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            await self._remember(agent, request, "".join(reply), timeout)

    @staticmethod
    def _first_request(agent: Agent, request: kernel_pb2.KernelGenerateRequest,
                       messages: list[common_pb2.ChatMessage], syscall_id: str) -> llm_core_pb2.GenerateRequest:
        """The request the core gets, with the seed fixed here so that a recovery draws what the first run would."""
        sampling = common_pb2.SamplingParams()
        sampling.CopyFrom(request.sampling)
        if not sampling.HasField("seed"):
            sampling.seed = secrets.randbits(63)
        return llm_core_pb2.GenerateRequest(agent_id=agent.id, prompt=request.prompt, messages=messages,
                                            sampling=sampling, syscall_id=syscall_id)

    @staticmethod
    def _continuing(record: SyscallRecord, suspended: Suspension, received: list[int]
                    ) -> tuple[llm_core_pb2.GenerateRequest, llm_core_pb2.GenerateRequest]:
        """The first request of a suspended generation and the one that continues it from its snapshot (a core
        that finds none, expired or lost with Redis, answers NOT_FOUND, and the generation is rebuilt by replay)."""
        if received != suspended.token_ids[:len(received)]:
            raise InvalidArgument(f"received_token_ids are not the tokens syscall {record.id} streamed; send the "
                                  "ids of the chunks received, in order")
        record.tokens_in, record.tokens_out = suspended.prompt_tokens, len(suspended.token_ids)
        record.recoveries = suspended.recoveries + 1
        return suspended.request, llm_core_pb2.GenerateRequest(agent_id=record.agent_id, syscall_id=record.id,
                                                                resume=True)

    async def _suspend(self, record: SyscallRecord, first: llm_core_pb2.GenerateRequest, token_ids: list[int],
                       reply: list[str]) -> None:
        """Keeps a generation switched out of the core while the kernel stops, for its agent to continue."""
        kept = await self.suspensions.put(Suspension(
            record.id, record.agent_id, first, list(token_ids), list(reply), record.tokens_in, record.recoveries))
        log.info("syscall %s suspended after %d tokens%s", record.id, len(token_ids),
                 "" if kept else " (not kept: its agent continues it by replay)", extra=about(record))

    async def _with_history(
        self, agent: Agent, request: kernel_pb2.KernelGenerateRequest, timeout: float | None
    ) -> list[common_pb2.ChatMessage]:
        """The request's messages with the agent's newest turns from memory after its system messages."""
        messages = list(request.messages)
        if not (request.history_turns or request.remember):
            return messages
        if not messages:
            raise InvalidArgument("history_turns and remember work on chat turns: send `messages`, not a raw `prompt`")
        if not request.history_turns:
            return messages
        turns = await self.managers[Resource.MEMORY].for_agent(agent.id).call(
            "RecentTurns", memory_pb2.MemoryTurnsRequest(agent_id=agent.id, limit=request.history_turns), timeout)
        system = next((i for i, m in enumerate(messages) if m.role != "system"), len(messages))
        history = [common_pb2.ChatMessage(role=e.role, content=e.text) for e in turns.entries]
        return messages[:system] + history + messages[system:]

    async def _remember(
        self, agent: Agent, request: kernel_pb2.KernelGenerateRequest, reply: str, timeout: float | None
    ) -> None:
        """Stores the call's user/assistant messages and the reply as conversation turns, in order."""
        turns = [(m.role, m.content) for m in request.messages if m.role in ("user", "assistant")]
        if reply.strip():
            turns.append(("assistant", reply))
        memory = self.managers[Resource.MEMORY].for_agent(agent.id)
        for role, text in turns:
            await memory.call("Add", memory_pb2.MemoryAddRequest(agent_id=agent.id, text=text, role=role), timeout)

    async def start(self, reclaim: bool = True) -> None:
        """Starts the journal of syscall records and (unless another kernel shares the cores) reclaims what an
        earlier kernel left in the LLM core."""
        self.journal.start()
        self._spawn(self._check_cores())
        if reclaim:
            await self.reclaim()

    async def reclaim(self) -> None:
        """Frees what a kernel before this one left in the LLM core (parked sequences, snapshots), which nothing
        could resume through this kernel. Best effort: a core that is down holds nothing."""
        keep = await self.suspensions.ids()  # what the kernel before this one suspended stays for its agents
        for replica in self.cores.replicas:
            try:
                reply = await replica.client.call("Reset", llm_core_pb2.ResetRequest(keep_syscall_ids=keep), 30)
            except AiosError as exc:
                log.warning("could not reclaim what an earlier kernel left in LLM core %s: %s", replica.name, exc)
                continue
            if reply.parked or reply.snapshots:
                log.info("reclaimed %d parked generations and %d snapshots left by an earlier kernel on %s",
                         reply.parked, reply.snapshots, replica.name)
        if keep:
            log.info("%d generations suspended by the earlier kernel wait for their agents", len(keep))

    async def _place(self, record: SyscallRecord, prefix: str, holder: LLMCoreReplica | None,
                     deadline: float | None) -> LLMCoreReplica:
        """The core to run (or resume) a generation on, once one serves. `holder`: the core it was preempted on;
        when it goes elsewhere, its KV resident on `holder` is first written to Redis, where the new core finds it
        (one that cannot find it answers NOT_FOUND, and the generation is rebuilt by replay)."""
        await self._a_core_serves(deadline)
        target = self.cores.pick(record.agent_id, prefix, holder)
        if holder is not None and target is not holder:
            record.moved_at = record.moved_at or time.monotonic()
            if record.id in holder.parked and holder.state is not CoreState.DOWN:  # a dead core writes nothing
                await self._write_out(holder, record.id)
                await self._a_core_serves(deadline)
                target = self.cores.pick(record.agent_id, prefix, None)  # the place may have gone meanwhile
            if target is holder:  # room came back there: it resumes where its snapshot was written
                record.moved_at = 0.0
            else:
                self.cores.moved(holder, target, record.id)
                record.migrations += 1
        return target

    async def _a_core_serves(self, deadline: float | None) -> None:
        """Returns once some LLM core takes work (at once, normally); UNAVAILABLE after CORE_RECOVERY_WAIT_S."""
        give_up = time.monotonic() + CORE_RECOVERY_WAIT_S
        while not self.cores.capacity:  # every core down (their supervisors restart them) or drained
            if time.monotonic() > give_up:
                raise Unavailable(f"no LLM core has served for {CORE_RECOVERY_WAIT_S:.0f} s (all down or drained); "
                                  "retry when `aios status` shows one serving")
            _remaining(deadline)
            await asyncio.sleep(CORE_POLL_S)  # the watchers of the down cores mark them serving again

    async def _write_out(self, replica: LLMCoreReplica, syscall_id: str) -> None:
        """Has a parked generation's KV written from `replica` to Redis (it continues elsewhere)."""
        try:
            await replica.client.call("Preempt", llm_core_pb2.PreemptRequest(syscall_id=syscall_id, swap_out=True),
                                      MANAGER_BACK_S)
        except AiosError as exc:  # down: what it wrote before dying is in Redis, else the new core rebuilds it
            log.warning("could not write out %s from LLM core %s: %s", syscall_id, replica.name, exc.message)
        replica.parked.discard(syscall_id)

    def _core_down(self, replica: LLMCoreReplica) -> None:
        """A core whose stream broke and whose health check fails takes no new work until it answers again."""
        if replica.state is CoreState.SERVING:  # a draining one stays drained
            log.warning("LLM core %s at %s is down; its generations continue on the others", replica.name,
                        replica.address)
            self.cores.set_state(replica, CoreState.DOWN)
            self._spawn(self._watch(replica))

    async def _check_cores(self) -> None:
        """Marks DOWN a serving core that stops answering its health check even while idle, so that no generation
        is sent to it first (a broken stream finds the busy ones sooner); its watcher makes it serving again."""
        misses = {replica.name: 0 for replica in self.cores.replicas}
        while True:
            await asyncio.sleep(CORE_CHECK_S)  # a periodic health check of other processes
            for replica in self.cores.replicas:
                if replica.state is not CoreState.SERVING:
                    misses[replica.name] = 0
                    continue
                misses[replica.name] = 0 if await replica.client.healthy() else misses[replica.name] + 1
                if misses[replica.name] >= CORE_CHECK_MISSES:
                    self._core_down(replica)

    async def _watch(self, replica: LLMCoreReplica) -> None:
        while not await replica.client.healthy():
            await asyncio.sleep(CORE_POLL_S)  # polling its health: the restarted process gets a new connection
        if replica.state is CoreState.DOWN:
            log.info("LLM core %s serves again", replica.name)
            self.cores.set_state(replica, CoreState.SERVING)

    async def drain_core(self, name: str, undo: bool, timeout: float | None) -> LLMCoreReplica:
        """Takes a core out of service (`aios drain`): it gets no new generations, its running ones move to the other
        cores (switched out with their KV written to Redis, resumed there token for token), its parked ones are
        written out for whichever core resumes them. Returns once it holds none, or the time is up. `undo`: it
        serves again."""
        replica = self.cores.get(name)
        if undo:
            if replica.state is CoreState.DRAINING:
                self.cores.set_state(replica, CoreState.SERVING)
            return replica
        if replica.state is CoreState.SERVING and self.cores.capacity == replica.slots:
            raise FailedPrecondition(f"{replica.name} is the only LLM core that serves: draining it would stop every "
                                     "generation; start or undrain another core first")
        self.cores.set_state(replica, CoreState.DRAINING)
        give_up = time.monotonic() + min(DRAIN_CORE_S, timeout or DRAIN_CORE_S)
        while (replica.running or replica.parked) and time.monotonic() < give_up:
            for syscall_id in list(replica.running):
                record = self.table.get(syscall_id)
                if record is not None and record.preemptible and not record.preempt_requested:
                    record.preempt_requested = record.moving = True
                    record.moved_at = time.monotonic()
                    self._spawn(self._ask_core_to_preempt(record, swap_out=True))
            await asyncio.gather(*(self._write_out(replica, syscall_id) for syscall_id in list(replica.parked)))
            await asyncio.sleep(DRAIN_POLL_S)  # one still prefilling or replaying cannot be switched out yet
        return replica

    @staticmethod
    async def _back(manager: ManagerClient, deadline: float | None, wait_s: float = MANAGER_BACK_S) -> bool:
        """Whether `manager` answers its health check again within `wait_s` (and the call's deadline)."""
        give_up = time.monotonic() + wait_s
        while not await manager.healthy():
            now = time.monotonic()
            if now > give_up or (deadline is not None and now > deadline):
                return False
            await asyncio.sleep(CORE_POLL_S)  # polling its health: the restarted process gets a new connection
        return True

    def _preempt(self, record: SyscallRecord) -> None:
        self._spawn(self._ask_core_to_preempt(record))

    async def drain(self, within_s: float = DRAIN_S) -> None:
        """Stops gracefully: takes no more syscalls (STOPPING, with a pushback after which the SDKs ask again) and
        switches every generation out of the core with its snapshot written to Redis, where it waits (suspended)
        for its agent to continue it after the restart. The syscalls already running finish in the server's
        grace period."""
        self.draining = True
        queue = self.queues[Resource.LLM]
        queue.close(lambda: Unavailable(STOPPING, retry_after=STOPPING_RETRY_S))
        give_up = time.monotonic() + within_s
        while queue.running and time.monotonic() < give_up:
            for record in list(queue.running):
                if record.preemptible and not record.preempt_requested:
                    record.preempt_requested = True
                    self._spawn(self._ask_core_to_preempt(record, swap_out=True))
            await asyncio.sleep(DRAIN_POLL_S)  # one still prefilling or replaying cannot be switched out yet
        if queue.running:
            log.warning("%d generations were not suspended within %.0f s; their agents continue them by replay",
                        len(queue.running), within_s)
        await self.journal.flush()

    async def _ask_core_to_preempt(self, record: SyscallRecord, swap_out: bool = False) -> None:
        replica = self.cores.holding(record.id)
        try:
            if replica is None:
                raise Unavailable("it streams from no core")
            reply = await replica.client.call(
                "Preempt", llm_core_pb2.PreemptRequest(syscall_id=record.id, swap_out=swap_out), CONNECT_TIMEOUT_S)
            preempted = reply.preempted
        except AiosError as exc:
            log.warning("preempting %s failed: %s", record.id, exc.message, extra=about(record))
            preempted = False
        if not preempted:  # it finished first, or is not decoding yet: let the policy (or the drain) ask again later
            record.preempt_requested = record.moving = False
            record.moved_at = 0.0

    async def _discard(self, agent_id: str, syscall_id: str, replica: LLMCoreReplica | None) -> None:
        """Forgets a preempted generation its caller left: on the core that holds it, else (written out to Redis)
        through any core that serves."""
        if replica is None or syscall_id not in replica.parked:
            replica = self.cores.pick(agent_id, "")
        if replica is None:
            return  # no core serves: its snapshot expires on its own
        replica.parked.discard(syscall_id)
        try:
            await replica.client.call(
                "Discard", llm_core_pb2.DiscardRequest(syscall_id=syscall_id, agent_id=agent_id), CONNECT_TIMEOUT_S)
        except AiosError as exc:
            log.warning("could not discard preempted %s (its snapshot will expire): %s", syscall_id, exc.message)

    def _spawn(self, work) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def get_syscall(self, caller: Caller, syscall_id: str) -> SyscallRecord:
        """An agent's own syscall record (another agent's is NOT_FOUND: ids reveal nothing); the operator's: any.
        From memory, else from Redis (an earlier kernel's, or one this kernel no longer keeps)."""
        record = self.table.get(syscall_id) or await self.journal.load(syscall_id)
        if record is None or (caller.agent is not None and record.agent_id != caller.agent.id):
            raise NotFound(f"no syscall {syscall_id!r} of this agent (unknown, another agent's, or finished long ago)")
        return record

    def list_syscalls(self, caller: Caller, agent_id: str, kind: str, limit: int) -> list[SyscallRecord]:
        """The newest records the kernel keeps: an agent's own (naming another agent is PERMISSION_DENIED), the
        operator's of anyone."""
        if caller.agent is not None:
            if agent_id and agent_id != caller.agent.id:
                raise PermissionDenied("an agent lists its own syscalls only; leave agent_id empty")
            agent_id = caller.agent.id
        limit = limit or DEFAULT_LISTED_SYSCALLS
        require(limit <= MAX_LISTED_SYSCALLS, f"limit is at most {MAX_LISTED_SYSCALLS}")
        return self.table.newest(agent_id, kind, limit)

    async def close(self) -> None:
        for task in list(self._background):  # core watchers, discards: nothing to do once the kernel stops
            task.cancel()
        await self.journal.stop()
        await self.agents.close()
        for manager in self.managers.values():
            await manager.close()
        for replica in self.cores.replicas:
            await replica.client.close()
