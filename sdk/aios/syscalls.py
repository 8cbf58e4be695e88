"""The requests behind every agent method, shared by the synchronous SDK (aios) and the asyncio one (aios.aio).

`SyscallMethods` builds each memory, storage and tool syscall and hands it to
`_syscall(then, **call)`, which each client implements: `aios.Agent` sends it and
returns `then(result)`; `aios.aio.Agent` returns a coroutine that does the same.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import grpc

from aios.v1 import common_pb2, kernel_pb2, llm_core_pb2, memory_pb2, storage_pb2, tools_pb2

Messages = Iterable[tuple[str, str]]


def same(result: Any) -> Any:
    return result


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    syscall_id: str
    token_ids: list[int]
    prefix_tokens_reused: int
    hidden_tokens: int  # of completion_tokens, those that spelled the stop string (their text is not in `text`)


def generate_request(
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
    json_schema: dict[str, Any] | None = None,
    history_turns: int = 0,
    remember: bool = False,
    whole: bool = False,
    priority: int | None = None,
) -> kernel_pb2.KernelGenerateRequest:
    """An LLM syscall. `json_schema`: the output is JSON valid under it (grammar-constrained decoding);
    `priority`: lower than the agent's for this call (never higher)."""
    if seed is None and temperature > 0:  # fixed here, so that a continued stream draws what the first would have
        seed = secrets.randbits(63)
    return kernel_pb2.KernelGenerateRequest(
        priority=priority,
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
            json_schema=json.dumps(json_schema) if json_schema is not None else "",
        ),
    )


# A generation whose stream broke with UNAVAILABLE because the kernel went away is continued this many times at
# most; the SDK waits up to KERNEL_BACK_S (from the break, or the last chunk since) for the kernel to be back.
MAX_STREAM_RESUMES = 3
KERNEL_BACK_S = 60.0
# Initial metadata of a kernel Generate stream: the syscall id, sent before any chunk (a `whole` generation sends
# its only chunk at the end), so that a stream that breaks early can still be continued by its id.
SYSCALL_ID_METADATA = "aios-syscall-id"


class ResumableStream:
    """One generation as the SDK streams it: its syscall id and the tokens received so far, so that if the stream
    breaks (the kernel restarted, or was stopped and suspended it) the SDK asks again with them
    (KernelGenerateRequest.resume_syscall_id and received_token_ids) and the agent sees each token once, by its
    index."""

    def __init__(self, request: kernel_pb2.KernelGenerateRequest, timeout: float | None) -> None:
        self.request = request
        self.received: list[int] = []
        self.resumes = 0
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self._broken_since: float | None = None

    def remaining(self) -> float | None:
        """The timeout of the next attempt: what is left of the caller's."""
        return None if self.deadline is None else max(self.deadline - time.monotonic(), 0.0)

    def back_within(self) -> float:
        """How long to wait for the kernel to be back before the next attempt: what is left of KERNEL_BACK_S
        since the stream broke, and of the caller's deadline."""
        since = 0.0 if self._broken_since is None else time.monotonic() - self._broken_since
        left = self.remaining()
        back = max(KERNEL_BACK_S - since, 0.0)
        return back if left is None else min(back, left)

    def opened(self, metadata: Any) -> None:
        """Notes the syscall id from the stream's initial metadata (absent if it broke before the kernel sent it)."""
        syscall_id = dict(metadata or ()).get(SYSCALL_ID_METADATA)
        if syscall_id and not self.request.remember:  # one that remembers is never continued, only sent again
            self.request.resume_syscall_id = syscall_id

    def fresh(self, chunk: llm_core_pb2.GenerateChunk) -> bool:
        """Whether to hand `chunk` to the agent (False: a token it already has)."""
        self._broken_since = None
        if chunk.HasField("token_id"):
            if chunk.completion_tokens <= len(self.received):
                return False
            self.received.append(chunk.token_id)
        return True

    def retry_after(self, error: grpc.RpcError) -> float | None:
        """After the stream broke with `error`: None to give up (raise it), else the seconds to wait before sending
        the request again, updated to go on from the next token. An UNAVAILABLE the kernel answered with pushback -1
        is final; with a positive pushback (it is stopping: `aios down`) the SDK waits that long and tries again,
        for up to KERNEL_BACK_S; with none (the kernel went away) it tries again at once, MAX_STREAM_RESUMES
        times at most (the caller then waits for the channel to be ready). A generation that remembers its turns
        is sent again only when the kernel refused it before any token (stopping), never continued."""
        from aios.client import PUSHBACK  # aios.client imports this module

        pushback = dict(error.trailing_metadata() or ()).get(PUSHBACK)  # type: ignore[attr-defined]
        if error.code() != grpc.StatusCode.UNAVAILABLE or pushback == "-1":  # type: ignore[attr-defined]
            return None
        if self.request.remember and (self.received or not pushback):  # stores turns: only if nothing came yet
            return None
        now = time.monotonic()
        self._broken_since = self._broken_since or now
        if now - self._broken_since > KERNEL_BACK_S:
            return None
        if pushback is None:
            if self.resumes >= MAX_STREAM_RESUMES:
                return None
            self.resumes += 1
        del self.request.received_token_ids[:]
        self.request.received_token_ids.extend(self.received)
        wait = int(pushback) / 1000 if pushback and pushback.isdigit() else 0.0
        left = self.remaining()
        return wait if left is None else min(wait, left)


