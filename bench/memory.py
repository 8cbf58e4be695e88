"""Memory paging benchmark: one reference trace replayed against the real memory service under LRU, LRU-2, LRU-3.

The data: `agents` agents with `entries` notes each, ~256 bytes a note, 8 notes a
block; the RAM budget is ~10% of it. The trace:
- hot references (70% of notes read): one Get each, Zipf-like popularity over
  agents and, within an agent, over its blocks (a few agents and their recent
  notes are read again and again);
- scans (30% of notes read): an agent's whole history listed once, a block per
  List page (an agent re-reading its past, an export), each note once.
Every mode starts a memory service on its own copy of the same files and
replays the same trace, so the hit ratios are side by side.
"""

from __future__ import annotations

import random
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable


import numpy as np

from aios.v1 import memory_pb2, memory_pb2_grpc
from deploy.cluster import Cluster, ClusterConfig

ENTRIES_PER_BLOCK = 8
NOTE_BYTES = 256
WRITERS = 10  # agents populating at once


def make_trace(agents: int, entries: int, references: int, scan_share: float, seed: int) -> list[tuple[int, int]]:
    """(agent, entry number) references; a scan's are consecutive numbers of one agent."""
    rng = random.Random(seed)
    blocks = entries // ENTRIES_PER_BLOCK
    agent_weights = [1 / (a + 1) ** 1.1 for a in range(agents)]
    block_weights = [1 / (b + 1) ** 1.1 for b in range(blocks)]  # recent blocks first (reversed below)
    scan_start = scan_share / (entries * (1 - scan_share) + scan_share)  # so that scans are scan_share of references
    trace: list[tuple[int, int]] = []
    while len(trace) < references:
        if rng.random() < scan_start:
            agent = rng.randrange(agents)
            trace += [(agent, n) for n in range(1, entries + 1)]
        else:
            agent = rng.choices(range(agents), agent_weights)[0]
            block = blocks - 1 - rng.choices(range(blocks), block_weights)[0]
            trace.append((agent, block * ENTRIES_PER_BLOCK + rng.randrange(ENTRIES_PER_BLOCK) + 1))
    return trace[:references]


