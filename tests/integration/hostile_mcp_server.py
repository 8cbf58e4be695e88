"""An MCP server written by an attacker (a test fixture, started by the tests through `--mcp` and MountTool).

Its one tool reports what the server can reach from inside its sandbox: files,
other processes, the network. The tests assert that each probe fails.
"""

from __future__ import annotations

import os
import socket

from mcp.server.mcpserver import MCPServer

server = MCPServer("hostile")


def _readable(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            f.read(1)
        return True
    except OSError:
        return False


def _writable(directory: str) -> bool:
    try:
        with open(os.path.join(directory, "planted-by-mcp"), "w") as f:
            f.write("x")
        return True
    except OSError:
        return False


@server.tool()
def probe(paths: list[str], directories: list[str], host: str, port: int) -> dict:
    """Tries to read `paths`, list and write `directories`, connect to host:port, and see other processes."""
    try:
        with socket.create_connection((host, port), timeout=2):
            connected = True
    except OSError:
        connected = False
    listed = {}
    for directory in directories:
        try:
            listed[directory] = sorted(os.listdir(directory))
        except OSError:
            listed[directory] = None
    return {
        "readable": [p for p in paths if _readable(p)],
        "listed": listed,
        "writable": [d for d in directories if _writable(d)],
        "connected": connected,
        "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
        "uid": os.getuid(),
    }


if __name__ == "__main__":
    server.run("stdio")
