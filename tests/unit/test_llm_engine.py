"""The batch engine with the real model, in-process: context switching, lazy swapping, prefix reuse, cancellation.

Snapshots that the engine swaps out are captured in a list here; the Redis
store and resuming on another process are covered in tests/integration.
Token-identity is checked with the same batch shape on both sides (the
sequence decoding alone), as batched numerics differ from solo ones.
"""

from __future__ import annotations

import json
import os
import queue
import random
import time
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Iterator

import jsonschema
import llama_cpp as llama
import pytest

from services.errors import FailedPrecondition, PermissionDenied
from services.llm_core.engine import (
    BatchEngine,
    EngineConfig,
    ErrorEvent,
    Event,
    FinishEvent,
    FinishReason,
    PreemptedEvent,
    Sequence,
    TokenEvent,
    read_sequence_state,
    ubatches,
)
from services.llm_core import engine as engine_module
from services.llm_core.model import LlamaModel, default_model_path
from services.llm_core.sampling import SamplingConfig
from services.llm_core.snapshot import Snapshot
from tests.integration.waiting import wait_until

PROMPT = "Question: Name three rivers in Europe and say where each one flows.\nAnswer:"
GREEDY = SamplingConfig(max_tokens=40, ignore_eos=True)
SAMPLED = SamplingConfig(max_tokens=40, temperature=0.9, top_k=40, seed=1234, ignore_eos=True)
AGENT_SYSTEM = "System: You are a careful agent. Tools: calculator(expr), clock(tz), search(query). "  # agents share it
AGENT_PROMPT = AGENT_SYSTEM * 3 + "Go:"


@pytest.fixture(scope="module")
def model() -> Iterator[LlamaModel]:
    loaded = LlamaModel(default_model_path())
    yield loaded
    loaded.close()


class Harness:
    """An engine plus what it swapped out, and helpers to drive one sequence."""

    def __init__(self, model: LlamaModel, **config: int) -> None:
        self.model = model
        self.swapped: list[Snapshot] = []
        self.engine = BatchEngine(model, EngineConfig(**{"max_sequence_tokens": 512, **config}), swap_out=self.keep)
        self.engine.start()

    def keep(self, snapshot: Snapshot) -> Future:
        self.swapped.append(snapshot)
        written: Future = Future()
        written.set_result(None)
        return written

    def start(self, request_id: str, sampling: SamplingConfig, prompt: str = PROMPT, replay: list[int] = (),
              replay_in_batch: bool = False) -> tuple[Sequence, "queue.Queue[Event]"]:
        events: queue.Queue[Event] = queue.Queue()
        seq = Sequence(request_id, "agent-a", self.model.tokenize(prompt, True, True), sampling, events.put,
                       constraint=self.model.constraint(sampling.grammar))
        seq.replay.extend(replay)
        seq.replay_in_batch = replay_in_batch
        self.engine.submit(seq)
        return seq, events

    @staticmethod
    def tokens_until(events: "queue.Queue[Event]", stop_after: int | None = None) -> tuple[list[int], Event]:
        """Token ids until the sequence finishes, is preempted, or (stop_after) has produced that many."""
        tokens: list[int] = []
        while True:
            event = events.get(timeout=60)
            if isinstance(event, TokenEvent):
                tokens.append(event.token_id)
                if stop_after is not None and len(tokens) == stop_after:
                    return tokens, event
            else:
                return tokens, event

    def run_alone(self, request_id: str, sampling: SamplingConfig) -> list[int]:
        _, events = self.start(request_id, sampling)
        tokens, end = self.tokens_until(events)
        assert isinstance(end, FinishEvent)
        return tokens

    def close(self) -> None:
        self.engine.stop()


@pytest.fixture
def harness(model: LlamaModel) -> Iterator[Harness]:
    h = Harness(model, slots=2, resident=3)
    yield h
    h.close()


@pytest.fixture
def reference(model: LlamaModel) -> Iterator[Harness]:
    """A second engine with the same shape: the never-interrupted run."""
    h = Harness(model, slots=2, resident=3)
    yield h
    h.close()


def preempt_after(h: Harness, request_id: str, sampling: SamplingConfig, n: int, swap: bool) -> tuple[list[int], int, "queue.Queue[Event]"]:
    seq, events = h.start(request_id, sampling)
    first, last = h.tokens_until(events, stop_after=n)
    slot = last.slot
    assert h.engine.preempt(request_id, swap=swap)
    more, end = h.tokens_until(events)
    assert isinstance(end, PreemptedEvent), end
    return first + more, slot, events


PERSON = {"type": "object", "properties": {"name": {"type": "string", "minLength": 40, "maxLength": 80},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
CONSTRAINED = SamplingConfig.checked(40, 0.0, 0.0, 0, 5, [], json_schema=json.dumps(PERSON))
CONSTRAINED_SAMPLED = SamplingConfig.checked(40, 1.0, 0.0, 40, 77, [], json_schema=json.dumps(PERSON))


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED, CONSTRAINED, CONSTRAINED_SAMPLED],
                         ids=["greedy", "seeded-sampling", "json-schema", "json-schema-sampled"])
def test_a_swapped_out_generation_resumes_token_identical_in_another_slot(model, sampling):
    with two_slot_engines(model) as (harness, reference):
        check_swap_and_restore(harness, reference, sampling)


@contextmanager
def two_slot_engines(model: LlamaModel) -> Iterator[tuple[Harness, Harness]]:
    """Two slots, two resident seq_ids: the engine under test and the never-interrupted reference."""
    harness, reference = Harness(model, slots=2, resident=2), Harness(model, slots=2, resident=2)
    try:
        yield harness, reference
    finally:
        harness.close()
        reference.close()


def check_swap_and_restore(harness: Harness, reference: Harness, sampling: SamplingConfig) -> None:
    expected = reference.run_alone("ref", sampling)

    before, first_slot, _ = preempt_after(harness, "g1", sampling, 12, swap=False)
    assert first_slot == 0  # decoding sequences take the lowest seq_ids
    # x needs seq_id 0: the parked g1 moves up to seq_id 1 (a stream copy) ...
    _, x_events = harness.start("x", SamplingConfig(max_tokens=30, ignore_eos=True))
    harness.tokens_until(x_events, stop_after=2)
    # ... and y needs seq_id 1 while 0 decodes: with no spare seq_id left, g1 is written out from seq_id 1.
    _, y_events = harness.start("y", SamplingConfig(max_tokens=3))
    harness.tokens_until(y_events)
    [snapshot] = harness.swapped
    assert snapshot.request_id == "g1" and snapshot.n_past > 0 and snapshot.size > 0
    assert isinstance(harness.tokens_until(x_events)[1], FinishEvent)  # x done: g1 will decode alone, as before

    events: queue.Queue[Event] = queue.Queue()
    harness.engine.submit(harness.engine.restored(Snapshot.from_bytes(snapshot.to_bytes()), events.put))
    first = events.get(timeout=60)
    assert isinstance(first, TokenEvent) and first.slot == 0  # restored into another seq_id than it left from
    after, end = harness.tokens_until(events)
    assert isinstance(end, FinishEvent)
    assert before + [first.token_id] + after == expected
    assert harness.engine.stats.restores == 1


