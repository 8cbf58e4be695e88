"""Server bootstrap shared by every AIOS service.

One place for what each service process needs around its servicer: an asyncio
gRPC server, the standard health service, reflection, mapping of core errors to
gRPC statuses (with a `retry-after` hint where one applies), the check of the
caller's credential, a "ready file" telling the launcher the bound port, and a
clean stop on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import inspect
import json
import logging
import os
import signal
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from aios.batched import CODES
from aios.client import MESSAGE_LIMIT_BYTES, NO_RETRY_PUSHBACK, retry_pushback
from services.credentials import ClusterSecretCheck, Metadata, read_secret
from services.errors import status_of
from services import tracing
from services.metrics import RPCS, Collected, serve_metrics

log = logging.getLogger("aios.server")

# On SIGTERM, calls still running after this long (after on_drain) are cancelled.
STOP_GRACE_S = 3.0
# Health probes run this often; a failing probe turns the service NOT_SERVING.
HEALTH_PERIOD_S = 2.0
# Calls that reached the server but wait for its event loop to take them. gRPC's defaults (1,000, hard limit 3,000)
# cancel the excess with a bare CANCELLED that reaches no handler: 9% of 2,000 agents registering at once were lost
# that way. The loop takes them in order; these bound only memory (a call's few hundred bytes).
MAX_PENDING_CALLS = 32768
# Python's cyclic garbage collector runs after 700 net allocations by default; a service handling a thousand calls
# a second allocates that in a few calls, and its full collections walk every object it holds (records, agents,
# blocks). 2,000 agents at once: the kernel spent 0.67-0.81 ms of CPU per syscall with the defaults, 0.52 with these.
GC_THRESHOLDS = (50_000, 20, 100)
# Trailing metadata key of the hint sent with RESOURCE_EXHAUSTED: seconds until a retry may succeed.
RETRY_AFTER = "retry-after"
# Methods anyone may call, credential or not: the health check (launchers, load balancers) and reflection.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _code_name(context: grpc.aio.ServicerContext) -> str:
    """The status a handler aborted its call with, by name."""
    code = context.code()
    if isinstance(code, int):
        code = CODES.get(code)
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


def _status_for(exc: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    code, message, retry_after = status_of(exc)
    trailing = () if retry_after is None else ((RETRY_AFTER, f"{retry_after:.3f}"),)
    if code == grpc.StatusCode.UNAVAILABLE:  # retry when it says (the kernel stopping), else never
        trailing += (NO_RETRY_PUSHBACK if retry_after is None else retry_pushback(retry_after),)
    return code, message, trailing


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


Authorize = Callable[[Metadata | None], None]


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Turns exceptions escaping a handler, undecodable requests and calls without the required
    credential (`authorize` raises) into clear gRPC statuses."""

    def __init__(self, authorize: Authorize | None = None) -> None:
        self.authorize = authorize

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[override]
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        authorize = self.authorize
        if authorize is None or handler_call_details.method.startswith(OPEN_METHOD_PREFIXES):
            authorize = None
        method = handler_call_details.method

        @asynccontextmanager
        async def served(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            """Around a handler: the credential and request checks, its span, errors into statuses, its count."""
            started, code = time.perf_counter(), "OK"
            try:
                if authorize is not None:
                    authorize(context.invocation_metadata())
                await _check_decoded(request, context)
                with tracing.span(method[1:], "server", metadata=context.invocation_metadata()):
                    yield
            except grpc.aio.AbortError:
                code = _code_name(context)
                raise
            except (asyncio.CancelledError, GeneratorExit):
                code = "CANCELLED"
                raise
            except Exception as exc:  # noqa: BLE001 - every error becomes a status
                status = _status_for(exc)
                code = status[0].name
                await context.abort(*status)
            finally:
                RPCS.observe(method, code, time.perf_counter() - started)

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                async with served(request, context):
                    return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, _tolerant(handler.request_deserializer), handler.response_serializer
            )
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def unary_stream(request, context):
                async with served(request, context):
                    async for item in inner_stream(request, context):
                        yield item

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, _tolerant(handler.request_deserializer), handler.response_serializer
            )
        if handler.stream_stream is not None and authorize is not None:
            inner_streams = handler.stream_stream

            async def stream_stream(request_iterator, context):
                try:
                    authorize(context.invocation_metadata())
                except Exception as exc:  # noqa: BLE001
                    await context.abort(*_status_for(exc))
                async for item in inner_streams(request_iterator, context):
                    yield item

            return grpc.stream_stream_rpc_method_handler(
                stream_stream, handler.request_deserializer, handler.response_serializer
            )
        return handler


