"""Running untrusted Python in a child process, confined: bubblewrap, seccomp, a uid and a cgroup per run.

What is isolated (the tool service runs as root, as `aios up` does here; services/tools/sandbox_child.py
does the confining, `isolation()` reports what holds on this machine):
- with bubblewrap: user, pid, mount, network, IPC and UTS namespaces; a read-only /usr as the whole root;
  a private /proc; private tmpfs /tmp and /dev/shm sized by `file_bytes`, gone with the run; no
  capabilities; no_new_privs; a seccomp filter (services/tools/seccomp.py); the code in a memfd;
- a uid of its own per run (RLIMIT_NPROC counts the run's processes), rlimits on CPU, address space,
  file size and open files per process, and a wall-time limit;
- with writable cgroup v1 hierarchies: a cgroup per run whose memory limit, process limit and CPU time
  (watched by the launcher) hold for all the run's processes together;
- an empty environment, and the code and config never on a command line.
Without bubblewrap (or where it fails) the plain launcher runs the code in a network namespace with the
same uid, rlimits and cgroup; without root, no uid change, process limit or cgroup.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from services.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from services.tools import seccomp
from services.tools.sandbox_child import CPU_EXCEEDED, TIMED_OUT

log = logging.getLogger("aios.tools.sandbox")

FIRST_UID = 61_000  # uids FIRST_UID..FIRST_UID+UIDS-1 are used for sandboxed runs, one per run
UIDS = 1000
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_CONTROLLERS = ("memory", "pids", "cpuacct")  # cgroup v1 hierarchies
CGROUP_REMOVE_S = 10.0  # how long a run's cgroup waits for its killed processes to be reaped before it is removed


class RunCgroup:
    """One run's cgroup (v1): its memory, process count and CPU time, counted over all its processes together.

    Per-process rlimits let 14 forks burn 14 CPU budgets; a cgroup does not. Used where the v1 memory, pids and
    cpuacct hierarchies are writable (the tool service runs as root); `isolation()` reports whether they are."""

    def __init__(self, name: str, limits: "SandboxLimits") -> None:
        self.dirs = [CGROUP_ROOT / c / "aios-sandbox" / name for c in CGROUP_CONTROLLERS]
        for d in self.dirs:
            d.mkdir(parents=True)
        memory, pids, cpu = self.dirs
        (memory / "memory.limit_in_bytes").write_text(str(limits.memory_bytes))
        (pids / "pids.max").write_text(str(limits.processes))
        self.procs_files = [str(d / "cgroup.procs") for d in self.dirs]
        self.cpu_usage_file = str(cpu / "cpuacct.usage")
        self._memory = memory

    @staticmethod
    def available() -> bool:
        return os.geteuid() == 0 and all(os.access(CGROUP_ROOT / c, os.W_OK) for c in CGROUP_CONTROLLERS)

    def ran_out_of_memory(self) -> bool:
        """Whether the kernel killed a process of the run for passing the run's memory limit."""
        try:
            fields = dict(line.split() for line in (self._memory / "memory.oom_control").read_text().splitlines())
        except (OSError, ValueError):
            return False
        return int(fields.get("oom_kill", 0)) > 0

    def remove(self) -> None:
        """Kills whatever of the run is left in it, then removes it once they have left: a killed process stays in
        it until it is reaped. (Half a second of retries was not always enough: a full test run left a group
        behind.)"""
        deadline = time.monotonic() + CGROUP_REMOVE_S
        for d in self.dirs:
            while True:
                self._kill_members()
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:  # a process still leaving it
                    if time.monotonic() > deadline:
                        log.warning("sandbox cgroup %s still holds processes after %.0f s; left in place", d,
                                    CGROUP_REMOVE_S)
                        break
                    time.sleep(0.01)

    def _kill_members(self) -> None:
        try:
            members = (self.dirs[0] / "cgroup.procs").read_text().split()
        except FileNotFoundError:
            return
        for pid in members:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


