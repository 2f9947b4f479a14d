"""Message-level limits of ToolEnv: each ends the episode with its stop reason, never an exception."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
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
    obs, _, terminated, truncated, info = e.step(call(1) + call(2) + call(3) + call(4))
    assert (terminated, truncated, info["stop_reason"]) == (False, True, StopReason.max_tool_calls)
    results = info["tool_results"]
    assert [r.call_id for r in results] == [c.id for c in info["tool_calls"]]  # one result per call
    assert [r.content for r in results[:2]] == ["pong", "pongpong"]
    assert [r.error_type for r in results] == [None, None, ErrorType.max_tool_calls, ErrorType.max_tool_calls]
    assert results[2].content == "Not executed: the limit of 2 tool calls per episode was reached"
    assert len(obs) == 4 and obs[3]["tool_call_id"] == results[3].call_id


def test_calls_over_the_limit_in_a_later_turn_and_after_a_parse_error() -> None:
    e = env(max_tool_calls=3)
    e.step(call(1) + call(1))
    _, _, _, truncated, info = e.step("<tool_call>{bad</tool_call>" + call(1) + call(2) + call(3))
    assert truncated and info["stop_reason"] == StopReason.max_tool_calls
    assert [r.error_type for r in info["tool_results"]] == [
        ErrorType.parse_error, None, ErrorType.max_tool_calls, ErrorType.max_tool_calls]


def test_calls_after_a_stop_are_not_executed() -> None:
    _, _, terminated, _, info = env().step(call(1) + call(99) + call(2))
    assert terminated and info["stop_reason"] == StopReason.tool_stop
    assert [r.error_type for r in info["tool_results"]] == [None, None, ErrorType.not_executed]
    assert [r.call_id for r in info["tool_results"]] == [c.id for c in info["tool_calls"]]


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


@pytest.mark.parametrize("parser", ["hermes", "fenced_json", "react"])
def test_overlong_message_is_a_parse_error_without_parsing(parser: str) -> None:
    e = PingEnv(parser=parser, limits=EnvLimits(max_message_chars=1000))
    e.reset(seed=0)
    calls = "".join(e.parser.format_call("ping", {"n": 1}) for _ in range(100))
    _, _, _, _, info = e.step(calls)
    assert info["tool_calls"] == [] and len(info["tool_results"]) == 1
    res = info["tool_results"][0]
    assert res.error_type is ErrorType.parse_error
    assert res.content == "formatting issue: message longer than 1000 characters"
    assert EnvLimits().max_message_chars == 65_536


ADVERSARIAL_12MB: dict[str, list[Callable[[], str]]] = {  # built on use: ~100 MB in all
    "hermes": [lambda: "<tool_call>" * 1_100_000,
               lambda: '<tool_call>{"name": "ping", "arguments": {"n": 1}}</tool_call>' * 190_000],
    "fenced_json": [lambda: "```tool_call\n" * 930_000, lambda: "```tool_call" + "\n" * 12_000_000],
    "react": [lambda: "Action: ping\n" * 930_000, lambda: "Action: ping\nAction Input: x" + "\n" * 12_000_000,
              lambda: 'Action: ping\nAction Input: {"n": 1}\n' * 340_000],
}


@pytest.mark.parametrize(("parser", "index"), [(p, i) for p, ms in ADVERSARIAL_12MB.items() for i in range(len(ms))])
def test_a_12mb_adversarial_message_is_a_quick_parse_error(parser: str, index: int) -> None:
    e = PingEnv(parser=parser)
    e.reset(seed=0)
    text = ADVERSARIAL_12MB[parser][index]()
    assert len(text) > 11_000_000
    start = time.perf_counter()
    _, _, terminated, truncated, info = e.step(text)
    assert time.perf_counter() - start < 2.0  # ReAct took 7.8 s on 11.5 MB, blank runs took hours
    assert [(r.error_type, r.content) for r in info["tool_results"]] == [
        (ErrorType.parse_error, "formatting issue: message longer than 65536 characters")]
    assert not (terminated or truncated)


def test_unknown_fatal_exception_name_is_refused() -> None:
    with pytest.raises(ValueError, match="'NoSuchError' is not a built-in exception"):
        PingEnv(limits=EnvLimits(fatal_exceptions=["NoSuchError"]))
