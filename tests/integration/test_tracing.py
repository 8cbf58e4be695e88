"""OpenTelemetry traces of syscalls across real processes: an agent traced with OpenTelemetry calls AIOS, whose
services export their spans to an OTLP collector (bench/otlp_collector.py, a test double that keeps what it
receives); the spans form one trace under the agent's own span, and the syscall records name it."""

from __future__ import annotations

import asyncio

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import aios.aio
from bench.otlp_collector import OtlpCollectorStub, ReceivedSpan
from deploy.cluster import Cluster, ClusterConfig
from tests.integration.scraping import scrape
from tests.integration.waiting import wait_until


def one(spans: list[ReceivedSpan], service: str, name: str, trace_id: str) -> ReceivedSpan:
    found = [s for s in spans if s.service == service and s.name == name and s.trace_id == trace_id]
    assert len(found) == 1, (service, name, sorted({(s.service, s.name) for s in spans}))
    return found[0]


def test_an_agents_trace_runs_through_the_kernel_its_queue_the_managers_and_the_model(tmp_path):
    agents_spans = InMemorySpanExporter()  # the agent's own tracing, in the agent's process
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(agents_spans))
    tracer = provider.get_tracer("my-agent")
    with OtlpCollectorStub() as collector, \
            Cluster(ClusterConfig(home=tmp_path, slots=2, otlp_endpoint=collector.address)) as cluster:
        with cluster.connect() as kernel:
            agent = kernel.register("traced")
            with tracer.start_as_current_span("agent step") as step:
                entry = agent.memory_add("traced note")
                chunks = list(agent.generate("Say hi.", max_tokens=4))
            untraced = agent.memory_get(entry.id)  # outside any span of the agent's: a trace of the kernel's own
            trace_id = format(step.get_span_context().trace_id, "032x")
            records = {r.kind: r for r in agent.syscalls().syscalls}
            assert records["memory_add"].trace_id == trace_id and records["llm_generate"].trace_id == trace_id
            assert records["memory_get"].trace_id not in ("", trace_id) and untraced.text == "traced note"

            async def from_asyncio() -> tuple[str, str]:  # the asyncio SDK's batched calls carry it too
                async with aios.aio.connect(cluster.kernel_address, token=cluster.operator_token) as connection:
                    other = await connection.register("traced-async")
                    with tracer.start_as_current_span("async step") as async_step:
                        await other.memory_add("traced too")
                    listed = await other.syscalls(kind="memory_add")
                    return listed.syscalls[0].trace_id, format(async_step.get_span_context().trace_id, "032x")

            recorded, expected = asyncio.run(from_asyncio())
            assert recorded == expected

            def complete() -> list[ReceivedSpan]:
                spans = collector.received()
                names = {(s.service, s.name) for s in spans if s.trace_id == trace_id}
                wanted = {("aios-kernel", "syscall memory_add"), ("aios-memory", "aios.v1.Memory/Add"),
                          ("aios-kernel", "syscall llm_generate"), ("aios-llm_core", "aios.v1.LLMCore/Generate")}
                return spans if wanted <= names else []

            spans = wait_until(complete, 30, "the services' spans at the collector")
            for service in ("kernel", "memory", "llm_core"):  # each counts what its own tracing cost it
                exported = scrape(cluster, service)
                assert exported[("aios_tracing_spans_total", frozenset())] >= \
                    len([s for s in spans if s.service == f"aios-{service}"]) > 0
                assert exported[("aios_tracing_cpu_seconds_total", frozenset())] > 0
    by_id = {s.span_id: s for s in spans}
    add = one(spans, "aios-kernel", "syscall memory_add", trace_id)
    rpc = by_id[add.parent_id]  # the kernel's server span of the call, a child of the agent's step
    assert rpc.name == "aios.v1.Kernel/Syscall" and rpc.parent_id == format(step.get_span_context().span_id, "016x")
    assert add.attributes["aios.agent_id"] == agent.id and add.attributes["aios.syscall_id"] == records["memory_add"].id
    queue = one(spans, "aios-kernel", "queue memory", trace_id)
    assert queue.parent_id == add.span_id
    served = one(spans, "aios-memory", "aios.v1.Memory/Add", trace_id)
    client = by_id[served.parent_id]  # the kernel's call of the memory manager, inside the syscall
    assert client.service == "aios-kernel" and client.name == "memory Add" and client.parent_id == add.span_id
    generation = one(spans, "aios-llm_core", "aios.v1.LLMCore/Generate", trace_id)
    assert by_id[generation.parent_id].name == "syscall llm_generate"
    assert generation.attributes["aios.completion_tokens"] == chunks[-1].completion_tokens
    assert generation.attributes["aios.prompt_tokens"] > 0
