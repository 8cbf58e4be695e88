"""Runs the kernel: `python -m services.scheduler --llm-core ADDR --memory ADDR ...`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from aios.v1 import kernel_pb2, kernel_pb2_grpc
from services import redis_state
from services.batched import batched_services
from services.credentials import read_secret, tls_server_credentials
from services.scheduler.identity import AgentRegistry, Quota, RegistrationPolicy
from services.scheduler.journal import RecordJournal
from services.metrics import Collected
from services.scheduler.kernel import Kernel, core_router, manager_shards
from services.scheduler.metrics import kernel_metrics
from services.shards import parse_named_addresses
from services.scheduler.policy import POLICIES, make_policy
from services.scheduler.queues import ResourceQueue
from services.scheduler.servicer import KernelServicer
from services.scheduler.suspensions import SuspendedGenerations
from services.scheduler.syscalls import Resource
from services.server import Service, add_redis_argument, cluster_secret, common_arguments, redis_url, run

log = logging.getLogger("aios.kernel")


def build(args: argparse.Namespace) -> Service:
    redis = redis_state.connect(redis_url(args))
    cores = core_router(args.llm_core, args.llm_slots, cluster_secret(args))
    managers = manager_shards(
        {Resource.MEMORY: args.memory, Resource.STORAGE: args.storage, Resource.TOOLS: [args.tools]},
        cluster_secret(args),
    )
    capacities = {
        Resource.LLM: cores.capacity,
        Resource.MEMORY: args.manager_concurrency,
        Resource.STORAGE: args.manager_concurrency,
        Resource.TOOLS: args.manager_concurrency,
    }
    queues = {r: ResourceQueue(r, make_policy(args.policy, args.slice_tokens), c) for r, c in capacities.items()}
    registration = RegistrationPolicy(
        open=args.open_registration,
        open_max_priority=args.open_max_priority,
        open_max_weight=args.open_max_weight,
        default_quota=Quota(args.tokens_per_minute, args.concurrent_syscalls, args.tool_slots),
    )
    agents = AgentRegistry(redis, read_secret(args.operator_token_file), registration)
    kernel = Kernel(agents, managers, cores, queues, lambda: make_policy(args.policy, args.slice_tokens), RecordJournal(redis),
                    SuspendedGenerations(redis))
    servicer = KernelServicer(kernel, args.registrations_per_second, args.registration_burst)
    if args.open_registration:
        log.warning("open registration is on: anyone who reaches %s:%s may register an agent", args.host, args.port)

    async def redis_ok() -> bool:
        return await redis_state.is_up(redis)

    grpc_services, register = batched_services(
        servicer, kernel_pb2_grpc.add_KernelServicer_to_server, kernel_pb2.DESCRIPTOR.services_by_name["Kernel"])
    return Service(
        name="kernel",
        grpc_services=grpc_services,
        register=register,
        probes=[redis_ok],
        on_start=lambda: kernel.start(reclaim=not args.no_reclaim),
        on_drain=kernel.drain,
        on_stop=kernel.close,
        server_credentials=tls_server_credentials(args.tls_cert, args.tls_key) if args.tls_cert else None,
        collectors=[Collected("kernel", lambda: kernel_metrics(kernel, servicer.audit.refusals))],
    )


def main() -> None:
    parser = common_arguments("AIOS kernel (scheduler): the agent-facing door")
    add_redis_argument(parser)
    parser.add_argument("--operator-token-file", type=Path, required=True,
                        help="file (mode 0600) holding the operator token, which registers and administers agents")
    parser.add_argument("--llm-core", required=True, action="append", metavar="[NAME=]HOST:PORT",
                        help="an LLM core; repeat for several (unnamed: llm_core, llm_core_2, ...). The kernel routes "
                             "each generation to one of them")
    parser.add_argument("--memory", required=True, action="append", metavar="[NAME=]HOST:PORT",
                        help="a memory manager shard; repeat for several (unnamed: memory, memory_2, ...). An agent's "
                             "memory lives on the shard its id hashes to, by name (services/shards.py)")
    parser.add_argument("--storage", required=True, action="append", metavar="[NAME=]HOST:PORT",
                        help="a storage manager shard; repeat for several (unnamed: storage, storage_2, ...)")
    parser.add_argument("--tools", required=True, help="host:port of the tool manager")
    parser.add_argument("--policy", default="fifo", choices=sorted(POLICIES))
    parser.add_argument("--slice-tokens", type=int, default=32,
                        help="round robin / fair share: tokens a generation runs before it may be preempted")
    parser.add_argument("--no-reclaim", action="store_true",
                        help="do not reset the LLM core at start (a kernel beside another on the same cores)")
    parser.add_argument("--llm-slots", type=int, default=16,
                        help="generations each LLM core decodes at once (= its --slots)")
    # 64: the managers commit writes in groups and take calls many to a message, so more calls in flight make bigger
    # groups, not more work (2,000 agents: 1,000 -> 1,200 syscalls/s on a 2-core EPYC against 16).
    parser.add_argument("--manager-concurrency", type=int, default=64,
                        help="calls in flight at once to the memory (storage, tools) manager, all its shards together")
    parser.add_argument("--tls-cert", type=Path, help="serve TLS with this PEM certificate (chain)")
    parser.add_argument("--tls-key", type=Path, help="the certificate's PEM private key")
    access = parser.add_argument_group("registration and default limits of an agent")
    access.add_argument("--open-registration", action="store_true",
                        help="let anyone who reaches the kernel register an agent (a trusted single-user machine)")
    access.add_argument("--open-max-priority", type=int, default=0, help="highest priority an open registration gets")
    access.add_argument("--open-max-weight", type=float, default=1.0, help="highest weight an open registration gets")
    access.add_argument("--tokens-per-minute", type=int, default=0, help="LLM tokens per minute per agent (0: no limit)")
    access.add_argument("--concurrent-syscalls", type=int, default=64, help="syscalls in flight per agent (0: no limit)")
    access.add_argument("--tool-slots", type=int, default=1, help="calls of one tool an agent runs at once (0: no limit)")
    access.add_argument("--registrations-per-second", type=float, default=20.0,
                        help="open registrations (anyone but the operator) per second, all callers together")
    access.add_argument("--registration-burst", type=int, default=200, help="open registrations allowed at once")
    args = parser.parse_args()
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    try:
        for kind in ("llm_core", "memory", "storage"):
            parse_named_addresses(getattr(args, kind), kind)
    except ValueError as exc:
        parser.error(str(exc))
    run(build, parser, args)


if __name__ == "__main__":
    main()
