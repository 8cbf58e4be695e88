"""Scale: many agents arriving at once, each making the syscalls of an agent's turn.

Every agent registers, then makes one LLM call (16 tokens), memory add + get,
storage write + read and one calculator call, all agents released together
(asyncio SDK, one connection). The LLM core runs the instant backend
(services/llm_core/instant.py: a test double that returns tokens without a
model), so that this measures the kernel and the managers, not llama.cpp.
Per agent count: wall time, syscalls/s, p50/p99 per kind, errors by status,
the kernel's CPU seconds per syscall and how much its resident memory grew per
agent of the wave (agents of earlier waves stay registered); over
the counts, a least-squares line of wall time against agents and its R² (the
AIOS paper's claim is linear scaling from 250 to 2,000 agents). Then 2,000 agents
making non-LLM syscalls as fast as they are answered (syscalls/s), and agents
paced at one syscall a second each (bench/pacing.py; p50/p99), both beside a
bare two-hop gRPC relay under the same loads in the same run (bench/relay.py:
what the transport alone reaches on this machine). Then the same turn for 64
agents with the real model, on a core with 16 slots.
"""

from __future__ import annotations

import asyncio
import collections
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

import aios
import aios.aio
from bench.pacing import latency_ms, pace
from bench.relay import relay_bench
from bench.stats import median_run
from deploy.cluster import Cluster, ClusterConfig

KINDS = ("register", "llm", "memory_add", "memory_get", "storage_write", "storage_read", "tool")
NON_LLM_KINDS = KINDS[2:]  # the syscalls the kernel hands to the memory, storage and tool managers
THROUGHPUT_AGENTS = 2000  # registered first, then every one makes THROUGHPUT_ROUNDS rounds of NON_LLM_KINDS at once
THROUGHPUT_ROUNDS = 2
PACED_SECONDS = 5.0  # each agent of the paced part makes one syscall a second for this long
# Paced runs at the largest count (the floor's), each with new agents: the row kept is the one with the median p99 (the
# same load's p99 spans 25-60 ms from run to run on the 2-core VM), the others' p99 beside it.
PACED_REPEATS = 3
LLM_TOKENS = 16
REAL_MODEL_AGENTS = 64  # the same turn with the real model (16 slots): what the LLM adds to an agent's turn


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def crowd(address: str, token: str, agents: int, tag: str) -> tuple[float, dict[str, list[float]], collections.Counter]:
    latencies: dict[str, list[float]] = collections.defaultdict(list)
    errors: collections.Counter = collections.Counter()

    async def timed(kind: str, call: Any) -> Any:
        started = time.monotonic()
        try:
            result = await call
        except aios.SyscallError as error:
            errors[f"{kind} {error.code.name}"] += 1
            raise
        latencies[kind].append(time.monotonic() - started)
        return result

    async def one(kernel: aios.aio.Connection, i: int) -> None:
        try:
            agent = await timed("register", kernel.register(f"scale-{tag}-{i}"))
            await timed("llm", agent.complete(f"Agent {i}: the next step is", max_tokens=LLM_TOKENS, ignore_eos=True))
            entry = await timed("memory_add", agent.memory_add(f"note {i}"))
            await timed("memory_get", agent.memory_get(entry.id))
            await timed("storage_write", agent.storage_write("k", f"value {i}"))
            await timed("storage_read", agent.storage_read("k"))
            await timed("tool", agent.call_tool("calculator", expression=f"{i} * 2"))
        except aios.SyscallError:
            pass  # counted in errors

    async with aios.aio.connect(address, token=token) as kernel:
        started = time.monotonic()
        await asyncio.gather(*(one(kernel, i) for i in range(agents)))
        return time.monotonic() - started, latencies, errors


async def register_agents(kernel: aios.aio.Connection, n: int, tag: str, errors: collections.Counter) -> list[Any]:
    """`n` agents registered a few hundred at a time (not measured: the parts below time what they then do); a
    refused registration is counted in `errors`."""
    agents: list[Any] = []
    for first in range(0, n, 250):
        for agent in await asyncio.gather(*(kernel.register(f"{tag}-{i}") for i in range(first, min(n, first + 250))),
                                          return_exceptions=True):
            if isinstance(agent, aios.SyscallError):
                errors[f"register {agent.code.name}"] += 1
            elif isinstance(agent, BaseException):
                raise agent
            else:
                agents.append(agent)
    return agents


