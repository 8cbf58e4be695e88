"""The serving side of the Batched service (protos/aios/v1/batched.proto): unary calls many to a message.

The caller (aios.batched.CallBatcher: the asyncio SDK calling the kernel, the
kernel calling a manager) keeps one `Batched.Calls` stream open and sends the
calls that wait together as one message; `BatchedServicer` runs each call with
the service's own servicer method, concurrently, and sends the replies that
are ready together. Statuses, deadlines, credentials and messages stay those
of the unary call.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from aios.batched import MessagePacer, in_messages
from aios.v1 import batched_pb2, batched_pb2_grpc
from services.credentials import AUTHORIZATION
from services.errors import DeadlineExceeded, InvalidArgument, Unimplemented, status_of
from services import tracing
from services.metrics import RPCS
from services.tracing import TRACEPARENT, trace_id_of

# (the servicer's bound method, the request message class) by method name
Methods = dict[str, tuple[Callable[..., Any], type[Message]]]


def unary_methods(servicer: Any, service: ServiceDescriptor) -> Methods:
    """The servicer's unary methods of `service`, which a Batched stream can carry."""
    return {m.name: (getattr(servicer, m.name), GetMessageClass(m.input_type))
            for m in service.methods if not m.client_streaming and not m.server_streaming}


class BatchedContext:
    """What a servicer method gets as its context on a batched call: the call's credential (its own, or the
    stream's), the stream's peer and the call's time left. The kernel's methods read these three; the managers'
    read nothing of their context."""

    def __init__(self, metadata: Any, peer: str, deadline: float | None) -> None:
        self.metadata, self._peer, self.deadline = metadata, peer, deadline

    def invocation_metadata(self) -> Any:
        return self.metadata

    def peer(self) -> str:
        return self._peer

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - asyncio.get_running_loop().time())


# Calls of one stream running at once at most: past it a call is refused at once, so that a caller cannot make the
# service hold a million of them (gRPC bounds concurrent unary calls per connection the same way).
MAX_IN_FLIGHT = 4096


class BatchedServicer(batched_pb2_grpc.BatchedServicer):
    """Runs the calls of a Batched stream with a service's own servicer methods. A manager's stream credential was
    checked when it opened (services/server.py's interceptor); the kernel's methods check each call's."""

    def __init__(self, methods: Methods, service_name: str) -> None:
        self.methods = methods
        self.prefix = f"/{service_name}/"  # a call is counted under its unary method's name (services/metrics.py)

    async def Calls(self, request_iterator, context):
        await context.send_initial_metadata(())  # the stream is accepted: the caller sends its calls (aios.batched)
        ready: asyncio.Queue[batched_pb2.BatchedReply | None] = asyncio.Queue()
        running: set[asyncio.Task] = set()
        stream_metadata, peer = context.invocation_metadata(), context.peer()

        async def one(call: batched_pb2.BatchedCall) -> None:
            reply, started, code = batched_pb2.BatchedReply(tag=call.tag), time.perf_counter(), "CANCELLED"
            # An unknown method counts under one name: a caller must not grow the metrics with names it makes up.
            method = call.method if call.method in self.methods else "(unknown)"
            try:
                metadata = ((AUTHORIZATION, call.authorization),) if call.authorization else stream_metadata
                if trace_id_of(call.traceparent):
                    metadata = (*metadata, (TRACEPARENT, call.traceparent))
                with tracing.span(self.prefix[1:] + method, "server", call.traceparent):
                    reply.response = await self._run(call, metadata, peer)
                code = "OK"
            except Exception as exc:  # noqa: BLE001 - every error becomes the call's status, as unary calls do
                status, reply.message, retry_after = status_of(exc)
                reply.code, reply.retry_after_seconds, code = status.value[0], retry_after or 0.0, status.name
            finally:  # a call cancelled with its stream counts too
                RPCS.observe(self.prefix + method, code, time.perf_counter() - started)
            ready.put_nowait(reply)

        def refuse(call: batched_pb2.BatchedCall) -> None:
            ready.put_nowait(batched_pb2.BatchedReply(
                tag=call.tag, code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
                message=f"{MAX_IN_FLIGHT} calls are already running on this stream; wait for their replies"))

        async def read() -> None:
            try:
                async for batch in request_iterator:
                    for call in batch.calls:
                        if len(running) >= MAX_IN_FLIGHT:
                            refuse(call)
                            continue
                        task = asyncio.create_task(one(call))
                        running.add(task)
                        task.add_done_callback(running.discard)
                await asyncio.gather(*running)  # the caller is done sending: answer what it sent, then end
            finally:
                ready.put_nowait(None)

        reader = asyncio.create_task(read())
        pacer = MessagePacer()
        try:
            done = False
            while not done:
                replies = [await ready.get()]
                await pacer.ready(len(running))  # replies finishing meanwhile go in the same message
                while not ready.empty():
                    replies.append(ready.get_nowait())
                done = None in replies
                for batch in in_messages((reply for reply in replies if reply is not None), lambda r: len(r.response)):
                    yield batched_pb2.BatchedReplies(replies=batch)
                pacer.sent()
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    async def _run(self, call: batched_pb2.BatchedCall, metadata: Any, peer: str) -> bytes:
        if call.method not in self.methods:
            raise Unimplemented(f"{call.method!r} is not a unary method of this service; batched calls name one of "
                                f"{', '.join(sorted(self.methods))}")
        method, request_class = self.methods[call.method]
        try:
            request = request_class.FromString(call.request)
        except DecodeError as exc:
            raise InvalidArgument(f"the request is not a valid {request_class.__name__} ({exc})") from None
        timeout = call.timeout_seconds or None
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        scope = asyncio.timeout_at(deadline)  # within the call's own task: no task more per call, as wait_for makes
        try:
            async with scope:
                response = await method(request, BatchedContext(metadata, peer, deadline))
        except TimeoutError:
            if not scope.expired():
                raise
            raise DeadlineExceeded(f"{call.method} did not finish within its {timeout:.3g} s") from None
        return response.SerializeToString()


SERVICE_NAME = batched_pb2.DESCRIPTOR.services_by_name["Batched"].full_name


def batched_services(servicer: Any, add_to_server: Callable[[Any, grpc.aio.Server], None], service: ServiceDescriptor
                     ) -> tuple[list[str], Callable[[grpc.aio.Server], None]]:
    """A service's `Service.grpc_services` and `Service.register`: its own service, and Batched carrying the unary
    methods of its `servicer`."""
    def register(server: grpc.aio.Server) -> None:
        add_to_server(servicer, server)
        batched_pb2_grpc.add_BatchedServicer_to_server(
            BatchedServicer(unary_methods(servicer, service), service.full_name), server)

    return [service.full_name, SERVICE_NAME], register
