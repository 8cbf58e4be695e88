"""Bad input gets the right gRPC status and a clear message; the services keep serving."""

import grpc
import pytest

import aios
from aios.v1 import kernel_pb2, kernel_pb2_grpc

C = grpc.StatusCode
LONG_PROMPT = " ".join(f"word{i}" for i in range(6000))  # far beyond one sequence's 2048 tokens


@pytest.mark.parametrize(
    "call, code, phrase",
    [
        (lambda a: a.storage_write("../escape", "x"), C.INVALID_ARGUMENT, "'..'"),
        (lambda a: a.storage_write("/etc/passwd", "x"), C.INVALID_ARGUMENT, "relative"),
        (lambda a: a.storage_write("a//b", "x"), C.INVALID_ARGUMENT, "empty"),
        (lambda a: a.storage_read("never-written"), C.NOT_FOUND, "no record"),
        (lambda a: a.storage_rollback("never-written", 0), C.INVALID_ARGUMENT, "positive version"),
        (lambda a: a.storage_history("never-written"), C.NOT_FOUND, "no record"),
        (lambda a: a.storage_read("k", owner="agt-someone-else"), C.PERMISSION_DENIED, "grant"),
        (lambda a: a.storage_grant(a.id, "k"), C.INVALID_ARGUMENT, "another agent"),
        (lambda a: a.storage_revoke("agt-x", "k"), C.NOT_FOUND, "no such grant"),
        (lambda a: a.storage_search(" "), C.INVALID_ARGUMENT, "query"),
        (lambda a: a.call_tool("python", code=""), C.INVALID_ARGUMENT, "schema"),
        (lambda a: a.call_tool("teleport"), C.NOT_FOUND, "available tools"),
        (lambda a: a.call_tool("calculator", expression=7), C.INVALID_ARGUMENT, "schema"),
        (lambda a: a.call_tool("calculator", expression="__import__('os')"), C.INVALID_ARGUMENT, "unsupported"),
        (lambda a: a.memory_add(""), C.INVALID_ARGUMENT, "empty"),
        (lambda a: a.memory_get("mem-0123456789abcdef-424242"), C.NOT_FOUND, "does not exist"),
        (lambda a: a.memory_get("mem-424242"), C.INVALID_ARGUMENT, "not a memory entry id"),
        (lambda a: a.memory_add("x" * 70_000), C.RESOURCE_EXHAUSTED, "bytes per entry"),
        (lambda a: a.memory_add("hi", role="wizard"), C.INVALID_ARGUMENT, "role"),
        (lambda a: a.memory_search(""), C.INVALID_ARGUMENT, "query"),
        (lambda a: a.memory_turns(0), C.INVALID_ARGUMENT, "turns"),
        (lambda a: a.complete("hi", history_turns=2), C.INVALID_ARGUMENT, "messages"),
        (lambda a: a.complete(LONG_PROMPT, max_tokens=4), C.RESOURCE_EXHAUSTED, "Shorten the prompt"),
        (lambda a: a.complete("hi", max_tokens=100000), C.RESOURCE_EXHAUSTED, "ask for at most"),
        (lambda a: a.complete("hi", temperature=3.0), C.INVALID_ARGUMENT, "temperature"),
        (lambda a: a.complete(), C.INVALID_ARGUMENT, "prompt or messages"),
        (lambda a: a.complete(messages=[("wizard", "x")]), C.INVALID_ARGUMENT, "role"),
        (lambda a: a.storage_grant("agt-doesnotexist", "k"), C.NOT_FOUND, "no agent"),
        (lambda a: a.storage_grant("anything at all !!", "k"), C.NOT_FOUND, "no agent"),
        (lambda a: a.kernel.register(""), C.INVALID_ARGUMENT, "name"),
        (lambda a: a.syscall("sc-999999"), C.NOT_FOUND, "no syscall"),
    ],
)
def test_bad_call_gets_a_clear_status(agent, call, code, phrase):
    with pytest.raises(aios.SyscallError) as error:
        call(agent)
    assert error.value.code == code
    assert phrase in error.value.message


def test_a_syscall_with_no_call_set_is_refused(kernel, agent):
    stub = kernel_pb2_grpc.KernelStub(kernel.channel)
    with pytest.raises(grpc.RpcError) as error:
        stub.Syscall(kernel_pb2.SyscallRequest(), timeout=10, metadata=(("authorization", f"Bearer {agent.token}"),))
    assert error.value.code() == C.INVALID_ARGUMENT and "memory_add" in error.value.details()


def test_garbage_bytes_instead_of_a_message_are_refused(kernel):
    raw = kernel.channel.unary_unary("/aios.v1.Kernel/Syscall")
    with pytest.raises(grpc.RpcError) as error:
        raw(b"\xff\xff\xff\xff not protobuf", timeout=10)
    assert error.value.code() == C.INVALID_ARGUMENT and "protobuf" in error.value.details()


def test_an_unknown_method_is_unimplemented(kernel):
    raw = kernel.channel.unary_unary("/aios.v1.Kernel/FormatDisk")
    with pytest.raises(grpc.RpcError) as error:
        raw(b"", timeout=10)
    assert error.value.code() == C.UNIMPLEMENTED


def test_another_agents_syscall_record_is_not_found(kernel, agent):
    other = kernel.register("nosy")
    syscall_id = agent.complete("1, 2,", max_tokens=2).syscall_id
    with pytest.raises(aios.SyscallError) as error:
        other.syscall(syscall_id)
    assert error.value.code == C.NOT_FOUND  # not even that it exists
    assert kernel.call("GetSyscall", kernel_pb2.GetSyscallRequest(syscall_id=syscall_id)).agent_id == agent.id


def test_everything_still_works_after_bad_input(kernel, agent):
    for bad in ["../x", "/x", ""]:
        with pytest.raises(aios.SyscallError):
            agent.storage_write(bad, "x")
    assert agent.call_tool("calculator", expression="6*7")["result"] == 42
    assert agent.complete("1, 2, 3,", max_tokens=3).completion_tokens == 3
    status = kernel.status()
    assert all(s.healthy for s in status.services) and status.syscalls_failed > 0
    assert status.llm.slots_busy == 0 and status.llm.slots_parked == 0  # no failure leaked a slot
    assert all(q.running == 0 for q in status.queues if q.resource != 1)
