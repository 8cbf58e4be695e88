"""Time to recover from kill -9 of the LLM core with 16 agents streaming.

One AIOS (16 slots) under the supervisor of `aios up`; 16 agents each stream a
generation; once every stream has its first 16 tokens the core gets SIGKILL.
Measured per trial: the core's restart (process start and model load, as the
supervisor sees it), and for each stream the time from the kill to its first
token after the core's return (the kernel rebuilt it by replay; tokens in flight at the kill do not count). Three
ways back: exact replay for all (`--replay exact`), the default (`--replay auto`: these 16 streams were not decoding
alone, so the core prefills their delivered tokens in a batch), and the default with a hot standby core
(`--llm-standby`). Every stream must come out whole (token indexes 1..N, no gap, no repeat); the bench fails loudly
if not.
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

from deploy.cluster import Cluster, ClusterConfig
from deploy.supervisor import RestartPolicy, Supervisor, supervising

AGENTS = 16
TOKENS = 64
KILL_AFTER = 16
PROMPTS = [f"Write a long list of facts about the number {n}." for n in range(AGENTS)]


def wait(condition: Callable[[], bool], what: str, within_s: float = 180.0) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within_s:.0f} s")
        time.sleep(0.1)  # polling another process's state


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


RECOVERY_MODES = {  # name: the LLM core's extra flags, the services kept on hot standby
    "exact": (["--replay", "exact"], ()),
    "auto": ([], ()),
    "standby": ([], ("llm_core",)),
}


def run_recovery_bench(say: Callable[[str], None], trials: int = 2,
                       modes: tuple[str, ...] = tuple(RECOVERY_MODES)) -> dict[str, Any]:
    """Kills the LLM core under streaming agents once per trial in each mode; with "exact" among the modes, also
    compares the ways of rebuilding a generation in-process (how exact each is, how fast)."""
    result: dict[str, Any] = {"agents": AGENTS, "tokens": TOKENS, "kill_after_tokens": KILL_AFTER}
    # The next standby starts loading 20 s after a promotion, not during the recovery it would slow down.
    for mode in modes:
        extra, standby = RECOVERY_MODES[mode]
        with tempfile.TemporaryDirectory(prefix="aios-bench-recovery-") as home:
            say(f"recovery ({mode}): {AGENTS} agents streaming, kill -9 of the LLM core after {KILL_AFTER} tokens "
                f"each, {trials} trials ...")
            config = ClusterConfig(home=Path(home), slots=AGENTS, extra_args={"llm_core": extra}, standby=standby,
                                   standby_after_s=20.0)
            with Cluster(config) as cluster, cluster.connect() as kernel:
                names = list(cluster.processes)  # in start order
                supervisor = Supervisor(cluster, names, RestartPolicy(), say=lambda line: say(f"  supervisor: {line}"))
                with supervising(supervisor):
                    rows = []
                    for number in range(trials):
                        for name in standby:  # a hot standby must have its model loaded before the fault
                            wait(lambda: cluster.standby_ready(name), f"{name}'s standby ready")
                        rows.append(trial(cluster, supervisor, kernel))
                        say(f"  trial {number + 1}: core back {rows[-1]['core_back_s']:.2f} s after the kill; first "
                            f"token after it p50 {rows[-1]['first_token_after_kill_s_p50']:.2f} s, "
                            f"max {rows[-1]['first_token_after_kill_s_max']:.2f} s")
        result[mode] = {"trials": rows, **{key: statistics.median(r[key] for r in rows) for key in rows[0]}}
    if "exact" in modes:
        result["replay_vs_reprefill"] = replay_against_reprefill(say)
    return result


def replay_against_reprefill(say: Callable[[str], None], cut_points: tuple[int, ...] = (8, 24, 48),
                             tokens: int = 64) -> dict[str, Any]:
    """Three ways to rebuild a generation whose core died, in-process, each sequence decoding alone: replay (the
    delivered tokens fed back one decode step each: what AIOS does for a generation that decoded alone), batched
    replay (`--replay batched`, and `auto` for one that did not: they ride along with the prompt's prefill, the
    sampler still stepping through each) and plain re-prefill
    (prompt and delivered tokens as one longer prompt). How often is the continuation the fault-free one, and how
    long until the first new token?"""
    import queue

    from services.llm_core.engine import BatchEngine, EngineConfig, FinishEvent, Sequence, TokenEvent
    from services.llm_core.model import LlamaModel, default_model_path
    from services.llm_core.sampling import SamplingConfig

    prompts = PROMPTS[:4]
    say(f"recovery: replay vs batched replay vs re-prefill, {len(prompts)} prompts x cut after {cut_points} tokens ...")
    model = LlamaModel(default_model_path())
    engines = {batched: BatchEngine(model, EngineConfig(slots=2, resident=4, max_sequence_tokens=512,
                                                        replay="batched" if batched else "exact"),
                                    swap_out=lambda s: None)
               for batched in (False, True)}
    for engine in engines.values():
        engine.start()
    greedy = SamplingConfig(max_tokens=tokens, ignore_eos=True)

    def run(prompt: list[int], sampling: SamplingConfig, replay: list[int] = (), batched: bool = False
            ) -> tuple[list[int], float]:
        events: queue.Queue = queue.Queue()
        seq = Sequence(f"bench-{time.monotonic_ns()}", "bench", prompt, sampling, events.put)
        seq.replay.extend(replay)
        started, first, out = time.monotonic(), 0.0, []
        engines[batched].submit(seq)
        while not isinstance(event := events.get(timeout=120), FinishEvent):
            if isinstance(event, TokenEvent):
                first = first or time.monotonic() - started
                out.append(event.token_id)
        return out, first

    rows: dict[str, dict[str, Any]] = {way: {"identical": 0, "first_token_s": []}
                                       for way in ("replay", "batched_replay", "reprefill")}
    try:
        for text in prompts:
            prompt = model.tokenize(text, True, True)
            reference, _ = run(prompt, greedy)
            for cut in cut_points:
                shorter = SamplingConfig(max_tokens=tokens - cut, ignore_eos=True)
                for way, (got, first) in {
                    "replay": run(prompt, greedy, reference[:cut]),
                    "batched_replay": run(prompt, greedy, reference[:cut], batched=True),
                    "reprefill": run(prompt + reference[:cut], shorter),
                }.items():
                    rows[way]["identical"] += got == reference[cut:]
                    rows[way]["first_token_s"].append(first)
    finally:
        for engine in engines.values():
            engine.stop()
        model.close()
    cases = len(prompts) * len(cut_points)
    return {"cases": cases, "cut_points": list(cut_points), "tokens": tokens,
            **{f"{way}_identical": row["identical"] for way, row in rows.items()},
            **{f"{way}_first_token_s_p50": statistics.median(row["first_token_s"]) for way, row in rows.items()}}


def recovery_table(result: dict[str, Any]) -> str:
    lines = [f"recovery from kill -9 of the LLM core, {result['agents']} agents streaming (medians of "
             f"{len(next(result[m] for m in RECOVERY_MODES if m in result)['trials'])} trials):"]
    for mode in [m for m in RECOVERY_MODES if m in result]:
        r = result[mode]
        label = {"exact": "exact replay", "auto": "default (auto)", "standby": "default+standby"}[mode]
        lines.append(f"  {label:<16} core serving again {r['core_back_s']:.2f} s after the kill; first token after "
                     f"the kill: first stream {r['first_token_after_kill_s_min']:.2f} s, "
                     f"p50 {r['first_token_after_kill_s_p50']:.2f} s, last {r['first_token_after_kill_s_max']:.2f} s")
    r = result.get("replay_vs_reprefill")
    if r is None:
        return "\n".join(lines)
    lines.append(f"rebuilding a generation, decoding alone ({r['cases']} cases, cut after {r['cut_points']} tokens), "
                 f"token-identical continuations and first new token p50: replay {r['replay_identical']}/{r['cases']} "
                 f"{r['replay_first_token_s_p50']:.2f} s, batched replay {r['batched_replay_identical']}/{r['cases']} "
                 f"{r['batched_replay_first_token_s_p50']:.2f} s, re-prefill {r['reprefill_identical']}/{r['cases']} "
                 f"{r['reprefill_first_token_s_p50']:.2f} s")
    return "\n".join(lines)
