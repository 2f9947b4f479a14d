"""The tools of an MCP server (stdio or streamable HTTP) as opd-agents tools, via the official ``mcp`` SDK
(v2; ``pip install 'opd-agents[mcp]'``).

    env = MCPToolEnv(server="python -m tools.mcp_units_server", dataset="data/units.jsonl", grader="number")
    env = MCPToolEnv(server="http://127.0.0.1:8000/mcp", dataset=[{"prompt": ..., "answer": ...}])

or, from a config / the CLI::

    env: {id: "opd_agents.env.adapters.mcp:MCPToolEnv",
          kwargs: {server: {command: python, args: [-m, tools.mcp_units_server]}, dataset: data/units.jsonl}}

``server`` is a URL (streamable HTTP), a command line (a string or a list; ``python`` means this
interpreter) or an ``mcpServers``-style entry (``{command, args, env, cwd}`` or ``{url, headers}``). Every
tool the server lists becomes an ``MCPTool``: the server's JSON schema is the schema the model sees, the
arguments are checked against it before the call, and each call has a timeout. A tool error
(``isError``), a timeout, a server-side rejection of the arguments and a dropped connection each become a
ToolResult with an ErrorType; a dropped connection also ends the episode (``tool_stop``) and the next
``reset`` reconnects (restarting a stdio server). A server that cannot be started or reached raises
``MCPServerError`` when the env is made, naming the command or URL.

Each env owns one session, on its own event-loop thread, closed by ``env.close()`` (or when the env is
garbage-collected: the rollout makes one env per episode). A stdio server therefore starts once per env.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib
import json
import re
import shlex
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from opd_agents.env.adapters import Rows, load_rows
from opd_agents.env.core import Task, ToolEnv
from opd_agents.env.tool import _NAME_RE, MAX_ERROR_CHARS, Tool, shorten
from opd_agents.errors import ConfigError, OpdError, ToolDefinitionError
from opd_agents.types import ErrorType, ToolCall, ToolResult

try:
    import jsonschema
    import mcp_types
    from mcp import Client, MCPError, StdioServerParameters
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client
except ImportError as e:  # an optional extra; v1 of the SDK lacks Client
    raise ConfigError(f"the MCP adapter needs the mcp SDK v2: pip install 'opd-agents[mcp]' ({e})") from e

ServerRef = str | Sequence[str] | Mapping[str, Any]
CLOSE_TIMEOUT_S = 10.0
CALL_GRACE_S = 5.0  # past its timeout the SDK itself gives up; this only bounds a wedged transport
STDERR_TAIL_CHARS = 600


class MCPServerError(OpdError, RuntimeError):
    """An MCP server cannot be started or reached, or does not answer the handshake or the tool listing."""


class _StartTimeout(Exception):
    """The server did not finish the handshake and the tool listing within ``connect_timeout_s``."""


class _ConnectionLost(Exception):
    """The session is gone (the server exited, the connection dropped, or the env was closed)."""


# ---- where the server is ------------------------------------------------------------------------------
@dataclass(frozen=True)
class MCPServerSpec:
    """A stdio command (``command``, with ``env``/``cwd``) or a streamable-HTTP ``url`` (with ``headers``)."""

    command: tuple[str, ...] = ()
    url: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, server: ServerRef | MCPServerSpec) -> MCPServerSpec:
        if isinstance(server, MCPServerSpec):
            return server
        if isinstance(server, str):
            if re.match(r"^https?://", server):
                return cls(url=server)
            return cls(command=tuple(shlex.split(server)))
        if isinstance(server, Mapping):
            unknown = set(server) - {"command", "args", "env", "cwd", "url", "headers", "type", "transport"}
            if unknown:
                raise ConfigError(f"MCP server entry: unknown keys {sorted(unknown)}; allowed: command, args, env, "
                                  "cwd (stdio) or url, headers (streamable HTTP)")
            if server.get("url"):
                return cls(url=str(server["url"]), headers=dict(server.get("headers") or {}))
            command = server.get("command")
            command = shlex.split(command) if isinstance(command, str) else list(command or [])
            return cls(command=tuple(command + [str(a) for a in server.get("args") or []]),
                       env=dict(server.get("env") or {}), cwd=server.get("cwd"))
        return cls(command=tuple(str(a) for a in server))

    def __post_init__(self) -> None:
        if bool(self.command) == bool(self.url):
            raise ConfigError("MCP server: give either a command (stdio) or an http(s) url, got "
                              f"command={list(self.command)!r} url={self.url!r}")

    def describe(self) -> str:
        return f"URL {self.url}" if self.url else f"command {shlex.join(self.command)!r}"

    def stdio_parameters(self) -> StdioServerParameters:
        # "python" is this interpreter, so configs work in a virtual environment that is not on PATH.
        command = sys.executable if self.command[0] == "python" else self.command[0]
        return StdioServerParameters(command=command, args=list(self.command[1:]), env=dict(self.env) or None,
                                     cwd=self.cwd)


# ---- one session on its own loop ------------------------------------------------------------------------
class MCPConnection:
    """One MCP client session, owned by one task on this connection's event-loop thread (the SDK's anyio
    scopes must be entered and left by the same task); calls come from any thread or loop."""

    def __init__(self, server: ServerRef | MCPServerSpec, connect_timeout_s: float = 30.0) -> None:
        self.server = MCPServerSpec.parse(server)
        self.connect_timeout_s = connect_timeout_s
        self.listed: list[mcp_types.Tool] = []
        self._client: Client | None = None
        self._stop: asyncio.Event | None = None
        self._owner: concurrent.futures.Future[None] | None = None
        self._stderr: IO[str] | None = None
        self._closed = False
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="opd-mcp", daemon=True)
        self._thread.start()
        try:
            self.connect()
        except BaseException:
            self.close()
            raise

    @property
    def alive(self) -> bool:
        return self._client is not None and not self._owner_done()

    def connect(self) -> None:
        """Start the session and list the tools; MCPServerError if that fails or takes too long."""
        if self._closed:
            raise MCPServerError(f"MCP server {self.server.describe()}: the connection was closed")
        ready: concurrent.futures.Future[list[mcp_types.Tool]] = concurrent.futures.Future()
        self._owner = asyncio.run_coroutine_threadsafe(self._own(ready), self.loop)
        try:  # _own bounds its start-up itself, so a server that is too slow is stopped before we go on
            self.listed = ready.result(timeout=self.connect_timeout_s + CLOSE_TIMEOUT_S)
        except (_StartTimeout, concurrent.futures.TimeoutError):
            raise MCPServerError(f"MCP server {self.server.describe()}: no handshake and tool listing within "
                                 f"{self.connect_timeout_s:g}s{self._stderr_tail()}") from None
        except Exception as e:  # noqa: BLE001 - any failure to start is the server's, named with its cause
            raise MCPServerError(f"MCP server {self.server.describe()} cannot be started or reached: "
                                 f"{_root_cause(e)}{self._stderr_tail()}") from None

    def ensure_connected(self) -> None:
        """Reconnect after the server went away (a stdio server is started again)."""
        if not self.alive:
            self.connect()

    async def _own(self, ready: concurrent.futures.Future[list[mcp_types.Tool]]) -> None:
        self._stop = stop = asyncio.Event()
        client: Client | None = None
        task, expired = asyncio.current_task(), threading.Event()
        assert task is not None

        def expire() -> None:  # cancelling this task unwinds the SDK's contexts: a stdio server is stopped
            expired.set()
            task.cancel()

        watchdog = self.loop.call_later(self.connect_timeout_s, expire)
        try:
            async with contextlib.AsyncExitStack() as stack:
                client = await stack.enter_async_context(Client(await self._transport(stack)))
                tools: list[mcp_types.Tool] = []
                cursor: str | None = None
                while True:  # every page of the listing
                    page = await client.list_tools(cursor=cursor)
                    tools += page.tools
                    cursor = page.next_cursor
                    if cursor is None:
                        break
                watchdog.cancel()
                self._client = client
                ready.set_result(tools)
                await stop.wait()
        except BaseException as e:  # noqa: BLE001 - a dropped transport cancels or fails this task; it ends here
            if not ready.done():
                ready.set_exception(_StartTimeout() if expired.is_set() else
                                    e if isinstance(e, Exception) else RuntimeError(repr(e)))
        finally:
            watchdog.cancel()
            if self._client is client:  # not a newer session's
                self._client = None

    async def _transport(self, stack: contextlib.AsyncExitStack) -> Any:
        if self.server.url:
            http = await stack.enter_async_context(create_mcp_http_client(headers=dict(self.server.headers)))
            return streamable_http_client(self.server.url, http_client=http)
        if self._stderr is None:  # the server's stderr, kept for error messages instead of flooding ours
            self._stderr = tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace")
        from mcp.client.stdio import stdio_client

        return stdio_client(self.server.stdio_parameters(), errlog=self._stderr)

    def _stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        with contextlib.suppress(OSError, ValueError):
            self._stderr.flush()
            self._stderr.seek(0)
            text = self._stderr.read().strip()
            return f"\n--- server stderr (last lines) ---\n{text[-STDERR_TAIL_CHARS:]}" if text else ""
        return ""

    async def _call(self, name: str, arguments: dict[str, Any], timeout_s: float | None) -> mcp_types.CallToolResult:
        client = self._client
        if client is None:
            raise _ConnectionLost("it is not connected")
        try:
            return await client.call_tool(name, arguments, read_timeout_seconds=timeout_s)
        except MCPError as e:
            if e.code != mcp_types.CONNECTION_CLOSED:
                raise
        except asyncio.CancelledError:
            if self._client is client and not self._owner_done():
                raise  # the caller gave up (its timeout); the session is fine
        # The server exited or the transport dropped (a stdio EOF leaves the session waiting): end it now,
        # so the next reset() starts a new one.
        if self._client is client:
            self._client = None
            if self._stop is not None:
                self._stop.set()
        raise _ConnectionLost("it closed the connection")

    def _owner_done(self) -> bool:
        return self._owner is None or self._owner.done()

    async def acall(self, name: str, arguments: dict[str, Any], timeout_s: float | None) -> mcp_types.CallToolResult:
        """Call a tool from any event loop; its timeout is the SDK's, plus a grace for a wedged transport."""
        future = asyncio.run_coroutine_threadsafe(self._call(name, arguments, timeout_s), self.loop)
        limit = None if timeout_s is None else timeout_s + CALL_GRACE_S
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout=limit)

    def tools(self, timeout_s: float | None = 30.0, include: Sequence[str] | None = None, prefix: str = "",
              max_output_chars: int = 2000) -> list[MCPTool]:
        """One tool per listed MCP tool (``include``: only these names, in the server's order)."""
        names = [t.name for t in self.listed]
        missing = sorted(set(include or ()) - set(names))
        if missing:
            raise ConfigError(f"MCP server {self.server.describe()} has no tools {missing}; it lists {names}")
        return [MCPTool(self, t, timeout_s=timeout_s, prefix=prefix, max_output_chars=max_output_chars)
                for t in self.listed if include is None or t.name in include]

    def close(self) -> None:
        """End the session (a stdio server is stopped) and the loop thread; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._stop is not None and self._owner is not None and not self._owner.done():
            self.loop.call_soon_threadsafe(self._stop.set)
            if threading.current_thread() is not self._thread:
                with contextlib.suppress(Exception):
                    self._owner.result(timeout=CLOSE_TIMEOUT_S)
        self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is not self._thread:
            self._thread.join(CLOSE_TIMEOUT_S)
        if self._stderr is not None:
            self._stderr.close()


def _root_cause(e: BaseException) -> str:
    """The innermost error of anyio's exception groups, as 'Type: message'."""
    while getattr(e, "exceptions", None):  # (Base)ExceptionGroup, also the backport on Python 3.10
        e = e.exceptions[0]  # type: ignore[attr-defined]
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


