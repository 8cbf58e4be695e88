"""When the SDK continues a generation whose stream broke (aios.syscalls.ResumableStream), and from where."""

from __future__ import annotations

import grpc
import pytest

from aios.syscalls import KERNEL_BACK_S, MAX_STREAM_RESUMES, ResumableStream, generate_request
from aios.v1 import llm_core_pb2


class BrokenStream(grpc.RpcError):
    """Test double of the error a broken gRPC stream raises: only its code and trailing metadata matter here."""

    def __init__(self, code: grpc.StatusCode, trailing: tuple[tuple[str, str], ...] = ()) -> None:
        self._code, self._trailing = code, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailing


def streamed(generation: ResumableStream, *token_ids: int) -> None:
    for token_id in token_ids:
        generation.fresh(llm_core_pb2.GenerateChunk(token_id=token_id,
                                                    completion_tokens=len(generation.received) + 1))


def test_a_stream_cut_by_a_stopping_kernel_is_continued_after_its_pushback_from_its_syscall_and_tokens():
    generation = ResumableStream(generate_request("hi", max_tokens=50), timeout=None)
    generation.opened((("aios-syscall-id", "sc-1"),))
    streamed(generation, 11, 12, 13)
    wait = generation.retry_after(BrokenStream(grpc.StatusCode.UNAVAILABLE, (("grpc-retry-pushback-ms", "1000"),)))
    assert wait == 1.0
    assert generation.request.resume_syscall_id == "sc-1"
    assert list(generation.request.received_token_ids) == [11, 12, 13]
    assert not generation.fresh(llm_core_pb2.GenerateChunk(token_id=13, completion_tokens=3))  # had it already
    assert generation.fresh(llm_core_pb2.GenerateChunk(token_id=14, completion_tokens=4))


def test_refusals_with_a_pushback_do_not_use_up_the_resumes_but_stop_after_the_kernel_stays_away():
    generation = ResumableStream(generate_request("hi"), timeout=None)
    stopping = BrokenStream(grpc.StatusCode.UNAVAILABLE, (("grpc-retry-pushback-ms", "1000"),))
    for _ in range(MAX_STREAM_RESUMES + 2):
        assert generation.retry_after(stopping) == 1.0
    assert generation.resumes == 0
    generation._broken_since -= KERNEL_BACK_S + 1  # as if the kernel had been away that long
    assert generation.retry_after(stopping) is None


def test_a_kernel_that_went_away_is_asked_again_at_once_a_bounded_number_of_times():
    generation = ResumableStream(generate_request("hi"), timeout=None)
    gone = BrokenStream(grpc.StatusCode.UNAVAILABLE)
    assert [generation.retry_after(gone) for _ in range(MAX_STREAM_RESUMES)] == [0.0] * MAX_STREAM_RESUMES
    assert generation.retry_after(gone) is None


@pytest.mark.parametrize("error", [
    BrokenStream(grpc.StatusCode.UNAVAILABLE, (("grpc-retry-pushback-ms", "-1"),)),  # the kernel said: final
    BrokenStream(grpc.StatusCode.INVALID_ARGUMENT),
    BrokenStream(grpc.StatusCode.DEADLINE_EXCEEDED),
])
def test_final_answers_are_not_retried(error):
    assert ResumableStream(generate_request("hi"), timeout=None).retry_after(error) is None


def test_a_generation_that_remembers_its_turns_is_not_continued_only_sent_again_when_refused_before_a_token():
    stopping = BrokenStream(grpc.StatusCode.UNAVAILABLE, (("grpc-retry-pushback-ms", "1000"),))
    generation = ResumableStream(generate_request(messages=[("user", "hi")], remember=True), timeout=None)
    generation.opened((("aios-syscall-id", "sc-1"),))
    assert generation.retry_after(stopping) == 1.0 and not generation.request.resume_syscall_id
    assert generation.retry_after(BrokenStream(grpc.StatusCode.UNAVAILABLE)) is None  # the kernel died under it
    streamed(generation, 5)
    assert generation.retry_after(stopping) is None  # a token came: sending it again would store the turns twice


def test_the_wait_for_the_kernel_counts_from_the_break():
    generation = ResumableStream(generate_request("hi"), timeout=None)
    generation.retry_after(BrokenStream(grpc.StatusCode.UNAVAILABLE))
    generation._broken_since -= KERNEL_BACK_S - 5  # broke that long ago
    assert generation.back_within() <= 5


def test_the_wait_never_outlasts_the_callers_deadline():
    generation = ResumableStream(generate_request("hi"), timeout=0.3)
    wait = generation.retry_after(BrokenStream(grpc.StatusCode.UNAVAILABLE, (("grpc-retry-pushback-ms", "5000"),)))
    assert wait is not None and wait <= 0.3
