"""Preemption through the kernel: policies context-switch generations on a one-slot LLM core.

With one slot every generation decodes alone, so a preempted and resumed
generation must give exactly the tokens it gives when it runs uninterrupted.
The prefix cache is off here so that prefill is identical on both sides.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest

import aios
from aios.v1 import common_pb2
from deploy.cluster import Cluster, ClusterConfig
from tests.integration.waiting import wait_until

PROMPTS = [
    "Question: What makes a good night's sleep?\nAnswer:",
    "Question: How do volcanoes form?\nAnswer:",
    "Question: Explain compound interest with an example.\nAnswer:",
]
TOKENS = 40


@pytest.fixture(scope="module")
def rr_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One decoding slot and two resident sequences: three agents force swaps through Redis."""
    config = ClusterConfig(
        home=tmp_path_factory.mktemp("aios-rr"),
        slots=1,
        policy="rr",
        slice_tokens=8,
        extra_args={"llm_core": ["--no-prefix-cache"]},
    )
    with Cluster(config) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def kernel(rr_cluster: Cluster) -> Iterator[aios.Connection]:
    with rr_cluster.connect() as connection:
        yield connection


def stream_tokens(agent: aios.Agent, prompt: str) -> tuple[list[int], list[int], str]:
    """Token ids, the completion counters as the agent saw them, and the syscall id."""
    tokens, counters, syscall_id = [], [], ""
    for chunk in agent.generate(prompt, max_tokens=TOKENS, ignore_eos=True, timeout=120):
        if chunk.HasField("token_id"):
            tokens.append(chunk.token_id)
            counters.append(chunk.completion_tokens)
        syscall_id = chunk.syscall_id
    return tokens, counters, syscall_id


def test_round_robin_switches_generations_and_each_agent_sees_one_uninterrupted_stream(kernel):
    agents = [kernel.register(f"rr-{i}") for i in range(3)]
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(stream_tokens, agents, PROMPTS))
    status = kernel.status()
    alone = [stream_tokens(agent, prompt)[0] for agent, prompt in zip(agents, PROMPTS)]  # one at a time: no preemption

    for (tokens, counters, syscall_id), expected, agent in zip(results, alone, agents):
        assert counters == list(range(1, TOKENS + 1))  # no gap, no repeat across the switches
        assert tokens == expected
        record = agent.syscall(syscall_id)
        assert record.preemptions >= 1 and record.state == common_pb2.SYSCALL_STATE_DONE
        assert record.tokens_out == TOKENS and record.tokens_in > 0
        assert record.preempted_seconds > 0 and record.running_seconds > 0 and record.queued_seconds >= 0
    llm = status.llm
    assert llm.preemptions >= 6 and llm.snapshots_saved >= 1 and llm.snapshots_restored >= 1  # 3 agents, 2 resident
    [queue] = [q for q in status.queues if q.resource == common_pb2.RESOURCE_LLM]
    assert queue.policy == "rr" and queue.preemptions >= 6
    assert llm.slots_busy == 0 and llm.slots_parked == 0


def test_a_client_that_leaves_while_preempted_gets_its_slot_discarded(kernel):
    patient, leaving = kernel.register("patient"), kernel.register("leaving")
    stream = leaving.generate(PROMPTS[0], max_tokens=200, ignore_eos=True, timeout=120)
    first = next(stream)
    done = threading.Event()

    def run_patient() -> None:
        stream_tokens(patient, PROMPTS[1])
        done.set()

    worker = threading.Thread(target=run_patient)
    worker.start()

    def preempted() -> bool:  # watched, not read between tokens: a check after each token can miss every switch-out
        return leaving.syscall(first.syscall_id).state == common_pb2.SYSCALL_STATE_PREEMPTED

    wait_until(preempted, within_s=30, what="the leaving agent switched out by the round robin")
    stream.close()  # the agent goes away while switched out (its unread tokens wait in gRPC's buffers)
    worker.join(timeout=60)
    assert done.is_set()
    def no_slot_held() -> bool:
        llm = kernel.status().llm
        return llm.slots_parked == 0 and llm.slots_busy == 0

    wait_until(no_slot_held, what="the preempted sequence discarded")
    assert leaving.syscall(first.syscall_id).state == common_pb2.SYSCALL_STATE_FAILED


def test_a_high_priority_agent_preempts_a_running_low_priority_one(rr_cluster: Cluster, tmp_path: Path):
    address = rr_cluster.add_replica("kernel_priority", "kernel", ["--policy", "priority"])
    try:
        with aios.connect(address, token=rr_cluster.operator_token) as prio_kernel:
            low, high = prio_kernel.register("low", priority=0), prio_kernel.register("urgent", priority=9)
            finished: dict[str, float] = {}
            stream = low.generate(PROMPTS[2], max_tokens=120, ignore_eos=True, timeout=120)
            first = next(stream)

            def run_high() -> None:
                high.complete(PROMPTS[0], max_tokens=16, ignore_eos=True, timeout=120)
                finished["high"] = time.monotonic()

            worker = threading.Thread(target=run_high)
            worker.start()
            for _ in stream:
                pass
            finished["low"] = time.monotonic()
            worker.join(timeout=60)
            assert finished["high"] < finished["low"]
            assert low.syscall(first.syscall_id).preemptions >= 1
            [queue] = [q for q in prio_kernel.status().queues if q.resource == common_pb2.RESOURCE_LLM]
            assert queue.policy == "priority"
    finally:
        rr_cluster.stop_service("kernel_priority")


def test_registration_refuses_out_of_range_priority_and_weight(kernel):
    for kwargs in ({"priority": 11}, {"weight": -1.0}, {"weight": 1000.0}):
        with pytest.raises(aios.SyscallError) as refused:
            kernel.register("bad", **kwargs)
        assert refused.value.code.name == "INVALID_ARGUMENT"
