"""Arithmetic and PythonMath envs: gymnasium conformance, seeding, grading, the expert, bad model output."""

from __future__ import annotations

import json
from fractions import Fraction

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

import opd_agents  # noqa: F401 - registers the opd_agents/ envs
from environments.arithmetic import ArithmeticEnv, extract_number, grade_number
from environments.python_math import TEMPLATES as PYTHON_TEMPLATES
from environments.python_math import PythonMathEnv
from opd_agents.env.core import ToolEnv, heldout_seeds
from opd_agents.errors import ConfigError, EnvOrderError
from opd_agents.types import ErrorType, StopReason

ENV_IDS = ["opd_agents/Arithmetic-v0", "opd_agents/PythonMath-v0"]
PARSERS = ["hermes", "fenced_json", "react"]
SEEDS = list(range(20)) + heldout_seeds(20)


def make(env_id: str, **kwargs: object) -> ToolEnv:
    env = gym.make(env_id, **kwargs).unwrapped
    assert isinstance(env, ToolEnv)
    return env


def play_expert(env: ToolEnv, seed: int) -> tuple[float, dict]:
    env.reset(seed=seed)
    assert env.task is not None
    while True:
        _, reward, terminated, truncated, info = env.step(env.expert_action(env.task, env.history))
        if terminated or truncated:
            return reward, info


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_check_env_passes(env_id: str) -> None:
    check_env(make(env_id), skip_render_check=True)


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_tasks_are_deterministic_per_seed(env_id: str) -> None:
    first, second = make(env_id), make(env_id)
    for seed in (0, 7, heldout_seeds(1)[0]):
        obs1, info1 = first.reset(seed=seed)
        obs2, info2 = second.reset(seed=seed)
        assert obs1 == obs2 and info1["task_id"] == info2["task_id"]
        assert first.task == second.task
    prompts = set()
    for seed in range(20):
        first.reset(seed=seed)
        assert first.task is not None
        prompts.add(first.task.prompt)
    assert len(prompts) == 20


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_split_follows_the_seed(env_id: str) -> None:
    env = make(env_id)
    _, info = env.reset(seed=5)
    assert info["split"] == "train" and env.task is not None and env.task.split == "train"
    _, info = env.reset(seed=heldout_seeds(1)[0])
    assert info["split"] == "heldout" and env.task.split == "heldout"


@pytest.mark.parametrize("parser", PARSERS)
@pytest.mark.parametrize("difficulty", [1, 2, 3, 4])
def test_arithmetic_expert_solves_everything(parser: str, difficulty: int) -> None:
    env = make("opd_agents/Arithmetic-v0", parser=parser, difficulty=difficulty)
    for seed in SEEDS:
        reward, info = play_expert(env, seed)
        assert (reward, info["success"], info["stop_reason"]) == (1.0, True, StopReason.completed), seed
        assert env.task is not None and len(env.task.data["expressions"]) == difficulty
        assert [m.role for m in env.history].count("tool") == difficulty  # one calculator call per operation


@pytest.mark.parametrize("parser", PARSERS)
def test_python_math_expert_solves_everything(parser: str) -> None:
    env = make("opd_agents/PythonMath-v0", parser=parser)
    templates = set()
    for seed in SEEDS:
        reward, info = play_expert(env, seed)
        assert (reward, info["success"]) == (1.0, True), (seed, [m.content for m in env.history[-3:]])
        assert env.task is not None
        templates.add(env.task.data["template"])
    assert len(templates) >= len(PYTHON_TEMPLATES) // 2  # the seeds exercise most templates


def test_reference_lists_the_calculator_expressions_and_answer() -> None:
    env = make("opd_agents/Arithmetic-v0", difficulty=4)
    env.reset(seed=3)
    task = env.task
    assert task is not None
    for expression in task.data["expressions"]:
        assert f'calculator("{expression}")' in task.reference
    assert task.reference.endswith(f"Answer: {task.answer}")
    assert "calculator tool" in task.prompt and "Answer: <number>" in task.prompt
    json.dumps(task.model_dump())  # task data stays JSON-serialisable (no numpy ints)


