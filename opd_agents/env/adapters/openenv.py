"""An OpenEnv environment server (Meta's ``openenv-core``: ``reset()``, ``step(action)``, ``state()`` served
over HTTP/WebSocket) played as a ``ToolEnv``, without ``openenv-core`` installed: this module speaks the
server's wire format itself (``openenv.core.env_server.http_server``).

    env = OpenEnvToolEnv("http://127.0.0.1:8000", dataset=[{"prompt": "Reach 7.", "target": 7}])

or, from a config / the CLI::

    env: {id: "opd_agents.env.adapters.openenv:OpenEnvToolEnv",
          kwargs: {url: "http://127.0.0.1:8000", dataset: data/tasks.jsonl, observation_field: echoed_message}}

What maps: the env's action model is one tool (``action_tool``, default ``act``) whose parameters are the
action's JSON schema (``GET /schema``, or ``action_schema=`` for a server without it; arguments are checked
against it before they are sent). The step's observation becomes the tool result (``observation_field``,
else the observation as JSON); its rewards are summed into the episode's reward (``reward_parts["env"]``)
and ``done`` ends the episode (``tool_stop``). ``success`` is "the summed reward reached ``success_reward``";
an answer without a tool call ends the episode too (graded the same way; the server is not asked).
With ``mcp_tools=True`` an ``MCPEnvironment``'s tools (its ``list_tools`` action) are the tools instead, each
with its own input schema, called as ``call_tool`` actions; a ``CallToolObservation``'s ``error`` becomes the
ErrorType (``tool_not_found``, ``invalid_args`` -> ``validation_failed``, ``timeout``, else
``execution_failed``) and its result's text blocks the tool result.
Tasks: dataset row ``s mod len(rows)`` for task seed ``s`` (held-out seeds use ``eval_dataset``); reset
gets ``seed``, ``episode_id`` and the row's fields as keyword arguments (the server passes on those its
env's ``reset`` accepts); the prompt is the row's ``prompt`` followed by the reset observation. Without a
dataset the reset observation is the prompt (after ``instructions``).

Transports: ``"ws"`` (default) is what OpenEnv's own ``EnvClient`` speaks: one WebSocket session at ``/ws``
per env, its own env instance on the server, kept across resets and closed when the rollout ends an
episode (``end_episode``), so run the server with ``max_concurrent_envs`` (default 1) at least the number of
episodes played at once; a full server answers ``CAPACITY_REACHED`` at reset. ``"http"`` uses ``POST /reset`` and
``POST /step``, which the server answers with a *fresh env instance per request*: only envs that keep no
episode state in the instance play correctly over it. A server that cannot be reached (``GET /health``)
raises ``OpenEnvServerError`` naming the URL when the env is made. A step that fails on the server, times
out, or loses the connection becomes a ToolResult with an ErrorType; a lost connection or a WebSocket
timeout also ends the episode, and the next ``reset`` reconnects.

Not mapped: starting servers (``from_docker_image`` / ``from_env``: start it yourself and pass its URL), the
``/mcp`` JSON-RPC endpoint (and the ``mcp`` WebSocket message), and a reward given at reset. A server in
production mode (no ``/reset``, ``/step``) plays over ``"ws"``.
``server_state()`` reads the server env's ``state``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema
import numpy as np

from opd_agents.env.adapters import Rows, load_rows
from opd_agents.env.core import Task, ToolEnv
from opd_agents.env.tool import _NAME_RE, MAX_ERROR_CHARS, Tool, shorten
from opd_agents.errors import ConfigError, OpdError
from opd_agents.types import ErrorType, ToolCall, ToolResult

Transport = Literal["ws", "http"]
HIDDEN_ACTION_FIELDS = ("metadata",)  # openenv's Action base field: bookkeeping, not for the model
# WSErrorCode values after which the server closes the WebSocket (http_server's websocket_endpoint).
SESSION_ENDING_ERRORS = ("CAPACITY_REACHED", "FACTORY_ERROR", "SESSION_ERROR")


class OpenEnvServerError(OpdError, RuntimeError):
    """An OpenEnv server cannot be reached, or does not answer reset / its schema as the protocol says."""


class StepFailed(Exception):
    """The server answered a step with an error (``kind``: an ErrorType)."""

    def __init__(self, message: str, kind: ErrorType) -> None:
        super().__init__(message)
        self.kind = kind


class ConnectionLost(Exception):
    """The server closed the session, or stopped answering in a way that leaves it unusable."""


# ---- transports: reset(kwargs) / step(action) -> {"observation", "reward", "done"} -------------------------
class HTTPTransport:
    """``POST /reset`` and ``POST /step`` (stateless on the server: a fresh env instance per request)."""

    def __init__(self, url: str, timeout_s: float | None) -> None:
        self.url = url
        self.client = httpx.Client(base_url=url, timeout=timeout_s, trust_env=False)

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = self.client.post(path, json=body)
        except httpx.TimeoutException as e:
            raise TimeoutError(str(e) or "no answer") from None
        except httpx.TransportError as e:
            raise ConnectionLost(f"{type(e).__name__}: {e}") from None
        if response.status_code == 422:  # FastAPI's validation error: {"detail": [pydantic errors]}
            raise StepFailed(_validation_detail(response), ErrorType.validation_failed)
        if response.status_code >= 400:
            raise StepFailed(f"HTTP {response.status_code}: {shorten(response.text, 200)}", ErrorType.execution_failed)
        return response.json()

    def reset(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return self._post("/reset", kwargs)

    def step(self, action: dict[str, Any]) -> dict[str, Any]:
        return self._post("/step", {"action": action})

    def state(self) -> dict[str, Any]:
        return self.client.get("/state").json()

    def close(self) -> None:
        self.client.close()


class WebSocketTransport:
    """The ``/ws`` session protocol: ``{"type": "reset" | "step" | "state" | "close", "data": ...}`` in,
    ``{"type": "observation" | "state" | "error", "data": ...}`` out, one reply per message."""

    def __init__(self, url: str, timeout_s: float | None, connect_timeout_s: float) -> None:
        try:
            import websockets.sync.client  # noqa: F401 - the same library openenv-core's EnvClient uses
        except ImportError as e:
            raise ConfigError(f"OpenEnv transport 'ws' needs the websockets package: pip install 'opd-agents[openenv]', or "
                              f"pass transport='http' ({e})") from None
        self.ws_url = "ws" + url[len("http"):] + "/ws"  # http:// -> ws://, https:// -> wss://
        self.timeout_s, self.connect_timeout_s = timeout_s, connect_timeout_s
        self.connection: Any = None

    def _connect(self) -> Any:
        from websockets.sync.client import connect

        if self.connection is None:
            try:
                self.connection = connect(self.ws_url, open_timeout=self.connect_timeout_s, proxy=None,
                                          max_size=None, close_timeout=2.0)
            except Exception as e:  # noqa: BLE001 - refused, handshake rejected, timed out
                raise ConnectionLost(f"cannot open {self.ws_url} ({type(e).__name__}: {e})") from None
        return self.connection

    def _exchange(self, message: dict[str, Any]) -> dict[str, Any]:
        from websockets.exceptions import ConnectionClosed

        connection = self._connect()
        try:
            with contextlib.suppress(ConnectionClosed):  # a server that refused the session said why first: read it
                connection.send(json.dumps(message))
            reply = json.loads(connection.recv(timeout=self.timeout_s))
        except TimeoutError:
            self.close()  # a late reply would be read as the next message's: this session is done
            raise
        except (ConnectionClosed, OSError) as e:
            self.close()
            raise ConnectionLost(f"{type(e).__name__}: {e}") from None
        if reply.get("type") == "error":
            data = reply.get("data") or {}
            if data.get("code") in SESSION_ENDING_ERRORS:
                self.close()
            kind = ErrorType.validation_failed if data.get("code") == "VALIDATION_ERROR" else ErrorType.execution_failed
            detail = _pydantic_errors(data["errors"]) if data.get("errors") else str(data.get("message", data))
            raise StepFailed(f"{detail} (code {data.get('code', 'unknown')})", kind)
        return reply.get("data") or {}

    def reset(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return self._exchange({"type": "reset", "data": kwargs})

    def step(self, action: dict[str, Any]) -> dict[str, Any]:
        return self._exchange({"type": "step", "data": action})

    def state(self) -> dict[str, Any]:
        return self._exchange({"type": "state"})

    def close(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            with contextlib.suppress(Exception):  # best effort, as EnvClient does
                connection.send(json.dumps({"type": "close"}))
            connection.close()


def _pydantic_errors(errors: list[dict[str, Any]]) -> str:
    parts = []
    for e in errors:
        loc = ".".join(str(p) for p in e.get("loc", []) if p not in ("body", "action")) or "arguments"
        parts.append(f"{loc}: {e.get('msg', e)}")
    return shorten("; ".join(parts), MAX_ERROR_CHARS)


def _validation_detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except ValueError:
        return shorten(response.text, MAX_ERROR_CHARS)
    return _pydantic_errors(detail) if isinstance(detail, list) else shorten(str(detail), MAX_ERROR_CHARS)


# ---- the action tool ----------------------------------------------------------------------------------
class OpenEnvLink:
    """What an env and its action tool share; nothing points back at the env, so a dropped env is freed
    (and its session closed) at once rather than by the cycle collector."""

    def __init__(self, url: str, transport: HTTPTransport | WebSocketTransport, observation_field: str | None) -> None:
        self.url, self.transport, self.observation_field = url, transport, observation_field
        self.episode_return = 0.0  # the summed rewards of this episode's steps

    def observation_text(self, reply: Mapping[str, Any]) -> str:
        """The text the model sees: ``observation_field`` of the observation, else the observation as JSON
        (an observation without fields, as an MCPEnvironment's reset gives, is no text)."""
        observation = reply.get("observation") or {}
        if not observation:
            return ""
        value = observation[self.observation_field] if self.observation_field in observation else observation
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


class OpenEnvActionTool(Tool):
    """The env's action as one tool: arguments are the action object, the result the observation text."""

    def __init__(self, link: OpenEnvLink, name: str, description: str, schema: dict[str, Any],
                 timeout_s: float | None, max_output_chars: int, mcp_name: str | None = None) -> None:
        if not _NAME_RE.match(name):
            raise ConfigError(f"OpenEnv tool name {name!r} is not valid (letters, digits, _ and -; at most 64)")
        self.name, self.description, self.link = name, description, link
        self.mcp_name = mcp_name  # set: an MCPEnvironment's tool, sent as a call_tool action
        self.parameters = _model_facing(schema)
        try:
            self.validator = jsonschema.validators.validator_for(schema)(self.parameters)
            self.validator.check_schema(self.parameters)
        except jsonschema.SchemaError as e:
            raise ConfigError(f"OpenEnv server {link.url}: the action schema is not a valid JSON schema: "
                              f"{e.message}") from None
        self.timeout_s, self.max_output_chars = timeout_s, max_output_chars
        self.fn = self.call
        self._bound_to = None

    def schema(self) -> dict[str, Any]:
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    def action(self, arguments: dict[str, Any]) -> dict[str, Any]:
        if self.mcp_name is None:
            return dict(arguments)
        return {"type": "call_tool", "tool_name": self.mcp_name, "arguments": dict(arguments)}

    def outcome(self, reply: Mapping[str, Any]) -> tuple[str, ErrorType | None]:
        """The observation's text, and the ErrorType of a failed MCP tool call."""
        if self.mcp_name is None:
            return self.link.observation_text(reply), None
        observation = reply.get("observation") or {}
        error = observation.get("error")
        if error:  # CallToolObservation.error: a ToolError {error_type, message}
            kind = MCP_ERRORS.get(str(error.get("error_type")), ErrorType.execution_failed)
            return f"Tool {self.name} failed: {error.get('message', error)}", kind
        result = observation.get("result")
        text = _mcp_result_text(result)
        if isinstance(result, dict) and result.get("is_error"):  # the tool's own error result
            return f"Tool {self.name} failed: {text}", ErrorType.execution_failed
        return text, None

    def call(self, **arguments: Any) -> str:
        """Send one action outside an episode's bookkeeping (raises on errors); returns the observation text."""
        text, error = self.outcome(self.link.transport.step(self.action(arguments)))
        if error is not None:
            raise RuntimeError(text)
        return text

    async def acall(self, call: ToolCall) -> ToolResult:
        start = time.perf_counter()

        def result(content: str, error: ErrorType | None = None, stop: bool = False) -> ToolResult:
            return ToolResult(call_id=call.id, name=self.name, content=content, error_type=error,
                              duration_s=time.perf_counter() - start, stop_episode=stop)

        problems = sorted(self.validator.iter_errors(call.arguments), key=lambda e: list(e.absolute_path))
        if problems:
            detail = "; ".join(f"{'.'.join(map(str, e.absolute_path)) or 'arguments'}: {e.message}" for e in problems)
            return result(f"Invalid arguments for {self.name}: {shorten(detail, MAX_ERROR_CHARS)}",
                          ErrorType.validation_failed)
        try:  # the transport's own timeout bounds the call (a blocking socket read in a worker thread)
            reply = await asyncio.to_thread(self.link.transport.step, self.action(call.arguments))
        except TimeoutError:
            stop = isinstance(self.link.transport, WebSocketTransport)
            return result(f"Tool {self.name} timed out after {self.timeout_s}s"
                          + (" (the session was closed; the episode ends)" if stop else ""), ErrorType.timeout, stop)
        except StepFailed as e:
            return result(shorten(f"Tool {self.name} failed: {e}", MAX_ERROR_CHARS), e.kind)
        except ConnectionLost as e:
            return result(shorten(f"Tool {self.name} failed: the OpenEnv server at {self.link.url} is gone ({e})",
                                  MAX_ERROR_CHARS), ErrorType.execution_failed, stop=True)
        except Exception as e:  # noqa: BLE001 - a malformed reply is reported, never raised
            return result(shorten(f"Tool {self.name} failed: {type(e).__name__}: {e}", MAX_ERROR_CHARS),
                          ErrorType.execution_failed)
        text, error = self.outcome(reply)
        text = shorten(text, MAX_ERROR_CHARS if error else self.max_output_chars)
        reward = reply.get("reward")
        self.link.episode_return += float(reward) if isinstance(reward, (int, float)) else 0.0
        if reply.get("done"):
            return result(f"{text}\n\n(The episode is over.)", error, stop=True)
        return result(text, error)


# openenv's ToolErrorType values (mcp_types.py); transport_error and anything new read as execution_failed.
MCP_ERRORS = {"tool_not_found": ErrorType.tool_not_found, "invalid_args": ErrorType.validation_failed,
              "timeout": ErrorType.timeout}


def _mcp_result_text(result: Any) -> str:
    """A serialized fastmcp CallToolResult: its text blocks, else its data; any other result as text/JSON."""
    if isinstance(result, dict) and isinstance(result.get("content"), list):
        texts = [str(b.get("text", "")) for b in result["content"] if isinstance(b, dict) and b.get("type") == "text"]
        if texts:
            return "\n".join(texts)
        result = result.get("data", result.get("structured_content"))
    return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)