def test_resuming_a_parked_generation_costs_no_snapshot(harness, reference):
    expected = reference.run_alone("ref", GREEDY)
    before, slot, _ = preempt_after(harness, "g1", GREEDY, 10, swap=False)
    assert harness.engine.status()["slots_parked"] == 1

    events: queue.Queue[Event] = queue.Queue()
    assert harness.engine.resume("g1", "agent-a", events.put) is not None
    after, end = harness.tokens_until(events)
    assert isinstance(end, FinishEvent)
    assert before + after == expected
    assert harness.swapped == [] and harness.engine.stats.resumes_resident == 1


def test_a_parked_generation_is_swapped_out_only_when_its_slot_is_needed(model):
    h = Harness(model, slots=1, resident=1)
    try:
        before, _, _ = preempt_after(h, "parked", GREEDY, 8, swap=False)
        assert h.swapped == []  # lazy: still resident
        h.run_alone("newcomer", SamplingConfig(max_tokens=5))
        [snapshot] = h.swapped  # the newcomer needed the only seq_id
        assert snapshot.request_id == "parked" and len(snapshot.generated) == len(before)
        assert h.engine.resume("parked", "agent-a", lambda e: None) is None  # no longer resident
    finally:
        h.close()


def test_a_parked_generation_written_out_for_another_core_is_answered_only_once_written(model):
    h = Harness(model, slots=2, resident=3)
    landed: Future = Future()  # the write to Redis, held back by the test

    def slow_write(snapshot: Snapshot) -> Future:
        h.swapped.append(snapshot)
        return landed

    h.engine.swap_out = slow_write
    try:
        before, _, _ = preempt_after(h, "mover", GREEDY, 8, swap=False)
        first, second = h.engine.swap_out_parked("mover"), h.engine.swap_out_parked("mover")  # a drain and a resume
        wait_until(lambda: h.swapped, what="the snapshot taken on the engine thread")
        assert not first.done() and not second.done()  # nobody hears "written" before it is
        landed.set_result(True)
        assert first.result(timeout=10) is True and second.result(timeout=10) is True
        [snapshot] = h.swapped  # taken once
        assert snapshot.generated == before and h.engine.swap_out_parked("mover") is None  # nothing left here
    finally:
        h.close()


def test_cancel_frees_the_slot_within_one_decode_step(harness):
    seq, events = harness.start("c1", SamplingConfig(max_tokens=400, ignore_eos=True))
    harness.tokens_until(events, stop_after=3)
    harness.engine.cancel(seq)
    steps_at_cancel = harness.engine.stats.steps
    while harness.engine.status()["slots_busy"]:
        events.get(timeout=10)  # tokens decoded before the engine saw the cancel
    assert harness.engine.stats.steps - steps_at_cancel <= 1
    assert harness.run_alone("after", SamplingConfig(max_tokens=4)) is not None


def test_a_shared_prompt_prefix_is_reused_instead_of_prefilled(harness):
    system = AGENT_SYSTEM * 4
    _, events = harness.start("first", SamplingConfig(max_tokens=4), prompt=system + "Question: What is 2+2?\nAnswer:")
    harness.tokens_until(events)
    saved_before = harness.engine.stats.prefill_tokens_saved
    _, events = harness.start("second", SamplingConfig(max_tokens=4), prompt=system + "Question: What time is it?\nAnswer:")
    _, end = harness.tokens_until(events)
    assert isinstance(end, FinishEvent)
    shared = len(harness.model.tokenize(system, True, True))
    assert end.prefix_reused >= shared - 2  # the boundary token may tokenize differently
    assert harness.engine.stats.prefill_tokens_saved - saved_before == end.prefix_reused


def test_agents_starting_together_prefill_their_shared_prompt_once(model):
    h = Harness(model, slots=3, resident=4)
    try:
        n = len(model.tokenize(AGENT_PROMPT, True, True))
        with h.engine._cond:  # all three reach the same admission
            streams = [h.start(name, SamplingConfig(max_tokens=4), prompt=AGENT_PROMPT)[1] for name in "abc"]
        ends = [h.tokens_until(events)[1] for events in streams]
        assert all(isinstance(end, FinishEvent) for end in ends)
        # a prefilled the prompt; b and c waited one step for it, copied it and decoded only its last token.
        assert [end.prefix_reused for end in ends] == [0, n - 1, n - 1]
        assert h.engine.stats.prefill_tokens == n + 2
    finally:
        h.close()


