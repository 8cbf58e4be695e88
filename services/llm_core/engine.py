"""Continuous batching over one llama.cpp context, with context switching.

The engine owns `resident` llama.cpp sequences (seq_ids, one KV stream each)
and decodes up to `slots` of them together: each step puts every decoding
sequence into the same `llama_decode` call (one token each), plus prompt chunks
of sequences still prefilling, up to `n_batch` tokens. New sequences join
between steps; finished ones leave without stalling the others.

A seq_id not decoding holds one of:
- a *parked* sequence: preempted, its KV still resident. Resuming it costs
  nothing; only when its seq_id is needed is it snapshotted (lazy swapping)
  and handed to `swap_out`, which writes it to Redis.
- a *cached prefix*: the KV of a finished sequence, kept so that a new prompt
  sharing its beginning (the same system prompt, or an agent's growing
  conversation) skips prefilling that part. Cached prefixes are dropped first.

Streams are not unified (`kv_unified = False`): each sequence attends over its
own cells only, which measured 186 vs 131 tok/s at 16 sequences of 500 tokens.
Prefix reuse therefore copies the source sequence's state into the new one's
stream and trims it, unless it can adopt the cached sequence's own stream.
llama.cpp decodes one run of consecutive seq_ids per pass over the weights, so
decoding sequences are kept on the lowest seq_ids and resting ones are moved up.

Events go back through each sequence's `emit` callback, on the engine thread,
in order; those of a decode step together once the step is done, through
`deliver` (a server hands them to its event loop in one wakeup). All llama.cpp
calls happen on the engine thread.
"""

from __future__ import annotations

import ctypes
import enum
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import llama_cpp as llama
import numpy as np

from services.errors import (
    AiosError,
    FailedPrecondition,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from services.llm_core.model import LlamaModel
from services.llm_core.grammar import GrammarConstraint
from services.llm_core.prefix_store import HostPrefixCache, common_prefix
from services.llm_core.sampling import SamplingConfig, TokenSampler
from services.llm_core.snapshot import ContextShape, Snapshot
from services.llm_core.speculation import PromptLookup, StepCosts, draft_length
from services.llm_core.text import TextStream

log = logging.getLogger("aios.llm_core.engine")


class SequenceStatus(enum.Enum):
    """Where a generation is in its life. The engine owns it and changes it under its lock."""

    WAITING = "waiting"  # queued for a seq_id: new, resumed from parking, or to be restored from a snapshot
    PREFILLING = "prefilling"  # in the batch, its prompt not all in KV yet
    DECODING = "decoding"  # in the batch, one token per step (replayed tokens first, after a recovery)
    PARKED = "parked"  # switched out, its KV still resident in a seq_id
    SNAPSHOTTED = "snapshotted"  # switched out and written to a snapshot; this engine holds nothing of it
    FINISHED = "finished"
    CANCELLED = "cancelled"  # its caller left or its kernel forgot it: its seq_id is freed at the next step boundary
    FAILED = "failed"

    @property
    def ended(self) -> bool:
        return self in (SequenceStatus.FINISHED, SequenceStatus.CANCELLED, SequenceStatus.FAILED)


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
    slot: int


@dataclass
class FinishEvent:
    reason: FinishReason
    text: str
    prompt_tokens: int
    completion_tokens: int
    prefix_reused: int
    hidden_tokens: int = 0  # of completion_tokens, those whose text was held back (a stop string)
    replay_divergences: int = 0  # replayed tokens the recomputation would have chosen differently


@dataclass
class PreemptedEvent:
    completion_tokens: int


@dataclass
class ErrorEvent:
    error: AiosError


Event = Union[TokenEvent, FinishEvent, PreemptedEvent, ErrorEvent]


# Events with the `emit` of the sequence each is for, in order: what BatchEngine.deliver hands over.
Delivery = list[tuple[Callable[[Event], None], Event]]


def emit_each(events: Delivery) -> None:
    """BatchEngine.deliver by default: each event through its sequence's `emit`, in order."""
    for emit, event in events:
        emit(event)


@dataclass(eq=False)
class Sequence:
    """One generation: its prompt, sampler, progress and where its events go."""

    request_id: str
    agent_id: str
    prompt: list[int]
    config: SamplingConfig
    emit: Callable[[Event], None]
    sampler: TokenSampler = field(init=False)
    text: TextStream = field(init=False)
    prompt_array: np.ndarray = field(init=False, repr=False)
    slot: int = -1
    n_past: int = 0
    generated: list[int] = field(default_factory=list)
    next_token: int | None = None
    prefix_reused: int = 0
    restore: Snapshot | None = None  # KV state to load when admitted
    preempt: str = ""  # "", "park" or "swap": requested at the next step boundary
    written: Future | None = None  # its snapshot's write to Redis, once switched out (True: written; False: refused)
    kv_ready: bool = False  # its stream's cells are computed (a prefix source)
    status: SequenceStatus = SequenceStatus.WAITING
    constraint: GrammarConstraint | None = None  # the output grammar's state, if the sampling has one
    replay: deque = field(default_factory=deque)  # delivered tokens to feed back first
    replay_in_batch: bool = False  # may prefill them in a batch (EngineConfig.replay "auto")
    replay_divergences: int = 0
    lookup: PromptLookup | None = None  # its context's n-grams, for drafts (built when it first drafts)
    draft_hit_rate: float = 1.0  # recent share of its guesses the model kept (speculation.draft_length weighs it)

    def text_stop_reason(self) -> FinishReason:
        """Why it ends once its text stream stopped: the model ending its chat turn is a normal stop; the caller's
        own stop strings say STOP_STRING."""
        return FinishReason.STOP if self.text.matched in self.config.turn_end else FinishReason.STOP_STRING

    def __post_init__(self) -> None:
        self.sampler = TokenSampler(self.config, self.constraint)
        self.text = TextStream(self.config.stop)
        self.prompt_array = np.asarray(self.prompt, dtype=np.int32)

    @property
    def prefilling(self) -> bool:
        return self.n_past < len(self.prompt)

    def tokens_in_kv(self) -> np.ndarray:
        """The tokens whose KV this sequence's stream holds, positions 0..n_past-1."""
        if self.n_past <= len(self.prompt):
            return self.prompt_array[: self.n_past]
        return np.concatenate([self.prompt_array, np.asarray(self.generated, dtype=np.int32)])[: self.n_past]


@dataclass(frozen=True)
class EngineConfig:
    slots: int = 16  # sequences decoded together (measured: 152 tok/s at 8, 186 at 16, 198 at 32)
    resident: int = 32  # seq_ids: decoding + parked + cached prefixes
    max_sequence_tokens: int = 2048  # cells per seq_id stream (prompt + generated)
    n_batch: int = 512
    threads: int = field(default_factory=lambda: os.cpu_count() or 2)
    # While other sequences decode, a step prefills at most this many prompt tokens, so a long
    # prompt costs everyone a short pause per step instead of freezing their streams.
    prefill_chunk: int = 256
    prefix_cache: bool = True
    min_prefix_tokens: int = 32  # shorter shared prefixes are prefilled (a stream copy costs ~a few tokens)
    # How to rebuild a generation after a fault (REPLAY_MODES): "exact" feeds its delivered tokens back one decode
    # step each (the KV the first run had), "batched" prefills them in a batch (fast, batched numerics), "auto"
    # batches those the kernel asks to (Sequence.replay_in_batch: they were not decoding alone, so their numerics
    # depended on the batch anyway). `make bench`'s recovery part measures them.
    replay: str = "auto"
    # RAM for prefixes that lost their seq_id (prefix_store.HostPrefixCache); 0 keeps none.
    host_prefix_bytes: int = 2 << 30
    # Speculative decoding (speculation.py): a decoding sequence may carry up to `draft_tokens` guessed tokens in a
    # step, verified in the same llama_decode, as many as the step costs measured here and the sequences' recent
    # hit rates say pay (on a CPU a step's cost grows with its tokens). Steps stay within `draft_step_tokens`
    # tokens. 0 turns speculation off.
    draft_tokens: int = 0
    draft_step_tokens: int = 64


REPLAY_MODES = ("auto", "exact", "batched")
# A sequence's hit rate moves by DRAFT_RATE_WEIGHT of the way to each step's share of kept guesses; a low rate makes
# its guesses not worth a step's cost, and it climbs back by DRAFT_RATE_RECOVERY of the way to 1 each step without
# drafts, so the sequence tries again later (its output may start copying).
DRAFT_RATE_WEIGHT = 0.3
DRAFT_RATE_RECOVERY = 0.05
PADDING_GAIN = 0.03  # a padded step must measure this much cheaper than a plain one to keep padding (noise aside)
# Steps that the seq_id a finished generation left among decoding ones waits for the next one to join there, bridged by
# a padding row, before the decoding ones above it move down: the kernel hands a core its next generation once it has
# heard of the last one's end, a step later, and a move then copies two sequences' KV (~30 ms per join measured in
# `make bench` at 32 and 64 agents) where the joining one would have adopted the finished one's prefix in place.
GAP_WAIT_STEPS = 4
# Tokens a prompt's prefix resting where the sequence goes may be shorter than the longest prefix found elsewhere and
# still be adopted in place: moving what rests there aside and copying the longer one in measured ~11 ms in `make
# bench` at 32 agents (250-token sequences, 2-core EPYC), where a joining prompt's chunk prefills a token in ~3 ms.
ADOPT_SLACK_TOKENS = 4
# EngineStats' times, in InfoResponse under the same names: they do not overlap (see EngineStats).
ENGINE_TIMES = ("decode_seconds", "sample_seconds", "schedule_seconds", "kv_copy_seconds", "idle_seconds")


def check_fits(config: EngineConfig, prompt_tokens: int, max_tokens: int) -> None:
    """Refuses a request that can never fit one sequence's context."""
    limit = config.max_sequence_tokens
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


class PrefixSource(enum.Enum):
    """Where the longest reusable prefix of a prompt is."""

    NONE = "none"
    CACHED = "cached"  # a finished sequence's KV still in its seq_id
    SEQUENCE = "sequence"  # a decoding or parked sequence's KV
    HOST_RAM = "host_ram"  # a finished sequence's KV copied to RAM when its seq_id was needed


@dataclass
class EngineStats:
    steps: int = 0
    tokens_generated: int = 0
    prefill_tokens: int = 0
    prefill_tokens_saved: int = 0
    preemptions: int = 0
    resumes_resident: int = 0
    restores: int = 0
    tokens_replayed: int = 0  # fed back to recover generations whose core died
    # Where the engine thread's time goes (`make bench` prints the shares): inside llama_decode, sampling and
    # accepting tokens, everything else while it has work (admission, batch building, bookkeeping), copying KV
    # state (snapshots, restores, prefix copies), and waiting for work. decode_rows: sequences decoding (one token
    # each) summed over steps, so decode_rows / steps is how full the batch ran.
    decode_seconds: float = 0.0
    sample_seconds: float = 0.0
    schedule_seconds: float = 0.0
    kv_copy_seconds: float = 0.0
    idle_seconds: float = 0.0
    decode_rows: int = 0
    prefix_restores_from_ram: int = 0
    draft_tokens: int = 0  # guessed tokens decoded for verification
    draft_tokens_accepted: int = 0  # of them, those the model produced too: each saved a decode step
    padded_steps: int = 0  # decode steps given logits rows more, because that measured cheaper (_padded_size)
    bridged_steps: int = 0  # decode steps whose padding row bridged a seq_id left among decoding ones (_bridge_row)
    # Decode steps that carried prompt tokens, and plain ones (decoding rows only, one token each), by sequences
    # decoding in them: (steps, llama_decode seconds). Each entry is replaced in one store: read from any thread.
    prompt_steps: dict[int, tuple[int, float]] = field(default_factory=dict)
    plain_steps: dict[int, tuple[int, float]] = field(default_factory=dict)


def count_step(tally: dict[int, tuple[int, float]], sequences: int, seconds: float) -> None:
    """One more step of `sequences` decoding that took `seconds`, in an EngineStats tally."""
    steps, total = tally.get(sequences, (0, 0.0))
    tally[sequences] = (steps + 1, total + seconds)


def tallies(tally: dict[int, tuple[int, float]]) -> list[tuple[int, int, float]]:
    """An EngineStats tally as (sequences, steps, seconds) in order; from any thread (one C-level copy)."""
    return sorted((sequences, steps, seconds) for sequences, (steps, seconds) in list(tally.items()))


@dataclass(frozen=True)
class Draft:
    """The guessed tokens one decoding sequence carries in a step: its own guesses (the first `own`), then weaker
    ones that fill its rows up to the step's draft length."""

    tokens: list[int]
    own: int


@dataclass(frozen=True)
class CachedPrefix:
    """A finished sequence's KV resting in its seq_id: the tokens it holds and the agent whose they were."""

    tokens: np.ndarray
    agent_id: str


def read_sequence_state(ctx: llama.llama_context_p, seq_id: int) -> memoryview:
    """One sequence's llama.cpp state (its KV cells), copied once into a fresh buffer."""
    size = llama.llama_state_seq_get_size(ctx, seq_id)
    kv = bytearray(size)
    written = llama.llama_state_seq_get_data(ctx, (ctypes.c_uint8 * size).from_buffer(kv), size, seq_id)
    return memoryview(kv)[:written]


def write_sequence_state(ctx: llama.llama_context_p, seq_id: int, kv: bytes | bytearray | memoryview) -> bool:
    """Loads state from read_sequence_state into `seq_id`; zero-copy, also from read-only bytes."""
    data = np.frombuffer(kv, dtype=np.uint8)
    return llama.llama_state_seq_set_data(ctx, data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), len(data), seq_id) > 0


