"""Several LLM cores behind one kernel: what routing and migration cost, measured side by side.

1. Same workload, same run: one LLM core with 2 llama.cpp threads and 16 slots against two cores (two processes) with
   1 thread and 8 slots each, on this machine's 2 CPUs. The ratio should be about 1: the point is that splitting the
   work across processes and routing it costs nothing.
2. A migration-heavy run: 16 agents stream on the two cores; once each has 16 tokens, one core is drained
   (`aios drain`), so its generations move to the other through Redis. Every stream must come out whole (token
   indexes 1..N, no gap, no repeat): lost tokens are counted, and must be 0.
3. The cost of moving one generation with a 512-token context: one agent decoding alone, its core drained after 8
   tokens; the kernel times each move from its start (the switch-out asked) to the first token on the other core.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

import llama_cpp as llama

from aios.v1 import kernel_pb2
from deploy.cluster import Cluster, ClusterConfig
from services.llm_core.model import LlamaModel, default_model_path

AGENTS = 16
TOKENS = 32
SYSTEM = ("You are a field agent of a research station. Answer with concrete steps, tools and numbers, "
          "one per line, and never apologise.")
QUESTIONS = [f"Station log {n}: list what must be checked before the winter, and why." for n in range(AGENTS)]
LONG_CONTEXT = " ".join(f"Observation {n}: the wind turned west at dusk and the barometer fell two points."
                        for n in range(28))  # with the question: ~512 prompt tokens
DRAIN_TOKENS = 48  # each stream of the drain under load: 16 before the drain, the rest after it
MOVES = 3  # migrations of the 512-token generation, each in its own direction
PAIRS = 2  # interleaved runs of each layout: this VM's speed drifts by 10-20% within minutes
RAW_CONTEXT, RAW_STEPS, RAW_REPS = 64, 16, 2  # llama.cpp alone: the workload's context, steps per measure, measures
ONE, TWO = "one core, 2 threads", "two cores, 1 thread each"


def _streams(kernel: Any, tag: str, tokens: int, drain_after: int = 0) -> dict[str, Any]:
    """AGENTS agents stream one generation each; with `drain_after`, the core holding most of them is drained once
    every stream has that many tokens. Returns tokens per second and what moved."""
    agents = [kernel.register(f"cores-{tag}-{i}") for i in range(AGENTS)]
    arrivals: list[list[int]] = [[] for _ in agents]
    ids: list[str] = [""] * AGENTS
    all_started = threading.Barrier(AGENTS + 1) if drain_after else None

    def stream(i: int) -> None:
        # A raw prompt with the shared opening: with chat messages the model may end its turn before `tokens`.
        prompt = f"{SYSTEM}\n{QUESTIONS[i]}\nAnswer:"
        for chunk in agents[i].generate(prompt, max_tokens=tokens, ignore_eos=True, timeout=600):
            ids[i] = chunk.syscall_id
            if chunk.HasField("token_id"):
                arrivals[i].append(chunk.completion_tokens)
                if all_started is not None and len(arrivals[i]) == drain_after:
                    all_started.wait()

    drained: dict[str, Any] = {}
    began = time.monotonic()
    with ThreadPoolExecutor(AGENTS) as pool:
        futures = [pool.submit(stream, i) for i in range(AGENTS)]
        if all_started is not None:
            all_started.wait()
            on = [kernel.call("GetSyscall", kernel_pb2.GetSyscallRequest(syscall_id=i)).core for i in ids]
            source = max(set(on), key=on.count)
            asked = time.monotonic()
            core = kernel.drain_core(source)
            drained = {"core": source, "generations_on_it": on.count(source), "drain_s": time.monotonic() - asked,
                       "left_on_it": core.running + core.parked}
        for future in futures:
            future.result()
    wall = time.monotonic() - began
    lost = sum(len(set(range(1, tokens + 1)) - set(got)) + len(got) - len(set(got)) for got in arrivals)
    records = [kernel.call("GetSyscall", kernel_pb2.GetSyscallRequest(syscall_id=i)) for i in ids]
    if drained:
        kernel.drain_core(drained["core"], undo=True)
    return {"tok_s": AGENTS * tokens / wall, "wall_s": wall, "lost_or_repeated_tokens": lost,
            "migrations": sum(r.migrations for r in records), **drained}


def _move_cost(kernel: Any) -> dict[str, Any]:
    """Drains the core of a lone 512-token generation after 8 tokens, MOVES times; the kernel's move timings."""
    agent = kernel.register("cores-mover")
    seconds, contexts = [], []
    for move in range(MOVES):
        before = {c.name: (c.migrated_in, c.migration_seconds) for c in kernel.status().cores}
        chunks: list = []
        prompt = f"{LONG_CONTEXT}\nQuestion {move}: what weather comes next, and why?\nAnswer:"
        got_eight = threading.Event()

        def read() -> None:
            for chunk in agent.generate(prompt, max_tokens=24, ignore_eos=True, timeout=600):
                chunks.append(chunk)
                if sum(c.HasField("token_id") for c in chunks) == 8:
                    got_eight.set()

        reader = threading.Thread(target=read)
        reader.start()
        got_eight.wait(timeout=600)
        source = kernel.call("GetSyscall", kernel_pb2.GetSyscallRequest(syscall_id=chunks[0].syscall_id)).core
        kernel.drain_core(source)
        reader.join()
        kernel.drain_core(source, undo=True)
        after = {c.name: (c.migrated_in, c.migration_seconds) for c in kernel.status().cores}
        target = next(name for name in after if after[name][0] > before[name][0])
        seconds.append(after[target][1] - before[target][1])
        contexts.append(chunks[-1].prompt_tokens + 8)
    return {"context_tokens_p50": statistics.median(contexts), "move_ms_p50": 1000 * statistics.median(seconds),
            "move_ms": [1000 * s for s in seconds]}


