"""ToolRegistry, the built-in tools and the code sandbox (real child processes)."""

import asyncio
import json
import os
import socket

import pytest

from services.errors import DeadlineExceeded, InvalidArgument, NotFound, ResourceExhausted
from services.tools.builtin import builtin_tools, evaluate
from services.tools.core import CallContext, Tool, ToolRegistry
from services.tools.sandbox import FIRST_UID, UIDS, Sandbox, SandboxLimits

AGENT = CallContext("agt-test")


@pytest.fixture
def registry():
    registry = ToolRegistry()
    for tool in builtin_tools(Sandbox(), storage=None):
        registry.register(tool)
    return registry


def call(registry: ToolRegistry, name: str, arguments: str):
    return asyncio.run(registry.call(name, arguments, AGENT))


@pytest.mark.parametrize(
    "expression, value",
    [("(2+3)*7", 35), ("2**10", 1024), ("7 // 2", 3), ("-3 + 10 % 4", -1), ("sqrt(16) + abs(-2)", 6.0), ("pi", 3.141592653589793)],
)
def test_calculator_evaluates_arithmetic(expression, value):
    assert evaluate(expression) == value


@pytest.mark.parametrize(
    "expression",
    ["__import__('os').system('true')", "open('/etc/passwd')", "x + 1", "1/0", "9**99999", "(lambda: 1)()", "1 +"],
)
def test_calculator_refuses_anything_but_arithmetic(expression):
    with pytest.raises(InvalidArgument):
        evaluate(expression)


def test_registry_validates_arguments_against_the_schema(registry):
    assert call(registry, "calculator", json.dumps({"expression": "1+1"}))["result"] == 2
    with pytest.raises(InvalidArgument, match="required"):
        call(registry, "calculator", "{}")
    with pytest.raises(InvalidArgument, match="Additional properties"):
        call(registry, "calculator", json.dumps({"expression": "1", "mode": "x"}))
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        call(registry, "calculator", "{expression:")
    with pytest.raises(NotFound, match="calculator, clock, python"):
        call(registry, "weather", "{}")


def test_clock_reports_the_requested_timezone(registry):
    result = call(registry, "clock", json.dumps({"timezone": "Asia/Tokyo"}))
    assert result["timezone"] == "Asia/Tokyo" and result["iso"].endswith("+09:00")
    with pytest.raises(InvalidArgument, match="IANA"):
        call(registry, "clock", json.dumps({"timezone": "Mars/Olympus"}))


def test_a_tool_name_can_be_registered_once(registry):
    with pytest.raises(ValueError):
        registry.register(registry.list()[0])


def test_calls_over_a_tools_concurrency_limit_are_refused_not_oversubscribed():
    registry = ToolRegistry()
    release = asyncio.Event()

    async def slow(arguments, context):
        await release.wait()
        return {"ok": True}

    registry.register(Tool("slow", "waits", {"type": "object"}, slow, concurrency=2))

    async def scenario():
        first = [asyncio.create_task(registry.call("slow", "{}", AGENT)) for _ in range(2)]
        while registry.counters["slow"].running < 2:
            await asyncio.sleep(0)  # let both start
        with pytest.raises(ResourceExhausted, match="through the kernel"):
            await registry.call("slow", "{}", AGENT)
        release.set()
        return await asyncio.gather(*first)

    assert asyncio.run(scenario()) == [{"ok": True}, {"ok": True}]
    counters = registry.counters["slow"]
    assert (counters.peak_running, counters.calls, counters.refused, counters.running) == (2, 2, 1, 0)


# ---- the sandbox ------------------------------------------------------------------------

def run(code: str, **limits) -> dict:
    sandbox = Sandbox(SandboxLimits(**{"wall_seconds": 10, "cpu_seconds": 2, "memory_bytes": 256 << 20, **limits}))
    result = asyncio.run(sandbox.run(code))
    return {"exit_code": result.exit_code, "stdout": result.stdout, "stderr": result.stderr}


def test_sandboxed_code_runs_and_reports_output_and_exit_code():
    result = run("import sys; print(sum(range(10))); sys.exit(3)")
    assert result == {"exit_code": 3, "stdout": "45\n", "stderr": ""}


def test_sandboxed_code_sees_no_secrets_a_private_directory_and_another_uid():
    os.environ["AIOS_TEST_SECRET"] = "hunter2"
    try:
        result = run("import os, json; print(json.dumps({'env': dict(os.environ), 'cwd': os.getcwd(), "
                     "'files': os.listdir('.'), 'uid': os.getuid()}))")
    finally:
        del os.environ["AIOS_TEST_SECRET"]
    seen = json.loads(result["stdout"])
    assert set(seen["env"]) <= {"PATH", "HOME", "LANG", "PWD"} and "hunter2" not in result["stdout"]
    assert seen["files"] == [] and seen["cwd"] == "/tmp"  # bubblewrap: a private, empty tmpfs
    assert seen["uid"] == 65534  # nobody, in a user namespace mapped to a uid of the run's own outside


def test_sandboxed_code_has_no_network():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        result = run(f"import socket\ntry:\n socket.create_connection(('127.0.0.1', {port}), timeout=2)\n print('connected')\n"
                     "except OSError as e:\n print('refused', e.errno)")
    finally:
        listener.close()
    assert result["stdout"].startswith("refused")


def test_an_infinite_loop_is_stopped_by_its_cpu_limit():
    with pytest.raises(ResourceExhausted, match="CPU time"):
        run("while True: pass", cpu_seconds=1)


def test_sleeping_past_the_wall_time_limit_is_killed():
    with pytest.raises(DeadlineExceeded, match="wall-time"):
        run("import time; time.sleep(30)", wall_seconds=1)


def test_a_memory_hog_hits_its_memory_limit():
    with pytest.raises(ResourceExhausted, match="memory"):
        run("x = bytearray(1 << 30)")


def test_a_fork_bomb_is_contained_and_leaves_no_process_behind():
    code = "import os\nwhile True:\n    os.fork()"
    with pytest.raises((ResourceExhausted, DeadlineExceeded)):
        run(code, processes=8, wall_seconds=3)
    assert sandbox_processes() == []  # every process of the run's uid was killed


def sandbox_processes() -> list[int]:
    """Pids running as one of the sandbox's uids."""
    pids = []
    for entry in os.scandir("/proc"):
        try:
            uid = entry.name.isdigit() and os.stat(entry.path).st_uid
        except OSError:
            continue
        if uid and FIRST_UID <= uid < FIRST_UID + UIDS:
            pids.append(int(entry.name))
    return pids


def test_flooding_output_is_cut_off():
    with pytest.raises(ResourceExhausted, match="output"):
        run("while True: print('x' * 1000)", output_bytes=10_000)