class SeqIdTable:
    """llama.cpp's seq_ids (one KV stream each) that no sequence holds: free ones, and cached prefixes (the KV
    of finished sequences, kept for prompts that start the same way; least recently used first). Sequences hold
    the others. It owns the KV operations on what it holds; `check` says whether, with the sequences' seq_ids,
    every seq_id has exactly one holder."""

    def __init__(self, memory: Any, count: int,
                 on_drop: Callable[[int, CachedPrefix], None] = lambda slot, prefix: None) -> None:
        self.memory = memory
        self.count = count
        self.on_drop = on_drop  # hears a cached prefix about to be dropped (its KV still there)
        self.free = list(range(count))
        self.cached: OrderedDict[int, CachedPrefix] = OrderedDict()  # seq_id -> what its KV holds; LRU first

    def clear(self, slot: int) -> None:
        llama.llama_memory_seq_rm(self.memory, slot, -1, -1)

    def release(self, slot: int) -> None:
        """A sequence gave `slot` up: its KV goes, the seq_id is free."""
        self.clear(slot)
        self.free.append(slot)

    def cache(self, slot: int, prefix: CachedPrefix) -> None:
        """A finished sequence's KV at `slot` stays, as a prefix for later prompts."""
        self.cached[slot] = prefix

    def take_free(self, slot: int) -> bool:
        """Claims `slot` if it is free."""
        if slot not in self.free:
            return False
        self.free.remove(slot)
        return True

    def spare_above(self, above: int, keep: int) -> int | None:
        """A seq_id above `above` to move something resting lower to: the highest free one, else the least
        recently used cached prefix (dropped), but not the one at `keep` (a copy source about to be used)."""
        higher = [i for i in self.free if i > above]
        if higher:
            self.free.remove(max(higher))
            return max(higher)
        for slot in self.cached:  # least recently used first
            if slot > above and slot != keep:
                self.evict(slot)
                return slot
        return None

    def evict(self, slot: int) -> None:
        """Drops the cached prefix at `slot` to reuse the seq_id (still claimed): `on_drop` hears it first."""
        self.on_drop(slot, self.cached.pop(slot))
        self.clear(slot)

    def drop_cached(self, slot: int) -> bool:
        """Frees the cached prefix at `slot`, if one is there."""
        if self.cached.pop(slot, None) is None:
            return False
        self.free.append(slot)
        return True

    def relabel(self, mapping: dict[int, int]) -> None:
        """Two seq_ids exchanged their KV: what this table holds follows."""
        self.cached = OrderedDict((mapping.get(slot, slot), prefix) for slot, prefix in self.cached.items())
        self.free = [mapping.get(slot, slot) for slot in self.free]

    def check(self, held_by_sequences: list[int]) -> None:
        holders = held_by_sequences + list(self.cached) + self.free
        assert sorted(holders) == list(range(self.count)), holders


