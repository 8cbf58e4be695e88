"""aios.v1.Kernel over gRPC: the only door an agent knows."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aios.v1 import common_pb2, kernel_pb2, kernel_pb2_grpc, llm_core_pb2, memory_pb2
from services import redis_state
from services.scheduler.kernel import MANAGER_NAMES, Kernel
from services.scheduler.syscalls import Resource, SyscallRecord

STATUS_PROBE_TIMEOUT_S = 1.0


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
    )


def _timeout(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's remaining deadline, passed on to the manager so it is honoured end to end."""
    return context.time_remaining()


class KernelServicer(kernel_pb2_grpc.KernelServicer):
    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel

    async def RegisterAgent(self, request, context):
        return kernel_pb2.RegisterAgentResponse(agent_id=await self.kernel.register(request.name, request.priority, request.weight))

    async def Generate(self, request, context):
        async for chunk in self.kernel.generate(request, _timeout(context)):
            yield chunk

    async def Syscall(self, request, context):
        return await self.kernel.syscall(request, _timeout(context))

    async def GetSyscall(self, request, context):
        await self.kernel.agents.get(request.agent_id)
        return record_to_proto(self.kernel.get_syscall(request.agent_id, request.syscall_id))

    async def GetStatus(self, request, context):
        kernel = self.kernel
        managers = kernel.managers

        async def healthy(resource: Resource) -> bool:
            stub = health_pb2_grpc.HealthStub(managers.channels[resource])
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=STATUS_PROBE_TIMEOUT_S)
                return reply.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.aio.AioRpcError:
                return False

        async def optional(call):
            try:
                return await call
            except grpc.aio.AioRpcError:
                return None

        resources = list(managers.addresses)
        health, llm, memory, redis_ok, agents = await asyncio.gather(
            asyncio.gather(*(healthy(r) for r in resources)),
            optional(managers.stubs[Resource.LLM].Info(llm_core_pb2.InfoRequest(), timeout=STATUS_PROBE_TIMEOUT_S)),
            optional(managers.stubs[Resource.MEMORY].Stats(memory_pb2.MemoryStatsRequest(), timeout=STATUS_PROBE_TIMEOUT_S)),
            redis_state.is_up(kernel.agents.redis),
            kernel.agents.count(),
        )
        return kernel_pb2.KernelStatus(
            agents=agents,
            queues=[
                kernel_pb2.QueueStatus(
                    resource=int(q.resource),
                    policy=q.policy.name,
                    queued=q.queued,
                    running=len(q.running),
                    capacity=q.capacity,
                    completed=q.completed,
                    preempted=q.waiting_to_resume,
                    preemptions=q.preemptions,
                    name=name,
                )
                for name, q in [*(("", q) for q in kernel.queues.values()), *sorted(kernel.tool_queues.items())]
            ],
            services=[
                kernel_pb2.ServiceStatus(name=MANAGER_NAMES[r], address=managers.addresses[r], healthy=h)
                for r, h in zip(resources, health)
            ],
            syscalls_total=kernel.table.total,
            syscalls_failed=kernel.table.failed,
            tokens_generated=kernel.table.tokens_out,
            redis_ok=redis_ok,
            llm=llm,
            memory=memory,
        )
