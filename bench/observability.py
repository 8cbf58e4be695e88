"""What seeing inside costs: the LLM workload with traces exported, against without, metrics scraped in both.

Two AIOS side by side (an idle one costs no CPU), one of them tracing: every service exports its spans to an OTLP
collector (bench/otlp_collector.py, a stub that keeps them in memory). A thread fetches every service's /metrics of
both each second, as Prometheus would (but 15 times as often as its default). The same plan of 16 agents
(bench/workload.py, one round) runs on each, interleaved PAIRS times, each pair with a plan of its own so that
neither finds the other's prompts cached.

Throughput on this kind of machine (a shared 2-core VM) moves by 5-15% from one run to the next, even between two
identical AIOS run at once, so the ratio of the two throughputs (the median of the pairs') cannot show a 2% cost.
What decides is measured where the cost is spent: every process counts the CPU time of its own tracing (starting and
ending spans, their context, exports: aios_tracing_cpu_seconds_total) and of answering scrapes
(aios_metrics_scrape_cpu_seconds_total), per thread, so the machine's noise does not move them. Their share of all
the CPU the AIOS processes spent in a run is the throughput a CPU-bound machine gives up for them.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

from prometheus_client.parser import text_string_to_metric_families

import aios
from bench.otlp_collector import OtlpCollectorStub
from bench.workload import Call, plan
from deploy.cluster import Cluster, ClusterConfig

AGENTS = 8  # a CPU share does not need a full batch (16 agents measured the same share in twice the time)
PAIRS = 1  # the floor is a CPU share, steady from run to run; throughput pairs are too noisy here to show 2%
SCRAPE_EVERY_S = 1.0
PLAIN, OBSERVED = "metrics", "metrics + traces"


class Scraper:
    """Fetches every service's metrics every SCRAPE_EVERY_S, in a thread, until stopped."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses
        self.scrapes = 0
        self.failures = 0
        self.seconds: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(SCRAPE_EVERY_S):
            for address in self.addresses:
                try:
                    started = time.perf_counter()
                    urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read()
                    self.seconds.append(time.perf_counter() - started)
                    self.scrapes += 1
                except OSError:
                    self.failures += 1

    def __enter__(self) -> "Scraper":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


SEEING_INSIDE = ("aios_tracing_cpu_seconds_total", "aios_metrics_scrape_cpu_seconds_total")


def seeing_inside_cpu(cluster: Cluster) -> dict[str, float]:
    """CPU seconds all of `cluster`'s processes spent on tracing and on answering scrapes, from their metrics."""
    spent = dict.fromkeys(SEEING_INSIDE, 0.0)
    for process in cluster.processes.values():
        if process.metrics:
            text = urllib.request.urlopen(f"http://{process.metrics}/metrics", timeout=5).read().decode()
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name in spent:
                        spent[sample.name] += sample.value
    return spent