def populate(stub: Any, agents: int, entries: int, say: Callable[[str], None]) -> list[list[str]]:
    """ids[agent][n - 1]: WRITERS agents at a time add their notes, each agent's in order (the memory manager commits
    concurrent adds together, one fsync for many)."""
    rng = random.Random(7)
    words = "river signal ledger orbit canyon lantern meadow circuit compass glacier market tunnel".split()
    texts = [[" ".join(rng.choice(words) for _ in range(NOTE_BYTES // 7))[:NOTE_BYTES] for _ in range(entries)]
             for _ in range(agents)]

    def add_all(agent: int) -> list[str]:
        return [stub.Add(memory_pb2.MemoryAddRequest(agent_id=f"agent-{agent}", text=text), timeout=30).id
                for text in texts[agent]]

    ids: list[list[str]] = []
    started = time.monotonic()
    with ThreadPoolExecutor(WRITERS) as pool:
        for agent_ids in pool.map(add_all, range(agents)):
            ids.append(agent_ids)
            if len(ids) % 10 == 0:
                say(f"  populated {len(ids)}/{agents} agents ({len(ids) * entries} notes, {WRITERS} writers, "
                    f"{len(ids) * entries / (time.monotonic() - started):.0f} durable adds/s)")
    return ids


def requests(trace: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(agent, first number, count): a scan's references become List pages of one block, the rest Gets."""
    out: list[tuple[int, int, int]] = []
    i = 0
    while i < len(trace):
        agent, n = trace[i]
        run = 1
        while (i + run < len(trace) and trace[i + run] == (agent, n + run) and run < ENTRIES_PER_BLOCK
               and (n - 1) % ENTRIES_PER_BLOCK == 0):
            run += 1
        out.append((agent, n, run))
        i += run
    return out


def replay(stub: Any, ids: list[list[str]], trace: list[tuple[int, int]]) -> dict[str, Any]:
    before = stub.Stats(memory_pb2.MemoryStatsRequest(), timeout=10)
    latencies = []
    started = time.monotonic()
    for agent, n, count in requests(trace):
        name = f"agent-{agent}"
        if count > 1:
            token = ids[agent][n - 2] if n > 1 else ""
            stub.List(memory_pb2.MemoryListRequest(agent_id=name, page_size=count, page_token=token), timeout=30)
            continue
        t0 = time.perf_counter()
        stub.Get(memory_pb2.MemoryGetRequest(agent_id=name, id=ids[agent][n - 1]), timeout=30)
        latencies.append(time.perf_counter() - t0)
    wall = time.monotonic() - started
    after = stub.Stats(memory_pb2.MemoryStatsRequest(), timeout=10)
    hits, faults = after.hits - before.hits, after.faults - before.faults
    return {
        "references": len(trace),
        "hit_ratio": hits / (hits + faults),
        "faults": faults,
        "faults_per_s": faults / wall,
        "notes_read_per_s": len(trace) / wall,
        "get_p50_ms": 1e3 * float(np.percentile(latencies, 50)),
        "get_p99_ms": 1e3 * float(np.percentile(latencies, 99)),
        "resident_bytes": after.resident_bytes,
    }


def fault_versus_hit(stub: Any, ids: list[list[str]], untouched: list[int], reps: int = 100) -> dict[str, float]:
    """Get latency of a block on disk (each of a never-referenced agent's blocks: a fault) against a resident one."""
    faults, hits = [], []
    blocks = [(a, b) for a in untouched for b in range(len(ids[a]) // ENTRIES_PER_BLOCK)][:reps]
    for agent, block in blocks:
        for into, n in ((faults, block * ENTRIES_PER_BLOCK), (hits, block * ENTRIES_PER_BLOCK + 1)):
            t0 = time.perf_counter()
            stub.Get(memory_pb2.MemoryGetRequest(agent_id=f"agent-{agent}", id=ids[agent][n]), timeout=30)
            into.append(time.perf_counter() - t0)
    return {
        "fault_get_p50_ms": 1e3 * statistics.median(faults),
        "fault_get_p99_ms": 1e3 * float(np.percentile(faults, 99)),
        "hit_get_p50_ms": 1e3 * statistics.median(hits),
        "hit_get_p99_ms": 1e3 * float(np.percentile(hits, 99)),
    }


def run_memory_bench(say: Callable[[str], None], agents: int = 60, entries: int = 64, references: int = 4_000) -> dict[str, Any]:
    data_bytes = agents * entries * NOTE_BYTES
    budget = data_bytes // 10
    trace = make_trace(agents - 10, entries, references, scan_share=0.3, seed=11)  # the last 10 agents stay cold
    say(f"memory: {agents} agents x {entries} notes of {NOTE_BYTES} B = {data_bytes / 1e6:.2f} MB, "
        f"RAM budget {budget / 1e3:.0f} KB (10%), trace of {len(trace)} notes read (30% in scans)")
    result: dict[str, Any] = {"agents": agents, "entries_per_agent": entries, "data_bytes": data_bytes,
                              "ram_budget_bytes": budget, "trace_references": len(trace), "modes": {}}
    with tempfile.TemporaryDirectory(prefix="aios-bench-memory-") as home:
        cluster = Cluster(ClusterConfig(home=Path(home)))
        try:
            options = ["--ram-budget-bytes", str(budget), "--entries-per-block", str(ENTRIES_PER_BLOCK)]
            cluster.add_replica("memory-seed", "memory", options)
            with cluster.manager_channel("memory-seed") as channel:
                started = time.monotonic()
                ids = populate(memory_pb2_grpc.MemoryStub(channel), agents, entries, say)
                result["durable_adds_per_s"] = agents * entries / (time.monotonic() - started)
                result["writers"] = WRITERS
            cluster.stop_service("memory-seed")
            for k in (1, 2, 3):
                name = f"memory-lru{k}"
                shutil.copytree(cluster.data / "memory-seed", cluster.data / name)
                cluster.add_replica(name, "memory", [*options, "--lru-k", str(k)])
                with cluster.manager_channel(name) as channel:
                    stub = memory_pb2_grpc.MemoryStub(channel)
                    row = replay(stub, ids, trace)
                    row.update(fault_versus_hit(stub, ids, list(range(agents - 10, agents))))
                cluster.stop_service(name)
                label = "LRU" if k == 1 else f"LRU-{k}"
                result["modes"][label] = row
                say(f"  {label:<6} hit ratio {row['hit_ratio']:.3f}, {row['faults_per_s']:.0f} faults/s, get p50 "
                    f"{row['get_p50_ms']:.2f} ms p99 {row['get_p99_ms']:.2f} ms (fault p50 {row['fault_get_p50_ms']:.2f} ms, "
                    f"hit p50 {row['hit_get_p50_ms']:.2f} ms)")
        finally:
            cluster.stop()
    return result


def memory_table(result: dict[str, Any]) -> str:
    lines = [f"{'policy':<8}{'hit ratio':>10}{'faults/s':>10}{'notes/s':>9}{'get p50':>9}{'get p99':>9}"
             f"{'fault p50':>11}{'fault p99':>11}{'hit p50':>9}   (ms)"]
    for label, r in result["modes"].items():
        lines.append(f"{label:<8}{r['hit_ratio']:>10.3f}{r['faults_per_s']:>10.0f}{r['notes_read_per_s']:>9.0f}"
                     f"{r['get_p50_ms']:>9.2f}{r['get_p99_ms']:>9.2f}{r['fault_get_p50_ms']:>11.2f}"
                     f"{r['fault_get_p99_ms']:>11.2f}{r['hit_get_p50_ms']:>9.2f}")
    return "\n".join(lines)
