"""The one statistic the bench's parts share for repeated runs: which run stands for them."""

from __future__ import annotations

from typing import Any


def median_run(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run with the median `key` (the lower middle of an even number), with every run's `key` in run order
    (`<key>_runs`) and their spread ((max - min) / median) beside it."""
    ranked = sorted(runs, key=lambda run: run[key])
    middle = dict(ranked[(len(ranked) - 1) // 2])
    middle[f"{key}_runs"] = [run[key] for run in runs]
    middle["spread"] = (ranked[-1][key] - ranked[0][key]) / middle[key] if middle[key] else 0.0
    return middle