class NonLLMTurn:
    """One agent's non-LLM syscalls in a fixed rotation (memory add, then get of that entry, storage write, read,
    a calculator call): the next one, timed, errors counted by kind and status."""

    def __init__(self, agent: Any, latencies: dict[str, list[float]], errors: collections.Counter) -> None:
        self.agent, self.latencies, self.errors = agent, latencies, errors
        self.step, self.entry_id = 0, ""

    async def next(self, since: float | None = None) -> None:
        """The next syscall of the rotation; its latency counted from `since` (a paced call's scheduled time) or
        from now."""
        kind = NON_LLM_KINDS[self.step % len(NON_LLM_KINDS)]
        started = time.monotonic() if since is None else since
        agent, n = self.agent, self.step
        self.step += 1
        try:
            if kind == "memory_add":
                self.entry_id = (await agent.memory_add(f"note {n}")).id
            elif kind == "memory_get":
                await agent.memory_get(self.entry_id)
            elif kind == "storage_write":
                await agent.storage_write("k", f"value {n}")
            elif kind == "storage_read":
                await agent.storage_read("k")
            else:
                await agent.call_tool("calculator", expression=f"{n} * 2")
        except aios.SyscallError as error:
            self.errors[f"{kind} {error.code.name}"] += 1
            return
        self.latencies[kind].append(time.monotonic() - started)


def summary(latencies: dict[str, list[float]], errors: collections.Counter, wall: float) -> dict[str, Any]:
    every = [x for kind in NON_LLM_KINDS for x in latencies[kind]]
    return {"syscalls": len(every), "wall_s": wall, "syscalls_per_s": len(every) / wall, "errors": dict(errors),
            **latency_ms(every)}


async def registered_turns(kernel: aios.aio.Connection, n: int, tag: str
                           ) -> tuple[list[NonLLMTurn], dict[str, list[float]], collections.Counter]:
    """`n` new agents' rotations of non-LLM syscalls, with the latencies and errors they will count."""
    latencies: dict[str, list[float]] = collections.defaultdict(list)
    errors: collections.Counter = collections.Counter()
    agents = await register_agents(kernel, n, tag, errors)
    return [NonLLMTurn(agent, latencies, errors) for agent in agents], latencies, errors


async def non_llm_throughput(address: str, token: str, n: int, rounds: int) -> dict[str, Any]:
    """`n` registered agents at once, each `rounds` rounds of the non-LLM syscalls one after another."""
    async with aios.aio.connect(address, token=token) as kernel:
        turns, latencies, errors = await registered_turns(kernel, n, "throughput")

        async def agent_turns(turn: NonLLMTurn) -> None:
            for _ in range(rounds * len(NON_LLM_KINDS)):
                await turn.next()

        started = time.monotonic()
        await asyncio.gather(*(agent_turns(turn) for turn in turns))
        return summary(latencies, errors, time.monotonic() - started)


async def paced(address: str, token: str, n: int, seconds: float, tag: str) -> dict[str, Any]:
    """`n` newly registered agents (named by `tag`), each making one non-LLM syscall a second (bench/pacing.py) for
    `seconds`: latency counted from each call's scheduled time, so a call that starts late counts its wait."""
    async with aios.aio.connect(address, token=token) as kernel:
        turns, latencies, errors = await registered_turns(kernel, n, f"paced-{tag}")
        wall = await pace(n, seconds, lambda i, due: turns[i].next(since=due))
        return summary(latencies, errors, wall)


def paced_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """What the paced runs of one agent count report: the run with the median p99 (bench/stats.py), with the errors
    of all of them (an error in any run counts)."""
    errors: collections.Counter = collections.Counter()
    for run in runs:
        errors.update(run["errors"])
    return {**median_run(runs, "p99_ms"), "errors": dict(errors)}


def p99_runs(row: dict[str, Any]) -> str:
    """The p99 of every paced run behind `row`, when there were several, for the progress line and the table."""
    runs = row.get("p99_ms_runs", [])
    return f" (the median of {len(runs)} runs' p99s: {', '.join(f'{p:.0f}' for p in runs)})" if len(runs) > 1 else ""


