"""A manager that is down makes the kernel answer UNAVAILABLE; deadlines hold end to end."""

import time

import grpc
import pytest

import aios
from tests.integration.waiting import wait_until
from aios.v1 import common_pb2


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
    wait_for_free_slots(agent.kernel)


def wait_for_free_slots(kernel: aios.Connection) -> None:
    def free():
        llm = kernel.status().llm
        return llm.slots_busy == 0 and llm.waiting == 0

    wait_until(free, what="all LLM slots free")


def test_an_agent_that_closes_its_stream_frees_its_slot(agent):
    stream = agent.generate("Once upon a time", max_tokens=1000, ignore_eos=True)
    first = next(stream)
    assert first.HasField("token_id")
    stream.close()  # the agent goes away mid-generation
    wait_for_free_slots(agent.kernel)
    record = agent.syscall(first.syscall_id)
    assert record.state == common_pb2.SYSCALL_STATE_FAILED and record.error_code == "CANCELLED"
    assert record.tokens_out < 1000
