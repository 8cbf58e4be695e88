"""Prompt-lookup drafts for speculative decoding.

Agents' outputs copy from their context (tool arguments, quoted observations,
the format of earlier turns) and small models repeat themselves, so the tokens
that followed the last earlier occurrence of the context's final n-gram are a
good guess at what comes next (Saxena's prompt lookup decoding; llama.cpp's
`ngram-simple`). The engine feeds the guesses after the sequence's next token in
the same decode step and keeps those the model itself would have produced
(engine.BatchEngine._step): the output never changes, only how many tokens one
step yields.
"""

from __future__ import annotations

NGRAM_SIZES = (3, 2)  # longest first: a longer match predicts better


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
