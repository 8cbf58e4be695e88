"""The Python SDK: an agent's handle on the AIOS kernel.

    import aios
    kernel = aios.connect()                 # the system `aios up` started, with its operator token
    agent = kernel.register("researcher")   # a new agent; agent.token is its secret credential
    print(agent.chat([("user", "Hi")]))

    # elsewhere, an agent that was handed its token (`aios agent create NAME` prints one):
    agent = aios.connect("kernel.example:50051", token=TOKEN, root_certificates=CA_PEM).agent()

Every call carries a token as `authorization: Bearer <token>` metadata; the kernel
knows the caller from it. Where a value is not given, it comes from the environment
($AIOS_KERNEL, $AIOS_TOKEN, $AIOS_ROOT_CERTIFICATES: a PEM file) or from the system
`aios up` started ($AIOS_HOME, default ~/.aios: endpoints.json and operator.token).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import grpc

from aios.syscalls import (
    Completion,
    Messages,
    ResumableStream,
    SyscallMethods,
    bearer,
    completion_of,
    generate_request,
    same,
    syscall_request,
    traced,
)
from aios.v1 import kernel_pb2, kernel_pb2_grpc, llm_core_pb2, memory_pb2, tools_pb2


class SyscallError(Exception):
    """A call the kernel refused or a manager failed; `code` is the gRPC status.

    `retry_after`: for RESOURCE_EXHAUSTED from a limit, the seconds after which a retry may succeed."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.retry_after = retry_after


def syscall_error(exc: grpc.RpcError) -> SyscallError:
    retry_after = None
    for key, value in (exc.trailing_metadata() or ()) if hasattr(exc, "trailing_metadata") else ():
        if key == "retry-after":
            retry_after = float(value)
    return SyscallError(exc.code(), exc.details() or "", retry_after)


def _home(home: str | Path | None) -> Path:
    return Path(home or os.environ.get("AIOS_HOME") or Path.home() / ".aios")


def _endpoints(home: str | Path | None) -> dict[str, Any]:
    path = _home(home) / "endpoints.json"
    if not path.exists():
        raise FileNotFoundError(f"no running AIOS found ({path} is missing): start one with `aios up`")
    return json.loads(path.read_text())


def default_kernel_address(home: str | Path | None = None) -> str:
    """$AIOS_KERNEL, else the address `aios up` wrote to $AIOS_HOME (default ~/.aios)/endpoints.json."""
    return os.environ.get("AIOS_KERNEL") or _endpoints(home)["kernel"]


def default_openai_base_url(home: str | Path | None = None) -> str:
    """$AIOS_OPENAI_BASE_URL, else the gateway `aios up` started (for OpenAI clients: base_url)."""
    return os.environ.get("AIOS_OPENAI_BASE_URL") or _endpoints(home)["openai_base_url"]


def default_token(home: str | Path | None = None) -> str | None:
    """$AIOS_TOKEN, else the operator token `aios up` wrote to $AIOS_HOME/operator.token if this user may read it."""
    if os.environ.get("AIOS_TOKEN"):
        return os.environ["AIOS_TOKEN"]
    try:
        return (_home(home) / "operator.token").read_text().strip() or None
    except OSError:
        return None


def resolve(
    address: str | None = None,
    token: str | None = None,
    root_certificates: bytes | str | Path | None = None,
    home: str | Path | None = None,
) -> tuple[str, str | None, bytes | None, str | None]:
    """(address, token, root certificates, TLS server name) from the arguments, the environment and $AIOS_HOME."""
    server_name = None
    if address is None and not os.environ.get("AIOS_KERNEL"):
        state = _endpoints(home)
        address = state["kernel"]
        if root_certificates is None and state.get("tls_cert"):
            root_certificates, server_name = Path(state["tls_cert"]), state.get("tls_server_name")
    address = address or default_kernel_address(home)
    if root_certificates is None and os.environ.get("AIOS_ROOT_CERTIFICATES"):
        root_certificates = Path(os.environ["AIOS_ROOT_CERTIFICATES"])
    if isinstance(root_certificates, (str, Path)):
        root_certificates = Path(root_certificates).read_bytes()
    return address, token if token is not None else default_token(home), root_certificates, server_name


def open_channel(address: str, root_certificates: bytes | None = None, server_name: str | None = None,
                 options: list[tuple[str, Any]] | None = None, aio: bool = False) -> Any:
    """A channel to the kernel (synchronous, or grpc.aio with `aio`): plaintext, or TLS checked against
    `root_certificates` under `server_name`. Every client of the kernel opens its channel here."""
    module = grpc.aio if aio else grpc
    options = list(CHANNEL_OPTIONS if options is None else options)
    if root_certificates is None:
        return module.insecure_channel(address, options=options)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return module.secure_channel(address, grpc.ssl_channel_credentials(root_certificates), options=options)


