"""What seeing inside costs: the LLM workload with traces exported, against without, metrics scraped in both.

Two AIOS side by side (an idle one costs no CPU), one of them tracing: every service exports its spans to an OTLP
collector (bench/otlp_collector.py, a stub that keeps them in memory). A thread fetches every service's /metrics of
both each second, as Prometheus would, and times each fetch. (Scraping only one of them made that one 10-20% faster
on a 2-core EPYC VM, with tracing off in both: a cluster that is woken every second runs faster there. Scraping
both keeps the comparison fair; what a scrape costs is its own figure.) The same plan of 16 agents
(bench/workload.py, one round) runs on each, interleaved PAIRS times, each pair with a plan of its own so that
neither finds the other's prompts cached. The ratio is the median of the pairs' ratios. Throughput here moves more
than the 2% looked for from one run to the next, so the CPU time every AIOS process spent per generated token (from
/proc; the model's own compute included) is compared as well.
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

import aios
from bench.otlp_collector import OtlpCollectorStub
from bench.scale import process_cpu_seconds
from bench.workload import Call, plan
from deploy.cluster import Cluster, ClusterConfig

AGENTS = 16
PAIRS = 3
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


def run_observability_bench(say: Callable[[str], None], run_aios: Callable[[aios.Connection, list[list[Call]]], dict],
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
        scraper = stack.enter_context(Scraper([p.metrics for cluster in clusters.values()
                                               for p in cluster.processes.values() if p.metrics]))
        runs: dict[str, list[dict[str, Any]]] = {PLAIN: [], OBSERVED: []}
        for pair in range(PAIRS):
            calls = plan(AGENTS, 1, seed, f"observability-{pair}")
            for label in (PLAIN, OBSERVED) if pair % 2 == 0 else (OBSERVED, PLAIN):  # neither always goes first
                pids = [p.pid for p in clusters[label].processes.values()]
                cpu = sum(process_cpu_seconds(pid) for pid in pids)
                run = run_aios(kernels[label], calls)
                run["cpu_ms_per_token"] = 1000 * (sum(process_cpu_seconds(pid) for pid in pids) - cpu) / run["tokens"]
                runs[label].append(run)
            say(f"  pair {pair + 1}: {PLAIN} {runs[PLAIN][-1]['tok_per_s']:.1f} tok/s, {OBSERVED} "
                f"{runs[OBSERVED][-1]['tok_per_s']:.1f} tok/s")
    ratios = [observed["tok_per_s"] / plain["tok_per_s"] for plain, observed in zip(runs[PLAIN], runs[OBSERVED])]
    cpu = [observed["cpu_ms_per_token"] / plain["cpu_ms_per_token"] for plain, observed in zip(runs[PLAIN], runs[OBSERVED])]
    result.update({label: {"tok_per_s": statistics.median(r["tok_per_s"] for r in rows),
                           "cpu_ms_per_token": statistics.median(r["cpu_ms_per_token"] for r in rows), "runs": rows}
                   for label, rows in runs.items()})
    result.update({"observed_vs_plain": statistics.median(ratios), "observed_vs_plain_runs": ratios,
                   "cpu_per_token_observed_vs_plain": statistics.median(cpu), "cpu_per_token_runs": cpu,
                   "spans_received": len(collector.received()), "scrapes": scraper.scrapes,
                   "scrape_failures": scraper.failures,
                   "scrape_ms_p50": 1000 * statistics.median(scraper.seconds) if scraper.seconds else 0.0})
    return result


def observability_table(result: dict[str, Any]) -> str:
    runs = ", ".join(f"{r:.3f}" for r in result["observed_vs_plain_runs"])
    return (f"observability: {result['agents']} agents, {result['pairs']} interleaved pairs, metrics scraped every "
            f"{result['scrape_every_s']:.0f} s in both: {PLAIN} {result[PLAIN]['tok_per_s']:.1f} tok/s, {OBSERVED} "
            f"{result[OBSERVED]['tok_per_s']:.1f} tok/s; "
            f"ratio {result['observed_vs_plain']:.3f} (pairs: {runs}); CPU of all AIOS processes per token "
            f"{result[PLAIN]['cpu_ms_per_token']:.1f} vs {result[OBSERVED]['cpu_ms_per_token']:.1f} ms (observed/plain "
            f"{result['cpu_per_token_observed_vs_plain']:.3f}); {result['spans_received']} spans received, "
            f"{result['scrapes']} scrapes ({result['scrape_failures']} failed, {result['scrape_ms_p50']:.1f} ms each, "
            "p50)")
