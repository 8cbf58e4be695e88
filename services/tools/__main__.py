"""Runs the tool manager: `python -m services.tools`."""

from __future__ import annotations

import argparse

from aios.v1 import tools_pb2_grpc
from services.server import Service, common_arguments, run
from services.tools.builtin import BUILTIN_TOOLS
from services.tools.core import ToolRegistry
from services.tools.servicer import ToolsServicer


def build(args: argparse.Namespace) -> Service:
    registry = ToolRegistry()
    for tool in BUILTIN_TOOLS:
        registry.register(tool)
    return Service(
        name="tools",
        grpc_services=["aios.v1.Tools"],
        register=lambda server: tools_pb2_grpc.add_ToolsServicer_to_server(ToolsServicer(registry), server),
    )


def main() -> None:
    run(build, common_arguments("AIOS tool manager"))


if __name__ == "__main__":
    main()
