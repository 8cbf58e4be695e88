"""The calling side of the Batched service (protos/aios/v1/batched.proto): unary calls many to a message.

A unary gRPC call costs about 0.8 ms of CPU between its two processes on a
2-core EPYC, whatever it carries. `CallBatcher` keeps one `Batched.Calls`
stream open (its calls go once the service's initial metadata says it took
the stream) and sends the calls that wait together as one message; the
service runs each as its own unary method would and answers by tag. The
asyncio SDK calls the kernel this way; the kernel calls its managers this way
(services/manager_client.py; the serving side is services/batched.py).
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Iterable, Iterator, TypeVar

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from aios.v1 import batched_pb2, batched_pb2_grpc

# A message carries calls up to this many request bytes (one larger call goes alone), far below the 64 MiB limit.
BATCH_BYTES = 4 * 1024 * 1024
# While more than BUSY_CALLS of a stream's calls are unanswered, its messages go at least MESSAGE_INTERVAL_S apart, so
# that the calls (replies) made meanwhile share one: a message costs ~0.2 ms of CPU on each side whatever it carries,
# and at a few hundred calls a second one turn of the event loop rarely holds more than one. A call made on a quiet
# stream (an agent waiting for each answer before its next call) goes at once, as Nagle's rule would have it.
# Each call crosses four paced streams (agent -> kernel -> manager and back), so the interval is paid up to four times:
# with 2,000 agents paced at one non-LLM syscall a second (2-core EPYC, same cluster, runs interleaved) 5 ms gave p50
# 17.5-24.9 ms and p99 43-60 ms, 1 ms p50 7.8-11.3 and p99 25-42 (CPU per syscall +15%) and as many calls a second at
# saturation (3,850-4,150/s against 3,420-3,850), 0 (one loop turn only) p99 93-255 ms at 0.92 ms of CPU a syscall.
MESSAGE_INTERVAL_S = 0.001
BUSY_CALLS = 4
CODES = {code.value[0]: code for code in grpc.StatusCode}
# grpc.aio's status for a message its core could not send: the connection under the stream is gone (a service killed
# while a write was on its way), not an error of the service's.
CORE_WRITE_FAILED = (grpc.StatusCode.INTERNAL, "Internal error from Core")
T = TypeVar("T")


def in_messages(items: Iterable[T], size: Callable[[T], int]) -> Iterator[list[T]]:
    """`items` in order, as lists of up to BATCH_BYTES (one larger item goes alone): what one message carries."""
    batch: list[T] = []
    total = 0
    for item in items:
        if batch and total + size(item) > BATCH_BYTES:
            yield batch
            batch, total = [], 0
        batch.append(item)
        total += size(item)
    if batch:
        yield batch


class MessagePacer:
    """Spaces a busy stream's messages MESSAGE_INTERVAL_S apart: `ready()` before a message, `sent()` after it."""

    def __init__(self, interval: float = MESSAGE_INTERVAL_S) -> None:
        self.interval = interval
        self._last = float("-inf")

    async def ready(self, unanswered: int) -> None:
        """Returns when the next message may go: after one turn of the event loop (the calls its other ready tasks
        make join this one) or, while more than BUSY_CALLS calls are `unanswered` and the last message went less
        than the interval ago, once the interval is over."""
        wait = self._last + self.interval - asyncio.get_running_loop().time() if unanswered > BUSY_CALLS else 0.0
        await asyncio.sleep(max(0.0, wait))

    def sent(self) -> None:
        self._last = asyncio.get_running_loop().time()


class CallFailed(Exception):
    """A batched call that did not succeed: the service's status for it (`answered`), or the stream's end before an
    answer: the service stopped or the connection broke (UNAVAILABLE), or it refused the stream itself (its status,
    e.g. UNAUTHENTICATED)."""

    def __init__(self, code: grpc.StatusCode, details: str, retry_after: float | None = None,
                 answered: bool = True) -> None:
        super().__init__(details)
        self.code, self.details, self.retry_after, self.answered = code, details, retry_after, answered


def stream_failure(exc: BaseException | None) -> tuple[grpc.StatusCode, str]:
    """What the unanswered calls of a stream that ended with `exc` fail with: the service's own status for the stream
    (e.g. UNAUTHENTICATED: it refused it), else UNAVAILABLE: the stream or its connection went (it ended without a
    status, CANCELLED by a closing channel, or a write that gRPC's core could not send)."""
    if isinstance(exc, grpc.aio.AioRpcError) and exc.code() != grpc.StatusCode.CANCELLED \
            and (exc.code(), exc.details()) != CORE_WRITE_FAILED:
        return exc.code(), exc.details() or "the stream ended"
    return grpc.StatusCode.UNAVAILABLE, "the stream ended"


