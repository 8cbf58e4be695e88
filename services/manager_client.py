"""How a trusted AIOS process calls a manager: one class for every manager and every caller.

The kernel calls the LLM core, memory, storage and tools through it; the tool
manager's file tools call storage through it. One place for the channel options
(message limits, quick reconnects), the cluster credential in metadata, waiting
for a connection, deadlines and turning a manager's gRPC error into a core error
with the manager's name.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aios.batched import CallBatcher, CallFailed
from aios.client import CHANNEL_OPTIONS
from services import tracing
from services.credentials import bearer_metadata
from services.tracing import TRACEPARENT
from services.errors import AiosError, DeadlineExceeded, ForwardedError, Unavailable

# How long a call waits for a manager that is not connected before UNAVAILABLE.
CONNECT_TIMEOUT_S = 2.0
# What grpc says when the caller's own deadline passed; a manager's DEADLINE_EXCEEDED carries its own words (e.g. the
# sandbox's "your code ran past its 10 s limit") and is passed on as the manager said it.
CLIENT_DEADLINE = "Deadline Exceeded"
HEALTH_TIMEOUT_S = 1.0


class ManagerClient:
    """A channel to one manager service, with the cluster credential on every call.

    With `batched` (the manager's service), unary calls travel on one Batched stream (services/batched.py), many to
    a message, with the same statuses; without, each is its own gRPC call."""

    def __init__(self, name: str, address: str, stub_class: type, cluster_secret: str,
                 batched: ServiceDescriptor | None = None) -> None:
        self.name = name
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = stub_class(self.channel)
        self.metadata = bearer_metadata(cluster_secret)
        self._batcher = None if batched is None else CallBatcher(self.channel, batched, self.metadata)

    async def connected(self) -> None:
        """Returns once the channel is ready; UNAVAILABLE after CONNECT_TIMEOUT_S."""
        if self.channel.get_state(try_to_connect=True) == grpc.ChannelConnectivity.READY:
            return
        try:
            await asyncio.wait_for(self.channel.channel_ready(), CONNECT_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise Unavailable(
                f"the {self.name} service at {self.address} is unreachable "
                f"(no connection within {CONNECT_TIMEOUT_S:.0f} s); check `aios status`"
            ) from None

    async def call(self, method: str, request: Any, timeout: float | None) -> Any:
        """A unary call; the manager's error comes back as a core error naming the manager."""
        if not tracing.enabled():
            return await self._call(method, request, timeout, "")
        with tracing.span(f"{self.name} {method}", "client"):
            return await self._call(method, request, timeout, tracing.current_traceparent())

    async def _call(self, method: str, request: Any, timeout: float | None, traceparent: str) -> Any:
        await self.connected()
        try:
            if self._batcher is not None:
                return await self._batcher.call(method, request, timeout, traceparent=traceparent)
            return await getattr(self.stub, method)(request, timeout=timeout, metadata=self._metadata(traceparent))
        except grpc.aio.AioRpcError as exc:
            raise self.error(exc) from None
        except CallFailed as exc:
            raise self.status_error(exc.code, exc.details, exc.retry_after) from None
        except asyncio.TimeoutError:
            raise self.status_error(grpc.StatusCode.DEADLINE_EXCEEDED, CLIENT_DEADLINE) from None

    def stream(self, method: str, request: Any, timeout: float | None) -> Any:
        """A server-streaming call; the caller iterates it and translates errors with `error`."""
        return getattr(self.stub, method)(request, timeout=timeout,
                                          metadata=self._metadata(tracing.current_traceparent()))

    def _metadata(self, traceparent: str) -> tuple[tuple[str, str], ...]:
        return (*self.metadata, (TRACEPARENT, traceparent)) if traceparent else self.metadata

    def error(self, exc: grpc.aio.AioRpcError) -> AiosError:
        return self.status_error(exc.code(), exc.details())

    def status_error(self, code: grpc.StatusCode, details: str, retry_after: float | None = None) -> AiosError:
        if code == grpc.StatusCode.UNAVAILABLE:
            return Unavailable(f"the {self.name} service is unavailable ({details}); retry when it is back")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and details == CLIENT_DEADLINE:
            return DeadlineExceeded(f"the {self.name} service did not answer before the deadline")
        return ForwardedError(code, f"{self.name}: {details}", retry_after)

    async def healthy(self) -> bool:
        """Whether its standard gRPC health check answers SERVING."""
        try:
            reply = await health_pb2_grpc.HealthStub(self.channel).Check(
                health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT_S
            )
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        if self._batcher is not None:
            await self._batcher.close()
        await self.channel.close()
