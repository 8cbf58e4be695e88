"""Tools of Model Context Protocol servers (stdio transport), mounted as ordinary AIOS tools.

Each server runs as a child process while it is mounted, confined by bubblewrap
(services/tools/mcp_sandbox.py) when the machine has it. Its tools
are registered as `<server>__<tool>` with the schema the server declares, so
the kernel queues, validates and accounts them like built-in ones. The MCP
session lives in one task of its own (anyio cancel scopes must be entered and
left in the same task); calls from other tasks go through the session.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from services.errors import AlreadyExists, DeadlineExceeded, InvalidArgument, NotFound, Unavailable
from services.tools.core import CallContext, Tool, ToolRegistry
from services.tools.mcp_sandbox import PROJECT_ROOT, McpSandboxConfig
from services.tools.sandbox import RunCgroup, Sandbox, SandboxLimits

if TYPE_CHECKING:  # the MCP client library is imported on the first mount: it alone took 1.2 s of a tool manager's start
    from mcp import ClientSession, StdioServerParameters

log = logging.getLogger("aios.tools.mcp")


@dataclass(frozen=True)
class McpServerSpec:
    name: str
    command: list[str]
    network: bool = False  # the host's network, which the operator allows per server
    read_only: tuple[str, ...] = ()  # host paths the server may read besides Python, the project and /usr

    @classmethod
    def parse(cls, text: str, networked: Sequence[str] = ()) -> McpServerSpec:
        """'name=command arg ...', e.g. 'words=python -m services.tools.example_mcp_server'."""
        name, _, command = text.partition("=")
        if not name.isidentifier() or not command.strip():
            raise ValueError(f"--mcp {text!r}: expected NAME=COMMAND with NAME a plain identifier")
        return cls(name, shlex.split(command), network=name in networked)


@dataclass(frozen=True)
class McpLimits:
    """What every MCP server may use: time per call; memory and processes of the whole server (its cgroup)."""
    timeout_s: float = 30.0
    memory_bytes: int = 1 << 30
    processes: int = 64


class McpConnection:
    def __init__(self, spec: McpServerSpec, params: StdioServerParameters, concurrency: int = 4,
                 timeout_s: float = McpLimits.timeout_s) -> None:
        self.spec = spec
        self.params = params
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
        names: list[str] = []
        try:
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
        except BaseException:  # a duplicate or invalid tool: none of this server's tools stays registered
            registry.unregister(names)
            raise
        log.info("mounted MCP server %s (%s): %s", self.spec.name, " ".join(self.spec.command), ", ".join(names))
        return names

    async def _serve(self, ready: asyncio.Future) -> None:
        from mcp import ClientSession
        from mcp.client.stdio import stdio_client

        try:
            async with stdio_client(self.params) as (read, write), ClientSession(read, write) as session:
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
    """The MCP servers mounted now, by name: at start (`--mcp`) and while AIOS runs (Mount/Unmount).

    Each is started in a bubblewrap sandbox when `sandbox` has one (`hidden`: directories no server may see,
    the AIOS home), in a cgroup of its own when cgroups are writable."""

    def __init__(self, registry: ToolRegistry, sandbox: Sandbox, limits: McpLimits = McpLimits(),
                 hidden: Sequence[str] = ()) -> None:
        self.registry = registry
        self.sandbox = sandbox
        self.limits = limits
        self.hidden = list(hidden)
        self.connections: dict[str, McpConnection] = {}
        self.tools: dict[str, list[str]] = {}
        self.cgroups: dict[str, RunCgroup] = {}

    async def mount(self, spec: McpServerSpec) -> list[str]:
        name = spec.name
        if not name.isidentifier():
            raise InvalidArgument(f"MCP server name {name!r} must be a plain identifier (letters, digits, _)")
        if not spec.command or not spec.command[0]:
            raise InvalidArgument("the command that starts the MCP server is required")
        if name in self.connections:
            raise AlreadyExists(f"an MCP server named {name!r} is mounted; unmount it first")
        missing = [path for path in spec.read_only if not os.path.isabs(path) or not os.path.exists(path)]
        if missing:
            raise InvalidArgument(f"read-only paths must be absolute and exist on the tool service's host: {missing}")
        connection = McpConnection(spec, self._parameters(spec), timeout_s=self.limits.timeout_s)
        try:
            names = await connection.mount(self.registry)
        except (OSError, ValueError) as exc:
            await self._stop(name, connection)
            raise InvalidArgument(f"MCP server {name!r} did not start ({exc})") from None
        except Exception as exc:  # noqa: BLE001 - whatever the server did, it is the operator's to fix
            await self._stop(name, connection)
            raise Unavailable(f"MCP server {name!r} did not answer as an MCP server ({type(exc).__name__}: {exc}); "
                              "see the tool service's log") from None
        self.connections[name], self.tools[name] = connection, names
        return names

    def _parameters(self, spec: McpServerSpec) -> StdioServerParameters:
        """How to start the server: inside bubblewrap and its own cgroup where the machine allows."""
        from mcp import StdioServerParameters

        if not self.sandbox.bwrap:
            log.warning("MCP server %s runs unconfined: bubblewrap is not available on this machine", spec.name)
            return StdioServerParameters(command=spec.command[0], args=spec.command[1:])
        cgroup_procs: list[str] = []
        if self.sandbox.cgroups:
            limits = SandboxLimits(memory_bytes=self.limits.memory_bytes, processes=self.limits.processes)
            self.cgroups[spec.name] = RunCgroup(f"{os.getpid()}-mcp-{spec.name}", limits)
            cgroup_procs = self.cgroups[spec.name].procs_files
        config = McpSandboxConfig(bwrap=self.sandbox.bwrap, command=spec.command, network=spec.network,
                                  read_only=list(spec.read_only), hidden=self.hidden, cgroup_procs=cgroup_procs)
        launcher = config.launcher()
        return StdioServerParameters(command=launcher[0], args=launcher[1:], cwd=str(PROJECT_ROOT))

    async def _stop(self, name: str, connection: McpConnection) -> None:
        await connection.close()
        cgroup = self.cgroups.pop(name, None)
        if cgroup is not None:
            await asyncio.to_thread(cgroup.remove)

    async def unmount(self, name: str) -> list[str]:
        connection = self.connections.pop(name, None)
        if connection is None:
            raise NotFound(f"no MCP server named {name!r} is mounted; mounted: {', '.join(self.connections) or 'none'}")
        names = self.tools.pop(name)
        self.registry.unregister(names)
        await self._stop(name, connection)
        return names

    async def close(self) -> None:
        for name in list(self.connections):
            await self.unmount(name)
