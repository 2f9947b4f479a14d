"""The SFT teacher built from scripted-expert episodes: trained, saved atomically, reused only when every
setting (the env's constructor kwargs included) matches."""

from __future__ import annotations

import json
from pathlib import Path

from opd_agents.env.registry import make_env
from opd_agents.teacher.sft import build_sft_teacher

ENV = "opd_agents/Arithmetic-v0"


def build(model: Path, out: Path, difficulty: int) -> Path:
    factory = lambda: make_env(ENV, difficulty=difficulty).unwrapped  # noqa: E731
    return build_sft_teacher(str(model), factory, ENV, factory().parser, out, episodes=2, steps=2, batch_size=2,
                             lr=1e-3, seed=0, env_kwargs={"difficulty": difficulty})


def test_sft_teacher_is_reused_only_for_the_same_settings(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "teacher"
    assert build(tiny_model_dir, out, 1) == out
    meta = json.loads((out / "opd_sft_teacher.json").read_text())
    assert meta["settings"]["env_kwargs"] == {"difficulty": 1} and meta["expert_success"] == 1.0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    built_at = (out / "model.safetensors").stat().st_mtime_ns

    build(tiny_model_dir, out, 1)  # same settings: reused, not retrained
    assert (out / "model.safetensors").stat().st_mtime_ns == built_at

    build(tiny_model_dir, out, 2)  # another difficulty is another teacher: rebuilt
    assert json.loads((out / "opd_sft_teacher.json").read_text())["settings"]["env_kwargs"] == {"difficulty": 2}
    assert not list(tmp_path.glob(".teacher.*"))  # no half-written temp dirs left behind
