"""The memory manager as a real process behind the kernel: paging, kill -9 durability, conversation history."""

from __future__ import annotations

from typing import Iterator

import grpc
import pytest

import aios
from deploy.cluster import Cluster, ClusterConfig
from tests.integration.crash import writes_across_kill_9

BUDGET = 4096  # bytes: a few blocks of 8 entries of ~200 bytes
QUOTA = 400_000  # bytes of entries one agent may keep


@pytest.fixture(scope="module")
def small_memory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    config = ClusterConfig(
        home=tmp_path_factory.mktemp("aios-memory"),
        slots=2,
        extra_args={"memory": ["--ram-budget-bytes", str(BUDGET), "--entries-per-block", "8",
                               "--quota-bytes", str(QUOTA)]},
    )
    with Cluster(config) as running:
        yield running


@pytest.fixture(scope="module")
def kernel(small_memory: Cluster) -> Iterator[aios.Connection]:
    with small_memory.connect() as connection:
        yield connection


def test_an_agents_memory_quota_refuses_more_and_spares_other_agents(kernel):
    hoarder, neighbour = kernel.register("hoarder"), kernel.register("neighbour")
    big = "x" * 60_000
    ids = [hoarder.memory_add(big).id for _ in range(QUOTA // 60_000)]
    with pytest.raises(aios.SyscallError) as refused:
        hoarder.memory_add(big)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "quota" in refused.value.message
    assert neighbour.memory_add(big).id  # its own quota
    hoarder.memory_delete(ids[0])
    assert hoarder.memory_add(big).id
    assert kernel.status().memory.quota_bytes_per_agent == QUOTA


def payload(writer: int, i: int) -> str:
    return f"writer {writer} entry {i}: " + "the quick brown fox jumps over the lazy dog " * 4


def test_memory_pages_under_its_budget_and_status_shows_it(kernel):
    agent = kernel.register("pager")
    ids = [agent.memory_add(payload(0, i)).id for i in range(80)]  # ~16 KB: four times the budget
    assert agent.memory_get(ids[0]).text == payload(0, 0)  # spilled long ago: a page fault
    assert [h.entry.id for h in agent.memory_search("entry 3", limit=100)][:1] and len(list(agent.memory_list())) == 80
    memory = kernel.status().memory
    assert memory.resident_bytes <= BUDGET == memory.ram_budget_bytes
    assert memory.blocks_spilled >= 7 and memory.faults >= 1 and memory.evictions >= 7
    assert memory.lru_k == 2 and 0 < memory.hit_ratio < 1


def test_every_acknowledged_write_survives_kill_9_of_the_memory_service(small_memory, kernel):
    agent = kernel.register("durable")

    def write(writer: int, i: int) -> tuple[str, str]:
        text = payload(writer, i)
        return agent.memory_add(text, {"writer": str(writer), "i": str(i)}).id, text

    run = writes_across_kill_9(small_memory, "memory", write, before=150)
    assert run.refused == []  # the writes the kill caught waited in the kernel and were retried
    stored = {e.id: e for e in agent.memory_list(page_size=500)}
    print(f"\nkill -9: {run.at_kill} writes acknowledged before the kill, {len(run.acknowledged)} in all, "
          f"{len(stored)} stored")
    texts = [e.text for e in stored.values()]
    assert len(texts) == len(set(texts))  # no add happened twice, though some committed before the kill
    missing = [i for i in run.acknowledged if i not in stored]
    assert missing == [], f"{len(missing)} of {len(run.acknowledged)} acknowledged writes lost"
    assert all(stored[i].text == text for i, text in run.acknowledged.items())
    # Written but not acknowledged (killed between commit and reply) may exist, but only whole.
    for entry in stored.values():
        assert entry.text == payload(int(entry.metadata["writer"]), int(entry.metadata["i"]))


def test_the_kernel_replays_and_records_conversation_turns(kernel):
    agent = kernel.register("talker")
    first = agent.complete(messages=[("user", "My name is Ada. Remember it.")], max_tokens=8, remember=True)
    turns = agent.memory_turns(10)
    assert [(t.role, t.text) for t in turns] == [("user", "My name is Ada. Remember it."), ("assistant", first.text)]

    question = [("system", "Answer briefly."), ("user", "What is my name?")]
    alone = agent.complete(messages=question, max_tokens=4)
    with_history = agent.complete(messages=question, max_tokens=4, history_turns=2)
    turn_tokens = with_history.prompt_tokens - alone.prompt_tokens
    assert turn_tokens >= 8  # the two turns went into the prompt
    assert len(agent.memory_turns(10)) == 2  # history replayed, nothing recorded without remember
    other = kernel.register("stranger")
    assert other.complete(messages=question, max_tokens=4, history_turns=2).prompt_tokens == alone.prompt_tokens
