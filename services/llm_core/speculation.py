"""Prompt-lookup drafts for speculative decoding, and when they pay.

Agents' outputs copy from their context (tool arguments, quoted observations,
the format of earlier turns) and small models repeat themselves, so the tokens
that followed the last earlier occurrence of the context's final n-gram are a
good guess at what comes next (Saxena's prompt lookup decoding; llama.cpp's
`ngram-simple`). The engine feeds the guesses after the sequence's next token in
the same decode step and keeps those the model itself would have produced
(engine.BatchEngine._verify): the output never changes, only how many tokens one
step yields.

Whether a guess pays depends on the machine: on a GPU a step of 16 tokens costs
about what a step of 1 does; on a CPU it can cost several times more (measured
on a 2-core EPYC: 1 token 22 ms, 2 tokens 47 ms, 5 tokens 70 ms). So the engine
learns what its steps cost (`StepCosts`) and drafts only as many tokens as raise
the expected tokens per second (`draft_length`).
"""

from __future__ import annotations

NGRAM_SIZES = (3, 2)  # longest first: a longer match predicts better; single tokens guess too poorly to pay
COST_WEIGHT = 0.2  # how much one measured step moves the learnt cost of its size


class PromptLookup:
    """An index of a token sequence's n-grams to where each last occurred with a token after it."""

    def __init__(self, sizes: tuple[int, ...] = NGRAM_SIZES) -> None:
        self.sizes = sizes
        self.tokens: list[int] = []
        self._after: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token that followed its latest occurrence

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            self.tokens.append(token)
            end = len(self.tokens) - 1  # the new token follows the n-grams ending just before it
            for n in self.sizes:
                if end >= n:
                    self._after[tuple(self.tokens[end - n:end])] = end

    def draft(self, limit: int) -> list[int]:
        """Up to `limit` tokens that followed the latest earlier occurrence of the longest matching final n-gram."""
        if limit <= 0:
            return []
        for n in self.sizes:
            if len(self.tokens) >= n:
                start = self._after.get(tuple(self.tokens[-n:]))
                if start is not None:
                    return self.tokens[start:start + limit]
        return []


class StepCosts:
    """Seconds a decode step takes here by its shape (sequences, tokens each), learnt from the steps run (a moving
    average per shape: 16 sequences of 2 tokens do not cost what 32 of 1 do)."""

    def __init__(self) -> None:
        self.seconds: dict[tuple[int, int], float] = {}

    def observe(self, sequences: int, tokens_each: int, seconds: float) -> None:
        known = self.seconds.get((sequences, tokens_each))
        self.seconds[sequences, tokens_each] = seconds if known is None else known + COST_WEIGHT * (seconds - known)

    def of(self, sequences: int, tokens_each: int) -> float | None:
        return self.seconds.get((sequences, tokens_each))


def draft_length(hit_rates: list[float], limit: int, costs: StepCosts) -> int:
    """How many guesses each of these decoding sequences should carry this step (0..limit): the k that maximises
    expected tokens per second, where a sequence whose guesses are kept with probability r yields
    1 + r + ... + r^k tokens from a step of 1 + k tokens each. A step size not measured yet is taken
    to cost what the plain step does, so it gets tried once and then judged by what it cost."""
    plain = costs.of(len(hit_rates), 1)
    if plain is None or limit <= 0:
        return 0
    best, best_rate = 0, len(hit_rates) / plain
    for k in range(1, limit + 1):
        tokens = sum(sum(r ** i for i in range(k + 1)) for r in hit_rates)
        rate = tokens / (costs.of(len(hit_rates), 1 + k) or plain)
        if rate > best_rate:
            best, best_rate = k, rate
    return best
