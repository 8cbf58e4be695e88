"""Syscalls as data: every request an agent makes becomes a SyscallRecord."""

from __future__ import annotations

import enum
import logging
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from services.scheduler.metrics import SyscallMetrics

log = logging.getLogger("aios.kernel")


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
    """One syscall's life. Time is split by state: queued, running, preempted."""

    id: str
    agent_id: str
    kind: str
    resource: Resource
    priority: int = 0
    weight: float = 1.0
    state: SyscallState = SyscallState.QUEUED
    created_at: float = field(default_factory=time.time)
    started_at: float = 0.0
    finished_at: float = 0.0
    error: str = ""
    error_code: str = ""
    tokens_in: int = 0
    tokens_out: int = 0
    queued_s: float = 0.0
    running_s: float = 0.0
    preempted_s: float = 0.0
    preemptions: int = 0
    recoveries: int = 0  # times its generation was rebuilt after its LLM core died
    retries: int = 0  # times its manager call was repeated after the manager restarted
    core: str = ""  # the LLM core its generation last streamed from
    migrations: int = 0  # times its generation moved to another LLM core (drained, or resumed where a slot was free)
    # Scheduling state read by the policies.
    slice_used: int = 0
    enqueued_at: float = field(default_factory=time.monotonic)
    submitted_at: float = field(default_factory=time.monotonic)
    pushed_at: float = 0.0  # monotonic time it last joined its queue (its wait there: QueueStatus.wait_*)
    preemptible: bool = False  # an LLM stream is open that the core can context-switch
    preempt_requested: bool = False
    moving: bool = False  # switched out to continue on another core (a drain), not to wait for a turn
    moved_at: float = 0.0  # monotonic time its move began, until its first chunk on the new core
    trace_id: str = ""  # the trace it belongs to (services/tracing.py), "" if none
    _mark: float = field(default_factory=time.monotonic, repr=False)

    def _move(self, state: SyscallState) -> None:
        now = time.monotonic()
        elapsed = now - self._mark
        if self.state == SyscallState.QUEUED:
            self.queued_s += elapsed
        elif self.state == SyscallState.RUNNING:
            self.running_s += elapsed
        elif self.state == SyscallState.PREEMPTED:
            self.preempted_s += elapsed
        self.state, self._mark = state, now

    def start(self) -> None:
        """Dispatched (first time, or resumed after a preemption)."""
        self._move(SyscallState.RUNNING)
        self.started_at = self.started_at or time.time()
        self.slice_used = 0

    def preempt(self) -> None:
        self._move(SyscallState.PREEMPTED)
        self.preemptions += 1
        self.enqueued_at = time.monotonic()

    def finish(self, error_code: str = "", error: str = "") -> None:
        self._move(SyscallState.FAILED if error_code else SyscallState.DONE)
        self.error_code, self.error = error_code, error
        self.finished_at = time.time()

    @property
    def finished(self) -> bool:
        return self.state in (SyscallState.DONE, SyscallState.FAILED)


def about(record: SyscallRecord) -> dict[str, str]:
    """A log event's fields naming the syscall it is about (`log.info(..., extra=about(record))`): in the JSON line,
    for `aios logs --syscall ID` and log search."""
    return {"syscall_id": record.id, "agent_id": record.agent_id, "trace_id": record.trace_id}


class SyscallTable:
    """All live syscalls plus the most recent finished ones (bounded), with counters."""

    def __init__(self, keep_finished: int = 10_000,
                 on_change: Callable[[SyscallRecord], None] = lambda record: None) -> None:
        self.keep_finished = keep_finished
        self.on_change = on_change  # told of every new and every finished record (the journal in Redis)
        self._records: OrderedDict[str, SyscallRecord] = OrderedDict()
        self._of_agent: dict[str, OrderedDict[str, SyscallRecord]] = {}  # the same records by agent, oldest first
        self._lock = threading.Lock()
        self.total = 0
        self.metrics = SyscallMetrics()  # counts of the finished ones

    def create(self, agent_id: str, kind: str, resource: Resource, priority: int = 0, weight: float = 1.0,
               syscall_id: str = "") -> SyscallRecord:
        """A new record; with `syscall_id`, the record of a syscall an earlier kernel suspended, continued."""
        with self._lock:
            # Random ids: unique across kernel restarts (LLM snapshots in Redis are keyed by them) and unguessable.
            record = SyscallRecord(syscall_id or f"sc-{secrets.token_hex(10)}", agent_id, kind, resource, priority,
                                   weight)
            self._records[record.id] = record
            self._of_agent.setdefault(agent_id, OrderedDict())[record.id] = record
            self.total += 1
            self._trim_locked()
        self.on_change(record)
        return record

    def count_finished(self, record: SyscallRecord) -> None:
        """Adds a record that just became DONE or FAILED to the counters."""
        with self._lock:
            self.metrics.count(record)
        if log.isEnabledFor(logging.DEBUG):  # an event per syscall: only when asked (--log-level DEBUG)
            log.debug("syscall %s %s %s in %.1f ms (queued %.1f ms)%s", record.id, record.kind,
                      record.state.name.lower(), 1000 * (record.queued_s + record.running_s + record.preempted_s),
                      1000 * record.queued_s, f": {record.error_code} {record.error}" if record.error_code else "",
                      extra=about(record))
        self.on_change(record)

    def in_flight_by_agent(self) -> dict[str, tuple[int, int]]:
        """Per agent with syscalls not finished: how many wait in a queue (preempted ones included), how many run."""
        with self._lock:
            live = [record for record in self._records.values() if not record.finished]
        counts: dict[str, tuple[int, int]] = {}
        for record in live:
            queued, running = counts.get(record.agent_id, (0, 0))
            if record.state == SyscallState.RUNNING:
                running += 1
            else:
                queued += 1
            counts[record.agent_id] = (queued, running)
        return counts

    def newest(self, agent_id: str, kind: str, limit: int) -> list[SyscallRecord]:
        """Up to `limit` records, newest first, of `agent_id` (all agents if empty) and `kind` (all if empty). An
        agent's are found among its own only: an agent asking cannot make the kernel scan everyone's."""
        found = []
        with self._lock:
            records = self._of_agent.get(agent_id, {}) if agent_id else self._records
            for record in reversed(records.values()):
                if not kind or record.kind == kind:
                    found.append(record)
                    if len(found) == limit:
                        break
        return found

    def get(self, syscall_id: str) -> SyscallRecord | None:
        with self._lock:
            return self._records.get(syscall_id)

    def _trim_locked(self) -> None:
        """Drops the oldest finished records; stops scanning once it has found enough. Only past a tenth more than
        it keeps, and then down to what it keeps: the scan passes the live records before the finished ones, and at
        2,000 syscalls in flight scanning on every new record was a few percent of the kernel's CPU."""
        if len(self._records) <= self.keep_finished + self.keep_finished // 10:
            return
        excess = len(self._records) - self.keep_finished
        victims: list[str] = []
        for key, record in self._records.items():
            if record.finished:
                victims.append(key)
                if len(victims) == excess:
                    break
        for key in victims:
            record = self._records.pop(key)
            kept = self._of_agent[record.agent_id]
            del kept[key]
            if not kept:
                del self._of_agent[record.agent_id]
