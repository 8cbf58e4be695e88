"""OpenTelemetry traces of syscalls: off, at no cost, unless an OTLP endpoint is configured.

With `--otlp-endpoint` (or OpenTelemetry's own OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT), a service exports its spans
over OTLP/gRPC: the kernel one per syscall (`syscall <kind>`, with a child for its wait in the queue and one per
call to a manager or LLM core), each manager one per call it serves, an LLM core one per generation with its
token counts. The context travels in W3C `traceparent` form: in gRPC metadata, and in BatchedCall.traceparent for a
batched call. An agent traced with OpenTelemetry itself (the SDKs send its current span's context) finds AIOS's
spans under its own. Whether or not spans are exported, the kernel keeps the trace id in the syscall's record.

Without an endpoint nothing here creates a span or imports OpenTelemetry's SDK: `span()` yields None.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from typing import Any, ContextManager, Iterator

log = logging.getLogger("aios.tracing")

TRACEPARENT = "traceparent"
# Spans wait at most this long before they are sent (OpenTelemetry's default: 5 s).
EXPORT_DELAY_MS = 500

# The traceparent the caller of the current RPC sent (the kernel sets it per call): its trace id goes in the syscall
# record even when this process exports no spans.
caller_traceparent: ContextVar[str] = ContextVar("caller_traceparent", default="")

_tracer: Any = None  # an OpenTelemetry Tracer once configure() found an endpoint
_provider: Any = None


class Cost:
    """The CPU time this process spent on tracing: starting and ending spans, reading and setting their context,
    exporting them (aios_tracing_cpu_seconds_total). What seeing inside costs is measured where it is spent: on a
    busy machine it is throughput lost, and measured per thread it does not move with the machine's noise."""

    def __init__(self) -> None:
        self.cpu_ns = 0
        self.spans = 0
        self._lock = threading.Lock()

    def add(self, cpu_ns: int, spans: int = 0) -> None:
        with self._lock:
            self.cpu_ns += cpu_ns
            self.spans += spans

    @contextmanager
    def counted(self) -> Iterator[None]:
        """Counts the calling thread's CPU time inside."""
        started = _clock()
        try:
            yield
        finally:
            self.add(_clock() - started)


COST = Cost()
_clock = time.thread_time_ns  # the calling thread's CPU time: other threads' and other tasks' work is not counted


def configure(service: str, endpoint: str = "") -> None:
    """Exports this process's spans to `endpoint` (host:port or http://host:port of an OTLP/gRPC collector; default
    the OTEL_EXPORTER_OTLP_* environment); does nothing without one."""
    global _tracer, _provider
    endpoint = endpoint or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or \
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    if not endpoint:
        return
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    _provider = TracerProvider(resource=Resource.create({"service.name": f"aios-{service}"}))
    insecure = not endpoint.startswith("https://")
    exporter = _TimedExporter(OTLPSpanExporter(endpoint=endpoint, insecure=insecure))
    _provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=EXPORT_DELAY_MS))
    _tracer = _provider.get_tracer("aios")
    log.info("tracing: spans of %s go to the OTLP collector at %s", service, endpoint)


def shutdown() -> None:
    """Sends the spans not sent yet (at the process's end)."""
    if _provider is not None:
        _provider.shutdown()


def enabled() -> bool:
    return _tracer is not None


OFF = nullcontext(None)  # what span() returns when tracing is off: entering it costs nothing, yields None


def span(name: str, kind: str = "internal", parent: str = "", attributes: dict[str, Any] | None = None,
         metadata: Any = None) -> ContextManager[Any]:
    """A span, current while inside: a child of `parent` (a traceparent value, or the one in gRPC `metadata`) if
    given and well formed, else of the current span; `kind`: server, client or internal. Yields None when tracing is
    off."""
    if _tracer is None:
        return OFF
    return _span(name, kind, parent or traceparent_in(metadata), attributes)


@contextmanager
def _span(name: str, kind: str, parent: str, attributes: dict[str, Any] | None) -> Iterator[Any]:
    from opentelemetry import propagate
    from opentelemetry.trace import SpanKind

    spent = -_clock()  # the span's own start and end; not the work inside it
    try:
        context = propagate.extract({TRACEPARENT: parent}) if trace_id_of(parent) else None
        with _tracer.start_as_current_span(name, context=context, kind=getattr(SpanKind, kind.upper()),
                                           attributes=attributes) as current:
            spent += _clock()
            try:
                yield current
            finally:
                spent -= _clock()
    finally:
        COST.add(spent + _clock(), spans=1)


def annotate(**attributes: Any) -> None:
    """Adds attributes to the current span, if tracing is on."""
    if _tracer is not None:
        from opentelemetry import trace

        with COST.counted():
            trace.get_current_span().set_attributes(attributes)


class _TimedExporter:
    """An OTLP exporter whose exports count in COST (they run on the span processor's own thread)."""

    def __init__(self, exporter: Any) -> None:
        self.exporter = exporter

    def export(self, spans: Any) -> Any:
        with COST.counted():
            return self.exporter.export(spans)

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis)


def current_traceparent() -> str:
    """The current span's context as a traceparent value ("" when tracing is off or no span is current)."""
    if _tracer is None:
        return ""
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    with COST.counted():
        propagate.inject(carrier)
    return carrier.get(TRACEPARENT, "")


def trace_id(current: Any) -> str:
    """The trace id of the span `span()` yielded, or else of the caller's traceparent ("" if neither)."""
    if current is not None:
        return format(current.get_span_context().trace_id, "032x")
    return trace_id_of(caller_traceparent.get())


TRACEPARENT_FORM = re.compile(r"00-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")


def trace_id_of(traceparent: str) -> str:
    """The trace id (32 hex digits) in a well-formed traceparent value "00-<trace id>-<span id>-<flags>", else ""
    (what a caller sends is checked before it is passed on or recorded)."""
    match = TRACEPARENT_FORM.fullmatch(traceparent) if len(traceparent) == 55 else None
    return match.group(1) if match and match.group(1) != "0" * 32 else ""


def traceparent_in(metadata: Any) -> str:
    """The traceparent value among gRPC metadata, "" if none."""
    for key, value in metadata or ():
        if key == TRACEPARENT:
            return value if isinstance(value, str) else ""
    return ""
