"""Token sampling in NumPy with a seeded PCG64 generator.

Sampling lives here rather than in llama.cpp's sampler chain so that the RNG
state is a plain value the core can save with a sequence snapshot and restore.
A sequence with a grammar (services/llm_core/grammar.py) draws only tokens the
grammar allows.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field

import numpy as np

from services.errors import FailedPrecondition, InvalidArgument
from services.llm_core.grammar import CANDIDATE_TIERS, GrammarConstraint, schema_to_grammar

DEFAULT_MAX_TOKENS = 128


@dataclass(frozen=True)
class SamplingConfig:
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    grammar: str = ""  # GBNF; empty: unconstrained
    turn_end: tuple[str, ...] = ()  # the stop strings that mark the model ending its turn (chat): a normal stop

    @classmethod
    def checked(
        cls,
        max_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        seed: int | None,
        stop: list[str],
        ignore_eos: bool = False,
        json_schema: str = "",
    ) -> "SamplingConfig":
        """Applies defaults (0 means unset) and refuses out-of-range values; compiles a JSON Schema to a grammar."""
        if not 0.0 <= temperature <= 2.0:
            raise InvalidArgument(f"temperature is {temperature}; it must be between 0 (greedy) and 2")
        if not 0.0 <= top_p <= 1.0:
            raise InvalidArgument(f"top_p is {top_p}; it must be in (0, 1], or 0 for disabled")
        if len(stop) > 8 or any(not s or len(s) > 64 for s in stop):
            raise InvalidArgument("stop takes at most 8 non-empty strings of at most 64 characters")
        if json_schema and ignore_eos:
            raise InvalidArgument("ignore_eos cannot go with json_schema: the output ends where the JSON does")
        return cls(
            max_tokens=max_tokens or DEFAULT_MAX_TOKENS,
            temperature=temperature,
            top_p=top_p or 1.0,
            top_k=top_k,
            seed=seed if seed is not None else int.from_bytes(os.urandom(8), "little"),
            stop=tuple(stop),
            ignore_eos=ignore_eos,
            grammar=schema_to_grammar(json_schema) if json_schema else "",
        )


class TokenSampler:
    """Greedy at temperature 0; otherwise temperature, top-k, top-p, then a seeded draw; within a grammar if any."""

    def __init__(self, config: SamplingConfig, constraint: GrammarConstraint | None = None) -> None:
        self.config = config
        self.rng = np.random.Generator(np.random.PCG64(config.seed))
        self.constraint = constraint

    @property
    def argmax_only(self) -> bool:
        """Greedy with no grammar: the token is the argmax of the logits, which the engine may take for many rows at
        once (BatchEngine._argmax_rows) instead of calling `sample`."""
        return self.config.temperature <= 0.0 and self.constraint is None

    def sample(self, logits: np.ndarray) -> int:
        token = self._draw(logits)
        constraint = self.constraint
        if constraint is None:
            return token
        if not constraint.allows(token):
            token = self._draw(self._allowed_logits(logits, constraint))
        constraint.accept(token)
        return token

    @staticmethod
    def _allowed_logits(logits: np.ndarray, constraint: GrammarConstraint) -> np.ndarray:
        """`logits` with what the grammar refuses at -inf, asking it about few tokens first (grammar.py says why)."""
        tiers = (np.argpartition(logits, -n)[-n:] for n in CANDIDATE_TIERS)  # computed only when reached
        for candidates in itertools.chain(tiers, [constraint.punctuation]):
            allowed = candidates[constraint.allowed(candidates)]
            if len(allowed):
                masked = np.full(logits.shape, -np.inf, dtype=np.float32)
                masked[allowed] = logits[allowed]
                return masked
        masked = constraint.mask(logits)
        if not np.isfinite(masked).any():
            raise FailedPrecondition("the output grammar allows no next token; the schema may be unsatisfiable")
        return masked

    def _draw(self, logits: np.ndarray) -> int:
        config = self.config
        if config.temperature <= 0.0:
            return int(np.argmax(logits))
        if 0 < config.top_k < logits.shape[0]:
            candidates = np.argpartition(logits, -config.top_k)[-config.top_k :]
        else:
            candidates = np.arange(logits.shape[0])
        scaled = logits[candidates].astype(np.float64) / config.temperature
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")
        candidates, probs = candidates[order], probs[order]
        if config.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), config.top_p)) + 1
            candidates, probs = candidates[:keep], probs[:keep] / probs[:keep].sum()
        return int(candidates[self.rng.choice(len(candidates), p=probs)])
