"""The tool registry: named tools with a JSON Schema for their arguments and a concurrency limit.

Arguments are validated against the schema before a tool runs, so a tool's
function only ever sees arguments of the shape it declared. A tool declares
how many calls may run at once; the kernel queues calls beyond that (one queue
per tool), and the registry refuses any that still arrive over the limit
(a caller bypassing the kernel) rather than oversubscribe.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import jsonschema

from services.errors import InvalidArgument, NotFound, ResourceExhausted, require
from services.metrics import Metric, counter, gauge


@dataclass(frozen=True)
class CallContext:
    """Who is calling: tools that touch agent data act for this agent only."""

    agent_id: str


ToolFunction = Callable[[dict[str, Any], CallContext], Any | Awaitable[Any]]


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    function: ToolFunction
    concurrency: int = 8  # calls that may run at once
    source: str = "builtin"  # "builtin", "sandbox" or "mcp:<server>"


@dataclass
class ToolCounters:
    running: int = 0
    peak_running: int = 0
    calls: int = 0
    refused: int = 0
    failed: int = 0  # runs that raised (a bad result, a limit hit, a crash), not counting refused ones


# The most of a caller's input an error message repeats (it travels in gRPC trailers, 16 KB at most).
MAX_ECHO = 200


class ToolRegistry:
    def __init__(self) -> None:
        self._tools: dict[str, Tool] = {}
        self._validators: dict[str, Any] = {}
        self.counters: dict[str, ToolCounters] = {}

    def register(self, tool: Tool) -> None:
        if tool.name in self._tools:
            raise ValueError(f"tool {tool.name!r} is already registered")
        if tool.concurrency < 1:
            raise ValueError(f"tool {tool.name!r} must allow at least one call at a time")
        validator_class = jsonschema.validators.validator_for(tool.parameters, default=jsonschema.Draft202012Validator)
        validator_class.check_schema(tool.parameters)
        self._tools[tool.name] = tool
        self._validators[tool.name] = validator_class(tool.parameters)
        self.counters[tool.name] = ToolCounters()

    def unregister(self, names: list[str]) -> None:
        for name in names:
            self._tools.pop(name, None)
            self._validators.pop(name, None)
            self.counters.pop(name, None)

    def metrics(self) -> list[Metric]:
        """Per tool (a bounded set: the operator registers and mounts them): calls, failures, refusals, running."""
        counters = dict(self.counters)
        return [counter("aios_tool_calls", "Tool runs started", ["tool"], {(n,): c.calls for n, c in counters.items()}),
                counter("aios_tool_failures", "Tool runs that failed", ["tool"],
                        {(n,): c.failed for n, c in counters.items()}),
                counter("aios_tool_refused", "Tool calls refused at the tool's concurrency limit", ["tool"],
                        {(n,): c.refused for n, c in counters.items()}),
                gauge("aios_tool_running", "Tool runs going on now", ["tool"],
                      {(n,): c.running for n, c in counters.items()})]

    def list(self) -> list[Tool]:
        return [self._tools[name] for name in sorted(self._tools)]

    def parse(self, name: str, arguments_json: str) -> tuple[Tool, dict[str, Any]]:
        """The tool and its validated arguments."""
        require(bool(name), "tool name is required")
        tool = self._tools.get(name)
        if tool is None:
            known = ", ".join(sorted(self._tools))
            raise NotFound(f"no tool named {name!r}; available tools: {known}")
        try:
            arguments = json.loads(arguments_json) if arguments_json.strip() else {}
            error = jsonschema.exceptions.best_match(self._validators[name].iter_errors(arguments))
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"arguments for {name!r} are not valid JSON: {exc}") from None
        except RecursionError:
            raise InvalidArgument(f"arguments for {name!r} are nested too deeply") from None
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path)[:MAX_ECHO] or "(arguments)"
            message = error.message if len(error.message) <= MAX_ECHO else error.message[:MAX_ECHO] + "..."
            raise InvalidArgument(f"arguments for {name!r} do not match its schema at {where}: {message}")
        return tool, arguments

    async def call(self, name: str, arguments_json: str, context: CallContext) -> Any:
        """Validates the JSON arguments and runs the tool (blocking ones in a thread); returns its JSON-able result."""
        tool, arguments = self.parse(name, arguments_json)
        counters = self.counters[name]
        if counters.running >= tool.concurrency:
            counters.refused += 1
            raise ResourceExhausted(
                f"tool {name!r} is running {counters.running} calls, its limit; call it through the kernel, which queues"
            )
        counters.running += 1
        counters.calls += 1
        counters.peak_running = max(counters.peak_running, counters.running)
        try:
            if inspect.iscoroutinefunction(tool.function):
                return await tool.function(arguments, context)
            return await asyncio.to_thread(tool.function, arguments, context)
        except Exception:  # a caller that went away (CancelledError) is no failure of the tool
            counters.failed += 1
            raise
        finally:
            counters.running -= 1
