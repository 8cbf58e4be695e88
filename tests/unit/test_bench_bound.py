"""The bench's workload bound: the ideal server it compares AIOS against (bench/run.py)."""

from __future__ import annotations

import numpy as np
import pytest

from bench.run import decode_steps, fresh_prompt_tokens, gap_to_bound, step_price, workload_bound
from bench.workload import Call


def agents(*lengths: tuple[int, ...]) -> list[list[Call]]:
    """One agent per tuple, one call per length, in order."""
    return [[Call(a, r, f"agent {a} round {r}", n, 2, 3) for r, n in enumerate(calls)] for a, calls in enumerate(lengths)]


def test_a_batch_drains_as_its_calls_end() -> None:
    assert decode_steps(agents((3,), (1,), (2,)), slots=4) == [3, 2, 1]


def test_an_agents_next_call_joins_the_step_after_its_previous_one_ends() -> None:
    assert decode_steps(agents((1, 3), (3,)), slots=2) == [2, 2, 2, 1]


def test_calls_beyond_the_slots_start_in_arrival_order_unless_lengths_are_known() -> None:
    plan = agents((1,), (1,), (4,))
    assert decode_steps(plan, slots=2) == [2, 1, 1, 1, 1]  # the long call starts last and ends alone
    assert decode_steps(plan, slots=2, longest_first=True) == [2, 2, 1, 1]


def test_the_bound_prices_each_step_by_its_sequences() -> None:
    plan = agents((2,), (1,))  # steps of 2 then 1 sequence
    costs = {"1": 0.02, "4": 0.05}  # 2 sequences: 0.03 s, interpolated
    assert workload_bound(10, plan, 4, 100.0, costs) == pytest.approx(3 / (10 / 100.0 + 0.03 + 0.02))


def test_a_step_costs_no_more_than_a_bigger_one_measured_cheaper() -> None:
    costs = {"1": 0.02, "2": 0.04, "3": 0.07, "4": 0.05, "8": 0.09}  # 3 rows cost more than 4 (as odd ones on an EPYC)
    assert step_price(3, costs) == pytest.approx(0.05)  # padded to 4
    assert step_price(2, costs) == pytest.approx(0.04)
    assert step_price(6, costs) == pytest.approx(0.07)  # interpolated between 4 and 8
    assert workload_bound(0, agents((2,), (2,), (2,)), 4, 100.0, costs) == pytest.approx(6 / (2 * 0.05))


def test_costs_proportional_to_sequences_give_the_full_batch_rate() -> None:
    plan = agents((5,), (2,), (7,))
    per_token = 0.01
    costs = {"1": per_token, "16": 16 * per_token}
    assert workload_bound(0, plan, 16, 100.0, costs) == pytest.approx(1 / per_token)


def test_the_gap_to_the_bound_prices_the_steps_the_core_ran_beside_the_bounds_own() -> None:
    """A run's time against the bound: 3 calls of 2 tokens and one of 3 on 3 slots (the bound: two steps of 3
    sequences, then the late call alone for 3); the core prefilled three prompts in one step (which gave each its first
    token) and the late one beside 2 decoding, ran plain steps of 3 sequences 0.01 s dearer than llama.cpp alone's and
    one of 1, and spent 0.02 s outside llama_decode."""
    costs = {"1": 0.02, "2": 0.04, "3": 0.05}
    engine = {"decode_seconds": 0.39, "prompt_steps": [[0, 1, 0.1], [2, 1, 0.08]],
              "plain_steps": [[1, 2, 0.05], [3, 2, 0.16]],
              "sample_seconds": 0.01, "schedule_seconds": 0.005, "kv_copy_seconds": 0.005}
    gap = gap_to_bound({"wall_s": 0.45, "engine": engine}, agents((2,), (2,), (2,), (3,)), 3, costs, 30, 600.0)
    assert gap["bound_decode_s"] == pytest.approx(2 * 0.05 + 3 * 0.02)
    assert gap["bound_s"] == pytest.approx(30 / 600.0 + gap["bound_decode_s"])
    assert gap["prompt_s"] == pytest.approx(0.18) and gap["prefill_priced_s"] == pytest.approx(0.05)
    assert gap["prompt_rows_priced_s"] == pytest.approx(0.04)  # the 2 decoding beside the late prompt
    assert gap["plain_s"] == pytest.approx(0.21) and gap["plain_priced_s"] == pytest.approx(2 * 0.02 + 2 * 0.05)
    assert gap["guessing_s"] == pytest.approx(0.0)
    assert gap["outside_decode_s"] == pytest.approx(0.02) and gap["beyond_engine_s"] == pytest.approx(0.04)


