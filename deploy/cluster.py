"""Starts and stops a whole AIOS system on one machine: Redis plus one OS process per service.

Used by `aios up`, by the integration tests' fixtures and by the demo, so the
way the system is started is written once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

ENDPOINTS_FILE = "endpoints.json"
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0
# Services in start order; the kernel needs the others' addresses, so it is last.
MANAGERS = ("llm_core", "memory", "storage", "tools")
SERVICE_ORDER = (*MANAGERS, "kernel")


def default_home() -> Path:
    """Where `aios up` keeps endpoints, logs and data; the SDK looks here too."""
    return Path(os.environ.get("AIOS_HOME", Path.home() / ".aios"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ClusterConfig:
    home: Path = field(default_factory=default_home)
    # Use this Redis instead of starting one.
    redis_url: str | None = None
    # GGUF model; None means the bundled default.
    model: Path | None = None
    # LLM sequences decoded together (measured best on 2 cores: 16).
    slots: int = 16
    # Scheduling policy: fifo, rr, priority or fair.
    policy: str = "fifo"
    # Round robin / fair share time slice, in generated tokens.
    slice_tokens: int = 32
    # Extra command-line options per service, e.g. {"memory": ["--max-entry-bytes", "1024"]}.
    extra_args: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class ManagedProcess:
    name: str
    popen: subprocess.Popen
    log_path: Path
    address: str = ""

    @property
    def pid(self) -> int:
        return self.popen.pid


class StartError(RuntimeError):
    pass


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_healthy(address: str, timeout: float) -> None:
    """Blocks until the gRPC health check at `address` answers SERVING."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StartError(f"{address} did not report SERVING within {timeout:.0f} s")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=min(remaining, 5.0), wait_for_ready=True)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)  # a NOT_SERVING answer: its probes run every couple of seconds