def wave(run: Callable[[Any], Any], cluster: Cluster, n: int, tag: str) -> dict[str, Any]:
    """`n` agents at once on `cluster`: wall time, rates, errors, the kernel's CPU and memory, latencies per kind.
    `run` runs a coroutine on the part's one event loop."""
    kernel_pid = cluster.processes["kernel"].pid
    cpu, rss = process_cpu_seconds(kernel_pid), process_rss_bytes(kernel_pid)
    wall, latencies, errors = run(crowd(cluster.kernel_address, cluster.operator_token, n, tag))
    done = sum(len(v) for v in latencies.values())
    return {
        "wall_s": wall,
        "syscalls": done,
        "syscalls_per_s": done / wall,
        "errors": dict(errors),
        "kernel_cpu_ms_per_syscall": 1000 * (process_cpu_seconds(kernel_pid) - cpu) / max(done, 1),
        "kernel_rss_kb_per_agent": (process_rss_bytes(kernel_pid) - rss) / 1024 / n,
        **{f"{kind}_{key}": ms for kind in KINDS if latencies[kind] for key, ms in latency_ms(latencies[kind]).items()},
    }


def run_scale_bench(say: Callable[[str], None], agent_counts: list[int], paced_counts: list[int]) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    paced_rows: dict[str, dict[str, Any]] = {}
    # One event loop for every client of the part: gRPC's asyncio poller stays with the loop it started on, and a
    # second asyncio.run() in the same process found it calling into the first, closed one.
    with asyncio.Runner() as loop, tempfile.TemporaryDirectory(prefix="aios-bench-scale-") as home:
        say("scale: starting AIOS with the instant LLM backend (a test double: no model runs) ...")
        with Cluster(ClusterConfig(home=Path(home), extra_args={"llm_core": ["--backend", "instant"]})) as cluster:
            for n in agent_counts:
                say(f"scale: {n} agents at once (register, LLM call, memory add+get, storage write+read, calculator) ...")
                rows[str(n)] = wave(loop.run, cluster, n, str(n))
                say(f"  {rows[str(n)]['wall_s']:.1f} s, {rows[str(n)]['syscalls_per_s']:.0f} syscalls/s, "
                    f"{sum(rows[str(n)]['errors'].values())} errors")
            say(f"scale: {THROUGHPUT_AGENTS} registered agents at once, {THROUGHPUT_ROUNDS} rounds of memory add+get, "
                "storage write+read, calculator each ...")
            kernel_pid = cluster.processes["kernel"].pid
            cpu_before = process_cpu_seconds(kernel_pid)
            throughput = loop.run(non_llm_throughput(cluster.kernel_address, cluster.operator_token,
                                                           THROUGHPUT_AGENTS, THROUGHPUT_ROUNDS))
            throughput["kernel_cpu_ms_per_syscall"] = (1000 * (process_cpu_seconds(kernel_pid) - cpu_before)
                                                       / max(throughput["syscalls"], 1))  # registrations included
            say(f"  {throughput['syscalls_per_s']:.0f} non-LLM syscalls/s, {sum(throughput['errors'].values())} errors")
            for n in paced_counts:
                repeats = PACED_REPEATS if n == paced_counts[-1] else 1
                say(f"scale: {n} agents paced at one non-LLM syscall a second each, {PACED_SECONDS:.0f} s"
                    + (f", {repeats} times" if repeats > 1 else "") + " ...")
                runs = [loop.run(paced(cluster.kernel_address, cluster.operator_token, n, PACED_SECONDS, f"{n}-{i}"))
                        for i in range(repeats)]
                row = paced_rows[str(n)] = paced_row(runs)
                say(f"  p50 {row['p50_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms{p99_runs(row)}, "
                    f"{sum(row['errors'].values())} errors")
        # The relay paced at the largest count only: that is where a floor compares them (the table prints the relay
        # beside each paced row it has).
        relay_paced = paced_counts[-1:]
        say("scale: the transport alone, a bare two-hop grpc.aio relay (bench/relay.py), with as many callers at once "
            f"and {relay_paced[0] if relay_paced else 'no'} agents paced alike ...")
        relay = relay_bench(THROUGHPUT_AGENTS, 3, relay_paced, PACED_SECONDS, loop.run)
        ceiling = relay["calls_per_s"]
        say(f"  {ceiling:.0f} calls/s; paced " + ", ".join(f"{n}: p99 {r['p99_ms']:.0f} ms"
                                                          for n, r in relay["paced"].items()))
        for n, row in paced_rows.items():
            if n in relay["paced"]:
                row["relay"] = relay["paced"][n]
        with tempfile.TemporaryDirectory(prefix="aios-bench-scale-") as real_home:
            say(f"scale: {REAL_MODEL_AGENTS} agents at once with the real model ...")
            with Cluster(ClusterConfig(home=Path(real_home))) as cluster:
                real = wave(loop.run, cluster, REAL_MODEL_AGENTS, "real")
                say(f"  {real['wall_s']:.1f} s, {real['syscalls_per_s']:.0f} syscalls/s, "
                    f"{sum(real['errors'].values())} errors")
    result: dict[str, Any] = {
        "agents": rows, "real_model": {str(REAL_MODEL_AGENTS): real}, "paced": paced_rows,
        "non_llm": {**throughput, "agents": THROUGHPUT_AGENTS, "relay_ceiling_calls_per_s": ceiling,
                    "of_relay_ceiling": throughput["syscalls_per_s"] / ceiling}}
    if len(rows) >= 2:
        xs = np.array([int(n) for n in rows], dtype=float)
        ys = np.array([r["wall_s"] for r in rows.values()])
        slope, intercept = np.polyfit(xs, ys, 1)
        fitted = slope * xs + intercept
        total = float(((ys - ys.mean()) ** 2).sum())
        result["fit"] = {"ms_per_agent": 1000 * float(slope), "intercept_s": float(intercept),
                         "r2": 1 - float(((ys - fitted) ** 2).sum()) / total if total else 1.0}
    return result


