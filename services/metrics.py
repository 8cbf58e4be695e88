"""Prometheus metrics: every service process serves its own on a metrics port (`--metrics-port`, listed in
endpoints.json under "metrics").

What a service counts lives in its plain core as plain numbers; a collector turns them into Prometheus metric
families only when a scrape asks (on prometheus-client's HTTP thread), so serving calls pays for no metric objects.
Two kinds come with every gRPC service: the process's own (CPU, memory, open files) and `aios_rpc_*`, every call it
answered by method and status, batched calls included (`RPCS`, counted by services/server.py's interceptor and
services/batched.py). The rest comes from each service's collector: the kernel's syscalls and queues
(services/scheduler/metrics.py), an LLM core's engine, the memory manager's paging, storage's bytes.

Names follow Prometheus' conventions: `aios_<what>_total` for counters, `_seconds`, `_bytes` for units.
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import Any, Callable, Iterable, Iterator

from google.protobuf.message import Message
from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from services import tracing

log = logging.getLogger("aios.metrics")

# Latency buckets, seconds: from a memory read (~1 ms) to a long generation (minutes).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    """Observations counted into fixed buckets: one bisect and two additions per observation, no lock (one event
    loop adds; a scrape reads a copy)."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, int]]:
        """Cumulative counts per upper bound, "+Inf" last, as HistogramMetricFamily takes them."""
        counts, total, out = list(self.counts), 0, []
        for bound, count in zip([*map(repr, self.bounds), "+Inf"], counts):
            total += count
            out.append((bound, total))
        return out


class LabelledHistograms:
    """One Histogram per label value (a syscall kind, a method), made on first use."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.by_label: dict[tuple[str, ...], Histogram] = {}

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        histogram = self.by_label.get(labels)
        if histogram is None:
            histogram = self.by_label[labels] = Histogram(self.bounds)
        histogram.observe(value)

    def family(self, name: str, documentation: str, label_names: list[str]) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, documentation, labels=label_names)
        for labels, histogram in list(self.by_label.items()):
            family.add_metric(list(labels), histogram.buckets(), histogram.sum)
        return family


def _family(kind: type, name: str, documentation: str, label_names: list[str],
            values: dict[tuple[str, ...], float]) -> Metric:
    family = kind(name, documentation, labels=label_names)
    for labels, value in list(values.items()):
        family.add_metric(list(labels), value)
    return family


def counter(name: str, documentation: str, label_names: list[str], values: dict[tuple[str, ...], float]) -> Metric:
    """A counter family (`name` without `_total`, which prometheus-client appends) from label values to counts."""
    return _family(CounterMetricFamily, name, documentation, label_names, values)


def gauge(name: str, documentation: str, label_names: list[str], values: dict[tuple[str, ...], float]) -> Metric:
    return _family(GaugeMetricFamily, name, documentation, label_names, values)


class RpcMetrics:
    """Calls a service answered, by method and status code, and how long each took: `<name>_total` and
    `<name>_duration_seconds`."""

    def __init__(self, name: str = "aios_rpc", what: str = "gRPC calls answered, by method (/package.Service/Method) "
                                                             "and status code") -> None:
        self.name, self.what = name, what
        self.calls: dict[tuple[str, str], int] = {}
        self.durations = LabelledHistograms()

    def observe(self, method: str, code: str, seconds: float) -> None:
        key = (method, code)
        self.calls[key] = self.calls.get(key, 0) + 1
        self.durations.observe((method,), seconds)

    def collect(self) -> Iterator[Metric]:
        yield counter(self.name, self.what, ["method", "code"], self.calls)
        yield self.durations.family(f"{self.name}_duration_seconds", "Time from a call's arrival to its answer",
                                    ["method"])


# This process's calls (one service per process).
RPCS = RpcMetrics()


def from_message(prefix: str, message: Message, counters: set[str], where: str, leave_out: frozenset[str] = frozenset()
                 ) -> Iterator[Metric]:
    """Every number of a status message (but those in `leave_out`) as a metric `<prefix>_<field>`: a counter for the
    fields in `counters` (the ones counted since start), a gauge for the others. The fields are documented in the
    proto (`where`)."""
    for field in message.DESCRIPTOR.fields:
        if field.type in (field.TYPE_STRING, field.TYPE_BYTES, field.TYPE_MESSAGE, field.TYPE_ENUM) or \
                field.is_repeated or field.name in leave_out:
            continue
        value = float(getattr(message, field.name))
        documentation = f"{where}.{field.name} (see its comment in protos/aios/v1)"
        if field.name in counters:
            family: Metric = CounterMetricFamily(f"{prefix}_{field.name}", documentation)
        else:
            family = GaugeMetricFamily(f"{prefix}_{field.name}", documentation)
        family.add_metric([], value)
        yield family


class Cached:
    """A value a collector shows, recomputed at most every `period_s` (for a source that costs, like a scan)."""

    def __init__(self, compute: Callable[[], Any], period_s: float) -> None:
        self.compute, self.period_s = compute, period_s
        self._at, self._value = float("-inf"), None

    def value(self) -> Any:
        if time.monotonic() - self._at > self.period_s:
            self._value, self._at = self.compute(), time.monotonic()
        return self._value


class Collected:
    """A prometheus-client collector made of a function that yields metric families when a scrape asks. A function
    that fails costs its own metrics only (logged), not the scrape."""

    def __init__(self, name: str, collect: Callable[[], Iterable[Metric]]) -> None:
        self.name = name
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        try:
            yield from list(self._collect())
        except Exception:  # noqa: BLE001 - a scrape shows what it can
            log.exception("collecting the %s metrics failed", self.name)

    def describe(self) -> list[Any]:
        return []  # no description at registration: collecting may need the service started


class ScrapedRegistry(CollectorRegistry):
    """A registry that counts the CPU time its scrapes take (collecting and formatting every metric, on the HTTP
    thread): what metrics cost, measured where it is spent, beside what tracing costs."""

    def __init__(self) -> None:
        super().__init__(auto_describe=False)
        self.scrapes = 0
        self.cpu_ns = 0

    def collect(self) -> Iterator[Metric]:
        started = time.thread_time_ns()  # the formatting of each metric runs in this thread between two yields
        try:
            yield from super().collect()
        finally:
            self.scrapes += 1
            self.cpu_ns += time.thread_time_ns() - started

    def cost(self) -> Iterator[Metric]:
        yield counter("aios_metrics_scrapes", "Scrapes of this process's metrics", [], {(): self.scrapes})
        yield counter("aios_metrics_scrape_cpu_seconds", "CPU time this process spent answering scrapes", [],
                      {(): self.cpu_ns / 1e9})
        yield counter("aios_tracing_spans", "Spans this process started (0: tracing is off)", [],
                      {(): tracing.COST.spans})
        yield counter("aios_tracing_cpu_seconds", "CPU time this process spent on tracing: starting and ending "
                      "spans, their context, exporting them", [], {(): tracing.COST.cpu_ns / 1e9})


def serve_metrics(host: str, port: int, collectors: Iterable[Collected], calls: RpcMetrics = RPCS) -> str:
    """Serves the process's metrics over HTTP (GET /metrics) on `host:port` (0: a free port), from a thread of
    prometheus-client's; returns the address it bound."""
    registry = ScrapedRegistry()
    ProcessCollector(registry=registry)
    registry.register(Collected("calls", calls.collect))
    registry.register(Collected("seeing inside", registry.cost))
    for collector in collectors:
        registry.register(collector)
    server, _ = start_http_server(port, addr=host, registry=registry)
    return f"{host}:{server.server_port}"
