"""The calling side of the Batched service (protos/aios/v1/batched.proto): unary calls many to a message.

A unary gRPC call costs about 0.8 ms of CPU between its two processes on a
2-core EPYC, whatever it carries. `CallBatcher` keeps one `Batched.Calls`
stream open and sends the calls that wait together as one message; the
service runs each as its own unary method would and answers by tag. The
asyncio SDK calls the kernel this way; the kernel calls its managers this way
(services/manager_client.py; the serving side is services/batched.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from google.protobuf.message import Message

from aios.v1 import batched_pb2, batched_pb2_grpc

# A message carries calls up to this many request bytes (one larger call goes alone), far below the 64 MiB limit.
BATCH_BYTES = 4 * 1024 * 1024
CODES = {code.value[0]: code for code in grpc.StatusCode}


class StreamBroken(Exception):
    """The Batched stream ended before answering a call: the manager stopped or the connection broke (UNAVAILABLE),
    or the manager refused the stream itself (its status, e.g. UNAUTHENTICATED)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def _expire(answer: asyncio.Future) -> None:
    if not answer.done():
        answer.set_exception(asyncio.TimeoutError())


class CallBatcher:
    """The caller's side: one Batched stream to a manager, opened on first use and again after it breaks; calls
    that wait while the stream is busy sending go together in the next message."""

    def __init__(self, stub: batched_pb2_grpc.BatchedStub, metadata: tuple[tuple[str, str], ...]) -> None:
        self.stub = stub
        self.metadata = metadata
        self._stream: Any = None
        self._waiting: list[batched_pb2.BatchedCall] = []
        self._answers: dict[int, asyncio.Future] = {}
        self._wake = asyncio.Event()
        self._tag = 0
        self._tasks: list[asyncio.Task] = []

    async def call(self, method: str, request: Message, timeout: float | None,
                   authorization: str = "") -> batched_pb2.BatchedReply:
        """The reply to one call (OK or not), made with the call's own `authorization` metadata value if given;
        StreamBroken if the stream ended first, asyncio.TimeoutError if no reply came within `timeout` (the service
        stops the call at the same time)."""
        if self._stream is None:
            self._open()
        self._tag += 1
        tag, loop = self._tag, asyncio.get_running_loop()
        answer = loop.create_future()
        self._answers[tag] = answer
        self._waiting.append(batched_pb2.BatchedCall(tag=tag, method=method, request=request.SerializeToString(),
                                                     timeout_seconds=timeout or 0.0, authorization=authorization))
        self._wake.set()
        expiry = None if timeout is None else loop.call_later(timeout, _expire, answer)  # no task per call
        try:
            return await answer
        finally:
            self._answers.pop(tag, None)
            if expiry is not None:
                expiry.cancel()

    def _open(self) -> None:
        self._stream = self.stub.Calls(metadata=self.metadata)
        self._tasks = [asyncio.create_task(self._send(self._stream)), asyncio.create_task(self._receive(self._stream))]

    async def _send(self, stream: Any) -> None:
        try:
            while True:
                await self._wake.wait()
                await asyncio.sleep(0)  # one turn of the event loop: the calls its other ready tasks make join this one
                self._wake.clear()
                while self._waiting:
                    batch, size = [], 0
                    while self._waiting and (not batch or size + len(self._waiting[0].request) <= BATCH_BYTES):
                        call = self._waiting.pop(0)
                        batch.append(call)
                        size += len(call.request)
                    await stream.write(batched_pb2.BatchedCalls(calls=batch))
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
        code, details = grpc.StatusCode.UNAVAILABLE, "the stream ended"
        if isinstance(exc, grpc.aio.AioRpcError) and exc.code() != grpc.StatusCode.CANCELLED:
            code, details = exc.code(), exc.details() or details
        for answer in self._answers.values():
            if not answer.done():
                answer.set_exception(StreamBroken(code, details))

    async def close(self) -> None:
        if self._stream is not None:
            self._stream.cancel()
            self._broken(self._stream, None)