class DecodeSpy:
    """A test double around llama_decode that records each batch's rows (seq_id, logits flag), then decodes for
    real: what the engine asked llama.cpp for, which its outputs do not show."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, bool]]] = []
        self.real = llama.llama_decode

    def __call__(self, ctx, batch):
        self.batches.append([(batch.seq_id[i][0], bool(batch.logits[i])) for i in range(batch.n_tokens)])
        return self.real(ctx, batch)


def leave_a_gap(h: Harness) -> tuple["queue.Queue[Event]", "queue.Queue[Event]"]:
    """Three generations start together on seq_ids 0-2; the one on 0 finishes after 4 tokens, keeping its KV as a
    prefix there: a gap below the other two (b on 1, c on 2), whose events are returned."""
    with h.engine._cond:
        _, short = h.start("short", SamplingConfig(max_tokens=4, ignore_eos=True), prompt=AGENT_PROMPT)
        _, b = h.start("b", GREEDY, prompt=AGENT_PROMPT)
        _, c = h.start("c", GREEDY, prompt=AGENT_PROMPT)
    assert isinstance(h.tokens_until(short)[1], FinishEvent)
    return b, c


def test_decoding_sequences_close_the_gap_a_finished_one_leaves(model):
    """llama.cpp makes a pass over the weights per run of consecutive seq_ids, so a gap costs a pass per step."""
    h = Harness(model, slots=3, resident=4)
    try:
        b, c = leave_a_gap(h)
        b_events, c_events = drain(b), drain(c)
        assert {e.slot for e in b_events} == {1}
        assert c_events[0].slot == 2 and c_events[-1].slot == 0  # c moved down into the gap ...
        assert [e.token_id for e in c_events] == [e.token_id for e in b_events]  # ... with its KV intact
        with h.engine._cond:  # ... and the finished sequence's prefix moved up to seq_id 2 with its KV
            tokens = h.engine.slots.cached[2].tokens
            assert llama.llama_memory_seq_pos_max(h.engine.memory, 2) == len(tokens) - 1
    finally:
        h.close()


def test_a_sequence_joining_below_decoding_ones_is_listed_in_seq_id_order(model, monkeypatch):
    """A joining sequence takes the lowest free seq_id, often below ones decoding. llama.cpp splits a batch into a
    pass over the weights per run of consecutive seq_ids in batch order, so its prompt chunk must sit in its place:
    listed after the decoding ones it would cost every decoding sequence a pass more."""
    spy = DecodeSpy()
    h = Harness(model, slots=3, resident=4)
    try:
        monkeypatch.setattr(llama, "llama_decode", spy)
        with h.engine._cond:
            _, short = h.start("short", SamplingConfig(max_tokens=4, ignore_eos=True), prompt=AGENT_PROMPT)
            _, b = h.start("b", GREEDY, prompt=AGENT_PROMPT)
            _, c = h.start("c", GREEDY, prompt=AGENT_PROMPT)
            # waits for a seq_id: it takes the one the short generation leaves, below b's and c's
            _, joining = h.start("joining", GREEDY, prompt=AGENT_PROMPT + " Also check the clock in Europe/Paris and report.")
        assert isinstance(h.tokens_until(short)[1], FinishEvent)
        joined = drain(joining)
        drain(b), drain(c)
        assert joined[0].slot == 0
        orders = [[seq_id for seq_id, _ in rows] for rows in spy.batches]
        mixed = [order for order in orders if len(set(order)) > 1 and len(order) > len(set(order))]
        assert mixed, "the joining sequence's prompt never shared a step with the decoding ones"
        assert all(order == sorted(order) for order in mixed), mixed
    finally:
        h.close()


def drain(events: "queue.Queue[Event]") -> list[TokenEvent]:
    """Every token event until the sequence finishes."""
    tokens: list[TokenEvent] = []
    while isinstance(event := events.get(timeout=60), TokenEvent):
        tokens.append(event)
    assert isinstance(event, FinishEvent), event
    return tokens


def test_another_agents_generation_cannot_be_resumed_or_discarded(harness):
    preempt_after(harness, "mine", GREEDY, 4, swap=False)
    with pytest.raises(PermissionDenied):
        harness.engine.resume("mine", "agent-b", lambda e: None)
    with pytest.raises(PermissionDenied):
        harness.engine.discard("mine", "agent-b")
    assert harness.engine.discard("mine", "agent-a")
    harness.run_alone("next", SamplingConfig(max_tokens=2))  # housekeeping ran: the slot is free again
    assert harness.engine.status()["slots_parked"] == 0


def test_a_snapshot_from_a_differently_shaped_core_is_refused(harness, model):
    preempt_after(harness, "g", GREEDY, 4, swap=True)
    other = Harness(model, slots=1, resident=1)
    try:
        with pytest.raises(FailedPrecondition, match="same model and --resident"):
            other.engine.restored(harness.swapped[0], lambda e: None)
    finally:
        other.close()


def test_a_snapshot_llama_cpp_rejects_fails_the_resume_and_frees_the_slot(harness):
    preempt_after(harness, "g", GREEDY, 4, swap=True)
    broken = harness.swapped[0]
    broken.kv = bytes(16)
    events: queue.Queue[Event] = queue.Queue()
    harness.engine.submit(harness.engine.restored(broken, events.put))
    assert isinstance(events.get(timeout=30), ErrorEvent)
    harness.run_alone("next", SamplingConfig(max_tokens=2))
    assert harness.engine.status()["slots_busy"] == 0


def test_a_long_prompt_is_prefilled_in_chunks_while_others_keep_streaming(model):
    h = Harness(model, slots=2, resident=2, max_sequence_tokens=2048, prefill_chunk=128)
    try:
        _, streaming = h.start("stream", SamplingConfig(max_tokens=300, ignore_eos=True))
        streaming.get(timeout=30)  # it is decoding
        long_prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 200)
        _, long_events = h.start("long", SamplingConfig(max_tokens=1), prompt=long_prompt)
        assert isinstance(long_events.get(timeout=120), (TokenEvent, FinishEvent))
        prompt_tokens = len(model.tokenize(long_prompt, True, True))
        assert prompt_tokens > 1500
        # The streaming sequence got a token with every 128-token prefill chunk of the long prompt.
        assert streaming.qsize() >= prompt_tokens // 128 - 1
    finally:
        h.close()


def test_resumed_sequences_waiting_together_keep_their_kv(model):
    """Two parked sequences resumed at once: placing the first must not take the second's seq_id."""
    h = Harness(model, slots=3, resident=4)
    try:
        _, a_events = h.start("a", SamplingConfig(max_tokens=200, ignore_eos=True))
        h.tokens_until(a_events, stop_after=1)  # a decodes on seq_id 0
        b1_tokens, b1_slot, _ = preempt_after(h, "b1", GREEDY, 3, swap=False)
        _, x_events = h.start("x", SamplingConfig(max_tokens=40, ignore_eos=True))
        h.tokens_until(x_events, stop_after=1)
        b2_tokens, b2_slot, _ = preempt_after(h, "b2", GREEDY, 3, swap=False)
        assert b1_slot != b2_slot
        assert isinstance(h.tokens_until(x_events)[1], FinishEvent)  # x rests on seq_id 2 as a cached prefix
        resumed: dict[str, queue.Queue[Event]] = {"b1": queue.Queue(), "b2": queue.Queue()}
        with h.engine._cond:  # both wait at the same admission
            h.engine.resume("b1", "agent-a", resumed["b1"].put)
            h.engine.resume("b2", "agent-a", resumed["b2"].put)
        for name, before in (("b1", b1_tokens), ("b2", b2_tokens)):
            rest, end = h.tokens_until(resumed[name])
            assert isinstance(end, FinishEvent), end
            assert len(before) + len(rest) == GREEDY.max_tokens
        assert h.swapped == []  # everything stayed resident
    finally:
        h.close()


def test_random_preemption_resume_and_cancellation_keep_every_seq_id_accounted_for(model):
    """A stress of the engine's bookkeeping: 3 decoding of 4 seq_ids, prompts sharing prefixes (so cached
    prefixes are copy sources while seq_ids are short), parks, swaps, resumes (resident and from snapshots)
    and cancels at random, checked before every decode step."""
    rng = random.Random(5)
    h = Harness(model, slots=3, resident=4, max_sequence_tokens=512)
    step = h.engine._step

    def checked_step(active):
        with h.engine._cond:
            h.engine.check_invariants_locked()
        step(active)

    h.engine._step = checked_step
    system = AGENT_SYSTEM * 2
    streams: dict[str, queue.Queue[Event]] = {}
    done: set[str] = set()
    try:
        for i in range(16):
            name = f"s{i}"
            _, streams[name] = h.start(name, SamplingConfig(max_tokens=rng.randint(4, 24), ignore_eos=True),
                                       prompt=system + f"Question {i % 3}: what is {i % 3} + {i // 3}?\nAnswer:")
            for _ in range(rng.randint(0, 3)):
                action = rng.choice(["park", "swap", "resume", "restore", "cancel", "wait"])
                with h.engine._cond:
                    active = [s for s in h.engine._active if not s.preempt and not s.status.ended]
                    parked = list(h.engine._parked)
                if action in ("park", "swap") and active:
                    h.engine.preempt(rng.choice(active).request_id, swap=action == "swap")
                elif action == "resume" and parked:
                    target, resumed = rng.choice(parked), queue.Queue()
                    if h.engine.resume(target, "agent-a", resumed.put) is not None:
                        streams[target] = resumed
                elif action == "restore" and h.swapped:
                    snapshot = h.swapped.pop(0)
                    streams[snapshot.request_id] = queue.Queue()
                    h.engine.submit(h.engine.restored(snapshot, streams[snapshot.request_id].put))
                elif action == "cancel" and active:
                    victim = rng.choice(active)
                    h.engine.cancel(victim)
                    done.add(victim.request_id)
                else:
                    h.tokens_until(streams[name], stop_after=1)
        # Bring everything back and let it finish.
        while True:
            with h.engine._cond:
                parked = list(h.engine._parked)
            for name in parked:
                resumed = queue.Queue()
                if h.engine.resume(name, "agent-a", resumed.put) is not None:
                    streams[name] = resumed
            while h.swapped:
                snapshot = h.swapped.pop(0)
                streams[snapshot.request_id] = queue.Queue()
                h.engine.submit(h.engine.restored(snapshot, streams[snapshot.request_id].put))
            for name, events in list(streams.items()):
                if name in done:
                    continue
                _, end = h.tokens_until(events)
                assert not isinstance(end, ErrorEvent), (name, end)
                if isinstance(end, FinishEvent):
                    done.add(name)
            if len(done) == len(streams) and not h.engine._parked and not h.swapped:
                break
        with h.engine._cond:
            h.engine.check_invariants_locked()
            assert not h.engine._active and not h.engine._parked
    finally:
        h.close()


