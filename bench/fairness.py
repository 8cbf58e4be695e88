"""Fair share for people waiting: one heavy agent floods the LLM, light agents want their first answer.

One heavy agent makes HEAVY_CALLS calls at once; LIGHT_AGENTS light agents make
LIGHT_CALLS calls each, all at the same moment, every call a short generation
of exactly CALL_TOKENS tokens. With fifo the light agents wait behind the
flood; fair share (VTC) should serve every light agent's first call early and
evenly without losing throughput. Measured per policy: each light agent's time
to first response (its first call to finish, from the common start), their
median, worst, spread and Jain's index, the heavy agent's finish, tok/s.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from deploy.cluster import Cluster, ClusterConfig
from services.llm_core.model import default_model_path

HEAVY_CALLS = 32
LIGHT_AGENTS = 24
LIGHT_CALLS = 2  # a light agent's first answer is what fair share is about; its later calls only lengthen the run
CALL_TOKENS = 16
POLICIES = ("fifo", "fair")


def jain(values: list[float]) -> float:
    """Jain's fairness index: 1.0 when every agent got the same, 1/n when one got everything."""
    if not values or not any(values):
        return 0.0
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


def run_scenario(policy: str, slots: int, say: Callable[[str], None]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"aios-bench-fair-{policy}-") as home:
        say(f"fairness: starting AIOS ({policy}, {slots} slots) ...")
        with Cluster(ClusterConfig(home=Path(home), policy=policy, slots=slots, model=default_model_path())) as cluster:
            with cluster.connect() as kernel:
                kernel.register("bench-warm-up").complete("Hello", max_tokens=8, ignore_eos=True)
                heavy = kernel.register("heavy", concurrent_syscalls=HEAVY_CALLS)
                lights = [kernel.register(f"light-{i}") for i in range(LIGHT_AGENTS)]
                calls = [(heavy, j) for j in range(HEAVY_CALLS)] + [(a, j) for a in lights for j in range(LIGHT_CALLS)]
                barrier = threading.Barrier(len(calls))
                say(f"fairness ({policy}): 1 agent x {HEAVY_CALLS} calls + {LIGHT_AGENTS} agents x {LIGHT_CALLS}, "
                    f"all at once, {CALL_TOKENS} tokens each ...")

                def call(job: tuple[Any, int]) -> tuple[str, float, float, int]:
                    agent, j = job
                    barrier.wait()
                    released = time.monotonic()
                    done = agent.complete(f"Note {j} of {agent.name}: the weather today is", max_tokens=CALL_TOKENS,
                                          ignore_eos=True, timeout=600)
                    return agent.name, released, time.monotonic(), done.completion_tokens

                with ThreadPoolExecutor(len(calls)) as pool:
                    runs = list(pool.map(call, calls))
    start = min(released for _, released, _, _ in runs)
    finished = [(name, at, tokens) for name, _, at, tokens in runs]
    first: dict[str, float] = {}
    for name, at, _ in finished:
        first[name] = min(first.get(name, at), at)
    ttfr = [first[a.name] - start for a in lights]
    end = max(at for _, at, _ in finished)
    row = {
        "ttfr_p50_s": statistics.median(ttfr),
        "ttfr_max_s": max(ttfr),
        "ttfr_min_s": min(ttfr),
        "ttfr_spread_s": max(ttfr) - min(ttfr),
        "ttfr_jain": jain(ttfr),
        "heavy_done_s": max(at for name, at, _ in finished if name == "heavy") - start,
        "tok_per_s": sum(tokens for _, _, tokens in finished) / (end - start),
    }
    say(f"  light agents' first answer: p50 {row['ttfr_p50_s']:.1f} s, worst {row['ttfr_max_s']:.1f} s, "
        f"Jain {row['ttfr_jain']:.2f}; heavy done at {row['heavy_done_s']:.1f} s; {row['tok_per_s']:.1f} tok/s")
    return row


def run_fairness_bench(say: Callable[[str], None], slots: int = ClusterConfig.slots) -> dict[str, Any]:
    return {"heavy_calls": HEAVY_CALLS, "light_agents": LIGHT_AGENTS, "light_calls": LIGHT_CALLS,
            "call_tokens": CALL_TOKENS, "slots": slots,
            "policies": {policy: run_scenario(policy, slots, say) for policy in POLICIES}}


def fairness_table(result: dict[str, Any]) -> str:
    lines = [f"fair share, 1 agent x {result['heavy_calls']} calls + {result['light_agents']} agents x "
             f"{result['light_calls']} calls at once ({result['call_tokens']} tokens each, {result['slots']} slots): "
             f"light agents' time to first response",
             f"{'policy':<8}{'p50 s':>8}{'worst s':>9}{'spread s':>10}{'jain':>7}{'heavy done s':>14}{'tok/s':>8}"]
    for policy, r in result["policies"].items():
        lines.append(f"{policy:<8}{r['ttfr_p50_s']:>8.1f}{r['ttfr_max_s']:>9.1f}{r['ttfr_spread_s']:>10.1f}"
                     f"{r['ttfr_jain']:>7.2f}{r['heavy_done_s']:>14.1f}{r['tok_per_s']:>8.1f}")
    return "\n".join(lines)
