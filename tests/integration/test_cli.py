"""`aios up`, `aios status`, `aios agent` and `aios down` as a user runs them."""

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest

import aios
from deploy.cluster import process_alive
from tests.integration.tls import self_signed
from tests.integration.waiting import wait_until

AIOS = [sys.executable, "-m", "deploy.cli"]


def env(home: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("AIOS_TOKEN", "AIOS_KERNEL", "AIOS_ROOT_CERTIFICATES")}
    return dict(clean, AIOS_HOME=str(home))


def run(args: list[str], home: Path) -> subprocess.CompletedProcess:
    return subprocess.run(AIOS + args, env=env(home), capture_output=True, text=True, timeout=180)


def supervised(home: Path, name: str, restarts: int) -> dict | None:
    """The supervisor's record of `name` in endpoints.json once it is running after `restarts` restarts."""
    record = json.loads((home / "endpoints.json").read_text()).get("supervision", {}).get(name, {})
    return record if record.get("restarts") == restarts and record.get("state") == "running" else None


def test_up_status_down_leaves_no_process_behind(tmp_path):
    up = run(["up", "--detach", "--slots", "2"], tmp_path)
    assert up.returncode == 0, up.stdout + up.stderr
    for name in ("redis", "llm_core", "memory", "storage", "tools", "kernel", "gateway"):
        assert f"started {name}" in up.stdout
    assert "operator token in" in up.stdout
    state = json.loads((tmp_path / "endpoints.json").read_text())
    try:
        assert run(["up", "--detach"], tmp_path).returncode == 1  # refuses a second system in the same home
        with aios.connect(home=tmp_path) as kernel:
            assert kernel.address == state["kernel"]
            assert kernel.register("cli").call_tool("calculator", expression="3*3")["result"] == 9
        status = run(["status"], tmp_path)
        assert status.returncode == 0 and status.stdout.count("SERVING") == 7, status.stdout
        assert "slots 0/2 decoding" in status.stdout and "snapshots in redis 0" in status.stdout
        assert "append-only file, fsync every second" in status.stdout
        mounted = run(["tool", "mount", "--network", "--read-only", str(tmp_path), "words", "--",
                       sys.executable, "-m", "services.tools.example_mcp_server"], tmp_path)
        assert mounted.returncode == 0 and "words__word_count" in mounted.stdout, mounted.stdout + mounted.stderr
        unmounted = run(["tool", "unmount", "words"], tmp_path)
        assert unmounted.returncode == 0 and "words__word_count" in unmounted.stdout

        # kill -9 of a manager: the detached `aios up` restarts it on its address, says so, and the kernel
        # reconnects by itself.
        os.kill(state["pids"]["memory"], signal.SIGKILL)
        restarted = wait_until(lambda: supervised(tmp_path, "memory", restarts=1), within_s=60,
                               what="memory restarted by the supervisor")
        assert restarted["pid"] != state["pids"]["memory"] and restarted["last_exit"] == "killed by SIGKILL"
        with aios.connect(home=tmp_path) as kernel:
            note = kernel.register("after-restart").memory_add("written after the restart")
            assert note.id
        status = run(["status"], tmp_path).stdout
        assert "memory    running" in status and "restarts 1" in status and "killed by SIGKILL" in status, status
        assert "restarted memory at" in (tmp_path / "logs" / "supervisor.log").read_text()
        after = json.loads((tmp_path / "endpoints.json").read_text())
    finally:
        down = run(["down"], tmp_path)
    assert down.returncode == 0
    assert not (tmp_path / "endpoints.json").exists()
    assert not [name for name, pid in {**state["pids"], **after["pids"]}.items() if process_alive(pid)]
    assert not process_alive(after["supervisor"])
    assert run(["status"], tmp_path).returncode == 1


