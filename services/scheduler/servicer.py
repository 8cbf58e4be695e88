"""aios.v1.Kernel over gRPC: the only door an agent knows.

Each RPC authenticates its caller from the `authorization` metadata first
(`kernel_rpc`), then translates between messages and the kernel core. Refusals
(bad token, denied access, limits) are counted and logged with the caller.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import inspect
import time
from typing import Any, Callable

from google.protobuf.message import Message

import grpc

from aios.syscalls import SYSCALL_ID_METADATA
from aios.v1 import common_pb2, kernel_pb2, kernel_pb2_grpc, llm_core_pb2, memory_pb2
from services import redis_state, tracing
from services.errors import AiosError, ResourceExhausted, require
from services.scheduler.audit import Audit
from services.scheduler.identity import Agent, Caller, Quota, Role
from services.scheduler.cores import CoreState, LLMCoreReplica
from services.scheduler.kernel import Kernel
from services.scheduler.quotas import TokenBucket
from services.scheduler.syscalls import Resource, SyscallRecord

STATUS_PROBE_TIMEOUT_S = 1.0
# Agents in KernelStatus.activity unless the request says.
DEFAULT_ACTIVITY_AGENTS = 100
MAX_ACTIVITY_AGENTS = 10_000
CORE_STATES = {CoreState.SERVING: kernel_pb2.LLM_CORE_STATE_SERVING, CoreState.DRAINING: kernel_pb2.LLM_CORE_STATE_DRAINING,
               CoreState.DOWN: kernel_pb2.LLM_CORE_STATE_DOWN}
# Fields every LLM core (every memory shard) reports alike, such as the model, its limits, the snapshots in the Redis
# they share, the LRU-K policy: in their sum, the first one's value stands.
ALIKE_ON_EVERY_CORE = {"model_path", "model_description", "max_sequence_tokens", "snapshots_in_redis"}
ALIKE_ON_EVERY_SHARD = {"lru_k", "quota_bytes_per_agent", "hit_ratio"}


def added_up(replies: list[Message | None], alike: set[str]) -> Message | None:
    """The counters of several replicas' replies of one kind summed into one (None if none answered); true only if
    true on every one; lists (each replica's own) left out when there are several."""
    replies = [reply for reply in replies if reply is not None]
    if not replies:
        return None
    total = type(replies[0])()
    total.CopyFrom(replies[0])
    for reply in replies[1:]:
        for field in reply.DESCRIPTOR.fields:
            if field.is_repeated:  # one replica's own (an LLM core's step costs): not a sum
                total.ClearField(field.name)
            elif field.type == field.TYPE_BOOL:
                setattr(total, field.name, getattr(total, field.name) and getattr(reply, field.name))
            elif field.name not in alike:
                setattr(total, field.name, getattr(total, field.name) + getattr(reply, field.name))
    return total


def activity(kernel: Kernel, agents: list[Agent], limit: int) -> list[kernel_pb2.AgentActivity]:
    """The `limit` busiest agents: most syscalls in flight, then most tokens generated."""
    finished, in_flight = kernel.table.metrics.by_agent, kernel.table.in_flight_by_agent()
    known = {agent.id: agent for agent in agents}
    busiest = heapq.nlargest(limit, set(finished) | set(in_flight), key=lambda agent_id: (
        sum(in_flight.get(agent_id, ())), finished[agent_id].tokens_generated if agent_id in finished else 0))
    rows = []
    for agent_id in busiest:
        queued, running = in_flight.get(agent_id, (0, 0))
        done, agent = finished.get(agent_id), known.get(agent_id)
        rows.append(kernel_pb2.AgentActivity(
            agent_id=agent_id, name=agent.name if agent else "", queued=queued, running=running,
            finished=done.finished if done else 0, failed=done.failed if done else 0,
            tokens_generated=done.tokens_generated if done else 0, preemptions=done.preemptions if done else 0,
            tokens_per_minute=agent.quota.tokens_per_minute if agent else 0))
    return rows


def memory_added_up(replies: list[memory_pb2.MemoryStatsResponse | None]) -> memory_pb2.MemoryStatsResponse | None:
    total = added_up(replies, ALIKE_ON_EVERY_SHARD)
    if total is not None and total.hits + total.faults:
        total.hit_ratio = total.hits / (total.hits + total.faults)
    return total


def core_to_proto(replica: LLMCoreReplica, info: llm_core_pb2.InfoResponse | None = None) -> kernel_pb2.LLMCoreStatus:
    return kernel_pb2.LLMCoreStatus(
        name=replica.name, address=replica.address, state=CORE_STATES[replica.state], slots=replica.slots,
        running=len(replica.running), parked=len(replica.parked), dispatched=replica.dispatched,
        migrated_in=replica.migrated_in, migrated_out=replica.migrated_out,
        migration_seconds=replica.migration_seconds, info=info)


def record_to_proto(record: SyscallRecord) -> common_pb2.SyscallInfo:
    return common_pb2.SyscallInfo(
        id=record.id,
        agent_id=record.agent_id,
        kind=record.kind,
        resource=int(record.resource),
        state=int(record.state),
        created_at=record.created_at,
        started_at=record.started_at,
        finished_at=record.finished_at,
        error=record.error,
        error_code=record.error_code,
        tokens_in=record.tokens_in,
        tokens_out=record.tokens_out,
        queued_seconds=record.queued_s,
        running_seconds=record.running_s,
        preempted_seconds=record.preempted_s,
        preemptions=record.preemptions,
        priority=record.priority,
        recoveries=record.recoveries,
        retries=record.retries,
        core=record.core,
        migrations=record.migrations,
        trace_id=record.trace_id,
    )


def quota_to_proto(quota: Quota) -> kernel_pb2.AgentQuota:
    return kernel_pb2.AgentQuota(tokens_per_minute=quota.tokens_per_minute,
                                 concurrent_syscalls=quota.concurrent_syscalls, tool_slots=quota.tool_slots)


def agent_to_proto(agent: Agent) -> kernel_pb2.AgentInfo:
    return kernel_pb2.AgentInfo(
        id=agent.id, name=agent.name, registered_at=agent.registered_at, priority=agent.priority, weight=agent.weight,
        quota=quota_to_proto(agent.quota), revoked=agent.revoked, revoked_at=agent.revoked_at,
        token_hint=agent.token_hint, registered_by=agent.registered_by,
    )


def caller_to_proto(caller: Caller) -> kernel_pb2.CallerInfo:
    info = kernel_pb2.CallerInfo(role=caller.role.value)
    if caller.agent is not None:
        info.agent.CopyFrom(agent_to_proto(caller.agent))
    return info


def _timeout(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's remaining deadline, passed on to the manager so it is honoured end to end."""
    return context.time_remaining()


def kernel_rpc(anonymous_ok: bool = False) -> Callable:
    """Authenticates the caller (passed to the method as `caller`) and audits refusals, for unary and streaming RPCs.

    With `anonymous_ok`, a call without a token gets caller None instead of UNAUTHENTICATED."""

    def wrap(method: Callable) -> Callable:
        name = method.__name__

        async def authenticate(self: "KernelServicer", context: grpc.aio.ServicerContext) -> Caller | None:
            metadata = context.invocation_metadata()
            tracing.caller_traceparent.set(tracing.traceparent_in(metadata))  # for this call's task only
            return await self.kernel.agents.authenticate(metadata, anonymous_ok)

        def audit(self: "KernelServicer", exc: AiosError, caller: Caller | None, context: grpc.aio.ServicerContext) -> None:
            self.audit.note(exc, caller.label if caller else "an unauthenticated caller", name, context.peer())

        if inspect.isasyncgenfunction(method):
            @functools.wraps(method)
            async def stream(self: "KernelServicer", request: Any, context: grpc.aio.ServicerContext):
                caller = None
                try:
                    caller = await authenticate(self, context)
                    async for item in method(self, request, context, caller):
                        yield item
                except AiosError as exc:
                    audit(self, exc, caller, context)
                    raise

            return stream

        @functools.wraps(method)
        async def unary(self: "KernelServicer", request: Any, context: grpc.aio.ServicerContext) -> Any:
            caller = None
            try:
                caller = await authenticate(self, context)
                return await method(self, request, context, caller)
            except AiosError as exc:
                audit(self, exc, caller, context)
                raise

        return unary

    return wrap


class KernelServicer(kernel_pb2_grpc.KernelServicer):
    def __init__(self, kernel: Kernel, registrations_per_second: float = 20.0, registration_burst: int = 200) -> None:
        self.kernel = kernel
        self.audit = Audit()
        # Open registrations (callers without a token) share one bucket: a flood of them cannot exhaust Redis. The
        # operator registering a fleet of agents at once is not a flood; an agent may not register at all.
        self.registrations = TokenBucket(registration_burst, registrations_per_second, time.monotonic())

    @kernel_rpc(anonymous_ok=True)
    async def RegisterAgent(self, request, context, caller):
        wait = self.registrations.take(1, time.monotonic()) if caller is None else 0.0  # anonymous: open registration
        if wait:
            raise ResourceExhausted(f"too many open registrations; retry in {wait:.1f} s", retry_after=wait)
        q = request.quota
        agent, token = await self.kernel.agents.register(
            caller, request.name, request.priority, request.weight,
            Quota(q.tokens_per_minute, q.concurrent_syscalls, q.tool_slots))
        return kernel_pb2.RegisterAgentResponse(agent_id=agent.id, token=token, agent=agent_to_proto(agent))

    @kernel_rpc()
    async def WhoAmI(self, request, context, caller):
        return caller_to_proto(caller)

    @kernel_rpc()
    async def Generate(self, request, context, caller):
        async def opened(syscall_id: str) -> None:  # before any chunk: a stream that breaks early can go on
            await context.send_initial_metadata(((SYSCALL_ID_METADATA, syscall_id),))

        async for chunk in self.kernel.generate(caller.as_agent(), request, _timeout(context), opened):
            yield chunk

    @kernel_rpc()
    async def Syscall(self, request, context, caller):
        return await self.kernel.syscall(caller.as_agent(), request, _timeout(context))

    @kernel_rpc()
    async def GetSyscall(self, request, context, caller):
        return record_to_proto(await self.kernel.get_syscall(caller, request.syscall_id))

    @kernel_rpc()
    async def ListSyscalls(self, request, context, caller):
        records = self.kernel.list_syscalls(caller, request.agent_id, request.kind, request.limit)
        return kernel_pb2.ListSyscallsResponse(syscalls=[record_to_proto(record) for record in records])

    @kernel_rpc()
    async def ListAgents(self, request, context, caller):
        if caller.agent is not None:
            return kernel_pb2.ListAgentsResponse(agents=[agent_to_proto(caller.agent)])
        agents = await self.kernel.agents.all(request.include_revoked)
        return kernel_pb2.ListAgentsResponse(agents=[agent_to_proto(a) for a in agents])

    @kernel_rpc()
    async def RevokeAgent(self, request, context, caller):
        caller.require_operator("revoking an agent")
        return agent_to_proto(await self.kernel.agents.revoke(request.agent_id))

    @kernel_rpc()
    async def IssueToken(self, request, context, caller):
        caller.require_operator("issuing a token")
        agent, token = await self.kernel.agents.issue_token(request.agent_id)
        return kernel_pb2.RegisterAgentResponse(agent_id=agent.id, token=token, agent=agent_to_proto(agent))

    @kernel_rpc()
    async def MountTool(self, request, context, caller):
        caller.require_operator("mounting an MCP server")
        return await self.kernel.mount_tools(request, _timeout(context))

    @kernel_rpc()
    async def UnmountTool(self, request, context, caller):
        caller.require_operator("unmounting an MCP server")
        return await self.kernel.unmount_tools(request, _timeout(context))

    @kernel_rpc()
    async def DrainCore(self, request, context, caller):
        caller.require_operator("draining an LLM core")
        return core_to_proto(await self.kernel.drain_core(request.core, request.undo, _timeout(context)))

    @kernel_rpc()
    async def GetStatus(self, request, context, caller):
        kernel = self.kernel
        managers = kernel.managers
        cores = kernel.cores.replicas
        clients = [*(shard for manager in managers.values() for shard in manager.clients),
                   *(replica.client for replica in cores)]
        health, redis_ok = await asyncio.gather(
            asyncio.gather(*(client.healthy() for client in clients)), redis_state.is_up(kernel.agents.redis)
        )
        require(request.max_agents <= MAX_ACTIVITY_AGENTS, f"max_agents is at most {MAX_ACTIVITY_AGENTS}")
        queues = [*(("", q) for q in kernel.queues.values()), *sorted(kernel.tool_queues.items())]
        if caller.role is Role.AGENT:  # its own place in each queue, the system's health, nothing of other agents
            agent_id = caller.as_agent().id
            return kernel_pb2.KernelStatus(
                caller=caller_to_proto(caller),
                queues=[
                    kernel_pb2.QueueStatus(resource=int(q.resource), policy=q.policy.name,
                                           queued=queued + kernel.usage.waiting_in_line(name, agent_id),
                                           running=running, capacity=q.capacity, name=name)
                    for name, q in queues for queued, running in [q.counts_of(agent_id)]
                ],
                services=[kernel_pb2.ServiceStatus(name=c.name, healthy=h) for c, h in zip(clients, health)],
                redis_ok=redis_ok,
            )

        async def optional(call):
            try:
                return await call
            except AiosError:
                return None

        shards = managers[Resource.MEMORY].clients
        agents, *replies = await asyncio.gather(
            optional(kernel.agents.all()),
            *(optional(replica.client.call("Info", llm_core_pb2.InfoRequest(), STATUS_PROBE_TIMEOUT_S))
              for replica in cores),
            *(optional(shard.call("Stats", memory_pb2.MemoryStatsRequest(), STATUS_PROBE_TIMEOUT_S)) for shard in shards),
        )
        infos, memory = replies[:len(cores)], replies[len(cores):]
        return kernel_pb2.KernelStatus(
            agents=len(agents or ()),
            queues=[
                kernel_pb2.QueueStatus(
                    resource=int(q.resource),
                    policy=q.policy.name,
                    queued=q.queued + kernel.usage.waiting_in_line(name),
                    running=len(q.running),
                    capacity=q.capacity,
                    completed=q.completed,
                    preempted=q.waiting_to_resume,
                    preemptions=q.preemptions,
                    name=name,
                    wait_p50_seconds=p50,
                    wait_p99_seconds=p99,
                )
                for name, q in queues for p50, p99 in [q.wait_percentiles()]
            ],
            services=[kernel_pb2.ServiceStatus(name=c.name, address=c.address, healthy=h) for c, h in zip(clients, health)],
            syscalls_total=kernel.table.total,
            syscalls_failed=kernel.table.metrics.failed,
            tokens_generated=kernel.table.metrics.tokens_out,
            redis_ok=redis_ok,
            llm=added_up(infos, ALIKE_ON_EVERY_CORE),
            cores=[core_to_proto(replica, info) for replica, info in zip(cores, infos)],
            memory=memory_added_up(memory),
            caller=caller_to_proto(caller),
            refusals=dict(self.audit.refusals),
            activity=activity(kernel, agents or [], request.max_agents or DEFAULT_ACTIVITY_AGENTS),
        )
