"""Scraping a service's Prometheus metrics in the integration tests, parsed with prometheus-client's own parser."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from deploy.cluster import Cluster

Samples = dict[tuple[str, frozenset], float]


def scrape(cluster: Cluster, service: str) -> Samples:
    reply = httpx.get(f"http://{cluster.processes[service].metrics}/metrics", timeout=10)
    assert reply.status_code == 200
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(reply.text) for sample in family.samples}


def grew(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in after, f"{name}{labels} is not exported; exported: {sorted(k[0] for k in after)[:80]}"
    return after[key] - before.get(key, 0.0)
