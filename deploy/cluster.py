"""Starts and stops a whole AIOS system on one machine: Redis plus one OS process per service.

Used by `aios up`, by the integration tests' fixtures and by the demo, so the
way the system is started is written once.

What it keeps in the AIOS home (mode 0700):
- `operator.token` (0600): the operator's credential; the SDK and the CLI pick it up.
- `secrets/` (0700): `cluster.secret` (the managers accept only callers that show it),
  `redis.password` and `redis.url` (the AIOS user of Redis), `redis.conf`. Services get the
  paths of these files on their command lines, never the secrets.
- `data/`: Redis's append-only file (agents, tokens), memory and storage databases.
- `endpoints.json`, `logs/`.
Every secret is made once and kept, so `aios down` / `aios up` keeps every agent, token and byte.
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
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.credentials import (
    CLUSTER_SECRET_PREFIX,
    OPERATOR_TOKEN_PREFIX,
    bearer_metadata,
    certificate_host,
    ensure_secret,
    read_secret,
    token_hash,
    write_secret,
)

ENDPOINTS_FILE = "endpoints.json"
OPERATOR_TOKEN_FILE = "operator.token"
REDIS_USER = "aios"
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0
# Services in start order; the kernel needs the others' addresses, so it is last.
MANAGERS = ("llm_core", "memory", "storage", "tools")
# The services agents connect to: started again on the port they had in the home's last run when it is free.
AGENT_FACING = ("kernel", "gateway")
# The kernel needs the managers' addresses, the gateway the kernel's.
SERVICE_ORDER = (*MANAGERS, "kernel", "gateway")
# What a kind of service needs serving before it starts (their addresses are on its command line); the others start
# side by side: the LLM core loads its model while the managers import.
NEEDS = {"tools": ("storage",), "kernel": MANAGERS, "gateway": ("kernel",)}


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
    # LLM sequences decoded together by each LLM core (measured best on 2 cores: 16).
    slots: int = 16
    # LLM core processes started here (llm_core, llm_core_2, ...), each on its own port; the kernel routes between them.
    llm_cores: int = 1
    # LLM cores started elsewhere (`python -m services.llm_core` on another machine, same Redis, same cluster secret
    # and --slots) that the kernel routes to as well: HOST:PORT each.
    attached_llm_cores: tuple[str, ...] = ()
    # llama.cpp threads per LLM core (None: the core's default, every CPU).
    llm_threads: int | None = None
    # Memory and storage shards (memory, memory_2, ...; each its own process and SQLite directory). Changing them for
    # a home that has data takes `aios reshard` first (deploy/reshard.py).
    memory_shards: int = 1
    storage_shards: int = 1
    # Scheduling policy: fifo, rr, priority or fair.
    policy: str = "fifo"
    # Round robin / fair share time slice, in generated tokens.
    slice_tokens: int = 32
    # Extra command-line options per service, e.g. {"memory": ["--max-entry-bytes", "1024"]}.
    extra_args: dict[str, list[str]] = field(default_factory=dict)
    # Where the kernel listens (HOST:PORT); default loopback on a free port.
    listen: str = "127.0.0.1:0"
    # Serve the kernel with TLS: PEM certificate and key.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Let anyone who reaches the kernel register an agent (trusted single-user machines only).
    open_registration: bool = False
    # Where the OpenAI-compatible gateway listens (HOST:PORT); default loopback on a free port.
    gateway_listen: str = "127.0.0.1:0"
    # Services that keep a hot standby (a second process, model loaded, waiting): when the primary dies, the
    # supervisor promotes it instead of starting a process and loading a model. ("llm_core",) or ().
    standby: tuple[str, ...] = ()
    # How long a primary serves before its standby starts loading beside it.
    standby_after_s: float = 10.0
    # Send every service's OpenTelemetry traces to this OTLP/gRPC collector (HOST:PORT); "" traces nothing (unless
    # OTEL_EXPORTER_OTLP_ENDPOINT is set in the environment the services inherit).
    otlp_endpoint: str = ""


@dataclass
class ManagedProcess:
    name: str
    popen: subprocess.Popen
    log_path: Path
    address: str = ""
    metrics: str = ""  # host:port of its Prometheus metrics (GET /metrics), "" if it serves none
    started: float = field(default_factory=time.monotonic)

    def served(self, ready: Path) -> None:
        """Takes the addresses from the ready file the process wrote once serving."""
        written = json.loads(ready.read_text())
        self.address, self.metrics = written["address"], written.get("metrics", "")

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


class _WithMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds fixed metadata (a credential) to every call of a synchronous channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.metadata = metadata

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return details._replace(metadata=[*(details.metadata or ()), *self.metadata])  # type: ignore[attr-defined]

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)


def http_healthy(address: str, timeout: float = 5.0) -> bool:
    """Whether `GET http://address/health` answers 200 (the gateway does once the kernel it fronts answers)."""
    try:
        with urllib.request.urlopen(f"http://{address}/health", timeout=timeout) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_http_healthy(address: str, timeout: float) -> None:
    """Blocks until `address`'s HTTP health check answers 200."""
    deadline = time.monotonic() + timeout
    while not http_healthy(address):
        if time.monotonic() > deadline:
            raise StartError(f"http://{address}/health did not answer 200 within {timeout:.0f} s")
        time.sleep(0.1)  # the kernel it fronts is not serving yet


