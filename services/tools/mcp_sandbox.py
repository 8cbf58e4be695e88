"""Starting an MCP server in the same kind of bubblewrap sandbox as agents' code (services/tools/sandbox_child.py).

The MCP client library starts the server itself and talks to it over stdin and
stdout, so it cannot hand bubblewrap the seccomp filter's file descriptor. It
starts `python -m services.tools.mcp_sandbox CONFIG` instead: this process joins
the server's cgroup, makes the filter, and becomes bubblewrap (exec), so the
server inherits the pipes. CONFIG is JSON (the operator's command, not an
agent's secret, so a command line is fine).

What the server sees: /usr, the Python installation and virtualenv AIOS runs
from, the project's directory and the operator's `read_only` paths, all
read-only; the AIOS home (secrets, data, logs, endpoints) covered by an empty
tmpfs; its own /tmp; its own pid namespace; no network unless the operator
allows it. Its memory and process count are limited by its cgroup (where cgroup
v1 is writable). Outside its user namespace it keeps the tool service's uid:
the interpreter may live under a 0700 home, which another uid could not read.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from services.tools.sandbox_child import confinement_argv

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TMP_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class McpSandboxConfig:
    bwrap: str
    command: list[str]
    network: bool = False
    read_only: list[str] = field(default_factory=list)
    hidden: list[str] = field(default_factory=list)
    cgroup_procs: list[str] = field(default_factory=list)

    def launcher(self) -> list[str]:
        """The command the MCP client starts: this module, which becomes bubblewrap around `command`."""
        return [sys.executable, "-m", "services.tools.mcp_sandbox", json.dumps(asdict(self))]


def visible_paths(command: list[str], read_only: list[str]) -> list[str]:
    """What the server must read to start: Python and the virtualenv, the project, the program's directory."""
    paths = [sys.prefix, sys.base_prefix, str(Path(sys.executable).resolve().parents[1]), str(PROJECT_ROOT)]
    if os.path.isabs(command[0]):
        paths.append(str(Path(command[0]).resolve().parent))
    paths += [str(Path(p).resolve()) for p in read_only]
    unique = []
    for path in paths:
        if path not in unique and not path.startswith("/usr/") and os.path.exists(path):
            unique.append(path)
    return unique


def argv(config: McpSandboxConfig) -> list[str]:
    program = config.command[0]
    path = f"{Path(program).parent}:/usr/bin:/bin" if os.path.isabs(program) else "/usr/bin:/bin"
    options = confinement_argv(config.bwrap, TMP_BYTES, network=config.network,
                               read_only=visible_paths(config.command, config.read_only),
                               hidden=config.hidden, chdir=str(PROJECT_ROOT), path=path)
    return options + ["--", *config.command]


def main() -> None:
    config = McpSandboxConfig(**json.loads(sys.argv[1]))
    for procs in config.cgroup_procs:  # the server and everything it starts count against its cgroup's limits
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    os.execv(config.bwrap, argv(config))


if __name__ == "__main__":
    main()
