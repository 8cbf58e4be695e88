"""An agent in another language: Node.js with the `openai` package (gateway) and with gRPC stubs (kernel)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import grpc
import pytest

import aios

ROOT = Path(__file__).resolve().parents[2]


def test_a_node_agent_streams_calls_tools_and_uses_memory_both_ways(cluster, kernel):
    agent = kernel.register("node-agent")
    env = dict(os.environ, AIOS_OPENAI_BASE_URL=cluster.openai_base_url, AIOS_MODEL=cluster.served_model_name,
               AIOS_KERNEL=cluster.kernel_address, AIOS_TOKEN=agent.token, AIOS_PROTOS=str(ROOT / "protos"))
    run = subprocess.run(["node", str(ROOT / "tests" / "node" / "agent.mjs")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    via_openai, via_grpc = report["openai"], report["grpc"]
    assert via_openai["streamed"] and via_openai["tool"] == "get_weather"
    assert isinstance(via_openai["tool_arguments"]["city"], str) and via_openai["finish_reason"] == "tool_calls"
    assert via_openai["history_prompt_tokens"] > 15  # the remembered turns went into the prompt
    assert via_grpc["tokens"] == 5 and via_grpc["finish_reason"] == "FINISH_REASON_LENGTH"
    assert via_grpc["tool_result"] == 42 and via_grpc["memory"] == "written from Node.js"
    assert via_grpc["refused"] == "UNAUTHENTICATED"
    assert agent.syscall(via_grpc["syscall_id"]).agent_id == agent.id
    assert "My favourite river is the Danube." in [t.text for t in agent.memory_turns(20)]


    # The 16 MB record it wrote: read by ranges with Node's default 4 MB limit, and whole by the Python SDK and
    # by the file_read tool (their channels allow 64 MB).
    big = report["big"]
    assert big == {"size": 16 << 20, "parts": 6, "equal": True, "whole_read": "RESOURCE_EXHAUSTED", "key": "files/big.txt"}
    data = agent.storage_read("files/big.txt")
    assert len(data) == 16 << 20 and data[:4] == bytes(97 + (i * 7) % 26 for i in range(4))
    assert agent.storage_read("files/big.txt", offset=(16 << 20) - 3) == data[-3:]
    assert agent.storage_read("files/big.txt", offset=10, length=5) == data[10:15]
    assert agent.call_tool("file_read", path="big.txt")["content"].encode() == data
    with pytest.raises(aios.SyscallError) as past_end:
        agent.storage_read("files/big.txt", offset=(16 << 20) + 1)
    assert past_end.value.code == grpc.StatusCode.INVALID_ARGUMENT and "past the end" in past_end.value.message