@dataclass(frozen=True)
class SandboxLimits:
    wall_seconds: float = 10.0
    cpu_seconds: int = 5
    memory_bytes: int = 512 * 1024 * 1024
    processes: int = 16
    file_bytes: int = 16 * 1024 * 1024
    output_bytes: int = 64 * 1024


@dataclass
class RunResult:
    exit_code: int
    stdout: str
    stderr: str
    seconds: float


def default_interpreter() -> str:
    """A Python the sandbox uid may execute: the system's (the service's own may live under /root, mode 0700)."""
    system = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    return system if system and os.geteuid() == 0 else sys.executable


class Sandbox:
    def __init__(self, limits: SandboxLimits = SandboxLimits(), root: Path | None = None, interpreter: str = "") -> None:
        self.limits = limits
        self.root = root or Path(tempfile.gettempdir())
        self.interpreter = interpreter or default_interpreter()
        self.as_root = os.geteuid() == 0
        self.network_isolated = True  # until probe() finds the kernel refuses
        # bubblewrap confines each run in namespaces; run as the sandbox's own uid it needs user namespaces.
        self.bwrap = shutil.which("bwrap") or ""
        self.cgroups = RunCgroup.available()
        self._runs = itertools.count(1)
        self._uids = itertools.cycle(range(FIRST_UID, FIRST_UID + UIDS))

    def isolation(self) -> dict[str, bool]:
        confined = bool(self.bwrap)
        return {"own_uid": self.as_root, "process_limit": self.as_root, "network": self.network_isolated,
                "cpu_memory_file_limits": True, "clean_environment": True, "private_directory": True,
                "bubblewrap": confined, "pid_namespace": confined, "read_only_root": confined, "private_tmp": confined,
                "no_capabilities": confined, "seccomp": confined and seccomp.available(),
                "run_cgroup": self.cgroups, "mcp_servers_confined": confined}

    async def probe(self) -> None:
        """Checks that bubblewrap, else a network namespace, works here; says what runs go on without."""
        if self.bwrap:
            try:
                result = await self.run("print('ok')")
                if result.exit_code == 0:
                    log.info("sandbox: bubblewrap %s confines every run (namespaces, seccomp, private /tmp)", self.bwrap)
                    return
                log.warning("sandbox: bubblewrap failed here (%s); falling back to the plain launcher",
                            result.stderr.strip()[-300:])
            except (Unavailable, ResourceExhausted, DeadlineExceeded) as exc:
                log.warning("sandbox: bubblewrap failed here (%s); falling back to the plain launcher", exc)
            self.bwrap = ""
        else:
            log.warning("sandbox: bubblewrap (bwrap) is not installed; runs are confined by the plain launcher only")
        try:
            await self.run("pass")
        except Unavailable as exc:
            self.network_isolated = False
            log.warning("sandbox: no network namespace on this machine (%s); code runs with the host network", exc)

    async def run(self, code: str) -> RunResult:
        limits = self.limits
        uid = next(self._uids) if self.as_root else None
        workdir = Path(tempfile.mkdtemp(prefix="aios-sandbox-", dir=self.root))
        if uid is not None:
            os.chown(workdir, uid, uid)
        cgroup = RunCgroup(f"{os.getpid()}-{next(self._runs)}", limits) if self.cgroups else None
        config = {**asdict(limits), "code": code, "workdir": str(workdir), "uid": uid, "network": self.network_isolated,
                  "python": self.interpreter, "bwrap": self.bwrap,
                  "cgroup_procs": cgroup.procs_files if cgroup else [],
                  "cpu_usage_file": cgroup.cpu_usage_file if cgroup else ""}
        started = time.monotonic()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.tools.sandbox_child",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True, cwd=str(workdir),
        )
        assert process.stdin is not None
        process.stdin.write(json.dumps(config).encode())  # the code never goes on a command line
        process.stdin.close()
        try:
            stdout, stderr = await self._collect(process, lambda: self._kill_everything(process.pid, uid))
        finally:
            self._kill_everything(process.pid, uid)
            try:
                await asyncio.wait_for(process.wait(), 5.0)  # reap it, so its pipes close with it
            except asyncio.TimeoutError:
                log.error("sandbox process %d did not exit after SIGKILL", process.pid)
            shutil.rmtree(workdir, ignore_errors=True)
            out_of_memory = cgroup is not None and cgroup.ran_out_of_memory()
            if cgroup is not None:
                await asyncio.to_thread(cgroup.remove)  # it may wait for processes to leave
        if out_of_memory:  # even if only a child was killed: the agent learns which limit it met
            raise ResourceExhausted(f"the code used all {self.limits.memory_bytes >> 20} MB of memory its run may use "
                                    "(all its processes together) and was killed")
        return self._result(process.returncode or 0, stdout, stderr, time.monotonic() - started)

    async def _collect(self, process: asyncio.subprocess.Process, kill: Callable[[], None]) -> tuple[bytes, bytes]:
        reading = asyncio.gather(self._read(process.stdout, kill), self._read(process.stderr, kill))
        try:  # the supervisor enforces the wall time; this is the backstop if it cannot
            out, err = await asyncio.wait_for(reading, self.limits.wall_seconds + 2)
            await asyncio.wait_for(process.wait(), 2.0)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(self._past_wall_time()) from None
        if out is None or err is None:
            raise ResourceExhausted(f"the code wrote more than {self.limits.output_bytes} bytes of output and was killed")
        return out, err

    async def _read(self, stream: asyncio.StreamReader | None, kill: Callable[[], None]) -> bytes | None:
        """Everything the stream gives, or None once it passes the output limit (the run is then killed)."""
        assert stream is not None
        data = b""
        while chunk := await stream.read(65536):
            data += chunk
            if len(data) > self.limits.output_bytes:
                kill()
                return None
        return data

    def _result(self, code: int, stdout: bytes, stderr: bytes, seconds: float) -> RunResult:
        err = stderr.decode(errors="replace")
        if code == TIMED_OUT:
            raise DeadlineExceeded(self._past_wall_time())
        if code == 125 and err.startswith('{"sandbox_error"'):
            raise Unavailable(f"the sandbox could not be set up: {json.loads(err.splitlines()[0])['sandbox_error']}")
        if code == CPU_EXCEEDED:
            raise ResourceExhausted(f"the code used its {self.limits.cpu_seconds} s of CPU time (all its processes "
                                    "together) and was killed")
        if code in (-signal.SIGXCPU, 128 + signal.SIGXCPU):  # bwrap reports a signal as 128 + its number
            raise ResourceExhausted(f"the code used its {self.limits.cpu_seconds} s of CPU time and was killed")
        if code in (-signal.SIGKILL, 128 + signal.SIGKILL):
            raise ResourceExhausted("the code was killed by the operating system (out of memory?)")
        last = err.strip().splitlines()[-1] if err.strip() else ""
        if last.startswith("MemoryError"):
            raise ResourceExhausted(f"the code ran out of its {self.limits.memory_bytes // (1 << 20)} MB of memory")
        if "Resource temporarily unavailable" in err and ("fork" in err or "BlockingIOError" in err):
            raise ResourceExhausted(f"the code tried to run more than {self.limits.processes} processes")
        return RunResult(code, stdout.decode(errors="replace"), err, seconds)

    def _past_wall_time(self) -> str:
        return f"your code ran past its {self.limits.wall_seconds:g} s wall-time limit and was killed"

    def _kill_everything(self, pid: int, uid: int | None) -> None:
        """Kills the run's process group and, with its own uid, every process of that uid (a fork bomb's
        children that left the group included)."""
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if uid is None:
            return
        for _ in range(100):
            alive = _pids_of(uid)
            if not alive:
                return
            for p in alive:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)  # let the kernel reap them before looking again
        log.error("sandbox uid %d still has processes after repeated SIGKILL", uid)


def _pids_of(uid: int) -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status") as status:
                for line in status:
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) == uid:
                            pids.append(int(entry.name))
                        break
        except OSError:
            continue
    return pids
