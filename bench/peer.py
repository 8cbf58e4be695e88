"""The peer a user would run instead of AIOS: llama.cpp's own `llama-server`, built from the same sources.

`build()` compiles the server from the llama.cpp that the installed llama-cpp-python vendors (its sdist from
PyPI, CMake + Ninja, Release, default CPU flags as pip's build of llama-cpp-python uses), once, into
~/.cache/aios/llama-server-<version>/; later runs reuse the binary. `LlamaServer` runs it on the bundled model
with `--parallel` sequences and the same context per sequence as the AIOS core, weight repacking off as in
`services/llm_core/model.py` (`use_extra_bufts = False`), and `complete()` sends one `/completion` request.
`python -m bench.peer` builds it and prints where it is.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable

from services.tools.builtin import evaluate

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "aios"


def binary_path() -> Path:
    return CACHE / f"llama-server-{version('llama_cpp_python')}" / "llama-server"


def _run(argv: list[str], say: Callable[[str], None], cwd: Path | None = None) -> None:
    """Runs a build step, relaying its progress lines ([12/345] ...) every 10% so a long build shows progress."""
    process = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    tail: list[str] = []
    shown = -1
    for line in process.stdout:
        tail = (tail + [line.rstrip()])[-30:]
        if line.startswith("[") and "/" in line.split("]", 1)[0]:
            done, total = line[1:].split("]", 1)[0].split("/")
            tenth = int(done) * 10 // max(int(total), 1)
            if tenth > shown:
                shown = tenth
                say(f"  llama-server build: {line.split(']', 1)[0]}] ({tenth * 10}%)")
    if process.wait() != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} ... failed:\n" + "\n".join(tail))


def build(say: Callable[[str], None] = print) -> Path:
    """The llama-server binary of the installed llama-cpp-python's llama.cpp, built on first use."""
    target = binary_path()
    if target.is_file():
        return target
    release = version("llama_cpp_python")
    say(f"building llama-server {release} (once, ~10-20 min on 2 cores) into {target.parent}")
    with tempfile.TemporaryDirectory(prefix="aios-llama-server-") as work:
        workdir = Path(work)
        say(f"  downloading the llama-cpp-python {release} sdist")
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
              f"llama-cpp-python=={release}", "-d", str(workdir)], say)
        [sdist] = workdir.glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(sdist) as archive:
            members = [m for m in archive.getmembers() if "/vendor/llama.cpp/" in m.name]
            archive.extractall(workdir, members=members, filter="data")
        [source] = workdir.glob("llama_cpp_python-*/vendor/llama.cpp")
        build_dir = workdir / "build"
        say("  configuring (CMake, Ninja, Release, server only, no web UI download)")
        _run(["cmake", "-S", str(source), "-B", str(build_dir), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
              "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_TESTS=OFF",
              "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
              "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF"], say)
        _run(["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", str(os.cpu_count() or 2)], say)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        shutil.copy2(build_dir / "bin" / "llama-server", partial)
        partial.replace(target)
    say(f"  llama-server ready: {target}")
    return target


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """One llama-server process on the bundled model: `--parallel` sequences of `context` tokens each."""

    def __init__(self, binary: Path, model: Path, parallel: int, context: int, threads: int, log: Path,
                 draft_tokens: int = 0) -> None:
        """`draft_tokens` > 0: speculative decoding by prompt lookup (`--spec-type ngram-simple`), drafts of up to
        that many tokens after a 3-gram match, as AIOS's `--draft-tokens` does."""
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [str(binary), "--model", str(model), "--host", "127.0.0.1", "--port", str(self.port),
                "--parallel", str(parallel), "--ctx-size", str(parallel * context), "--no-kv-unified",
                "--threads", str(threads), "--threads-batch", str(threads), "--batch-size", "512",
                "--ubatch-size", "512", "--no-repack", "--no-webui"]
        if draft_tokens:
            argv += ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "3",
                     "--spec-ngram-simple-size-m", str(draft_tokens), "--spec-draft-n-max", str(draft_tokens)]
        self.log = log.open("wb")
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self._wait_healthy()
        except BaseException:
            self.close()
            raise

    def _wait_healthy(self, within_s: float = 120.0) -> None:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.process.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)  # polling another process's readiness
        raise RuntimeError(f"llama-server not healthy within {within_s:.0f} s; see {self.log.name}")

    def complete(self, prompt: str, max_tokens: int) -> dict[str, Any]:
        """One greedy completion of exactly `max_tokens` tokens, the prompt's cached prefix reused."""
        body = json.dumps({"prompt": prompt, "n_predict": max_tokens, "temperature": 0.0, "top_k": 1,
                           "ignore_eos": True, "cache_prompt": True, "stream": False}).encode()
        request = urllib.request.Request(f"{self.url}/completion", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as reply:
            return json.loads(reply.read())

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()

    def __enter__(self) -> "LlamaServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    print(build(lambda line: print(line, flush=True)))


def run_peer(server: LlamaServer, calls: list[list[Any]]) -> dict[str, Any]:
    """The workload plan against llama-server as `bench.run.run_aios` runs it against AIOS, one client thread per
    agent (blocked in plain socket reads, which cost no CPU while waiting): each call a `/completion` of exactly
    max_tokens tokens; the memory note and the calculator action done in the agent's own process (what a user of a
    bare model server does)."""
    barrier = threading.Barrier(len(calls))

    def agent_loop(agent_calls: list[Any]) -> dict[str, Any]:
        notes: list[str] = []
        latencies: list[float] = []
        tokens = prefilled = reused = drafted = accepted = 0
        barrier.wait()
        start = time.monotonic()
        for call in agent_calls:
            t0 = time.monotonic()
            reply = server.complete(call.prompt, call.max_tokens)
            latencies.append(time.monotonic() - t0)
            tokens += reply["tokens_predicted"]
            prefilled += reply["timings"]["prompt_n"]
            reused += reply["timings"].get("cache_n", 0)
            drafted += reply["timings"].get("draft_n", 0)
            accepted += reply["timings"].get("draft_n_accepted", 0)
            notes.append(f"round {call.round}: {reply['content'][:200]}")
            evaluate(f"{call.a} * {call.b}")
        return {"tokens": tokens, "prefilled": prefilled, "reused": reused, "drafted": drafted, "accepted": accepted,
                "start": start,
                "end": time.monotonic(), "latencies": latencies}

    with ThreadPoolExecutor(len(calls)) as pool:
        per_agent = list(pool.map(agent_loop, calls))
    wall = max(a["end"] for a in per_agent) - min(a["start"] for a in per_agent)
    latencies = sorted(x for a in per_agent for x in a["latencies"])
    tokens = sum(a["tokens"] for a in per_agent)
    return {"tokens": tokens, "wall_s": wall, "tok_per_s": tokens / wall,
            "llm_latency_p50_s": latencies[len(latencies) // 2],
            "llm_latency_p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
            "prefill_tokens": sum(a["prefilled"] for a in per_agent),
            "prefill_tokens_saved": sum(a["reused"] for a in per_agent),
            "draft_tokens": sum(a["drafted"] for a in per_agent),
            "draft_tokens_accepted": sum(a["accepted"] for a in per_agent)}
