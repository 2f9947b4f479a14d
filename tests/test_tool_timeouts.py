"""Process-isolated tools: a runaway CPU-bound call is killed at its timeout and the episode goes on."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from opd_agents import StopEpisode, Task, ToolEnv, tool
from opd_agents.errors import ToolDefinitionError
from opd_agents.env.tool import Tool, ToolBox
from opd_agents.types import ErrorType, ToolCall, ToolResult


# Module level: the worker process imports these by name.
@tool(timeout_s=1.0, isolation="process")
def spin(seconds: float, pid_file: str = "") -> str:
    """Spin in pure Python (never yields, never sleeps).

    Args:
        seconds: how long to spin
        pid_file: where to write the worker's pid first
    """
    if pid_file:
        Path(pid_file).write_text(str(os.getpid()))
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return f"spun {seconds}"


@tool(timeout_s=5.0, isolation="process", max_output_chars=30)
def misbehave(mode: str) -> object:
    if mode == "raise":
        raise KeyError("boom")
    if mode == "stop":
        raise StopEpisode("done here")
    if mode == "own_timeout":
        raise TimeoutError("the tool's own limit")
    if mode == "die":
        os._exit(3)
    if mode == "pid":
        time.sleep(0.3)
        return os.getpid()
    return {"values": list(range(100))}


class SpinEnv(ToolEnv):
    tools = [spin]

    def generate_task(self, rng: np.random.Generator, seed: int, split: str) -> Task:
        return Task(id=f"spin-{seed}", seed=seed, split=split, prompt="Spin.", answer="")

    def grade(self, task: Task, answer: str) -> float:
        return 0.0


def spin_call(seconds: float, pid_file: str = "") -> str:
    arguments = {"seconds": seconds, "pid_file": pid_file}
    return f"<tool_call>{json.dumps({'name': 'spin', 'arguments': arguments})}</tool_call>"


def run(t: Tool, **arguments: object) -> ToolResult:
    return ToolBox([t]).execute([ToolCall(name=t.name, arguments=dict(arguments))])[0]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_spinning_cpu_bound_tool_is_killed_at_its_timeout_and_the_episode_goes_on(tmp_path: Path) -> None:
    env = SpinEnv()
    env.reset(seed=0)
    assert env.step(spin_call(0))[4]["tool_results"][0].content == "spun 0.0"  # warm: start-up is not timed
    pid_file = tmp_path / "pid"
    start = time.perf_counter()
    _, _, terminated, truncated, info = env.step(spin_call(60, str(pid_file)))
    elapsed = time.perf_counter() - start
    res = info["tool_results"][0]
    assert res.error_type is ErrorType.timeout and res.content == "Tool spin timed out after 1.0s"
    assert 1.0 <= elapsed < 10.0  # the timeout, not the 60 s
    assert not (terminated or truncated)
    assert not pid_alive(int(pid_file.read_text()))  # SIGKILLed and reaped: nothing leaks
    _, _, _, _, info = env.step(spin_call(0.01))  # the same env: a fresh worker answers the next call
    assert info["tool_results"][0].content == "spun 0.01" and info["tool_results"][0].ok


def test_worker_is_reused_between_calls(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    assert run(spin, seconds=0, pid_file=str(first)).ok and run(spin, seconds=0, pid_file=str(second)).ok
    assert first.read_text() == second.read_text() != str(os.getpid())


def test_failures_in_the_worker_are_typed_like_in_a_thread() -> None:
    res = run(misbehave, mode="raise")
    assert (res.error_type, res.content) == (ErrorType.execution_failed, "Tool execution failed: KeyError: 'boom'")
    res = run(misbehave, mode="stop")
    assert res.stop_episode and res.ok and res.content == "done here"
    res = run(misbehave, mode="own_timeout")
    assert res.error_type is ErrorType.timeout and "the tool's own limit" in res.content
    res = run(misbehave, mode="list")  # non-string results are str()-ed and cut in the worker
    assert res.ok and len(res.content) <= 30 and res.content.endswith("[truncated]")
    assert run(misbehave, mode=["not", "a", "string"]).error_type is ErrorType.validation_failed
    box = ToolBox([misbehave], fatal_exceptions=[KeyError])
    res = box.execute([ToolCall(name="misbehave", arguments={"mode": "raise"})])[0]
    assert res.error_type is ErrorType.execution_failed and res.stop_episode


def test_a_worker_that_dies_is_an_execution_failure_and_is_replaced() -> None:
    res = run(misbehave, mode="die")
    assert res.error_type is ErrorType.execution_failed
    assert res.content == "Tool execution failed: RuntimeError: the tool's worker process died (exit code 3)"
    assert run(misbehave, mode="raise").error_type is ErrorType.execution_failed  # answered by a new worker


def test_concurrent_calls_run_in_separate_workers() -> None:
    async def both() -> list[ToolResult]:
        calls = [ToolCall(name="misbehave", arguments={"mode": "pid"}) for _ in range(2)]
        return list(await asyncio.gather(*(misbehave.acall(c) for c in calls)))

    first, second = asyncio.run(both())
    assert first.ok and second.ok and first.content != second.content


def _closure_tool() -> None:
    def inner(x: int) -> int:
        return x

    tool(isolation="process")(inner)


class _Holder:
    def method(self, x: int) -> int:
        return x


async def _async_fn(x: int) -> int:
    return x


@pytest.mark.parametrize(("make", "detail"), [
    (_closure_tool, "not a module-level function"),
    (lambda: Tool(lambda x: x, name="anonymous", isolation="process"), "not a module-level function"),
    (lambda: Tool(_Holder().method, isolation="process"), "not a module-level function"),
    (lambda: tool(isolation="process")(_async_fn), "async function"),
    (lambda: tool(isolation="subinterpreter")(_async_fn), "isolation must be 'thread' or 'process'"),
])
def test_process_isolation_is_refused_at_definition_time(make: Callable[[], object], detail: str) -> None:
    with pytest.raises(ToolDefinitionError, match=detail):
        make()

