"""The kernel's view of several LLM cores: where each generation goes, without sockets."""

from __future__ import annotations

import asyncio

import pytest

from services.errors import NotFound
from services.scheduler import cores as cores_module
from services.scheduler.cores import CoreRouter, CoreState, LLMCoreReplica, prefix_key
from services.scheduler.policy import make_policy
from services.scheduler.queues import ResourceQueue
from services.scheduler.syscalls import Resource, SyscallRecord


def router(*slots: int) -> CoreRouter:
    return CoreRouter([LLMCoreReplica(f"c{i}", f"10.0.0.{i}:7000", n) for i, n in enumerate(slots)])


def run(router_: CoreRouter, core: str, syscall_id: str, agent: str = "a", prefix: str = "p") -> None:
    router_.started(router_.get(core), syscall_id, agent, prefix)


def test_the_core_holding_a_parked_generation_comes_first_then_the_agents_then_the_prompts():
    r = router(2, 2, 2)
    run(r, "c1", "s1", agent="alice", prefix="sys-A")
    r.stopped(r.get("c1"), "s1", parked=True)
    run(r, "c2", "s2", agent="bob", prefix="sys-B")
    r.stopped(r.get("c2"), "s2", parked=False)
    assert r.pick("alice", "sys-B", holder=r.get("c1")).name == "c1"  # its KV is resident there
    assert r.pick("bob", "sys-A").name == "c2"  # bob's conversation beats the prompt's core
    assert r.pick("carol", "sys-A").name == "c1"  # a newcomer goes where its system prompt is cached
    assert r.pick("carol", "sys-C").name == "c0"  # nothing to reuse: least loaded, then least dispatched


def test_affinity_gives_way_to_load_the_agents_core_a_little_the_prompts_core_not_at_all():
    r = router(8, 8)
    run(r, "c0", "s0", agent="alice", prefix="sys-A")
    r.stopped(r.get("c0"), "s0", parked=False)
    run(r, "c0", "s1", agent="bob", prefix="sys-B")
    assert r.pick("alice", "sys-A").name == "c0"  # 1/8 busier than c1: within the agent's slack
    assert r.pick("carol", "sys-B").name == "c1"  # a system prompt is cheap to prefill again: least loaded
    run(r, "c0", "s2", agent="bob")
    run(r, "c0", "s3", agent="bob")
    assert r.pick("alice", "sys-A").name == "c1"  # 3/8 busier: its conversation is prefilled again on c1


def test_a_full_core_is_passed_over_while_another_has_room_and_overcommitted_only_when_all_are_full():
    r = router(1, 2)
    run(r, "c0", "s1", agent="alice")
    assert r.pick("alice", "p").name == "c1"  # its own core is full
    run(r, "c1", "s2")
    run(r, "c1", "s3")
    assert not r.has_room()
    assert r.pick("alice", "p").name == "c0"  # all full: the core queues it; the agent's own is as loaded as any


def test_draining_and_down_cores_take_nothing_and_leave_the_capacity():
    r = router(4, 2)
    seen: list[int] = []
    r.on_capacity = seen.append
    assert r.capacity == 6
    run(r, "c0", "s1", agent="alice")
    r.set_state(r.get("c0"), CoreState.DRAINING)
    assert r.pick("alice", "p").name == "c1"
    r.set_state(r.get("c1"), CoreState.DOWN)
    assert r.pick("alice", "p") is None and r.capacity == 0
    r.set_state(r.get("c1"), CoreState.DOWN)  # no change, no news
    r.set_state(r.get("c1"), CoreState.SERVING)
    assert seen == [2, 0, 2]


def test_a_move_is_counted_on_both_sides_and_the_source_forgets_the_generation():
    r = router(2, 2)
    run(r, "c0", "s1")
    r.stopped(r.get("c0"), "s1", parked=True)
    assert r.holding("s1").name == "c0"
    r.moved(r.get("c0"), r.get("c1"), "s1")
    assert r.holding("s1") is None
    assert (r.get("c0").migrated_out, r.get("c1").migrated_in) == (1, 1)


def test_affinity_is_bounded(monkeypatch):
    monkeypatch.setattr(cores_module, "AFFINITY_ENTRIES", 3)
    r = router(8, 8)
    for i in range(5):
        run(r, "c1", f"s{i}", agent=f"agent-{i}", prefix=f"prompt-{i}")
        r.stopped(r.get("c1"), f"s{i}", parked=False)
    assert r.pick("agent-0", "").name == "c0"  # forgotten: least loaded
    assert r.pick("agent-4", "").name == "c1"


def test_cores_are_found_by_name_or_address_and_an_unknown_one_is_named_in_the_error():
    r = router(1, 1)
    assert r.get("10.0.0.1:7000").name == "c1"
    with pytest.raises(NotFound, match="c0, c1"):
        r.get("c9")


def test_a_router_needs_a_core():
    with pytest.raises(ValueError):
        CoreRouter([])


def test_the_prefix_key_is_the_opening_of_the_system_message_or_the_prompt():
    assert prefix_key("", "You are a sailor." + "x" * 2000) == prefix_key("ignored", "You are a sailor." + "x" * 3000)
    assert prefix_key("raw prompt", "") == "raw prompt"


def test_a_resized_queue_dispatches_when_it_grows_and_holds_back_at_zero():
    async def scenario() -> None:
        queue = ResourceQueue(Resource.LLM, make_policy("fifo", 32), 1)
        records = [SyscallRecord(f"s{i}", "a", "llm_generate", Resource.LLM) for i in range(3)]
        entered: list[str] = []
        release = asyncio.Event()

        async def hold(record: SyscallRecord) -> None:
            async with queue.turn(record):
                entered.append(record.id)
                await release.wait()

        tasks = [asyncio.create_task(hold(r)) for r in records]
        await asyncio.sleep(0)
        assert entered == ["s0"]
        queue.resize(0)  # no core serves
        queue.resize(3)  # two cores back
        await asyncio.sleep(0)
        assert entered == ["s0", "s1", "s2"]
        release.set()
        await asyncio.gather(*tasks)

    asyncio.run(scenario())
