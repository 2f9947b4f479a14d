"""`opd-agents train` refuses a bad run before any work: one "error: ..." line, exit code 2, no traceback,
no run dir, no model loaded. Also the preflight's checks one by one."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from opd_agents.cli import app
from opd_agents.config import parse_config
from opd_agents.errors import ConfigError, ModelLoadError, UnknownEnvError
from opd_agents.training.preflight import check_env, check_teacher_settings, preflight


def run_config(tmp_path: Path, model: Path, **overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "run_dir": str(tmp_path / "run"),
        "env": {"id": "opd_agents/Arithmetic-v0", "kwargs": {"difficulty": 1}},
        "student": {"model": str(model)}, "teacher": {"model": str(model)},
        "train": {"steps": 1, "tasks_per_step": 1}, "teacher_strength": {"episodes": 0},
    }
    for dotted, value in overrides.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cfg


def train_refuses(tmp_path: Path, cfg: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> str:
    """Run `opd-agents train` on ``cfg``; assert the refusal's shape and return its one line."""
    def no_model_load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the student model was loaded before the preflight refused the run")

    monkeypatch.setattr("opd_agents.training.trainer.load_student", no_model_load)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    start = time.perf_counter()
    result = CliRunner().invoke(app, ["train", "-c", str(path)], terminal_width=80)
    elapsed = time.perf_counter() - start
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output  # unwrapped, even at 80 columns
    assert "Traceback" not in result.output and not isinstance(result.exception, AssertionError)
    assert not Path(cfg["run_dir"]).exists()
    assert elapsed < 10.0, elapsed
    return lines[0]


def test_unknown_env_id(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    line = train_refuses(tmp_path, run_config(tmp_path, tiny_model_dir, **{"env.id": "Nope-v0"}), monkeypatch)
    assert "unknown environment 'Nope-v0'" in line and "did you mean" not in line
    assert "opd_agents/Arithmetic-v0, opd_agents/PythonMath-v0, opd_agents/RetrievalQA-v0" in line
    line = train_refuses(tmp_path, run_config(tmp_path, tiny_model_dir, **{"env.id": "Arithmetc-v0"}), monkeypatch)
    assert "(did you mean 'opd_agents/Arithmetic-v0'?)" in line


def test_missing_model_path(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "no-such-model"
    line = train_refuses(tmp_path, run_config(tmp_path, tiny_model_dir, **{"student.model": str(missing)}), monkeypatch)
    assert f"model {str(missing)!r}: no such file or directory" in line and "smollm2-135m-instruct" in line
    line = train_refuses(tmp_path, run_config(tmp_path, tiny_model_dir, **{"teacher.model": str(missing)}), monkeypatch)
    assert str(missing) in line


def test_teacher_server_down(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        api_base = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    cfg = run_config(tmp_path, tiny_model_dir, **{"teacher.backend": "server", "teacher.model": "tiny",
                                                    "teacher.api_base": api_base})
    line = train_refuses(tmp_path, cfg, monkeypatch)
    assert f"teacher server {api_base} (model 'tiny')" in line and "Connection refused" in line


def test_bad_env_kwargs(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = run_config(tmp_path, tiny_model_dir, **{"env.kwargs": {"difficultyy": 3}})
    assert "difficultyy" in train_refuses(tmp_path, cfg, monkeypatch)


def test_settings_a_server_teacher_cannot_serve(tmp_path: Path, tiny_model_dir: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    base = {"teacher.backend": "server", "teacher.model": "tiny", "teacher.api_base": "http://127.0.0.1:1/v1"}
    cfg = run_config(tmp_path, tiny_model_dir, **base, **{"loss.kind": "forward_kl",
                                                            "divergence.rollout_truncation": "both"})
    line = train_refuses(tmp_path, cfg, monkeypatch)  # refused before the (dead) server is even asked
    assert "teacher.backend=server does not work with this config: loss.kind=forward_kl with loss.top_k=0" in line
    assert "divergence.rollout_truncation=both" in line
    check_teacher_settings(parse_config(run_config(tmp_path, tiny_model_dir, **base,
                                                   **{"loss.kind": "jsd", "loss.top_k": 20})))  # top-k: fine


def test_the_checks_one_by_one(tmp_path: Path, tiny_model_dir: Path) -> None:
    preflight(parse_config(run_config(tmp_path, tiny_model_dir)))  # a good config passes
    assert not (tmp_path / "run").exists()
    with pytest.raises(UnknownEnvError):
        check_env(parse_config({"env": {"id": "Nope-v0"}}).env)
    with pytest.raises(ConfigError, match="difficulty"):
        check_env(parse_config({"env": {"id": "Arithmetic-v0", "kwargs": {"difficulty": 99}}}).env)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        preflight(parse_config(run_config(tmp_path, tmp_path / "empty")))
