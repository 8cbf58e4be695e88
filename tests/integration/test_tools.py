"""The tool manager behind the kernel: per-tool queues, the sandbox under attack, MCP, files, OpenAI format."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Iterator

import grpc
import pytest

import aios
from deploy.cluster import Cluster, ClusterConfig


@pytest.fixture(scope="module")
def with_mcp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    config = ClusterConfig(
        home=tmp_path_factory.mktemp("aios-tools"),
        slots=2,
        extra_args={"tools": ["--mcp", f"words={sys.executable} -m services.tools.example_mcp_server",
                              "--sandbox-wall-seconds", "4", "--sandbox-cpu-seconds", "2", "--mcp-timeout-seconds", "2"]},
    )
    with Cluster(config) as running:
        yield running


@pytest.fixture(scope="module")
def kernel(with_mcp: Cluster) -> Iterator[aios.Connection]:
    with with_mcp.connect() as connection:
        yield connection


def spec(agent: aios.Agent, name: str):
    return next(t for t in agent.tools() if t.name == name)


def test_sixteen_callers_of_a_two_at_a_time_tool_are_queued_not_refused(kernel):
    agents = [kernel.register(f"caller-{i}") for i in range(16)]
    assert spec(agents[0], "python").concurrency == 2
    results: dict[int, dict] = {}

    def call(i: int) -> None:
        results[i] = agents[i].call_tool("python", code=f"import time; time.sleep(0.3); print({i})")

    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {i: r["stdout"] for i, r in results.items()} == {i: f"{i}\n" for i in range(16)}
    python = spec(agents[0], "python")
    assert (python.peak_running, python.refused) == (2, 0)  # the limit held, and no call was turned away
    [queue] = [q for q in kernel.status().queues if q.name == "python"]
    assert queue.capacity == 2 and queue.completed >= 16


@pytest.mark.parametrize(
    "code, expected",
    [
        ("while True: pass", grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("import time; time.sleep(60)", grpc.StatusCode.DEADLINE_EXCEEDED),
        ("x = bytearray(8 << 30)", grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("import os\nwhile True:\n    os.fork()", None),  # process limit or wall time, whichever first
    ],
    ids=["infinite-loop", "sleeper", "memory-hog", "fork-bomb"],
)
def test_runaway_code_is_contained_and_the_tool_service_keeps_serving(kernel, code, expected):
    agent = kernel.register("attacker")
    with pytest.raises(aios.SyscallError) as error:
        agent.call_tool("python", code=code)
    if expected is None:
        assert error.value.code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED)
    else:
        assert error.value.code == expected
    if error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED:  # the code's fault, said so, not the service's
        assert "your code ran past its 4 s wall-time limit" in error.value.message, error.value.message
    assert agent.call_tool("python", code="print(6 * 7)")["stdout"] == "42\n"


def test_the_sandbox_reports_what_it_isolates(kernel):
    isolation = kernel.register("auditor").sandbox_isolation()
    assert isolation["network"] and isolation["clean_environment"] and isolation["own_uid"]


def test_an_mcp_servers_tool_is_called_through_the_kernel(kernel):
    agent = kernel.register("mcp-user")
    assert spec(agent, "words__word_count").source == "mcp:words"
    assert agent.call_tool("words__word_count", text="an operating system for agents") == {"words": 5, "characters": 30}
    assert agent.call_tool("words__reverse_words", text="one two three") == {"result": "three two one"}
    with pytest.raises(aios.SyscallError) as error:
        agent.call_tool("words__word_count", text=5)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_file_tools_read_and_write_the_callers_own_storage(kernel):
    alice, bob = kernel.register("alice"), kernel.register("bob")
    assert alice.call_tool("file_write", path="notes/todo.md", content="buy milk")["version"] == 1
    assert alice.call_tool("file_read", path="notes/todo.md")["content"] == "buy milk"
    assert alice.storage_read("files/notes/todo.md") == b"buy milk"
    with pytest.raises(aios.SyscallError) as error:
        bob.call_tool("file_read", path="notes/todo.md")
    assert error.value.code == grpc.StatusCode.NOT_FOUND


def test_tools_come_in_openai_function_calling_format(kernel):
    tools = {t["function"]["name"]: t for t in kernel.register("planner").tools_openai()}
    assert {"calculator", "clock", "python", "file_read", "file_write", "words__word_count"} <= set(tools)
    calculator = tools["calculator"]
    assert calculator["type"] == "function"
    assert calculator["function"]["parameters"]["required"] == ["expression"]


def test_an_mcp_call_that_hangs_gets_deadline_exceeded_naming_the_server(kernel):
    agent = kernel.register("patient")
    assert "waited 0.1 s" in str(agent.call_tool("words__pause", seconds=0.1))
    with pytest.raises(aios.SyscallError) as error:
        agent.call_tool("words__pause", seconds=10)
    assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and "'words' did not answer" in error.value.message
    assert agent.call_tool("words__word_count", text="still here")["words"] == 2


def test_the_operator_mounts_and_unmounts_an_mcp_server_while_aios_runs(with_mcp, kernel):
    agent = kernel.register("mcp-user")
    command = [sys.executable, "-m", "services.tools.example_mcp_server"]
    with aios.connect(with_mcp.kernel_address, token=agent.token) as as_agent:
        with pytest.raises(aios.SyscallError) as denied:
            as_agent.mount_tool("mine", command)
        assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED
    names = kernel.mount_tool("extra", command)
    assert "extra__word_count" in names
    assert agent.call_tool("extra__word_count", text="one two three")["words"] == 3
    with pytest.raises(aios.SyscallError) as twice:
        kernel.mount_tool("extra", command)
    assert twice.value.code == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(aios.SyscallError) as broken:
        kernel.mount_tool("broken", ["/nonexistent/mcp-server"])
    assert broken.value.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAVAILABLE)
    assert sorted(kernel.unmount_tool("extra")) == sorted(names)
    with pytest.raises(aios.SyscallError) as gone:
        agent.call_tool("extra__word_count", text="x")
    assert gone.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(aios.SyscallError) as missing:
        kernel.unmount_tool("extra")
    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    assert agent.call_tool("words__word_count", text="still mounted")["words"] == 2  # the --mcp one is untouched


def test_a_hostile_mcp_server_is_confined_to_its_sandbox(with_mcp, kernel):
    """Mounted by an operator who trusts it too much (it may even read the AIOS home's parent), the server
    still cannot read secrets, data or other processes, write outside its own /tmp, or reach the kernel."""
    home = with_mcp.config.home.resolve()
    server = str(Path(__file__).with_name("hostile_mcp_server.py"))
    host, port = with_mcp.kernel_address.rsplit(":", 1)
    probe = {"paths": [str(home / "secrets" / "cluster.secret"), str(home / "operator.token"),
                       str(home / "endpoints.json"), "/etc/shadow", "/etc/passwd", "/root/.bash_history"],
             "directories": [str(home), str(home.parent), "/root", str(Path(server).parent)],
             "host": host, "port": int(port)}
    agent = kernel.register("mcp-prober")
    kernel.mount_tool("hostile", [sys.executable, server], read_only=[str(home.parent)])
    try:
        seen = json.loads(agent.call_tool("hostile__probe", **probe)["text"])
    finally:
        kernel.unmount_tool("hostile")
    assert seen["readable"] == []
    assert seen["listed"][str(home)] == []  # covered by an empty tmpfs, though its parent is bound
    assert seen["listed"]["/root"] is None or ".bash_history" not in seen["listed"]["/root"]
    assert seen["writable"] == []  # every bound path is read-only
    assert not (Path(server).parent / "planted-by-mcp").exists()
    assert seen["connected"] is False  # no network: not even the kernel on loopback
    assert len(seen["pids"]) < 5 and seen["uid"] == 65534  # its own pid namespace, nobody inside it

    kernel.mount_tool("hostile_net", [sys.executable, server], network=True)
    try:  # the operator allowed this one the network
        assert json.loads(agent.call_tool("hostile_net__probe", **probe)["text"])["connected"] is True
    finally:
        kernel.unmount_tool("hostile_net")


def test_the_tool_manager_reports_mcp_servers_confined(kernel):
    assert kernel.register("curious").sandbox_isolation()["mcp_servers_confined"] is True
