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
from aios.v1 import common_pb2
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
        # kernel, four managers, redis, gateway, and the LLM core's line of the kernel's routing
        assert status.returncode == 0 and status.stdout.count("SERVING") == 8, status.stdout
        assert "running 0/2, parked 0, dispatched 0" in status.stdout
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
    """`aios down` suspends the agent's generation (its snapshot goes to Redis) and ends the stream with UNAVAILABLE
    and a pushback; `aios up` brings the kernel back on the same port; the SDK asks again by itself with the syscall
    id and the tokens it has, and the new kernel continues the generation from its snapshot, under the same
    syscall id, every token once. A crowd of other streams (round robin, more streams than slots: some decoding,
    some parked, some waiting for a first turn when AIOS stops) all come out whole too. (Token identity with a run
    without the restart, decoding alone, is in the next test.)"""
    up_args = ["up", "--detach", "--slots", "2", "--policy", "rr", "--slice-tokens", "16"]
    assert run(up_args, tmp_path).returncode == 0
    try:
        before = json.loads((tmp_path / "endpoints.json").read_text())
        token = run(["agent", "create", "patient"], tmp_path).stdout.strip().splitlines()[-1]
        with aios.connect(home=tmp_path, token=token) as connection:
            agent = connection.agent()
            prompt, tokens = "Write a long story about a lighthouse keeper.", 300
            chunks: list = []

            def read() -> None:
                chunks.extend(agent.generate(prompt, max_tokens=tokens, ignore_eos=True, timeout=600))

            reader = threading.Thread(target=read)
            reader.start()
            wait_until(lambda: len(chunks) >= 10, within_s=60, what="the stream under way")
            crowd: list[list] = [[] for _ in range(3)]

            def read_crowd(i: int) -> None:
                crowd[i].extend(agent.generate(f"List {i + 2} facts about owls.", max_tokens=60, ignore_eos=True,
                                               timeout=600))

            readers = [threading.Thread(target=read_crowd, args=(i,)) for i in range(3)]
            for thread in readers:
                thread.start()
            wait_until(lambda: sum(map(len, crowd)) >= 10, within_s=60, what="the crowd under way")
            assert run(["down"], tmp_path).returncode == 0
            assert len(chunks) < tokens  # suspended mid-stream, not run to its end during the stop
            up = run(up_args, tmp_path)
            assert up.returncode == 0, up.stdout + up.stderr
            for thread in [reader, *readers]:
                thread.join(timeout=300)
                assert not thread.is_alive()
            for got in crowd:
                assert [c.completion_tokens for c in got if c.HasField("token_id")] == list(range(1, 61))
            after = json.loads((tmp_path / "endpoints.json").read_text())
            assert after["kernel"] == before["kernel"]  # the same address: the SDK's channel finds it again
            assert [c.completion_tokens for c in chunks if c.HasField("token_id")] == list(range(1, tokens + 1))
            [syscall_id] = list(dict.fromkeys(c.syscall_id for c in chunks))  # one syscall across the restart
            record = agent.syscall(syscall_id)
            assert (record.recoveries, record.tokens_out) == (1, tokens)
            assert record.state == common_pb2.SYSCALL_STATE_DONE
        with aios.connect(home=tmp_path) as operator:
            assert operator.status().llm.snapshots_restored >= 1  # from its snapshot, not rebuilt by replay
    finally:
        run(["down"], tmp_path)


def test_a_suspended_generation_continues_for_its_agent_only_token_identical(tmp_path):
    """The wire contract under the SDK, as an agent in another language sees it: the syscall id comes first, in
    the stream's initial metadata; `aios down` ends the stream with UNAVAILABLE, a pushback and a message saying
    AIOS is stopping; after `aios up`, another agent naming the suspended syscall id gets a generation of its own
    (a new id, nothing of the victim's), and the owner gets the rest of its tokens under its syscall id: with the
    ones before the stop, the same as a run without the restart (seeded sampling, decoding alone)."""
    from aios.v1 import kernel_pb2, kernel_pb2_grpc

    assert run(["up", "--detach", "--slots", "2"], tmp_path).returncode == 0
    try:
        victim = run(["agent", "create", "victim"], tmp_path).stdout.strip().splitlines()[-1]
        thief = run(["agent", "create", "thief"], tmp_path).stdout.strip().splitlines()[-1]
        address = json.loads((tmp_path / "endpoints.json").read_text())["kernel"]
        prompt, tokens = "Write a long story about a secret recipe.", 200
        request = kernel_pb2.KernelGenerateRequest(
            prompt=prompt, sampling=common_pb2.SamplingParams(max_tokens=tokens, ignore_eos=True, seed=7,
                                                              temperature=0.8, top_k=40))
        with aios.connect(home=tmp_path, token=victim) as connection:
            expected = [c.token_id for c in connection.agent().generate(
                prompt, max_tokens=tokens, ignore_eos=True, seed=7, temperature=0.8, top_k=40) if c.HasField("token_id")]
        with grpc.insecure_channel(address) as channel:
            stream = kernel_pb2_grpc.KernelStub(channel).Generate(
                request, metadata=(("authorization", f"Bearer {victim}"),), timeout=300)
            syscall_id = dict(stream.initial_metadata())["aios-syscall-id"]
            received: list[int] = []
            with pytest.raises(grpc.RpcError) as cut:
                for chunk in stream:
                    assert chunk.syscall_id == syscall_id
                    received.append(chunk.token_id)
                    if len(received) == 10:
                        down = subprocess.Popen(AIOS + ["down"], env=env(tmp_path))
        assert down.wait(timeout=180) == 0
        assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "stopping" in cut.value.details()
        assert int(dict(cut.value.trailing_metadata())["grpc-retry-pushback-ms"]) > 0  # ask again, later
        assert 10 <= len(received) < tokens
        assert run(["up", "--detach", "--slots", "2"], tmp_path).returncode == 0
        with grpc.insecure_channel(address) as channel:
            kernel = kernel_pb2_grpc.KernelStub(channel)
            attack = kernel_pb2.KernelGenerateRequest(
                prompt="Say hello.", sampling=common_pb2.SamplingParams(max_tokens=4, ignore_eos=True, seed=1),
                resume_syscall_id=syscall_id)
            stolen = list(kernel.Generate(attack, metadata=(("authorization", f"Bearer {thief}"),), timeout=120))
            assert syscall_id not in {c.syscall_id for c in stolen}  # a syscall of its own
            assert [c.token_id for c in stolen if c.HasField("token_id")] != expected[len(received):][:4]
            request.resume_syscall_id = syscall_id
            request.received_token_ids.extend(received)
            rest = list(kernel.Generate(request, metadata=(("authorization", f"Bearer {victim}"),), timeout=300))
        assert {c.syscall_id for c in rest} == {syscall_id}
        assert [c.completion_tokens for c in rest if c.HasField("token_id")] == list(
            range(len(received) + 1, tokens + 1))
        assert received + [c.token_id for c in rest if c.HasField("token_id")] == expected
    finally:
        run(["down"], tmp_path)
