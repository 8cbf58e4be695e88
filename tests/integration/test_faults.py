"""A manager that is down makes the kernel answer UNAVAILABLE; deadlines hold end to end."""

import time

import grpc
import pytest

import aios


def test_a_stopped_manager_gives_unavailable_then_recovers(cluster, agent):
    assert agent.call_tool("calculator", expression="1+1")["result"] == 2
    cluster.stop_service("tools")
    try:
        started = time.monotonic()
        with pytest.raises(aios.SyscallError) as error:
            agent.call_tool("calculator", expression="1+1")
        assert error.value.code == grpc.StatusCode.UNAVAILABLE and "tools" in error.value.message
        assert time.monotonic() - started < 10  # fails fast instead of hanging
        assert agent.memory_add("other managers still serve").id
        assert not {s.name: s.healthy for s in agent.kernel.status().services}["tools"]
    finally:
        cluster.restart_service("tools")
    assert agent.call_tool("calculator", expression="2+2")["result"] == 4


def test_a_deadline_shorter_than_the_generation_is_exceeded(agent):
    with pytest.raises(aios.SyscallError) as error:
        agent.complete("Once upon a time", max_tokens=2000, timeout=0.5)
    assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert agent.complete("1, 2, 3,", max_tokens=2).completion_tokens == 2