def wait_healthy(address: str, timeout: float, root_certificates: bytes | None = None, server_name: str | None = None) -> None:
    """Blocks until the gRPC health check at `address` answers SERVING (over TLS with `root_certificates`)."""
    from aios.client import open_channel

    deadline = time.monotonic() + timeout
    with open_channel(address, root_certificates, server_name, options=[]) as channel:
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
        self.standbys: dict[str, ManagedProcess] = {}  # hot standbys, by the name of the service they stand in for
        self.redis_url = config.redis_url or ""
        self._args: dict[str, list[str]] = {}
        self._kinds: dict[str, str] = {}  # service name -> what it runs (llm_core_2 runs an llm_core)
        self._launched: dict[str, tuple[Path, list[str]]] = {}  # started, not yet serving: its ready file, its options
        self._home_ready = False
        self.started_at = time.time()

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
    def ports_path(self) -> Path:
        """The agent-facing ports of the last run (kept by `aios down`): the next `aios up` takes them again."""
        return self.config.home / "ports.json"

    @property
    def secrets(self) -> Path:
        return self.config.home / "secrets"

    @property
    def operator_token_path(self) -> Path:
        return self.config.home / OPERATOR_TOKEN_FILE

    @property
    def operator_token(self) -> str:
        return read_secret(self.operator_token_path)

    @property
    def cluster_secret(self) -> str:
        return read_secret(self.secrets / "cluster.secret")

    @property
    def kernel_address(self) -> str:
        return self.processes["kernel"].address

    def connect(self, token: str | None = None) -> Any:
        """An SDK connection to this system's kernel, with `token` (default: the operator's)."""
        import aios

        cert = self.config.tls_cert.read_bytes() if self.config.tls_cert else None
        return aios.connect(self.kernel_address, token=token or self.operator_token, root_certificates=cert)

    def manager_channel(self, name: str) -> grpc.Channel:
        """A channel to a manager that carries the cluster credential, as the kernel's calls do (tests, tools)."""
        channel = grpc.insecure_channel(self.processes[name].address)
        return grpc.intercept_channel(channel, _WithMetadata(bearer_metadata(self.cluster_secret)))

    # ---- lifecycle -------------------------------------------------------------------

    def start(self, supervisor_pid: int | None = None) -> dict[str, str]:
        """Starts Redis (unless given) and every service; returns name -> address.

        `supervisor_pid`: the process that watches the services (a foreground `aios up`); `aios down` asks it
        to stop them, so that it exits too."""
        self._prepare_home()
        check_layout(self.config.home, self.shard_counts)
        try:
            if self.config.redis_url:
                write_secret(self.secrets / "redis.url", self.config.redis_url)
            else:
                self._start_redis()
            for kind in SERVICE_ORDER:
                for needed in NEEDS.get(kind, ()):
                    for name in self.names_of(needed):
                        self._serving(name)
                for name in self.names_of(kind):
                    self._launch(name, kind)
            for name in list(self._launched):
                self._serving(name)
            write_layout(self.config.home, self.shard_counts)
        except BaseException:
            self.stop()
            raise
        self.write_endpoints(supervisor_pid)
        return self.endpoints()

    def _prepare_home(self) -> None:
        """The home (0700: endpoints, logs and data are nobody else's business) and its secrets, made once."""
        if self._home_ready:
            return
        home = self.config.home
        home.mkdir(parents=True, exist_ok=True)
        home.chmod(0o700)
        for directory in (self.logs, self.data, self.secrets):
            directory.mkdir(exist_ok=True)
            directory.chmod(0o700)
        ensure_secret(self.operator_token_path, OPERATOR_TOKEN_PREFIX)
        ensure_secret(self.secrets / "cluster.secret", CLUSTER_SECRET_PREFIX)
        self._home_ready = True

    def endpoints(self) -> dict[str, str]:
        return {name: p.address for name, p in self.processes.items() if name != "redis"}

    def stop(self) -> None:
        """Stops services in reverse order (kernel first), then Redis; leaves no process behind."""
        for name, standby in list(self.standbys.items()):
            self._terminate(standby)
            del self.standbys[name]
        for name in reversed(list(self.processes)):
            self.stop_service(name)
        self.endpoints_path.unlink(missing_ok=True)

    def stop_service(self, name: str, sig: int = signal.SIGTERM) -> None:
        process = self.processes.pop(name, None)
        self._launched.pop(name, None)
        if process is None:
            return
        self._terminate(process, sig)
        self.progress(f"stopped {name} (pid {process.pid})")

    @staticmethod
    def _terminate(process: ManagedProcess, sig: int = signal.SIGTERM) -> None:
        terminate_group(process.pid, sig)
        try:
            process.popen.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            terminate_group(process.pid, signal.SIGKILL)
            process.popen.wait()

    def add_replica(self, name: str, kind: str, extra_args: list[str] = ()) -> str:
        """Starts another instance of a service (e.g. a second LLM core on the same Redis); returns its address."""
        self._start_service(name, kind, list(extra_args))
        return self.processes[name].address

    def restart_service(self, name: str) -> str:
        """Starts a stopped service again on the address it had, so its clients reconnect: by promoting its hot
        standby if it has one ready, else as a new process."""
        if name == "redis":
            self._start_redis()
        elif not self._promote(name):
            self._start_service(name)
        return self.processes[name].address

    def keep_standbys(self) -> bool:
        """Starts a hot standby for each service `config.standby` names that has none, once its primary has
        served `config.standby_after_s` (a standby loading its model right after a recovery would slow it down). Returns
        whether it started one."""
        started = False
        for name in self.config.standby:
            primary, standby = self.processes.get(name), self.standbys.get(name)
            if primary is None or primary.popen.poll() is not None or time.monotonic() - primary.started < self.config.standby_after_s:
                continue
            if standby is not None and (standby.popen.poll() is None
                                        or time.monotonic() - standby.started < self.config.standby_after_s):
                continue  # standing by, or died lately: not another model load every tick
            marker = self.config.home / f"{name}.standby"
            marker.unlink(missing_ok=True)
            argv = [*self._argv(self._kinds.get(name, name), self._standby_ready_path(name), self._args[name]), "--standby-file", str(marker)]
            log_path = self.logs / f"{name}.log"
            popen = subprocess.Popen(argv, stdout=log_path.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
            self.standbys[name] = ManagedProcess(f"{name} standby", popen, log_path)
            self.progress(f"started a standby for {name} (pid {popen.pid})")
            started = True
        return started

    def standby_ready(self, name: str) -> bool:
        """Whether `name` has a standby that finished loading and waits to be promoted."""
        standby = self.standbys.get(name)
        return standby is not None and standby.popen.poll() is None and (self.config.home / f"{name}.standby").exists()

    def _standby_ready_path(self, name: str) -> Path:
        return self.config.home / f"{name}.standby.ready"

    def _promote(self, name: str) -> bool:
        """Makes `name`'s standby the service (SIGUSR1: it binds the dead primary's port); False if it has none
        ready, or it fails."""
        if not self.standby_ready(name):
            return False
        standby, ready = self.standbys.pop(name), self._standby_ready_path(name)
        os.kill(standby.pid, signal.SIGUSR1)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready.exists():
            if standby.popen.poll() is not None or time.monotonic() > deadline:
                self._terminate(standby)
                return False
            time.sleep(0.01)  # waiting for it to bind and write its ready file
        standby.served(ready)
        ready.unlink()
        try:
            wait_healthy(standby.address, START_TIMEOUT_S)
        except StartError:
            self._terminate(standby)
            return False
        standby.name, standby.started = name, time.monotonic()
        self.processes[name] = standby
        self.progress(f"promoted the standby of {name} at {standby.address} (pid {standby.pid})")
        return True

    def exited(self) -> dict[str, int]:
        """name -> return code of every service that exited without being asked to."""
        return {name: p.popen.returncode for name, p in self.processes.items() if p.popen.poll() is not None}

    def pid_of(self, name: str) -> int:
        return self.processes[name].pid

    def pids(self) -> dict[str, int]:
        """name -> pid of every running service (Redis included when this system started it)."""
        return {name: p.pid for name, p in self.processes.items()}

    def __enter__(self) -> "Cluster":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- internals -------------------------------------------------------------------

    def _start_redis(self) -> None:
        self._prepare_home()
        binary = shutil.which("redis-server")
        if binary is None:
            raise StartError("redis-server is not installed (make install does it), or pass a Redis URL")
        # A restart keeps the port: the services' Redis URL names it.
        port = int(self.processes["redis"].address.rsplit(":", 1)[1]) if "redis" in self.processes else free_port()
        (self.data / "redis").mkdir(exist_ok=True)
        log_path = self.logs / "redis.log"
        password = ensure_secret(self.secrets / "redis.password", "")
        conf = self.secrets / "redis.conf"
        # Loopback only; the default user is off, so a client without AIOS's password can do nothing; AIOS's
        # user reaches only aios:* keys and no dangerous command (CONFIG, KEYS, FLUSHALL, DEBUG, ...).
        # The append-only file keeps agents and tokens across restarts (fsync every second).
        write_secret(conf, "\n".join([
            f"port {port}", "bind 127.0.0.1", f"dir {self.data / 'redis'}",
            "appendonly yes", "appendfsync everysec", 'save ""', "protected-mode yes",
            # `off`: no connection can use it. Its permissions only serve Redis's own loader of the append-only
            # file, which runs as this user and re-checks each MULTI/EXEC it replays (Redis 7.0).
            "user default off ~* &* +@all",
            f"user {REDIS_USER} on #{token_hash(password)} ~aios:* resetchannels +@all -@dangerous",
        ]))
        popen = subprocess.Popen([binary, str(conf)], stdout=log_path.open("ab"), stderr=subprocess.STDOUT,
                                 start_new_session=True)
        self.processes["redis"] = ManagedProcess("redis", popen, log_path, f"127.0.0.1:{port}")
        self.redis_url = f"redis://{REDIS_USER}:{password}@127.0.0.1:{port}/0"
        write_secret(self.secrets / "redis.url", self.redis_url)
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
        self.progress(f"started redis        127.0.0.1:{port}  (pid {popen.pid}, user {REDIS_USER}, append-only file "
                      f"in {self.data / 'redis'})")

    @property
    def served_model_name(self) -> str:
        """The model's name in the OpenAI API: its GGUF file's stem."""
        from services.llm_core.model import default_model_path

        return (self.config.model or default_model_path()).stem

    @property
    def openai_base_url(self) -> str:
        return f"http://{self.processes['gateway'].address}/v1"

    def _service_args(self, name: str, kind: str) -> list[str]:
        config = self.config
        if kind == "gateway":  # a client of the kernel with each caller's own token: it holds no secret
            args = ["--host", config.gateway_listen.rsplit(":", 1)[0], "--kernel", self.processes["kernel"].address,
                    "--served-model-name", self.served_model_name]
            if config.tls_cert:
                args += ["--kernel-root-certificates", str(config.tls_cert)]
            return args + config.extra_args.get(kind, [])
        args = ["--cluster-secret-file", str(self.secrets / "cluster.secret"), "--name", name]
        if config.otlp_endpoint:
            args += ["--otlp-endpoint", config.otlp_endpoint]
        if kind in ("llm_core", "kernel"):
            args += ["--redis-url-file", str(self.secrets / "redis.url")]
        if kind == "llm_core":
            args += ["--slots", str(config.slots)]
            if config.llm_threads:
                args += ["--threads", str(config.llm_threads)]
            if config.model:
                args += ["--model", str(config.model)]
        elif kind in ("storage", "memory"):
            args += ["--data-dir", str(self.data / name)]  # a replica gets its own
        elif kind == "tools":
            for shard in self.names_of("storage"):
                args += ["--storage", f"{shard}={self.processes[shard].address}"]
            args += ["--hidden-dir", str(config.home.resolve())]
        elif kind == "kernel":
            args += ["--policy", config.policy, "--slice-tokens", str(config.slice_tokens), "--llm-slots", str(config.slots),
                     "--operator-token-file", str(self.operator_token_path), "--host", config.listen.rsplit(":", 1)[0]]
            for manager in MANAGERS:
                for replica in self.names_of(manager):
                    args += [f"--{manager.replace('_', '-')}", f"{replica}={self.processes[replica].address}"]
            local = len(self.names_of("llm_core"))
            for i, address in enumerate(config.attached_llm_cores):
                args += ["--llm-core", f"llm_core_{local + i + 1}={address}"]
            if config.tls_cert and config.tls_key:
                args += ["--tls-cert", str(config.tls_cert), "--tls-key", str(config.tls_key)]
            if config.open_registration:
                args += ["--open-registration"]
            if name != "kernel":  # a second kernel must not reset what the first one parked in the core
                args += ["--no-reclaim"]
        return args + config.extra_args.get(kind, [])

    @property
    def shard_counts(self) -> dict[str, int]:
        return {"memory": self.config.memory_shards, "storage": self.config.storage_shards}

    def names_of(self, kind: str) -> list[str]:
        """The processes of one kind this cluster starts: llm_core, llm_core_2, ...; memory, memory_2, ..."""
        count = {"llm_core": self.config.llm_cores, **self.shard_counts}.get(kind, 1)
        return replica_names(kind, count)

    def _start_service(self, name: str, kind: str = "", extra_args: list[str] = ()) -> None:
        self._launch(name, kind, extra_args)
        self._serving(name)

    def _launch(self, name: str, kind: str = "", extra_args: list[str] = ()) -> None:
        """Starts the service's process; `_serving` waits until it serves."""
        kind = kind or self._kinds.get(name, name)
        self._kinds[name] = kind
        self._prepare_home()
        ready = self.config.home / f"{name}.ready"
        ready.unlink(missing_ok=True)
        listen = {"kernel": self.config.listen, "gateway": self.config.gateway_listen}.get(kind, ":0")
        port = listen.rsplit(":", 1)[1]
        if port == "0" and name in AGENT_FACING:  # the port of the last run, so that agents' clients reconnect
            port = str(self._previous_port(name, listen.rsplit(":", 1)[0]))
        args = self._args.get(name) or ["--port", port, *self._service_args(name, kind), *extra_args]
        log_path = self.logs / f"{name}.log"
        popen = subprocess.Popen(self._argv(kind, ready, args), stdout=log_path.open("ab"), stderr=subprocess.STDOUT,
                                 start_new_session=True)
        self.processes[name] = ManagedProcess(name, popen, log_path)
        self._launched[name] = (ready, args)

    def _serving(self, name: str) -> None:
        """Waits until a launched service wrote its ready file and answers its health check (at once if it did)."""
        if name not in self._launched:
            return
        ready, args = self._launched.pop(name)
        process, kind = self.processes[name], self._kinds[name]
        popen, log_path = process.popen, process.log_path
        deadline = process.started + START_TIMEOUT_S
        while not ready.exists():
            if popen.poll() is not None:
                raise StartError(f"{name} exited with code {popen.returncode} while starting:\n{_log_tail(log_path)}")
            if time.monotonic() > deadline:
                raise StartError(f"{name} did not start within {START_TIMEOUT_S:.0f} s:\n{_log_tail(log_path)}")
            time.sleep(0.05)  # waiting for the child to bind and write its ready file
        process.served(ready)
        ready.unlink()
        # A restart reuses the port so clients' channels reconnect to the same address.
        self._args[name] = ["--port", process.address.rsplit(":", 1)[1], *args[2:]]
        if kind == "gateway":
            wait_http_healthy(process.address, START_TIMEOUT_S)
        else:
            wait_healthy(process.address, START_TIMEOUT_S, *_tls_of(args))
        if name in AGENT_FACING:
            self._remember_port(name, int(process.address.rsplit(":", 1)[1]))
        self.progress(f"started {name:<12} {process.address}  (pid {popen.pid}, {time.monotonic() - process.started:.1f} s)")

    @staticmethod
    def _argv(kind: str, ready: Path, args: list[str]) -> list[str]:
        return [sys.executable, "-m", f"services.{'scheduler' if kind == 'kernel' else kind}", "--ready-file", str(ready),
                *args]

    def _previous_port(self, name: str, host: str) -> int:
        """The port `name` had in this home's last run if it is free now, else 0 (any)."""
        try:
            port = int(json.loads(self.ports_path.read_text()).get(name, 0))
        except (OSError, ValueError):
            return 0
        if not port:
            return 0
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: TIME_WAIT is no obstacle
            try:
                probe.bind((host or "127.0.0.1", port))
            except OSError:
                return 0  # taken by something else: any free port
        return port

    def _remember_port(self, name: str, port: int) -> None:
        try:
            ports = json.loads(self.ports_path.read_text())
        except (OSError, ValueError):
            ports = {}
        self.ports_path.write_text(json.dumps({**ports, name: port}))

    def write_endpoints(self, supervisor_pid: int | None, supervision: dict[str, dict] | None = None) -> None:
        """endpoints.json: addresses, pids and (from a supervising `aios up`) each service's state and restarts."""
        state: dict[str, Any] = {
            "kernel": self.kernel_address,
            "openai_base_url": self.openai_base_url,
            "services": self.endpoints(),
            "metrics": {name: p.metrics for name, p in self.processes.items() if p.metrics},
            "redis": self.processes["redis"].address if "redis" in self.processes else "external",
            "redis_persistence": (f"append-only file, fsync every second, in {self.data / 'redis'}"
                                  if "redis" in self.processes else "external: as configured there"),
            "pids": {**self.pids(),
                     **{f"{name}_standby": p.pid for name, p in self.standbys.items()}},
            "started_at": self.started_at,
        }
        if supervisor_pid is not None:
            state["supervisor"] = supervisor_pid
        if supervision is not None:
            state["supervision"] = supervision
        if self.config.tls_cert:
            state["tls_cert"] = str(self.config.tls_cert.resolve())
            state["tls_server_name"] = certificate_host(self.config.tls_cert.read_bytes())
        tmp = self.endpoints_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.endpoints_path)