def _expire(answer: asyncio.Future) -> None:
    if not answer.done():
        answer.set_exception(asyncio.TimeoutError())


class CallBatcher:
    """The caller's side: one Batched stream on `channel` to a service (`service`: its definition, whose unary
    methods it calls), opened on first use and again after it breaks; calls that wait while the stream is busy
    sending go together in the next message."""

    def __init__(self, channel: grpc.aio.Channel, service: ServiceDescriptor,
                 metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.stub = batched_pb2_grpc.BatchedStub(channel)
        self.metadata = metadata
        self.replies = {m.name: GetMessageClass(m.output_type) for m in service.methods if not m.server_streaming}
        self._stream: Any = None
        self._waiting: list[batched_pb2.BatchedCall] = []
        self._answers: dict[int, asyncio.Future] = {}
        self._wake = asyncio.Event()
        self._tag = 0
        self._tasks: list[asyncio.Task] = []

    async def call(self, method: str, request: Message, timeout: float | None, authorization: str = "",
                   traceparent: str = "") -> Message:
        """The method's response to one call, made with the call's own `authorization` metadata value if given (and
        its trace context, a traceparent value); CallFailed with its status if it failed or the stream ended first, asyncio.TimeoutError if no reply came
        within `timeout` (the service stops the call at the same time)."""
        if self._stream is None:
            self._open()
        self._tag += 1
        tag, loop = self._tag, asyncio.get_running_loop()
        answer = loop.create_future()
        self._answers[tag] = answer
        self._waiting.append(batched_pb2.BatchedCall(tag=tag, method=method, request=request.SerializeToString(),
                                                     timeout_seconds=timeout or 0.0, authorization=authorization,
                                                     traceparent=traceparent))
        self._wake.set()
        expiry = None if timeout is None else loop.call_later(timeout, _expire, answer)  # no task per call
        try:
            reply = await answer
        finally:
            self._answers.pop(tag, None)
            if expiry is not None:
                expiry.cancel()
        if reply.code:
            raise CallFailed(CODES[reply.code], reply.message, reply.retry_after_seconds or None)
        return self.replies[method].FromString(reply.response)

    def _open(self) -> None:
        self._stream = self.stub.Calls(metadata=self.metadata)
        self._tasks = [asyncio.create_task(self._send(self._stream)), asyncio.create_task(self._receive(self._stream))]

    async def _send(self, stream: Any) -> None:
        pacer = MessagePacer()
        try:
            # No call goes before the service accepted the stream (it answers with its initial metadata at once): a
            # stream it refuses (UNAUTHENTICATED) ends with that status, which _receive reports, where a first write
            # racing the refusal failed on its own (the connection closed under it) and hid the service's status.
            await stream.initial_metadata()
            if stream.done():
                return
            while True:
                await self._wake.wait()
                await pacer.ready(len(self._answers))
                self._wake.clear()
                waiting, self._waiting = self._waiting, []
                for batch in in_messages(waiting, lambda call: len(call.request)):
                    await stream.write(batched_pb2.BatchedCalls(calls=batch))
                pacer.sent()
        except Exception as exc:  # noqa: BLE001 - whatever ended the stream, its calls must hear of it
            self._broken(stream, exc)

    async def _receive(self, stream: Any) -> None:
        try:
            async for batch in stream:
                for reply in batch.replies:
                    answer = self._answers.get(reply.tag)
                    if answer is not None and not answer.done():
                        answer.set_result(reply)
            self._broken(stream, None)
        except Exception as exc:  # noqa: BLE001
            self._broken(stream, exc)

    def _broken(self, stream: Any, exc: BaseException | None) -> None:
        """Every call not answered on `stream` fails; the next call opens a new stream."""
        if self._stream is not stream:
            return
        self._stream = None
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        self._waiting.clear()
        code, details = stream_failure(exc)
        for answer in self._answers.values():
            if not answer.done():
                answer.set_exception(CallFailed(code, details, answered=False))

    async def close(self) -> None:
        if self._stream is not None:
            self._stream.cancel()
            self._broken(self._stream, None)


