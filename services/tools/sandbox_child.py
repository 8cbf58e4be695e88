"""The sandbox's first process: confines itself, then becomes `python -I -c CODE`.

Run as `python -m services.tools.sandbox_child CONFIG_JSON` by services/tools/
sandbox.py, in a fresh process (no preexec_fn in the threaded tool service).
In order: resource limits, a network namespace with no interfaces up (if the
kernel lets us unshare it), the private working directory, an unprivileged uid
of its own (when the service runs as root), then exec with an empty
environment. Prints one JSON line on stderr if a step it depends on fails.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import sys

CLONE_NEWNET = 0x40000000


def confine(config: dict) -> None:
    limits = {
        resource.RLIMIT_CPU: config["cpu_seconds"],
        resource.RLIMIT_AS: config["memory_bytes"],
        resource.RLIMIT_FSIZE: config["file_bytes"],
        resource.RLIMIT_NOFILE: 64,
        resource.RLIMIT_NPROC: config["processes"],
        resource.RLIMIT_CORE: 0,
    }
    for which, value in limits.items():
        resource.setrlimit(which, (value, value))
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
    env = {"PATH": "/usr/bin:/bin", "HOME": config["workdir"], "LANG": "C.UTF-8"}
    os.execve(sys.executable, [sys.executable, "-I", "-c", config["code"]], env)


if __name__ == "__main__":
    main()
