"""Two LLM core processes behind one kernel: routing, migration, drain, a core's death.

Real processes, real Redis, the real model: the cores run one llama.cpp thread each on this 2-CPU machine. The
contract for a migration is the one of a context switch: a generation decoding alone that moves to the other core
mid-way yields exactly the tokens of a run that never moved (greedy and seeded), and under load no token is lost
or repeated.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter
from typing import Iterator

import pytest

import aios
from aios.v1 import common_pb2, kernel_pb2
from deploy.cluster import Cluster, ClusterConfig
from tests.integration.streams import stream_in_thread, token_ids
from tests.integration.waiting import wait_until

PROMPT = "Question: Explain how a lighthouse keeper's day went in the nineteenth century.\nAnswer:"
SLOTS = 4


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    config = ClusterConfig(home=tmp_path_factory.mktemp("aios-cores"), slots=SLOTS, llm_cores=2, llm_threads=1)
    with Cluster(config) as running:
        yield running


@pytest.fixture(scope="module")
def kernel(cluster: Cluster) -> Iterator[aios.Connection]:
    with cluster.connect() as connection:
        yield connection


def cores(kernel: aios.Connection) -> dict[str, kernel_pb2.LLMCoreStatus]:
    return {core.name: core for core in kernel.status().cores}


def core_of(kernel: aios.Connection, syscall_id: str) -> str:
    return kernel.call("GetSyscall", kernel_pb2.GetSyscallRequest(syscall_id=syscall_id)).core


def stream(agent: aios.Agent, chunks: list, tokens: int = 48, **sampling) -> threading.Thread:
    return stream_in_thread(agent, chunks, PROMPT, tokens, **sampling)


def test_routing_prefers_the_agents_core_then_its_prompts_core_then_the_least_loaded(kernel):
    system = [("system", "You are a terse assistant for sailors.")]
    other_system = [("system", "You answer questions about mountain geology only.")]
    question = [("user", "Name a knot.")]
    before = {name: core.dispatched for name, core in cores(kernel).items()}
    first = kernel.register("route-first")
    home = core_of(kernel, first.complete(messages=system + question, max_tokens=4).syscall_id)
    away = next(name for name in before if name != home)
    # Its own conversation's KV is on `home`: it goes there again, though `home` has served more than `away`.
    assert core_of(kernel, first.complete(messages=system + question, max_tokens=4).syscall_id) == home
    # A new agent with the same system prompt: the core that has that prefix.
    newcomer = kernel.register("route-same-prompt")
    assert core_of(kernel, newcomer.complete(messages=system + question, max_tokens=4).syscall_id) == home
    # Nothing to reuse anywhere: the core that has had less work.
    stranger = kernel.register("route-other-prompt")
    dispatched = {name: core.dispatched for name, core in cores(kernel).items()}
    assert dispatched[home] > dispatched[away]
    assert core_of(kernel, stranger.complete(messages=other_system + question, max_tokens=4).syscall_id) == away


def test_generations_fill_both_cores_when_they_arrive_together(kernel):
    agents = [kernel.register(f"spread-{i}") for i in range(2 * SLOTS)]
    outputs: list[list] = [[] for _ in agents]
    readers = [stream(agent, out, tokens=32) for agent, out in zip(agents, outputs)]
    for reader in readers:
        reader.join(timeout=300)
    assert all(len(token_ids(out)) == 32 for out in outputs)
    placed = Counter(core_of(kernel, out[-1].syscall_id) for out in outputs)
    assert sorted(placed.values()) == [SLOTS, SLOTS]  # each core took as many as it has slots, none waited


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "top_k": 40, "seed": 11}], ids=["greedy", "seeded"])
def test_a_generation_moved_by_a_drain_continues_token_identical_on_the_other_core(kernel, sampling):
    agent = kernel.register("migrant")
    expected = token_ids(list(agent.generate(PROMPT, max_tokens=48, ignore_eos=True, **sampling)))
    chunks: list = []
    reader = stream(agent, chunks, **sampling)
    wait_until(lambda: len(chunks) >= 12, within_s=120, what="12 tokens streamed")
    syscall_id = chunks[0].syscall_id
    source = core_of(kernel, syscall_id)
    drained = kernel.drain_core(source)
    try:
        reader.join(timeout=300)
        assert token_ids(chunks) == expected  # moved mid-way, alone on both cores: the same tokens, none twice
        record = kernel.call("GetSyscall", kernel_pb2.GetSyscallRequest(syscall_id=syscall_id))
        assert record.migrations == 1 and record.core != source and record.state == common_pb2.SYSCALL_STATE_DONE
        assert drained.state == kernel_pb2.LLM_CORE_STATE_DRAINING and drained.running == drained.parked == 0
        assert drained.migrated_out >= 1
    finally:
        assert kernel.drain_core(source, undo=True).state == kernel_pb2.LLM_CORE_STATE_SERVING


def test_draining_a_core_under_load_loses_no_token_and_new_work_avoids_it(kernel):
    agents = [kernel.register(f"load-{i}") for i in range(2 * SLOTS)]
    outputs: list[list] = [[] for _ in agents]
    readers = [stream(agent, out, tokens=64) for agent, out in zip(agents, outputs)]
    wait_until(lambda: all(len(out) >= 4 for out in outputs), within_s=120, what="every stream started")
    on = Counter(core_of(kernel, out[0].syscall_id) for out in outputs)
    source = max(on, key=on.get)
    drained = kernel.drain_core(source)
    try:
        assert drained.running == drained.parked == 0 and drained.state == kernel_pb2.LLM_CORE_STATE_DRAINING
        late = kernel.register("load-late").complete(PROMPT, max_tokens=4)
        assert core_of(kernel, late.syscall_id) != source  # a drained core takes nothing new
        for reader in readers:
            reader.join(timeout=300)
        for out in outputs:
            assert len(token_ids(out)) == 64 and out[-1].finish_reason  # whole: nothing lost, nothing twice
            assert [c.completion_tokens for c in out if c.HasField("token_id")] == list(range(1, 65))
        records = [kernel.call("GetSyscall", kernel_pb2.GetSyscallRequest(syscall_id=out[0].syscall_id))
                   for out in outputs]
        moved = [r for r in records if r.migrations]
        assert len(moved) == on[source] and all(r.core != source for r in records)
        assert all(r.state == common_pb2.SYSCALL_STATE_DONE for r in records)
        assert cores(kernel)[source].migrated_out >= len(moved)
    finally:
        kernel.drain_core(source, undo=True)


def test_a_killed_core_s_generations_finish_on_the_other_and_it_serves_again_once_back(cluster, kernel):
    agents = [kernel.register(f"orphan-{i}") for i in range(SLOTS)]
    outputs: list[list] = [[] for _ in agents]
    readers = [stream(agent, out, tokens=48) for agent, out in zip(agents, outputs)]
    wait_until(lambda: all(len(out) >= 8 for out in outputs), within_s=120, what="every stream started")
    on = Counter(core_of(kernel, out[0].syscall_id) for out in outputs)
    victim = max(on, key=on.get)
    os.kill(cluster.processes[victim].pid, signal.SIGKILL)  # no supervisor here: it stays dead until restarted below
    for reader in readers:
        reader.join(timeout=300)
    for out in outputs:
        assert [c.completion_tokens for c in out if c.HasField("token_id")] == list(range(1, 49))
    records = [kernel.call("GetSyscall", kernel_pb2.GetSyscallRequest(syscall_id=out[0].syscall_id)) for out in outputs]
    assert all(r.state == common_pb2.SYSCALL_STATE_DONE and r.core != victim for r in records)
    assert sum(r.recoveries for r in records) >= on[victim]  # rebuilt on the survivor, without waiting for a restart
    assert cores(kernel)[victim].state == kernel_pb2.LLM_CORE_STATE_DOWN
    cluster.processes[victim].popen.wait()
    cluster.restart_service(victim)
    wait_until(lambda: cores(kernel)[victim].state == kernel_pb2.LLM_CORE_STATE_SERVING, within_s=60,
               what=f"{victim} serving again")


def test_draining_an_unknown_or_the_last_serving_core_is_refused_and_agents_may_not_drain(kernel):
    with pytest.raises(aios.SyscallError) as missing:
        kernel.drain_core("no-such-core")
    assert missing.value.code.name == "NOT_FOUND" and "llm_core_2" in str(missing.value)
    kernel.drain_core("llm_core")
    try:
        with pytest.raises(aios.SyscallError) as last:
            kernel.drain_core("llm_core_2")
        assert last.value.code.name == "FAILED_PRECONDITION" and "only LLM core that serves" in last.value.message
    finally:
        kernel.drain_core("llm_core", undo=True)
    agent = kernel.register("would-be-operator")
    with pytest.raises(aios.SyscallError) as refused:
        kernel.call("DrainCore", kernel_pb2.DrainCoreRequest(core="llm_core"), token=agent.token)
    assert refused.value.code.name == "PERMISSION_DENIED"


def test_a_core_that_dies_while_idle_is_taken_out_before_any_generation_is_sent_to_it(cluster, kernel):
    victim, survivor = "llm_core_2", "llm_core"
    os.kill(cluster.processes[victim].pid, signal.SIGKILL)
    wait_until(lambda: cores(kernel)[victim].state == kernel_pb2.LLM_CORE_STATE_DOWN, within_s=30,
               what=f"{victim} marked down by the kernel's health checks")
    agent = kernel.register("after-idle-death")
    for n in range(3):  # none of them is sent to the dead core first
        record = kernel.call("GetSyscall", kernel_pb2.GetSyscallRequest(
            syscall_id=agent.complete(PROMPT, max_tokens=4).syscall_id))
        assert record.core == survivor and record.recoveries == 0
    cluster.processes[victim].popen.wait()
    cluster.restart_service(victim)
    wait_until(lambda: cores(kernel)[victim].state == kernel_pb2.LLM_CORE_STATE_SERVING, within_s=60,
               what=f"{victim} serving again")
