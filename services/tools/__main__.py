"""Runs the tool manager: `python -m services.tools [--storage ADDR] [--mcp NAME=COMMAND ...]`."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from aios.v1 import storage_pb2, storage_pb2_grpc, tools_pb2, tools_pb2_grpc
from services.batched import batched_services
from services.metrics import Collected
from services.shards import sharded_manager
from services.server import Service, cluster_secret, common_arguments, kernel_only, run
from services.tools.builtin import builtin_tools
from services.tools.core import ToolRegistry
from services.tools.mcp_mount import McpLimits, McpMounts, McpServerSpec
from services.tools.sandbox import Sandbox, SandboxLimits
from services.tools.servicer import ToolsServicer


def build(args: argparse.Namespace) -> Service:
    registry = ToolRegistry()
    sandbox = Sandbox(
        SandboxLimits(wall_seconds=args.sandbox_wall_seconds, cpu_seconds=args.sandbox_cpu_seconds,
                      memory_bytes=args.sandbox_memory_mb << 20, processes=args.sandbox_processes),
        root=args.sandbox_dir,
    )
    specs = [McpServerSpec.parse(text, args.mcp_network) for text in args.mcp]
    limits = McpLimits(timeout_s=args.mcp_timeout_seconds, memory_bytes=args.mcp_memory_mb << 20)
    mounts = McpMounts(registry, sandbox, limits, hidden=[str(p) for p in args.hidden_dir])
    storage = (sharded_manager(args.storage, "storage", storage_pb2_grpc.StorageStub, cluster_secret(args),
                               storage_pb2.DESCRIPTOR.services_by_name["Storage"]) if args.storage else None)

    async def start() -> None:
        await sandbox.probe()
        if args.require_bubblewrap and not sandbox.bwrap:
            raise SystemExit("tools: --require-bubblewrap is set and bubblewrap cannot confine runs here (see the "
                             "warning above); not starting, since runs would share this container's files and network")
        for tool in builtin_tools(sandbox, storage):
            registry.register(tool)
        for spec in specs:
            await mounts.mount(spec)

    async def stop() -> None:
        await mounts.close()
        if storage is not None:
            await storage.close()

    grpc_services, register = batched_services(
        ToolsServicer(registry, sandbox, mounts), tools_pb2_grpc.add_ToolsServicer_to_server, tools_pb2.DESCRIPTOR.services_by_name["Tools"])
    return Service(
        name="tools",
        grpc_services=grpc_services,
        register=register,
        on_start=start,
        on_stop=stop,
        authorize=kernel_only(args),
        collectors=[Collected("tools", registry.metrics)],
    )


def main() -> None:
    parser = common_arguments("AIOS tool manager")
    parser.add_argument("--storage", action="append", default=[], metavar="[NAME=]HOST:PORT",
                        help="a storage manager shard, for the file_read/file_write tools; repeat for each shard, with "
                             "the names the kernel gives them")
    parser.add_argument("--mcp", action="append", default=[], metavar="NAME=COMMAND",
                        help="mount the tools of an MCP server started with COMMAND (stdio), as NAME__<tool>")
    parser.add_argument("--mcp-timeout-seconds", type=float, default=30.0,
                        help="how long one MCP tool call may take before DEADLINE_EXCEEDED")
    parser.add_argument("--mcp-network", action="append", default=[], metavar="NAME",
                        help="let the --mcp server NAME use the host's network (MCP servers have none by default)")
    parser.add_argument("--mcp-memory-mb", type=int, default=1024,
                        help="memory of one MCP server and all its processes (where cgroups are writable)")
    parser.add_argument("--hidden-dir", action="append", default=[], type=Path, metavar="DIR",
                        help="a directory no MCP server may see even if it is bound (the AIOS home); repeatable")
    parser.add_argument("--sandbox-dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where sandboxed runs get their private working directories")
    parser.add_argument("--require-bubblewrap", action="store_true",
                        help="refuse to start unless bubblewrap confines runs (a deployment that counts on it, not a "
                             "developer's machine without it)")
    parser.add_argument("--sandbox-wall-seconds", type=float, default=10.0)
    parser.add_argument("--sandbox-cpu-seconds", type=int, default=5)
    parser.add_argument("--sandbox-memory-mb", type=int, default=512)
    parser.add_argument("--sandbox-processes", type=int, default=16)
    run(build, parser)


if __name__ == "__main__":
    main()
