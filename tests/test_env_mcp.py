"""MCP servers' tools as project tools (MCPToolEnv), against real servers: the SDK's MCPServer over stdio
(a subprocess) and over streamable HTTP on 127.0.0.1."""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gymnasium.utils.env_checker import check_env

from opd_agents.env.adapters.mcp import MCPServerError, MCPServerSpec, MCPToolEnv
from opd_agents.env.registry import make_env
from opd_agents.errors import ConfigError
from opd_agents.types import ErrorType, StopReason, ToolResult

SERVER = Path(__file__).parent / "mcp_server.py"
STDIO = ["python", str(SERVER)]
ROWS = [{"prompt": "What is 2 + 3? Use the add tool.", "answer": 5}]
REF = "opd_agents.env.adapters.mcp:MCPToolEnv"
START_WAIT_S = 30.0  # a loaded machine may take this long to import the SDK in a fresh interpreter


def call(env: MCPToolEnv, name: str, **arguments: Any) -> tuple[ToolResult, bool, dict[str, Any]]:
    """One assistant turn with one hermes tool call: (its result, terminated, info)."""
    text = f'<tool_call>{json.dumps({"name": name, "arguments": arguments})}</tool_call>'
    _, _, terminated, _, info = env.step(text)
    return info["tool_results"][0], terminated, info


def pid_of(env: MCPToolEnv) -> int:
    result, _, _ = call(env, "pid")
    return int(result.content)


def gone(pid: int, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our child (stdio servers are)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def env() -> Iterator[MCPToolEnv]:
    env = MCPToolEnv(server=STDIO, dataset=ROWS, timeout_s=1.0, limits={"max_turns": 20})
    yield env
    env.close()


def test_every_server_tool_is_a_tool_with_the_servers_schema(env: MCPToolEnv) -> None:
    schemas = {s["function"]["name"]: s["function"] for s in env.tool_schemas}
    assert set(schemas) == {"add", "fail", "slow", "notes_add", "pid", "die"}  # "notes.add" made a valid name
    assert schemas["add"] == {"name": "add", "description": "Add two integers.", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}
    assert schemas["notes_add"]["parameters"]["properties"]["tags"]["anyOf"][0] == {
        "type": "array", "items": {"type": "string"}}
    messages, info = env.reset(seed=0)
    assert info["tool_schemas"] == env.tool_schemas and messages[1]["content"] == ROWS[0]["prompt"]
    assert env.toolbox.tools["add"](a=2, b=40) == "42"  # a tool is callable outside an episode too


def test_an_episode_with_results_and_every_kind_of_error(env: MCPToolEnv) -> None:
    env.reset(seed=0)
    result, terminated, _ = call(env, "add", a=2, b=3)
    assert (result.content, result.error_type, terminated) == ("5", None, False)
    result, _, _ = call(env, "notes.add", text="x")  # the original MCP name is not a tool name here
    assert result.error_type == ErrorType.tool_not_found
    assert call(env, "notes_add", text="first")[0].content == "1 notes"
    assert call(env, "notes_add", text="second", tags=["a"])[0].content == "2 notes"  # one session: state kept

    result, terminated, _ = call(env, "fail", message="disk full")  # the server's isError result
    assert result.error_type == ErrorType.execution_failed and "disk full" in result.content and not terminated

    result, _, _ = call(env, "add", a="two", b=3)  # checked against the schema before any call
    assert result.error_type == ErrorType.validation_failed and "a: 'two' is not of type 'integer'" in result.content
    assert call(env, "add", a=1)[0].error_type == ErrorType.validation_failed  # b is required

    start = time.monotonic()
    result, terminated, _ = call(env, "slow", seconds=30)
    assert result.error_type == ErrorType.timeout and not terminated and time.monotonic() - start < 5
    assert call(env, "add", a=1, b=1)[0].content == "2"  # the session survives a timed-out call

    _, reward, terminated, _, info = env.step("2 + 3 = 5. Answer: 5")
    assert (reward, terminated, info["stop_reason"]) == (1.0, True, StopReason.completed)


def test_a_server_that_dies_mid_episode_ends_it_and_the_next_reset_restarts_it() -> None:
    env = MCPToolEnv(server=STDIO, dataset=ROWS)
    env.reset(seed=0)
    first = pid_of(env)
    result, terminated, info = call(env, "die")
    assert result.error_type == ErrorType.execution_failed and "MCP server is gone" in result.content
    assert terminated and info["stop_reason"] == StopReason.tool_stop
    env.reset(seed=1)
    second = pid_of(env)
    assert second != first and call(env, "add", a=1, b=2)[0].content == "3"
    env.close()
    assert gone(second)  # close() stops a stdio server


def test_an_env_dropped_without_close_stops_its_server() -> None:
    env = MCPToolEnv(server=STDIO, dataset=ROWS)  # a user's env dropped without close()
    env.reset(seed=0)
    pid = pid_of(env)
    del env
    gc.collect()
    assert gone(pid)


def test_the_rollout_closes_each_episodes_env_and_so_its_server(tiny_model_dir: Path) -> None:
    from opd_agents.models import load_model
    from opd_agents.rollout.hf_engine import HFEngine
    from opd_agents.rollout.renderer import ChatMLRenderer
    from opd_agents.rollout.runner import Rollout
    from opd_agents.types import SamplingParams

    pids: list[int] = []
    made: list[MCPToolEnv] = []  # kept alive here: their servers stop because the rollout closes them, not by GC

    class Recorded(MCPToolEnv):
        def reset(self, **kwargs: Any) -> Any:
            out = super().reset(**kwargs)
            pids.append(pid_of(self))
            made.append(self)
            return out

    model, tok = load_model(tiny_model_dir)
    probe = MCPToolEnv(server=STDIO, dataset=ROWS)
    renderer = ChatMLRenderer(tok, probe.parser)
    probe.close()
    rollout = Rollout(HFEngine(model, renderer), lambda: Recorded(server=STDIO, dataset=ROWS),
                      SamplingParams(max_tokens_per_turn=4, seed=0))
    trajs = rollout.run([0, 1, 2])
    rollout.close()
    assert len(trajs) == len(set(pids)) == 3
    assert all(gone(pid) for pid in pids)  # no server per episode left behind


@pytest.mark.parametrize(("server", "message"), [
    ("no-such-mcp-server --stdio", "MCP server command 'no-such-mcp-server --stdio' cannot be started"),
    (["python", "-c", "import sys; print('bad config', file=sys.stderr); sys.exit(2)"], "bad config"),
    (["python", "-c", "import time; time.sleep(60)"], "no handshake and tool listing within 2s"),
    ("http://127.0.0.1:9/mcp", "MCP server URL http://127.0.0.1:9/mcp cannot be started or reached"),
])
def test_a_server_that_cannot_start_or_answer_is_a_typed_error_before_any_work(server: Any, message: str) -> None:
    start = time.monotonic()
    with pytest.raises(MCPServerError, match="MCP server") as err:
        MCPToolEnv(server=server, dataset=ROWS, connect_timeout_s=2.0)
    assert message in str(err.value) and time.monotonic() - start < START_WAIT_S


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"dataset": ROWS}, "no MCP server"),
    ({"server": {"command": "x", "urls": "y"}, "dataset": ROWS}, "unknown keys ['urls']"),
    ({"server": STDIO, "dataset": "/no/such.jsonl"}, "no such file"),
    ({"server": STDIO, "dataset": ROWS, "grader": "no_such_mod:grade"}, "grader 'no_such_mod:grade'"),
    ({"server": STDIO, "dataset": ROWS, "include": ["add", "nope"]}, "has no tools ['nope']"),
])
def test_bad_setups_are_config_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=r"\S") as err:
        MCPToolEnv(**kwargs)
    assert message in str(err.value)


