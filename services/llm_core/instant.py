"""`--backend instant`: a test double for the model, which returns tokens without running it.

Why: the scale benchmark measures what the kernel itself costs per syscall with
thousands of agents, LLM calls included; with the real model those calls would
measure llama.cpp instead. Everything around the model is real: the request
goes through the kernel's queue, the core's servicer, tokenization of the
prompt and the sequence's text stream (stop strings), and the stream back.
What it does not do: run the model (every generated token is the same
ordinary word), keep KV (nothing to preempt, park, snapshot or restore) or
follow a grammar (such requests are refused, FAILED_PRECONDITION). The core's
model description says it is this test double.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

from services.errors import FailedPrecondition, Unavailable
from services.llm_core.engine import (
    ENGINE_TIMES,
    Delivery,
    EngineConfig,
    emit_each,
    ErrorEvent,
    Event,
    FinishEvent,
    FinishReason,
    Sequence,
    SequenceStatus,
    TokenEvent,
    check_fits,
)
from services.llm_core.model import LlamaModel
from services.llm_core.snapshot import Snapshot

WORD = " ok"  # every generated token is this word's first token


class InstantEngine:
    """Stands in for BatchEngine (the same methods LLMCore and the servicer call): each generation gets all its
    tokens at once, in the order submitted, on one thread."""

    def __init__(self, model: LlamaModel, config: EngineConfig) -> None:
        self.model = model
        self.config = config
        self.token = model.tokenize(WORD, add_bos=False, special=False)[0]
        self._queue: queue.Queue[Sequence | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="instant-engine", daemon=True)
        self.generations = 0
        self.tokens_generated = 0
        self._stopping = False
        self.deliver: Callable[[Delivery], None] = emit_each  # as BatchEngine's

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._queue.put(None)
        self._thread.join()

    def submit(self, seq: Sequence) -> None:
        if self._stopping:
            raise Unavailable("the LLM core is shutting down; retry on another replica")
        check_fits(self.config, len(seq.prompt), seq.config.max_tokens)  # the limits the real core has
        self._queue.put(seq)

    def cancel(self, seq: Sequence) -> None:
        if not seq.status.ended:
            seq.status = SequenceStatus.CANCELLED

    def preempt(self, request_id: str, swap: bool = False) -> bool:
        return False  # a generation ends within the call that started it: nothing is ever running to preempt

    def swap_out_parked(self, request_id: str) -> None:
        return None  # nothing is ever parked

    def resume(self, request_id: str, agent_id: str, emit: Callable[[Event], None]) -> Sequence | None:
        return None

    def restored(self, snapshot: Snapshot, emit: Callable[[Event], None]) -> Sequence:
        raise FailedPrecondition("this LLM core runs the instant backend (a test double): it keeps no KV to restore")

    def discard(self, request_id: str, agent_id: str) -> bool:
        return False

    def discard_all_parked(self, keep: set[str] = frozenset()) -> int:
        return 0

    def status(self) -> dict[str, Any]:
        return {"slots": self.config.slots, "slots_busy": 0, "slots_parked": 0, "resident_slots": self.config.resident,
                "waiting": self._queue.qsize(), "steps": self.generations, "tokens_generated": self.tokens_generated,
                **{name: 0.0 for name in ENGINE_TIMES}}

    def _run(self) -> None:
        while (seq := self._queue.get()) is not None:
            try:
                self._answer(seq)
            except Exception as exc:  # noqa: BLE001 - fail this generation, keep answering the others
                seq.emit(ErrorEvent(Unavailable(f"the instant backend failed a generation: {exc}")))

    def _answer(self, seq: Sequence) -> None:
        """All of a generation's tokens, as BatchEngine._accept would emit them."""
        if seq.status is SequenceStatus.CANCELLED:
            return
        if seq.constraint is not None:
            seq.emit(ErrorEvent(FailedPrecondition(
                "this LLM core runs the instant backend (a test double that returns tokens without a model): it "
                "does not follow a json_schema; use a core with the llama backend")))
            return
        self.generations += 1
        events: list[Event] = []  # a generation's events handed over together, as BatchEngine does a step's
        try:
            self._generate(seq, events)
        finally:
            self.deliver([(seq.emit, event) for event in events])

    def _generate(self, seq: Sequence, events: list[Event]) -> None:
        while seq.replay:  # delivered before a fault: they stand, through the text stream, unsent (as BatchEngine)
            seq.generated.append(seq.replay.popleft())
            seq.text.feed(self.model.piece(seq.generated[-1]))
        while len(seq.generated) < seq.config.max_tokens and not seq.text.stopped:
            if seq.status is SequenceStatus.CANCELLED:
                return
            seq.generated.append(self.token)
            self.tokens_generated += 1
            events.append(TokenEvent(seq.text.feed(self.model.piece(self.token)), self.token, len(seq.generated), 0))
        reason = seq.text_stop_reason() if seq.text.stopped else FinishReason.LENGTH
        seq.status = SequenceStatus.FINISHED
        events.append(FinishEvent(reason, seq.text.flush(), len(seq.prompt), len(seq.generated), 0, seq.text.hidden_tokens))
