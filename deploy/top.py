"""`aios top`: a live view of the kernel, over its gRPC status API (GetStatus, operator credential), so it runs from
any host that reaches the kernel.

`TopView` is plain: it takes one KernelStatus after another (rates come from the difference of two), keys, and
renders Rich tables; `run_top` refreshes it and reads keys from the terminal.
"""

from __future__ import annotations

import os
import select
import sys
import termios
import time
import tty
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from aios.v1 import common_pb2, kernel_pb2

# Agent table orders, cycled by the `s` key: (name, what to sort by, largest first)
SORTS: dict[str, tuple[Callable[["AgentRow"], object], bool]] = {
    "busy": (lambda row: (row.activity.queued + row.activity.running, row.tokens_per_s or 0.0), True),
    "tokens": (lambda row: row.activity.tokens_generated, True),
    "rate": (lambda row: row.tokens_per_s or 0.0, True),
    "queued": (lambda row: row.activity.queued, True),
    "preemptions": (lambda row: row.activity.preemptions, True),
    "failed": (lambda row: row.activity.failed, True),
    "name": (lambda row: row.activity.name or row.activity.agent_id, False),
}
HELP = "keys: s sort · / filter · p pause · q quit"


@dataclass
class AgentRow:
    activity: kernel_pb2.AgentActivity
    tokens_per_s: float | None  # None before a second sample


@dataclass
class TopView:
    """What `aios top` shows, from the last two statuses, and its keys' state."""

    kernel: str = ""
    sort: str = "busy"
    filter: str = ""
    paused: bool = False
    typing: str | None = None  # the filter being typed after `/`, until Enter
    status: kernel_pb2.KernelStatus | None = None
    at: float = 0.0
    previous: kernel_pb2.KernelStatus | None = None
    previous_at: float = 0.0
    quit: bool = False
    _previous_tokens: dict[str, int] = field(default_factory=dict)

    def update(self, status: kernel_pb2.KernelStatus, now: float) -> None:
        if self.paused:
            return
        if self.status is not None:
            self.previous, self.previous_at = self.status, self.at
            self._previous_tokens = {a.agent_id: a.tokens_generated for a in self.status.activity}
        self.status, self.at = status, now

    def key(self, key: str) -> None:
        """One key press: s cycles the agents' order, / starts typing a filter (Enter keeps it, Escape clears it),
        p pauses and resumes, q quits."""
        if self.typing is not None:
            if key in ("\r", "\n"):
                self.filter, self.typing = self.typing, None
            elif key == "\x1b":
                self.filter, self.typing = "", None
            elif key in ("\x7f", "\b"):
                self.typing = self.typing[:-1]
            elif key.isprintable():
                self.typing += key
            return
        if key == "s":
            names = list(SORTS)
            self.sort = names[(names.index(self.sort) + 1) % len(names)]
        elif key == "/":
            self.typing = ""
        elif key == "p":
            self.paused = not self.paused
        elif key == "q":
            self.quit = True

    def _rate(self, now: float, then: float) -> float | None:
        seconds = self.at - self.previous_at
        if self.previous is None or seconds <= 0:
            return None
        return (now - then) / seconds

    def agents(self) -> list[AgentRow]:
        assert self.status is not None
        rows = []
        for activity in self.status.activity:
            text = f"{activity.name} {activity.agent_id}"
            if self.filter and self.filter.lower() not in text.lower():
                continue
            before = self._previous_tokens.get(activity.agent_id, 0)
            rows.append(AgentRow(activity, self._rate(activity.tokens_generated, before)))
        order, largest_first = SORTS[self.sort]
        return sorted(rows, key=order, reverse=largest_first)

    def render(self) -> RenderableType:
        if self.status is None:
            return Text(f"waiting for the kernel at {self.kernel} ...")
        s = self.status
        queue_rows = {(q.resource, q.name): q for q in self.previous.queues} if self.previous else {}
        done_before = sum(q.completed for q in queue_rows.values())
        rate = self._rate(sum(q.completed for q in s.queues), done_before)
        tokens = self._rate(s.tokens_generated, self.previous.tokens_generated if self.previous else 0)
        refused = ", ".join(f"{reason} {n}" for reason, n in sorted(s.refusals.items())) or "none"
        title = Text.assemble(
            ("AIOS top", "bold"), f"  kernel {self.kernel}  {time.strftime('%H:%M:%S', time.localtime(self.at))}"
            f"  agents {s.agents}  syscalls {s.syscalls_total} (failed {s.syscalls_failed})"
            f"  {_per_s(rate)} syscalls/s  {_per_s(tokens)} tok/s  refused: {refused}",
            ("  PAUSED" if self.paused else "", "bold red"))
        parts: list[RenderableType] = [title, self._queues(queue_rows), self._cores()]
        if s.HasField("memory"):
            m = s.memory
            faults = self._rate(m.faults, self.previous.memory.faults if self.previous else 0)
            parts.append(Text(f"memory: {m.entries} entries of {m.agents} agents, {_bytes(m.resident_bytes)} resident "
                              f"of {_bytes(m.ram_budget_bytes)} budget, hit ratio {m.hit_ratio:.2f}, "
                              f"{_per_s(faults)} faults/s, {m.evictions} evictions"))
        health = "  ".join(f"{svc.name} {'up' if svc.healthy else 'DOWN'}" for svc in s.services)
        parts.append(Text(f"services: {health}  redis {'up' if s.redis_ok else 'DOWN'}"))
        parts.append(self._agents())
        typing = f"  filter: {self.typing}_" if self.typing is not None else (
            f"  filter: {self.filter!r}" if self.filter else "")
        parts.append(Text(f"{HELP}  (sorted by {self.sort}){typing}", style="dim"))
        return Group(*parts)

    def _queues(self, previous: dict) -> Table:
        table = Table(title="queues", title_justify="left", expand=False)
        for column in ("queue", "policy", "waiting", "preempted", "running", "done/s", "wait p50", "wait p99",
                       "preemptions"):
            table.add_column(column, justify="left" if column in ("queue", "policy") else "right")
        for q in self.status.queues:
            name = f"tool {q.name}" if q.name else common_pb2.Resource.Name(q.resource).removeprefix("RESOURCE_").lower()
            before = previous.get((q.resource, q.name))
            table.add_row(name, q.policy, str(q.queued), str(q.preempted), f"{q.running}/{q.capacity}",
                          _per_s(self._rate(q.completed, before.completed if before else 0)),
                          _ms(q.wait_p50_seconds), _ms(q.wait_p99_seconds), str(q.preemptions))
        return table

    def _cores(self) -> RenderableType:
        s = self.status
        table = Table(title="LLM cores", title_justify="left")
        for column in ("core", "state", "decoding", "parked", "dispatched", "migrated in/out"):
            table.add_column(column, justify="left" if column in ("core", "state") else "right")
        for core in s.cores:
            state = kernel_pb2.LLMCoreState.Name(core.state).removeprefix("LLM_CORE_STATE_").lower()
            table.add_row(core.name, state, f"{core.running}/{core.slots}", str(core.parked), str(core.dispatched),
                          f"{core.migrated_in}/{core.migrated_out}")
        if not s.HasField("llm"):
            return table
        llm, before = s.llm, (self.previous.llm if self.previous else None)
        steps = llm.steps - (before.steps if before else 0)
        batch = (llm.decode_rows - (before.decode_rows if before else 0)) / steps if steps else 0.0
        line = Text(f"llm: {llm.slots_busy}/{llm.slots} slots decoding, {llm.slots_parked} parked, batch {batch:.1f}, "
                    f"{_per_s(self._rate(llm.tokens_generated, before.tokens_generated if before else 0))} tok/s, "
                    f"prefill {llm.prefill_tokens} tokens ({llm.prefill_tokens_saved} saved by shared prefixes), "
                    f"snapshots in Redis {llm.snapshots_in_redis} ({_bytes(llm.snapshot_bytes_saved)} written)")
        return Group(table, line)

    def _agents(self) -> Table:
        rows = self.agents()
        table = Table(title=f"agents ({len(rows)} shown of the {len(self.status.activity)} busiest)",
                      title_justify="left")
        for column in ("agent", "id", "waiting", "running", "tok/s", "tokens", "quota tok/min", "finished", "failed",
                       "preemptions"):
            table.add_column(column, justify="left" if column in ("agent", "id") else "right")
        for row in rows:
            a = row.activity
            table.add_row(_plain(a.name), _plain(a.agent_id), str(a.queued), str(a.running), _per_s(row.tokens_per_s),
                          str(a.tokens_generated), str(a.tokens_per_minute or "-"), str(a.finished), str(a.failed),
                          str(a.preemptions))
        return table