def connect(
    address: str | None = None,
    *,
    token: str | None = None,
    root_certificates: bytes | str | Path | None = None,
    home: str | Path | None = None,
) -> "Connection":
    """A connection to the kernel at `address` (default: $AIOS_KERNEL or the local `aios up`), calling with `token`
    (default: $AIOS_TOKEN or the local operator token), over TLS when `root_certificates` (PEM bytes or a file;
    default: $AIOS_ROOT_CERTIFICATES, or the local kernel's certificate) is given."""
    return Connection(*resolve(address, token, root_certificates, home))


# Options of the SDK's channels, and of every channel between AIOS's own processes: carry messages up to
# 64 MiB (whole generations, records, snapshots), and reconnect to a kernel or service that restarts within
# a second instead of backing off for minutes (gRPC's default backoff starts at 1 s and grows to 120 s).
# Syscalls (each with a request id, which makes its writes safe to repeat) are retried by gRPC itself when the
# kernel is UNAVAILABLE (restarting), and wait for it to be back rather than failing at once: a dead kernel makes
# them run into their deadline. Tool calls are retried too: one may run twice if the kernel dies during it.
SYSCALL_RETRY_POLICY = {"methodConfig": [{
    "name": [{"service": "aios.v1.Kernel", "method": "Syscall"}],
    "waitForReady": True,
    "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.2s", "maxBackoff": "2s", "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"]},
}]}
# gRPC's pushback trailer: -1 tells a client's retry policy not to retry. A service sends it with every UNAVAILABLE
# it answers itself (it already retried what it depends on); the retry policies are for a service that is gone.
# The one exception is a kernel that is stopping (`aios down`): it refuses new syscalls and suspends generations
# with a pushback in milliseconds, after which the SDKs try again (and find the kernel restarted, or wait for it).
PUSHBACK = "grpc-retry-pushback-ms"
NO_RETRY_PUSHBACK = (PUSHBACK, "-1")


def retry_pushback(seconds: float) -> tuple[str, str]:
    return PUSHBACK, str(max(1, round(seconds * 1000)))


MESSAGE_LIMIT_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", MESSAGE_LIMIT_BYTES),
    ("grpc.max_send_message_length", MESSAGE_LIMIT_BYTES),
    ("grpc.enable_retries", 1),
    ("grpc.service_config", json.dumps(SYSCALL_RETRY_POLICY)),
]