def completion_of(last: llm_core_pb2.GenerateChunk) -> Completion:
    """The whole result of a generation from its last (whole=True) chunk."""
    return Completion(
        text=last.text,
        finish_reason=llm_core_pb2.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower(),
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
        syscall_id=last.syscall_id,
        token_ids=list(last.token_ids),
        prefix_tokens_reused=last.prefix_tokens_reused,
        hidden_tokens=last.hidden_tokens,
    )


def syscall_request(**call: Any) -> kernel_pb2.SyscallRequest:
    """A syscall with a fresh request id: if it is retried (the kernel or a manager restarting), a write it
    makes happens once."""
    return kernel_pb2.SyscallRequest(request_id=uuid.uuid4().hex, **call)


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata that carries a token to the kernel."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def traceparent() -> str:
    """The agent's current OpenTelemetry span as a W3C traceparent value, so that the kernel's spans of its syscalls
    join its trace (and the syscall records name it); "" if the agent traces nothing. Imports nothing of
    OpenTelemetry that the agent did not import itself."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None or not trace.get_current_span().get_span_context().is_valid:
        return ""
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "")


def traced(metadata: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """`metadata` with the agent's trace context, if it has one."""
    parent = traceparent()
    return (*metadata, ("traceparent", parent)) if parent else metadata


