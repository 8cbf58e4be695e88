"""kill -9 of the LLM core mid-generation: the supervisor restarts it, the kernel rebuilds every generation in
flight, and every stream comes out whole, with no token missing or repeated.

The restart is done by the real supervisor of `aios up` (deploy/supervisor.py), ticking in a thread here."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from typing import Iterator

import pytest

import aios
import aios.aio
from aios.syscalls import syscall_request
from aios.v1 import common_pb2, memory_pb2
from deploy.cluster import Cluster, ClusterConfig, process_alive
from deploy.supervisor import RestartPolicy, Supervisor, supervising
from tests.integration.streams import stream_in_thread, token_ids
from tests.integration.waiting import wait_until

PROMPT = "Question: Name three rivers in Europe and say where each one flows.\nAnswer:"
TOKENS = 48


@pytest.fixture(scope="module")
def supervised(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Supervisor, list[str]]]:
    # Round robin with short slices: with more streams than slots, some are parked (or snapshotted) at any time.
    config = ClusterConfig(home=tmp_path_factory.mktemp("aios-recovery"), slots=2, policy="rr", slice_tokens=8)
    with Cluster(config) as cluster:
        said: list[str] = []
        names = list(cluster.processes)  # in start order
        supervisor = Supervisor(cluster, names, RestartPolicy(first_delay_s=0.1), say=said.append)
        with supervising(supervisor):
            yield cluster, supervisor, said


@pytest.fixture(scope="module")
def kernel(supervised) -> Iterator[aios.Connection]:
    with supervised[0].connect() as connection:
        yield connection


def stream(agent: aios.Agent, chunks: list, **sampling) -> threading.Thread:
    return stream_in_thread(agent, chunks, PROMPT, TOKENS, **sampling)


def kill_core_after(cluster: Cluster, supervisor: Supervisor, chunks: list, tokens: int) -> float:
    restarts = supervisor.services["llm_core"].restarts
    wait_until(lambda: len(chunks) >= tokens, within_s=120, what=f"{tokens} tokens streamed")
    os.kill(cluster.processes["llm_core"].pid, signal.SIGKILL)
    killed = time.monotonic()
    wait_until(lambda: supervisor.services["llm_core"].restarts > restarts, within_s=120, what="the core restarted")
    return killed


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "top_k": 40, "seed": 77}], ids=["greedy", "seeded"])
def test_a_generation_decoding_alone_survives_kill_9_of_its_core_token_identical(supervised, kernel, sampling):
    cluster, supervisor, said = supervised
    agent = kernel.register("survivor")
    expected = token_ids(list(agent.generate(PROMPT, max_tokens=TOKENS, ignore_eos=True, **sampling)))
    chunks: list = []
    reader = stream(agent, chunks, **sampling)
    killed = kill_core_after(cluster, supervisor, chunks, 12)
    reader.join(timeout=300)
    assert not reader.is_alive()
    first_after = next(c for c in chunks[12:] if c.HasField("token_id"))
    assert token_ids(chunks) == expected  # nothing missing, nothing twice, the same tokens as without the fault
    assert [c.completion_tokens for c in chunks if c.HasField("token_id")] == list(range(1, TOKENS + 1))
    assert chunks[-1].finish_reason and chunks[-1].replay_divergences == 0
    record = agent.syscall(chunks[-1].syscall_id)
    assert record.recoveries == 1 and record.tokens_out == TOKENS and record.error == ""
    assert any("llm_core: killed by SIGKILL" in line for line in said)
    print(f"recovered in {time.monotonic() - killed:.1f} s (kill to end of stream); first resumed token index "
          f"{first_after.completion_tokens}")


def test_every_stream_in_flight_is_complete_and_contiguous_after_kill_9(supervised, kernel):
    """Four streams on two slots, switched every 8 tokens: some decoding, some parked in the core (snapshotted or
    not) when it dies."""
    cluster, supervisor, _ = supervised
    agents = [kernel.register(f"crowd-{i}") for i in range(4)]
    streams: list[list] = [[] for _ in agents]
    readers = [stream(agent, chunks) for agent, chunks in zip(agents, streams)]
    kill_core_after(cluster, supervisor, streams[0], 8)
    for reader in readers:
        reader.join(timeout=300)
        assert not reader.is_alive()
    records = []
    for agent, chunks in zip(agents, streams):
        indexes = [c.completion_tokens for c in chunks if c.HasField("token_id")]
        assert indexes == list(range(1, TOKENS + 1)) and chunks[-1].finish_reason
        records.append(agent.syscall(chunks[-1].syscall_id))
    assert all(r.error == "" and r.tokens_out == TOKENS for r in records)
    assert sum(r.recoveries for r in records) >= 2 and sum(r.preemptions for r in records) >= 2


def test_streams_continue_across_kill_9_of_the_kernel_and_it_reclaims_what_the_dead_one_parked(supervised, kernel):
    """The SDK reconnects and asks again with the tokens it has; the restarted kernel frees the sequences the
    dead one left parked in the core (and their snapshots), then rebuilds each stream by replay."""
    cluster, supervisor, said = supervised
    agents = [kernel.register(f"through-{i}") for i in range(4)]
    done_before = kernel.call("Syscall", syscall_request(memory_add=memory_pb2.MemoryAddRequest(text="before")),
                              agents[0].token).syscall_id
    streams: list[list] = [[] for _ in agents]
    readers = [stream(agent, chunks) for agent, chunks in zip(agents, streams)]
    wait_until(lambda: kernel.status().llm.slots_parked >= 1, within_s=120, what="a generation parked in the core")
    restarts = supervisor.services["kernel"].restarts
    os.kill(cluster.processes["kernel"].pid, signal.SIGKILL)
    wait_until(lambda: supervisor.services["kernel"].restarts > restarts, within_s=120, what="the kernel restarted")
    for reader in readers:
        reader.join(timeout=300)
        assert not reader.is_alive()
    for chunks in streams:
        assert [c.completion_tokens for c in chunks if c.HasField("token_id")] == list(range(1, TOKENS + 1))
        assert chunks[-1].finish_reason
    continued = 0
    for agent, chunks in zip(agents, streams):
        ids = list(dict.fromkeys(c.syscall_id for c in chunks))  # one syscall before the kill (if it had begun), one after
        record = agent.syscall(ids[-1])
        assert len(ids) <= 2 and record.error == "" and record.tokens_out == TOKENS
        assert record.recoveries == len(ids) - 1  # a stream with tokens before the kill was rebuilt by replay
        continued += len(ids) - 1
        if len(ids) == 2:  # the dead kernel's record of it outlived it (in Redis), and says what happened
            interrupted = agent.syscall(ids[0])
            assert interrupted.error_code == "UNAVAILABLE" and "kernel stopped" in interrupted.error
    assert continued >= 1
    assert agents[0].syscall(done_before).state == common_pb2.SYSCALL_STATE_DONE  # a record of the dead kernel
    llm = kernel.status().llm
    assert (llm.slots_parked, llm.slots_busy) == (0, 0)  # nothing the dead kernel parked is held any more
    assert "kernel: killed by SIGKILL" in " ".join(said)


def test_a_hot_standby_core_takes_over_and_the_stream_goes_on_token_identical(tmp_path):
    """With a standby (`aios up --llm-standby`), the supervisor promotes the process that has the model loaded
    instead of starting one, and a new standby is started beside it."""
    config = ClusterConfig(home=tmp_path, slots=2, standby=("llm_core",), standby_after_s=0.0)
    with Cluster(config) as cluster, cluster.connect() as kernel:
        said: list[str] = []
        names = list(cluster.processes)  # in start order
        supervisor = Supervisor(cluster, names, RestartPolicy(first_delay_s=0.1), say=said.append,
                                on_change=lambda: cluster.write_endpoints(None, supervisor.as_json()))
        with supervising(supervisor):
            wait_until(lambda: cluster.standby_ready("llm_core"), within_s=120, what="a standby with its model loaded")
            standby_pid = cluster.standbys["llm_core"].pid
            assert json.loads((tmp_path / "endpoints.json").read_text())["pids"]["llm_core_standby"] == standby_pid
            agent = kernel.register("covered")
            expected = token_ids(list(agent.generate(PROMPT, max_tokens=TOKENS, ignore_eos=True)))
            chunks: list = []
            reader = stream(agent, chunks)
            kill_core_after(cluster, supervisor, chunks, 12)
            reader.join(timeout=300)
            assert not reader.is_alive()
            assert token_ids(chunks) == expected
            assert cluster.processes["llm_core"].pid == standby_pid  # promoted, not started anew
            wait_until(lambda: cluster.standby_ready("llm_core") and cluster.standbys["llm_core"].pid != standby_pid,
                       within_s=120, what="a new standby")
            pids = [cluster.processes["llm_core"].pid, cluster.standbys["llm_core"].pid]
    assert not [pid for pid in pids if process_alive(pid)]  # stopping the cluster stopped the standby too


def test_a_suspended_generation_is_taken_once_and_only_by_its_agent(supervised):
    """The store a stopping kernel leaves its generations in (real Redis): another agent's take finds nothing and
    leaves it; the owner's takes it; a second take (a replayed request) finds nothing."""
    import asyncio

    from aios.v1 import llm_core_pb2
    from services import redis_state
    from services.scheduler.suspensions import SuspendedGenerations, Suspension

    async def scenario() -> None:
        client = redis_state.connect(supervised[0].redis_url)
        store = SuspendedGenerations(client, ttl_s=60)
        suspended = Suspension("sc-test-suspended", "agent-a", llm_core_pb2.GenerateRequest(
            prompt="p", syscall_id="sc-test-suspended", sampling=common_pb2.SamplingParams(seed=3)),
            token_ids=[5, 6], texts=["a", "b"], prompt_tokens=3, recoveries=0)
        assert await store.put(suspended)
        assert "sc-test-suspended" in await store.ids()
        assert await store.take("sc-test-suspended", "agent-b") is None
        assert await store.take("sc-test-suspended", "agent-a") == suspended
        assert await store.take("sc-test-suspended", "agent-a") is None
        assert "sc-test-suspended" not in await store.ids()
        await client.aclose()

    asyncio.run(scenario())


