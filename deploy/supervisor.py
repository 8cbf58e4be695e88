"""Keeping AIOS's processes running: what `aios up` does after starting them.

Like systemd's Restart=on-failure with a start limit: a service that exits
while it should run is started again on the address it had (its clients'
channels reconnect by themselves), after a backoff that doubles with each
restart in a row; one that keeps dying (more than `burst` restarts within
`interval_s`) is marked FAILED and left alone, and said so, not hidden.
Every change is logged and written to endpoints.json, which `aios status` reads.
"""

from __future__ import annotations

import enum
import signal
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol


class ServiceState(enum.Enum):
    RUNNING = "running"
    BACKING_OFF = "backing-off"  # exited; restarts when its backoff ends
    FAILED = "failed"  # a crash loop: no more restarts until the operator acts


def exit_description(returncode: int) -> str:
    """'killed by SIGKILL' or 'exit code 1', as a person reads it."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


@dataclass(frozen=True)
class RestartPolicy:
    first_delay_s: float = 0.2
    max_delay_s: float = 30.0
    burst: int = 5  # restarts allowed within interval_s; one more is a crash loop
    interval_s: float = 60.0

    def delay(self, restarts_in_a_row: int) -> float:
        return min(self.first_delay_s * 2 ** max(restarts_in_a_row - 1, 0), self.max_delay_s)


@dataclass
class ServiceRecord:
    """What the supervisor knows of one service: its state, its restarts and how it last ended."""
    name: str
    pid: int
    state: ServiceState = ServiceState.RUNNING
    restarts: int = 0
    last_exit: str = ""
    started_at: float = field(default_factory=time.time)
    restart_at: float = 0.0  # monotonic time the next start is due (BACKING_OFF)
    recent: deque = field(default_factory=deque)  # monotonic times of recent exits, for the start limit

    def as_json(self) -> dict:
        return {"state": self.state.value, "pid": self.pid, "restarts": self.restarts, "last_exit": self.last_exit,
                "started_at": self.started_at}


class Supervised(Protocol):
    """What the supervisor needs of a running system (deploy.cluster.Cluster)."""

    def exited(self) -> dict[str, int]: ...  # name -> return code, for services that have exited

    def restart_service(self, name: str) -> str: ...

    def pid_of(self, name: str) -> int: ...

    def keep_standbys(self) -> bool: ...  # starts hot standbys that are due; True if it started one


class Supervisor:
    def __init__(self, system: Supervised, names: list[str], policy: RestartPolicy = RestartPolicy(),
                 say: Callable[[str], None] = print, on_change: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.system = system
        self.policy = policy
        self.say = say
        self.on_change = on_change
        self.clock = clock
        self.services = {name: ServiceRecord(name, system.pid_of(name)) for name in names}

    def tick(self) -> None:
        """One look: notices services that exited, starts those whose backoff is over."""
        changed = False
        for name, code in self.system.exited().items():
            record = self.services[name]
            if record.state is ServiceState.RUNNING:
                self._ended(record, exit_description(code))
                changed = True
        for record in self.services.values():
            if record.state is not ServiceState.BACKING_OFF or self.clock() < record.restart_at:
                continue
            changed = True
            try:
                address = self.system.restart_service(record.name)
            except Exception as exc:  # noqa: BLE001 - a start that fails counts like one more exit
                self._ended(record, f"restart failed: {exc}")
                continue
            record.state, record.pid, record.started_at = ServiceState.RUNNING, self.system.pid_of(record.name), time.time()
            record.restarts += 1
            self.say(f"restarted {record.name} at {address} (pid {record.pid}, restart {record.restarts})")
        changed = self.system.keep_standbys() or changed
        if changed:
            self.on_change()

    def _ended(self, record: ServiceRecord, how: str) -> None:
        now = self.clock()
        record.last_exit = how
        record.recent.append(now)
        while now - record.recent[0] > self.policy.interval_s:
            record.recent.popleft()
        if len(record.recent) > self.policy.burst:
            record.state = ServiceState.FAILED
            self.say(f"{record.name}: {how}; it ended {len(record.recent)} times within {self.policy.interval_s:.0f} s: "
                     "a crash loop, not restarting it (see its log; `aios down` and `aios up` to try again)")
            return
        record.state = ServiceState.BACKING_OFF
        delay = self.policy.delay(len(record.recent))
        record.restart_at = now + delay
        self.say(f"{record.name}: {how}; restarting it in {delay:.1f} s")

    def as_json(self) -> dict[str, dict]:
        return {name: record.as_json() for name, record in self.services.items()}


@contextmanager
def supervising(supervisor: Supervisor, every_s: float = 0.1) -> Iterator[Supervisor]:
    """Ticks `supervisor` in a thread while the block runs (the tests, the bench); `aios up` ticks it in its
    main loop instead."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            supervisor.tick()
            stop.wait(every_s)

    thread = threading.Thread(target=loop, name="aios-supervisor", daemon=True)
    thread.start()
    try:
        yield supervisor
    finally:
        stop.set()
        thread.join()
