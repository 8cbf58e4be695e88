"""Repeated bench runs: which run stands for them (bench/stats.py), and that no paced run's errors are dropped."""

from __future__ import annotations

from bench.scale import paced_row
from bench.stats import median_run


def run(p99: float, **errors: int) -> dict:
    return {"p50_ms": p99 / 3, "p99_ms": p99, "syscalls": 10_000, "errors": dict(errors)}


def test_the_run_with_the_median_stands_for_them_with_every_runs_value_in_order_and_the_spread() -> None:
    row = median_run([run(60.0), run(25.0), run(40.0)], "p99_ms")
    assert row["p99_ms"] == 40.0 and row["p50_ms"] == 40.0 / 3
    assert row["p99_ms_runs"] == [60.0, 25.0, 40.0] and row["spread"] == (60.0 - 25.0) / 40.0


def test_an_even_count_takes_the_lower_middle_and_one_run_is_itself() -> None:
    assert median_run([run(40.0), run(10.0), run(90.0), run(20.0)], "p99_ms")["p99_ms"] == 20.0
    one = median_run([run(33.0)], "p99_ms")
    assert one["p99_ms_runs"] == [33.0] and one["spread"] == 0.0


def test_an_error_in_any_paced_run_counts_even_when_another_run_is_kept() -> None:
    row = paced_row([run(10.0, memory_add_UNAVAILABLE=2), run(20.0), run(30.0, tool_DEADLINE_EXCEEDED=1)])
    assert row["p99_ms"] == 20.0
    assert row["errors"] == {"memory_add_UNAVAILABLE": 2, "tool_DEADLINE_EXCEEDED": 1}