def replica_names(kind: str, count: int) -> list[str]:
    """kind, kind_2, ..., kind_<count>: the names services/shards.py gives unnamed shards, the ring hashes by."""
    return [kind, *(f"{kind}_{i}" for i in range(2, count + 1))]


LAYOUT_FILE = "shards.json"


def read_layout(home: Path) -> dict:
    """The shard counts the home's data is laid out on (with `resharding_to` while a reshard is unfinished); one of
    each without a layout file: a new home, or data from before shards."""
    try:
        return json.loads((home / LAYOUT_FILE).read_text())
    except FileNotFoundError:
        return {"memory": 1, "storage": 1}


def check_layout(home: Path, counts: dict[str, int]) -> None:
    """Refuses to start a home with other shard counts than its data was written with (or a reshard unfinished):
    agents would not find their data."""
    if not (home / LAYOUT_FILE).exists() and not any((home / "data" / kind).exists() for kind in counts):
        return  # a new home takes any layout
    layout = read_layout(home)
    if "resharding_to" in layout:
        raise StartError(f"a reshard of {home} did not finish; run `aios reshard` again with "
                         f"{_shard_options(layout['resharding_to'])}")
    if layout != counts:
        raise StartError(f"{home}'s data is laid out on {_shard_options(layout)}; start with those, or move it "
                         f"first (offline): `aios reshard {_shard_options(counts)}`")


def write_layout(home: Path, layout: dict[str, Any]) -> None:
    tmp = home / (LAYOUT_FILE + ".tmp")
    tmp.write_text(json.dumps(layout))
    tmp.replace(home / LAYOUT_FILE)


def _shard_options(counts: dict[str, int]) -> str:
    return " ".join(f"--{kind}-shards {n}" for kind, n in counts.items())


def _tls_of(args: list[str]) -> tuple[bytes | None, str | None]:
    """The root certificate and server name to check a service's TLS by, from its `--tls-cert` option."""
    if "--tls-cert" not in args:
        return None, None
    cert = Path(args[args.index("--tls-cert") + 1]).read_bytes()
    return cert, certificate_host(cert)


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
