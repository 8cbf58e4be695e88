"""The Python SDK: an agent's handle on the AIOS kernel.

    import aios
    kernel = aios.connect()                 # the system `aios up` started
    agent = kernel.register("researcher")
    print(agent.chat([("user", "Hi")]))
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
    """A syscall the kernel refused or a manager failed; `code` is the gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


def _raise(exc: grpc.RpcError) -> SyscallError:
    return SyscallError(exc.code(), exc.details() or "")


def default_kernel_address(home: str | Path | None = None) -> str:
    """$AIOS_KERNEL, else the address `aios up` wrote to $AIOS_HOME (default ~/.aios)/endpoints.json."""
    if os.environ.get("AIOS_KERNEL"):
        return os.environ["AIOS_KERNEL"]
    base = Path(home or os.environ.get("AIOS_HOME") or Path.home() / ".aios")
    path = base / "endpoints.json"
    if not path.exists():
        raise FileNotFoundError(f"no running AIOS found ({path} is missing): start one with `aios up`")
    return json.loads(path.read_text())["kernel"]


def connect(address: str | None = None, home: str | Path | None = None) -> "Kernel":
    return Kernel(address or default_kernel_address(home))


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    syscall_id: str
    token_ids: list[int]
    prefix_tokens_reused: int


class Kernel:
    """A connection to the kernel; thread-safe, share one per process."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = grpc.insecure_channel(address)
        self.stub = kernel_pb2_grpc.KernelStub(self.channel)

    def register(self, name: str, priority: int = 0, weight: float = 0.0) -> "Agent":
        """`priority` 0-10 (higher first, priority policy); `weight` > 0 (fair-share policy), 0 = 1."""
        request = kernel_pb2.RegisterAgentRequest(name=name, priority=priority, weight=weight)
        try:
            reply = self.stub.RegisterAgent(request, timeout=30)
        except grpc.RpcError as exc:
            raise _raise(exc) from None
        return Agent(self, reply.agent_id, name)

    def agent(self, agent_id: str, name: str = "") -> "Agent":
        """A handle for an agent registered earlier."""
        return Agent(self, agent_id, name)

    def status(self) -> kernel_pb2.KernelStatus:
        try:
            return self.stub.GetStatus(kernel_pb2.GetStatusRequest(), timeout=10)
        except grpc.RpcError as exc:
            raise _raise(exc) from None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Kernel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Messages = Iterable[tuple[str, str]]


class Agent:
    """One registered agent; every method is a syscall through the kernel."""

    def __init__(self, kernel: Kernel, agent_id: str, name: str) -> None:
        self.kernel = kernel
        self.id = agent_id
        self.name = name

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
            agent_id=self.id,
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
        stream = self.kernel.stub.Generate(request, timeout=timeout)
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
            reply = self.kernel.stub.Syscall(kernel_pb2.SyscallRequest(agent_id=self.id, **call), timeout=timeout)
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

    def storage_write(self, key: str, data: bytes | str, metadata: dict[str, str] | None = None) -> storage_pb2.StorageRecordInfo:
        payload = data.encode() if isinstance(data, str) else data
        return self._syscall(storage_write=storage_pb2.StorageWriteRequest(key=key, data=payload, metadata=metadata or {}))

    def storage_read(self, key: str, version: int = 0, owner: str = "") -> bytes:
        """The newest version's data (or `version`'s); `owner`: another agent that granted access."""
        return self.storage_record(key, version, owner).data

    def storage_record(self, key: str, version: int = 0, owner: str = "") -> storage_pb2.StorageRecord:
        request = storage_pb2.StorageReadRequest(key=key, version=version, owner_agent_id=owner)
        return self._syscall(storage_read=request)

    def storage_list(self, prefix: str = "") -> list[storage_pb2.StorageRecordInfo]:
        return list(self._syscall(storage_list=storage_pb2.StorageListRequest(prefix=prefix)).records)

    def storage_delete(self, key: str, purge: bool = False) -> storage_pb2.StorageDeleteResponse:
        """A tombstone version (undo with storage_rollback), or with `purge` every version erased."""
        return self._syscall(storage_delete=storage_pb2.StorageDeleteRequest(key=key, purge=purge))

    def storage_history(self, key: str, owner: str = "") -> list[storage_pb2.StorageRecordInfo]:
        return list(self._syscall(storage_history=storage_pb2.StorageHistoryRequest(key=key, owner_agent_id=owner)).records)

    def storage_rollback(self, key: str, version: int) -> storage_pb2.StorageRecordInfo:
        return self._syscall(storage_rollback=storage_pb2.StorageRollbackRequest(key=key, version=version))

    def storage_search(
        self, query: str, limit: int = 10, prefix: str = "", metadata: dict[str, str] | None = None
    ) -> list[storage_pb2.StorageSearchHit]:
        request = storage_pb2.StorageSearchRequest(query=query, limit=limit, prefix=prefix, metadata=metadata or {})
        return list(self._syscall(storage_search=request).hits)

    def storage_grant(self, grantee: str, key: str, prefix: bool = False) -> storage_pb2.StorageGrant:
        """Lets agent `grantee` read `key` (or, with `prefix`, every key starting with it)."""
        return self._syscall(storage_grant=storage_pb2.StorageGrantRequest(grantee_agent_id=grantee, key=key, prefix=prefix))

    def storage_revoke(self, grantee: str, key: str, prefix: bool = False) -> storage_pb2.StorageGrant:
        return self._syscall(storage_revoke=storage_pb2.StorageGrantRequest(grantee_agent_id=grantee, key=key, prefix=prefix))

    def storage_grants(self) -> list[storage_pb2.StorageGrant]:
        return list(self._syscall(storage_grants=storage_pb2.StorageListGrantsRequest()).grants)

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
        try:
            return self.kernel.stub.GetSyscall(kernel_pb2.GetSyscallRequest(agent_id=self.id, syscall_id=syscall_id), timeout=10)
        except grpc.RpcError as exc:
            raise _raise(exc) from None