def test_agents_tokens_and_data_survive_down_and_up_and_a_foreground_up_exits_on_down(tmp_path):
    """First over TLS and detached, then in the foreground on the same home: the agent made with `aios agent
    create` keeps its token, grants and data; `aios down` from another shell ends the foreground `aios up` too."""
    cert, key = self_signed(tmp_path)
    home = tmp_path / "home"
    up = run(["up", "--detach", "--slots", "2", "--tls-cert", str(cert), "--tls-key", str(key)], home)
    assert up.returncode == 0 and "with TLS" in up.stdout, up.stdout + up.stderr
    try:
        created = run(["agent", "create", "worker", "--priority", "3", "--tokens-per-minute", "100000"], home)
        assert created.returncode == 0, created.stdout + created.stderr
        token = created.stdout.strip().splitlines()[-1]
        helper = run(["agent", "create", "helper"], home).stdout.strip().splitlines()[-1]
        with aios.connect(home=home, token=token) as remote:  # endpoints.json names the certificate
            worker = remote.agent()
            worker.storage_write("plan.md", "survive the restart")
            note = worker.memory_add("remember me")
            helper_id = remote.agent(helper).id
            worker.storage_grant(helper_id, "plan.md")
        listed = run(["agent", "ls"], home).stdout
        assert "worker" in listed and "helper" in listed and token[:13] in listed and token not in listed
    finally:
        assert run(["down"], home).returncode == 0

    foreground = subprocess.Popen(AIOS + ["up", "--slots", "2"], env=env(home), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: (home / "endpoints.json").exists() or foreground.poll() is not None, within_s=180,
                   what="the foreground aios up serving")
        assert foreground.poll() is None
        state = json.loads((home / "endpoints.json").read_text())
        assert state["supervisor"] == foreground.pid and "tls_cert" not in state
        with aios.connect(home=home, token=token) as local:
            worker = local.agent()
            assert worker.storage_read("plan.md") == b"survive the restart"
            assert worker.memory_get(note.id).text == "remember me"
            assert worker.storage_read("plan.md") == local.agent(helper).storage_read("plan.md", owner=worker.id)
        revoked = run(["agent", "revoke", worker.id], home)
        assert revoked.returncode == 0 and "revoked" in revoked.stdout
        with aios.connect(home=home, token=token) as local:
            with pytest.raises(aios.SyscallError) as refused:
                local.agent()
            assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
        down = run(["down"], home)
        assert down.returncode == 0
        assert foreground.wait(timeout=60) == 0  # the foreground `aios up` ended with its services
    finally:
        if foreground.poll() is None:  # a failed check above: still stop what it started
            run(["down"], home)
            foreground.wait(timeout=60)
    output = foreground.stdout.read()
    assert "stopping" in output, output
    assert not [name for name, pid in state["pids"].items() if process_alive(pid)]


def test_a_generation_streaming_through_aios_down_and_up_comes_out_whole_and_identical(tmp_path):
    """`aios down` ends the agent's stream; `aios up` brings the kernel back on the same port; the SDK continues
    the stream by itself (it sends the tokens it has, the kernel replays them) and the agent gets every token once,
    the same ones as a run without the restart (decoding alone, greedy)."""
    assert run(["up", "--detach", "--slots", "2"], tmp_path).returncode == 0
    try:
        before = json.loads((tmp_path / "endpoints.json").read_text())
        token = run(["agent", "create", "patient"], tmp_path).stdout.strip().splitlines()[-1]
        with aios.connect(home=tmp_path, token=token) as connection:
            agent = connection.agent()
            prompt, tokens = "Write a long story about a lighthouse keeper.", 300
            expected = [c.token_id for c in agent.generate(prompt, max_tokens=tokens, ignore_eos=True)
                        if c.HasField("token_id")]
            chunks: list = []

            def read() -> None:
                chunks.extend(agent.generate(prompt, max_tokens=tokens, ignore_eos=True, timeout=600))

            reader = threading.Thread(target=read)
            reader.start()
            wait_until(lambda: len(chunks) >= 10, within_s=60, what="the stream under way")
            assert run(["down"], tmp_path).returncode == 0
            up = run(["up", "--detach", "--slots", "2"], tmp_path)
            assert up.returncode == 0, up.stdout + up.stderr
            reader.join(timeout=300)
            assert not reader.is_alive()
            after = json.loads((tmp_path / "endpoints.json").read_text())
            assert after["kernel"] == before["kernel"]  # the same address: the SDK's channel finds it again
            ids = list(dict.fromkeys(c.syscall_id for c in chunks))
            assert len(ids) == 2  # cut by `aios down`, continued as a new syscall after `aios up`
            assert [c.completion_tokens for c in chunks if c.HasField("token_id")] == list(range(1, tokens + 1))
            assert [c.token_id for c in chunks if c.HasField("token_id")] == expected
            assert agent.syscall(ids[1]).recoveries == 1
    finally:
        run(["down"], tmp_path)