def prefixes_cached_on_0_and_1(h: Harness, a_prompt: str, b_prompt: str) -> float:
    """a and b start together; b finishes first (its prefix cached on seq_id 1), then a (on seq_id 0, where the next
    sequence goes). Returns the engine's KV copy time so far."""
    with h.engine._cond:
        _, a_events = h.start("a", SamplingConfig(max_tokens=8, ignore_eos=True), prompt=a_prompt)
        _, b_events = h.start("b", SamplingConfig(max_tokens=2, ignore_eos=True), prompt=b_prompt)
    h.tokens_until(b_events)
    h.tokens_until(a_events)
    with h.engine._cond:
        assert sorted(h.engine.slots.cached) == [0, 1]
        return h.engine.stats.kv_copy_seconds


def test_of_equal_prefixes_the_one_resting_where_the_sequence_goes_is_adopted_without_a_copy(model):
    """Agents sharing a system prompt share it with every cached prefix: the tie goes to the cached prefix on the
    seq_id the new sequence takes, adopted where it rests, rather than copying another one there (and moving the
    resting one away first)."""
    h = Harness(model, slots=2, resident=3)
    try:
        system = AGENT_SYSTEM * 3
        copying = prefixes_cached_on_0_and_1(h, system + "Task: rivers.", system + "Task: hills.")
        _, c_events = h.start("c", SamplingConfig(max_tokens=4), prompt=system + "Task: lakes.")
        _, end = h.tokens_until(c_events)
        assert isinstance(end, FinishEvent) and end.prefix_reused >= len(model.tokenize(system, True, True)) - 2
        assert h.engine.stats.kv_copy_seconds == copying  # no KV state was read or written
    finally:
        h.close()


@pytest.mark.parametrize("c_task, copied", [("hills and lakes.", False),
                                             ("hills and lakes of the far northern mountain valleys, then.", True)],
                         ids=["a-few-tokens-longer-elsewhere", "many-tokens-longer-elsewhere"])
def test_a_prefix_resting_where_the_sequence_goes_is_adopted_unless_another_is_much_longer(model, c_task, copied):
    """c shares a few tokens more with b's prefix (seq_id 1) than with a's, resting where c goes (seq_id 0): a's is
    adopted in place (no copy; the few tokens more are prefilled). Sharing many more with b's, c copies b's."""
    h = Harness(model, slots=2, resident=3)
    try:
        system = AGENT_SYSTEM * 3
        b_prompt = system + "Task: hills and lakes of the far northern mountain valleys, now."
        copying = prefixes_cached_on_0_and_1(h, system + "Task: rivers.", b_prompt)
        c_prompt = system + "Task: " + c_task
        shared_with_b = len(os.path.commonprefix([model.tokenize(c_prompt, True, True), model.tokenize(b_prompt, True, True)]))
        _, c_events = h.start("c", SamplingConfig(max_tokens=4), prompt=c_prompt)
        _, end = h.tokens_until(c_events)
        assert isinstance(end, FinishEvent)
        assert (h.engine.stats.kv_copy_seconds != copying) is copied
        assert (end.prefix_reused == shared_with_b) is copied
    finally:
        h.close()


def test_a_cached_prefix_about_to_be_copied_is_not_dropped_to_make_room(model):
    """seq_ids: c decodes on 0, b's and a's finished sequences rest on 1 and 2, nothing is free. d shares a's
    prompt: it takes seq_id 1, whose resident (b) must make room without a's prefix (on 2) being the one dropped."""
    h = Harness(model, slots=2, resident=3)
    try:
        system = AGENT_SYSTEM * 2
        a_prompt, other = system + "Question: what is 2 + 2?\nAnswer:", "Write a long story about a dragon. " * 6
        _, a_events = h.start("a", SamplingConfig(max_tokens=2), prompt=a_prompt)
        h.tokens_until(a_events)
        _, b_events = h.start("b", SamplingConfig(max_tokens=2), prompt=other)
        h.tokens_until(b_events)
        _, c_events = h.start("c", SamplingConfig(max_tokens=200, ignore_eos=True), prompt="Count: 1, 2, 3,")
        h.tokens_until(c_events, stop_after=1)
        with h.engine._cond:
            assert not h.engine.slots.free and len(h.engine.slots.cached) == 2
        _, d_events = h.start("d", SamplingConfig(max_tokens=4), prompt=a_prompt)
        _, end = h.tokens_until(d_events)
        assert isinstance(end, FinishEvent), end
        assert end.prefix_reused >= len(model.tokenize(system, True, True)) - 2
    finally:
        h.close()


def text_of(events: "queue.Queue[Event]") -> tuple[str, Event]:
    pieces: list[str] = []
    while True:
        event = events.get(timeout=120)
        if isinstance(event, TokenEvent):
            pieces.append(event.text)
        else:
            if isinstance(event, FinishEvent):
                pieces.append(event.text)
            return "".join(pieces), event


@pytest.mark.parametrize("temperature", [0.0, 1.3])
def test_constrained_and_free_sequences_share_one_batch_and_the_constrained_output_validates(model, temperature):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                               "rainy": {"type": "boolean"},
                                               "days": {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
                                               "unit": {"enum": ["celsius", "fahrenheit"]}},
              "required": ["city", "rainy", "days", "unit"], "additionalProperties": False}
    constrained = SamplingConfig.checked(200, temperature, 0.0, 0, 21, [], json_schema=json.dumps(schema))
    h = Harness(model, slots=2, resident=3)
    try:
        _, free_events = h.start("free", SamplingConfig(max_tokens=60, ignore_eos=True))
        _, json_events = h.start("json", constrained)
        text, end = text_of(json_events)
        free_text, free_end = text_of(free_events)
        assert isinstance(end, FinishEvent) and end.reason.name == "STOP", (end, text)  # the grammar completed
        jsonschema.validate(json.loads(text), schema)
        assert isinstance(free_end, FinishEvent) and free_end.completion_tokens == 60
        # One llama_decode served both: fewer steps than their tokens together.
        assert h.engine.stats.steps < end.completion_tokens + free_end.completion_tokens
    finally:
        h.close()


