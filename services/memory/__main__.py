"""Runs the memory manager: `python -m services.memory --port N --data-dir DIR`."""

from __future__ import annotations

import argparse
from pathlib import Path

from aios.v1 import memory_pb2, memory_pb2_grpc
from services.batched import batched_services
from services.memory.core import (
    DEFAULT_ENTRIES_PER_BLOCK,
    DEFAULT_MAX_ENTRY_BYTES,
    DEFAULT_QUOTA_BYTES,
    DEFAULT_RAM_BUDGET_BYTES,
    MemoryStore,
)
from services.memory.servicer import MemoryServicer
from services.metrics import Collected, from_message
from services.server import Service, common_arguments, kernel_only, run


def build(args: argparse.Namespace) -> Service:
    store = MemoryStore(
        args.data_dir,
        ram_budget_bytes=args.ram_budget_bytes,
        entries_per_block=args.entries_per_block,
        k=args.lru_k,
        correlated_period=args.correlated_period,
        max_entry_bytes=args.max_entry_bytes,
        quota_bytes=args.quota_bytes,
    )
    grpc_services, register = batched_services(
        MemoryServicer(store), memory_pb2_grpc.add_MemoryServicer_to_server, memory_pb2.DESCRIPTOR.services_by_name["Memory"])
    return Service(
        name="memory",
        grpc_services=grpc_services,
        register=register,
        on_stop=store.close,
        authorize=kernel_only(args),
        collectors=[Collected("memory", lambda: from_message(
            "aios_memory", memory_pb2.MemoryStatsResponse(**store.stats()), {"hits", "faults", "evictions"},
            "memory.proto MemoryStatsResponse"))],
    )


def main() -> None:
    parser = common_arguments("AIOS memory manager")
    parser.add_argument("--data-dir", type=Path, required=True, help="directory of the shard's memory file (memory.db)")
    parser.add_argument("--ram-budget-bytes", type=int, default=DEFAULT_RAM_BUDGET_BYTES,
                        help="resident entry bytes above which blocks are evicted to disk")
    parser.add_argument("--entries-per-block", type=int, default=DEFAULT_ENTRIES_PER_BLOCK)
    parser.add_argument("--lru-k", type=int, default=2, help="K of LRU-K (1 is plain LRU)")
    parser.add_argument("--correlated-period", type=int, default=0,
                        help="references to a block within this many requests count as one")
    parser.add_argument("--max-entry-bytes", type=int, default=DEFAULT_MAX_ENTRY_BYTES)
    parser.add_argument("--quota-bytes", type=int, default=DEFAULT_QUOTA_BYTES,
                        help="bytes of entries (text and metadata) one agent may keep")
    run(build, parser)


if __name__ == "__main__":
    main()
