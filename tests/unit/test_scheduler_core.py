"""The scheduler's pure parts: resource queues and syscall records (policies: test_policies.py)."""

import asyncio
import re

import pytest

from services.scheduler.policy import FifoPolicy, make_policy
from services.scheduler.queues import ResourceQueue
from services.scheduler.syscalls import Resource, SyscallState, SyscallTable


def test_unknown_policy_name_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="fifo"):
        make_policy("lottery")


def test_syscall_records_move_through_their_states_and_are_counted():
    table = SyscallTable()
    record = table.create("agt-1", "memory_add", Resource.MEMORY)
    other = table.create("agt-1", "memory_add", Resource.MEMORY)
    assert record.state == SyscallState.QUEUED and re.fullmatch(r"sc-[0-9a-f]{20}", record.id)
    assert other.id != record.id  # random, not a counter another agent could guess
    record.start()
    record.finish("NOT_FOUND", "gone")
    table.count_finished(record)
    assert record.state == SyscallState.FAILED and record.finished_at >= record.started_at > 0
    assert (table.total, table.metrics.failed) == (2, 1)
    assert table.get(record.id) is record
    assert record.queued_s >= 0 and record.running_s >= 0 and record.preemptions == 0


def test_syscall_table_keeps_only_the_newest_finished_records():
    table = SyscallTable(keep_finished=3)
    records = [table.create("a", "k", Resource.TOOLS) for _ in range(5)]
    for record in records:
        record.finish()
    table.create("a", "k", Resource.TOOLS)
    assert table.get(records[0].id) is None and table.get(records[-1].id) is records[-1]


def test_listing_finds_an_agents_records_newest_first_among_its_own_and_forgets_trimmed_ones():
    table = SyscallTable(keep_finished=4)
    made = [table.create(agent, kind, Resource.MEMORY) for agent, kind in
            [("a", "memory_add"), ("b", "memory_add"), ("a", "memory_get"), ("a", "memory_add"), ("b", "memory_get")]]
    for record in made:
        record.finish()
    newest = table.create("a", "memory_get", Resource.MEMORY)  # the oldest finished one goes
    assert [r.id for r in table.newest("a", "", 10)] == [newest.id, made[3].id, made[2].id]
    assert [r.id for r in table.newest("a", "memory_add", 10)] == [made[3].id]
    assert [r.id for r in table.newest("", "memory_get", 1)] == [newest.id]
    assert table.newest("nobody", "", 10) == []


def run(coro):
    return asyncio.run(coro)


def test_a_queues_wait_percentiles_count_the_time_in_the_queue_only():
    async def scenario():
        queue = ResourceQueue(Resource.MEMORY, FifoPolicy(), capacity=1)
        record = SyscallTable().create("a", "memory_add", Resource.MEMORY)
        record.enqueued_at -= 100.0  # made long before it joined the queue (it waited for a tool line, say)
        async with queue.turn(record):
            pass
        return queue.wait_percentiles()

    p50, p99 = run(scenario())
    assert 0.0 <= p50 <= p99 < 100.0


def test_queue_never_runs_more_than_capacity_and_dispatches_fifo():
    async def scenario():
        table = SyscallTable()
        queue = ResourceQueue(Resource.LLM, FifoPolicy(), capacity=2)
        started: list[str] = []
        release = asyncio.Event()
        peak = 0

        async def syscall(name: str):
            nonlocal peak
            record = table.create(name, "llm_generate", Resource.LLM)
            async with queue.turn(record):
                started.append(name)
                peak = max(peak, len(queue.running))
                await release.wait()

        tasks = [asyncio.create_task(syscall(f"agent-{i}")) for i in range(5)]
        while len(started) < 2:
            await asyncio.sleep(0)
        assert len(queue.running) == 2 and queue.queued == 3
        release.set()
        await asyncio.gather(*tasks)
        return started, peak, queue

    started, peak, queue = run(scenario())
    assert started == [f"agent-{i}" for i in range(5)]
    assert peak == 2 and not queue.running and queue.completed == 5


def test_a_caller_that_leaves_while_queued_gives_up_its_place():
    async def scenario():
        table = SyscallTable()
        queue = ResourceQueue(Resource.TOOLS, FifoPolicy(), capacity=1)
        hold = asyncio.Event()

        async def syscall(agent: str):
            async with queue.turn(table.create(agent, "tool_call", Resource.TOOLS)):
                await hold.wait()

        first = asyncio.create_task(syscall("a"))
        second = asyncio.create_task(syscall("b"))
        while queue.queued < 1:
            await asyncio.sleep(0)
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        assert queue.queued == 0
        hold.set()
        await first
        return queue

    queue = run(scenario())
    assert not queue.running and queue.queued == 0


def test_a_closed_queue_refuses_the_waiting_and_later_callers_and_lets_the_running_finish():
    """What a stopping kernel does to the LLM queue (Kernel.drain): nobody gets a new turn, nothing is lost."""
    from services.errors import Unavailable

    async def scenario():
        table = SyscallTable()
        queue = ResourceQueue(Resource.LLM, FifoPolicy(), capacity=1)
        hold = asyncio.Event()
        outcomes: dict[str, str] = {}

        async def syscall(agent: str):
            try:
                async with queue.turn(table.create(agent, "llm_generate", Resource.LLM)):
                    await hold.wait()
                outcomes[agent] = "ran"
            except Unavailable as exc:
                outcomes[agent] = exc.message

        running = asyncio.create_task(syscall("a"))
        waiting = [asyncio.create_task(syscall(name)) for name in ("b", "c")]
        while queue.queued < 2:
            await asyncio.sleep(0)
        queue.close(lambda: Unavailable("stopping"))
        await asyncio.gather(*waiting)
        await syscall("d")  # asks after the close
        hold.set()
        await running
        return outcomes, queue

    outcomes, queue = run(scenario())
    assert outcomes == {"a": "ran", "b": "stopping", "c": "stopping", "d": "stopping"}
    assert queue.queued == 0 and not queue.running and queue.completed == 1