def test_a_json_string_may_not_hold_a_raw_control_character(model):
    """llama-cpp-python's converter allowed a raw newline inside strings (invalid JSON); the core's grammar does not."""
    constraint = model.constraint(SamplingConfig.checked(
        50, 0.0, 0.0, 0, 1, [], json_schema=json.dumps({"type": "object", "properties": {"a": {"type": "string"}}})).grammar)
    for token in model.tokenize('{"a": "line', False, False):
        assert constraint.allows(token)
        constraint.accept(token)
    assert not constraint.allows(model.tokenize("\n", False, False)[0])
    assert constraint.allows(model.tokenize('\\n', False, False)[0])  # the escaped form is JSON


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED, CONSTRAINED_SAMPLED],
                         ids=["greedy", "seeded-sampling", "json-schema-sampled"])
def test_a_generation_whose_core_died_is_rebuilt_by_replay_and_continues_token_identical(harness, reference, sampling):
    """A new engine gets the prompt and the 15 tokens the dead one delivered: it feeds them back one decode step
    at a time without streaming them again, and the stream goes on exactly as the fault-free run (alone)."""
    expected = reference.run_alone("ref", sampling)
    seq, events = harness.start("recovered", sampling)
    seq.replay.extend(expected[:15])
    first = events.get(timeout=60)
    assert isinstance(first, TokenEvent) and first.completion_tokens == 16  # delivery continues by token index
    rest, end = harness.tokens_until(events)
    assert [first.token_id] + rest == expected[15:]
    assert isinstance(end, FinishEvent) and end.completion_tokens == len(expected) and end.replay_divergences == 0
    assert harness.engine.stats.tokens_replayed == 15


@pytest.mark.parametrize("replay", ["exact", "batched"])
def test_a_replay_that_covers_the_whole_generation_just_finishes(model, reference, replay):
    """Batched, the last delivered token's logits are computed for a next token that must not come."""
    expected = reference.run_alone("ref", GREEDY)
    h = Harness(model, slots=2, resident=3, replay=replay)
    try:
        seq, events = h.start("all-delivered", GREEDY)
        seq.replay.extend(expected)  # the core died after the last token, before its finish reached the kernel
        tokens, end = h.tokens_until(events)
        assert tokens == [] and isinstance(end, FinishEvent) and end.reason.value == "length"
        assert end.completion_tokens == len(expected)
        assert events.empty()
    finally:
        h.close()


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED, CONSTRAINED_SAMPLED],
                         ids=["greedy", "seeded-sampling", "json-schema-sampled"])
def test_a_batched_replay_rebuilds_in_one_prefill_and_says_where_its_numerics_disagreed(model, reference, sampling):
    """The fast way (EngineConfig.replay "batched"): the delivered tokens ride along with the prompt's prefill,
    each with its logits, so the sampler draws as often as the first run did and the stream goes on from the next
    index in far fewer steps. Its KV comes from a batched prefill, not single-token steps, so its choices may
    disagree with the delivered tokens (counted in replay_divergences; the delivered ones stand): why "auto" (the
    default) uses it only for generations the kernel says were not decoding alone."""
    expected = reference.run_alone("ref", sampling)
    fast = Harness(model, slots=2, resident=3, replay="batched")
    try:
        seq, events = fast.start("recovered", sampling)
        seq.replay.extend(expected[:15])
        first = events.get(timeout=60)
        assert isinstance(first, TokenEvent) and first.completion_tokens == 16  # delivery continues by index
        rest, end = fast.tokens_until(events)
        # Past the delivered tokens the generation goes on from batched KV: where that changed a choice (it may, by
        # CPU), it can end elsewhere than the first run did; a schema-constrained one then stops where its JSON closes.
        assert isinstance(end, FinishEvent) and end.completion_tokens == 15 + 1 + len(rest)
        if end.replay_divergences == 0 and sampling is GREEDY:
            assert end.completion_tokens == len(expected)
        # One step for the prompt, the 15 delivered tokens and the first new one; then one per token.
        # (A generation that ends on its end-of-generation token takes a step for it, which yields no token.)
        steps = end.completion_tokens - 15 + (end.reason is FinishReason.STOP)
        assert fast.engine.stats.tokens_replayed == 15 and fast.engine.stats.steps == steps
        assert 0 <= end.replay_divergences <= 15
    finally:
        fast.close()


def test_auto_replay_batches_only_the_generations_the_kernel_says_were_in_a_crowd(model, reference):
    """The default: replay_in_batch (set by the kernel when the generation was not decoding alone) takes the fast
    way; without it the replay is exact, one decode step per delivered token."""
    expected = reference.run_alone("ref", GREEDY)
    for in_batch in (True, False):
        harness = Harness(model, slots=2, resident=3)
        try:
            seq, events = harness.start("recovered", GREEDY, replay=expected[:15], replay_in_batch=in_batch)
            rest, end = harness.tokens_until(events)
            assert isinstance(end, FinishEvent) and end.completion_tokens == len(expected)
            steps = harness.engine.stats.steps
            assert steps == len(expected) - 15 if in_batch else steps >= len(expected)
        finally:
            harness.close()


def test_the_engine_accounts_for_its_time_and_how_full_its_batches_ran(model):
    """The profile `make bench` prints (EngineStats): the five times do not overlap, so they add up to no more than
    the engine thread's life, and decode_rows counts one row per decoding sequence per step."""
    started = time.perf_counter()
    harness = Harness(model, slots=2, resident=3)
    try:
        runs = [harness.start(f"profiled-{i}", SamplingConfig(max_tokens=12, ignore_eos=True)) for i in range(2)]
        for _, events in runs:
            assert isinstance(harness.tokens_until(events)[1], FinishEvent)
        status = harness.engine.status()
    finally:
        harness.close()
    times = [status[name] for name in ("decode_seconds", "sample_seconds", "schedule_seconds", "kv_copy_seconds",
                                       "idle_seconds")]
    assert all(t >= 0 for t in times) and status["decode_seconds"] > 0 and status["sample_seconds"] > 0
    assert sum(times) <= time.perf_counter() - started
    assert 2 * 11 <= status["decode_rows"] <= 2 * 12  # each sequence decodes max_tokens - 1 steps after prefill
    assert status["decode_rows"] <= 2 * status["steps"]
    # every step either carried prompt tokens or was a plain one, tallied by sequences decoding; together their
    # llama_decode time is decode_seconds (no guesses here)
    prompt, plain = status["prompt_steps"], status["plain_steps"]
    assert prompt and all(0 <= sequences <= 1 for sequences, _, _ in prompt)  # the other one's prompt beside it
    assert plain and all(1 <= sequences <= 2 for sequences, _, _ in plain)
    assert sum(steps for _, steps, _ in prompt + plain) == status["steps"]
    assert sum(sequences * steps for sequences, steps, _ in prompt + plain) == status["decode_rows"]
    assert sum(seconds for _, _, seconds in prompt + plain) == pytest.approx(status["decode_seconds"])


