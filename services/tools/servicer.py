"""aios.v1.Tools over gRPC: translates messages to ToolRegistry calls."""

from __future__ import annotations

import json

from aios.v1 import tools_pb2, tools_pb2_grpc
from services.tools.core import CallContext, ToolRegistry
from services.tools.mcp_mount import McpMounts, McpServerSpec
from services.tools.sandbox import Sandbox


class ToolsServicer(tools_pb2_grpc.ToolsServicer):
    def __init__(self, registry: ToolRegistry, sandbox: Sandbox, mounts: McpMounts) -> None:
        self.registry = registry
        self.sandbox = sandbox
        self.mounts = mounts

    async def Mount(self, request, context):
        spec = McpServerSpec(request.name, list(request.command), request.network, tuple(request.read_only_paths))
        return tools_pb2.MountResponse(tools=await self.mounts.mount(spec))

    async def Unmount(self, request, context):
        return tools_pb2.MountResponse(tools=await self.mounts.unmount(request.name))

    async def ListTools(self, request, context):
        tools = []
        for tool in self.registry.list():
            counters = self.registry.counters[tool.name]
            tools.append(tools_pb2.ToolSpec(
                name=tool.name, description=tool.description, parameters_schema=json.dumps(tool.parameters),
                concurrency=tool.concurrency, source=tool.source, running=counters.running,
                peak_running=counters.peak_running, calls=counters.calls, refused=counters.refused,
            ))
        return tools_pb2.ListToolsResponse(tools=tools, sandbox_isolation=self.sandbox.isolation())

    async def CallTool(self, request, context):
        result = await self.registry.call(request.name, request.arguments_json, CallContext(request.agent_id))
        return tools_pb2.CallToolResponse(result_json=json.dumps(result))
