"""Multi-process training on real torch.distributed processes (torchrun, gloo, 2 ranks on CPU).

2 ranks x 4 tasks must train exactly as 1 rank x 8 tasks (DDP and FSDP2), a 2-rank checkpoint resumes on
1 and on 2 ranks, and a rank killed with SIGKILL ends the whole job, non-zero, in bounded time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from opd_agents.errors import ConfigError
from opd_agents.training.distributed import Dist, check_launch

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5  # max |w_1rank - w_2ranks| after 2 steps, fp32


# ---- unit: sharding and launch checks ------------------------------------------------------------------
def test_ranks_split_a_step_into_contiguous_equal_slices() -> None:
    slices = [Dist(rank=r, world_size=4).shard(8) for r in range(4)]
    assert [list(s) for s in slices] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert list(Dist().shard(8)) == list(range(8))
    assert Dist().sum([1.0, 2.5]) == [1.0, 2.5] and Dist().gather([1, 2]) == [1, 2]


def test_a_launch_that_cannot_split_evenly_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    counts = {"train.tasks_per_step": 8, "eval.episodes": 8}
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="train.parallel is 'none'"):
        check_launch("none", counts)
    with pytest.raises(ConfigError, match="train.tasks_per_step = 7 does not split over 2 ranks"):
        check_launch("ddp", counts | {"train.tasks_per_step": 7})
    with pytest.raises(ConfigError, match="eval.episodes = 3"):
        check_launch("fsdp", counts | {"eval.episodes": 3})
    with pytest.raises(ConfigError, match="fsdp does not support yet: rock tokens"):
        check_launch("fsdp", counts, ["rock tokens"])
    check_launch("ddp", counts, ["rock tokens"])
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_launch("none", {"train.tasks_per_step": 7})  # one process: nothing to split


# ---- real 2-process jobs ------------------------------------------------------------------------------
def _config(run_dir: Path, student: Path, teacher: Path, steps: int = 2, **train: Any) -> dict[str, Any]:
    return {
        "run_dir": str(run_dir), "seed": 3,
        "env": {"id": "opd_agents/Arithmetic-v0", "kwargs": {"difficulty": 1},
                "limits": {"max_turns": 2, "max_tokens_per_turn": 8}},
        "student": {"model": str(student)},
        "teacher": {"model": str(teacher)},
        "loss": {"kind": "forward_kl"},  # full teacher logits: the heaviest path through the loss
        "train": {"steps": steps, "tasks_per_step": 8, "micro_batch_size": 2, "checkpoint_every": 1,
                  "lr": 1e-4, "lr_schedule": "constant", **train},
        "eval": {"every": steps, "episodes": 4, "before": False},
        "teacher_strength": {"episodes": 0},
        "max_tokens_per_turn": 8,
    }


def _command(cfg: Path, ranks: int, resume: bool = False) -> list[str]:
    train = ["-m", "opd_agents.cli", "train", "-c", str(cfg), *(["--resume"] if resume else [])]
    if ranks == 1:
        return [sys.executable, *train]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *train]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _train(tmp: Path, name: str, ranks: int, cfg: dict[str, Any], resume: bool = False) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(_command(path, ranks, resume), cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return Path(cfg["run_dir"])


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step_{step:06d}" / "model" / "model.safetensors")


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _episodes(run: Path, name: str = "trajectories.jsonl") -> list[tuple[int, list[list[int]]]]:
    return [(t["seed"], [turn["token_ids"] for turn in t["turns"]]) for t in _records(run / name)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_teacher_dir: Path) -> Path:
    """One process, 8 tasks per step, 2 steps."""
    tmp = tmp_path_factory.mktemp("dist")
    return _train(tmp, "one", 1, _config(tmp / "one", tiny_model_dir, tiny_teacher_dir))


@pytest.mark.slow
@pytest.mark.parametrize(("parallel", "recompute"), [("ddp", False), ("fsdp", False), ("fsdp", True)])
def test_two_ranks_train_exactly_as_one(parallel: str, recompute: bool, reference: Path, tmp_path: Path,
                                        tiny_model_dir: Path, tiny_teacher_dir: Path) -> None:
    """(``recompute``: the sharded ranks also recompute their layers in the backward, the reference does not.)"""
    run = _train(tmp_path, "two", 2, _config(tmp_path / "two", tiny_model_dir, tiny_teacher_dir,
                                             parallel=parallel, gradient_checkpointing=recompute))
    diff = _max_diff(_weights(run, 2), _weights(reference, 2))
    moved = _max_diff(_weights(reference, 2), load_file(tiny_model_dir / "model.safetensors"))
    print(f"{parallel}: max |w_2ranks - w_1rank| after 2 steps = {diff:.2e} (the steps moved weights by {moved:.2e})")
    assert diff <= TOLERANCE < moved
    # Rank 0 alone wrote the logs: the same episodes, in the same order, token for token.
    assert _episodes(run) == _episodes(reference)
    assert _episodes(run, "eval_trajectories.jsonl") == _episodes(reference, "eval_trajectories.jsonl")
    got, want = _records(run / "metrics.jsonl"), _records(reference / "metrics.jsonl")
    assert [r["step"] for r in got] == [1, 2]
    for g, w in zip(got, want, strict=True):
        for key in ("loss", "student_tokens", "rollout/success_rate", "teacher_tokens", "eval/success_rate"):
            if key in w:
                assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_a_two_rank_fsdp_checkpoint_resumes_on_any_number_of_ranks(ranks: int, reference: Path, tmp_path: Path,
                                                                   tiny_model_dir: Path, tiny_teacher_dir: Path) -> None:
    """Stop the 2-rank run after step 1 (its latest checkpoint), then redo step 2 on ``ranks`` processes."""
    cfg = _config(tmp_path / "run", tiny_model_dir, tiny_teacher_dir, parallel="fsdp")
    run = _train(tmp_path, "first", 2, cfg)
    (run / "checkpoints" / "latest").write_text("step_000001")  # as if killed before the step-2 checkpoint
    cfg["train"]["parallel"] = "fsdp" if ranks == 2 else "none"
    _train(tmp_path, "resumed", ranks, cfg, resume=True)
    diff = _max_diff(_weights(run, 2), _weights(reference, 2))
    print(f"resumed on {ranks} rank(s): max |w - w_reference| = {diff:.2e}")
    assert diff <= TOLERANCE
    assert [r["step"] for r in _records(run / "metrics.jsonl")] == [1, 2]  # step 2 logged once


def _worker_pids(launcher: int) -> dict[int, int]:
    """RANK -> pid of the workers torchrun started."""
    out = {}
    for child in subprocess.run(["pgrep", "-P", str(launcher)], capture_output=True, text=True).stdout.split():
        env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        rank = next((int(v.split(b"=")[1]) for v in env if v.startswith(b"RANK=")), None)
        if rank is not None:
            out[rank] = int(child)
    return out


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_in_bounded_time_and_resume_continues(tmp_path: Path, tiny_model_dir: Path,
                                                                        tiny_teacher_dir: Path) -> None:
    cfg = _config(tmp_path / "run", tiny_model_dir, tiny_teacher_dir, steps=4, parallel="ddp")
    cfg["train"]["checkpoint_every"] = 2
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    metrics = tmp_path / "run" / "metrics.jsonl"
    proc = subprocess.Popen(_command(path, 2), cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):  # step 2 (a checkpoint) done
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0].decode()[-3000:]
        time.sleep(0.05)
    os.kill(_worker_pids(proc.pid)[1], signal.SIGKILL)
    killed = time.monotonic()
    output = proc.communicate(timeout=120)[0].decode()
    took = time.monotonic() - killed
    print(f"rank 1 SIGKILLed: the job exited with {proc.returncode} after {took:.1f} s")
    assert proc.returncode != 0 and took < 60
    assert "Signal 9 (SIGKILL)" in output and "rank" in output

    _train(tmp_path, "run", 2, cfg, resume=True)
    assert [r["step"] for r in _records(metrics)] == [1, 2, 3, 4]  # each step logged once