def run_observability_bench(say: Callable[[str], None],
                            run_aios: Callable[[aios.Connection, list[list[Call]], dict[str, int]], dict],
                            slots: int, seed: int) -> dict[str, Any]:
    result: dict[str, Any] = {"agents": AGENTS, "pairs": PAIRS, "scrape_every_s": SCRAPE_EVERY_S}
    with ExitStack() as stack:
        collector = stack.enter_context(OtlpCollectorStub())
        kernels: dict[str, aios.Connection] = {}
        clusters: dict[str, Cluster] = {}
        for label, endpoint in ((PLAIN, ""), (OBSERVED, collector.address)):
            home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="aios-bench-observability-")))
            say(f"observability: starting AIOS ({label}) ...")
            clusters[label] = stack.enter_context(Cluster(ClusterConfig(home=home, slots=slots,
                                                                        otlp_endpoint=endpoint)))
            kernels[label] = stack.enter_context(clusters[label].connect())
            kernels[label].register("bench-warm-up").complete("Hello", max_tokens=8, ignore_eos=True)
        # The first export loads the exporter's code and opens its channel: done before measuring, not in pair 1.
        if not collector.wait_for_spans(1, timeout=30):
            raise RuntimeError(f"no spans reached the OTLP collector stub at {collector.address} within 30 s")
        scraper = stack.enter_context(Scraper([p.metrics for cluster in clusters.values()
                                               for p in cluster.processes.values() if p.metrics]))
        runs: dict[str, list[dict[str, Any]]] = {PLAIN: [], OBSERVED: []}
        for pair in range(PAIRS):
            calls = plan(AGENTS, 1, seed, f"observability-{pair}")
            for label in (PLAIN, OBSERVED) if pair % 2 == 0 else (OBSERVED, PLAIN):  # neither always goes first
                inside = seeing_inside_cpu(clusters[label])
                pids = clusters[label].pids()
                run = run_aios(kernels[label], calls, pids)
                spent = {name: run["cpu_s"][name] for name in pids}  # AIOS's processes, not the agents' one
                cpu_s = sum(spent.values())
                run["cpu_ms_per_token"] = 1000 * cpu_s / run["tokens"]
                run["cpu_ms_per_token_by_service"] = {name: 1000 * s / run["tokens"] for name, s in spent.items()}
                after = seeing_inside_cpu(clusters[label])
                run["tracing_cpu_share"], run["scrape_cpu_share"] = (
                    (after[name] - inside[name]) / cpu_s for name in SEEING_INSIDE)
                runs[label].append(run)
            say(f"  pair {pair + 1}: {PLAIN} {runs[PLAIN][-1]['tok_per_s']:.1f} tok/s, {OBSERVED} "
                f"{runs[OBSERVED][-1]['tok_per_s']:.1f} tok/s")
    ratios = [observed["tok_per_s"] / plain["tok_per_s"] for plain, observed in zip(runs[PLAIN], runs[OBSERVED])]
    cpu = [observed["cpu_ms_per_token"] / plain["cpu_ms_per_token"] for plain, observed in zip(runs[PLAIN], runs[OBSERVED])]
    result.update({label: {"tok_per_s": statistics.median(r["tok_per_s"] for r in rows),
                           "cpu_ms_per_token": statistics.median(r["cpu_ms_per_token"] for r in rows), "runs": rows}
                   for label, rows in runs.items()})
    traced = runs[OBSERVED]
    result.update({"tracing_cpu_share": statistics.median(r["tracing_cpu_share"] for r in traced),
                   "scrape_cpu_share": statistics.median(r["scrape_cpu_share"] for r in traced),
                   "seeing_inside_cpu_share": statistics.median(r["tracing_cpu_share"] + r["scrape_cpu_share"]
                                                                for r in traced)})
    result.update({"observed_vs_plain": statistics.median(ratios), "observed_vs_plain_runs": ratios,
                   "cpu_per_token_observed_vs_plain": statistics.median(cpu), "cpu_per_token_runs": cpu,
                   "spans_received": len(collector.received()), "scrapes": scraper.scrapes,
                   "scrape_failures": scraper.failures,
                   "scrape_ms_p50": 1000 * statistics.median(scraper.seconds) if scraper.seconds else 0.0})
    return result


def observability_table(result: dict[str, Any]) -> str:
    runs = ", ".join(f"{r:.3f}" for r in result["observed_vs_plain_runs"])
    return (f"observability: CPU share spent seeing inside, traced AIOS, median of {result['pairs']} runs: "
            f"{100 * result['seeing_inside_cpu_share']:.2f}% (tracing {100 * result['tracing_cpu_share']:.2f}%, "
            f"scrapes every {result['scrape_every_s']:.0f} s {100 * result['scrape_cpu_share']:.2f}%)\n"
            f"observability: {result['agents']} agents, {result['pairs']} interleaved pairs, metrics scraped every "
            f"{result['scrape_every_s']:.0f} s in both: {PLAIN} {result[PLAIN]['tok_per_s']:.1f} tok/s, {OBSERVED} "
            f"{result[OBSERVED]['tok_per_s']:.1f} tok/s; "
            f"ratio {result['observed_vs_plain']:.3f} (pairs: {runs}); CPU of all AIOS processes per token "
            f"{result[PLAIN]['cpu_ms_per_token']:.1f} vs {result[OBSERVED]['cpu_ms_per_token']:.1f} ms (observed/plain "
            f"{result['cpu_per_token_observed_vs_plain']:.3f}); {result['spans_received']} spans received, "
            f"{result['scrapes']} scrapes ({result['scrape_failures']} failed, {result['scrape_ms_p50']:.1f} ms each, "
            "p50)")
