"""Chaos: eight agents under a mixed load while every kind of AIOS process is killed with SIGKILL in turn.

The LLM core, memory, storage, the kernel and Redis each die once, at a random point of the load, and the
real supervisor of `aios up` (deploy/supervisor.py, ticking in a thread here) restarts them. At the end:
every acknowledged write is there exactly once, every generation came out whole (token indexes 1..N, no
gap, no repeat), every service serves, and stopping leaves no process behind. Recovery times are printed.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest

import aios
from deploy.cluster import Cluster, ClusterConfig, process_alive
from deploy.supervisor import RestartPolicy, ServiceState, Supervisor, supervising
from tests.integration.waiting import wait_until

AGENTS = 8
TOKENS = 24
FAULTS = ("llm_core", "memory", "storage", "kernel", "redis")


@dataclass
class Load:
    """What the agents were told succeeded, and every failure they saw."""
    notes: dict[str, list[str]] = field(default_factory=dict)  # agent id -> texts acknowledged by memory_add
    records: dict[str, dict[str, bytes]] = field(default_factory=dict)  # agent id -> key -> data acknowledged
    generations: list[list[int]] = field(default_factory=list)  # the token indexes each generation streamed
    tool_results: int = 0
    errors: list[str] = field(default_factory=list)
    done: int = 0  # operations acknowledged, all kinds
    lock: threading.Lock = field(default_factory=threading.Lock)


def agent_loop(agent: aios.Agent, number: int, load: Load, stop: threading.Event) -> None:
    rng = random.Random(number)
    load.notes[agent.id], load.records[agent.id] = [], {}
    i = 0
    while not stop.is_set():
        i += 1
        kind = ("generate", "memory", "storage", "tool")[i % 4]
        try:
            if kind == "generate":
                sampling = {"temperature": 0.8, "top_k": 40, "seed": rng.randrange(1 << 30)} if i % 8 == 0 else {}
                indexes = [c.completion_tokens for c in agent.generate(
                    f"Agent {number} counts: 1, 2, 3,", max_tokens=TOKENS, ignore_eos=True, timeout=300, **sampling)
                    if c.HasField("token_id")]
                with load.lock:
                    load.generations.append(indexes)
            elif kind == "memory":
                text = f"note {i} of agent {number}"
                agent.memory_add(text)
                load.notes[agent.id].append(text)
            elif kind == "storage":
                key, data = f"chaos/{i}", f"record {i} of agent {number}".encode()
                agent.storage_write(key, data)
                load.records[agent.id][key] = data
            else:
                assert agent.call_tool("calculator", expression=f"{i}*2")["result"] == i * 2
                with load.lock:
                    load.tool_results += 1
            with load.lock:
                load.done += 1
        except aios.SyscallError as exc:
            with load.lock:
                load.errors.append(f"{kind}: {exc}")


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory):
    config = ClusterConfig(home=tmp_path_factory.mktemp("aios-chaos"), slots=4)
    cluster = Cluster(config)
    cluster.start()
    try:
        names = list(cluster.processes)  # in start order
        supervisor = Supervisor(cluster, names, RestartPolicy(first_delay_s=0.1), say=print)
        with supervising(supervisor):
            yield cluster, supervisor
    finally:
        pids = [p.pid for p in cluster.processes.values()]
        cluster.stop()
        assert not [pid for pid in pids if process_alive(pid)], "processes left behind"


def test_nothing_acknowledged_is_lost_and_every_stream_is_whole_when_each_process_is_killed(chaos):
    cluster, supervisor = chaos
    rng = random.Random(7)
    with cluster.connect() as kernel:
        agents = [kernel.register(f"chaos-{n}") for n in range(AGENTS)]
        load, stop = Load(), threading.Event()
        threads = [threading.Thread(target=agent_loop, args=(a, n, load, stop)) for n, a in enumerate(agents)]
        for thread in threads:
            thread.start()
        recovery: dict[str, float] = {}
        try:
            for fault in FAULTS:
                wait_until(lambda: load.done >= 20, within_s=180, what="some load before the fault")
                start = load.done
                wait_until(lambda: load.done >= start + rng.randrange(4, 16), within_s=180, what="a random point")
                restarts = supervisor.services[fault].restarts
                os.kill(cluster.processes[fault].pid, signal.SIGKILL)
                killed = time.monotonic()
                wait_until(lambda: supervisor.services[fault].restarts > restarts, within_s=120,
                           what=f"{fault} restarted")
                after = load.done
                wait_until(lambda: load.done >= after + 8, within_s=180, what=f"load going on after {fault}")
                recovery[fault] = time.monotonic() - killed
                with load.lock:
                    load.done = 0
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=300)
        print("\nrecovery (kill -9 to 8 more operations acknowledged): "
              + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in recovery.items()))
        assert load.errors == []
        assert load.generations and all(g == list(range(1, TOKENS + 1)) for g in load.generations)
        for agent in agents:
            stored_notes = Counter(e.text for e in agent.memory_list(page_size=500))
            assert all(stored_notes[text] == 1 for text in load.notes[agent.id])  # there, and once
            stored = {r.key: r for r in agent.storage_list("chaos/")}
            for key, data in load.records[agent.id].items():
                assert stored[key].version == 1 and agent.storage_read(key) == data
        assert all(s.healthy for s in kernel.status().services) and kernel.status().redis_ok
        assert all(r.state is ServiceState.RUNNING and r.restarts == (1 if n in FAULTS else 0)
                   for n, r in supervisor.services.items())
