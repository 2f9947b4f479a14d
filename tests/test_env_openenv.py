"""An OpenEnv environment server played as a ToolEnv (OpenEnvToolEnv), over real HTTP / WebSocket on
127.0.0.1 against tests/openenv_server.py: a server in OpenEnv's wire format (openenv-core itself is not
installable here)."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from gymnasium.utils.env_checker import check_env
from typer.testing import CliRunner

from opd_agents.cli import app
from opd_agents.env.adapters.openenv import OpenEnvServerError, OpenEnvToolEnv
from opd_agents.env.registry import make_env
from opd_agents.errors import ConfigError
from opd_agents.types import ErrorType, StopReason, ToolResult

SERVER = Path(__file__).parent / "openenv_server.py"
REF = "opd_agents.env.adapters.openenv:OpenEnvToolEnv"
ROWS = [{"prompt": "Reach the target exactly with the act tool.", "target": 7}, {"prompt": "Again.", "target": 4}]
START_WAIT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """tests/openenv_server.py in a subprocess (so a test can kill it mid-episode)."""

    def __init__(self, kind: str, max_sessions: int = 4, port: int | None = None) -> None:
        self.kind, self.max_sessions, self.port = kind, max_sessions, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        command = [sys.executable, str(SERVER), self.kind, str(self.port), str(self.max_sessions)]
        self.process = subprocess.Popen(command)
        deadline = time.monotonic() + START_WAIT_S
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=1.0, trust_env=False).status_code == 200:
                    return self
            assert self.process.poll() is None, "the test server exited"
            time.sleep(0.1)
        raise TimeoutError(f"the test server at {self.url} did not start")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture(scope="module")
def counter() -> Iterator[Server]:
    server = Server("counter").start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def echo() -> Iterator[Server]:
    server = Server("echo").start()
    yield server
    server.kill()


def act(env: OpenEnvToolEnv, **arguments: Any) -> tuple[ToolResult, float, bool, dict[str, Any]]:
    """One assistant turn with one hermes call of the action tool: (its result, reward, terminated, info)."""
    _, reward, terminated, _, info = env.step(env.parser.format_call("act", arguments))
    return info["tool_results"][0], reward, terminated, info


def test_the_action_schema_is_the_tool_and_reset_gets_the_row(counter: Server) -> None:
    env = OpenEnvToolEnv(counter.url, dataset=ROWS)
    [schema] = env.tool_schemas
    assert schema["function"]["name"] == "act" and schema["function"]["description"] == "Add to the counter."
    params = schema["function"]["parameters"]
    assert set(params["properties"]) == {"amount", "delay_s", "fail"}  # openenv's metadata field is not shown
    assert params["properties"]["amount"] == {"type": "integer", "minimum": 1, "maximum": 5,
                                              "description": "how much to add (1-5)"}
    assert params["required"] == ["amount"] and params["additionalProperties"] is False
    messages, info = env.reset(seed=0)
    assert messages[1]["content"] == ROWS[0]["prompt"] + "\n\n" + json.dumps(
        {"count": 0, "target": 7, "message": "Count to 7."})
    state = env.server_state()  # the session's env got seed, episode_id and the row's fields
    assert state["episode_id"] == info["task_id"] == "openenv-train-0" and state["prompt"] == ROWS[0]["prompt"]
    env.close()


def play(env: OpenEnvToolEnv, seed: int) -> tuple[float, dict[str, Any], list[str]]:
    """A scripted policy: add min(5, what is left) until the server says done."""
    messages, _ = env.reset(seed=seed)
    target = json.loads(messages[1]["content"].split("\n\n")[-1])["target"]
    total, seen, count = 0.0, [], 0
    while True:
        result, reward, terminated, info = act(env, amount=min(5, target - count))
        total += reward
        seen.append(result.content)
        assert result.error_type is None
        if terminated:
            return total, info, seen
        count = json.loads(result.content)["count"]


def test_a_full_episode_maps_reward_and_done(counter: Server) -> None:
    env = OpenEnvToolEnv(counter.url, dataset=ROWS, limits={"max_turns": 10})
    total, info, seen = play(env, seed=0)  # target 7: +5, +2
    assert json.loads(seen[0]) == {"count": 5, "target": 7, "message": "At 5."}
    assert seen[-1].startswith(json.dumps({"count": 7, "target": 7, "message": "Exactly!"}))
    assert "(The episode is over.)" in seen[-1]
    assert (total, info["success"], info["stop_reason"], info["reward_parts"]["env"]) == (
        1.0, True, StopReason.tool_stop, 1.0)
    total, info, seen = play(env, seed=1)  # row 1 (target 4), same session: the server's env was reset
    assert (len(seen), total, info["success"]) == (1, 1.0, True) and env.server_state()["step_count"] == 1

    env.reset(seed=0)  # overshoot: done without reward
    act(env, amount=5)
    result, reward, terminated, info = act(env, amount=5)
    assert json.loads(result.content.split("\n\n")[0])["message"] == "Overshot."
    assert (reward, terminated, info["success"]) == (0.0, True, False)

    env.reset(seed=0)  # an answer without a tool call ends the episode, graded by the rewards so far
    _, reward, terminated, _, info = env.step("I give up.")
    assert (reward, terminated, info["stop_reason"], info["success"]) == (0.0, True, StopReason.completed, False)
    env.close()


def test_observation_field_no_dataset_and_by_reference(counter: Server) -> None:
    env = make_env(REF, url=counter.url, observation_field="message", instructions="Play.").unwrapped
    messages, _ = env.reset(seed=2)  # no dataset: the reset observation is the prompt; target 2 % 7 + 3 = 5
    assert messages[1]["content"] == "Play.\n\nCount to 5."
    assert act(env, amount=2)[0].content == "At 2."
    check_env(env, skip_render_check=True)
    env.close()


def test_errors_inside_an_episode_become_tool_results(counter: Server) -> None:
    env = OpenEnvToolEnv(counter.url, dataset=ROWS, timeout_s=0.5, limits={"max_turns": 10})
    env.reset(seed=0)
    result, _, terminated, _ = act(env, amount="two")  # checked against the schema before sending
    assert result.error_type == ErrorType.validation_failed and "'two' is not of type 'integer'" in result.content
    assert act(env, amount=9)[0].error_type == ErrorType.validation_failed and not terminated

    result, _, terminated, _ = act(env, amount=1, fail=True)  # the env raised on the server
    assert result.error_type == ErrorType.execution_failed and "the counter jammed" in result.content
    assert not terminated and json.loads(act(env, amount=1)[0].content)["count"] == 1  # the session goes on

    start = time.monotonic()
    result, _, terminated, info = act(env, amount=1, delay_s=12)
    assert result.error_type == ErrorType.timeout and time.monotonic() - start < 8  # not the 12 s reply
    assert terminated and info["stop_reason"] == StopReason.tool_stop  # a WebSocket timeout ends the session
    env.reset(seed=0)  # a new session
    assert json.loads(act(env, amount=2)[0].content)["count"] == 2
    env.close()

    loose = {"type": "object", "properties": {"amount": {"type": "integer"}}, "required": ["amount"]}
    env = OpenEnvToolEnv(counter.url, dataset=ROWS, action_schema=loose)  # a user-given schema: the server checks
    env.reset(seed=0)
    result, _, terminated, _ = act(env, amount=9)
    assert result.error_type == ErrorType.validation_failed and not terminated
    assert "amount: Input should be less than or equal to 5" in result.content
    env.close()


def test_the_http_transport(echo: Server) -> None:
    env = OpenEnvToolEnv(echo.url, transport="http", observation_field="echoed_message")
    messages, _ = env.reset(seed=0)
    assert messages[1]["content"] == "Echo env ready!"
    result, reward, terminated, _ = act(env, message="hello")
    assert (result.content, result.error_type, reward, terminated) == ("hello", None, 0.5, False)
    env.close()

    env = OpenEnvToolEnv(echo.url, transport="http", action_schema={"type": "object"})
    env.reset(seed=0)
    result, _, terminated, _ = act(env, message="")  # the server's 422
    assert result.error_type == ErrorType.validation_failed and not terminated
    assert "message: String should have at least 1 character" in result.content
    env.close()


def test_an_mcp_environments_tools_are_tools(counter: Server) -> None:
    server = Server("calc").start()
    try:
        rows = [{"prompt": "What is 6 / 3? Submit it.", "answer": 2}]
        env = OpenEnvToolEnv(server.url, dataset=rows, mcp_tools=True)
        schemas = {s["function"]["name"]: s["function"] for s in env.tool_schemas}
        assert list(schemas) == ["add", "divide", "submit"]
        assert schemas["add"] == {"name": "add", "description": "Add two integers.", "parameters": {"type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}
        messages, _ = env.reset(seed=0)
        assert messages[1]["content"] == rows[0]["prompt"]  # the reset observation has no fields: no text

        def call(name: str, **arguments: Any) -> tuple[ToolResult, float, bool, dict[str, Any]]:
            _, reward, terminated, _, info = env.step(env.parser.format_call(name, arguments))
            return info["tool_results"][0], reward, terminated, info

        assert call("add", a=2, b=3)[0].content == "5"
        result, _, terminated, _ = call("divide", a=1, b=0)  # the CallToolObservation's error
        assert result.error_type == ErrorType.execution_failed and "division by zero" in result.content
        assert not terminated and call("add", a="x", b=1)[0].error_type == ErrorType.validation_failed
        assert call("divide", a=6, b=3)[0].content == "2.0"
        result, reward, terminated, info = call("submit", answer=2)
        assert result.content.startswith("right") and (reward, terminated, info["success"]) == (1.0, True, True)
        env.close()
    finally:
        server.kill()
    with pytest.raises(OpenEnvServerError, match="did not list MCP tools"):  # not an MCPEnvironment
        OpenEnvToolEnv(counter.url, mcp_tools=True)


def test_a_server_that_is_down_is_a_typed_error_before_any_work() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for kwargs in ({}, {"transport": "http"}, {"action_schema": {"type": "object"}}):
        with pytest.raises(OpenEnvServerError, match=f"OpenEnv server at {url} is not reachable"):
            OpenEnvToolEnv(url, dataset=ROWS, connect_timeout_s=2.0, **kwargs)
    with pytest.raises(ConfigError, match="must start with http"):
        OpenEnvToolEnv("127.0.0.1:8000")
    with pytest.raises(ConfigError, match="transport must be"):
        OpenEnvToolEnv(url, transport="grpc")  # type: ignore[arg-type]


def test_a_cli_rollout_by_reference(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A tiny model's episodes (several at once, each env its own session) through the CLI, by reference."""
    server = Server("counter", max_sessions=4).start()
    try:
        data = tmp_path / "tasks.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
        out = tmp_path / "r.jsonl"
        result = CliRunner().invoke(app, ["rollout", "--env", REF, "--env-arg", f"url={server.url}", "--env-arg",
                                          f"dataset={data}", "--model", str(tiny_model_dir), "-n", "4",
                                          "--max-tokens-per-turn", "8", "--out", str(out)])
        assert result.exit_code == 0, result.output
        trajs = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(trajs) == 4 and all(t["env_id"] == REF for t in trajs)
        assert trajs[0]["tool_schemas"][0]["function"]["name"] == "act"
        assert trajs[0]["messages"][1]["content"].startswith(ROWS[0]["prompt"])
    finally:
        server.kill()