def scale_table(result: dict[str, Any]) -> str:
    lines = [f"scale: agents arriving at once, each register + LLM call ({LLM_TOKENS} tokens, instant backend: a test "
             "double) + memory add/get + storage write/read + calculator",
             f"{'agents':>7}{'wall s':>8}{'sys/s':>7}{'errors':>8}{'kernel ms/sys':>15}{'RSS+ KB/ag':>11}"
             + "".join(f"{kind + ' p50/p99 ms':>28}" for kind in KINDS)]
    rows = [*result["agents"].items(), *((f"{n} real", r) for n, r in result.get("real_model", {}).items())]
    for n, r in rows:
        lines.append(f"{n:>7}{r['wall_s']:>8.1f}{r['syscalls_per_s']:>7.0f}{sum(r['errors'].values()):>8}"
                     f"{r['kernel_cpu_ms_per_syscall']:>15.2f}{r['kernel_rss_kb_per_agent']:>11.1f}"
                     + "".join(f"{r.get(f'{kind}_p50_ms', 0):>18.0f} / {r.get(f'{kind}_p99_ms', 0):<7.0f}"
                               for kind in KINDS))
    if "non_llm" in result:
        t = result["non_llm"]
        lines.append(f"non-LLM syscalls, {t['agents']} agents at once: {t['syscalls_per_s']:.0f} syscalls/s "
                     f"(p50 {t['p50_ms']:.0f} ms, p99 {t['p99_ms']:.0f} ms, {sum(t['errors'].values())} errors, kernel "
                     f"{t['kernel_cpu_ms_per_syscall']:.2f} ms CPU/syscall); a bare two-hop grpc.aio relay on this "
                     f"machine: {t['relay_ceiling_calls_per_s']:.0f} calls/s (AIOS at {t['of_relay_ceiling']:.2f} of it)")
    for n, r in result.get("paced", {}).items():
        relay = r.get("relay")
        lines.append(f"paced, {n} agents at 1 syscall/s each: {r['syscalls_per_s']:.0f} syscalls/s done, p50 "
                     f"{r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms{p99_runs(r)}, {sum(r['errors'].values())} errors"
                     + (f"; the bare relay paced alike: {relay['calls_per_s']:.0f} calls/s, p50 {relay['p50_ms']:.0f} "
                        f"ms, p99 {relay['p99_ms']:.0f} ms" if relay else ""))
    if "fit" in result:
        fit = result["fit"]
        lines.append(f"wall time = {fit['ms_per_agent']:.1f} ms per agent {fit['intercept_s']:+.1f} s "
                     f"(least squares, R² {fit['r2']:.3f})")
    return "\n".join(lines)
