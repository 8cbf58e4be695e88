"""Syscalls as data: every request an agent makes becomes a SyscallRecord."""

from __future__ import annotations

import enum
import itertools
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field


class Resource(enum.IntEnum):
    """Mirrors aios.v1.Resource."""

    LLM = 1
    MEMORY = 2
    STORAGE = 3
    TOOLS = 4


class SyscallState(enum.IntEnum):
    """Mirrors aios.v1.SyscallState."""

    QUEUED = 1
    RUNNING = 2
    PREEMPTED = 3
    DONE = 4
    FAILED = 5


@dataclass(eq=False)
class SyscallRecord:
    id: str
    agent_id: str
    kind: str
    resource: Resource
    state: SyscallState = SyscallState.QUEUED
    created_at: float = field(default_factory=time.time)
    started_at: float = 0.0
    finished_at: float = 0.0
    error: str = ""
    error_code: str = ""
    tokens_in: int = 0
    tokens_out: int = 0

    def start(self) -> None:
        self.state = SyscallState.RUNNING
        self.started_at = time.time()

    def finish(self, error_code: str = "", error: str = "") -> None:
        self.state = SyscallState.FAILED if error_code else SyscallState.DONE
        self.error_code, self.error = error_code, error
        self.finished_at = time.time()

    @property
    def finished(self) -> bool:
        return self.state in (SyscallState.DONE, SyscallState.FAILED)


class SyscallTable:
    """All live syscalls plus the most recent finished ones (bounded), with counters."""

    def __init__(self, keep_finished: int = 10_000) -> None:
        self.keep_finished = keep_finished
        self._records: OrderedDict[str, SyscallRecord] = OrderedDict()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.total = 0
        self.failed = 0
        self.tokens_out = 0

    def create(self, agent_id: str, kind: str, resource: Resource) -> SyscallRecord:
        with self._lock:
            record = SyscallRecord(f"sc-{next(self._ids)}", agent_id, kind, resource)
            self._records[record.id] = record
            self.total += 1
            self._trim_locked()
            return record

    def count_finished(self, record: SyscallRecord) -> None:
        """Adds a record that just became DONE or FAILED to the counters."""
        with self._lock:
            self.failed += record.state == SyscallState.FAILED
            self.tokens_out += record.tokens_out

    def get(self, syscall_id: str) -> SyscallRecord | None:
        with self._lock:
            return self._records.get(syscall_id)

    def _trim_locked(self) -> None:
        """Drops the oldest finished records; stops scanning once it has found enough."""
        excess = len(self._records) - self.keep_finished
        if excess <= 0:
            return
        victims: list[str] = []
        for key, record in self._records.items():
            if record.finished:
                victims.append(key)
                if len(victims) == excess:
                    break
        for key in victims:
            del self._records[key]
