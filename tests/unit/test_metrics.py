"""services/metrics.py and the kernel's SyscallMetrics without a socket: what a scrape would read, exposed with
prometheus-client's own writer and parsed back with its parser."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from aios.v1 import memory_pb2
from services.metrics import Collected, Histogram, from_message
from services.scheduler.metrics import TOP_AGENTS, SyscallMetrics
from services.scheduler.syscalls import Resource, SyscallRecord


def exposed(*collectors: Collected) -> dict[tuple[str, frozenset], float]:
    registry = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)
    text = generate_latest(registry).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_a_histogram_counts_each_value_in_the_first_bucket_that_holds_it():
    histogram = Histogram((0.01, 0.1, 1.0))
    for value in (0.005, 0.01, 0.05, 0.5, 7.0):
        histogram.observe(value)
    assert histogram.buckets() == [("0.01", 2), ("0.1", 3), ("1.0", 4), ("+Inf", 5)]
    assert histogram.sum == 0.005 + 0.01 + 0.05 + 0.5 + 7.0


def finished(agent: str, kind: str = "llm_generate", code: str = "", tokens: int = 0) -> SyscallRecord:
    record = SyscallRecord(f"sc-{agent}-{kind}", agent, kind, Resource.LLM, tokens_out=tokens)
    record.queued_s, record.running_s = 0.02, 0.3
    record.finish(code)
    return record


def test_syscalls_are_counted_by_kind_and_status_and_only_the_top_agents_by_tokens_get_a_series():
    metrics = SyscallMetrics()
    for i in range(50):
        metrics.count(finished(f"agt-{i:02d}", tokens=i + 1))
    metrics.count(finished("agt-x", kind="memory_get", code="NOT_FOUND"))
    samples = exposed(Collected("kernel", metrics.collect))
    assert samples[("aios_syscalls_total", frozenset({("kind", "llm_generate"), ("code", "OK")}))] == 50
    assert samples[("aios_syscalls_total", frozenset({("kind", "memory_get"), ("code", "NOT_FOUND")}))] == 1
    assert samples[("aios_syscall_duration_seconds_count", frozenset({("kind", "llm_generate")}))] == 50
    assert samples[("aios_syscall_queue_wait_seconds_bucket", frozenset({("resource", "llm"), ("le", "0.025")}))] == 51
    assert samples[("aios_generated_tokens_total", frozenset())] == sum(range(1, 51))
    agents = {dict(labels)["agent"]: value for (name, labels), value in samples.items()
              if name == "aios_agent_tokens_generated"}
    assert agents == {f"agt-{i:02d}": i + 1 for i in range(50 - TOP_AGENTS, 50)}


def test_a_status_message_becomes_counters_and_gauges_and_a_failing_collector_costs_only_its_own():
    stats = memory_pb2.MemoryStatsResponse(entries=7, hits=3, hit_ratio=0.75)

    def broken():
        raise RuntimeError("the store is closed")
        yield  # a generator, as collectors are

    samples = exposed(Collected("memory", lambda: from_message("aios_memory", stats, {"hits"}, "memory.proto")),
                      Collected("broken", broken))
    assert samples[("aios_memory_hits_total", frozenset())] == 3
    assert samples[("aios_memory_entries", frozenset())] == 7
    assert samples[("aios_memory_hit_ratio", frozenset())] == 0.75