# grpcio-reflection serves v1alpha only; grpcurl and newer tools ask for v1 first. The two protos differ in their
# package name alone (same messages, same field numbers), so v1 is the same servicer under the v1 name.
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _enable_reflection(service: "Service", server: grpc.aio.Server) -> None:
    from grpc_reflection.v1alpha import reflection_pb2

    names = [*service.grpc_services, health.SERVICE_NAME, reflection.SERVICE_NAME, REFLECTION_V1]
    servicer = reflection.aio.ReflectionServicer(names)
    reflection.enable_server_reflection(names, server)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(REFLECTION_V1, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        ),
    }),))


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
    # Awaited once on SIGTERM, before the server stops taking calls (the kernel suspends its generations).
    on_drain: Callable[[], Awaitable[None]] | None = None
    # Called once after the server stopped (release models, files, threads).
    on_stop: Callable[[], Awaitable[None] | None] | None = None
    # Checks every call's metadata (raises Unauthenticated); managers check the cluster secret.
    authorize: Authorize | None = None
    # TLS for the listening port; None serves plaintext (loopback by default).
    server_credentials: grpc.ServerCredentials | None = None
    # The service's own Prometheus metrics (services/metrics.py); its calls and process are counted anyway.
    collectors: list[Collected] = field(default_factory=list)


def common_arguments(description: str) -> argparse.ArgumentParser:
    """The command-line options every service shares."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback)")
    parser.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one")
    parser.add_argument("--ready-file", type=Path,
                        help="write {'address': host:port, 'metrics': host:port, 'pid': N} here once serving")
    parser.add_argument("--metrics-port", type=int, default=0,
                        help="port of the Prometheus metrics (GET /metrics on --host); 0 picks a free one, -1 none")
    parser.add_argument("--name", help="the name in its logs, e.g. memory_2 (default: what it is, e.g. memory)")
    parser.add_argument("--otlp-endpoint", default="",
                        help="send OpenTelemetry traces to this OTLP/gRPC collector (host:port); default "
                             "$OTEL_EXPORTER_OTLP_ENDPOINT, else no tracing")
    add_logging_arguments(parser)
    parser.add_argument("--cluster-secret-file", type=Path, required=True,
                        help="file (mode 0600) holding the secret shared by the kernel and the managers")
    parser.add_argument("--standby-file", type=Path,
                        help="start as a hot standby: build everything (load the model), write this file, and "
                             "serve only on SIGUSR1 (the supervisor's signal that the primary on --port died)")
    return parser


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default=os.environ.get("AIOS_LOG_LEVEL", "INFO"))
    parser.add_argument("--log-format", choices=["json", "text"], default=os.environ.get("AIOS_LOG_FORMAT", "json"),
                        help="one JSON object per line (default; `aios logs` shows them) or plain text")


def cluster_secret(args: argparse.Namespace) -> str:
    return read_secret(args.cluster_secret_file)


def kernel_only(args: argparse.Namespace) -> Authorize:
    """The check a manager applies to every call: it must carry the cluster secret."""
    return ClusterSecretCheck(cluster_secret(args))


def redis_url(args: argparse.Namespace) -> str:
    """The Redis URL (it may hold a password, so it comes from a 0600 file, not the command line)."""
    return read_secret(args.redis_url_file)


def add_redis_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url-file", type=Path, required=True,
                        help="file (mode 0600) holding the Redis URL, e.g. redis://aios:PASSWORD@127.0.0.1:6379/0")


# Fields of a log event that say which syscall and agent it is about, when the code that logs passes them
# (`extra=about(record)`, services/scheduler/syscalls.py).
EVENT_FIELDS = ("syscall_id", "agent_id", "trace_id")


class JsonLines(logging.Formatter):
    """One JSON object per line (what `aios logs` reads and log shippers take as is): time (UTC, ISO 8601), service,
    level, logger, message, the syscall and agent it is about if given, and the exception's traceback if any."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"),
            "service": self.service, "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        for name in EVENT_FIELDS:
            value = getattr(record, name, None)
            if value:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)  # ASCII: a message's own line separators stay escaped, one event per line