def test_a_decode_steps_events_are_handed_over_together_once_the_step_is_done(model):
    """BatchEngine.deliver gets each step's events in one call (a server wakes its event loop once per step, not
    once per token): both sequences' tokens of a step together, each sequence's in order, its finish last."""
    harness = Harness(model, slots=2, resident=3)
    handed: list[list[tuple[object, Event]]] = []

    def deliver(events: list) -> None:
        handed.append(list(events))
        for emit, event in events:
            emit(event)

    harness.engine.deliver = deliver
    try:
        runs = [harness.start(f"delivered-{i}", SamplingConfig(max_tokens=6, ignore_eos=True)) for i in range(2)]
        for _, events in runs:
            assert isinstance(harness.tokens_until(events)[1], FinishEvent)
        steps = harness.engine.status()["steps"]
    finally:
        harness.close()
    assert 0 < len(handed) <= steps
    assert any(len({emit for emit, _ in batch}) == 2 for batch in handed)  # one step, both sequences' tokens
    assert all(sum(isinstance(e, TokenEvent) for _, e in batch) <= 2 for batch in handed)  # a token each per step
    for seq, events in runs:
        got = [event for batch in handed for emit, event in batch if emit == seq.emit]
        assert [e.completion_tokens for e in got[:-1]] == list(range(1, 7)) and isinstance(got[-1], FinishEvent)


def test_a_padding_row_goes_where_it_measured_cheaper_and_leaves_what_rests_there_untouched(model):
    """Three sequences decode on seq_ids 0-2 while a finished one's prefix rests on 3. When the learnt step costs
    say 4 rows cost less than 3, each step gets a padding row on seq_id 3 after the prefix's cells; when they say
    the opposite, none. Either way the resting prefix's KV comes out byte for byte the same."""
    resting: dict[bool, tuple[bytes, int]] = {}
    for pays in (True, False):
        h = Harness(model, slots=3, resident=4)
        try:
            h.engine.step_costs.observe(3, 1, 1.0 if pays else 0.001)
            h.engine.step_costs.observe(4, 1, 0.001 if pays else 1.0)
            _, events = h.start("rest", SamplingConfig(max_tokens=4, ignore_eos=True), prompt=PROMPT * 3)
            h.tokens_until(events)  # cached on seq_id 0 (long enough to keep), moved up to 3 by the next admission
            with h.engine._cond:  # admitted together: they decode together, every step
                runs = [h.start(f"pad-{i}", SamplingConfig(max_tokens=8, ignore_eos=True), prompt=f"{i} apples and")
                        for i in range(3)]
            for _, events in runs:
                assert h.tokens_until(events)[1].completion_tokens == 8
            with h.engine._cond:
                assert (h.engine.stats.padded_steps >= 7) is pays and (h.engine.stats.padded_steps == 0) is not pays
                [slot] = h.engine.slots.cached  # "rest" (the three are too short to keep)
                assert slot == 3
                resting[pays] = (bytes(read_sequence_state(h.engine.ctx, slot)),
                                 llama.llama_memory_seq_pos_max(h.engine.memory, slot))
        finally:
            h.close()
    assert resting[True] == resting[False]


@pytest.mark.parametrize("cheapest", [4, 2], ids=["four-rows-measured-cheapest", "two-rows-measured-cheapest"])
def test_a_step_is_padded_to_the_row_count_measured_cheapest_and_its_outputs_stay_the_same(model, monkeypatch, cheapest):
    """Where the learnt step costs say 4 rows of logits cost least (llama.cpp's matrix products take some row counts
    faster than fewer: multiples of 4 on one EPYC), two decoding sequences get two padding rows, on seq_ids 2 and 3,
    every decode step; where they say 2 rows do, none. The tokens are the same either way, and the padding rows'
    cells are gone after each step."""
    spy = DecodeSpy()
    monkeypatch.setattr(llama, "llama_decode", spy)
    h = Harness(model, slots=4, resident=5)
    try:
        for rows in (2, 3, 4):
            h.engine.step_costs.observe(rows, 1, 0.001 if rows == cheapest else 1.0)
        with h.engine._cond:  # admitted together: they decode together, every step
            runs = [h.start(f"pad-{i}", SamplingConfig(max_tokens=10, ignore_eos=True), prompt=f"{i} rivers and")
                    for i in range(2)]
        tokens = [[e.token_id for e in drain(events)] for _, events in runs]
        with h.engine._cond:
            left = [llama.llama_memory_seq_pos_max(h.engine.memory, slot) for slot in (2, 3)]
    finally:
        h.close()
    decode_steps = [rows for rows in spy.batches if all(logits for _, logits in rows) and rows[0][0] == 0
                    and len({s for s, _ in rows}) == len(rows)]  # one token a seq_id, all with logits
    padded = [rows for rows in decode_steps if [s for s, _ in rows] == [0, 1, 2, 3]]
    assert len(padded) >= 8 if cheapest == 4 else padded == []
    assert left == [-1, -1]  # nothing rests there: each padding row's cell was removed after its step
    unpadded = Harness(model, slots=4, resident=5)
    try:
        for rows in (2, 3, 4):  # every size measured, 2 cheapest: no padding, none tried
            unpadded.engine.step_costs.observe(rows, 1, 0.001 if rows == 2 else 1.0)
        with unpadded.engine._cond:
            alone = [unpadded.start(f"alone-{i}", SamplingConfig(max_tokens=10, ignore_eos=True),
                                    prompt=f"{i} rivers and") for i in range(2)]
        assert tokens == [[e.token_id for e in drain(events)] for _, events in alone]
    finally:
        unpadded.close()


def test_ubatches_follow_llama_cpps_equal_split_of_runs_of_seq_ids():
    """What _even_outputs counts on: llama.cpp's split_equal (its split for separate KV streams) makes a pass over
    the weights of each run of consecutive seq_ids, as many rows of each as the one with fewest left has."""
    # 3 decoding one token each and a joining prompt of 4 tokens on seq_id 3: the first pass takes a token of each.
    assert ubatches([0, 1, 2, 3, 3, 3, 3], 512) == [[0, 1, 2, 3], [4, 5, 6]]
    # a gap (no seq_id 2) splits the run: a pass more
    assert ubatches([0, 1, 3, 4, 4], 512) == [[0, 1], [2, 3], [4]]
    # equal prompts prefilled together share their passes; within n_ubatch rows
    assert ubatches([5] * 3 + [6] * 3, 512) == [[0, 1, 2, 3, 4, 5]]
    assert ubatches([0] * 4 + [1] * 4, 4) == [[0, 1, 4, 5], [2, 3, 6, 7]]


