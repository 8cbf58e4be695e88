"""Unary calls to a manager carried many to a message over one stream (protos/aios/v1/batched.proto).

A unary gRPC call costs about 0.8 ms of CPU between its two processes on a
2-core EPYC, whatever it carries: at a few thousand syscalls a second that was
most of the machine. `CallBatcher` (the caller's side, inside ManagerClient)
keeps one `Batched.Calls` stream open to the manager and sends the calls that
wait together as one message; `BatchedServicer` (the manager's side) runs each
call with the manager's own servicer method, concurrently, and sends the
replies that are ready together. Statuses, deadlines and messages stay those of
the unary call.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from aios.v1 import batched_pb2, batched_pb2_grpc
from services.errors import DeadlineExceeded, InvalidArgument, Unimplemented, status_of


# A message carries calls up to this many request bytes (one larger call goes alone), far below the 64 MiB limit.
BATCH_BYTES = 4 * 1024 * 1024
CODES = {code.value[0]: code for code in grpc.StatusCode}

# (the servicer's bound method, the request message class) by method name
Methods = dict[str, tuple[Callable[..., Any], type[Message]]]


def unary_methods(servicer: Any, service: ServiceDescriptor) -> Methods:
    """The servicer's unary methods of `service`, which a Batched stream can carry."""
    return {m.name: (getattr(servicer, m.name), GetMessageClass(m.input_type))
            for m in service.methods if not m.client_streaming and not m.server_streaming}


class BatchedContext:
    """What a manager's servicer method gets as its context on a batched call: its time left (the servicers of
    memory, storage and tools read nothing else; a unary call's context has more)."""

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - asyncio.get_running_loop().time())


class BatchedServicer(batched_pb2_grpc.BatchedServicer):
    """Runs the calls of a Batched stream with a manager's own servicer methods. The stream's credential was
    checked when it opened (services/server.py's interceptor)."""

    def __init__(self, methods: Methods) -> None:
        self.methods = methods

    async def Calls(self, request_iterator, context):
        ready: asyncio.Queue[batched_pb2.BatchedReply | None] = asyncio.Queue()
        running: set[asyncio.Task] = set()

        async def one(call: batched_pb2.BatchedCall) -> None:
            reply = batched_pb2.BatchedReply(tag=call.tag)
            try:
                reply.response = await self._run(call)
            except Exception as exc:  # noqa: BLE001 - every error becomes the call's status, as unary calls do
                code, reply.message, retry_after = status_of(exc)
                reply.code, reply.retry_after_seconds = code.value[0], retry_after or 0.0
            ready.put_nowait(reply)

        async def read() -> None:
            try:
                async for batch in request_iterator:
                    for call in batch.calls:
                        task = asyncio.create_task(one(call))
                        running.add(task)
                        task.add_done_callback(running.discard)
                await asyncio.gather(*running)  # the caller is done sending: answer what it sent, then end
            finally:
                ready.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while True:
                replies = [await ready.get()]
                await asyncio.sleep(0)  # one turn of the event loop: replies finishing in it go in the same message
                while not ready.empty():
                    replies.append(ready.get_nowait())
                answered = [reply for reply in replies if reply is not None]
                if answered:
                    yield batched_pb2.BatchedReplies(replies=answered)
                if None in replies:
                    return
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    async def _run(self, call: batched_pb2.BatchedCall) -> bytes:
        if call.method not in self.methods:
            raise Unimplemented(f"{call.method!r} is not a unary method of this service; batched calls name one of "
                                f"{', '.join(sorted(self.methods))}")
        method, request_class = self.methods[call.method]
        try:
            request = request_class.FromString(call.request)
        except DecodeError as exc:
            raise InvalidArgument(f"the request is not a valid {request_class.__name__} ({exc})") from None
        loop = asyncio.get_running_loop()
        timeout = call.timeout_seconds or None
        work = method(request, BatchedContext(None if timeout is None else loop.time() + timeout))
        try:
            response = await asyncio.wait_for(work, timeout)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"{call.method} did not finish within its {timeout:.3g} s") from None
        return response.SerializeToString()


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

    async def call(self, method: str, request: Message, timeout: float | None) -> batched_pb2.BatchedReply:
        """The reply to one call (OK or not); StreamBroken if the stream ended first, asyncio.TimeoutError if no
        reply came within `timeout` (the manager stops the call at the same time)."""
        if self._stream is None:
            self._open()
        self._tag += 1
        tag, loop = self._tag, asyncio.get_running_loop()
        answer = loop.create_future()
        self._answers[tag] = answer
        self._waiting.append(batched_pb2.BatchedCall(tag=tag, method=method, request=request.SerializeToString(),
                                                     timeout_seconds=timeout or 0.0))
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
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError) as exc:
            self._broken(stream, exc)

    async def _receive(self, stream: Any) -> None:
        try:
            async for batch in stream:
                for reply in batch.replies:
                    answer = self._answers.get(reply.tag)
                    if answer is not None and not answer.done():
                        answer.set_result(reply)
            self._broken(stream, None)
        except grpc.aio.AioRpcError as exc:
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


SERVICE_NAME = batched_pb2.DESCRIPTOR.services_by_name["Batched"].full_name


def manager_services(servicer: Any, add_to_server: Callable[[Any, grpc.aio.Server], None], service: ServiceDescriptor
                     ) -> tuple[list[str], Callable[[grpc.aio.Server], None]]:
    """A manager's `Service.grpc_services` and `Service.register`: its own service, and Batched carrying the unary
    methods of its `servicer`."""
    def register(server: grpc.aio.Server) -> None:
        add_to_server(servicer, server)
        batched_pb2_grpc.add_BatchedServicer_to_server(BatchedServicer(unary_methods(servicer, service)), server)

    return [service.full_name, SERVICE_NAME], register
