"""`opd-agents envs` and `opd-agents rollout` as a user runs them."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from opd_agents.cli import app
from opd_agents.store import read_trajectories

runner = CliRunner()


def test_envs_lists_every_shipped_env_with_its_tools() -> None:
    result = runner.invoke(app, ["envs"], terminal_width=200)
    assert result.exit_code == 0
    for env_id, tool in [("opd_agents/Arithmetic-v0", "calculator"), ("opd_agents/PythonMath-v0", "python"),
                         ("opd_agents/RetrievalQA-v0", "search, open_document")]:
        line = next(line for line in result.output.splitlines() if env_id in line)
        assert tool in line


def test_rollout_expert_writes_trajectories_and_prints_summary(tmp_path: Path) -> None:
    out = tmp_path / "expert.jsonl"
    result = runner.invoke(app, ["rollout", "--env", "RetrievalQA-v0", "--expert", "-n", "3", "--out", str(out)],
                           terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "success_rate" in result.output and '"completed": 3' in result.output
    trajs = read_trajectories(out)
    assert [t.seed for t in trajs] == [1_000_000, 1_000_001, 1_000_002] and all(t.success for t in trajs)


def test_rollout_with_a_model_dir(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "r.jsonl"
    result = runner.invoke(app, ["rollout", "--env", "opd_agents/Arithmetic-v0", "--model", str(tiny_model_dir),
                                 "-n", "2", "--max-tokens-per-turn", "8", "--out", str(out)], terminal_width=200)
    assert result.exit_code == 0, result.output
    trajs = read_trajectories(out)
    assert len(trajs) == 2 and all(t.stop_reason.value == "max_tokens" for t in trajs)
    assert all(len(t.turns[0].token_ids) == 8 == len(t.turns[0].sampling_logprobs) for t in trajs)


@pytest.mark.parametrize(("dtype", "fp32_gap"), [("float32", (0.0, 1e-4)), ("bfloat16", (1e-4, 0.2))])
def test_rollout_samples_in_the_dtype_asked_for(dtype: str, fp32_gap: tuple[float, float], tmp_path: Path,
                                                tiny_model_dir: Path) -> None:
    """The recorded logprobs are the engine's: an fp32 forward over the stored ids gives them back in float32,
    and differs from them by bf16 rounding (not more) under --dtype bfloat16."""
    import numpy as np

    from opd_agents.models import load_model
    from tests.test_rollout import fresh_logprobs

    out = tmp_path / "r.jsonl"
    result = runner.invoke(app, ["rollout", "--env", "opd_agents/Arithmetic-v0", "--model", str(tiny_model_dir),
                                 "-n", "2", "--max-tokens-per-turn", "16", "--dtype", dtype, "--out", str(out)],
                           terminal_width=200)
    assert result.exit_code == 0, result.output
    model, _ = load_model(tiny_model_dir)
    gaps = [np.abs(np.subtract(*fresh_logprobs(model, t))).mean() for t in read_trajectories(out)]
    assert all(fp32_gap[0] <= g < fp32_gap[1] for g in gaps), gaps


def test_rollout_refuses_an_unknown_dtype(tmp_path: Path) -> None:
    result = runner.invoke(app, ["rollout", "--env", "opd_agents/Arithmetic-v0", "--dtype", "fp8", "--out",
                                 str(tmp_path / "r.jsonl")], terminal_width=200)
    assert result.exit_code == 2 and "--dtype must be" in result.output
    assert not (tmp_path / "r.jsonl").exists()


def test_rollout_refuses_a_missing_model_before_any_work(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    result = runner.invoke(app, ["rollout", "--env", "Arithmetic-v0", "--model", str(tmp_path / "nope"),
                                 "--out", str(out)], terminal_width=200)
    assert result.exit_code == 2
    assert str(tmp_path / "nope") in result.output.replace("\n", "") and not out.exists()


def test_rollout_refuses_an_unknown_env(tmp_path: Path) -> None:
    result = runner.invoke(app, ["rollout", "--env", "Nope-v0", "--expert", "--out", str(tmp_path / "x.jsonl")],
                           terminal_width=200)
    assert result.exit_code == 2 and "unknown environment 'Nope-v0'" in result.output


def test_rollout_passes_env_arguments(tmp_path: Path) -> None:
    out = tmp_path / "e.jsonl"
    result = runner.invoke(app, ["rollout", "--env", "Arithmetic-v0", "--expert", "-n", "2", "--env-arg", "difficulty=3",
                                 "--out", str(out)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert all(len(t.turns) == 4 for t in read_trajectories(out))  # 3 calculator calls, then the answer
    bad = runner.invoke(app, ["rollout", "--env", "Arithmetic-v0", "--expert", "--env-arg", "difficultyy=3",
                              "--out", str(out)], terminal_width=200)
    assert bad.exit_code == 2 and "difficultyy" in bad.output


def test_envs_lists_an_env_that_cannot_be_built_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    from tools import python_exec

    monkeypatch.setattr(python_exec, "os_sandbox_problem", lambda: "no user namespaces here")
    result = runner.invoke(app, ["envs"], terminal_width=250)
    assert result.exit_code == 0
    line = next(line for line in result.output.splitlines() if "PythonMath-v0" in line)
    assert "unavailable" in line
    assert "no user namespaces here" in " ".join(result.output.replace("│", " ").split())  # wrapped in its cell
    assert "calculator" in next(line for line in result.output.splitlines() if "Arithmetic-v0" in line)
