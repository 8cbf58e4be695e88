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

import numpy as np

NGRAM_SIZES = (3, 2)  # longest first: a longer match predicts better; single tokens guess too poorly to pay
COST_WEIGHT = 0.2  # how much one measured step moves the learnt cost of its size
# A step of more rows than any plain step measured is priced per row at this share of the biggest one's: a matrix
# product of more rows costs less per row (2-core EPYC, 16 sequences: 1 token each 77 ms, 2 tokens 130, 3: 191,
# 4: 239, 5: 292, i.e. 0.84, 0.83, 0.78, 0.76 of 77 ms per 16 rows).
ROW_DISCOUNT = 0.8


class PromptLookup:
    """An index of a token sequence's n-grams to where each last occurred with a token after it."""

    def __init__(self, sizes: tuple[int, ...] = NGRAM_SIZES) -> None:
        self.sizes = sizes
        self.tokens: list[int] = []
        self._after: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token that followed its latest occurrence
        self._after_token: dict[int, int] = {}  # the same for single tokens (fill's weaker guesses)

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            self.tokens.append(token)
            end = len(self.tokens) - 1  # the new token follows the n-grams ending just before it
            if end:
                self._after_token[self.tokens[end - 1]] = end
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

    def fill(self, draft: list[int], length: int) -> list[int]:
        """`draft` lengthened to `length` tokens with weaker guesses, each what followed the latest earlier occurrence
        of the token before it (else that token again): a step gives every sequence as many rows as the one with the
        most guesses, so a row beyond a sequence's own guesses costs nothing more, and a weak guess is still kept
        now and then (a small model repeats itself)."""
        filled = list(draft[:length])
        while len(filled) < length:
            last = filled[-1] if filled else self.tokens[-1]
            start = self._after_token.get(last)
            filled.append(self.tokens[start] if start is not None else last)
        return filled


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

    def table(self) -> list[tuple[int, int, float]]:
        """(sequences, tokens each, seconds) of every shape measured, in order; from any thread (one C-level copy)."""
        return sorted((sequences, each, seconds) for (sequences, each), seconds in list(self.seconds.items()))

    def estimate(self, sequences: int, tokens_each: int) -> float | None:
        """The learnt cost of this shape, or before it is measured what a plain step of as many rows costs: measured,
        interpolated between the plain sizes measured, or past the biggest one per row at ROW_DISCOUNT of its cost
        (a step's cost is mostly its rows: on a 2-core EPYC 4 sequences of 4 tokens cost 75 ms, 16 of 1 token 77,
        8 of 2 78). None before any plain step was measured."""
        known = self.of(sequences, tokens_each)
        if known is not None:
            return known
        plain = sorted((size, cost) for (size, each), cost in self.seconds.items() if each == 1)
        if not plain:
            return None
        rows = sequences * tokens_each
        biggest, cost = plain[-1]
        if rows > biggest:
            return cost * rows / biggest * ROW_DISCOUNT
        return float(np.interp(rows, [size for size, _ in plain], [cost for _, cost in plain]))


def draft_length(guesses: list[tuple[float, int]], limit: int, costs: StepCosts, plain: float | None) -> int:
    """How many guessed tokens every one of these decoding sequences should carry this step (0..limit): the k that
    maximises expected tokens per second, where a sequence with `m` guesses of its own, kept with probability r,
    yields 1 + r + ... + r^min(k, m) tokens from a step of 1 + k tokens each (the rows past its own guesses carry
    weaker ones, counted as never kept). `plain` is what the step would cost without guesses (as padded); None
    until measured. A step shape not measured yet is priced as a plain step of as many rows (StepCosts.estimate):
    tried once if that pays, then judged by what it cost."""
    if plain is None or limit <= 0:
        return 0
    best, best_rate = 0, len(guesses) / plain
    for k in range(1, limit + 1):
        tokens = sum(sum(r ** i for i in range(min(k, m) + 1)) for r, m in guesses)
        rate = tokens / (costs.estimate(len(guesses), 1 + k) or plain)
        if rate > best_rate:
            best, best_rate = k, rate
    return best
