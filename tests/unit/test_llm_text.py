"""The LLM core's pure parts: prompt formats, token-to-text streaming, sampling."""

import numpy as np
import pytest

from services.errors import InvalidArgument
from services.llm_core.prompt import GemmaTurnFormat, TranscriptFormat
from services.llm_core.sampling import SamplingConfig, TokenSampler
from services.llm_core.text import TextStream


def test_text_stream_holds_a_possible_stop_string_until_decided():
    stream = TextStream(stop=("END",))
    assert stream.feed(b"hello E") == "hello "
    assert stream.feed(b"N") == ""
    assert stream.feed(b"ough") == "ENough"
    assert stream.feed(b" then END more") == " then "
    assert stream.stopped and stream.feed(b"x") == "" and stream.flush() == ""


def test_text_stream_counts_the_tokens_that_spelled_the_stop_string():
    stream = TextStream(stop=("<end>",))
    for piece, shown in ((b"done", "done"), (b".", "."), (b"<e", ""), (b"n", ""), (b"d>", "")):
        assert stream.feed(piece) == shown
    assert stream.stopped and stream.hidden_tokens == 3  # "<e", "n", "d>": nothing of them was shown

    mixed = TextStream(stop=("<end>",))
    assert mixed.feed(b"ok<en") == "ok" and mixed.feed(b"d>") == ""
    assert mixed.hidden_tokens == 1  # "ok<en" showed "ok", so only "d>" was hidden

    plain = TextStream(stop=("<end>",))
    assert plain.feed(b"a <e") == "a " and plain.flush() == "<e"
    assert plain.hidden_tokens == 0  # ended without a stop string: everything was shown


def test_text_stream_reassembles_characters_split_across_tokens():
    stream = TextStream()
    euro = "€".encode()
    assert stream.feed(euro[:1]) == ""
    assert stream.feed(euro[1:]) == "€"
    assert stream.feed(b"ab") + stream.flush() == "ab"


def test_transcript_format_renders_turns_and_ends_with_the_answer_cue():
    segments = TranscriptFormat().render([("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "2+2?")])
    text = "".join(s.text for s in segments)
    assert text == "Be brief.\n\nQuestion: Hi\nAnswer: Hello\nQuestion: 2+2?\nAnswer:"
    assert not any(s.special for s in segments)


def test_gemma_format_keeps_user_text_out_of_control_tokens():
    segments = GemmaTurnFormat().render([("system", "S"), ("user", "x<end_of_turn>y")])
    content = [s for s in segments if not s.special]
    assert [s.text for s in content] == ["S\n\nx<end_of_turn>y"]
    assert segments[-1].text == "<start_of_turn>model\n" and segments[-1].special


@pytest.mark.parametrize(
    "messages", [[], [("robot", "x")], [("user", "a"), ("system", "late")], [("user", "a"), ("assistant", "b")]]
)
def test_malformed_conversations_are_refused(messages):
    with pytest.raises(InvalidArgument):
        TranscriptFormat().render(messages)


def test_sampling_defaults_and_ranges():
    config = SamplingConfig.checked(0, 0.0, 0.0, 0, None, [])
    assert config.max_tokens == 128 and config.top_p == 1.0
    for bad in [dict(temperature=2.5), dict(temperature=-1.0), dict(top_p=1.5)]:
        args = dict(max_tokens=0, temperature=0.0, top_p=0.0, top_k=0, seed=None, stop=[]) | bad
        with pytest.raises(InvalidArgument):
            SamplingConfig.checked(**args)


def test_greedy_picks_the_argmax_and_a_seed_fixes_sampled_tokens():
    logits = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    assert TokenSampler(SamplingConfig(temperature=0.0)).sample(logits) == int(np.argmax(logits))
    a = TokenSampler(SamplingConfig(temperature=1.0, top_k=50, top_p=0.9, seed=42))
    b = TokenSampler(SamplingConfig(temperature=1.0, top_k=50, top_p=0.9, seed=42))
    assert [a.sample(logits) for _ in range(20)] == [b.sample(logits) for _ in range(20)]
    top50 = set(np.argsort(-logits)[:50].tolist())
    assert all(a.sample(logits) in top50 for _ in range(100))


def test_top_k_one_is_greedy_even_when_sampling():
    logits = np.random.default_rng(1).normal(size=500).astype(np.float32)
    sampler = TokenSampler(SamplingConfig(temperature=1.5, top_k=1, seed=3))
    assert {sampler.sample(logits) for _ in range(20)} == {int(np.argmax(logits))}
