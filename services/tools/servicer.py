"""aios.v1.Tools over gRPC: translates messages to ToolRegistry calls."""

from __future__ import annotations

import asyncio
import json

from aios.v1 import tools_pb2, tools_pb2_grpc
from services.tools.core import ToolRegistry


class ToolsServicer(tools_pb2_grpc.ToolsServicer):
    def __init__(self, registry: ToolRegistry) -> None:
        self.registry = registry

    async def ListTools(self, request, context):
        return tools_pb2.ListToolsResponse(
            tools=[
                tools_pb2.ToolSpec(name=t.name, description=t.description, parameters_schema=json.dumps(t.parameters))
                for t in self.registry.list()
            ]
        )

    async def CallTool(self, request, context):
        result = await asyncio.to_thread(self.registry.call, request.name, request.arguments_json)
        return tools_pb2.CallToolResponse(result_json=json.dumps(result))
