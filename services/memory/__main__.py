"""Runs the memory manager: `python -m services.memory --port N`."""

from __future__ import annotations

import argparse

from aios.v1 import memory_pb2_grpc
from services.memory.core import DEFAULT_MAX_ENTRY_BYTES, MemoryStore
from services.memory.servicer import MemoryServicer
from services.server import Service, common_arguments, run


def build(args: argparse.Namespace) -> Service:
    store = MemoryStore(max_entry_bytes=args.max_entry_bytes)
    return Service(
        name="memory",
        grpc_services=["aios.v1.Memory"],
        register=lambda server: memory_pb2_grpc.add_MemoryServicer_to_server(MemoryServicer(store), server),
    )


def main() -> None:
    parser = common_arguments("AIOS memory manager")
    parser.add_argument("--max-entry-bytes", type=int, default=DEFAULT_MAX_ENTRY_BYTES)
    run(build, parser)


if __name__ == "__main__":
    main()