class SyscallMethods:
    """One agent's syscalls, made with its token. Results come back through `_syscall` and `kernel.call`: values in
    the synchronous SDK, coroutines in the asyncio one."""

    def __init__(self, kernel: Any, agent_id: str, name: str, token: str) -> None:
        self.kernel = kernel
        self.id = agent_id
        self.name = name
        self.token = token
        self._metadata = bearer(token)

    def __repr__(self) -> str:  # never the token
        return f"{type(self).__module__}.Agent(id={self.id!r}, name={self.name!r})"

    def status(self) -> kernel_pb2.KernelStatus:
        """What the kernel shows this agent: its own queue places, the services' health."""
        return self.kernel.call("GetStatus", kernel_pb2.GetStatusRequest(), self.token, timeout=10)

    def syscall(self, syscall_id: str) -> common_pb2.SyscallInfo:
        """The kernel's record of one of this agent's syscalls."""
        return self.kernel.call("GetSyscall", kernel_pb2.GetSyscallRequest(syscall_id=syscall_id), self.token, timeout=10)

    def syscalls(self, kind: str = "", limit: int = 0) -> kernel_pb2.ListSyscallsResponse:
        """The kernel's records of this agent's latest syscalls (of `kind`, e.g. "tool_call"), newest first."""
        return self.kernel.call("ListSyscalls", kernel_pb2.ListSyscallsRequest(kind=kind, limit=limit), self.token,
                                timeout=10)

    def _syscall(self, then: Callable[[Any], Any] = same, timeout: float | None = 60, **call: Any) -> Any:
        raise NotImplementedError

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
        return self._syscall(lambda r: list(r.hits), memory_search=request)

    def memory_turns(self, limit: int) -> list[memory_pb2.MemoryEntry]:
        """The newest `limit` conversation turns, oldest first."""
        return self._syscall(lambda r: list(r.entries), memory_turns=memory_pb2.MemoryTurnsRequest(limit=limit))

    def memory_get(self, entry_id: str) -> memory_pb2.MemoryEntry:
        return self._syscall(memory_get=memory_pb2.MemoryGetRequest(id=entry_id))

    def memory_delete(self, entry_id: str) -> memory_pb2.MemoryDeleteResponse:
        return self._syscall(memory_delete=memory_pb2.MemoryDeleteRequest(id=entry_id))

    def storage_write(
        self, key: str, data: bytes | str, metadata: dict[str, str] | None = None, owner: str = ""
    ) -> storage_pb2.StorageRecordInfo:
        """A new version of `key`; `owner`: another agent's namespace, which it granted read-write."""
        payload = data.encode() if isinstance(data, str) else data
        request = storage_pb2.StorageWriteRequest(key=key, data=payload, metadata=metadata or {}, owner_agent_id=owner)
        return self._syscall(storage_write=request)

    def storage_read(self, key: str, version: int = 0, owner: str = "", offset: int = 0, length: int = 0) -> bytes:
        """The newest version's data (or `version`'s); `owner`: another agent that granted access; `offset` and
        `length` (0: to the end): a range of it."""
        request = storage_pb2.StorageReadRequest(key=key, version=version, owner_agent_id=owner, offset=offset,
                                                 length=length)
        return self._syscall(lambda r: r.data, storage_read=request)

    def storage_record(self, key: str, version: int = 0, owner: str = "") -> storage_pb2.StorageRecord:
        request = storage_pb2.StorageReadRequest(key=key, version=version, owner_agent_id=owner)
        return self._syscall(storage_read=request)

    def storage_list(self, prefix: str = "") -> list[storage_pb2.StorageRecordInfo]:
        return self._syscall(lambda r: list(r.records), storage_list=storage_pb2.StorageListRequest(prefix=prefix))

    def storage_delete(self, key: str, purge: bool = False, owner: str = "") -> storage_pb2.StorageDeleteResponse:
        """A tombstone version (undo with storage_rollback), or with `purge` every version erased."""
        return self._syscall(storage_delete=storage_pb2.StorageDeleteRequest(key=key, purge=purge, owner_agent_id=owner))

    def storage_history(self, key: str, owner: str = "") -> list[storage_pb2.StorageRecordInfo]:
        request = storage_pb2.StorageHistoryRequest(key=key, owner_agent_id=owner)
        return self._syscall(lambda r: list(r.records), storage_history=request)

    def storage_rollback(self, key: str, version: int, owner: str = "") -> storage_pb2.StorageRecordInfo:
        request = storage_pb2.StorageRollbackRequest(key=key, version=version, owner_agent_id=owner)
        return self._syscall(storage_rollback=request)

    def storage_search(
        self, query: str, limit: int = 10, prefix: str = "", metadata: dict[str, str] | None = None
    ) -> list[storage_pb2.StorageSearchHit]:
        request = storage_pb2.StorageSearchRequest(query=query, limit=limit, prefix=prefix, metadata=metadata or {})
        return self._syscall(lambda r: list(r.hits), storage_search=request)

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
        return self._syscall(lambda r: list(r.tools), tool_list=tools_pb2.ListToolsRequest())

    def sandbox_isolation(self) -> dict[str, bool]:
        """What the tool service's code sandbox isolates on its machine (network, own uid, ...)."""
        return self._syscall(lambda r: dict(r.sandbox_isolation), tool_list=tools_pb2.ListToolsRequest())

    def tools_openai(self) -> list[dict[str, Any]]:
        """The tools in OpenAI's function-calling format, ready for a chat-completions `tools` list."""
        return self._syscall(lambda r: [
            {"type": "function",
             "function": {"name": t.name, "description": t.description, "parameters": json.loads(t.parameters_schema)}}
            for t in r.tools
        ], tool_list=tools_pb2.ListToolsRequest())

    def call_tool(self, name: str, **arguments: Any) -> Any:
        request = tools_pb2.CallToolRequest(name=name, arguments_json=json.dumps(arguments))
        return self._syscall(lambda r: json.loads(r.result_json), tool_call=request)