def _stepping(runner: Any, sequences: int, steps: int) -> None:
    for step in range(steps):
        runner.step(sequences, 1000 + step, RAW_CONTEXT + step)
    for seq in range(sequences):
        llama.llama_memory_seq_rm(runner.memory, seq, RAW_CONTEXT, -1)


def raw_split() -> dict[str, Any]:
    """llama.cpp alone, no AIOS: greedy decode tok/s of one context with 2 threads stepping 16 sequences, and of two
    contexts with 1 thread each stepping 8 sequences at the same time (two Python threads; llama_decode releases the
    GIL), interleaved RAW_REPS times. What splitting the batch in two costs on this CPU before any routing."""
    from bench.run import SequentialRunner  # bench.run imports this module

    model = LlamaModel(default_model_path())
    prompt = model.tokenize(SYSTEM * 3, add_bos=True, special=False)[:RAW_CONTEXT]

    def prefilled(threads: int, sequences: int) -> Any:
        runner = SequentialRunner(model, n_ctx=RAW_CONTEXT + RAW_STEPS + 8, sequences=sequences, threads=threads)
        runner.prefill_all(prompt, sequences)
        return runner

    one, halves = prefilled(2, AGENTS), [prefilled(1, AGENTS // 2) for _ in range(2)]
    rates: dict[str, list[float]] = {ONE: [], TWO: []}
    try:
        with ThreadPoolExecutor(2) as pool:
            for _ in range(RAW_REPS):
                began = time.perf_counter()
                _stepping(one, AGENTS, RAW_STEPS)
                rates[ONE].append(AGENTS * RAW_STEPS / (time.perf_counter() - began))
                began = time.perf_counter()
                for done in [pool.submit(_stepping, half, AGENTS // 2, RAW_STEPS) for half in halves]:
                    done.result()
                rates[TWO].append(AGENTS * RAW_STEPS / (time.perf_counter() - began))
    finally:
        for runner in (one, *halves):
            runner.close()
        model.close()
    ratios = [two / one for one, two in zip(rates[ONE], rates[TWO])]
    return {**{label: statistics.median(r) for label, r in rates.items()}, "two_vs_one": statistics.median(ratios),
            "two_vs_one_runs": ratios}


def run_cores_bench(say: Callable[[str], None]) -> dict[str, Any]:
    """Both layouts up side by side (idle, a cluster costs no CPU), their runs interleaved PAIRS times; then the
    drain and the move on the two cores."""
    result: dict[str, Any] = {"agents": AGENTS, "tokens": TOKENS, "pairs": PAIRS}
    layouts = {ONE: ClusterConfig(slots=AGENTS, llm_cores=1, llm_threads=2),
               TWO: ClusterConfig(slots=AGENTS // 2, llm_cores=2, llm_threads=1)}
    with ExitStack() as stack:
        kernels = {}
        for label, config in layouts.items():
            config.home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="aios-bench-cores-")))
            say(f"cores: starting AIOS with {label} ...")
            kernels[label] = stack.enter_context(stack.enter_context(Cluster(config)).connect())
            _streams(kernels[label], "warm", 8)  # the shared opening cached, the threads warm
        runs: dict[str, list[dict[str, Any]]] = {label: [] for label in layouts}
        for pair in range(PAIRS):
            for label in layouts:
                runs[label].append(_streams(kernels[label], f"run{pair}", TOKENS))
            say(f"  pair {pair + 1}: {ONE} {runs[ONE][-1]['tok_s']:.1f} tok/s, {TWO} {runs[TWO][-1]['tok_s']:.1f} tok/s")
        for label, rows in runs.items():
            result[label] = {"tok_s": statistics.median(r["tok_s"] for r in rows), "runs": rows}
        ratios = [two["tok_s"] / one["tok_s"] for one, two in zip(runs[ONE], runs[TWO])]
        result["two_vs_one"], result["two_vs_one_runs"] = statistics.median(ratios), ratios
        say(f"cores: llama.cpp alone, one context with 2 threads vs two with 1 thread each, {RAW_REPS} times ...")
        result["raw"] = raw_split()
        result["two_vs_one_of_raw"] = result["two_vs_one"] / result["raw"]["two_vs_one"]
        say(f"  raw two/one {result['raw']['two_vs_one']:.2f}; AIOS two/one {result['two_vs_one']:.2f}")
        kernel = kernels[TWO]
        say(f"cores: drain one core under {AGENTS} streams of {DRAIN_TOKENS} tokens ...")
        result["drain_under_load"] = _streams(kernel, "drain", DRAIN_TOKENS, drain_after=TOKENS // 2)
        say(f"  {result['drain_under_load']['migrations']} generations moved, "
            f"{result['drain_under_load']['lost_or_repeated_tokens']} tokens lost or repeated")
        say(f"cores: moving one generation with a 512-token context, {MOVES} times ...")
        result["move"] = _move_cost(kernel)
        say(f"  {result['move']['move_ms_p50']:.0f} ms per move (p50)")
    return result


def cores_table(result: dict[str, Any]) -> str:
    one, two = result[ONE], result[TWO]
    drain, move = result["drain_under_load"], result["move"]
    return "\n".join([
        f"LLM cores: {result['agents']} agents x {result['tokens']} tokens, same workload, {result['pairs']} "
        "interleaved pairs (medians)",
        f"  one core, 2 threads, 16 slots: {one['tok_s']:.1f} tok/s;  two cores, 1 thread and 8 slots each: "
        f"{two['tok_s']:.1f} tok/s  (two/one {result['two_vs_one']:.2f}; pairs "
        f"{', '.join(f'{r:.2f}' for r in result['two_vs_one_runs'])})",
        f"  llama.cpp alone, same split: {result['raw'][ONE]:.1f} vs {result['raw'][TWO]:.1f} tok/s (two/one "
        f"{result['raw']['two_vs_one']:.2f}): AIOS keeps {result['two_vs_one_of_raw']:.2f} of what the split leaves "
        "(1.00: routing and the second process cost nothing)",
        f"  drain of {drain['core']} under load: {drain['generations_on_it']} of its generations moved "
        f"({drain['migrations']} moves) in {drain['drain_s']:.2f} s, {drain['lost_or_repeated_tokens']} tokens lost "
        f"or repeated, {drain['tok_s']:.1f} tok/s overall",
        f"  moving one generation with a {move['context_tokens_p50']:.0f}-token context: "
        f"{move['move_ms_p50']:.0f} ms p50 (switch-out asked -> first token on the other core; "
        f"{', '.join(f'{ms:.0f}' for ms in move['move_ms'])} ms)",
    ])
