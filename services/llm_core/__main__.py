"""Runs the LLM core: `python -m services.llm_core --redis-url URL [--model PATH]`."""

from __future__ import annotations

import argparse
from pathlib import Path

from aios.v1 import llm_core_pb2_grpc
from services import redis_state
from services.llm_core.core import LLMCore
from services.llm_core.engine import BatchEngine, EngineConfig
from services.llm_core.model import LlamaModel, default_model_path
from services.llm_core.prompt import FORMATS
from services.llm_core.servicer import LLMCoreServicer
from services.server import Service, common_arguments, run


def build(args: argparse.Namespace) -> Service:
    model = LlamaModel(args.model or default_model_path())
    engine = BatchEngine(
        model,
        EngineConfig(
            slots=args.slots, n_ctx=args.n_ctx, max_sequence_tokens=args.max_sequence_tokens, n_batch=args.n_batch
        ),
    )
    engine.start()
    redis = redis_state.connect(args.redis_url)

    async def redis_ok() -> bool:
        return await redis_state.is_up(redis)

    def stop() -> None:
        engine.stop()
        model.close()

    core = LLMCore(model, engine, FORMATS[args.prompt_format]())
    return Service(
        name="llm_core",
        grpc_services=["aios.v1.LLMCore"],
        register=lambda server: llm_core_pb2_grpc.add_LLMCoreServicer_to_server(
            LLMCoreServicer(core, redis_ok), server
        ),
        probes=[redis_ok],
        on_stop=stop,
    )


def main() -> None:
    defaults = EngineConfig()
    parser = common_arguments("AIOS LLM core (llama.cpp)")
    parser.add_argument("--model", type=Path, help="GGUF file; default: the bundled Gemma 3 270M")
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--slots", type=int, default=defaults.slots, help="sequences decoded together")
    parser.add_argument("--n-ctx", type=int, default=defaults.n_ctx, help="KV cache tokens shared by all slots")
    parser.add_argument("--max-sequence-tokens", type=int, default=defaults.max_sequence_tokens)
    parser.add_argument("--n-batch", type=int, default=defaults.n_batch, help="most tokens per decode step")
    parser.add_argument("--prompt-format", default="transcript", choices=sorted(FORMATS),
                        help="how chat messages become a prompt (transcript suits base models)")
    run(build, parser)


if __name__ == "__main__":
    main()
