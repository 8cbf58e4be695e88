"""Seeing inside a running AIOS: Prometheus metrics of every service (services/metrics.py), scraped over HTTP from
the real processes while an agent works, parsed with prometheus-client's own parser and checked against what the
test did; `aios top`, `aios status --json` and `aios logs` as a user runs them."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import aios
from aios.batched import CallBatcher, CallFailed
from aios.v1 import kernel_pb2
from deploy.cluster import Cluster
from services.scheduler.metrics import TOP_AGENTS
from tests.integration.scraping import Samples, grew, scrape


def summed(samples: Samples, name: str) -> float:
    """A metric over all its label values."""
    return sum(value for (sample, _), value in samples.items() if sample == name)


SERVICES = ["kernel", "llm_core", "memory", "storage", "tools", "gateway"]


def test_every_service_lists_its_metrics_port_and_counts_what_an_agent_did(cluster: Cluster, agent: aios.Agent):
    endpoints = json.loads(cluster.endpoints_path.read_text())
    assert set(SERVICES) <= set(endpoints["metrics"]), endpoints["metrics"]
    before = {service: scrape(cluster, service) for service in SERVICES}

    entries = [agent.memory_add(f"metrics note {i}") for i in range(3)]
    with pytest.raises(aios.SyscallError) as missing:
        agent.memory_get(entries[0].id.rsplit("-", 1)[0] + "-999999")
    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    data = b"x" * 1234
    agent.storage_write("metrics/one", data)
    agent.storage_write("metrics/two", data)
    assert agent.call_tool("calculator", expression="2+3")["result"] == 5
    chunks = list(agent.generate("Say hello.", max_tokens=4))
    generated = chunks[-1].completion_tokens
    assert 1 <= generated <= 4
    models = httpx.get(f"{cluster.openai_base_url}/models", headers={"Authorization": f"Bearer {agent.token}"})
    assert models.status_code == 200
    assert httpx.get(f"{cluster.openai_base_url}/made-up/{secrets.token_hex(4)}").status_code == 404

    after = {service: scrape(cluster, service) for service in SERVICES}
    kernel = before["kernel"], after["kernel"]
    assert grew(*kernel, "aios_syscalls_total", kind="memory_add", code="OK") == 3
    assert grew(*kernel, "aios_syscalls_total", kind="memory_get", code="NOT_FOUND") == 1
    assert grew(*kernel, "aios_syscalls_total", kind="storage_write", code="OK") == 2
    assert grew(*kernel, "aios_syscalls_total", kind="tool_call", code="OK") == 1
    assert grew(*kernel, "aios_syscalls_total", kind="llm_generate", code="OK") == 1
    assert grew(*kernel, "aios_syscall_duration_seconds_count", kind="memory_add") == 3
    assert grew(*kernel, "aios_syscall_duration_seconds_bucket", kind="memory_add", le="+Inf") == 3
    assert grew(*kernel, "aios_syscall_queue_wait_seconds_count", resource="storage") == 2
    assert grew(*kernel, "aios_generated_tokens_total") == generated
    top = {dict(labels)["agent"]: value for (name, labels), value in after["kernel"].items()
           if name == "aios_agent_tokens_generated"}  # the agents that generated most, this one if it is among them
    assert 0 < len(top) <= TOP_AGENTS and (top.get(agent.id, 0) >= generated or generated <= min(top.values()))
    assert summed(after["kernel"], "aios_kernel_llm_core_dispatched_total") - \
        summed(before["kernel"], "aios_kernel_llm_core_dispatched_total") == 1
    assert after["kernel"][("aios_queue_depth", frozenset({("resource", "llm"), ("tool", "")}))] == 0

    # The managers count the calls the kernel made of them (batched ones too), under their unary method's name.
    memory = before["memory"], after["memory"]
    assert grew(*memory, "aios_rpc_total", method="/aios.v1.Memory/Add", code="OK") == 3
    assert grew(*memory, "aios_rpc_total", method="/aios.v1.Memory/Get", code="NOT_FOUND") == 1
    assert grew(*memory, "aios_memory_entries") == 3
    assert grew(*(before["storage"], after["storage"]), "aios_storage_stored_bytes") == 2 * len(data)
    assert grew(*(before["tools"], after["tools"]), "aios_tool_calls_total", tool="calculator") == 1
    assert grew(*(before["llm_core"], after["llm_core"]), "aios_llm_core_tokens_generated_total") == generated
    gateway = before["gateway"], after["gateway"]
    assert grew(*gateway, "aios_http_requests_total", method="GET /v1/models", code="200") == 1
    assert grew(*gateway, "aios_http_requests_total", method="GET (unmatched)", code="404") == 1
    assert after["kernel"][("process_resident_memory_bytes", frozenset())] > 0
    for service in SERVICES:  # what seeing inside costs each process: scrapes counted, no tracing configured here
        assert grew(before[service], after[service], "aios_metrics_scrapes_total") == 1
        assert after[service][("aios_metrics_scrape_cpu_seconds_total", frozenset())] > 0
        assert after[service][("aios_tracing_spans_total", frozenset())] == 0


def test_made_up_method_names_do_not_grow_the_metrics(cluster: Cluster, agent: aios.Agent):
    """A hostile caller naming methods that do not exist (on the kernel's Batched stream, or paths on the gateway)
    gets UNIMPLEMENTED / 404, and every such call counts under one label: it cannot make a series per name."""
    names = [f"Nope{secrets.token_hex(6)}" for _ in range(20)]

    async def calls() -> list:
        async with grpc.aio.insecure_channel(cluster.kernel_address) as channel:
            batcher = CallBatcher(channel, kernel_pb2.DESCRIPTOR.services_by_name["Kernel"])
            return await asyncio.gather(*(batcher.call(name, kernel_pb2.WhoAmIRequest(), 10, f"Bearer {agent.token}")
                                          for name in names), return_exceptions=True)

    before = scrape(cluster, "kernel")
    results = asyncio.run(calls())
    assert all(isinstance(r, CallFailed) and r.code == grpc.StatusCode.UNIMPLEMENTED for r in results), results
    after = scrape(cluster, "kernel")
    assert grew(before, after, "aios_rpc_total", method="/aios.v1.Kernel/(unknown)", code="UNIMPLEMENTED") == 20
    assert not any(name in label for key in after for _, label in key[1] for name in names)


def test_aios_top_and_status_json_show_the_busiest_agents_from_another_host(cluster: Cluster, agent: aios.Agent):
    """`aios top --once` and `aios status --json` against a kernel named by address, with the operator token in
    $AIOS_TOKEN and no local home (as on another host); an agent's token gets no one else's activity."""
    for _ in range(3):
        agent.memory_add("seen by top")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AIOS_")},
           "AIOS_HOME": "/nonexistent", "AIOS_TOKEN": cluster.operator_token}
    aios_cli = [sys.executable, "-m", "deploy.cli"]
    top = subprocess.run([*aios_cli, "top", "--once", "--kernel", cluster.kernel_address, "--filter", agent.name[:20]],
                         env=env, capture_output=True, text=True, timeout=60)
    assert top.returncode == 0, top.stderr
    assert agent.id in top.stdout and "queues" in top.stdout and "llm_core" in top.stdout
    status = subprocess.run([*aios_cli, "status", "--json", "--kernel", cluster.kernel_address],
                            env=env, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    kernel = json.loads(status.stdout)["kernel"]
    mine = [row for row in kernel["activity"] if row["agent_id"] == agent.id]
    assert len(mine) == 1 and int(mine[0]["finished"]) == 3 and mine[0]["name"] == agent.name
    assert {q["policy"] for q in kernel["queues"]} and "wait_p99_seconds" in json.dumps(kernel["queues"])
    # An agent's own view has no one's activity, its own neither: activity is the operator's.
    as_agent = subprocess.run([*aios_cli, "status", "--json", "--kernel", cluster.kernel_address],
                              env={**env, "AIOS_TOKEN": agent.token}, capture_output=True, text=True, timeout=60)
    assert as_agent.returncode == 0, as_agent.stderr
    assert "activity" not in json.loads(as_agent.stdout)["kernel"]


def test_aios_logs_shows_each_services_json_events_and_filters_them(cluster: Cluster):
    forged = aios.connect(cluster.kernel_address, token="aios-agent-" + secrets.token_hex(16))
    with pytest.raises(aios.SyscallError):
        forged.status()
    forged.close()
    aios_cli = [sys.executable, "-m", "deploy.cli", "--home", str(cluster.config.home)]
    shown = subprocess.run([*aios_cli, "logs", "kernel", "--json", "--level", "WARNING"], capture_output=True,
                           text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    events = [json.loads(line) for line in shown.stdout.splitlines()]
    assert events and all(e["service"] == "kernel" and e["level"] in ("WARNING", "ERROR") for e in events)
    assert any("refused unauthenticated: GetStatus" in e["message"] for e in events)
    every = subprocess.run([*aios_cli, "logs", "--json"], capture_output=True, text=True, timeout=60)
    assert every.returncode == 0, every.stderr
    assert {"kernel", "memory", "llm_core"} <= {json.loads(line)["service"] for line in every.stdout.splitlines()}


def test_a_traceparent_sent_to_the_gateway_names_the_trace_in_the_syscall_record(cluster: Cluster, agent: aios.Agent):
    """An OpenTelemetry-traced HTTP client's traceparent reaches the kernel through the gateway (this AIOS exports
    no spans: the record still names the caller's trace); a malformed one is dropped, not passed on."""
    def chat(traceparent: str) -> str:
        reply = httpx.post(f"{cluster.openai_base_url}/chat/completions", timeout=120,
                           headers={"Authorization": f"Bearer {agent.token}", "traceparent": traceparent},
                           json={"model": cluster.served_model_name, "max_tokens": 2,
                                 "messages": [{"role": "user", "content": "Hi"}]})
        assert reply.status_code == 200, reply.text
        return agent.syscalls(kind="llm_generate", limit=1).syscalls[0].trace_id

    trace_id = secrets.token_hex(16)
    assert chat(f"00-{trace_id}-{secrets.token_hex(8)}-01") == trace_id
    assert chat("00-not-a-trace-01") == ""


def test_every_metric_the_grafana_dashboard_queries_is_exported(cluster: Cluster):
    """deploy/grafana/aios-dashboard.json cannot rot silently: each metric its queries name is one a service serves."""
    dashboard = json.loads((Path(__file__).parents[2] / "deploy" / "grafana" / "aios-dashboard.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"\b((?:aios|process)_[a-z_]+)\b", target["expr"])}
    exported = set()
    for service in SERVICES:  # families with no samples yet count too (no agent generated anything, say)
        text = httpx.get(f"http://{cluster.processes[service].metrics}/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            exported |= {family.name, f"{family.name}_total", f"{family.name}_bucket"} | {s.name for s in family.samples}
    assert queried and queried <= exported, sorted(queried - exported)