def test_a_seq_id_left_among_decoding_ones_is_bridged_until_a_joining_sequence_takes_it_in_place(model, monkeypatch):
    """A generation finishing below others leaves a gap; the kernel sends the next one a step later. Meanwhile a
    padding row keeps the decoding ones one run of seq_ids (one pass over the weights) without moving them, and the
    joining one takes the gap, adopting the finished one's prefix where it rests: no KV copied at all."""
    monkeypatch.setattr(engine_module, "GAP_WAIT_STEPS", 10_000)  # the gap waits for the joining one, however late
    spy = DecodeSpy()
    monkeypatch.setattr(llama, "llama_decode", spy)
    h = Harness(model, slots=3, resident=4)
    try:
        b, c = leave_a_gap(h)
        gap_opened = len(spy.batches)
        copied_before = h.engine.stats.kv_copy_seconds
        wait_until(lambda: len(spy.batches) >= gap_opened + 3, what="three steps decoded since the gap opened")
        bridged = spy.batches[gap_opened:gap_opened + 3]
        _, joining = h.start("joining", GREEDY, prompt=AGENT_PROMPT + " Also check the clock in Europe/Paris and report.")
        joined, b_events, c_events = drain(joining), drain(b), drain(c)
        assert joined[0].slot == 0 and {e.slot for e in b_events} == {1} and {e.slot for e in c_events} == {2}
        assert h.engine.stats.kv_copy_seconds == copied_before  # nothing moved, nothing copied
        # while the gap waited: a padding row on seq_id 0 (and one on 3 where 4 rows measured cheaper), with logits
        # like every row of a decode step
        assert len(bridged) >= 3 and all([s for s, _ in rows][:3] == [0, 1, 2] and all(logits for _, logits in rows)
                                          for rows in bridged)
        assert all(sorted(set(s for s, _ in rows)) == list(range(len(set(s for s, _ in rows))))
                   for rows in spy.batches)  # every step one run of seq_ids from 0
        assert [e.token_id for e in b_events] == [e.token_id for e in c_events]
    finally:
        h.close()


def three_decode_then_one_joins(h: Harness, model: LlamaModel, after: int) -> Sequence:
    """Sequences a, b and c (12 tokens each) start together; once a has `after` tokens, a fourth (8 tokens, a longer
    prompt) joins them. Waits for all four to finish; returns a."""
    joiner: list = []
    events: queue.Queue[Event] = queue.Queue()

    def emit_and_join(event: Event) -> None:
        events.put(event)
        if isinstance(event, TokenEvent) and event.completion_tokens == after and not joiner:
            joiner.append(h.start("joining", SamplingConfig(max_tokens=8, ignore_eos=True),
                                  prompt=PROMPT + " Then list three mountains in Asia and their heights."))

    with h.engine._cond:
        first = Sequence("a", "agent-a", model.tokenize(PROMPT, True, True), SamplingConfig(max_tokens=12,
                         ignore_eos=True), emit_and_join)
        h.engine.submit(first)
        others = [h.start(name, SamplingConfig(max_tokens=12, ignore_eos=True)) for name in ("b", "c")]
    assert h.tokens_until(events)[1].completion_tokens == 12
    for _, other in others:
        assert h.tokens_until(other)[1].completion_tokens == 12
    assert h.tokens_until(joiner[0][1])[1].completion_tokens == 8
    return first


@pytest.mark.parametrize("pays", [True, False], ids=["even-measured-cheaper", "odd-measured-cheaper"])
def test_a_joining_prompts_first_token_evens_out_the_logits_of_the_pass_it_shares(model, monkeypatch, pays):
    """Three sequences decode while a fourth joins: llama.cpp's first pass takes one row of each, so it computes three
    rows of logits. Where the learnt step costs say four rows of logits cost less than three, the joining prompt's
    first token gets logits too (never read); where they say the opposite, it does not. Outputs are whole either way."""
    spy = DecodeSpy()
    h = Harness(model, slots=4, resident=5)
    try:
        h.engine.step_costs.observe(3, 1, 1.0 if pays else 0.001)
        h.engine.step_costs.observe(4, 1, 0.001 if pays else 1.0)
        monkeypatch.setattr(llama, "llama_decode", spy)
        three_decode_then_one_joins(h, model, after=1)
        mixed = [rows for rows in spy.batches if len(rows) > len(set(s for s, _ in rows)) and len(set(s for s, _ in rows)) == 4]
        assert mixed, "the joining prompt never shared a step with three decoding sequences"
        for rows in mixed:
            first_pass = ubatches([s for s, _ in rows], 512)[0]
            assert sum(rows[i][1] for i in first_pass) == (4 if pays else 3)
    finally:
        h.close()


def test_a_joining_prompts_last_token_waits_to_ride_in_the_decoding_rows_pass(model, monkeypatch):
    """While others decode, a joining prompt's chunk past its first token is a pass over the weights of its own
    (ubatches). Its last token, whose logits give the first generated token, waits for the next step and rides in the
    decoding rows' pass, whose LM head runs anyway: no pass computes the LM head for that one row alone. A prompt
    prefilled while nothing decodes goes in whole, its last token with logits."""
    spy = DecodeSpy()
    h = Harness(model, slots=4, resident=5)
    try:
        monkeypatch.setattr(llama, "llama_decode", spy)
        first = three_decode_then_one_joins(h, model, after=2)

        together = spy.batches[0]  # a's, b's and c's prompts (too short to share as a prefix), nothing decoding
        for seq_id in (0, 1, 2):
            rows = [flag for s, flag in together if s == seq_id]
            assert len(rows) == len(first.prompt) and rows[-1]
        joined = [i for i, rows in enumerate(spy.batches)
                  if len({s for s, _ in rows}) == 4 and sum(1 for s, _ in rows if s == 3) > 1]
        assert joined, "the joining prompt never shared a step with three decoding sequences"
        for i in joined:
            rows = spy.batches[i]
            for later_pass in ubatches([s for s, _ in rows], 512)[1:]:
                assert not any(rows[r][1] for r in later_pass), f"a pass of the prompt's own computed logits: {rows}"
        after = spy.batches[joined[-1] + 1]  # the held-back token, one row beside each decoding one, with logits
        assert sorted(s for s, _ in after) == [0, 1, 2, 3] and all(flag for _, flag in after)
    finally:
        h.close()


def test_greedy_sequences_take_their_tokens_from_one_argmax_over_the_steps_rows(model, monkeypatch):
    """The engine takes every greedy (grammar-free) sequence's token from one argmax over the step's rows of logits
    (one NumPy call: one GIL release, not one per row); a sequence that samples or has a grammar still draws from its
    own row. The tokens are the ones drawing row by row gives."""
    from services.llm_core.sampling import TokenSampler

    draws: dict[int, int] = {}  # id(sampler) -> calls of sample
    real_sample = TokenSampler.sample

    def counting(self: TokenSampler, logits):
        draws[id(self)] = draws.get(id(self), 0) + 1
        return real_sample(self, logits)

    monkeypatch.setattr(TokenSampler, "sample", counting)
    prompts = [PROMPT, AGENT_PROMPT, PROMPT + " Be brief."]

    def run() -> tuple[list[list[int]], list[Sequence]]:
        h = Harness(model, slots=4, resident=5)
        try:
            with h.engine._cond:  # admitted together: the same steps in both runs
                started = [h.start(f"g{i}", GREEDY, prompt=p) for i, p in enumerate(prompts)]
                started.append(h.start("sampled", SAMPLED))
            return [h.tokens_until(events)[0] for _, events in started], [seq for seq, _ in started]
        finally:
            h.close()

    at_once, seqs = run()
    assert all(draws.get(id(seq.sampler), 0) == 0 for seq in seqs[:3])  # no row-by-row draw for greedy ones
    assert draws[id(seqs[3].sampler)] == SAMPLED.max_tokens
    monkeypatch.setattr(BatchEngine, "_argmax_rows", lambda self, outputs: {})  # every row drawn by its sampler
    assert run()[0] == at_once


