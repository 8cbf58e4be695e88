"""Server bootstrap shared by every AIOS service.

One place for what each service process needs around its servicer: an asyncio
gRPC server, the standard health service, reflection, mapping of core errors to
gRPC statuses, a "ready file" telling the launcher the bound port, and a clean
stop on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.errors import AiosError

log = logging.getLogger("aios.server")

# Health probes run this often; a failing probe turns the service NOT_SERVING.
HEALTH_PERIOD_S = 2.0


def _status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, AiosError):
        return exc.code, exc.message
    log.error("unexpected error: %s", "".join(traceback.format_exception(exc)))
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}: {exc}); see the service log"


class _Undecodable:
    """Stands in for a request whose bytes did not parse, so the handler can refuse it clearly."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the client's bad input
            return _Undecodable(exc)

    return deserialize


async def _check_decoded(request: Any, context: grpc.aio.ServicerContext) -> None:
    if isinstance(request, _Undecodable):
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request is not a valid protobuf message for this method ({request.error}); "
            "use the stubs generated from protos/aios/v1",
        )


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Turns exceptions escaping a handler, and undecodable requests, into clear gRPC statuses."""

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[override]
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                await _check_decoded(request, context)
                try:
                    return await inner(request, context)
                except (grpc.aio.AbortError, asyncio.CancelledError):
                    raise
                except Exception as exc:  # noqa: BLE001 - every error becomes a status
                    await context.abort(*_status_for(exc))

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, _tolerant(handler.request_deserializer), handler.response_serializer
            )
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def unary_stream(request, context):
                await _check_decoded(request, context)
                try:
                    async for item in inner_stream(request, context):
                        yield item
                except (grpc.aio.AbortError, asyncio.CancelledError, GeneratorExit):
                    raise
                except Exception as exc:  # noqa: BLE001
                    await context.abort(*_status_for(exc))

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, _tolerant(handler.request_deserializer), handler.response_serializer
            )
        return handler


HealthProbe = Callable[[], Awaitable[bool]]


@dataclass
class Service:
    """What a service process serves: its gRPC services, probes and lifecycle hooks."""

    name: str
    # Fully qualified gRPC service names, e.g. "aios.v1.Memory".
    grpc_services: list[str]
    # Adds the servicers to the server.
    register: Callable[[grpc.aio.Server], None]
    # Health probes; all must pass for SERVING.
    probes: list[HealthProbe] = field(default_factory=list)
    # Awaited once in the server's event loop before it serves (connect to what it depends on).
    on_start: Callable[[], Awaitable[None]] | None = None
    # Called once after the server stopped (release models, files, threads).
    on_stop: Callable[[], Awaitable[None] | None] | None = None


def common_arguments(description: str) -> argparse.ArgumentParser:
    """The command-line options every service shares."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback)")
    parser.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one")
    parser.add_argument("--ready-file", type=Path, help="write {'address': host:port, 'pid': N} here once serving")
    parser.add_argument("--log-level", default=os.environ.get("AIOS_LOG_LEVEL", "INFO"))
    return parser


def setup_logging(name: str, level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s",
    )


async def _watch_health(service: Service, servicer: Any) -> None:
    last: bool | None = None
    while True:
        ok = True
        for probe in service.probes:
            try:
                ok = ok and await probe()
            except Exception:  # noqa: BLE001 - a probe that raises is a failing probe
                ok = False
        if ok != last:
            status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in ["", *service.grpc_services]:
                await servicer.set(name, status)
            if last is not None:
                log.warning("%s health is now %s", service.name, "SERVING" if ok else "NOT_SERVING")
            last = ok
        await asyncio.sleep(HEALTH_PERIOD_S)


async def serve(service: Service, host: str, port: int, ready_file: Path | None = None) -> None:
    """Runs the service until SIGTERM/SIGINT, then stops gracefully."""
    server = grpc.aio.server(
        interceptors=[StatusInterceptor()],
        options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ],
    )
    if service.on_start is not None:
        await service.on_start()
    service.register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service.grpc_services, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise SystemExit(f"{service.name}: cannot bind {host}:{port}")
    await server.start()
    watcher = asyncio.create_task(_watch_health(service, health_servicer))
    address = f"{host}:{bound}"
    log.info("%s serving %s on %s (pid %d)", service.name, ", ".join(service.grpc_services), address, os.getpid())
    if ready_file is not None:
        tmp = ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"address": address, "pid": os.getpid()}))
        tmp.replace(ready_file)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("%s stopping", service.name)
    watcher.cancel()
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace=2.0)
    if service.on_stop is not None:
        result = service.on_stop()
        if asyncio.iscoroutine(result):
            await result
    log.info("%s stopped", service.name)


def run(build: Callable[[argparse.Namespace], Service], parser: argparse.ArgumentParser, argv: Iterable[str] | None = None) -> None:
    """Entry point of a service's __main__: parse options, build the service, serve."""
    args = parser.parse_args(None if argv is None else list(argv))
    setup_logging(parser.prog, args.log_level)

    async def main() -> None:
        service = build(args)
        await serve(service, args.host, args.port, args.ready_file)

    asyncio.run(main())