def setup_logging(name: str, level: str, form: str = "json") -> None:
    """Logs of the process to stderr: JSON lines (default) or, for a person at a terminal, text."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines(name) if form == "json" else
                         logging.Formatter(f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


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


async def serve(service: Service, host: str, port: int, ready_file: Path | None = None, metrics_port: int = -1
                ) -> None:
    """Runs the service until SIGTERM/SIGINT, then stops gracefully; its metrics on `metrics_port` unless -1."""
    server = grpc.aio.server(
        interceptors=[StatusInterceptor(service.authorize)],
        options=[
            ("grpc.max_receive_message_length", MESSAGE_LIMIT_BYTES),
            ("grpc.max_send_message_length", MESSAGE_LIMIT_BYTES),
            ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
            ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
        ],
    )
    if service.on_start is not None:
        await service.on_start()
    service.register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    _enable_reflection(service, server)
    if service.server_credentials is not None:
        bound = server.add_secure_port(f"{host}:{port}", service.server_credentials)
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise SystemExit(f"{service.name}: cannot bind {host}:{port}")
    await server.start()
    watcher = asyncio.create_task(_watch_health(service, health_servicer))
    address = f"{host}:{bound}"
    log.info("%s serving %s on %s%s (pid %d)", service.name, ", ".join(service.grpc_services), address,
             " with TLS" if service.server_credentials is not None else "", os.getpid())
    metrics = serve_metrics(host, metrics_port, service.collectors) if metrics_port >= 0 else ""
    if metrics:
        log.info("%s metrics on http://%s/metrics", service.name, metrics)
    if ready_file is not None:
        tmp = ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"address": address, "metrics": metrics, "pid": os.getpid()}))
        tmp.replace(ready_file)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("%s stopping", service.name)
    watcher.cancel()
    await health_servicer.enter_graceful_shutdown()
    try:
        if service.on_drain is not None:
            await service.on_drain()
    finally:  # a drain that failed still stops the server and releases what the service holds
        await server.stop(grace=STOP_GRACE_S)
        if service.on_stop is not None:
            result = service.on_stop()
            if asyncio.iscoroutine(result):
                await result
    log.info("%s stopped", service.name)


async def _stand_by(service: Service, standby_file: Path) -> None:
    """A hot standby: built (its model loaded), it says so in `standby_file` and waits for SIGUSR1, then serves.
    A restart by promotion costs a bind instead of a process start and a model load."""
    promoted = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, promoted.set)
    standby_file.write_text(json.dumps({"pid": os.getpid()}))
    log.info("%s standing by (pid %d); SIGUSR1 makes it serve", service.name, os.getpid())
    await promoted.wait()
    asyncio.get_running_loop().remove_signal_handler(signal.SIGUSR1)
    log.info("%s promoted: serving", service.name)


def run(
    build: Callable[[argparse.Namespace], Service], parser: argparse.ArgumentParser, args: argparse.Namespace | None = None
) -> None:
    """Entry point of a service's __main__: parse options (unless parsed already), build the service, serve."""
    kind = Path(inspect.getfile(build)).parent.name  # services/<kind>/__main__.py
    default_name = "kernel" if kind == "scheduler" else kind
    args = args or parser.parse_args()
    setup_logging(args.name or default_name, args.log_level, args.log_format)
    tracing.configure(args.name or default_name, args.otlp_endpoint)
    gc.set_threshold(*GC_THRESHOLDS)

    async def main() -> None:
        service = build(args)
        gc.freeze()  # what the service built to run stays: collections need not look at it again
        if args.standby_file is not None:
            await _stand_by(service, args.standby_file)
        await serve(service, args.host, args.port, args.ready_file, args.metrics_port)

    try:
        asyncio.run(main())
    finally:
        tracing.shutdown()