def test_server_entries_in_the_mcpservers_style() -> None:
    spec = MCPServerSpec.parse({"command": "python", "args": ["-m", "srv"], "env": {"K": "v"}})
    assert spec.command == ("python", "-m", "srv") and spec.stdio_parameters().command == sys.executable
    assert MCPServerSpec.parse({"url": "https://h/mcp", "headers": {"A": "b"}}).headers == {"A": "b"}
    assert MCPServerSpec.parse("uvx some-server --flag").command == ("uvx", "some-server", "--flag")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def http_server() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(SERVER), "--http", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + START_WAIT_S
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "the MCP HTTP server did not start"
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}/mcp", proc
    proc.kill()
    proc.wait()


def test_streamable_http_server_results_timeout_and_a_killed_server(
        http_server: tuple[str, subprocess.Popen[bytes]]) -> None:
    url, proc = http_server
    env = MCPToolEnv(server={"url": url}, dataset=ROWS, timeout_s=1.0, include=["add", "slow"], prefix="calc_")
    assert [s["function"]["name"] for s in env.tool_schemas] == ["calc_add", "calc_slow"]
    env.reset(seed=0)
    assert call(env, "calc_add", a=20, b=22)[0].content == "42"
    assert call(env, "calc_slow", seconds=30)[0].error_type == ErrorType.timeout
    assert call(env, "calc_add", a=1, b=1)[0].content == "2"
    proc.kill()
    proc.wait()
    result, terminated, info = call(env, "calc_add", a=1, b=1)
    assert result.error_type == ErrorType.execution_failed and result.stop_episode
    assert terminated and info["stop_reason"] == StopReason.tool_stop
    with pytest.raises(MCPServerError, match=f"MCP server URL {url} cannot be started or reached"):
        env.reset(seed=1)  # a server that stays down is the run's problem, named, not the model's
    env.close()


def test_by_reference_with_a_jsonl_dataset_and_check_env(tmp_path: Path) -> None:
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} + 1?", "answer": i + 1}) + "\n" for i in range(3)))
    env = make_env(REF, server={"command": "python", "args": [str(SERVER)]}, dataset=str(data),
                   grader="number").unwrapped
    check_env(env, skip_render_check=True)
    env.reset(seed=2)
    assert env.task.answer == 3 and env.grade(env.task, "Answer: 3") == 1.0 and env.grade(env.task, "4") == 0.0
    env.close()


def test_the_example_units_env_played_by_its_scripted_expert() -> None:
    from opd_agents.environments.mcp_units import UnitsMCPEnv
    from opd_agents.rollout.expert import play_expert

    (traj,) = play_expert(UnitsMCPEnv, [7])
    assert traj.success and traj.turns[0].tool_results[0].name == "convert"
    assert str(traj.turns[0].tool_results[0].content) in traj.turns[1].text


@pytest.mark.slow
def test_the_example_units_env_by_the_scripted_expert_from_the_cli(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from opd_agents.cli import app

    out = tmp_path / "r.jsonl"
    result = CliRunner().invoke(app, ["rollout", "--env", "opd_agents.environments.mcp_units:UnitsMCPEnv",
                                      "--expert", "-n", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    trajs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(trajs) == 2 and all(t["success"] for t in trajs), trajs
    assert trajs[0]["turns"][0]["tool_results"][0]["name"] == "convert"


def test_the_readme_example_runs() -> None:
    from tests.test_readme import python_blocks

    (block,) = [b for b in python_blocks("Define your own environment") if "MCPToolEnv" in b]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, "README:mcp", "exec"), {})
    assert out.getvalue().splitlines() == ["['convert', 'list_units']", "3.10686", "1.0"]
