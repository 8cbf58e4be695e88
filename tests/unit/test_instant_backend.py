"""The instant backend (a test double for the model, for the scale benchmark): it answers like the engine does."""

from __future__ import annotations

import queue
from typing import Iterator

import grpc
import pytest

from services.llm_core.engine import EngineConfig, ErrorEvent, Event, FinishEvent, FinishReason, Sequence, TokenEvent
from services.llm_core.instant import WORD, InstantEngine
from services.llm_core.model import LlamaModel, default_model_path
from services.llm_core.sampling import SamplingConfig


@pytest.fixture(scope="module")
def engine() -> Iterator[InstantEngine]:
    model = LlamaModel(default_model_path())
    running = InstantEngine(model, EngineConfig())
    running.start()
    yield running
    running.stop()
    model.close()


def run(engine: InstantEngine, sampling: SamplingConfig, replay: tuple[int, ...] = ()) -> list[Event]:
    events: queue.Queue[Event] = queue.Queue()
    seq = Sequence("r", "agent", engine.model.tokenize("Hello", True, True), sampling, events.put,
                   constraint=engine.model.constraint(sampling.grammar))
    seq.replay.extend(replay)
    engine.submit(seq)
    out = [events.get(timeout=30)]
    while not isinstance(out[-1], (FinishEvent, ErrorEvent)):
        out.append(events.get(timeout=30))
    return out


def test_a_generation_gets_exactly_its_tokens_and_finishes_for_length(engine):
    events = run(engine, SamplingConfig(max_tokens=5, ignore_eos=True))
    tokens, end = events[:-1], events[-1]
    assert [t.completion_tokens for t in tokens] == [1, 2, 3, 4, 5]
    assert "".join(t.text for t in tokens) + end.text == WORD * 5
    assert (end.reason, end.completion_tokens) == (FinishReason.LENGTH, 5)


def test_stop_strings_end_it_as_the_engine_would(engine):
    end = run(engine, SamplingConfig(max_tokens=50, stop=("ok ok",)))[-1]
    assert end.reason is FinishReason.STOP_STRING and end.completion_tokens < 50


def test_replayed_tokens_stand_and_are_not_sent_again(engine):
    events = run(engine, SamplingConfig(max_tokens=4, ignore_eos=True), replay=(engine.token, engine.token))
    assert [e.completion_tokens for e in events if isinstance(e, TokenEvent)] == [3, 4]


def test_a_json_schema_is_refused_not_ignored(engine):
    [error] = run(engine, SamplingConfig.checked(8, 0.0, 1.0, 0, None, [], json_schema='{"type": "object"}'))
    assert isinstance(error, ErrorEvent) and error.error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "test double" in str(error.error)


def test_a_request_that_cannot_fit_is_refused_as_the_real_core_refuses_it(engine):
    seq = Sequence("big", "agent", [1] * engine.config.max_sequence_tokens, SamplingConfig(max_tokens=4), lambda e: None)
    with pytest.raises(Exception) as refused:
        engine.submit(seq)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
