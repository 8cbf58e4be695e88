"""`aios up --detach`, `aios status` and `aios down` as a user runs them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import aios
from deploy.cluster import process_alive

AIOS = [sys.executable, "-m", "deploy.cli"]


def run(args: list[str], home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, AIOS_HOME=str(home))
    return subprocess.run(AIOS + args, env=env, capture_output=True, text=True, timeout=180)


def test_up_status_down_leaves_no_process_behind(tmp_path):
    up = run(["up", "--detach", "--slots", "2"], tmp_path)
    assert up.returncode == 0, up.stdout + up.stderr
    for name in ("redis", "llm_core", "memory", "storage", "tools", "kernel"):
        assert f"started {name}" in up.stdout
    state = json.loads((tmp_path / "endpoints.json").read_text())
    try:
        assert run(["up", "--detach"], tmp_path).returncode == 1  # refuses a second system in the same home
        with aios.connect(home=tmp_path) as kernel:
            assert kernel.address == state["kernel"]
            assert kernel.register("cli").call_tool("calculator", expression="3*3")["result"] == 9
        status = run(["status"], tmp_path)
        assert status.returncode == 0 and status.stdout.count("SERVING") == 6, status.stdout
        assert "slots 0/2 decoding" in status.stdout and "snapshots in redis 0" in status.stdout
    finally:
        down = run(["down"], tmp_path)
    assert down.returncode == 0
    assert not (tmp_path / "endpoints.json").exists()
    assert not [name for name, pid in state["pids"].items() if process_alive(pid)]
    assert run(["status"], tmp_path).returncode == 1
