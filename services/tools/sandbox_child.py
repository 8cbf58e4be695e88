"""The sandbox's first process: confines itself, then runs `python -I -c CODE` and cleans up after it.

Run as `python -m services.tools.sandbox_child CONFIG_JSON` by services/tools/
sandbox.py, in a fresh process (no preexec_fn in the threaded tool service).
In order: resource limits, a network namespace with no interfaces up (if the
kernel lets us unshare it), the private working directory, an unprivileged uid
of its own (when the service runs as root). Then it forks the code with an
empty environment, as the configured interpreter (one the sandbox uid may
execute), and supervises it: it reaps every descendant, enforces the wall
time, and kills what is left when the code exits, so a fork bomb leaves
nothing behind. Prints one JSON line on stderr if confinement fails.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNET = 0x40000000
PR_SET_CHILD_SUBREAPER = 36
TIMED_OUT = 124  # exit status when the wall time passed


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
    if config["network"]:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET) failed")
    os.chdir(config["workdir"])
    if config["uid"] is not None:
        os.setgroups([])
        os.setgid(config["uid"])
        os.setuid(config["uid"])


def main() -> None:
    config = json.loads(sys.argv[1])
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
        os.execve(config["python"], [config["python"], "-I", "-c", config["code"]], env)

    def kill_the_rest(*_: object) -> None:
        # With a uid of its own, every other process of that uid is the code's; else its process group.
        try:
            os.kill(-1, signal.SIGKILL) if own_uid else os.killpg(child, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    timed_out = False

    def on_wall_time(*_: object) -> None:
        nonlocal timed_out
        timed_out = True
        kill_the_rest()

    signal.signal(signal.SIGALRM, on_wall_time)
    signal.setitimer(signal.ITIMER_REAL, config["wall_seconds"])
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
    if timed_out:
        return TIMED_OUT
    if os.WIFSIGNALED(status):
        signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
        os.kill(os.getpid(), os.WTERMSIG(status))
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    main()
