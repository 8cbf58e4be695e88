"""Built-in tools: a safe calculator, a clock, the calling agent's files (in storage), and a sandboxed Python runner."""

from __future__ import annotations

import ast
import datetime as dt
import math
import operator
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from services.errors import InvalidArgument
from services.shards import ShardedManager
from services.tools.core import CallContext, Tool
from services.tools.sandbox import Sandbox

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {"sqrt": math.sqrt, "abs": abs, "round": round, "log": math.log, "exp": math.exp,
              "sin": math.sin, "cos": math.cos, "tan": math.tan, "min": min, "max": max}
_CONSTANTS = {"pi": math.pi, "e": math.e}
# The calculator and the clock run on the tool manager's event loop in microseconds (bounded input): one at a time
# whatever their limit, which therefore only caps how many are on their way through the kernel. At 8 (the default),
# round trips of 5-10 ms held the calculator under ~1,000 calls/s for the whole machine.
INLINE_CONCURRENCY = 256
MAX_EXPRESSION_CHARS = 500
MAX_EXPONENT = 10_000
MAX_MAGNITUDE = 10**300


def evaluate(expression: str) -> int | float:
    """Evaluates arithmetic by walking the AST: numbers, + - * / // % **, a few math functions."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise InvalidArgument(f"expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as exc:
        raise InvalidArgument(f"cannot parse expression {expression!r}: {exc.msg}") from None
    try:
        result = _eval(tree.body)
        if isinstance(result, complex) or (isinstance(result, float) and not math.isfinite(result)):
            raise InvalidArgument(f"{expression!r} has no finite real value (JSON has no Infinity or NaN)")
        return result
    except ZeroDivisionError:
        raise InvalidArgument(f"division by zero in {expression!r}") from None
    except (ValueError, OverflowError, TypeError) as exc:
        raise InvalidArgument(f"cannot evaluate {expression!r}: {exc}") from None


def _eval(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            if abs(right) > MAX_EXPONENT:
                raise InvalidArgument(f"exponent {right} is larger than {MAX_EXPONENT}")
            if abs(left) > 1 and right > 0 and right * math.log10(abs(left)) > math.log10(MAX_MAGNITUDE):
                # Refused before the work: (10**300)**10000 would cost seconds of CPU to build and then be refused.
                raise InvalidArgument("result is too large (more than 300 digits)")
        result = _BINARY[type(node.op)](left, right)
        if isinstance(result, int) and abs(result) > MAX_MAGNITUDE:
            raise InvalidArgument("result is too large (more than 300 digits)")
        return result
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _FUNCTIONS
        and not node.keywords
    ):
        return _FUNCTIONS[node.func.id](*[_eval(arg) for arg in node.args])
    raise InvalidArgument(f"unsupported element in expression: {ast.unparse(node)!r}")


def calculator(arguments: dict[str, Any], context: CallContext) -> dict[str, Any]:
    return {"expression": arguments["expression"], "result": evaluate(arguments["expression"])}


def clock(arguments: dict[str, Any], context: CallContext) -> dict[str, Any]:
    name = arguments.get("timezone", "UTC")
    try:
        zone = ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidArgument(f"unknown timezone {name!r}; use an IANA name such as 'Europe/Paris'") from None
    now = dt.datetime.now(zone)
    return {"iso": now.isoformat(), "unix": now.timestamp(), "timezone": name}


def builtin_tools(sandbox: Sandbox, storage: ShardedManager | None) -> list[Tool]:
    """The built-in tools; the file tools need the storage manager, the Python runner a sandbox."""
    tools = [
        Tool(
            name="calculator",
            description="Evaluates an arithmetic expression (+ - * / // % **, sqrt, log, sin, pi...) exactly.",
            parameters={
                "type": "object",
                "properties": {"expression": {"type": "string", "minLength": 1, "description": "e.g. '(2+3)*7'"}},
                "required": ["expression"],
                "additionalProperties": False,
            },
            function=calculator,
            concurrency=INLINE_CONCURRENCY,
        ),
        Tool(
            name="clock",
            description="Returns the current date and time in a timezone (default UTC).",
            parameters={
                "type": "object",
                "properties": {"timezone": {"type": "string", "description": "IANA timezone, e.g. 'Asia/Tokyo'"}},
                "additionalProperties": False,
            },
            function=clock,
            concurrency=INLINE_CONCURRENCY,
        ),
        python_tool(sandbox),
    ]
    if storage is not None:
        tools += file_tools(storage)
    return tools


def python_tool(sandbox: Sandbox) -> Tool:
    async def run(arguments: dict[str, Any], context: CallContext) -> dict[str, Any]:
        result = await sandbox.run(arguments["code"])
        return {"exit_code": result.exit_code, "stdout": result.stdout, "stderr": result.stderr,
                "seconds": round(result.seconds, 3)}

    limits = sandbox.limits
    return Tool(
        name="python",
        description=(
            "Runs Python 3 code in a sandbox and returns its exit code, stdout and stderr. Print what you need. "
            f"Limits: {limits.wall_seconds:g} s wall, {limits.cpu_seconds} s CPU, {limits.memory_bytes >> 20} MB memory, "
            "no network, standard library only, a fresh empty working directory."
        ),
        parameters={
            "type": "object",
            "properties": {"code": {"type": "string", "minLength": 1, "maxLength": 100_000}},
            "required": ["code"],
            "additionalProperties": False,
        },
        function=run,
        concurrency=2,
        source="sandbox",
    )


def file_tools(storage: ShardedManager) -> list[Tool]:
    """file_read / file_write over the calling agent's storage records under files/.

    They act for the agent the kernel named in the call (`context.agent_id`), with the cluster credential."""
    from aios.v1 import storage_pb2

    async def write(arguments: dict[str, Any], context: CallContext) -> dict[str, Any]:
        info = await storage.for_agent(context.agent_id).call("Write", storage_pb2.StorageWriteRequest(
            agent_id=context.agent_id, key="files/" + arguments["path"], data=arguments["content"].encode()), 30)
        return {"path": arguments["path"], "bytes": info.size, "version": info.version}

    async def read(arguments: dict[str, Any], context: CallContext) -> dict[str, Any]:
        record = await storage.for_agent(context.agent_id).call("Read", storage_pb2.StorageReadRequest(
            agent_id=context.agent_id, key="files/" + arguments["path"]), 30)
        return {"path": arguments["path"], "content": record.data.decode(errors="replace"), "version": record.info.version}

    path = {"type": "string", "minLength": 1, "maxLength": 200, "description": "e.g. 'notes/plan.md'"}
    return [
        Tool(
            name="file_write",
            description="Writes a text file in your own storage (a new version each time; earlier ones are kept).",
            parameters={"type": "object", "properties": {"path": path, "content": {"type": "string"}},
                        "required": ["path", "content"], "additionalProperties": False},
            function=write,
        ),
        Tool(
            name="file_read",
            description="Reads a text file from your own storage.",
            parameters={"type": "object", "properties": {"path": path}, "required": ["path"], "additionalProperties": False},
            function=read,
        ),
    ]
