"""Time to recover from kill -9 of the LLM core with 16 agents streaming.

One AIOS (16 slots) under the supervisor of `aios up`; 16 agents each stream a
generation; once every stream has its first 16 tokens the core gets SIGKILL.
Measured per trial: the core's restart (process start and model load, as the
supervisor sees it), and for each stream the time from the kill to its first
token after the core's return (the kernel rebuilt it by replay; tokens in flight at the kill do not count). Every stream must come out
whole (token indexes 1..N, no gap, no repeat); the bench fails loudly if not.
"""

from __future__ import annotations

import os
import signal
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from deploy.cluster import SERVICE_ORDER, Cluster, ClusterConfig
from deploy.supervisor import RestartPolicy, Supervisor, supervising

AGENTS = 16
TOKENS = 96
KILL_AFTER = 16
PROMPTS = [f"Write a long list of facts about the number {n}." for n in range(AGENTS)]


def trial(cluster: Cluster, supervisor: Supervisor, kernel: Any) -> dict[str, float]:
    agents = [kernel.register(f"recovery-{i}-{time.monotonic_ns()}") for i in range(AGENTS)]
    arrivals: list[list[tuple[int, float]]] = [[] for _ in agents]  # (token index, monotonic time)
    all_started = threading.Barrier(AGENTS + 1)

    def stream(i: int) -> None:
        first = True
        for chunk in agents[i].generate(PROMPTS[i], max_tokens=TOKENS, ignore_eos=True, timeout=600):
            if chunk.HasField("token_id"):
                arrivals[i].append((chunk.completion_tokens, time.monotonic()))
                if len(arrivals[i]) == KILL_AFTER and first:
                    first = False
                    all_started.wait()

    restarts = supervisor.services["llm_core"].restarts
    with ThreadPoolExecutor(AGENTS) as pool:
        futures = [pool.submit(stream, i) for i in range(AGENTS)]
        all_started.wait()
        os.kill(cluster.processes["llm_core"].pid, signal.SIGKILL)
        killed, killed_wall = time.monotonic(), time.time()
        for future in futures:
            future.result()
    restarted_at = supervisor.services["llm_core"].started_at  # wall clock of the restart's end
    for i, got in enumerate(arrivals):
        if [index for index, _ in got] != list(range(1, TOKENS + 1)):
            raise AssertionError(f"stream {i} is not whole after the recovery: {[index for index, _ in got]}")
    if supervisor.services["llm_core"].restarts != restarts + 1:
        raise AssertionError("the supervisor did not restart the LLM core exactly once")
    core_back_s = restarted_at - killed_wall
    # Tokens that were in flight when the core died arrive just after the kill; count from the core's return.
    after = [next(t for _, t in got if t > killed + core_back_s) - killed for got in arrivals]
    return {"first_token_after_kill_s_min": min(after), "first_token_after_kill_s_p50": statistics.median(after),
            "first_token_after_kill_s_max": max(after),
            "core_back_s": core_back_s}


def run_recovery_bench(say: Callable[[str], None], trials: int = 2) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="aios-bench-recovery-") as home:
        say(f"recovery: {AGENTS} agents streaming, kill -9 of the LLM core after {KILL_AFTER} tokens each, "
            f"{trials} trials ...")
        with Cluster(ClusterConfig(home=Path(home), slots=AGENTS)) as cluster, cluster.connect() as kernel:
            names = [n for n in ("redis", *SERVICE_ORDER) if n in cluster.processes]
            supervisor = Supervisor(cluster, names, RestartPolicy(), say=lambda line: say(f"  supervisor: {line}"))
            with supervising(supervisor):
                rows = []
                for number in range(trials):
                    rows.append(trial(cluster, supervisor, kernel))
                    say(f"  trial {number + 1}: core back {rows[-1]['core_back_s']:.2f} s after the kill; first token "
                        f"after it p50 {rows[-1]['first_token_after_kill_s_p50']:.2f} s, "
                        f"max {rows[-1]['first_token_after_kill_s_max']:.2f} s")
    return {"agents": AGENTS, "tokens": TOKENS, "kill_after_tokens": KILL_AFTER, "trials": rows,
            **{key: statistics.median(r[key] for r in rows) for key in rows[0]}}


def recovery_table(result: dict[str, Any]) -> str:
    return (f"recovery from kill -9 of the LLM core, {result['agents']} agents streaming (median of "
            f"{len(result['trials'])} trials): core serving again {result['core_back_s']:.2f} s after the kill; "
            f"first token after the kill: first stream {result['first_token_after_kill_s_min']:.2f} s, "
            f"p50 {result['first_token_after_kill_s_p50']:.2f} s, last {result['first_token_after_kill_s_max']:.2f} s")
