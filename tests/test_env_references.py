"""Envs by reference (module:ClassName, module:registered-id, installed packages' entry points) and the
shipped envs and tools under the project's namespace."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from typer.testing import CliRunner

from opd_agents import Task, ToolEnv, tool
from opd_agents.cli import app
from opd_agents.env.registry import make_env, resolve_env_id
from opd_agents.errors import UnknownEnvError


@tool
def to_celsius(fahrenheit: float) -> str:
    """Convert a temperature.

    Args:
        fahrenheit: degrees Fahrenheit
    """
    return f"{(fahrenheit - 32) * 5 / 9:.1f}"


class UnitsEnv(ToolEnv):
    """Convert one temperature with the tool, then answer."""

    tools = [to_celsius]

    def generate_task(self, rng: np.random.Generator, seed: int, split: str) -> Task:
        f = int(rng.integers(0, 200))
        return Task(id=f"units-{seed}", seed=seed, split=split, prompt=f"What is {f} F in Celsius?",
                    answer=f"{(f - 32) * 5 / 9:.1f}")

    def grade(self, task: Task, answer: str) -> float:
        return float(answer.strip() == task.answer)

    def expert_action(self, task: Task, history: list[Any]) -> str:
        if len(history) <= 2:
            return self.parser.format_call("to_celsius", {"fahrenheit": float(task.prompt.split()[2])})
        return f"Answer: {task.answer}"


NOT_AN_ENV = 3
REF = f"{__name__}:UnitsEnv"


def test_module_class_reference_everywhere(tmp_path: Path) -> None:
    assert resolve_env_id(REF) == REF
    env = make_env(REF, limits={"max_turns": 3}).unwrapped
    assert isinstance(env, UnitsEnv) and env.limits.max_turns == 3
    out = tmp_path / "r.jsonl"
    result = CliRunner().invoke(app, ["rollout", "--env", REF, "--expert", "-n", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text().count("\n") == 2 and f'"env_id":"{REF}"' in out.read_text().replace(" ", "")


def test_gymnasium_module_colon_id_convention(tmp_path: Path) -> None:
    module = tmp_path / "units_pkg_register.py"
    module.write_text(textwrap.dedent(f"""
        import gymnasium as gym
        gym.register("units/Units-v0", entry_point="{__name__}:UnitsEnv", disable_env_checker=True)
    """))
    sys.path.insert(0, str(tmp_path))
    try:
        assert resolve_env_id("units_pkg_register:units/Units-v0") == "units/Units-v0"
        assert isinstance(make_env("units_pkg_register:units/Units-v0").unwrapped, UnitsEnv)
    finally:
        sys.path.remove(str(tmp_path))


@pytest.mark.parametrize(("ref", "message"), [
    ("no_such_module_xyz:Env", "cannot import module 'no_such_module_xyz'"),
    (f"{__name__}:NOT_AN_ENV", "is not a gymnasium.Env subclass"),
    (f"{__name__}:Nope-v0", "unknown environment 'Nope-v0'"),
])
def test_bad_references_are_typed_errors(ref: str, message: str) -> None:
    with pytest.raises(UnknownEnvError, match=message):
        resolve_env_id(ref)


def test_installed_packages_envs_are_found_by_entry_point(tmp_path: Path) -> None:
    """A package that declares [project.entry-points."opd_agents.envs"] shows in `opd-agents envs` and can be made."""
    dist = tmp_path / "units_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: units-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[opd_agents.envs]\nunits/Plugin-v0 = {REF}\n")
    sys.path.insert(0, str(tmp_path))
    try:
        result = CliRunner().invoke(app, ["envs"])
        assert result.exit_code == 0 and "units/Plugin-v0" in result.output and "to_celsius" in result.output
        assert isinstance(make_env("units/Plugin-v0").unwrapped, UnitsEnv)
    finally:
        sys.path.remove(str(tmp_path))
        gym.registry.pop("units/Plugin-v0", None)


def test_shipped_envs_and_tools_under_the_project_namespace() -> None:
    import environments.arithmetic
    import tools.calculator
    from opd_agents.environments.arithmetic import ArithmeticEnv
    from opd_agents.tools import calculator as calculator_module
    from opd_agents.tools.calculator import calculator

    assert ArithmeticEnv is environments.arithmetic.ArithmeticEnv  # the same module, not a copy
    assert calculator_module is tools.calculator and calculator is tools.calculator.calculator
    with pytest.raises(ImportError):
        import opd_agents.tools.no_such_tool  # noqa: F401