def ubatches(seq_ids: list[int], n_ubatch: int) -> list[list[int]]:
    """The rows (batch indices) of each pass over the weights that llama.cpp's split_equal makes of a batch listing
    each sequence's rows together in seq_id order (`seq_ids`: each row's): a run of consecutive seq_ids, as many
    rows of each as the one with fewest left has, within `n_ubatch` rows."""
    left: dict[int, list[int]] = {}
    for i, seq_id in enumerate(seq_ids):
        left.setdefault(seq_id, []).append(i)
    passes: list[list[int]] = []
    while left:
        run: list[int] = []
        for seq_id in left:
            if run and seq_id != run[-1] + 1:
                break
            run.append(seq_id)
        take = max(1, min(min(len(left[s]) for s in run), n_ubatch // len(run)))
        passes.append([i for s in run for i in left[s][:take]])
        for s in run:
            del left[s][:take]
            if not left[s]:
                del left[s]
    return passes


class BatchEngine:
    def __init__(
        self,
        model: LlamaModel,
        config: EngineConfig,
        swap_out: Callable[[Snapshot], Future],
    ) -> None:
        if config.resident < config.slots:
            raise ValueError("resident must be at least slots")
        self.model = model
        self.config = config
        self.swap_out = swap_out
        params = llama.llama_context_default_params()
        params.n_ctx = config.resident * config.max_sequence_tokens
        params.n_batch = config.n_batch
        params.n_ubatch = config.n_batch
        params.n_seq_max = config.resident
        params.kv_unified = False
        params.n_threads = config.threads
        params.n_threads_batch = config.threads
        self.ctx = llama.llama_init_from_model(model.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.shape = ContextShape(model.description, model.n_vocab, config.resident, False)
        self.n_swa = llama.llama_model_n_swa(model.model)
        self.memory = llama.llama_get_memory(self.ctx)
        self.batch = llama.llama_batch_init(config.n_batch, 0, 1)
        self.stats = EngineStats()
        self.step_costs = StepCosts()
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._active: list[Sequence] = []
        self._parked: OrderedDict[str, Sequence] = OrderedDict()  # oldest first: the swap victim
        self.slots = SeqIdTable(self.memory, config.resident, on_drop=self._keep_in_ram)
        self.host_prefixes = HostPrefixCache(config.host_prefix_bytes)
        self._idle_since: float | None = None  # the engine thread waits for work since then
        self._compact_at: int | None = None  # the step from which a gap among decoding seq_ids is closed by moves
        self._to_release: list[Sequence] = []
        self._to_swap: list[tuple[Sequence, Future]] = []  # parked sequences to write out (moving to another core)
        self._stopping = False
        # A decode step's events, handed over together by `deliver` once the step is done (None between steps).
        self._outbox: Delivery | None = None
        self.deliver: Callable[[Delivery], None] = emit_each
        self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)

    # ---- API used from other threads -------------------------------------------------

    def submit(self, seq: Sequence) -> None:
        """Queues a new sequence, or a restored one (`seq.restore` set)."""
        check_fits(self.config, len(seq.prompt), seq.config.max_tokens)
        with self._cond:
            if self._stopping:
                raise Unavailable("the LLM core is shutting down; retry on another replica")
            self._waiting.append(seq)
            self._cond.notify()

    def cancel(self, seq: Sequence) -> None:
        """Stops a sequence; its slot is freed before the next decode step."""
        with self._cond:
            if seq.status.ended:
                return
            if seq in self._waiting:
                self._waiting.remove(seq)
            elif seq not in self._active:
                return  # parked: the kernel discards it
            seq.status = SequenceStatus.CANCELLED
            self._to_release.append(seq)
            self._cond.notify()

    def preempt(self, request_id: str, swap: bool = False) -> bool:
        """Asks a decoding sequence to leave its slot at the next step boundary.

        Returns False when it is not decoding (finished, waiting or unknown).
        Its emit then receives a PreemptedEvent; `resume` brings it back.
        """
        with self._cond:
            for seq in self._active:
                # A sequence still replaying is not switched out: a snapshot does not carry what is left to replay.
                if seq.request_id == request_id and not seq.status.ended and not seq.replay:
                    seq.preempt = "swap" if swap else "park"
                    self._cond.notify()
                    return True
            return False

    def swap_out_parked(self, request_id: str) -> Future | None:
        """Has a parked (resident) sequence's snapshot written, so that another core can resume it; the future
        completes once it is written. None when no sequence of that id is parked here (it is running, finished,
        unknown, or already written out)."""
        with self._cond:
            seq = self._parked.get(request_id)
            if seq is None:
                return None
            written: Future = Future()
            self._to_swap.append((seq, written))  # KV is read on the engine thread, between steps
            self._cond.notify()
            return written

    def resume(self, request_id: str, agent_id: str, emit: Callable[[Event], None]) -> Sequence | None:
        """Re-queues a parked (resident) sequence; None if it is not resident here."""
        with self._cond:
            seq = self._unpark_locked(request_id, agent_id)
            if seq is not None:
                seq.emit, seq.status = emit, SequenceStatus.WAITING
                self._waiting.appendleft(seq)
                self.stats.resumes_resident += 1
            return seq

    def discard(self, request_id: str, agent_id: str) -> bool:
        """Frees a parked sequence's slot."""
        with self._cond:
            seq = self._unpark_locked(request_id, agent_id)
            if seq is not None:
                seq.status = SequenceStatus.CANCELLED
                self._to_release.append(seq)
            return seq is not None

    def discard_all_parked(self, keep: set[str] = frozenset()) -> int:
        """Frees every parked sequence's slot but those of the request ids in `keep` (their kernel is gone, or
        suspended them for their agents); returns how many."""
        with self._cond:
            parked = [seq for seq in self._parked.values() if seq.request_id not in keep]
            for seq in parked:
                del self._parked[seq.request_id]
            for seq in parked:
                seq.status = SequenceStatus.CANCELLED
            self._to_release.extend(parked)
            self._cond.notify()
            return len(parked)

    def _unpark_locked(self, request_id: str, agent_id: str) -> Sequence | None:
        seq = self._parked.get(request_id)
        if seq is None:
            return None
        if seq.agent_id != agent_id:
            raise PermissionDenied(f"generation {request_id!r} belongs to another agent")
        del self._parked[request_id]
        self._cond.notify()
        return seq

    def restored(self, snapshot: Snapshot, emit: Callable[[Event], None]) -> Sequence:
        """A sequence rebuilt from a snapshot, ready to `submit` (its KV loads on admission)."""
        if snapshot.shape != self.shape:
            raise FailedPrecondition(
                f"snapshot {snapshot.request_id!r} was taken on a core with {snapshot.shape}; this core has "
                f"{self.shape}. Resume it on a core started with the same model and --resident."
            )
        constraint = self.model.constraint(snapshot.sampling.grammar)
        if constraint is not None:
            constraint.replay(snapshot.generated)  # the grammar's state is the tokens it accepted
        seq = Sequence(snapshot.request_id, snapshot.agent_id, snapshot.prompt, snapshot.sampling, emit,
                       constraint=constraint)
        seq.generated = list(snapshot.generated)
        seq.n_past = snapshot.n_past
        seq.next_token = snapshot.next_token
        seq.prefix_reused = snapshot.prefix_reused
        seq.sampler.rng.bit_generator.state = snapshot.rng_state
        for token in seq.generated:  # rebuilds the stop-string holdback exactly as it was
            seq.text.feed(self.model.piece(token))
        seq.restore = snapshot
        return seq

    def status(self) -> dict[str, Any]:
        """InfoResponse's fields this engine knows (step_costs: StepCosts.table())."""
        with self._cond:
            return {
                "slots": self.config.slots,
                "slots_busy": len(self._active),
                "slots_parked": len(self._parked),
                "prefix_cache_entries": len(self.slots.cached),
                "resident_slots": self.config.resident,
                "waiting": len(self._waiting),
                "steps": self.stats.steps,
                "tokens_generated": self.stats.tokens_generated,
                "preemptions": self.stats.preemptions,
                "resumes_resident": self.stats.resumes_resident,
                "snapshots_restored": self.stats.restores,
                "prefill_tokens": self.stats.prefill_tokens,
                "prefill_tokens_saved": self.stats.prefill_tokens_saved,
                **{name: getattr(self.stats, name) for name in ENGINE_TIMES},
                "idle_seconds": self.stats.idle_seconds + (  # a wait still going on counts up to now
                    time.perf_counter() - self._idle_since if self._idle_since is not None else 0.0),
                "decode_rows": self.stats.decode_rows,
                "prefix_restores_from_ram": self.stats.prefix_restores_from_ram,
                "draft_tokens": self.stats.draft_tokens,
                "draft_tokens_accepted": self.stats.draft_tokens_accepted,
                "padded_steps": self.stats.padded_steps,
                "bridged_steps": self.stats.bridged_steps,
                "prefix_ram_entries": len(self.host_prefixes),
                "prefix_ram_bytes": self.host_prefixes.used_bytes,
                "step_costs": self.step_costs.table(),
                "prompt_steps": tallies(self.stats.prompt_steps),
                "plain_steps": tallies(self.stats.plain_steps),
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

    def _replays_in_batch(self, seq: Sequence) -> bool:
        return self.config.replay == "batched" or (self.config.replay == "auto" and seq.replay_in_batch)

    def check_invariants_locked(self) -> None:
        """Raises AssertionError unless the books balance: every seq_id has exactly one holder (a sequence in the
        batch, parked or resumed, a cached prefix, or the free list), every sequence in the batch has KV ending
        where it writes next, and each sequence's status matches the list it is in. The tests call it before
        every step of a random stress; it reads llama.cpp's memory, so it is not for the hot path."""
        held = [s.slot for s in self._active] + [s.slot for s in self._parked.values()]
        self.slots.check(held + [s.slot for s in self._waiting if s.slot >= 0])
        in_batch = (SequenceStatus.PREFILLING, SequenceStatus.DECODING, SequenceStatus.CANCELLED)
        for seq in self._active:
            assert seq.status in in_batch, (seq.request_id, seq.status)
            assert llama.llama_memory_seq_pos_max(self.memory, seq.slot) == seq.n_past - 1, (seq.request_id, seq.slot)
        assert all(s.status is SequenceStatus.PARKED for s in self._parked.values())
        assert all(s.status is SequenceStatus.WAITING for s in self._waiting)

    # ---- engine thread: slots -------------------------------------------------------

    def _housekeeping_locked(self) -> None:
        for seq in self._to_release:
            self._release_locked(seq, SequenceStatus.CANCELLED)
        self._to_release.clear()
        for seq, written in self._to_swap:
            try:
                if seq.status is SequenceStatus.PARKED:
                    self._swap_out_locked(seq)
            except AiosError as exc:
                written.set_exception(exc)
                continue
            if seq.status is SequenceStatus.SNAPSHOTTED and seq.written is not None:  # now or earlier: once it lands
                seq.written.add_done_callback(lambda done, written=written: written.set_result(bool(done.result())))
            else:  # resumed or discarded since it was asked
                written.set_result(False)
        self._to_swap.clear()
        for seq in [s for s in self._active if s.preempt]:
            self._active.remove(seq)
            self._parked[seq.request_id] = seq
            seq.status = SequenceStatus.PARKED
            self.stats.preemptions += 1
            event = PreemptedEvent(len(seq.generated))
            if seq.preempt == "swap":  # announced once the snapshot is in Redis, so any core can resume it
                written = self._swap_out_locked(seq)
                written.add_done_callback(lambda _, seq=seq, event=event: seq.emit(event))
            else:
                seq.emit(event)
            seq.preempt = ""

    def _lowest_idle_slot_locked(self) -> int:
        """The lowest seq_id no decoding sequence holds; `resident` if none (not when admitting: active < slots).

        llama.cpp makes one pass over the weights per run of consecutive seq_ids in a batch
        (see _step), so decoding sequences are kept low and together.
        """
        busy = {s.slot for s in self._active} | {s.slot for s in self._waiting if s.slot >= 0}  # + resumed, resident
        return next((i for i in range(self.config.resident) if i not in busy), self.config.resident)

    def _read_state(self, seq_id: int) -> memoryview:
        started = time.perf_counter()
        try:
            return read_sequence_state(self.ctx, seq_id)
        finally:
            self.stats.kv_copy_seconds += time.perf_counter() - started

    def _write_state(self, seq_id: int, kv: bytes | bytearray | memoryview) -> bool:
        started = time.perf_counter()
        try:
            return write_sequence_state(self.ctx, seq_id, kv)
        finally:
            self.stats.kv_copy_seconds += time.perf_counter() - started

    def _copy_locked(self, src: int, dst: int) -> None:
        """Copies one sequence's KV to another seq_id, now.

        Not llama_memory_seq_cp: across streams it defers the data copy to the next decode, and a
        restore or a snapshot of either seq_id before then would read or clobber the wrong data.
        """
        if not self._write_state(dst, self._read_state(src)):
            raise RuntimeError(f"llama.cpp refused to copy seq_id {src} to {dst}")

    def _move_locked(self, src: int, dst: int) -> None:
        self._copy_locked(src, dst)
        llama.llama_memory_seq_rm(self.memory, src, -1, -1)

    def _vacate_locked(self, slot: int, keep: int = -1) -> int:
        """Makes `slot` free. A cached prefix or parked sequence resting there moves to a spare seq_id;
        with none, the prefix is dropped and the parked sequence written out. Returns where it went (-1: gone).
        The cached prefix at `keep` is not dropped to make room."""
        if self.slots.take_free(slot):
            return -1
        spare = self.slots.spare_above(slot, keep)
        if slot in self.slots.cached:
            if spare is None:
                self.slots.evict(slot)
                return -1
            self._move_locked(slot, spare)
            self.slots.cache(spare, self.slots.cached.pop(slot))
            return spare
        parked = next(p for p in self._parked.values() if p.slot == slot)
        if spare is None:
            self._swap_out_locked(parked)
            self.slots.take_free(slot)
            return -1
        self._move_locked(slot, spare)
        parked.slot = spare
        return spare

    def _compact_locked(self) -> None:
        """Moves decoding sequences down into the seq_ids that finished or preempted ones left, so that
        they stay one run of consecutive seq_ids: each gap would cost a pass over the weights every step
        (measured: 15 sequences with one gap 112 ms per step, 16 without 70 ms). A lone gap first waits
        GAP_WAIT_STEPS steps for a joining sequence to take it, bridged by a padding row meanwhile (_bridge_row)."""
        while self._active:
            top = max(self._active, key=lambda s: s.slot)
            if top.slot < len(self._active):  # they hold seq_ids 0..n-1
                self._compact_at = None
                return
            if self._bridge_row(self._active) is not None:
                if self._compact_at is None:
                    self._compact_at = self.stats.steps + GAP_WAIT_STEPS
                if self.stats.steps < self._compact_at:
                    return
            gap = self._lowest_idle_slot_locked()
            if gap > top.slot or not self._exchange_locked(gap, top):
                return
        self._compact_at = None

    def _exchange_locked(self, gap: int, top: Sequence) -> bool:
        """Swaps the KV and bookkeeping of seq_id `gap` and `top`'s seq_id: what rested at `gap`
        (a cached prefix or a parked sequence, if anything) moves up to where `top` was.
        False if llama.cpp refused to load `top` at `gap` (it then stays where it was)."""
        high = top.slot
        resting = None if gap in self.slots.free else self._read_state(gap)
        moving = self._read_state(high)
        llama.llama_memory_seq_rm(self.memory, gap, -1, -1)
        if not self._write_state(gap, moving):  # top keeps its KV at `high`
            self._drop_resting_locked(gap)
            return False
        llama.llama_memory_seq_rm(self.memory, high, -1, -1)
        relabel = {gap: high, high: gap}
        for seq in [*self._parked.values(), *self._waiting, top]:
            seq.slot = relabel.get(seq.slot, seq.slot)
        self.slots.relabel(relabel)
        if resting is not None and not self._write_state(high, resting):
            self._drop_resting_locked(high)
        return True

    def _drop_resting_locked(self, slot: int) -> None:
        """What rested at `slot` lost its KV in a move that llama.cpp refused: forget it, or fail it."""
        log.error("llama.cpp refused to move seq_id %d; dropping what rested there", slot)
        self.slots.clear(slot)
        if self.slots.drop_cached(slot):
            return
        for seq in [*self._parked.values(), *self._waiting]:
            if seq.slot == slot:
                self._parked.pop(seq.request_id, None)
                if seq in self._waiting:
                    self._waiting.remove(seq)
                seq.emit(ErrorEvent(Unavailable(f"generation {seq.request_id!r} lost its context on this LLM core")))
                self._release_locked(seq, SequenceStatus.FAILED)

    def _claim_slot_locked(self) -> int:
        slot = self._lowest_idle_slot_locked()
        self._vacate_locked(slot)
        return slot

    def _swap_out_locked(self, seq: Sequence) -> Future:
        """Snapshots a parked sequence and frees its seq_id; the future completes once it is written."""
        written = seq.written = self.swap_out(self._snapshot(seq))
        self._parked.pop(seq.request_id, None)
        seq.status = SequenceStatus.SNAPSHOTTED
        self.slots.release(seq.slot)
        seq.slot = -1
        return written

    def _snapshot(self, seq: Sequence) -> Snapshot:
        return Snapshot(
            request_id=seq.request_id,
            agent_id=seq.agent_id,
            shape=self.shape,
            prompt=seq.prompt,
            generated=list(seq.generated),
            n_past=seq.n_past,
            next_token=seq.next_token,
            sampling=seq.config,
            rng_state=seq.sampler.rng.bit_generator.state,
            prefix_reused=seq.prefix_reused,
            kv=self._read_state(seq.slot),
        )

    def _load(self, seq: Sequence, snapshot: Snapshot) -> None:
        if not self._write_state(seq.slot, snapshot.kv) or (
            llama.llama_memory_seq_pos_max(self.memory, seq.slot) != seq.n_past - 1
        ):
            llama.llama_memory_seq_rm(self.memory, seq.slot, -1, -1)
            raise FailedPrecondition(
                f"llama.cpp refused the snapshot of {seq.request_id!r} (corrupt, or from another model build)"
            )
        self.stats.restores += 1

    def _keep_in_ram(self, slot: int, prefix: CachedPrefix) -> None:
        """A cached prefix loses its seq_id: its KV goes to the host RAM store instead of away."""
        if self.host_prefixes.budget_bytes and len(prefix.tokens) >= self.config.min_prefix_tokens:
            self.host_prefixes.put(prefix.agent_id, prefix.tokens, self._read_state(slot))

    def _best_prefix_locked(self, seq: Sequence) -> tuple[int, int, PrefixSource]:
        """The longest computed prefix of `seq`'s prompt here: (tokens, seq_id or host store key, where)."""
        want = seq.prompt_array[:-1]  # the last prompt token is always decoded, for its logits
        best, source, where = 0, -1, PrefixSource.NONE
        if self.config.prefix_cache:
            claimed, in_place = self._lowest_idle_slot_locked(), 0
            for slot, prefix in self.slots.cached.items():
                n = common_prefix(prefix.tokens, want)
                if slot == claimed:
                    in_place = n
                if n > best:
                    best, source, where = n, slot, PrefixSource.CACHED
            for other in [*self._active, *self._parked.values()]:
                if not other.kv_ready:  # admitted this round: its cells are not computed yet
                    continue
                n = common_prefix(other.tokens_in_kv(), want)
                if n > best:
                    best, source, where = n, other.slot, PrefixSource.SEQUENCE
            n, key = self.host_prefixes.longest(seq.agent_id, want)
            if n > best + self.config.min_prefix_tokens:  # a copy from RAM must beat prefilling the difference
                best, source, where = n, key, PrefixSource.HOST_RAM
            # The cached prefix resting at the seq_id `seq` will take is adopted where it is, with no copy, unless
            # another is longer by more than ADOPT_SLACK_TOKENS (agents sharing a system prompt share it with every
            # cached prefix, and one more digit of a task's number with some).
            if in_place >= max(best - ADOPT_SLACK_TOKENS, self.config.min_prefix_tokens, 1):
                best, source, where = in_place, claimed, PrefixSource.CACHED
        return best, source, where

    def _prefix_coming_locked(self, seq: Sequence) -> bool:
        """True when a sequence prefilling now will soon hold a longer prefix of `seq`'s prompt than any
        resident one: agents that start together with the same system prompt then prefill it once."""
        if not self.config.prefix_cache or seq.slot >= 0 or seq.restore is not None:
            return False
        want = seq.prompt_array[:-1]
        enough = self._best_prefix_locked(seq)[0] + self.config.min_prefix_tokens
        return any(
            other.prefilling and not other.status.ended and not other.preempt
            and common_prefix(other.prompt_array, want) >= max(enough, other.n_past + 1)
            for other in self._active
        )

    def _reuse_prefix_locked(self, seq: Sequence) -> int:
        """Gives `seq` a seq_id holding the longest prefix of its prompt found here (resident or in RAM)."""
        best, source, where = self._best_prefix_locked(seq)
        if best < self.config.min_prefix_tokens:
            return self._claim_slot_locked()
        if where is PrefixSource.HOST_RAM:
            kv = self.host_prefixes.take(source)  # held here: claiming a seq_id may evict it from the store
            slot = self._claim_slot_locked()
            if not self._write_state(slot, kv):
                log.error("llama.cpp refused a prefix from RAM for %s; prefilling in full", seq.request_id)
                self.host_prefixes.drop(source)
                self.slots.clear(slot)
                return slot
            self.stats.prefix_restores_from_ram += 1
        else:
            slot = self._lowest_idle_slot_locked()
            if where is PrefixSource.CACHED and source == slot:
                del self.slots.cached[slot]  # adopt the cached stream where it is: no copy
            else:
                moved_to = self._vacate_locked(slot, keep=source)
                if source == slot:  # the source was resting here and moved (or was written out)
                    source = moved_to
                if source < 0:
                    return slot
                self._copy_locked(source, slot)
        llama.llama_memory_seq_rm(self.memory, slot, best, -1)
        if llama.llama_memory_seq_pos_max(self.memory, slot) != best - 1:  # never decode on the wrong prefix
            log.error("prefix copy for %s left seq_id %d at pos_max %d, not %d; prefilling in full", seq.request_id,
                      slot, llama.llama_memory_seq_pos_max(self.memory, slot), best - 1)
            llama.llama_memory_seq_rm(self.memory, slot, -1, -1)
            return slot
        pos_min = llama.llama_memory_seq_pos_min(self.memory, slot)
        if pos_min > max(0, best - self.n_swa):  # sliding-window layers lost cells we need: prefill all
            llama.llama_memory_seq_rm(self.memory, slot, -1, -1)
            return slot
        seq.n_past = seq.prefix_reused = best
        self.stats.prefill_tokens_saved += best
        return slot

    def _admit_locked(self) -> None:
        later: list[Sequence] = []  # waiting for a shared prefix another sequence is prefilling
        while self._waiting and len(self._active) < self.config.slots:
            seq = self._waiting.popleft()
            if self._prefix_coming_locked(seq):
                later.append(seq)
                continue
            try:
                self._place_locked(seq)
            except Exception as exc:  # noqa: BLE001 - fail this sequence, keep the engine alive
                log.exception("could not admit %s", seq.request_id)
                error = exc if isinstance(exc, AiosError) else Unavailable(f"the LLM core could not admit it: {exc}")
                seq.emit(ErrorEvent(error))
                self._release_locked(seq, SequenceStatus.FAILED)
                continue
            self._active.append(seq)
            seq.status = SequenceStatus.PREFILLING if seq.prefilling else SequenceStatus.DECODING
        self._waiting.extendleft(reversed(later))

    def _place_locked(self, seq: Sequence) -> None:
        """Gives an admitted sequence its seq_id, with its KV (a restored snapshot or a reused prefix)."""
        if seq.slot >= 0:  # a resumed resident sequence: _compact_locked brings it down next to the others
            return
        if seq.restore is None:
            seq.slot = self._reuse_prefix_locked(seq)
            return
        seq.slot = self._claim_slot_locked()
        snapshot, seq.restore = seq.restore, None
        self._load(seq, snapshot)
        seq.kv_ready = True

    def _release_locked(self, seq: Sequence, status: SequenceStatus, keep_as_prefix: bool = False) -> None:
        """Ends the sequence with `status` (FINISHED, CANCELLED, FAILED) and frees or caches its seq_id; once."""
        if seq.status.ended and seq.slot < 0 and seq not in self._active:
            return
        seq.status = status
        if seq in self._active:
            self._active.remove(seq)
        if seq.slot < 0:
            return
        if keep_as_prefix and self.config.prefix_cache and seq.n_past >= self.config.min_prefix_tokens:
            self.slots.cache(seq.slot, CachedPrefix(seq.tokens_in_kv().copy(), seq.agent_id))
        else:
            self.slots.release(seq.slot)
        seq.slot = -1
        self._cond.notify()

    # ---- engine thread: decoding ------------------------------------------------------

    def _run(self) -> None:
        while True:
            started, idle, copying = time.perf_counter(), self.stats.idle_seconds, self.stats.kv_copy_seconds
            with self._cond:
                self._housekeeping_locked()
                self._admit_locked()
                while not self._active and not self._stopping:
                    self._idle_since = time.perf_counter()
                    self._cond.wait()
                    self.stats.idle_seconds += time.perf_counter() - self._idle_since
                    self._idle_since = None
                    self._housekeeping_locked()
                    self._admit_locked()
                self._compact_locked()
                if self._stopping:
                    break
                active = list(self._active)
            self.stats.schedule_seconds += (time.perf_counter() - started - (self.stats.idle_seconds - idle)
                                            - (self.stats.kv_copy_seconds - copying))
            try:
                self._step(active)
            except Exception as exc:  # noqa: BLE001 - fail the sequences, keep the engine alive
                log.exception("decode step failed")
                self._fail(active, Unavailable(f"the LLM core failed a decode step: {exc}"))
        with self._cond:
            pending = list(self._waiting) + list(self._active)
            self._waiting.clear()
            for seq in list(self._parked.values()):  # let another core resume them
                try:
                    self._swap_out_locked(seq)
                except AiosError:
                    log.warning("could not save parked sequence %s at shutdown", seq.request_id)
            for seq, written in self._to_swap:  # written out just above, if it could be
                written.set_result(seq.status is SequenceStatus.SNAPSHOTTED)
        self._fail(pending, Unavailable("the LLM core is shutting down; retry on another replica"))

    def _emit(self, seq: Sequence, event: Event) -> None:
        """`seq`'s event: held for the step's `deliver` during a decode step, else emitted now."""
        if self._outbox is None:
            seq.emit(event)
        else:
            self._outbox.append((seq.emit, event))

    def _step(self, active: list[Sequence]) -> None:
        """One decode step, its events handed over together at its end: a server's event loop then wakes once per
        step, and does its work while the next llama_decode runs without the GIL, rather than taking the GIL from
        the sampling of every token (measured at 64 agents: 1.9-2.1 s of a run's sampling against 1.0-1.2 s for
        the engine alone)."""
        self._outbox = []
        try:
            self._decode_step(active)
        finally:
            outbox, self._outbox = self._outbox, None
            if outbox:
                self.deliver(outbox)

    def _decode_step(self, active: list[Sequence]) -> None:
        started = time.perf_counter()
        batch = self.batch
        batch.n_tokens = 0
        outputs: list[tuple[Sequence, int]] = []
        unsampled: dict[Sequence, int] = {}  # greedy sequences whose replayed tokens rode along without logits
        seq_ids: list[int] = []  # each row's seq_id and whether its logits are computed, for _even_outputs
        wants: list[bool] = []

        def add(token: int, pos: int, slot: int, want_logits: bool, seq: Sequence | None = None) -> None:
            """A row of the batch; its logits are read after the step when it is `seq`'s."""
            i = batch.n_tokens
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = slot
            batch.logits[i] = want_logits
            batch.n_tokens = i + 1
            seq_ids.append(slot)
            wants.append(want_logits)
            if want_logits and seq is not None:
                outputs.append((seq, i))

        # llama.cpp splits a multi-stream batch into one ubatch (one pass over the weights) per run of
        # consecutive seq_ids in batch order, so the batch lists sequences by seq_id, a prefilling one's chunk in
        # its place among the decoding ones: a chunk listed after them splits their run in two, a pass more
        # (measured on a 2-core EPYC, 15 decoding and one joining at seq_id 2: 285 ms listed after, 261 in place).
        active = sorted(active, key=lambda s: s.slot)
        drafts = self._drafts(active)
        decoding = sum(1 for seq in active if seq.next_token is not None)  # sequences decoding this step
        stepping = decoding + sum(len(draft.tokens) for draft in drafts.values())  # their tokens, guesses included
        budget = self.config.n_batch - stepping
        if stepping:
            budget = min(budget, self.config.prefill_chunk)
        chunks = self._prefill_chunks(active, budget, decoding)
        bridge = self._bridge_row(active)  # (seq_id, position) of a row over the one gap among the decoding ones
        self.stats.bridged_steps += bridge is not None
        # (seq_id, position, logits) of each padding row, in seq_id order
        if chunks or drafts or decoding != len(active):  # logits rows evened out, if at all, by _even_outputs
            pads = [] if bridge is None else [(*bridge, False)]
        else:
            pads = self._padding_rows(active, decoding, bridge)
        self.stats.padded_steps += len(pads) > (bridge is not None)
        listed = 0  # pads listed so far (each goes before the first sequence above its seq_id)
        for seq in active:
            while listed < len(pads) and pads[listed][0] < seq.slot:
                add(0, pads[listed][1], pads[listed][0], pads[listed][2])  # any token: its logits are never read
                listed += 1
            if seq.next_token is not None:
                add(seq.next_token, seq.n_past, seq.slot, True, seq)
                seq.n_past += 1
                seq.next_token = None
                for m, token in enumerate(drafts[seq].tokens if seq in drafts else []):
                    add(token, seq.n_past + m, seq.slot, True)
            elif seq in chunks:
                take, ride = chunks[seq]
                for j in range(seq.n_past, seq.n_past + take):
                    add(seq.prompt[j], j, seq.slot, j == len(seq.prompt) - 1, seq)
                seq.n_past += take
                self.stats.prefill_tokens += take
                if ride:
                    # Tokens delivered before a fault ride along with the end of the prompt. A sampler that draws
                    # or a grammar needs each one's logits to step through it as before; greedy decoding does not
                    # (the LM head over the whole vocabulary is most of a token's cost). One decode step each (the
                    # default) keeps the KV exactly as the first run computed it.
                    # When all of them ride, the last one's logits give the first new token in this same step.
                    stepped = seq.config.temperature > 0 or seq.constraint is not None
                    all_ride = ride == len(seq.replay)
                    for n, token in enumerate(list(seq.replay)[:ride]):
                        add(token, seq.n_past + n, seq.slot, stepped or (all_ride and n == ride - 1), seq)
                    if not stepped:
                        unsampled[seq] = ride - all_ride  # accepted as delivered, after replay[0]
                    seq.n_past += ride
        if batch.n_tokens == 0:
            return
        for slot, pos, logits in pads[listed:]:  # after the decoding ones
            add(0, pos, slot, logits)
        logit_rows = self._even_outputs(seq_ids, wants)
        decode_started = time.perf_counter()
        self.stats.schedule_seconds += decode_started - started
        try:
            rc = llama.llama_decode(self.ctx, batch)
        finally:
            for slot, pos, _ in pads:
                self._remove_padding(slot, pos)
        decoded, copying = time.perf_counter(), self.stats.kv_copy_seconds
        self.stats.decode_seconds += decoded - decode_started
        if rc != 0:
            state = ", ".join(
                f"{s.request_id}@{s.slot}: n_past {s.n_past}, kv pos_max {llama.llama_memory_seq_pos_max(self.memory, s.slot)}"
                for s in active
            )
            log.error("llama_decode returned %d; batch of %d tokens; sequences: %s", rc, batch.n_tokens, state)
            raise RuntimeError(f"llama_decode returned {rc}")
        seconds = decoded - decode_started
        if chunks:
            count_step(self.stats.prompt_steps, decoding, seconds)
        elif decoding:  # decoding rows only (a padding row, guesses): what it cost, for padding and drafts
            if drafts:
                self.step_costs.observe(decoding, batch.n_tokens // decoding, seconds)
            else:
                self.step_costs.observe(logit_rows, 1, seconds)
                count_step(self.stats.plain_steps, decoding, seconds)
        self.stats.steps += 1
        self.stats.decode_rows += decoding
        for seq in active:
            seq.kv_ready = True
        picks = self._argmax_rows(outputs)
        for seq, index in outputs:
            # Ended by an earlier output of this step: a batched replay that was the whole generation, a stuck grammar.
            if seq.status in (SequenceStatus.FINISHED, SequenceStatus.FAILED):
                continue
            try:
                tokens = self._verify(seq, index, drafts.get(seq), picks)
            except AiosError as exc:  # this sequence's grammar is stuck: fail it alone
                self._fail([seq], exc)
                continue
            self._accept(seq, tokens[0])
            for token in tokens[1:]:  # kept guesses: each one's cell is in KV once the token before it is accepted
                if seq.status.ended:  # it finished (end of generation, a stop string) before the rest
                    break
                seq.n_past += 1
                self._accept(seq, token)
            for _ in range(unsampled.pop(seq, 0)):  # they are in KV now: accepted as delivered, nothing to sample
                self._accept(seq, seq.replay[0])
        self.stats.sample_seconds += time.perf_counter() - decoded - (self.stats.kv_copy_seconds - copying)

    def _padded_size(self, rows: int, most: int, explore: bool = True) -> int:
        """How many rows of logits (`rows` up to `most`) a pass over the weights that needs `rows` of them should
        compute, the extra ones on rows whose logits are never read: the number the steps measured here say costs
        least, by at least PADDING_GAIN below `rows` itself. llama.cpp's matrix products take some numbers of rows
        faster than fewer, and which ones depends on the CPU (on one 2-core EPYC an odd number cost more than one
        more: 15 rows 185 ms, 16 167; on another, multiples of 4 took a faster kernel: 13-15 rows 87-94 ms, 16 68).
        With `explore` (a step of decoding rows only, whose cost is measured), a size above `rows` not measured
        yet is chosen, the smallest first, so that each gets measured once."""
        plain = self.step_costs.of(rows, 1)
        if rows < 2 or plain is None:
            return rows
        best, best_cost = rows, plain * (1 - PADDING_GAIN)
        for size in range(rows + 1, most + 1):
            cost = self.step_costs.of(size, 1)
            if cost is None:
                if explore:
                    return size
            elif cost < best_cost:
                best, best_cost = size, cost
        return best

    def _padding_rows(self, active: list[Sequence], decoding: int, bridge: tuple[int, int] | None
                      ) -> list[tuple[int, int, bool]]:
        """The padding rows (seq_id, position, with logits), one token each, of a step of `decoding` sequences that
        all decode, on seq_ids 0.. with at most the one gap that `bridge` fills: the bridge row, then rows on the
        seq_ids right after (one run of seq_ids: no pass over the weights more), each after whatever rests there,
        as many as bring the step to the number of rows _padded_size picks. Every row has logits, so that a step's
        rows are what its measured cost is kept under. Their cells are removed after the step."""
        pads = [] if bridge is None else [(*bridge, True)]
        rows = decoding + len(pads)
        if not active or active[-1].slot + 1 != rows:
            return pads
        free: list[tuple[int, int, bool]] = []  # the seq_ids above the decoding ones that can take a row, in order
        for slot in range(rows, max(self.config.slots, rows + 1)):  # a step of `slots` rows, or one more
            pos = self._padding_position(slot)
            if pos is None:
                break
            free.append((slot, pos, True))
        return pads + free[:self._padded_size(rows, rows + len(free)) - rows]

    def _bridge_row(self, active: list[Sequence]) -> tuple[int, int] | None:
        """Where (seq_id, position) a padding row joins the decoding sequences into one run of seq_ids over the one
        seq_id among them that none holds, while that gap waits for a joining sequence (_compact_locked): the run
        stays one pass over the weights. None when there is not exactly one gap (or the row has no safe place
        there), or with speculation, whose steps give each sequence the same number of rows."""
        if self.config.draft_tokens or not active:
            return None
        held = {seq.slot for seq in active}
        top = max(held)
        if top != len(held):  # seq_ids 0..top hold all but one of them
            return None
        gap = next(slot for slot in range(top) if slot not in held)
        pos = self._padding_position(gap)
        return None if pos is None else (gap, pos)

    def _padding_position(self, slot: int) -> int | None:
        """The position a padding row can take in `slot`, after whatever rests there, if any."""
        if slot >= self.config.resident:
            return None
        pos = llama.llama_memory_seq_pos_max(self.memory, slot) + 1
        # Past the sliding window, the row's cell could take the place of a cell that what rests there still needs.
        if pos >= self.config.max_sequence_tokens or (self.n_swa and pos >= self.n_swa):
            return None
        return pos

    def _even_outputs(self, seq_ids: list[int], wants: list[bool]) -> int:
        """Gives each pass over the weights as many logits rows as the steps measured here say cost least
        (_padded_size), the extra ones on rows whose logits are not read (a prompt token, a padding row). A joining
        prompt's first token shares the pass of the decoding rows: with 15 of them, that pass measured 249 ms, 227
        with that token's logits too (2-core EPYC). `wants`: each row's logits flag. Returns the batch's logits rows."""
        if all(wants):  # decoding rows only: _padding_rows' business
            return len(wants)
        total, flipped = 0, False
        for rows in ubatches(seq_ids, self.config.n_batch):
            wanted = sum(1 for i in rows if wants[i])
            extra = self._padded_size(wanted, len(rows), explore=False) - wanted if wanted else 0
            for i in [i for i in rows if not wants[i]][:extra]:
                self.batch.logits[i] = True
            wanted, flipped = wanted + extra, flipped or extra > 0
            total += wanted
        self.stats.padded_steps += flipped
        return total

    def _remove_padding(self, slot: int, pos: int) -> None:
        """Takes the padding row's cell out of `slot` again, leaving what rests there as it was."""
        if not (llama.llama_memory_seq_rm(self.memory, slot, pos, -1)
                and llama.llama_memory_seq_pos_max(self.memory, slot) == pos - 1):
            log.error("llama.cpp did not take a padding row back out of seq_id %d", slot)
            with self._cond:
                self._drop_resting_locked(slot)

    def _prefill_chunks(self, active: list[Sequence], budget: int, decoding: int) -> dict[Sequence, tuple[int, int]]:
        """How many prompt tokens each prefilling sequence puts in this step, in seq_id order within `budget`, and
        how many of its replayed tokens ride along once its prompt is all in (see _step).

        While others decode (`decoding`), a prompt's last token, the one whose logits give its first token, waits for
        the next step: there it is one more row of the decoding sequences' pass over the weights, whose LM head runs
        anyway, where at the end of this step's chunk it would be the only row of logits of a pass of its own (the
        chunk past its first token is a pass of its own, see ubatches): the LM head over the 262k vocabulary for one
        row costs ~13 ms, most of a short chunk's pass (measured on a 2-core Xeon, 15 decoding: a joining 12-token
        prompt 115.6 ms a step with its last token, 102.2 without; an 11-token pass alone 34.9 ms with the last
        token's logits, 22.0 without). The joining sequence's first token comes a step later."""
        chunks: dict[Sequence, tuple[int, int]] = {}
        for seq in active:
            if budget <= 0:
                break
            if not seq.prefilling:
                continue
            take = min(budget, len(seq.prompt) - seq.n_past)
            if decoding and take > 1 and seq.n_past + take == len(seq.prompt) and not seq.replay:
                take -= 1
            budget -= take
            ride = 0
            if seq.replay and seq.n_past + take == len(seq.prompt) and budget > 0 and self._replays_in_batch(seq):
                ride = min(budget, len(seq.replay))
                budget -= ride
            chunks[seq] = (take, ride)
        return chunks

    def _drafts(self, active: list[Sequence]) -> dict[Sequence, Draft]:
        """Guesses to ride after each decoding sequence's next token this step, as many for each: llama.cpp gives
        every sequence of a multi-stream ubatch the same number of tokens (a longer draft alone would cost a pass
        over the weights of its own), so a sequence with fewer guesses of its own, or none, carries weaker ones
        (PromptLookup.fill) in rows the step pays for anyway. None while a prompt is prefilling (it fills the step)
        or when guesses would not pay (speculation.draft_length) against the step without them."""
        if not self.config.draft_tokens or any(s.prefilling or s.replay for s in active):
            return {}
        decoding = [s for s in active if s.next_token is not None]
        if not decoding:
            return {}
        limit = min(self.config.draft_tokens, min(self.config.draft_step_tokens, self.config.n_batch) // len(decoding) - 1,
                    *(self.config.max_sequence_tokens - seq.n_past - 2 for seq in decoding))  # every guess has a cell
        own = {seq: self._draft(seq, limit) for seq in decoding}
        rows = len(decoding)
        plain = self.step_costs.of(self._padded_size(rows, max(rows, self.config.slots), explore=False), 1)
        length = draft_length([(seq.draft_hit_rate, len(own[seq])) for seq in decoding], limit, self.step_costs, plain)
        if not length:
            for seq in decoding:  # no guesses this step: let refused ones try again in a while
                seq.draft_hit_rate += DRAFT_RATE_RECOVERY * (1.0 - seq.draft_hit_rate)
            return {}
        return {seq: Draft(self._lookup(seq).fill(own[seq], length), min(len(own[seq]), length)) for seq in decoding}

    def _draft(self, seq: Sequence, limit: int) -> list[int]:
        """Up to `limit` guesses at `seq`'s next tokens from its own context (its next token ends `generated`); `limit`
        keeps every guess within the stream's cells (_drafts)."""
        return self._lookup(seq).draft(min(limit, seq.config.max_tokens - len(seq.generated) - 1))  # the last from logits

    @staticmethod
    def _lookup(seq: Sequence) -> PromptLookup:
        """`seq`'s index of its context's n-grams, up to its next token (built when it first drafts)."""
        if seq.lookup is None:
            seq.lookup = PromptLookup()
            seq.lookup.extend(seq.prompt)
        seq.lookup.extend(seq.generated[len(seq.lookup.tokens) - len(seq.prompt):])
        return seq.lookup

    def _argmax_rows(self, outputs: list[tuple[Sequence, int]]) -> dict[int, int]:
        """Batch index -> the argmax of its logits, for every row of the step with logits, in one NumPy call over
        llama.cpp's output rows (one per such row, in batch order) when a sequence in `outputs` takes its tokens by
        argmax alone. One call instead of one per row: each call lets the server's threads take the GIL (reading a
        row's 262k logits releases it), and the engine thread then waits for it back (in a 64-agent `make bench` run
        the engine sampled a row in ~140 us, ~90 alone in a process)."""
        if not any(seq.sampler.argmax_only for seq, _ in outputs):
            return {}
        batch = self.batch
        indices = [i for i in range(batch.n_tokens) if batch.logits[i]]
        first = ctypes.cast(llama.llama_get_logits_ith(self.ctx, indices[0]), ctypes.c_void_p).value
        last = ctypes.cast(llama.llama_get_logits_ith(self.ctx, indices[-1]), ctypes.c_void_p).value
        row_bytes = self.model.n_vocab * ctypes.sizeof(ctypes.c_float)
        if last - first != (len(indices) - 1) * row_bytes:  # not one row each in batch order: drawn row by row
            return {}
        rows = self.model.logits_rows(self.ctx, indices[0], len(indices))
        return dict(zip(indices, rows.argmax(axis=1).tolist()))

    def _pick(self, seq: Sequence, index: int, picks: dict[int, int]) -> int:
        """`seq`'s next token from the logits of batch row `index`: the argmax taken already, or its sampler's draw."""
        if index in picks and seq.sampler.argmax_only:
            return picks[index]
        return seq.sampler.sample(self.model.logits_view(self.ctx, index))

    def _verify(self, seq: Sequence, index: int, draft: Draft | None, picks: dict[int, int]) -> list[int]:
        """The tokens this step yields for `seq`: sampled from the logits at `index`, then from each draft position
        whose guess the model produced too. Each token is drawn exactly as without speculation (the same sampler,
        RNG and grammar, in order), so a guess is kept exactly when the model picks it (with a one-token draft,
        this is speculative sampling's rejection rule) and the output is what decoding one token per step
        gives, up to batch numerics (the guesses' KV is computed several tokens per step). The rejected guesses' KV
        cells are removed; the kept ones join n_past as their tokens are accepted (`_step`)."""
        tokens = [self._pick(seq, index, picks)]
        guessed = draft.tokens if draft else []
        room = seq.config.max_tokens - len(seq.generated)  # fillers may guess past the last token it may generate
        while len(tokens) <= len(guessed) and len(tokens) < room and tokens[-1] == guessed[len(tokens) - 1]:
            tokens.append(self._pick(seq, index + len(tokens), picks))
        if draft:
            accepted = len(tokens) - 1
            if draft.own:  # its hit rate is its own guesses' (the fillers are counted as never kept)
                seq.draft_hit_rate += DRAFT_RATE_WEIGHT * (min(accepted, draft.own) / draft.own - seq.draft_hit_rate)
            self.stats.draft_tokens += len(guessed)
            self.stats.draft_tokens_accepted += accepted
            kept = seq.n_past + accepted  # cells: up to the next token's and the kept guesses'
            if accepted < len(guessed) and not (
                llama.llama_memory_seq_rm(self.memory, seq.slot, kept, -1)
                and llama.llama_memory_seq_pos_max(self.memory, seq.slot) == kept - 1
            ):  # a memory that cannot drop its last cells (a recurrent model): never decode on a wrong context
                raise FailedPrecondition(f"the LLM core could not take back refused guesses of {seq.request_id!r}; "
                                         "run this model without --draft-tokens")
        return tokens

    def _accept(self, seq: Sequence, token: int) -> None:
        if seq.status is SequenceStatus.PREFILLING:  # its first sampled token: the prompt is all in KV
            seq.status = SequenceStatus.DECODING
        replaying = bool(seq.replay)
        if replaying:  # recovering: the token delivered before the fault stands, whatever was sampled now
            delivered = seq.replay.popleft()
            if token != delivered:
                seq.replay_divergences += 1
                if seq.constraint is not None:  # it accepted the sampled token: rebuild it on the delivered ones
                    seq.constraint = self.model.constraint(seq.config.grammar)
                    seq.constraint.replay([*seq.generated, delivered])
                    seq.sampler.constraint = seq.constraint
                token = delivered
        elif self.model.is_end_of_generation(token) and not seq.config.ignore_eos:
            self._finish(seq, FinishReason.STOP)
            return
        seq.generated.append(token)
        text = seq.text.feed(self.model.piece(token))
        if replaying:
            self.stats.tokens_replayed += 1
        else:
            self.stats.tokens_generated += 1
            self._emit(seq, TokenEvent(text, token, len(seq.generated), seq.slot))
        seq.next_token = token
        if seq.replay:
            return  # the first run went on past this token
        if seq.text.stopped:
            self._finish(seq, seq.text_stop_reason())
        elif len(seq.generated) >= seq.config.max_tokens:
            self._finish(seq, FinishReason.LENGTH)
        elif seq.n_past + 1 >= self.config.max_sequence_tokens:
            self._finish(seq, FinishReason.CONTEXT)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self._emit(seq, FinishEvent(reason, seq.text.flush(), len(seq.prompt), len(seq.generated), seq.prefix_reused,
                                    seq.text.hidden_tokens, seq.replay_divergences))
        with self._cond:
            self._release_locked(seq, SequenceStatus.FINISHED, keep_as_prefix=True)

    def _fail(self, sequences: list[Sequence], error: AiosError) -> None:
        for seq in sequences:
            if not seq.status.ended:
                self._emit(seq, ErrorEvent(error))
            with self._cond:
                self._release_locked(seq, SequenceStatus.CANCELLED if seq.status is SequenceStatus.CANCELLED
                                     else SequenceStatus.FAILED)