def _model_facing(schema: dict[str, Any]) -> dict[str, Any]:
    """The action schema minus pydantic titles and openenv's ``metadata`` field (tokens, no information)."""
    out = {k: v for k, v in schema.items() if k != "title"}
    props = {k: ({kk: vv for kk, vv in v.items() if kk != "title"} if isinstance(v, dict) else v)
             for k, v in (out.get("properties") or {}).items() if k not in HIDDEN_ACTION_FIELDS}
    if "properties" in out:
        out["properties"] = props
    if "required" in out:
        out["required"] = [r for r in out["required"] if r not in HIDDEN_ACTION_FIELDS]
    return out


# ---- the env ------------------------------------------------------------------------------------------
class OpenEnvToolEnv(ToolEnv):
    """An OpenEnv server's env: its action as one tool, its rewards and ``done`` as the episode's."""

    def __init__(self, url: str, dataset: Rows | str | Path | None = None,
                 eval_dataset: Rows | str | Path | None = None, *, transport: Transport = "ws", mcp_tools: bool = False,
                 action_schema: dict[str, Any] | None = None, action_tool: str = "act",
                 action_description: str | None = None,
                 observation_field: str | None = None, instructions: str = "", success_reward: float = 1.0,
                 timeout_s: float | None = 30.0, connect_timeout_s: float = 10.0, max_output_chars: int = 2000,
                 system_prompt: str | None = None, **kwargs: Any) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"OpenEnv url must start with http:// or https://, got {url!r}")
        if transport not in ("ws", "http"):
            raise ConfigError(f"OpenEnv transport must be 'ws' or 'http', got {transport!r}")
        self.url = url.rstrip("/")
        self.rows = load_rows(dataset, "OpenEnv env dataset") if dataset is not None else []
        self.eval_rows = load_rows(eval_dataset, "OpenEnv env eval_dataset") if eval_dataset is not None else self.rows
        self.instructions, self.success_reward = instructions, success_reward
        if system_prompt is not None:
            self.system_prompt = system_prompt
        server_schema = self._check_server(connect_timeout_s, want_schema=action_schema is None and not mcp_tools)
        schema = action_schema if action_schema is not None else server_schema
        channel = (WebSocketTransport(self.url, timeout_s, connect_timeout_s) if transport == "ws"
                   else HTTPTransport(self.url, timeout_s))
        self.link = OpenEnvLink(self.url, channel, observation_field)
        weakref.finalize(self, self.link.transport.close)  # an env dropped without close() ends its session
        try:
            if mcp_tools:
                self.server_tools = self._list_mcp_tools(timeout_s, max_output_chars)
            else:
                description = action_description or str(
                    schema.get("description") or "Send one action to the environment; returns what it observes.")
                self.server_tools = [OpenEnvActionTool(self.link, action_tool, description, schema, timeout_s,
                                                       max_output_chars)]
            super().__init__(**kwargs)
        except BaseException:
            self.link.transport.close()  # the server's session slot is not held by an env that was never made
            raise

    def _list_mcp_tools(self, timeout_s: float | None, max_output_chars: int) -> list[OpenEnvActionTool]:
        """An MCPEnvironment's tools (its list_tools action), each a tool of its own with its input schema."""
        try:
            reply: Any = self.link.transport.step({"type": "list_tools"})
            listed = (reply.get("observation") or {}).get("tools")
        except (ConnectionLost, TimeoutError, StepFailed, ValueError) as e:
            reply, listed = f"{type(e).__name__}: {e}", None
        if not (isinstance(listed, list) and listed and all(isinstance(t, dict) and t.get("name") for t in listed)):
            raise OpenEnvServerError(f"OpenEnv server at {self.url} did not list MCP tools (mcp_tools=True needs an "
                                     f"MCPEnvironment; its list_tools action answered {shorten(str(reply), 200)})")
        # Tool names the parsers accept are narrower than MCP's; calls use the original name.
        return [OpenEnvActionTool(self.link, re.sub(r"[^a-zA-Z0-9_\-]", "_", t["name"])[:64],
                                  t.get("description") or t["name"],
                                  t.get("input_schema") or t.get("inputSchema") or {"type": "object"},
                                  timeout_s, max_output_chars, mcp_name=t["name"]) for t in listed]

    def _check_server(self, timeout_s: float, want_schema: bool) -> dict[str, Any]:
        """Checked when the env is made, before any work: the server answers /health (and has a /schema)."""
        with httpx.Client(base_url=self.url, timeout=timeout_s, trust_env=False) as client:
            try:
                client.get("/health").raise_for_status()
                response = client.get("/schema") if want_schema else None
            except httpx.HTTPError as e:
                raise OpenEnvServerError(f"OpenEnv server at {self.url} is not reachable (GET /health: "
                                         f"{type(e).__name__}: {e})") from None
        if response is None:
            return {}
        if response.status_code == 404:
            raise ConfigError(f"OpenEnv server at {self.url} has no GET /schema; pass action_schema=<JSON schema>")
        try:
            action = response.json()["action"] if response.status_code == 200 else None
        except (ValueError, KeyError, TypeError):
            action = None
        if not isinstance(action, dict):
            raise OpenEnvServerError(f"OpenEnv server at {self.url}: GET /schema answered HTTP "
                                     f"{response.status_code} without an action schema: {shorten(response.text, 200)}")
        return action

    def bound_tools(self) -> list[Tool]:
        return super().bound_tools() + list(self.server_tools)

    def generate_task(self, rng: np.random.Generator, seed: int, split: str) -> Task:
        rows = self.eval_rows if split == "heldout" else self.rows
        row: Mapping[str, Any] = rows[seed % len(rows)] if rows else {}
        task_id = str(row.get("id", f"openenv-{split}-{seed % len(rows)}" if rows else f"openenv-{seed}"))
        # ResetRequest: seed >= 0, episode_id <= 255 chars, extra fields allowed (filtered by the env's reset).
        kwargs = {"seed": seed, "episode_id": task_id[:255], **{k: v for k, v in row.items() if k != "id"}}
        try:
            reply = self.link.transport.reset(kwargs)
        except (ConnectionLost, TimeoutError, StepFailed, ValueError) as e:
            raise OpenEnvServerError(f"OpenEnv server at {self.url}: reset failed ({type(e).__name__}: {e})") from None
        self.link.episode_return = 0.0
        observation = self.link.observation_text(reply)
        prompt = "\n\n".join(p for p in (str(row["prompt"]) if rows else self.instructions, observation) if p)
        return Task(id=task_id, seed=seed, split=split, prompt=prompt, answer=row.get("answer", ""))

    def grade(self, task: Task, answer: str) -> float:
        return float(self.link.episode_return >= self.success_reward)

    def step(self, action: str) -> tuple[list, float, bool, bool, dict[str, Any]]:
        before = self.link.episode_return
        obs, reward, terminated, truncated, info = super().step(action)
        gained = self.link.episode_return - before
        info["reward_parts"]["env"] = gained
        if info["stop_reason"] is not None and "correct" not in info["reward_parts"]:
            info["success"] = self.link.episode_return >= self.success_reward
        return obs, reward + gained, terminated, truncated, info

    def end_episode(self) -> None:
        """The rollout ends every episode here: a WebSocket session is closed at once, so the server's
        session slot (``max_concurrent_envs``) is free for the next episode; ``reset`` opens a new one."""
        super().end_episode()
        if isinstance(self.link.transport, WebSocketTransport):
            self.link.transport.close()

    def server_state(self) -> dict[str, Any]:
        """The server env's ``state`` (episode_id, step_count, ...): the session's over ws, a fresh one over http."""
        return self.link.transport.state()

    def close(self) -> None:
        self.link.transport.close()
        super().close()
