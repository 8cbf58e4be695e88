"""Scheduling policies on a simulated clock, no model: order, preemption, aging, fairness.

`simulate` plays a resource with `capacity` places that serves one token per
running job per tick (a tick is 50 ms of simulated time), and asks the policy
for a victim after every tick, as the ResourceQueue does after every token.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from services.scheduler.policy import (
    FairSharePolicy,
    FifoPolicy,
    PriorityPolicy,
    RoundRobinPolicy,
    make_policy,
)
from services.scheduler.queues import ResourceQueue
from services.scheduler.syscalls import Resource, SyscallState, SyscallTable

TICK_S = 0.05


@dataclass(eq=False)
class Job:
    agent_id: str
    tokens: int
    priority: int = 0
    weight: float = 1.0
    arrival: int = 0  # tick
    slice_used: int = 0
    enqueued_at: float = 0.0
    submitted_at: float = 0.0
    done_at: int = -1


def simulate(policy, jobs: list[Job], capacity: int, ticks: int = 100_000) -> list[str]:
    """Runs the jobs; returns which agent got each served token, in order (a tick's tokens by slot)."""
    served: list[str] = []
    pending = sorted(jobs, key=lambda j: j.arrival)
    running: list[Job] = []
    for tick in range(ticks):
        now = tick * TICK_S
        while pending and pending[0].arrival <= tick:
            job = pending.pop(0)
            job.enqueued_at = job.submitted_at = now
            policy.push(job, now)
        while len(running) < capacity and len(policy):
            job = policy.pop(now)
            job.slice_used = 0
            running.append(job)
        if not running and not pending:
            return served
        for job in list(running):
            job.tokens -= 1
            job.slice_used += 1
            policy.charge(job, 0, 1)
            served.append(job.agent_id)
            if job.tokens == 0:
                job.done_at = tick
                running.remove(job)
                policy.done(job)
        if len(policy) and len(running) == capacity:
            victim = policy.victim(running, now)
            if victim is not None:
                running.remove(victim)
                policy.done(victim)
                victim.enqueued_at = now
                policy.push(victim, now)
    raise AssertionError("simulation did not finish")


def runs(served: list[str]) -> list[tuple[str, int]]:
    """Collapses the service log into (agent, consecutive tokens)."""
    out: list[tuple[str, int]] = []
    for agent in served:
        if out and out[-1][0] == agent:
            out[-1] = (agent, out[-1][1] + 1)
        else:
            out.append((agent, 1))
    return out


def test_fifo_serves_in_arrival_order_never_preempts_and_forgets_removed_items():
    policy = FifoPolicy()
    jobs = [Job(a, 1) for a in "abcd"]
    for job in jobs:
        policy.push(job, 0.0)
    policy.remove(jobs[1])
    assert [policy.pop(0.0).agent_id for _ in range(len(policy))] == ["a", "c", "d"]
    with pytest.raises(IndexError):
        policy.pop(0.0)
    assert runs(simulate(FifoPolicy(), [Job("a", 100), Job("b", 100)], capacity=1)) == [("a", 100), ("b", 100)]


def test_round_robin_rotates_every_slice_of_generated_tokens():
    served = simulate(RoundRobinPolicy(slice_tokens=32), [Job("a", 70), Job("b", 70), Job("c", 40)], capacity=1)
    # a, b, c take 32-token turns in arrival order; a preempted job goes to the back of the line.
    assert runs(served) == [("a", 32), ("b", 32), ("c", 32), ("a", 32), ("b", 32), ("c", 8), ("a", 6), ("b", 6)]


def test_round_robin_does_not_preempt_before_the_slice_or_with_nobody_waiting():
    policy = RoundRobinPolicy(slice_tokens=32)
    fresh, worn = Job("a", 10, slice_used=31), Job("b", 10, slice_used=40)
    assert policy.victim([fresh], 0.0) is None
    assert policy.victim([fresh, worn], 0.0) is worn
    assert runs(simulate(RoundRobinPolicy(slice_tokens=4), [Job("solo", 20)], capacity=1)) == [("solo", 20)]


def test_priority_serves_the_highest_first_and_preempts_a_lower_one_after_its_minimum_run():
    policy = PriorityPolicy(aging_per_s=0.0, min_run_tokens=8)
    low, high, mid = Job("low", 1, priority=1), Job("high", 1, priority=5), Job("mid", 1, priority=3)
    for job in (low, high, mid):
        policy.push(job, 0.0)
    assert [policy.pop(0.0) for _ in range(3)] == [high, mid, low]

    served = simulate(
        PriorityPolicy(aging_per_s=0.0, min_run_tokens=8),
        [Job("background", 50, priority=0), Job("urgent", 20, priority=9, arrival=3)],
        capacity=1,
    )
    # The urgent job arrives at tick 3 but the background job keeps its first 8 tokens.
    assert runs(served) == [("background", 8), ("urgent", 20), ("background", 42)]


def test_priority_aging_lets_a_low_priority_job_through_a_steady_stream_of_high_ones():
    # Without aging the priority-0 job would wait behind an endless stream of priority-5 jobs.
    stream = [Job("high", 10, priority=5, arrival=10 * i) for i in range(300)]
    starving = Job("low", 10, priority=0)
    simulate(PriorityPolicy(aging_per_s=0.2, min_run_tokens=8), [*stream, starving], capacity=1)
    # Each high job waits at most ~1 s, so it stays near 5.2; the low one passes that after
    # 26 s (520 ticks) and then runs to the end: aging keeps it ahead.
    assert 500 < starving.done_at <= 560
    unaged = Job("low", 10, priority=0)
    simulate(PriorityPolicy(aging_per_s=0.0), [*[Job("high", 10, priority=5, arrival=10 * i) for i in range(300)], unaged], capacity=1)
    assert unaged.done_at >= 3000  # served only after the whole stream


def test_fair_share_serves_the_agent_with_the_least_service_first():
    # "heavy" queued four requests before "light" asked once; VTC does not make light wait for all four.
    jobs = [Job("heavy", 64) for _ in range(4)] + [Job("light", 64)]
    served = simulate(FairSharePolicy(slice_tokens=32), jobs, capacity=1)
    light_done = max(i for i, agent in enumerate(served) if agent == "light")
    assert light_done < 3 * 64  # FIFO would finish light after 5 * 64 tokens


def test_fair_share_splits_service_by_weight_while_both_are_backlogged():
    jobs = [Job("gold", 64, weight=2.0) for _ in range(40)] + [Job("bronze", 64, weight=1.0) for _ in range(40)]
    served = simulate(FairSharePolicy(slice_tokens=32), jobs, capacity=2)
    window = served[: 64 * 30]  # while both still have work
    ratio = window.count("gold") / window.count("bronze")
    assert 1.7 < ratio < 2.3


def first_answers(jobs: list[Job]) -> dict[str, int]:
    """Each agent's time to first response: the tick its first call finished."""
    first: dict[str, int] = {}
    for job in jobs:
        first[job.agent_id] = min(first.get(job.agent_id, job.done_at), job.done_at)
    return first


def test_fair_share_interleaves_agents_so_every_light_agent_gets_its_first_answer_early():
    # The case: one heavy agent makes 80 calls at once, 49 light agents 8 each, 16 places. Places freed
    # together used to go to one agent's whole burst (two light agents at a time, first answers from 2 to 26 calls'
    # time); charging a slice at dispatch interleaves them one call each: 49 agents need 4 waves of 16 places.
    call = 32
    jobs = [Job("heavy", call) for _ in range(80)] + [Job(f"light-{i}", call) for i in range(49) for _ in range(8)]
    served = simulate(FairSharePolicy(slice_tokens=call), jobs, capacity=16)
    light = {agent: tick for agent, tick in first_answers(jobs).items() if agent != "heavy"}
    assert max(light.values()) < 4 * call
    assert sorted(light.values())[14] < call  # the first wave: 15 light agents beside the heavy one's first call
    fifo_jobs = [Job(j.agent_id, call) for j in jobs]
    fifo_served = simulate(FifoPolicy(), fifo_jobs, capacity=16)
    # No throughput lost: every place busy until the work runs out, as with FIFO.
    assert max(j.done_at for j in jobs) == max(j.done_at for j in fifo_jobs)
    assert len(served) == len(fifo_served)


def test_fair_share_refunds_the_unused_advance_of_a_short_call():
    policy = FairSharePolicy(slice_tokens=32)
    short = Job("short", 5)
    policy.push(short, 0.0)
    assert policy.pop(0.0) is short
    assert policy.counters["short"] == 2.0 * 32  # one slice of output charged at dispatch
    policy.charge(short, 10, 5)
    assert policy.counters["short"] == 2.0 * 32  # drawn from the advance
    policy.done(short)
    assert policy.counters["short"] == 10 + 2.0 * 5  # exactly what it was served


def test_fair_share_gives_no_credit_for_idling():
    policy = FairSharePolicy(slice_tokens=32)
    busy = Job("busy", 1)
    policy.push(busy, 0.0)
    policy.charge(busy, 100, 500)  # busy has received a lot of service ...
    policy.push(Job("busy", 1), 1.0)
    late = Job("late", 1)
    policy.push(late, 2.0)  # ... and late arrives now: it starts level with the neediest waiting agent
    assert policy.counters["late"] == policy.counters["busy"]


def test_fair_share_preempts_an_agent_that_is_a_slice_ahead_of_a_waiting_one():
    policy = FairSharePolicy(slice_tokens=32)
    hog, newcomer = Job("hog", 1, slice_used=40), Job("new", 1)
    policy.charge(hog, 0, 40)
    policy.push(newcomer, 0.0)
    assert policy.victim([hog], 0.0) is hog
    hog.slice_used = 10
    assert policy.victim([hog], 0.0) is None  # not before a full slice


@pytest.mark.parametrize("name", ["fifo", "rr", "priority", "fair"])
def test_every_policy_is_available_by_name(name):
    assert make_policy(name, slice_tokens=16).name == name


def test_the_queue_preempts_a_running_generation_and_resumes_it_when_the_policy_says():
    """ResourceQueue + RoundRobinPolicy with fake token streams: the victim yields its place, waits
    PREEMPTED, and comes back; every generation gets all its tokens."""

    async def scenario():
        table = SyscallTable()
        preempted: list[str] = []
        queue = ResourceQueue(Resource.LLM, RoundRobinPolicy(slice_tokens=5), capacity=1, preempt=lambda r: preempted.append(r.agent_id))
        produced: dict[str, int] = {}

        async def generation(agent: str, tokens: int) -> None:
            record = table.create(agent, "llm_generate", Resource.LLM)
            produced[agent] = 0
            async with queue.turn(record):
                while produced[agent] < tokens:
                    record.preemptible = True
                    while produced[agent] < tokens and not record.preempt_requested:
                        produced[agent] += 1
                        queue.progress(record, 0, 1)
                        await asyncio.sleep(0)
                    record.preemptible = False
                    if produced[agent] < tokens:
                        await queue.requeue(record)
            return record

        records = await asyncio.gather(generation("a", 12), generation("b", 12))
        return records, preempted, produced, queue

    records, preempted, produced, queue = asyncio.run(scenario())
    assert produced == {"a": 12, "b": 12}
    assert preempted[:2] == ["a", "b"] and queue.preemptions == len(preempted)
    assert all(r.preemptions >= 1 and r.state == SyscallState.RUNNING for r in records)
    assert not queue.running and queue.queued == 0


def test_a_newcomer_is_lifted_to_the_service_others_received_not_to_what_they_reserved():
    # "heavy" has four calls dispatched (each charged a slice in advance) and none served yet; "light" waits. A new
    # agent arriving now starts level with what the waiting agent received (0), not with heavy's reservations.
    policy = FairSharePolicy(slice_tokens=32)
    heavy = [Job("heavy", 64) for _ in range(4)]
    for job in heavy:
        policy.push(job, 0.0)
    for _ in heavy:
        policy.pop(0.0)
    policy.push(Job("light", 64), 0.0)
    policy.push(Job("new", 64), 0.0)
    assert policy.counters["new"] == policy.served("light") == 0.0
    for job in heavy:  # they finish after 10 tokens each: heavy ends charged exactly what it was served
        policy.charge(job, 0, 10)
        policy.done(job)
    assert policy.counters["heavy"] == policy.served("heavy") == 4 * 2.0 * 10
    assert not any(policy.advances.values()) and policy.reserved["heavy"] == 0.0


def test_a_caller_cancelled_just_before_its_dispatch_frees_its_place_and_its_advance():
    """ResourceQueue: a waiting caller is cancelled, and a place frees before its cleanup runs; the queue skips it
    (its place goes to the next), and the fair policy keeps no advance for it."""

    async def scenario():
        table = SyscallTable()
        policy = FairSharePolicy(slice_tokens=4)
        queue = ResourceQueue(Resource.LLM, policy, capacity=1)
        first = table.create("a", "llm_generate", Resource.LLM)
        second = table.create("b", "llm_generate", Resource.LLM)
        third = table.create("c", "llm_generate", Resource.LLM)
        release = asyncio.Event()
        order: list[str] = []

        async def hold(record):
            async with queue.turn(record):
                order.append(record.agent_id)
                await release.wait()

        holder = asyncio.create_task(hold(first))
        await asyncio.sleep(0)  # first runs
        cancelled = asyncio.create_task(hold(second))
        waiting = asyncio.create_task(hold(third))
        await asyncio.sleep(0)  # both wait
        release.set()  # the place frees (the holder runs next) ...
        cancelled.cancel()  # ... and the waiting caller's wait is cancelled: its cleanup runs after the dispatch
        await asyncio.wait_for(holder, 5)
        await asyncio.wait_for(waiting, 5)
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert order == ["a", "c"]
        assert queue.running == set() and len(policy) == 0
        assert policy.reserved.get("b", 0.0) == 0.0 and second not in policy.advances

    asyncio.run(scenario())
