"""A small MCP server of the project's own (stdio): text tools, to mount with `--mcp words=...`.

`python -m services.tools.example_mcp_server` speaks MCP on stdin/stdout.
"""

from __future__ import annotations

import time

from mcp.server.mcpserver import MCPServer

server = MCPServer("aios-words")


@server.tool()
def word_count(text: str) -> dict[str, int]:
    """Counts the words and characters of a text."""
    return {"words": len(text.split()), "characters": len(text)}


@server.tool()
def pause(seconds: float) -> str:
    """Waits, then says how long (a slow tool: for trying call timeouts)."""
    time.sleep(min(seconds, 60.0))
    return f"waited {seconds} s"


@server.tool()
def reverse_words(text: str) -> str:
    """Returns the text with its words in reverse order."""
    return " ".join(reversed(text.split()))


if __name__ == "__main__":
    server.run("stdio")