class WordTokenizer:
    """A test double for the model's tokenizer (one token per word; no model needed to count shared prefixes)."""

    @staticmethod
    def tokenize(text: str, add_bos: bool, special: bool) -> list[str]:
        return ["<bos>", *text.split()]


def test_the_bound_prefills_what_no_earlier_prompt_began_with_earlier_plans_included() -> None:
    def plan(*prompts: str) -> list[list[Call]]:
        return [[Call(a, 0, prompt, 8, 2, 3)] for a, prompt in enumerate(prompts)]

    system = "you are an agent with tools"
    now = plan(f"{system} task one", f"{system} task two")
    assert fresh_prompt_tokens(WordTokenizer(), now) == 9 + 1  # all of the first, "two" of the second
    before = plan(f"{system} warm up")  # the same server ran it earlier: the system prompt is not fresh any more
    assert fresh_prompt_tokens(WordTokenizer(), now, [before]) == 2 + 1  # "task one", then "two"


def test_repeated_runs_pair_aios_with_the_peer_in_ab_ba_order(monkeypatch) -> None:
    """race's order and pairing; test doubles stand in for the two runners (an AIOS cluster and llama-server), whose
    real runs `make bench` does: AIOS then the peer, then the peer then AIOS, each ratio from the same plan."""
    import types

    import bench.run as bench_run

    order: list[tuple[str, int]] = []
    speeds = {"aios": [150.0, 120.0, 160.0], "peer": [100.0, 80.0, 90.0]}

    def runner(who: str):
        def run(_target: object, calls: list[list[Call]], *_: object) -> dict[str, float]:
            trial = sum(1 for w, _ in order if w == who)
            order.append((who, len(calls)))
            return {"tok_per_s": speeds[who][trial], "preemptions": 0, "jain_fairness": 1.0}
        return run

    monkeypatch.setattr(bench_run, "run_aios", runner("aios"))
    monkeypatch.setattr(bench_run, "run_peer", runner("peer"))
    contender = types.SimpleNamespace(kernel=None, server=object(), cluster=types.SimpleNamespace(pids=dict))
    plans = [agents((1,)), agents((1,), (1,)), agents((1,), (1,), (1,))]  # their sizes tell the plans apart
    row, peer, runs = bench_run.race(contender, "fifo", 3, plans, None)
    assert order == [("aios", 1), ("peer", 1), ("peer", 2), ("aios", 2), ("aios", 3), ("peer", 3)]
    assert row["ratio_vs_peer_runs"] == [1.5, 1.5, 160 / 90]
    assert row["tok_per_s"] == 150.0 and peer["tok_per_s"] == 90.0  # the median runs


def test_the_probes_decode_step_picks_each_sequences_greedy_token() -> None:
    """The bound's step costs come from llama.cpp alone's greedy decode steps (DecodeProbe): a step is done when each
    sequence's next token is known, so the probe's step picks them, and they are the greedy continuation."""
    from bench.run import SequentialRunner
    from services.llm_core.model import LlamaModel, default_model_path

    model = LlamaModel(default_model_path())
    prompt = "Question: Name three rivers in Europe and say where each one flows.\nAnswer:"
    tokens = model.tokenize(prompt, add_bos=True, special=True)
    alone, together = SequentialRunner(model, n_ctx=256), SequentialRunner(model, n_ctx=256, sequences=2)
    try:
        alone.prefill(tokens)
        first = int(np.argmax(model.logits_view(alone.ctx, len(tokens) - 1)))
        alone._decode([first], len(tokens))
        second = int(np.argmax(model.logits_view(alone.ctx, 0)))
        together.prefill_all(tokens, 2)
        assert together.step(2, first, len(tokens)) == [second, second]
    finally:
        alone.close(), together.close()
        model.close()
