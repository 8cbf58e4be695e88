"""Bad input gets the right gRPC status and a clear message; the services keep serving."""

import json

import grpc
import pytest

import aios
from aios.v1 import kernel_pb2, kernel_pb2_grpc, tools_pb2

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


@pytest.mark.parametrize(
    "call, code, phrase",
    [
        (lambda a: a.storage_read("k", version=2**63), C.INVALID_ARGUMENT, "2^63"),
        (lambda a: a.storage_rollback("k", 2**64 - 1), C.INVALID_ARGUMENT, "positive version"),
        (lambda a: a.call_tool("calculator", expression="[" * 100_000), C.INVALID_ARGUMENT, "longer than 500"),
        (lambda a: a.call_tool("calculator", expression="(10**300)**10000"), C.INVALID_ARGUMENT, "too large"),
        (lambda a: a.call_tool("calculator", expression="1e308*10"), C.INVALID_ARGUMENT, "finite"),
        (lambda a: a.call_tool("calculator", expression="(-8)**0.5"), C.INVALID_ARGUMENT, "finite"),
        (lambda a: a.storage_write("notes/\u202etxt.exe", "x"), C.INVALID_ARGUMENT, "bidi"),
        (lambda a: a.storage_write("notes/a\u200bb", "x"), C.INVALID_ARGUMENT, "zero-width"),
        (lambda a: a.storage_write("notes/   ", "x"), C.INVALID_ARGUMENT, "whitespace"),
        (lambda a: a.storage_write("cafe\u0301", "x"), C.INVALID_ARGUMENT, "NFC"),
    ],
)
def test_inputs_that_used_to_get_the_wrong_status(agent, call, code, phrase):
    with pytest.raises(aios.SyscallError) as error:
        call(agent)
    assert error.value.code == code and phrase in error.value.message, error.value.message


def test_deeply_nested_tool_arguments_and_huge_schema_errors_are_refused_briefly(kernel, agent):
    stub = kernel_pb2_grpc.KernelStub(kernel.channel)
    metadata = (("authorization", f"Bearer {agent.token}"),)
    nested = '{"expression": ' + "[" * 50_000 + "]" * 50_000 + "}"
    huge = '{"expression": ' + json.dumps(["x" * 1000] * 3000) + "}"  # 3 MB that the schema refuses
    for arguments in (nested, huge):
        request = kernel_pb2.SyscallRequest(tool_call=tools_pb2.CallToolRequest(name="calculator", arguments_json=arguments))
        with pytest.raises(grpc.RpcError) as error:
            stub.Syscall(request, metadata=metadata, timeout=30)
        assert error.value.code() == C.INVALID_ARGUMENT and len(error.value.details()) < 1000
    assert agent.call_tool("calculator", expression="2**10")["result"] == 1024


def test_memory_takes_the_roles_its_proto_documents(agent):
    for role in ("", "system", "user", "assistant", "tool"):
        assert agent.memory_add(f"a {role or 'note'}", role=role).role == role
