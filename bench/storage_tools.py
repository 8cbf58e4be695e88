"""Storage throughput and tool-call latency through the kernel, side by side in one run.

Storage: durable writes (each an fsync'd transaction), reads of the newest
version, and BM25 searches over an agent's records, from 4 agents at once.
Tools: the latency of one call of a built-in tool (calculator), the sandboxed
Python runner (a child process confined per call) and a tool mounted from an
MCP server over stdio, one caller, measured the same way.
Access: what checking an agent's token costs the kernel per RPC (its cache hit,
and a miss that reads Redis), on the same system's Redis.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

import aios
from deploy.cluster import Cluster, ClusterConfig
from services import redis_state
from services.scheduler.identity import AgentRegistry
from services.tools.sandbox import Sandbox

WORDS = "river signal ledger orbit canyon lantern meadow circuit compass glacier market tunnel beacon archive".split()


def throughput(agents: list[aios.Agent], per_agent: int, operation: Callable[[aios.Agent, int], Any]) -> float:
    """Operations per second with every agent running `per_agent` operations at once."""
    def work(agent: aios.Agent) -> None:
        for i in range(per_agent):
            operation(agent, i)

    started = time.monotonic()
    with ThreadPoolExecutor(len(agents)) as pool:
        list(pool.map(work, agents))
    return len(agents) * per_agent / (time.monotonic() - started)


def latency(call: Callable[[], Any], reps: int) -> dict[str, float]:
    call()  # warm: channels, imports, the MCP session
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
    return {"p50_ms": 1e3 * statistics.median(samples), "p95_ms": 1e3 * float(np.percentile(samples, 95))}


def run_storage_tools_bench(say: Callable[[str], None], per_agent: int = 150) -> dict[str, Any]:
    result: dict[str, Any] = {}
    config = ClusterConfig(slots=2, extra_args={"tools": ["--mcp", f"words={sys.executable} -m services.tools.example_mcp_server"]})
    with tempfile.TemporaryDirectory(prefix="aios-bench-storage-") as home:
        config.home = Path(home)
        with Cluster(config) as cluster, cluster.connect() as kernel:
            agents = [kernel.register(f"store-{i}") for i in range(4)]

            def text(i: int) -> str:
                return " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(60))

            say(f"storage: 4 agents x {per_agent} writes, reads, searches through the kernel ...")
            result["storage_writes_per_s"] = throughput(agents, per_agent, lambda a, i: a.storage_write(f"doc/{i}", text(i)))
            result["storage_reads_per_s"] = throughput(agents, per_agent, lambda a, i: a.storage_read(f"doc/{i}"))
            result["storage_searches_per_s"] = throughput(
                agents, per_agent // 3, lambda a, i: a.storage_search(f"{WORDS[i % len(WORDS)]} {WORDS[(i + 3) % len(WORDS)]}")
            )
            say(f"  {result['storage_writes_per_s']:.0f} durable writes/s, {result['storage_reads_per_s']:.0f} reads/s, "
                f"{result['storage_searches_per_s']:.0f} searches/s")
            agent = agents[0]
            say("tools: latency of one call, built-in vs sandboxed vs MCP ...")
            result["tool_latency"] = {
                "builtin (calculator)": latency(lambda: agent.call_tool("calculator", expression="6*7"), 100),
                "sandboxed (python)": latency(lambda: agent.call_tool("python", code="print(6*7)"), 20),
                "mcp (words__word_count)": latency(lambda: agent.call_tool("words__word_count", text="six times seven"), 100),
            }
            for name, row in result["tool_latency"].items():
                say(f"  {name:<24} p50 {row['p50_ms']:.1f} ms, p95 {row['p95_ms']:.1f} ms")
            say("sandbox: bubblewrap vs the plain launcher, one run of print(6*7) each in turn ...")
            result["sandbox_launchers"] = asyncio.run(sandbox_launchers())
            say(f"  bubblewrap p50 {result['sandbox_launchers']['bwrap_ms_p50']:.1f} ms, plain launcher p50 "
                f"{result['sandbox_launchers']['plain_ms_p50']:.1f} ms")
            say("access: the kernel's token check per RPC ...")
            result["token_check"] = asyncio.run(token_check_cost(cluster, agent.token))
            say(f"  cached p50 {result['token_check']['cached_us_p50']:.1f} us, "
                f"uncached (Redis) p50 {result['token_check']['uncached_us_p50']:.1f} us")
    return result


async def sandbox_launchers(reps: int = 20) -> dict[str, float]:
    """The python tool's sandbox in this process, with bubblewrap and with the plain launcher, alternating."""
    confined, plain = Sandbox(), Sandbox()
    plain.bwrap = ""
    times: dict[str, list[float]] = {"bwrap": [], "plain": []}
    for _ in range(reps):
        for label, box in (("bwrap", confined), ("plain", plain)):
            t0 = time.perf_counter()
            await box.run("print(6*7)")
            times[label].append(time.perf_counter() - t0)
    return {f"{label}_ms_p50": 1e3 * statistics.median(samples) for label, samples in times.items()}


async def token_check_cost(cluster: Cluster, token: str, reps: int = 20_000, misses: int = 500) -> dict[str, float]:
    """Microseconds the kernel's AgentRegistry takes to turn a call's metadata into its caller."""
    redis = redis_state.connect(cluster.redis_url)
    metadata = (("authorization", f"Bearer {token}"),)
    try:
        registry = AgentRegistry(redis, cluster.operator_token)
        await registry.authenticate(metadata)
        cached = []
        for _ in range(reps):
            t0 = time.perf_counter()
            await registry.authenticate(metadata)
            cached.append(time.perf_counter() - t0)
        uncached = []
        for _ in range(misses):
            fresh = AgentRegistry(redis, cluster.operator_token)  # an empty cache: the lookup goes to Redis
            t0 = time.perf_counter()
            await fresh.authenticate(metadata)
            uncached.append(time.perf_counter() - t0)
            await fresh.close()
        await registry.close()
    finally:
        await redis.aclose()
    return {"cached_us_p50": 1e6 * statistics.median(cached), "cached_us_p95": 1e6 * float(np.percentile(cached, 95)),
            "uncached_us_p50": 1e6 * statistics.median(uncached),
            "uncached_us_p95": 1e6 * float(np.percentile(uncached, 95))}


def storage_tools_table(result: dict[str, Any]) -> str:
    lines = [
        f"storage (4 agents, through the kernel): {result['storage_writes_per_s']:.0f} durable writes/s, "
        f"{result['storage_reads_per_s']:.0f} reads/s, {result['storage_searches_per_s']:.0f} searches/s",
        f"{'tool call':<26}{'p50 ms':>8}{'p95 ms':>8}",
    ]
    for name, row in result["tool_latency"].items():
        lines.append(f"{name:<26}{row['p50_ms']:>8.1f}{row['p95_ms']:>8.1f}")
    boxes = result["sandbox_launchers"]
    lines.append(f"python sandbox in-process: bubblewrap {boxes['bwrap_ms_p50']:.1f} ms p50, plain launcher "
                 f"{boxes['plain_ms_p50']:.1f} ms (+{boxes['bwrap_ms_p50'] - boxes['plain_ms_p50']:.1f} ms; budget +20 ms)")
    check = result["token_check"]
    lines.append(f"token check per kernel RPC: {check['cached_us_p50']:.1f} us p50 ({check['cached_us_p95']:.1f} p95) "
                 f"cached, {check['uncached_us_p50']:.0f} us p50 on a cache miss (Redis); target < 50 us")
    return "\n".join(lines)