class Connection:
    """A connection to the kernel, calling with one token (the operator's or an agent's); thread-safe."""

    def __init__(self, address: str, token: str | None = None, root_certificates: bytes | None = None,
                 server_name: str | None = None) -> None:
        self.address = address
        self.token = token
        self.channel = open_channel(address, root_certificates, server_name)
        self.stub = kernel_pb2_grpc.KernelStub(self.channel)

    def call(self, method: str, request: Any, token: str | None = None, timeout: float | None = 30) -> Any:
        """One unary kernel RPC with `token` (default: the connection's); errors as SyscallError."""
        try:
            return getattr(self.stub, method)(request, timeout=timeout, metadata=traced(bearer(token or self.token)))
        except grpc.RpcError as exc:
            raise syscall_error(exc) from None

    def register(
        self, name: str, priority: int = 0, weight: float = 0.0, *,
        tokens_per_minute: int = 0, concurrent_syscalls: int = 0, tool_slots: int = 0,
    ) -> "Agent":
        """A new agent, with its token (needs the operator token, or open registration). `priority` 0-10 (higher
        first, priority policy); `weight` > 0 (fair-share policy), 0 = 1; limits 0 take the kernel's defaults."""
        quota = kernel_pb2.AgentQuota(tokens_per_minute=tokens_per_minute, concurrent_syscalls=concurrent_syscalls,
                                      tool_slots=tool_slots)
        reply = self.call("RegisterAgent", kernel_pb2.RegisterAgentRequest(name=name, priority=priority, weight=weight,
                                                                            quota=quota))
        return Agent(self, reply.agent_id, name, reply.token)

    def agent(self, token: str | None = None) -> "Agent":
        """The agent that `token` (default: the connection's) proves, ready for syscalls."""
        token = token or self.token
        info = self.call("WhoAmI", kernel_pb2.WhoAmIRequest(), token)
        if info.role != "agent":
            raise SyscallError(grpc.StatusCode.INVALID_ARGUMENT, "that token is the operator's, not an agent's")
        return Agent(self, info.agent.id, info.agent.name, token or "")

    def whoami(self) -> kernel_pb2.CallerInfo:
        return self.call("WhoAmI", kernel_pb2.WhoAmIRequest())

    def agents(self, include_revoked: bool = False) -> list[kernel_pb2.AgentInfo]:
        """Every agent (operator); an agent's token lists only itself."""
        return list(self.call("ListAgents", kernel_pb2.ListAgentsRequest(include_revoked=include_revoked)).agents)

    def revoke(self, agent_id: str) -> kernel_pb2.AgentInfo:
        """Operator: revokes the agent's token; its data stays."""
        return self.call("RevokeAgent", kernel_pb2.RevokeAgentRequest(agent_id=agent_id))

    def issue_token(self, agent_id: str) -> "Agent":
        """Operator: a new token for the agent (its old one stops working)."""
        reply = self.call("IssueToken", kernel_pb2.IssueTokenRequest(agent_id=agent_id))
        return Agent(self, reply.agent_id, reply.agent.name, reply.token)

    def mount_tool(self, name: str, command: list[str], network: bool = False,
                   read_only: Sequence[str] = ()) -> list[str]:
        """Operator: starts an MCP server (stdio, sandboxed; the host network and `read_only` host paths only if
        given) and adds its tools as NAME__<tool>; returns their names."""
        request = tools_pb2.MountRequest(name=name, command=command, network=network, read_only_paths=read_only)
        return list(self.call("MountTool", request, timeout=60).tools)

    def unmount_tool(self, name: str) -> list[str]:
        """Operator: stops an MCP server mounted as NAME and removes its tools; returns their names."""
        return list(self.call("UnmountTool", tools_pb2.UnmountRequest(name=name), timeout=60).tools)

    def status(self, max_agents: int = 0) -> kernel_pb2.KernelStatus:
        """The kernel's view of the system (an agent: its own part); the operator's lists the `max_agents` busiest
        agents (0: 100)."""
        return self.call("GetStatus", kernel_pb2.GetStatusRequest(max_agents=max_agents), timeout=10)

    def drain_core(self, core: str, undo: bool = False, timeout: float = 90) -> kernel_pb2.LLMCoreStatus:
        """Operator: drains an LLM core (by name or address): no new generations, its running ones move to the
        other cores; returns once it holds none (or the kernel's limit passed: see `running` and `parked`).
        `undo`: it serves again."""
        return self.call("DrainCore", kernel_pb2.DrainCoreRequest(core=core, undo=undo), timeout=timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Agent(SyscallMethods):
    """One registered agent; every method is a syscall through the kernel, made with the agent's token."""

    # ---- LLM ---------------------------------------------------------------------------

    def generate(self, prompt: str = "", messages: Messages = (), *, timeout: float | None = None,
                 **options: Any) -> Iterator[llm_core_pb2.GenerateChunk]:
        """Streams chunks as tokens are generated; the last chunk has finish_reason set.

        Options (aios.syscalls.generate_request): max_tokens, temperature, top_p, top_k, seed, stop, ignore_eos,
        json_schema (the output is JSON valid under it); with `messages`, `history_turns` replays the agent's newest
        turns from memory before them and `remember` stores them and the reply as turns; `whole`: one chunk at the
        end."""
        generation = ResumableStream(generate_request(prompt, messages, **options), timeout)
        while True:
            stream = self.kernel.stub.Generate(generation.request, timeout=generation.remaining(),
                                               metadata=traced(self._metadata))
            try:
                for chunk in stream:
                    if generation.fresh(chunk):
                        yield chunk
                return
            except grpc.RpcError as exc:
                generation.opened(stream.initial_metadata())
                wait = generation.retry_after(exc)
                if wait is None:
                    raise syscall_error(exc) from None
            finally:
                stream.cancel()
            time.sleep(wait)  # the kernel's pushback: it is stopping, and said when to ask again
            back = grpc.channel_ready_future(self.kernel.channel)
            try:  # the kernel went away mid-stream: continue once it is back
                back.result(timeout=generation.back_within())
            except grpc.FutureTimeoutError:
                back.cancel()  # the next attempt fails with UNAVAILABLE and says so

    def complete(self, prompt: str = "", messages: Messages = (), **options: Any) -> Completion:
        """Runs a generation to the end and returns the whole text (sent by the kernel in one message)."""
        last = llm_core_pb2.GenerateChunk()
        for chunk in self.generate(prompt, messages, whole=True, **options):
            last = chunk
        return completion_of(last)

    def chat(self, messages: Messages, **sampling: Any) -> str:
        return self.complete(messages=messages, **sampling).text

    # ---- memory, storage, tools (the requests are in aios.syscalls) -------------------

    def _syscall(self, then: Callable[[Any], Any] = same, timeout: float | None = 60, **call: Any) -> Any:
        (kind,) = call
        try:
            reply = self.kernel.stub.Syscall(syscall_request(**call), timeout=timeout, metadata=traced(self._metadata))
        except grpc.RpcError as exc:
            raise syscall_error(exc) from None
        return then(getattr(reply, kind))

    def memory_list(self, page_size: int = 0) -> Iterator[memory_pb2.MemoryEntry]:
        """All entries, oldest first, fetched a page at a time."""
        token = ""
        while True:
            page = self._syscall(memory_list=memory_pb2.MemoryListRequest(page_size=page_size, page_token=token))
            yield from page.entries
            token = page.next_page_token
            if not token:
                return
