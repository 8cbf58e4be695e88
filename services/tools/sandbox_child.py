"""The sandbox's first process: confines itself, then runs the code and cleans up after it.

Run as `python -m services.tools.sandbox_child` by services/tools/sandbox.py, in
a fresh process (no preexec_fn in the threaded tool service), with its config
(the code included) on stdin: never on a command line, which any local process
can read. In order: resource limits, the private working directory, an
unprivileged uid of its own (when the service runs as root). Then it forks the
code with an empty environment and supervises it: it reaps every descendant,
enforces the wall time, and kills what is left when the code exits, so a fork
bomb leaves nothing behind.

With bubblewrap (`bwrap`), the code runs inside it: user, pid, mount, network,
IPC and UTS namespaces; a read-only /usr as the whole root; a private /proc; a
tmpfs /tmp (and /dev/shm) of `file_bytes`, gone with the run, the rest read-only;
no capabilities; no_new_privs; the seccomp filter of services/tools/seccomp.py;
the code handed over in a memfd as /aios/main.py. Without it (a machine where it is missing), the code runs
as before: a network namespace with no interfaces up, `python -I -c CODE`.
Prints one JSON line on stderr if confinement fails.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys
import time
from typing import Sequence

from services.tools import seccomp

CLONE_NEWNET = 0x40000000
PR_SET_CHILD_SUBREAPER = 36
TIMED_OUT = 124  # exit status when the wall time passed
CPU_EXCEEDED = 123  # exit status when the run's processes together used up its CPU time (its cgroup says)
CHECK_EVERY_S = 0.05
# Bound read-only for a confined process that may use the network.
NETWORK_FILES = ("/etc/resolv.conf", "/etc/hosts", "/etc/nsswitch.conf", "/etc/ssl", "/etc/ca-certificates")


def confine(config: dict) -> None:
    limits = {
        resource.RLIMIT_CPU: config["cpu_seconds"],  # soft; the hard limit (SIGKILL) a second later
        resource.RLIMIT_AS: config["memory_bytes"],
        resource.RLIMIT_FSIZE: config["file_bytes"],
        resource.RLIMIT_NOFILE: 64,
        resource.RLIMIT_NPROC: config["processes"],
        resource.RLIMIT_CORE: 0,
    }
    for which, value in limits.items():
        resource.setrlimit(which, (value, value + 1 if which == resource.RLIMIT_CPU else value))
    if config["network"] and not config["bwrap"]:  # bwrap makes its own network namespace
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET) failed")
    for procs in config["cgroup_procs"]:  # the run's cgroup: every process it starts is counted there too
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    os.chdir(config["workdir"])
    if config["uid"] is not None:
        os.setgroups([])
        os.setgid(config["uid"])
        os.setuid(config["uid"])


def main() -> None:
    config = json.loads(sys.stdin.read())
    try:
        confine(config)
    except OSError as exc:
        sys.stderr.write(json.dumps({"sandbox_error": str(exc)}) + "\n")
        sys.exit(125)
    sys.exit(supervise(config))


def supervise(config: dict) -> int:
    """Runs the code as a child and reaps every process it leaves (this process is their subreaper);
    when the code exits or the wall time passes, kills whatever of it is still running. Returns the exit
    status to report: the code's, TIMED_OUT, or (by dying the same way) the signal that killed it."""
    own_uid = config["uid"] is not None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    env = {"PATH": "/usr/bin:/bin", "HOME": config["workdir"], "LANG": "C.UTF-8"}
    child = os.fork()
    if child == 0:
        os.setpgid(0, 0)
        if config["bwrap"]:
            argv = bwrap_argv(config)
            os.execve(config["bwrap"], argv, env)
        os.execve(config["python"], [config["python"], "-I", "-c", config["code"]], env)

    def kill_the_rest(*_: object) -> None:
        # With a uid of its own, every other process of that uid is the code's; else its process group.
        try:
            os.kill(-1, signal.SIGKILL) if own_uid else os.killpg(child, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    ended = 0  # TIMED_OUT or CPU_EXCEEDED once a limit of the whole run is reached
    deadline = time.monotonic() + config["wall_seconds"]
    cpu_ns = config["cpu_seconds"] * 1_000_000_000

    def on_tick(*_: object) -> None:
        nonlocal ended
        if ended:
            return
        if time.monotonic() >= deadline:
            ended = TIMED_OUT
        elif config["cpu_usage_file"]:
            with open(config["cpu_usage_file"]) as usage:
                if int(usage.read()) >= cpu_ns:
                    ended = CPU_EXCEEDED
        if ended:
            kill_the_rest()

    signal.signal(signal.SIGALRM, on_tick)
    signal.setitimer(signal.ITIMER_REAL, CHECK_EVERY_S, CHECK_EVERY_S)
    status = 0
    while True:
        try:
            pid, code = os.wait()
        except ChildProcessError:  # every descendant reaped
            break
        if pid == child:
            status = code
            kill_the_rest()
    signal.setitimer(signal.ITIMER_REAL, 0)
    if ended:
        return ended
    if os.WIFSIGNALED(status):
        signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
        os.kill(os.getpid(), os.WTERMSIG(status))
    return os.waitstatus_to_exitcode(status)


def _memfd(name: str, data: bytes) -> int:
    """An inheritable in-memory file holding `data`, read from its start by bwrap."""
    fd = os.memfd_create(name, 0)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    os.set_inheritable(fd, True)
    return fd


def confinement_argv(bwrap: str, tmp_bytes: int, *, network: bool = False, read_only: Sequence[str] = (),
                     hidden: Sequence[str] = (), extra: Sequence[str] = (), chdir: str = "/tmp",
                     path: str = "/usr/bin:/bin") -> list[str]:
    """bubblewrap's options for one confined process tree (the module's docstring says what each part keeps out):
    /usr and `read_only` bound read-only, `hidden` directories covered by an empty tmpfs, writable /tmp and
    /dev/shm of `tmp_bytes` each, the host network only if `network`. `extra` options come before the root is
    made read-only. The program and its arguments follow "--"."""
    argv = [bwrap, "--die-with-parent", "--new-session", "--unshare-all", "--unshare-user"]
    if network:
        argv.append("--share-net")
    argv += ["--uid", "65534", "--gid", "65534", "--cap-drop", "ALL",
             "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
             "--symlink", "usr/bin", "/bin", "--proc", "/proc", "--dev", "/dev",
             "--size", str(tmp_bytes), "--tmpfs", "/tmp", "--size", str(tmp_bytes), "--tmpfs", "/dev/shm"]
    for directory in read_only:  # after /tmp, so that a path under /tmp is bound, not covered
        argv += ["--ro-bind", directory, directory]
    if network:  # name resolution and certificates, to reach what the operator allowed
        argv += [option for name in NETWORK_FILES if os.path.exists(name) for option in ("--ro-bind", name, name)]
    for directory in hidden:
        argv += ["--tmpfs", directory, "--remount-ro", directory]
    argv += [*extra, "--remount-ro", "/dev", "--remount-ro", "/",  # writable: /tmp and /dev/shm only
             "--chdir", chdir,
             "--clearenv", "--setenv", "PATH", path, "--setenv", "HOME", "/tmp", "--setenv", "LANG", "C.UTF-8"]
    if seccomp.available():
        argv += ["--seccomp", str(_memfd("aios-seccomp", seccomp.filter_program()))]
    return argv


def bwrap_argv(config: dict) -> list[str]:
    """bubblewrap's command line for one run: the code handed over in a memfd as /aios/main.py."""
    code = _memfd("aios-code", config["code"].encode())
    options = confinement_argv(config["bwrap"], config["file_bytes"],
                               extra=["--dir", "/aios", "--file", str(code), "/aios/main.py"])
    return options + ["--", config["python"], "-I", "/aios/main.py"]


if __name__ == "__main__":
    main()