def _plain(text: str) -> Text:
    """What an agent chose (its name) as literal text: no Rich markup, no terminal control characters."""
    return Text("".join(c if c.isprintable() else "?" for c in text))


def _per_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds else "-"


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@contextmanager
def _keys() -> Iterator[Callable[[float], list[str]]]:
    """A function returning the keys pressed within a timeout (the terminal in cbreak mode meanwhile); none when
    stdin is not a terminal."""
    if not sys.stdin.isatty():
        yield lambda timeout: (time.sleep(timeout), [])[1]  # no keyboard: only the refresh period passes
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        def read(timeout: float) -> list[str]:
            ready, _, _ = select.select([fd], [], [], timeout)
            return list(os.read(fd, 64).decode(errors="replace")) if ready else []
        yield read
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def run_top(fetch: Callable[[], kernel_pb2.KernelStatus], view: TopView, interval: float, once: bool) -> None:
    """Shows `view`, fed by `fetch` every `interval` seconds, until `q` (or Ctrl-C); `once`: one frame, printed."""
    if once:
        view.update(fetch(), time.time())
        from rich.console import Console
        Console(width=200).print(view.render())
        return
    with _keys() as keys, Live(view.render(), auto_refresh=False, screen=False) as live:
        next_fetch = 0.0
        while not view.quit:
            if time.monotonic() >= next_fetch:
                view.update(fetch(), time.time())
                next_fetch = time.monotonic() + interval
            live.update(view.render(), refresh=True)
            for key in keys(max(0.0, min(interval, next_fetch - time.monotonic()))):
                view.key(key)
