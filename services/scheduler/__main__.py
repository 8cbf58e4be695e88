"""Runs the kernel: `python -m services.scheduler --llm-core ADDR --memory ADDR ...`."""

from __future__ import annotations

import argparse
import logging

from aios.v1 import kernel_pb2_grpc
from services import redis_state
from services.scheduler.agents import AgentRegistry
from services.scheduler.kernel import Kernel, Managers
from services.scheduler.policy import POLICIES, make_policy
from services.scheduler.queues import ResourceQueue
from services.scheduler.servicer import KernelServicer
from services.scheduler.syscalls import Resource
from services.server import Service, common_arguments, run

log = logging.getLogger("aios.kernel")


def build(args: argparse.Namespace) -> Service:
    redis = redis_state.connect(args.redis_url)
    managers = Managers(
        {
            Resource.LLM: args.llm_core,
            Resource.MEMORY: args.memory,
            Resource.STORAGE: args.storage,
            Resource.TOOLS: args.tools,
        }
    )
    capacities = {
        Resource.LLM: args.llm_slots,
        Resource.MEMORY: args.manager_concurrency,
        Resource.STORAGE: args.manager_concurrency,
        Resource.TOOLS: args.manager_concurrency,
    }
    queues = {r: ResourceQueue(r, make_policy(args.policy, args.slice_tokens), c) for r, c in capacities.items()}
    kernel = Kernel(AgentRegistry(redis), managers, queues, lambda: make_policy(args.policy, args.slice_tokens))

    async def redis_ok() -> bool:
        return await redis_state.is_up(redis)

    return Service(
        name="kernel",
        grpc_services=["aios.v1.Kernel"],
        register=lambda server: kernel_pb2_grpc.add_KernelServicer_to_server(KernelServicer(kernel), server),
        probes=[redis_ok],
        on_stop=managers.close,
    )


def main() -> None:
    parser = common_arguments("AIOS kernel (scheduler): the agent-facing door")
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--llm-core", required=True, help="host:port of the LLM core")
    parser.add_argument("--memory", required=True, help="host:port of the memory manager")
    parser.add_argument("--storage", required=True, help="host:port of the storage manager")
    parser.add_argument("--tools", required=True, help="host:port of the tool manager")
    parser.add_argument("--policy", default="fifo", choices=sorted(POLICIES))
    parser.add_argument("--slice-tokens", type=int, default=32,
                        help="round robin / fair share: tokens a generation runs before it may be preempted")
    parser.add_argument("--llm-slots", type=int, default=16, help="LLM syscalls dispatched at once (= core slots)")
    parser.add_argument("--manager-concurrency", type=int, default=16, help="calls in flight per other manager")
    run(build, parser)


if __name__ == "__main__":
    main()