# ---- one MCP tool -------------------------------------------------------------------------------------
class MCPTool(Tool):
    """An MCP server's tool: the server's JSON schema instead of a pydantic model, the call over the
    session. Calling it (``tool(a=1)``) runs it synchronously and returns its text (or raises)."""

    def __init__(self, connection: MCPConnection, listed: mcp_types.Tool, *, timeout_s: float | None = 30.0,
                 prefix: str = "", max_output_chars: int = 2000) -> None:
        # Tool names the parsers accept are narrower than MCP's ([A-Za-z0-9_.-]{1,128}); calls use the original.
        self.name = (prefix + re.sub(r"[^a-zA-Z0-9_\-]", "_", listed.name))[:64]
        if not _NAME_RE.match(self.name):
            raise ToolDefinitionError(f"MCP tool {listed.name!r} cannot be named {self.name!r} (pass a prefix)")
        self.mcp_name = listed.name
        self.connection = connection
        self.description = listed.description or listed.title or listed.name
        self.timeout_s = timeout_s
        self.max_output_chars = max_output_chars
        self.parameters = _without_titles(listed.input_schema)
        try:
            self.validator = jsonschema.validators.validator_for(listed.input_schema)(listed.input_schema)
            self.validator.check_schema(listed.input_schema)
        except jsonschema.SchemaError as e:
            raise ToolDefinitionError(f"MCP tool {listed.name!r} of {connection.server.describe()} has an invalid "
                                      f"input schema: {e.message}") from None
        self.fn = self.call
        self._bound_to = None

    def schema(self) -> dict[str, Any]:
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    def call(self, **arguments: Any) -> str:
        result = asyncio.run_coroutine_threadsafe(
            self.connection._call(self.mcp_name, arguments, self.timeout_s), self.connection.loop).result()
        if result.is_error:
            raise RuntimeError(_result_text(result))
        return _result_text(result)

    async def acall(self, call: ToolCall) -> ToolResult:
        start = time.perf_counter()

        def result(content: str, error: ErrorType | None = None, stop: bool = False) -> ToolResult:
            return ToolResult(call_id=call.id, name=self.name, content=content, error_type=error,
                              duration_s=time.perf_counter() - start, stop_episode=stop)

        try:
            problems = sorted(self.validator.iter_errors(call.arguments), key=lambda e: list(e.absolute_path))
        except Exception:  # noqa: BLE001 - a schema jsonschema cannot apply (a remote $ref): the server checks
            problems = []
        if problems:
            detail = "; ".join(f"{'.'.join(map(str, e.absolute_path)) or 'arguments'}: {e.message}" for e in problems)
            return result(f"Invalid arguments for {self.name}: {shorten(detail, MAX_ERROR_CHARS)}",
                          ErrorType.validation_failed)
        try:
            out = await self.connection.acall(self.mcp_name, call.arguments, self.timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            return result(f"Tool {self.name} timed out after {self.timeout_s}s", ErrorType.timeout)
        except _ConnectionLost as e:
            return result(f"Tool {self.name} failed: the MCP server is gone ({e})", ErrorType.execution_failed,
                          stop=True)
        except MCPError as e:
            if e.code == mcp_types.REQUEST_TIMEOUT:
                return result(f"Tool {self.name} timed out after {self.timeout_s}s", ErrorType.timeout)
            error = ErrorType.validation_failed if e.code == mcp_types.INVALID_PARAMS else ErrorType.execution_failed
            return result(shorten(f"Tool {self.name} failed: {e.message}", MAX_ERROR_CHARS), error)
        except Exception as e:  # noqa: BLE001 - a malformed reply or a transport error is reported, never raised
            return result(shorten(f"Tool {self.name} failed: {_root_cause(e)}", MAX_ERROR_CHARS),
                          ErrorType.execution_failed, stop=not self.connection.alive)
        if out.is_error:
            return result(shorten(f"Tool {self.name} failed: {_result_text(out)}", MAX_ERROR_CHARS),
                          ErrorType.execution_failed)
        return result(shorten(_result_text(out), self.max_output_chars))


def _without_titles(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema minus the titles pydantic-made schemas carry (tokens in every prompt, no information)."""
    out = {k: v for k, v in schema.items() if k != "title"}
    if isinstance(out.get("properties"), dict):
        out["properties"] = {k: {kk: vv for kk, vv in v.items() if kk != "title"} if isinstance(v, dict) else v
                             for k, v in out["properties"].items()}
    return out


def _result_text(result: mcp_types.CallToolResult) -> str:
    """The text the model sees: text blocks as they are, other blocks named; else the structured content."""
    parts: list[str] = []
    for block in result.content:
        if isinstance(block, mcp_types.TextContent):
            parts.append(block.text)
        elif isinstance(block, mcp_types.EmbeddedResource):
            res = block.resource
            parts.append(res.text if isinstance(res, mcp_types.TextResourceContents) else f"[resource {res.uri}]")
        elif isinstance(block, mcp_types.ResourceLink):
            parts.append(f"[resource link {block.uri}]")
        else:  # image / audio: a text model cannot read them
            parts.append(f"[{block.type} content, {getattr(block, 'mime_type', 'unknown type')}]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content))
    return "\n".join(parts)


# ---- the env --------------------------------------------------------------------------------------------
Grader = Callable[[Task, str], float]


def _contains(task: Task, answer: str) -> float:
    return float(str(task.answer).strip().lower() in answer.lower())


def _number(task: Task, answer: str) -> float:
    from environments.arithmetic import grade_number  # the shipped envs' rule: the number after "Answer:"

    return grade_number(answer, task.answer)


GRADERS: dict[str, Grader] = {"contains": _contains, "number": _number}


def _load_grader(grader: str | Grader) -> Grader:
    if callable(grader):
        return grader
    if grader in GRADERS:
        return GRADERS[grader]
    module, _, name = grader.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"MCP env grader {grader!r}: expected one of {sorted(GRADERS)} or 'module:function' "
                          f"taking (task, answer) ({e})") from None


class MCPToolEnv(ToolEnv):
    """The tools of an MCP server (and the class's own ``tools``), on a dataset's tasks or a subclass's.

    Rows: ``{"prompt": ..., "answer": ..., "id"?, "reference"?, "data"?}``; task seed ``s`` plays row
    ``s mod len(rows)`` (held-out seeds use ``eval_dataset`` when given). ``grader``: ``"contains"`` (the
    answer appears in the final message), ``"number"`` (the number after "Answer:"), ``module:function`` or
    a callable ``(task, final_message) -> float``. A subclass may set ``server`` and override
    ``generate_task``/``grade``/``expert_action`` instead.
    """

    server: ServerRef | None = None

    def __init__(self, server: ServerRef | MCPServerSpec | None = None, dataset: Rows | str | Path | None = None,
                 eval_dataset: Rows | str | Path | None = None, grader: str | Grader = "contains", *,
                 timeout_s: float | None = 30.0, connect_timeout_s: float = 30.0, include: Sequence[str] | None = None,
                 prefix: str = "", system_prompt: str | None = None, **kwargs: Any) -> None:
        ref = server if server is not None else type(self).server
        if ref is None:
            raise ConfigError(f"{type(self).__name__}: no MCP server (pass server=<url | command | entry>)")
        spec = MCPServerSpec.parse(ref)
        self.rows = load_rows(dataset, "MCP env dataset") if dataset is not None else []
        self.eval_rows = load_rows(eval_dataset, "MCP env eval_dataset") if eval_dataset is not None else self.rows
        self._grader = _load_grader(grader)
        if system_prompt is not None:
            self.system_prompt = system_prompt
        self.mcp = MCPConnection(spec, connect_timeout_s=connect_timeout_s)  # checked here, before any work
        weakref.finalize(self, self.mcp.close)  # the rollout drops its envs without close()
        try:
            self.mcp_tools = self.mcp.tools(timeout_s=timeout_s, include=include, prefix=prefix)
            super().__init__(**kwargs)
        except BaseException:
            self.mcp.close()
            raise

    def bound_tools(self) -> list[Tool]:
        return super().bound_tools() + list(self.mcp_tools)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[list, dict]:
        self.mcp.ensure_connected()  # a server that died in the last episode is started again
        return super().reset(seed=seed, options=options)

    def generate_task(self, rng: np.random.Generator, seed: int, split: str) -> Task:
        rows = self.eval_rows if split == "heldout" else self.rows
        if not rows:
            raise ConfigError(f"{type(self).__name__}: no dataset rows (pass dataset=..., or override generate_task)")
        index = seed % len(rows)
        row = rows[index]
        return Task(id=str(row.get("id", f"mcp-{split}-{index}")), seed=seed, split=split, prompt=str(row["prompt"]),
                    answer=row.get("answer", ""), reference=str(row.get("reference", "")), data=dict(row.get("data", {})))

    def grade(self, task: Task, answer: str) -> float:
        return float(self._grader(task, answer))

    def close(self) -> None:
        self.mcp.close()
        super().close()
