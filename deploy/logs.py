"""`aios logs [SERVICE] [-f]`: the services' logs in `<home>/logs/`, merged by time.

Services write one JSON object per line (services/server.py's JsonLines); other lines (llama.cpp's own output, a
crash's traceback, the supervisor's) are shown as they are, under the file's name and the time of the line
before them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator


@dataclass
class LogLine:
    source: str  # the log file's name without .log: the service (memory_2), or supervisor
    raw: str
    event: dict | None  # the parsed JSON object, None for a line that is not one
    ts: str = ""  # ISO 8601; a plain line takes the time of the one before it

    def matches(self, syscall: str, agent: str, level: str) -> bool:
        event = self.event or {}
        if syscall and event.get("syscall_id") != syscall:
            return False
        if agent and event.get("agent_id") != agent:
            return False
        return not level or LEVELS.get(event.get("level", ""), 0) >= LEVELS[level]

    def text(self) -> str:
        """For a terminal: what a log holds (an agent's words quoted in a message, say) with its control characters
        shown escaped, so that a line cannot move the cursor or pass for another."""
        if self.event is None:
            return _shown(f"{self.ts[11:23]:<12} {self.source:<10} {self.raw}")
        e = self.event
        about = " ".join(f"{name.split('_')[0]}={e[name]}" for name in ("syscall_id", "agent_id", "trace_id")
                         if e.get(name))
        text = f"{e.get('ts', '')[11:23]:<12} {e.get('service', self.source):<10} {e.get('level', ''):<7} " \
               f"{e.get('message', '')}{f'  [{about}]' if about else ''}"
        return _shown(text) + (f"\n{e['exception']}" if e.get("exception") else "")

    def json(self) -> str:
        return self.raw if self.event is not None else json.dumps({"ts": self.ts, "service": self.source,
                                                                   "message": self.raw})


def _shown(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}


@dataclass
class LogFile:
    """One service's log, read from where the last read stopped (whole lines only)."""

    path: Path
    offset: int = 0
    last_ts: str = ""
    _partial: bytes = field(default=b"", repr=False)

    @property
    def source(self) -> str:
        return self.path.stem

    def read_new(self) -> list[LogLine]:
        try:
            with self.path.open("rb") as f:
                if f.seek(0, 2) < self.offset:  # the file was truncated or replaced: from its start
                    self.offset, self._partial = 0, b""
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        complete, _, self._partial = (self._partial + data).rpartition(b"\n")  # a line still being written waits
        lines = []
        for raw in complete.decode(errors="replace").split("\n"):  # lines end at \n only, as services write them
            raw = raw.removesuffix("\r")
            if not raw.strip():
                continue
            event = _event(raw)
            if event is not None:
                self.last_ts = event.get("ts", self.last_ts)
            lines.append(LogLine(self.source, raw, event, self.last_ts))
        return lines


def _event(raw: str) -> dict | None:
    if not raw.startswith("{"):
        return None
    try:
        event = json.loads(raw)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


def log_files(logs: Path, service: str = "") -> list[LogFile]:
    """The logs of `service` (its replicas too: memory, memory_2, ...), or all."""
    paths = sorted(logs.glob("*.log"))
    if service:
        paths = [p for p in paths if p.stem == service or p.stem.startswith(service + "_")]
    return [LogFile(path) for path in paths]


def merged(files: Iterable[LogFile]) -> list[LogLine]:
    """What the files hold now, in time order (lines of one file keep their order)."""
    lines = [line for f in files for line in f.read_new()]
    return sorted(lines, key=lambda line: line.ts)  # stable: equal times keep each file's order


def show(files: list[LogFile], out: Callable[[str], None], *, tail: int, follow: bool, as_json: bool,
         syscall: str = "", agent: str = "", level: str = "", poll_s: float = 0.2,
         running: Callable[[], bool] = lambda: True) -> None:
    """Prints the last `tail` matching lines (all if negative), then, following, new ones as they come."""
    def printed(lines: Iterable[LogLine]) -> Iterator[str]:
        for line in lines:
            if line.matches(syscall, agent, level):
                yield line.json() if as_json else line.text()

    lines = list(printed(merged(files)))
    for line in lines[max(0, len(lines) - tail):] if tail >= 0 else lines:
        out(line)
    while follow and running():
        time.sleep(poll_s)  # following a file: look for new lines a few times a second, as `tail -f` does
        for line in printed(merged(files)):
            out(line)
