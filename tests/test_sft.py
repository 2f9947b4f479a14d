"""The SFT teacher built from scripted-expert episodes: trained, saved atomically, reused only when every
setting (the env's constructor kwargs included) matches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from opd_agents.env.registry import make_env
from opd_agents.teacher.sft import build_sft_teacher

ENV = "opd_agents/Arithmetic-v0"


def build(model: Path, out: Path, difficulty: int, compute_dtype: torch.dtype | None = None) -> Path:
    factory = lambda: make_env(ENV, difficulty=difficulty).unwrapped  # noqa: E731
    return build_sft_teacher(str(model), factory, ENV, factory().parser, out, episodes=2, steps=2, batch_size=2,
                             lr=1e-3, seed=0, env_kwargs={"difficulty": difficulty}, compute_dtype=compute_dtype)


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
    fp32_weights = (out / "model.safetensors").read_bytes()
    build(tiny_model_dir, out, 2, torch.bfloat16)  # trained under bf16 autocast: another teacher, rebuilt
    assert json.loads((out / "opd_sft_teacher.json").read_text())["settings"]["compute_dtype"] == "bfloat16"
    assert (out / "model.safetensors").read_bytes() != fp32_weights
    assert not list(tmp_path.glob(".teacher.*"))  # no half-written temp dirs left behind


def test_a_killed_writers_temp_dir_is_removed_a_live_ones_kept(tmp_path: Path, tiny_model_dir: Path) -> None:
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".teacher.pid-{int(dead.stdout)}.x1"  # what a save killed mid-write leaves
    live = tmp_path / f".teacher.pid-{os.getppid()}.x2"  # a writer still running (this test's parent)
    for d in (stale, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 10)
    build(tiny_model_dir, tmp_path / "teacher", 1)
    assert not stale.exists() and live.exists()
    assert (tmp_path / "teacher" / "model.safetensors").is_file()


def test_micro_batches_accumulate_to_the_same_step(tiny_model_dir: Path) -> None:
    """One episode per forward/backward gives the whole batch's loss and update (memory bound, same math)."""
    from opd_agents.rollout.expert import play_expert
    from opd_agents.models import load_model
    from opd_agents.rollout.renderer import ChatMLRenderer
    from opd_agents.teacher.sft import sft_train

    factory = lambda: make_env(ENV, difficulty=2).unwrapped  # noqa: E731
    results = []
    for micro in (None, 1):
        model, tok = load_model(tiny_model_dir)
        trajs = play_expert(factory, [0, 1, 2, 3], env_id=ENV, renderer=ChatMLRenderer(tok, factory().parser))
        trajs[1].turns[0].weight = 0.0  # weighted tokens count as in one batch
        losses = sft_train(model, trajs, int(tok.pad_token_id), steps=2, batch_size=4, lr=1e-2, seed=0,
                           micro_batch_size=micro)
        results.append((losses, {k: v.detach().clone() for k, v in model.named_parameters()}))
    (whole, w_whole), (parts, w_parts) = results
    assert parts == [pytest.approx(x, rel=1e-5) for x in whole]  # step 2's loss reads step 1's update
    # Adam turns fp-level gradient differences on near-zero entries into visible ones; a different update
    # would differ by ~2 lr (2e-2).
    assert max((w_whole[k] - w_parts[k]).abs().max().item() for k in w_whole) < 1e-3
