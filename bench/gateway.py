"""The OpenAI gateway's cost, and grammar-constrained decoding's, measured side by side in one run.

16 agents stream the same generations three ways on one AIOS: through the gRPC
kernel (the SDK) and through the gateway (the `openai` client, SSE), both on the
same raw prompts, and through the gateway's chat endpoint with a JSON Schema
(every token sampled under a grammar). Each generation is exactly `tokens` long
(ignore_eos; a schema whose minimum length exceeds it), so tok/s compare like
for like. Also the time to first token through the gateway.
"""

from __future__ import annotations

import functools
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import openai

from deploy.cluster import Cluster, ClusterConfig

PROMPTS = [f"Write a long list of facts about the number {n}." for n in range(16)]
# A reply that cannot end before max_tokens: at least 64 strings.
LONG_JSON = {"type": "object", "properties": {"facts": {"type": "array", "items": {"type": "string", "maxLength": 40},
                                                        "minItems": 64}},
             "required": ["facts"], "additionalProperties": False}


WARM_UP_TOKENS = 4  # what each path generates before the rounds: enough to cache its prompts and open its connections


def timed(agents: int, run: Callable[[int], tuple[int, float]]) -> dict[str, Any]:
    """Runs `run(i)` for every agent at once; each returns (tokens, seconds to its first token)."""
    started = time.monotonic()
    with ThreadPoolExecutor(agents) as pool:
        results = list(pool.map(run, range(agents)))
    wall = time.monotonic() - started
    tokens = sum(t for t, _ in results)
    return {"tok_per_s": tokens / wall, "tokens": tokens, "wall_s": wall,
            "ttft_p50_s": statistics.median(f for _, f in results)}


def run_gateway_bench(say: Callable[[str], None], agents: int = 16, tokens: int = 64, rounds: int = 3) -> dict[str, Any]:
    result: dict[str, Any] = {"agents": agents, "tokens_per_generation": tokens}
    with tempfile.TemporaryDirectory(prefix="aios-bench-gateway-") as home:
        with Cluster(ClusterConfig(home=Path(home), slots=agents)) as cluster, cluster.connect() as kernel:
            members = [kernel.register(f"gw-{i}") for i in range(agents)]
            clients = [openai.OpenAI(base_url=cluster.openai_base_url, api_key=a.token, max_retries=0, timeout=600)
                       for a in members]
            model = cluster.served_model_name

            def grpc_stream(i: int, tokens: int = tokens) -> tuple[int, float]:
                t0, first, n = time.monotonic(), 0.0, 0
                for chunk in members[i].generate(PROMPTS[i], max_tokens=tokens, ignore_eos=True):
                    if chunk.HasField("token_id"):
                        n += 1
                        first = first or time.monotonic() - t0
                return n, first

            def read(stream: Any, t0: float, text: Callable[[Any], str]) -> tuple[int, float]:
                first, n = 0.0, 0
                for chunk in stream:
                    if chunk.choices and text(chunk.choices[0]):
                        first = first or time.monotonic() - t0
                    if chunk.usage:
                        n = chunk.usage.completion_tokens
                return n, first

            def gateway_stream(i: int, tokens: int = tokens) -> tuple[int, float]:
                t0 = time.monotonic()
                stream = clients[i].completions.create(
                    model=model, prompt=PROMPTS[i], max_tokens=tokens, temperature=0, stream=True,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
                return read(stream, t0, lambda choice: choice.text)

            def gateway_json(i: int, tokens: int = tokens) -> tuple[int, float]:
                t0 = time.monotonic()
                stream = clients[i].chat.completions.create(
                    model=model, messages=[{"role": "user", "content": PROMPTS[i]}], max_tokens=tokens,
                    temperature=0, stream=True, stream_options={"include_usage": True},
                    response_format={"type": "json_schema", "json_schema": {"name": "facts", "schema": LONG_JSON}})
                return read(stream, t0, lambda choice: choice.delta.content)

            say(f"gateway: {agents} agents x {tokens} tokens, gRPC kernel vs gateway vs gateway + json_schema ...")
            for warm in (grpc_stream, gateway_stream, gateway_json):  # every path's prompts cached, connections up
                timed(agents, functools.partial(warm, tokens=WARM_UP_TOKENS))
            paths = {"grpc": grpc_stream, "gateway": gateway_stream, "gateway_json_schema": gateway_json}
            order = list(paths)
            result["rounds"] = []
            for r in range(rounds):  # this machine is noisy: each round runs the three side by side, in turn first
                row = {}
                for label in order[r % 3:] + order[:r % 3]:
                    row[label] = timed(agents, paths[label])
                    say(f"  round {r + 1} {label:<20} {row[label]['tok_per_s']:.1f} tok/s, first token p50 "
                        f"{row[label]['ttft_p50_s'] * 1e3:.0f} ms")
                result["rounds"].append(row)
    rows = result["rounds"]
    result["gateway_vs_grpc"] = statistics.median(r["gateway"]["tok_per_s"] / r["grpc"]["tok_per_s"] for r in rows)
    result["json_schema_vs_free"] = statistics.median(
        r["gateway_json_schema"]["tok_per_s"] / r["gateway"]["tok_per_s"] for r in rows)
    for label in paths:
        result[label] = {key: statistics.median(r[label][key] for r in rows) for key in rows[0][label]}
    return result


def gateway_table(result: dict[str, Any]) -> str:
    lines = [f"gateway ({result['agents']} agents streaming {result['tokens_per_generation']} tokens each; medians of "
             f"{len(result['rounds'])} rounds):", f"{'path':<22}{'tok/s':>8}{'ttft p50 ms':>13}"]
    for label in ("grpc", "gateway", "gateway_json_schema"):
        row = result[label]
        lines.append(f"{label:<22}{row['tok_per_s']:>8.1f}{row['ttft_p50_s'] * 1e3:>13.0f}")
    lines.append(f"gateway / gRPC (median of per-round ratios): {result['gateway_vs_grpc']:.3f} (floor 0.95); "
                 f"json_schema / free: {result['json_schema_vs_free']:.3f} (floor 0.9)")
    return "\n".join(lines)