def reset_when_free(env: OpenEnvToolEnv, within_s: float = 5.0) -> None:
    """The server frees a closed session's slot once its handler sees the disconnect (a moment later)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            env.reset(seed=0)
            return
        except OpenEnvServerError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_a_server_that_dies_mid_episode_ends_it() -> None:
    server = Server("counter", max_sessions=1).start()
    try:
        env = OpenEnvToolEnv(server.url, dataset=ROWS)
        env.reset(seed=0)
        other = OpenEnvToolEnv(server.url, dataset=ROWS)
        with pytest.raises(OpenEnvServerError, match="CAPACITY_REACHED"):  # one session at a time on this server
            other.reset(seed=0)
        env.end_episode()  # as the rollout does when an episode ends: the session slot is free again
        reset_when_free(other)
        other.close()
        reset_when_free(env)
        assert json.loads(act(env, amount=1)[0].content)["count"] == 1

        server.kill()
        result, reward, terminated, info = act(env, amount=1)
        assert result.error_type == ErrorType.execution_failed and f"server at {server.url} is gone" in result.content
        assert terminated and info["stop_reason"] == StopReason.tool_stop and reward == 0.0
        with pytest.raises(OpenEnvServerError, match=f"OpenEnv server at {server.url}: reset failed"):
            env.reset(seed=0)

        server.start()  # back on the same port: the next reset opens a new session
        env.reset(seed=0)
        assert json.loads(act(env, amount=3)[0].content)["count"] == 3
        env.close()
    finally:
        server.kill()