class Cluster:
    def __init__(self, config: ClusterConfig, progress: Callable[[str], None] = lambda line: None) -> None:
        self.config = config
        self.progress = progress
        self.processes: dict[str, ManagedProcess] = {}
        self.redis_url = config.redis_url or ""
        self._args: dict[str, list[str]] = {}

    # ---- paths -----------------------------------------------------------------------

    @property
    def logs(self) -> Path:
        return self.config.home / "logs"

    @property
    def data(self) -> Path:
        return self.config.home / "data"

    @property
    def endpoints_path(self) -> Path:
        return self.config.home / ENDPOINTS_FILE

    @property
    def kernel_address(self) -> str:
        return self.processes["kernel"].address

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> dict[str, str]:
        """Starts Redis (unless given) and every service; returns name -> address."""
        self.logs.mkdir(parents=True, exist_ok=True)
        self.data.mkdir(parents=True, exist_ok=True)
        self.data.chmod(0o700)  # agents' data: not readable by the tool sandbox's uids
        try:
            if not self.redis_url:
                self._start_redis()
            for name in SERVICE_ORDER:
                self._start_service(name)
        except BaseException:
            self.stop()
            raise
        self._write_endpoints()
        return self.endpoints()

    def endpoints(self) -> dict[str, str]:
        return {name: p.address for name, p in self.processes.items() if name != "redis"}

    def stop(self) -> None:
        """Stops services in reverse order (kernel first), then Redis; leaves no process behind."""
        for name in reversed(list(self.processes)):
            self.stop_service(name)
        self.endpoints_path.unlink(missing_ok=True)

    def stop_service(self, name: str, sig: int = signal.SIGTERM) -> None:
        process = self.processes.pop(name, None)
        if process is None:
            return
        terminate_group(process.pid, sig)
        try:
            process.popen.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            terminate_group(process.pid, signal.SIGKILL)
            process.popen.wait()
        self.progress(f"stopped {name} (pid {process.pid})")

    def add_replica(self, name: str, kind: str, extra_args: list[str] = ()) -> str:
        """Starts another instance of a service (e.g. a second LLM core on the same Redis); returns its address."""
        self._start_service(name, kind, list(extra_args))
        return self.processes[name].address

    def restart_service(self, name: str) -> str:
        """Starts a stopped service again on the address it had, so its clients reconnect."""
        self._start_service(name)
        return self.processes[name].address

    def __enter__(self) -> "Cluster":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- internals -------------------------------------------------------------------

    def _start_redis(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise StartError("redis-server is not installed (make install does it), or pass a Redis URL")
        port = free_port()
        (self.data / "redis").mkdir(exist_ok=True)
        log_path = self.logs / "redis.log"
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.data / "redis")]
        popen = subprocess.Popen(argv, stdout=log_path.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
        self.processes["redis"] = ManagedProcess("redis", popen, log_path, f"127.0.0.1:{port}")
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=1)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if popen.poll() is not None or time.monotonic() > deadline:
                    raise StartError(f"redis-server did not start:\n{_log_tail(log_path)}") from None
                time.sleep(0.05)  # redis-server is not accepting yet
        client.close()
        self.progress(f"started redis        {self.redis_url}  (pid {popen.pid})")

    def _service_args(self, name: str, kind: str) -> list[str]:
        config = self.config
        args = ["--redis-url", self.redis_url] if kind in ("llm_core", "kernel") else []
        if kind == "llm_core":
            args += ["--slots", str(config.slots)]
            if config.model:
                args += ["--model", str(config.model)]
        elif kind in ("storage", "memory"):
            args += ["--data-dir", str(self.data / name)]  # a replica gets its own
        elif kind == "tools":
            args += ["--storage", self.processes["storage"].address]
        elif kind == "kernel":
            args += ["--policy", config.policy, "--slice-tokens", str(config.slice_tokens), "--llm-slots", str(config.slots)]
            for manager in MANAGERS:
                args += [f"--{manager.replace('_', '-')}", self.processes[manager].address]
        return args + config.extra_args.get(kind, [])

    def _start_service(self, name: str, kind: str = "", extra_args: list[str] = ()) -> None:
        kind = kind or name
        ready = self.config.home / f"{name}.ready"
        ready.unlink(missing_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        args = self._args.get(name) or ["--port", "0", *self._service_args(name, kind), *extra_args]
        log_path = self.logs / f"{name}.log"
        argv = [sys.executable, "-m", f"services.{'scheduler' if kind == 'kernel' else kind}",
                "--ready-file", str(ready), *args]
        started = time.monotonic()
        popen = subprocess.Popen(argv, stdout=log_path.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
        process = ManagedProcess(name, popen, log_path)
        self.processes[name] = process
        deadline = started + START_TIMEOUT_S
        while not ready.exists():
            if popen.poll() is not None:
                raise StartError(f"{name} exited with code {popen.returncode} while starting:\n{_log_tail(log_path)}")
            if time.monotonic() > deadline:
                raise StartError(f"{name} did not start within {START_TIMEOUT_S:.0f} s:\n{_log_tail(log_path)}")
            time.sleep(0.05)  # waiting for the child to bind and write its ready file
        process.address = json.loads(ready.read_text())["address"]
        ready.unlink()
        # A restart reuses the port so clients' channels reconnect to the same address.
        self._args[name] = ["--port", process.address.rsplit(":", 1)[1], *args[2:]]
        wait_healthy(process.address, START_TIMEOUT_S)
        self.progress(f"started {name:<12} {process.address}  (pid {popen.pid}, {time.monotonic() - started:.1f} s)")

    def _write_endpoints(self) -> None:
        state = {
            "kernel": self.kernel_address,
            "services": self.endpoints(),
            "redis_url": self.redis_url,
            "pids": {name: p.pid for name, p in self.processes.items()},
            "started_at": time.time(),
        }
        tmp = self.endpoints_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.endpoints_path)


def terminate_group(pid: int, sig: int) -> None:
    """Signals a service's process group (each service leads its own session)."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def process_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie whose parent has not reaped it counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def read_endpoints(home: Path | None = None) -> dict:
    path = (home or default_home()) / ENDPOINTS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no running AIOS found ({path} is missing); start one with `aios up`")
    return json.loads(path.read_text())
