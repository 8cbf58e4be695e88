"""Tools of Model Context Protocol servers (stdio transport), mounted as ordinary AIOS tools.

Each server runs as a child process for the tool service's lifetime. Its tools
are registered as `<server>__<tool>` with the schema the server declares, so
the kernel queues, validates and accounts them like built-in ones. The MCP
session lives in one task of its own (anyio cancel scopes must be entered and
left in the same task); calls from other tasks go through the session.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
from dataclasses import dataclass
from typing import Any

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

from services.errors import AlreadyExists, DeadlineExceeded, InvalidArgument, NotFound, Unavailable
from services.tools.core import CallContext, Tool, ToolRegistry

log = logging.getLogger("aios.tools.mcp")


@dataclass(frozen=True)
class McpServerSpec:
    name: str
    command: list[str]

    @classmethod
    def parse(cls, text: str) -> McpServerSpec:
        """'name=command arg ...', e.g. 'words=python -m services.tools.example_mcp_server'."""
        name, _, command = text.partition("=")
        if not name.isidentifier() or not command.strip():
            raise ValueError(f"--mcp {text!r}: expected NAME=COMMAND with NAME a plain identifier")
        return cls(name, shlex.split(command))


# How long one MCP tool call may take before the agent gets DEADLINE_EXCEEDED (the server may hang).
CALL_TIMEOUT_S = 30.0


class McpConnection:
    def __init__(self, spec: McpServerSpec, concurrency: int = 4, timeout_s: float = CALL_TIMEOUT_S) -> None:
        self.spec = spec
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.session: ClientSession | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def mount(self, registry: ToolRegistry) -> list[str]:
        """Starts the server, lists its tools and registers them; returns their AIOS names."""
        ready: asyncio.Future = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._serve(ready))
        tools = await ready
        names = []
        for tool in tools:
            name = f"{self.spec.name}__{tool.name}"
            registry.register(Tool(
                name=name,
                description=tool.description or f"{tool.name} from MCP server {self.spec.name}",
                parameters=tool.input_schema or {"type": "object"},
                function=self._caller(tool.name),
                concurrency=self.concurrency,
                source=f"mcp:{self.spec.name}",
            ))
            names.append(name)
        log.info("mounted MCP server %s (%s): %s", self.spec.name, " ".join(self.spec.command), ", ".join(names))
        return names

    async def _serve(self, ready: asyncio.Future) -> None:
        params = StdioServerParameters(command=self.spec.command[0], args=self.spec.command[1:])
        try:
            async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
                await session.initialize()
                listed = await session.list_tools()
                self.session = session
                ready.set_result(listed.tools)
                await self._stop.wait()
        except Exception as exc:  # noqa: BLE001 - reported to mount(), or logged once serving
            if not ready.done():
                ready.set_exception(exc)
            else:
                log.error("MCP server %s failed: %s", self.spec.name, exc)
        finally:
            self.session = None

    def _caller(self, tool_name: str):  # type: ignore[no-untyped-def]
        async def call(arguments: dict[str, Any], context: CallContext) -> Any:
            if self.session is None:
                raise Unavailable(f"MCP server {self.spec.name!r} is not running; see the tool service log")
            try:
                result = await asyncio.wait_for(self.session.call_tool(tool_name, arguments), self.timeout_s)
            except asyncio.TimeoutError:
                raise DeadlineExceeded(
                    f"MCP server {self.spec.name!r} did not answer {tool_name} within {self.timeout_s:g} s") from None
            texts = [block.text for block in result.content if getattr(block, "type", "") == "text"]
            if result.is_error:
                raise InvalidArgument(f"{self.spec.name}__{tool_name} failed: {' '.join(texts)}")
            return result.structured_content if result.structured_content is not None else {"text": "\n".join(texts)}

        return call

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task


class McpMounts:
    """The MCP servers mounted now, by name: at start (`--mcp`) and while AIOS runs (Mount/Unmount)."""

    def __init__(self, registry: ToolRegistry, timeout_s: float = CALL_TIMEOUT_S) -> None:
        self.registry = registry
        self.timeout_s = timeout_s
        self.connections: dict[str, McpConnection] = {}
        self.tools: dict[str, list[str]] = {}

    async def mount(self, name: str, command: list[str]) -> list[str]:
        if not name.isidentifier():
            raise InvalidArgument(f"MCP server name {name!r} must be a plain identifier (letters, digits, _)")
        if not command or not command[0]:
            raise InvalidArgument("the command that starts the MCP server is required")
        if name in self.connections:
            raise AlreadyExists(f"an MCP server named {name!r} is mounted; unmount it first")
        connection = McpConnection(McpServerSpec(name, command), timeout_s=self.timeout_s)
        try:
            names = await connection.mount(self.registry)
        except (OSError, ValueError) as exc:
            await connection.close()
            raise InvalidArgument(f"MCP server {name!r} did not start ({exc})") from None
        except Exception as exc:  # noqa: BLE001 - whatever the server did, it is the operator's to fix
            await connection.close()
            raise Unavailable(f"MCP server {name!r} did not answer as an MCP server ({type(exc).__name__}: {exc})") from None
        self.connections[name], self.tools[name] = connection, names
        return names

    async def unmount(self, name: str) -> list[str]:
        connection = self.connections.pop(name, None)
        if connection is None:
            raise NotFound(f"no MCP server named {name!r} is mounted; mounted: {', '.join(self.connections) or 'none'}")
        names = self.tools.pop(name)
        self.registry.unregister(names)
        await connection.close()
        return names

    async def close(self) -> None:
        for name in list(self.connections):
            await self.unmount(name)