def test_python_math_reference_holds_the_program() -> None:
    env = make("opd_agents/PythonMath-v0")
    env.reset(seed=11)
    assert env.task is not None
    assert env.task.data["code"] in env.task.reference and str(env.task.answer) in env.task.reference


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_wrong_answer_grades_zero(env_id: str) -> None:
    env = make(env_id)
    env.reset(seed=2)
    assert env.task is not None
    _, reward, terminated, truncated, info = env.step(f"Answer: {env.task.answer + 1}")
    assert (reward, terminated, truncated, info["success"]) == (0.0, True, False, False)
    env.reset(seed=2)
    _, reward, *_ = env.step(f"I am done.\nAnswer: {env.task.answer}")
    assert reward == 1.0


@pytest.mark.parametrize(("text", "expected"), [
    ("Answer: 42", Fraction(42)),
    ("Final Answer: $1,234", Fraction(1234)),
    ("answer: -12.5 dollars", Fraction(-25, 2)),
    ("Answer: 3 then Answer: 7", Fraction(7)),  # the last "Answer:" counts
    ("no marker, 12 then 99", Fraction(99)),  # fallback: last number
    ("Answer: unknown", None),
    ("nothing here", None),
])
def test_extract_number(text: str, expected: Fraction | None) -> None:
    assert extract_number(text) == expected


def test_grade_is_exact_for_big_integers() -> None:
    big = 10**20 + 1
    assert grade_number(f"Answer: {big}", big) == 1.0
    assert grade_number(f"Answer: {big - 1}", big) == 0.0
    assert grade_number("Answer: 2.5000001", "2.5") == 1.0


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_malformed_call_is_a_parse_error_and_the_episode_continues(env_id: str) -> None:
    env = make(env_id)
    env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step('<tool_call>{"name": "calculator", "arguments": </tool_call>')
    assert not terminated and not truncated and reward == 0.0
    assert obs[0]["content"].startswith("formatting issue: invalid JSON")
    assert [r.error_type for r in info["tool_results"]] == [ErrorType.parse_error]
    env.step(env.expert_action(env.task, env.history))  # the episode goes on


def test_unknown_tool_and_bad_arguments() -> None:
    env = make("opd_agents/Arithmetic-v0")
    env.reset(seed=0)
    fmt = env.parser.format_call
    obs, _, terminated, _, info = env.step(fmt("search", {"query": "x"}) + "\n" + fmt("calculator", {"expr": "1+1"}))
    assert not terminated
    assert [r.error_type for r in info["tool_results"]] == [ErrorType.tool_not_found, ErrorType.validation_failed]
    assert "Available tools: calculator" in obs[0]["content"]
    assert "expression" in obs[1]["content"]


def test_python_math_code_errors_reach_the_model() -> None:
    env = make("opd_agents/PythonMath-v0")
    env.reset(seed=0)
    obs, _, terminated, _, info = env.step(env.parser.format_call("python", {"code": "print(1 / 0)"}))
    assert not terminated
    assert info["tool_results"][0].error_type is ErrorType.execution_failed
    assert "ZeroDivisionError" in obs[0]["content"]


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_max_turns_truncates_without_exception(env_id: str) -> None:
    env = make(env_id, limits={"max_turns": 2})
    env.reset(seed=0)
    name, args = ("calculator", {"expression": "1+1"}) if "Arithmetic" in env_id else ("python", {"code": "print(2)"})
    call = env.parser.format_call(name, args)
    assert env.step(call)[2:4] == (False, False)
    _, _, terminated, truncated, info = env.step(call)
    assert (terminated, truncated, info["stop_reason"]) == (False, True, StopReason.max_turns)
    with pytest.raises(EnvOrderError):
        env.step(call)


@pytest.mark.parametrize("env_cls", [ArithmeticEnv, PythonMathEnv])
def test_step_before_reset_raises(env_cls: type[ToolEnv]) -> None:
    with pytest.raises(EnvOrderError):
        env_cls().step("Answer: 1")


@pytest.mark.parametrize("difficulty", [0, 5])
def test_bad_difficulty_is_a_config_error(difficulty: int) -> None:
    with pytest.raises(ConfigError, match="difficulty must be one of"):
        ArithmeticEnv(difficulty=difficulty)
