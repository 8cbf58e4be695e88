"""Continuous batching over one llama.cpp context.

The engine owns a fixed number of sequence slots (llama.cpp seq_ids) in one
context and a thread that, each step, puts every running sequence into the same
`llama_decode` call: one token for each decoding sequence, plus prompt chunks of
sequences still prefilling, up to `n_batch` tokens. New sequences join between
steps and finished ones leave without stalling the others, as in llama.cpp's
server. Events go back through each sequence's `emit` callback, called on the
engine thread in order.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Union

import llama_cpp as llama

from services.errors import AiosError, ResourceExhausted, Unavailable
from services.llm_core.model import LlamaModel
from services.llm_core.sampling import SamplingConfig, TokenSampler
from services.llm_core.text import TextStream

log = logging.getLogger("aios.llm_core.engine")


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    STOP_STRING = "stop_string"
    CONTEXT = "context"


@dataclass
class TokenEvent:
    text: str
    token_id: int
    completion_tokens: int


@dataclass
class FinishEvent:
    reason: FinishReason
    text: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class ErrorEvent:
    error: AiosError


Event = Union[TokenEvent, FinishEvent, ErrorEvent]


@dataclass(eq=False)
class Sequence:
    """One generation: its prompt, sampler, progress and where its events go."""

    request_id: str
    prompt: list[int]
    config: SamplingConfig
    emit: Callable[[Event], None]
    sampler: TokenSampler = field(init=False)
    text: TextStream = field(init=False)
    slot: int = -1
    n_past: int = 0
    generated: list[int] = field(default_factory=list)
    next_token: int | None = None
    cancelled: bool = False
    finished: bool = False

    def __post_init__(self) -> None:
        self.sampler = TokenSampler(self.config)
        self.text = TextStream(self.config.stop)

    @property
    def prefilling(self) -> bool:
        return self.n_past < len(self.prompt)


@dataclass(frozen=True)
class EngineConfig:
    slots: int = 8
    n_ctx: int = 16384
    max_sequence_tokens: int = 4096
    n_batch: int = 512
    threads: int = field(default_factory=lambda: os.cpu_count() or 2)


class BatchEngine:
    def __init__(self, model: LlamaModel, config: EngineConfig) -> None:
        if config.max_sequence_tokens > config.n_ctx:
            raise ValueError("max_sequence_tokens cannot exceed n_ctx")
        self.model = model
        self.config = config
        params = llama.llama_context_default_params()
        params.n_ctx = config.n_ctx
        params.n_batch = config.n_batch
        params.n_ubatch = config.n_batch
        params.n_seq_max = config.slots
        params.kv_unified = True
        params.n_threads = config.threads
        params.n_threads_batch = config.threads
        self.ctx = llama.llama_init_from_model(model.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.memory = llama.llama_get_memory(self.ctx)
        self.batch = llama.llama_batch_init(config.n_batch, 0, 1)
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._active: list[Sequence] = []
        self._free_slots = list(range(config.slots))
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)
        self.tokens_generated = 0
        self.steps = 0

    # ---- API used from other threads -------------------------------------------------

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """Refuses a request that can never fit one sequence's context."""
        limit = self.config.max_sequence_tokens
        if prompt_tokens >= limit:
            raise ResourceExhausted(
                f"prompt is {prompt_tokens} tokens; this LLM core holds at most {limit} tokens per sequence "
                "(prompt + generated). Shorten the prompt."
            )
        if prompt_tokens + max_tokens > limit:
            raise ResourceExhausted(
                f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the {limit}-token "
                f"sequence limit; ask for at most {limit - prompt_tokens} tokens"
            )

    def submit(self, seq: Sequence) -> None:
        self.check_fits(len(seq.prompt), seq.config.max_tokens)
        with self._cond:
            if self._stopping:
                raise Unavailable("the LLM core is shutting down; retry on another replica")
            self._waiting.append(seq)
            self._cond.notify()

    def cancel(self, seq: Sequence) -> None:
        """Stops a sequence; its slot is freed before the next decode step."""
        with self._cond:
            seq.cancelled = True
            if seq in self._waiting:
                self._waiting.remove(seq)
                seq.finished = True
            self._cond.notify()

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {
                "slots": self.config.slots,
                "slots_busy": len(self._active),
                "waiting": len(self._waiting),
                "tokens_generated": self.tokens_generated,
            }

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=30)
        llama.llama_batch_free(self.batch)
        llama.llama_free(self.ctx)

    # ---- engine thread -------------------------------------------------------------

    def _reserved(self, seq: Sequence) -> int:
        return len(seq.prompt) + seq.config.max_tokens

    def _admit_locked(self) -> None:
        """Moves waiting sequences into free slots while their worst-case KV fits the context."""
        used = sum(self._reserved(s) for s in self._active)
        while self._waiting and self._free_slots:
            seq = self._waiting[0]
            if used + self._reserved(seq) > self.config.n_ctx:
                break
            self._waiting.popleft()
            seq.slot = self._free_slots.pop(0)
            self._active.append(seq)
            used += self._reserved(seq)

    def _run(self) -> None:
        while True:
            with self._cond:
                for seq in [s for s in self._active if s.cancelled]:
                    self._release_locked(seq)
                self._admit_locked()
                while not self._active and not self._stopping:
                    self._cond.wait()
                    self._admit_locked()
                if self._stopping:
                    break
                active = list(self._active)
            try:
                self._step(active)
            except Exception as exc:  # noqa: BLE001 - fail the sequences, keep the engine alive
                log.exception("decode step failed")
                self._fail(active, Unavailable(f"the LLM core failed a decode step: {exc}"))
        with self._cond:
            pending = list(self._waiting) + list(self._active)
            self._waiting.clear()
        self._fail(pending, Unavailable("the LLM core is shutting down; retry on another replica"))

    def _step(self, active: list[Sequence]) -> None:
        batch = self.batch
        batch.n_tokens = 0
        outputs: list[tuple[Sequence, int]] = []

        def add(token: int, pos: int, seq: Sequence, want_logits: bool) -> None:
            i = batch.n_tokens
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq.slot
            batch.logits[i] = want_logits
            batch.n_tokens = i + 1
            if want_logits:
                outputs.append((seq, i))

        for seq in active:
            if seq.next_token is not None:
                add(seq.next_token, seq.n_past, seq, True)
                seq.n_past += 1
                seq.next_token = None
        budget = self.config.n_batch - batch.n_tokens
        for seq in active:
            if budget <= 0:
                break
            if seq.prefilling:
                take = min(budget, len(seq.prompt) - seq.n_past)
                for j in range(seq.n_past, seq.n_past + take):
                    add(seq.prompt[j], j, seq, j == len(seq.prompt) - 1)
                seq.n_past += take
                budget -= take
        if batch.n_tokens == 0:
            return
        rc = llama.llama_decode(self.ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        self.steps += 1
        for seq, index in outputs:
            self._accept(seq, seq.sampler.sample(self.model.logits_view(self.ctx, index)))

    def _accept(self, seq: Sequence, token: int) -> None:
        if self.model.is_end_of_generation(token):
            self._finish(seq, FinishReason.STOP)
            return
        seq.generated.append(token)
        self.tokens_generated += 1
        text = seq.text.feed(self.model.piece(token))
        seq.emit(TokenEvent(text, token, len(seq.generated)))
        if seq.text.stopped:
            self._finish(seq, FinishReason.STOP_STRING)
        elif len(seq.generated) >= seq.config.max_tokens:
            self._finish(seq, FinishReason.LENGTH)
        elif seq.n_past + 1 >= self.config.max_sequence_tokens:
            self._finish(seq, FinishReason.CONTEXT)
        else:
            seq.next_token = token

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.emit(FinishEvent(reason, seq.text.flush(), len(seq.prompt), len(seq.generated)))
        with self._cond:
            self._release_locked(seq)

    def _release_locked(self, seq: Sequence) -> None:
        if seq.finished:
            return
        seq.finished = True
        if seq in self._active:
            self._active.remove(seq)
            llama.llama_memory_seq_rm(self.memory, seq.slot, -1, -1)
            self._free_slots.append(seq.slot)
            self._cond.notify()

    def _fail(self, sequences: list[Sequence], error: AiosError) -> None:
        for seq in sequences:
            if not seq.finished and not seq.cancelled:
                seq.emit(ErrorEvent(error))
            with self._cond:
                self._release_locked(seq)
            seq.finished = True