def test_async_agents_syscalls_ride_through_kill_9_of_the_kernel_and_each_write_happens_once(supervised, kernel):
    """The asyncio SDK sends every agent's syscalls on one Batched stream: when the kernel dies under them, the calls
    in flight fail with the stream and are sent again (same request ids) once the restarted kernel answers."""
    cluster, supervisor, _ = supervised
    writes = 12

    async def scenario() -> None:
        async with aios.aio.connect(cluster.kernel_address, token=cluster.operator_token) as connection:
            agents = [await connection.register(f"async-through-{i}") for i in range(8)]
            done: list[int] = []

            async def work(agent: aios.aio.Agent) -> None:
                for n in range(writes):
                    await agent.storage_write(f"k{n}", f"v{n}")
                    await agent.memory_add(f"note {n}")
                    done.append(n)

            tasks = [asyncio.ensure_future(work(agent)) for agent in agents]
            while len(done) < 8 and not any(task.done() for task in tasks):
                await asyncio.sleep(0.01)  # until some writes are through: the kill lands among the rest
            restarts = supervisor.services["kernel"].restarts
            os.kill(cluster.processes["kernel"].pid, signal.SIGKILL)
            await asyncio.gather(*tasks)
            assert supervisor.services["kernel"].restarts > restarts
            for agent in agents:
                assert [h.version for n in range(writes) for h in await agent.storage_history(f"k{n}")] == [1] * writes
                assert sorted([e.text async for e in agent.memory_list()]) == sorted(f"note {n}" for n in range(writes))

    asyncio.run(scenario())
