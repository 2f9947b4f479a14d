"""A small MCP server for the adapter's tests (the SDK's MCPServer): stdio by default, streamable HTTP on
127.0.0.1 with ``--http PORT``."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from mcp.server.mcpserver import MCPServer

server = MCPServer("opd-test", log_level="ERROR")
notes: list[str] = []


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def fail(message: str) -> str:
    """Always fails with the message."""
    from mcp.server.mcpserver.exceptions import ToolError

    raise ToolError(message)


@server.tool()
async def slow(seconds: float) -> str:
    """Answer after sleeping."""
    await asyncio.sleep(seconds)
    return "done"


@server.tool(name="notes.add")
def add_note(text: str, tags: list[str] | None = None) -> str:
    """Keep a note (the server's state lives as long as its session)."""
    notes.append(text)
    return f"{len(notes)} notes"


@server.tool()
def pid() -> int:
    """The server's process id."""
    return os.getpid()


@server.tool()
def die() -> str:
    """End the server process at once, as a crash would."""
    os._exit(3)


if __name__ == "__main__":
    logging.disable(logging.WARNING)
    if sys.argv[1:2] == ["--http"]:
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run()
