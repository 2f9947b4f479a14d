"""Message-level limits of ToolEnv: each ends the episode with its stop reason, never an exception."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from opd_agents import EnvLimits, StopEpisode, StopReason, Task, ToolEnv, tool
from opd_agents.errors import EnvOrderError
from opd_agents.types import ErrorType


@tool
def ping(n: int) -> str:
    """Reply pong n times.

    Args:
        n: how many pongs
    """
    if n < 0:
        raise ArithmeticError("negative pongs")
    if n == 99:
        raise StopEpisode("the tool ended the episode")
    return "pong" * n


class PingEnv(ToolEnv):
    tools = [ping]

    def generate_task(self, rng: np.random.Generator, seed: int, split: str) -> Task:
        return Task(id=f"ping-{seed}", seed=seed, split=split, prompt="Ping twice.", answer="pongpong")

    def grade(self, task: Task, answer: str) -> float:
        return float(task.answer in answer)


def call(n: Any) -> str:
    return f"<tool_call>{json.dumps({'name': 'ping', 'arguments': {'n': n}})}</tool_call>"


def env(**limits: Any) -> PingEnv:
    e = PingEnv(limits=EnvLimits(**limits))
    e.reset(seed=0)
    return e


def test_too_many_tool_calls_ends_with_max_tool_calls() -> None:
    e = env(max_tool_calls=2)
    obs, _, terminated, truncated, info = e.step(call(1) + call(2) + call(3))
    assert (terminated, truncated, info["stop_reason"]) == (False, True, StopReason.max_tool_calls)
    assert [r.content for r in info["tool_results"]] == ["pong", "pongpong"]  # the third never ran


def test_consecutive_parse_errors_end_with_parse_error() -> None:
    e = env(max_consecutive_parse_errors=2)
    _, _, _, truncated, info = e.step("<tool_call>{not json</tool_call>")
    assert not truncated and info["tool_results"][0].error_type == ErrorType.parse_error
    assert info["tool_results"][0].content.startswith("formatting issue: ")
    _, _, _, truncated, info = e.step("<tool_call>{also not json")
    assert truncated and info["stop_reason"] == StopReason.parse_error


def test_a_valid_call_resets_the_parse_error_streak() -> None:
    e = env(max_consecutive_parse_errors=2)
    e.step("<tool_call>{bad</tool_call>")
    e.step(call(1))
    _, _, _, truncated, _ = e.step("<tool_call>{bad</tool_call>")
    assert not truncated


def test_max_turns() -> None:
    e = env(max_turns=2)
    e.step(call(1))
    _, _, terminated, truncated, info = e.step(call(1))
    assert (terminated, truncated, info["stop_reason"]) == (False, True, StopReason.max_turns)


def test_tool_stop_and_fatal_exceptions() -> None:
    _, _, terminated, _, info = env().step(call(99))
    assert terminated and info["stop_reason"] == StopReason.tool_stop
    _, _, terminated, truncated, info = env().step(call(-1))  # not fatal by default: the episode goes on
    assert not (terminated or truncated) and info["tool_results"][0].error_type == ErrorType.execution_failed
    assert info["tool_results"][0].content == "Tool execution failed: ArithmeticError: negative pongs"
    _, _, terminated, _, info = env(fatal_exceptions=["ArithmeticError"]).step(call(-1))
    assert terminated and info["stop_reason"] == StopReason.tool_stop


def test_oversized_output_is_cut_with_a_marker() -> None:
    _, _, _, _, info = env().step(call(2000))
    content = info["tool_results"][0].content
    assert len(content) <= ping.max_output_chars and content.endswith("[truncated]")


def test_final_answer_is_graded_and_order_is_enforced() -> None:
    e = env()
    with pytest.raises(EnvOrderError):
        PingEnv().step("hello")
    _, reward, terminated, _, info = e.step("Answer: pongpong")
    assert (reward, terminated, info["stop_reason"], info["success"]) == (1.0, True, StopReason.completed, True)
    with pytest.raises(EnvOrderError, match="after the episode ended"):
        e.step("again")


def test_unknown_fatal_exception_name_is_refused() -> None:
    with pytest.raises(ValueError, match="'NoSuchError' is not a built-in exception"):
        PingEnv(limits=EnvLimits(fatal_exceptions=["NoSuchError"]))
