"""Runs the LLM core: `python -m services.llm_core --redis-url URL [--model PATH]`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterator

from aios.v1 import llm_core_pb2_grpc
from services import redis_state
from services.llm_core.core import LLMCore
from services.llm_core.engine import REPLAY_MODES, BatchEngine, EngineConfig
from services.llm_core.instant import InstantEngine
from services.llm_core.model import LlamaModel, default_model_path
from services.llm_core.prompt import FORMATS
from services.llm_core.servicer import INFO_COUNTERS, LLMCoreServicer, core_info
from services.metrics import Cached, Collected, Metric, from_message
from services.llm_core.snapshot import KvSnapshotStore
from services.server import Service, add_redis_argument, common_arguments, kernel_only, redis_url, run


def build(args: argparse.Namespace) -> Service:
    model = LlamaModel(args.model or default_model_path())
    url = redis_url(args)
    snapshots = KvSnapshotStore(url, ttl_s=args.snapshot_ttl)
    config = EngineConfig(
        slots=args.slots,
        resident=args.resident or 2 * args.slots,
        max_sequence_tokens=args.max_sequence_tokens,
        n_batch=args.n_batch,
        prefix_cache=not args.no_prefix_cache,
        replay=args.replay,
        host_prefix_bytes=args.prefix_cache_ram_mb << 20,
        draft_tokens=args.draft_tokens,
        draft_step_tokens=args.draft_step_tokens,
        threads=args.threads or EngineConfig().threads,
    )
    if args.backend == "instant":
        engine: BatchEngine | InstantEngine = InstantEngine(model, config)
        model.description = f"instant backend: a test double, no model run (tokenizer of {model.description})"
    else:
        engine = BatchEngine(model, config, swap_out=snapshots.put)
    engine.start()
    redis = redis_state.connect(url)

    async def redis_ok() -> bool:
        return await redis_state.is_up(redis)

    def stop() -> None:
        engine.stop()  # writes parked sequences out, so another core can resume them
        snapshots.close()
        model.close()

    core = LLMCore(model, engine, FORMATS[args.prompt_format](), snapshots)
    snapshots_in_redis = Cached(snapshots.count_in_redis, SNAPSHOT_COUNT_EVERY_S)
    return Service(
        name="llm_core",
        grpc_services=["aios.v1.LLMCore"],
        register=lambda server: llm_core_pb2_grpc.add_LLMCoreServicer_to_server(
            LLMCoreServicer(core, redis_ok), server
        ),
        probes=[redis_ok],
        on_stop=stop,
        authorize=kernel_only(args),
        collectors=[Collected("llm_core", lambda: llm_core_metrics(core, snapshots_in_redis))],
    )


# Counting the snapshots in Redis scans its keys (syscall records too): at most this often for the metrics.
SNAPSHOT_COUNT_EVERY_S = 30.0


def llm_core_metrics(core: LLMCore, snapshots_in_redis: Cached) -> Iterator[Metric]:
    info = core_info(core)
    info.snapshots_in_redis = snapshots_in_redis.value()
    return from_message("aios_llm_core", info, INFO_COUNTERS, "llm_core.proto InfoResponse", leave_out=frozenset({"redis_ok"}))


def main() -> None:
    defaults = EngineConfig()
    parser = common_arguments("AIOS LLM core (llama.cpp)")
    parser.add_argument("--model", type=Path, help="GGUF file; default: the bundled Gemma 3 270M")
    add_redis_argument(parser)
    parser.add_argument("--slots", type=int, default=defaults.slots, help="sequences decoded together")
    parser.add_argument("--resident", type=int, default=0,
                        help="sequences kept resident (decoding + preempted + cached prefixes); default 2 x slots. "
                             "Cores that resume each other's snapshots need the same value")
    parser.add_argument("--max-sequence-tokens", type=int, default=defaults.max_sequence_tokens,
                        help="KV cells per resident sequence (prompt + generated)")
    parser.add_argument("--snapshot-ttl", type=float, default=600.0, help="seconds a snapshot lives in Redis")
    parser.add_argument("--no-prefix-cache", action="store_true", help="always prefill whole prompts")
    parser.add_argument("--prefix-cache-ram-mb", type=int, default=defaults.host_prefix_bytes >> 20,
                        help="host RAM for the KV of finished sequences whose seq_id was needed, reused by prompts "
                             "that start the same way (an agent's next call); 0 keeps none")
    parser.add_argument("--replay", default=defaults.replay, choices=REPLAY_MODES,
                        help="how a generation is rebuilt after a fault: its delivered tokens fed back one decode "
                             "step each (exact: the KV as the first run had it), prefilled in a batch (batched: "
                             "fast), or batched when the kernel says the generation was not decoding alone (auto)")
    parser.add_argument("--draft-tokens", type=int, default=defaults.draft_tokens,
                        help="speculative decoding: up to this many tokens guessed from a sequence's own context "
                             "(prompt lookup) are verified in each decode step, as many as pay on this machine; outputs are "
                             "what one token per step gives, up to batch numerics. 0: off")
    parser.add_argument("--draft-step-tokens", type=int, default=defaults.draft_step_tokens,
                        help="decode steps carrying drafts stay within this many tokens (at most --n-batch)")
    parser.add_argument("--n-batch", type=int, default=defaults.n_batch, help="most tokens per decode step")
    parser.add_argument("--threads", type=int, default=0,
                        help="llama.cpp threads; default: the machine's CPUs (in a container, set its CPU limit)")
    parser.add_argument("--backend", default="llama", choices=("llama", "instant"),
                        help="llama: the model through llama.cpp; instant: a test double that returns tokens without "
                             "running the model (services/llm_core/instant.py), to measure everything else")
    parser.add_argument("--prompt-format", default="transcript", choices=sorted(FORMATS),
                        help="how chat messages become a prompt (transcript suits base models)")
    run(build, parser)


if __name__ == "__main__":
    main()
