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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import grpc

from aios.v1 import (
    common_pb2,
    kernel_pb2,
    kernel_pb2_grpc,
    llm_core_pb2,
    memory_pb2,
    storage_pb2,
    tools_pb2,
)


class SyscallError(Exception):
    """A call the kernel refused or a manager failed; `code` is the gRPC status.

    `retry_after`: for RESOURCE_EXHAUSTED from a limit, the seconds after which a retry may succeed."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.retry_after = retry_after


def _raise(exc: grpc.RpcError) -> SyscallError:
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


def default_token(home: str | Path | None = None) -> str | None:
    """$AIOS_TOKEN, else the operator token `aios up` wrote to $AIOS_HOME/operator.token if this user may read it."""
    if os.environ.get("AIOS_TOKEN"):
        return os.environ["AIOS_TOKEN"]
    try:
        return (_home(home) / "operator.token").read_text().strip() or None
    except OSError:
        return None


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
    return Connection(address, token if token is not None else default_token(home), root_certificates, server_name)


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    syscall_id: str
    token_ids: list[int]
    prefix_tokens_reused: int


def _metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


# The SDK's channels carry what the kernel's do: large messages (whole generations, records).
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024),
                   ("grpc.max_send_message_length", 64 * 1024 * 1024)]


class Connection:
    """A connection to the kernel, calling with one token (the operator's or an agent's); thread-safe."""

    def __init__(self, address: str, token: str | None = None, root_certificates: bytes | None = None,
                 server_name: str | None = None) -> None:
        self.address = address
        self.token = token
        if root_certificates is None:
            self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        else:
            options = CHANNEL_OPTIONS + ([("grpc.ssl_target_name_override", server_name)] if server_name else [])
            self.channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates), options=options)
        self.stub = kernel_pb2_grpc.KernelStub(self.channel)

    def call(self, method: str, request: Any, token: str | None = None, timeout: float | None = 30) -> Any:
        """One unary kernel RPC with `token` (default: the connection's); errors as SyscallError."""
        try:
            return getattr(self.stub, method)(request, timeout=timeout, metadata=_metadata(token or self.token))
        except grpc.RpcError as exc:
            raise _raise(exc) from None

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

    def status(self) -> kernel_pb2.KernelStatus:
        return self.call("GetStatus", kernel_pb2.GetStatusRequest(), timeout=10)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Messages = Iterable[tuple[str, str]]


class Agent:
    """One registered agent; every method is a syscall through the kernel, made with the agent's token."""

    def __init__(self, kernel: Connection, agent_id: str, name: str, token: str) -> None:
        self.kernel = kernel
        self.id = agent_id
        self.name = name
        self.token = token
        self._metadata = _metadata(token)

    def __repr__(self) -> str:  # never the token
        return f"Agent(id={self.id!r}, name={self.name!r})"

    def status(self) -> kernel_pb2.KernelStatus:
        """What the kernel shows this agent: its own queue places, the services' health."""
        return self.kernel.call("GetStatus", kernel_pb2.GetStatusRequest(), self.token, timeout=10)

    # ---- LLM ---------------------------------------------------------------------------

    def generate(
        self,
        prompt: str = "",
        messages: Messages = (),
        *,
        max_tokens: int = 0,
        temperature: float = 0.0,
        top_p: float = 0.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: Iterable[str] = (),
        ignore_eos: bool = False,
        history_turns: int = 0,
        remember: bool = False,
        whole: bool = False,
        timeout: float | None = None,
    ) -> Iterator[llm_core_pb2.GenerateChunk]:
        """Streams chunks as tokens are generated; the last chunk has finish_reason set.

        With `messages`: `history_turns` replays the agent's newest turns from memory before them,
        and `remember` stores them and the reply in memory as turns. `whole`: one chunk at the end."""
        request = kernel_pb2.KernelGenerateRequest(
            history_turns=history_turns,
            remember=remember,
            whole=whole,
            prompt=prompt,
            messages=[common_pb2.ChatMessage(role=r, content=c) for r, c in messages],
            sampling=common_pb2.SamplingParams(
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                seed=seed,
                stop=list(stop),
                ignore_eos=ignore_eos,
            ),
        )
        stream = self.kernel.stub.Generate(request, timeout=timeout, metadata=self._metadata)
        try:
            yield from stream
        except grpc.RpcError as exc:
            raise _raise(exc) from None
        finally:
            stream.cancel()

    def complete(self, prompt: str = "", messages: Messages = (), **sampling: Any) -> Completion:
        """Runs a generation to the end and returns the whole text (sent by the kernel in one message)."""
        last = llm_core_pb2.GenerateChunk()
        for chunk in self.generate(prompt, messages, whole=True, **sampling):
            last = chunk
        return Completion(
            text=last.text,
            finish_reason=llm_core_pb2.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower(),
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            syscall_id=last.syscall_id,
            token_ids=list(last.token_ids),
            prefix_tokens_reused=last.prefix_tokens_reused,
        )

    def chat(self, messages: Messages, **sampling: Any) -> str:
        return self.complete(messages=messages, **sampling).text

    # ---- memory, storage, tools ------------------------------------------------------

    def _syscall(self, timeout: float | None = 60, **call: Any) -> Any:
        (kind,) = call
        try:
            reply = self.kernel.stub.Syscall(kernel_pb2.SyscallRequest(**call), timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _raise(exc) from None
        return getattr(reply, kind)

    def memory_add(self, text: str, metadata: dict[str, str] | None = None, role: str = "") -> memory_pb2.MemoryEntry:
        """A note, or with role "user"/"assistant" a conversation turn."""
        return self._syscall(memory_add=memory_pb2.MemoryAddRequest(text=text, metadata=metadata or {}, role=role))

    def memory_update(
        self, entry_id: str, text: str = "", metadata: dict[str, str] | None = None, remove_metadata: Iterable[str] = ()
    ) -> memory_pb2.MemoryEntry:
        return self._syscall(memory_update=memory_pb2.MemoryUpdateRequest(
            id=entry_id, text=text, metadata=metadata or {}, remove_metadata=list(remove_metadata)))

    def memory_search(self, query: str, limit: int = 10, metadata: dict[str, str] | None = None) -> list[memory_pb2.MemorySearchHit]:
        """Entries containing any word of `query`, most relevant (BM25) first."""
        request = memory_pb2.MemorySearchRequest(query=query, limit=limit, metadata=metadata or {})
        return list(self._syscall(memory_search=request).hits)

    def memory_turns(self, limit: int) -> list[memory_pb2.MemoryEntry]:
        """The newest `limit` conversation turns, oldest first."""
        return list(self._syscall(memory_turns=memory_pb2.MemoryTurnsRequest(limit=limit)).entries)

    def memory_get(self, entry_id: str) -> memory_pb2.MemoryEntry:
        return self._syscall(memory_get=memory_pb2.MemoryGetRequest(id=entry_id))

    def memory_list(self, page_size: int = 0) -> Iterator[memory_pb2.MemoryEntry]:
        """All entries, oldest first, fetched a page at a time."""
        token = ""
        while True:
            page = self._syscall(memory_list=memory_pb2.MemoryListRequest(page_size=page_size, page_token=token))
            yield from page.entries
            token = page.next_page_token
            if not token:
                return

    def memory_delete(self, entry_id: str) -> None:
        self._syscall(memory_delete=memory_pb2.MemoryDeleteRequest(id=entry_id))

    def storage_write(
        self, key: str, data: bytes | str, metadata: dict[str, str] | None = None, owner: str = ""
    ) -> storage_pb2.StorageRecordInfo:
        """A new version of `key`; `owner`: another agent's namespace, which it granted read-write."""
        payload = data.encode() if isinstance(data, str) else data
        request = storage_pb2.StorageWriteRequest(key=key, data=payload, metadata=metadata or {}, owner_agent_id=owner)
        return self._syscall(storage_write=request)

    def storage_read(self, key: str, version: int = 0, owner: str = "") -> bytes:
        """The newest version's data (or `version`'s); `owner`: another agent that granted access."""
        return self.storage_record(key, version, owner).data

    def storage_record(self, key: str, version: int = 0, owner: str = "") -> storage_pb2.StorageRecord:
        request = storage_pb2.StorageReadRequest(key=key, version=version, owner_agent_id=owner)
        return self._syscall(storage_read=request)

    def storage_list(self, prefix: str = "") -> list[storage_pb2.StorageRecordInfo]:
        return list(self._syscall(storage_list=storage_pb2.StorageListRequest(prefix=prefix)).records)

    def storage_delete(self, key: str, purge: bool = False, owner: str = "") -> storage_pb2.StorageDeleteResponse:
        """A tombstone version (undo with storage_rollback), or with `purge` every version erased."""
        return self._syscall(storage_delete=storage_pb2.StorageDeleteRequest(key=key, purge=purge, owner_agent_id=owner))

    def storage_history(self, key: str, owner: str = "") -> list[storage_pb2.StorageRecordInfo]:
        return list(self._syscall(storage_history=storage_pb2.StorageHistoryRequest(key=key, owner_agent_id=owner)).records)

    def storage_rollback(self, key: str, version: int, owner: str = "") -> storage_pb2.StorageRecordInfo:
        request = storage_pb2.StorageRollbackRequest(key=key, version=version, owner_agent_id=owner)
        return self._syscall(storage_rollback=request)

    def storage_search(
        self, query: str, limit: int = 10, prefix: str = "", metadata: dict[str, str] | None = None
    ) -> list[storage_pb2.StorageSearchHit]:
        request = storage_pb2.StorageSearchRequest(query=query, limit=limit, prefix=prefix, metadata=metadata or {})
        return list(self._syscall(storage_search=request).hits)

    def storage_grant(self, grantee: str, key: str, prefix: bool = False, write: bool = False) -> storage_pb2.StorageGrant:
        """Lets agent `grantee` read `key` (or, with `prefix`, every key starting with it); with `write`, also
        write, delete and roll it back. Granting again changes the access."""
        access = storage_pb2.GRANT_ACCESS_READ_WRITE if write else storage_pb2.GRANT_ACCESS_READ
        request = storage_pb2.StorageGrantRequest(grantee_agent_id=grantee, key=key, prefix=prefix, access=access)
        return self._syscall(storage_grant=request)

    def storage_revoke(self, grantee: str, key: str, prefix: bool = False) -> storage_pb2.StorageGrant:
        return self._syscall(storage_revoke=storage_pb2.StorageGrantRequest(grantee_agent_id=grantee, key=key, prefix=prefix))

    def storage_grants(self) -> storage_pb2.StorageListGrantsResponse:
        """`.grants`: what this agent granted; `.received`: what other agents granted to it."""
        return self._syscall(storage_grants=storage_pb2.StorageListGrantsRequest())

    def storage_usage(self) -> storage_pb2.StorageUsage:
        return self._syscall(storage_usage=storage_pb2.StorageUsageRequest())

    def tools(self) -> list[tools_pb2.ToolSpec]:
        return list(self._syscall(tool_list=tools_pb2.ListToolsRequest()).tools)

    def sandbox_isolation(self) -> dict[str, bool]:
        """What the tool service's code sandbox isolates on its machine (network, own uid, ...)."""
        return dict(self._syscall(tool_list=tools_pb2.ListToolsRequest()).sandbox_isolation)

    def tools_openai(self) -> list[dict[str, Any]]:
        """The tools in OpenAI's function-calling format, ready for a chat-completions `tools` list."""
        return [
            {"type": "function",
             "function": {"name": t.name, "description": t.description, "parameters": json.loads(t.parameters_schema)}}
            for t in self.tools()
        ]

    def call_tool(self, name: str, **arguments: Any) -> Any:
        reply = self._syscall(tool_call=tools_pb2.CallToolRequest(name=name, arguments_json=json.dumps(arguments)))
        return json.loads(reply.result_json)

    def syscall(self, syscall_id: str) -> common_pb2.SyscallInfo:
        """The kernel's record of one of this agent's syscalls."""
        return self.kernel.call("GetSyscall", kernel_pb2.GetSyscallRequest(syscall_id=syscall_id), self.token, timeout=10)
