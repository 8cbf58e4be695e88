"""Grammar-constrained decoding: a sequence's output held inside a JSON Schema.

The schema becomes a GBNF grammar through llama.cpp's own converter (shipped in
llama-cpp-python as `llama_grammar.json_schema_to_gbnf`), and llama.cpp's
grammar sampler says which tokens may come next. Asking it about all 262k tokens
of the vocabulary costs ≈ 50 ms, a whole decode step, so, as llama.cpp's server
does, the sampler first draws a token freely and asks the grammar about that one
token (≈ 7 µs); when it is refused, it asks about the 512, then the 16,384 most
likely tokens (greedy decoding stays exact: the best allowed token is among them
if any of them is allowed; for sampling, the mass beyond them is negligible),
then about the vocabulary's JSON punctuation tokens (where a grammar forces a
`"` the model ranks low), and only if none of those is allowed does it mask the
whole vocabulary. Measured on a JSON Schema at 16 sequences: a third of the
refusals needed more than the top 512, and whole-vocabulary masks had cost 14%
of throughput. The
grammar's state is a function of the tokens accepted so far, so a sequence
restored from a snapshot rebuilds it by replaying its generated tokens.

Schema keywords the converter does not enforce are refused up front, by name,
rather than silently producing output that does not validate.
"""

from __future__ import annotations

import ctypes
import json
from typing import Any, Iterable

import llama_cpp as llama
import numpy as np
from llama_cpp.llama_grammar import STRING_FORMAT_RULES, json_schema_to_gbnf

from services.errors import InvalidArgument

MAX_SCHEMA_CHARS = 64 * 1024
LOOSE_CHAR = 'char ::= [^"\\\\]'
STRICT_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F]'
CANDIDATE_TIERS = (512, 16384)
# What llama.cpp's converter turns into grammar rules, and keywords that only annotate.
ENFORCED = {
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
    "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions", "pattern", "format",
    "minLength", "maxLength",
}
ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
               "readOnly", "writeOnly", "strict"}
# Bytes of tokens that are JSON punctuation (and whitespace) only: the last tier before the whole vocabulary.
JSON_PUNCTUATION = frozenset(b' \t\n{}[]:,"')
# Keywords whose value is a map of names to schemas, or a schema, or a list of schemas.
SCHEMA_MAPS = ("properties", "$defs", "definitions")
SCHEMA_VALUES = ("items", "additionalProperties")
SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])  # llama_token_data


def unsupported_keywords(schema: Any, path: str = "#") -> list[str]:
    """Every keyword of `schema` the grammar would not enforce, with where it is (e.g. "#/properties/age: minimum")."""
    if isinstance(schema, bool):
        return []
    if not isinstance(schema, dict):
        return [f"{path}: a schema must be an object or a boolean"]
    found = [f"{path}: {key}" for key in schema if key not in ENFORCED and key not in ANNOTATIONS]
    fmt = schema.get("format")
    if fmt is not None and f"{fmt}-string" not in STRING_FORMAT_RULES and fmt != "uuid":
        found.append(f"{path}: format {fmt!r}")
    for key in SCHEMA_MAPS:
        for name, sub in (schema.get(key) or {}).items():
            found += unsupported_keywords(sub, f"{path}/{key}/{name}")
    for key in SCHEMA_VALUES:
        if isinstance(schema.get(key), dict):
            found += unsupported_keywords(schema[key], f"{path}/{key}")
    for key in SCHEMA_LISTS:
        for i, sub in enumerate(schema.get(key) or []):
            found += unsupported_keywords(sub, f"{path}/{key}/{i}")
    return found


def schema_to_grammar(schema_json: str) -> str:
    """The GBNF grammar of a JSON Schema (text); INVALID_ARGUMENT naming what cannot be enforced."""
    if len(schema_json) > MAX_SCHEMA_CHARS:
        raise InvalidArgument(f"the JSON Schema is {len(schema_json)} characters; the limit is {MAX_SCHEMA_CHARS}")
    try:
        schema = json.loads(schema_json)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"json_schema is not valid JSON: {exc}") from None
    unsupported = unsupported_keywords(schema)
    if unsupported:
        raise InvalidArgument(
            "the JSON Schema uses keywords that constrained decoding cannot enforce: " + "; ".join(unsupported[:10])
        )
    try:
        grammar = json_schema_to_gbnf(schema_json)
    except (ValueError, AssertionError, KeyError, TypeError, RecursionError) as exc:
        raise InvalidArgument(f"the JSON Schema cannot be turned into a grammar: {exc}") from None
    # llama-cpp-python's port lets a string hold raw control characters (a newline), which is not JSON; llama.cpp's
    # own converter excludes them. Found by a test whose sampled replies did not parse.
    return grammar.replace(LOOSE_CHAR, STRICT_CHAR)


class GrammarConstraint:
    """llama.cpp's grammar sampler for one sequence: which tokens may come next."""

    def __init__(self, vocab: llama.llama_vocab_p, grammar: str, punctuation: np.ndarray) -> None:
        self.punctuation = punctuation
        self._sampler = llama.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
        if not self._sampler:
            raise InvalidArgument("the grammar does not parse (see the LLM core's log)")
        self._one = (llama.llama_token_data * 1)()
        self._one_array = llama.llama_token_data_array(self._one, 1, -1, False)
        # Grown on first need: most sequences never ask about more than one token at a time.
        self._buffer = np.zeros(0, dtype=TOKEN_DATA)

    def allows(self, token: int) -> bool:
        self._one[0].id, self._one[0].logit, self._one[0].p = token, 0.0, 0.0
        self._one_array.size, self._one_array.selected, self._one_array.sorted = 1, -1, False
        llama.llama_sampler_apply(self._sampler, ctypes.byref(self._one_array))
        return bool(np.isfinite(self._one[0].logit))

    def allowed(self, tokens: np.ndarray) -> np.ndarray:
        """Which of `tokens` (a candidate tier, or the punctuation tokens) the grammar allows next."""
        return np.isfinite(self._apply(tokens, 0.0))

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A copy of `logits` with every token the grammar refuses at -inf."""
        return self._apply(np.arange(len(logits), dtype=np.int32), logits).copy()

    def _apply(self, tokens: np.ndarray, logits: np.ndarray | float) -> np.ndarray:
        """The grammar sampler over (token, logit) pairs: the logits back, refused ones at -inf."""
        n = len(tokens)
        if len(self._buffer) < n:
            self._buffer = np.zeros(n, dtype=TOKEN_DATA)
        data = self._buffer[:n]
        data["id"], data["logit"] = tokens, logits
        array = llama.llama_token_data_array(data.ctypes.data_as(llama.llama_token_data_p), n, -1, False)
        llama.llama_sampler_apply(self._sampler, ctypes.byref(array))
        return data["logit"]

    def accept(self, token: int) -> None:
        llama.llama_sampler_accept(self._sampler, token)

    def replay(self, tokens: Iterable[int]) -> None:
        for token in tokens:
            self.accept(token)

    def close(self) -> None:
        if self._sampler:
            llama.llama_sampler_free(self._sampler)
            self._sampler = None

    def __del__(self) -> None:
        self.close()