def test_a_prefix_that_lost_its_seq_id_comes_back_from_ram_with_the_same_kv(model):
    """An agent's next call extends its last one. With one seq_id, another call takes it and the finished
    sequence's KV goes to host RAM; the next call restores it from there instead of prefilling it, and continues
    exactly as it does from the same KV left resident."""
    first = "Task: investigate the river, the harbor and the ledger, then report the total of the numbers. " * 2
    later = first + "Observation: 42. Thought: I should now add the numbers and report the total.\nAnswer:"
    greedy = SamplingConfig(max_tokens=8, ignore_eos=True)
    outputs = {}
    for evicted in (False, True):
        h = Harness(model, slots=1, resident=1 if evicted else 2)
        try:
            h.tokens_until(h.start("first", SamplingConfig(max_tokens=2), prompt=first)[1])
            if evicted:  # another call takes the only seq_id: the first's KV goes to RAM
                h.tokens_until(h.start("other", SamplingConfig(max_tokens=2), prompt="Count: 1, 2, 3,")[1])
                assert h.engine.status()["prefix_ram_entries"] == 1
            outputs[evicted], end = h.tokens_until(h.start("next", greedy, prompt=later)[1])
            assert isinstance(end, FinishEvent)
            assert end.prefix_reused >= len(model.tokenize(first, True, True)) - 2
            assert h.engine.stats.prefix_restores_from_ram == int(evicted)
        finally:
            h.close()
    assert outputs[True] == outputs[False]


# Speculative decoding. The prompt invites copying (as tool arguments and quoted observations do), so prompt-lookup
# guesses are often right. One sequence at a time on both sides: the same batch shapes for the non-speculative run,
# and on this model and prompt the multi-token verification steps pick the same tokens (the bench measures how often
# batch numerics make them differ in general).
COPY_PROMPT = ("Copy each list exactly.\nList: river mountain signal engine harbor ledger orbit canyon lantern\n"
               "Copy: river mountain signal engine harbor ledger orbit canyon lantern\n"
               "List: meadow circuit compass glacier market tunnel beacon archive prism ember\nCopy:")


def speculative_run(model: LlamaModel, sampling: SamplingConfig, draft_tokens: int) -> tuple[list[int], Harness]:
    h = Harness(model, slots=2, resident=3, draft_tokens=draft_tokens)
    try:
        _, events = h.start("spec", sampling, prompt=COPY_PROMPT)
        tokens, end = h.tokens_until(events)
        assert isinstance(end, FinishEvent) and end.completion_tokens == len(tokens)
        return tokens, h
    finally:
        h.close()


@pytest.mark.parametrize("sampling", [SamplingConfig(max_tokens=40, ignore_eos=True),
                                      SamplingConfig(max_tokens=40, temperature=0.7, top_k=40, seed=99, ignore_eos=True),
                                      CONSTRAINED],
                         ids=["greedy", "seeded-sampling", "json-schema"])
def test_speculative_decoding_yields_the_same_tokens_in_fewer_steps(model, sampling):
    plain, off = speculative_run(model, sampling, draft_tokens=0)
    drafted, on = speculative_run(model, sampling, draft_tokens=4)
    assert drafted == plain  # each token drawn as without drafts: the same sampler, RNG and grammar, in order
    assert len(drafted) == sampling.max_tokens or sampling is CONSTRAINED
    assert off.engine.stats.draft_tokens == 0
    assert on.engine.stats.draft_tokens_accepted > 0
    assert on.engine.stats.steps == off.engine.stats.steps - on.engine.stats.draft_tokens_accepted


def test_a_sequence_without_guesses_of_its_own_rides_a_drafting_step_on_fillers(model, monkeypatch):
    """llama.cpp gives every sequence of a multi-stream ubatch as many rows, so a step drafts for all or none: one
    sequence without guesses of its own carries weaker ones (PromptLookup.fill) rather than stopping the others'.
    Every drafting step gives both sequences the same number of rows, and both outputs are the plain run's."""
    spy = DecodeSpy()
    monkeypatch.setattr(llama, "llama_decode", spy)
    own_guess = BatchEngine._draft
    # A test double for the n-gram lookup of one sequence: "free" never finds a guess of its own.
    monkeypatch.setattr(BatchEngine, "_draft",
                        lambda engine, seq, limit: [] if seq.request_id == "free" else own_guess(engine, seq, limit))
    sampling = SamplingConfig(max_tokens=30, ignore_eos=True)
    outputs = {}
    for drafts in (0, 2):
        h = Harness(model, slots=2, resident=3, draft_tokens=drafts)
        for sequences in (1, 2):  # a test double for the learnt costs: every step shape costs the same (a GPU)
            for tokens_each in (1, 2, 3):
                h.engine.step_costs.observe(sequences, tokens_each, 0.01)
        try:
            spy.batches.clear()
            with h.engine._cond:  # admitted together: they decode together, every step
                runs = [h.start("copy", sampling, prompt=COPY_PROMPT), h.start("free", sampling, prompt=PROMPT)]
            outputs[drafts] = [[e.token_id for e in drain(events)] for _, events in runs]
            stats = h.engine.stats
            assert (stats.draft_tokens > 0) == (drafts > 0)
        finally:
            h.close()
    per_seq = [[sum(1 for s, _ in rows if s == seq_id) for seq_id in sorted({s for s, _ in rows})]
               for rows in spy.batches if all(logits for _, logits in rows)]  # decode steps (a prompt has one)
    drafting = [rows for rows in per_seq if len(rows) == 2 and max(rows) > 1]  # both decoding (one ends first)
    assert len(drafting) >= 5
    assert all(rows[0] == rows[1] for rows in drafting), drafting
    assert outputs[2] == outputs[0]


def test_a_generation_preempted_while_drafting_keeps_no_guessed_cells_and_resumes_whole(model):
    """A snapshot taken between speculative steps holds exactly the sequence's n_past cells (a leftover guess would
    make the restore fail its pos_max check), and the resumed generation ends with all its tokens."""
    h = Harness(model, slots=2, resident=2, draft_tokens=4)
    # A test double for the learnt step costs: every step size costs the same (as on a GPU), so the engine drafts
    # whenever the context offers a guess, right or wrong, instead of only when guesses are nearly always kept.
    for tokens_each in range(1, 6):
        h.engine.step_costs.observe(1, tokens_each, 0.01)
    try:
        sampling = SamplingConfig(max_tokens=60, ignore_eos=True)
        _, events = h.start("g1", sampling)  # free text: some guesses right, some not
        first: list[int] = []
        stats = h.engine.stats
        while not stats.draft_tokens > stats.draft_tokens_accepted > 0:  # until some guess was refused
            first += h.tokens_until(events, stop_after=1)[0]
            assert len(first) < 50, "the model kept every guess: this test needs one refused"
        assert h.engine.preempt("g1", swap=True)
        more, end = h.tokens_until(events)
        assert isinstance(end, PreemptedEvent)
        [snapshot] = h.swapped
        assert snapshot.n_past == len(snapshot.prompt) + len(snapshot.generated) - 1
        resumed: queue.Queue[Event] = queue.Queue()
        h.engine.submit(h.engine.restored(snapshot, resumed.put))
        rest, end = h.tokens_until(resumed)
        assert isinstance(end, FinishEvent)
        assert len(first + more + rest) == 60
    finally:
        h.close()
