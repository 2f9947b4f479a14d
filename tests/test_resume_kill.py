"""--resume after a kill: the append-only logs are cut back to the checkpoint (no step logged twice) and
what killed writers left in checkpoints/ is removed. Unit tests of the cut, then real SIGKILLs of a
training subprocess at several moments."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from opd_agents.training.checkpoint import ResumeError, latest_checkpoint, rewind_run_dir, save_checkpoint, sync_logs
from opd_agents.config import parse_config
from opd_agents.errors import ConfigError
from opd_agents.training.trainer import RUN_LOGS, Trainer, step_seeds

ROOT = Path(__file__).resolve().parents[1]


class _Model(torch.nn.Linear):
    def save_pretrained(self, path: Path) -> None:
        path.mkdir(parents=True)
        torch.save(self.state_dict(), path / "weights.pt")


def _checkpoint(run: Path, step: int, keep: int | None = None) -> Path:
    model = _Model(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return save_checkpoint(run / "checkpoints", step, model, opt, sched, {}, log_bytes=sync_logs(run, RUN_LOGS),
                           keep=keep)


def _append(path: Path, text: str) -> None:
    with path.open("a") as f:
        f.write(text)


def test_resume_cuts_logs_back_to_the_checkpoint_and_removes_leftovers(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    _append(run / "metrics.jsonl", '{"step": 0}\n{"step": 1}\n{"step": 2}\n')
    _append(run / "trajectories.jsonl", '{"t": 1}\n{"t": 2}\n')
    at_ckpt = {n: (run / n).read_bytes() for n in ("metrics.jsonl", "trajectories.jsonl")}
    ckpt = _checkpoint(run, 2)
    assert json.loads((ckpt / "meta.json").read_text())["log_bytes"] == {
        "metrics.jsonl": len(at_ckpt["metrics.jsonl"]), "trajectories.jsonl": len(at_ckpt["trajectories.jsonl"]),
        "eval_trajectories.jsonl": 0}
    # What a run killed later leaves: step 3's records, a torn line, an eval log begun after the checkpoint,
    # a complete step-4 checkpoint `latest` never pointed to, a half-written one, a pointer temp file.
    _append(run / "metrics.jsonl", '{"step": 3}\n{"st')
    _append(run / "trajectories.jsonl", '{"t": 3}\n')
    _append(run / "eval_trajectories.jsonl", '{"e": 1}\n')
    newer = _checkpoint(run, 4)
    (run / "checkpoints" / "latest").write_text(ckpt.name)
    (run / "checkpoints" / ".step_000006.abc12").mkdir()
    (run / "checkpoints" / ".step_000006.abc12" / "model.safetensors").write_bytes(b"x" * 100)
    (run / "checkpoints" / ".latest.xyz").write_text("step_000006")

    assert latest_checkpoint(run / "checkpoints") == ckpt
    cut = rewind_run_dir(run, ckpt)
    assert cut == {"metrics.jsonl": len('{"step": 3}\n{"st'), "trajectories.jsonl": len('{"t": 3}\n'),
                   "eval_trajectories.jsonl": len('{"e": 1}\n')}
    assert {n: (run / n).read_bytes() for n in at_ckpt} == at_ckpt
    assert (run / "eval_trajectories.jsonl").read_bytes() == b""
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_000002"]
    assert not newer.exists()
    assert rewind_run_dir(run, ckpt) == dict.fromkeys(RUN_LOGS, 0)  # a second resume changes nothing


def test_keep_checkpoints_deletes_all_but_the_newest(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for step in (4, 8, 12, 16):
        newest = _checkpoint(run, step, keep=2)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_000012", "step_000016"]
    assert latest_checkpoint(run / "checkpoints") == newest
    with pytest.raises(ConfigError, match="keep_checkpoints"):
        parse_config({"train": {"keep_checkpoints": 0}})


def test_a_log_shorter_than_its_checkpoint_recorded_refuses_to_resume(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    _append(run / "metrics.jsonl", '{"step": 1}\n')
    _append(run / "trajectories.jsonl", '{"t": 1}\n{"t": 2}\n')
    ckpt = _checkpoint(run, 1)
    _append(run / "metrics.jsonl", '{"step": 2}\n')
    (run / "trajectories.jsonl").write_text('{"t": 1}\n')  # replaced: a record the checkpoint counts on is gone
    with pytest.raises(ResumeError, match=r"trajectories.jsonl has 9 bytes, 18 recorded"):
        rewind_run_dir(run, ckpt)
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'  # nothing was cut


def test_rewriting_a_checkpoint_leaves_no_temp_dirs(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    _checkpoint(run, 2)
    _checkpoint(run, 2)  # a step redone after a resume is checkpointed again over its old dir
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_000002"]


# ---- real kill -9 of a training subprocess -------------------------------------------------------------
STEPS = 6


def _config(run_dir: Path, model: Path) -> dict[str, Any]:
    return {
        "run_dir": str(run_dir),
        "env": {"id": "opd_agents/Arithmetic-v0", "kwargs": {"difficulty": 1},
                "limits": {"max_turns": 2, "max_tokens_per_turn": 8}},
        "student": {"model": str(model)},
        "teacher": {"model": str(model)},
        "train": {"steps": STEPS, "tasks_per_step": 2, "micro_batch_size": 2, "checkpoint_every": 2, "lr": 1e-3},
        "eval": {"every": 3, "episodes": 2},
        "teacher_strength": {"episodes": 0},
        "max_tokens_per_turn": 8,
    }


def _records(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a JSONL file (a killed writer's torn last line is left out)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_bytes().split(b"\n")[:-1]]


def _steps(run: Path) -> list[int]:
    return [r["step"] for r in _records(run / "metrics.jsonl")]


def _counts(run: Path) -> str:
    return " ".join(f"{n}={len(_records(run / n))}" for n in RUN_LOGS)


def _start(cfg: Path, log: Path, resume: bool) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "opd_agents.cli", "train", "-c", str(cfg), *(["--resume"] if resume else [])]
    with log.open("ab") as out:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _kill_when(proc: subprocess.Popen[bytes], ready: Callable[[], bool], log: Path, poll_s: float) -> None:
    deadline = time.monotonic() + 300
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the run ended (rc {proc.wait()}) before the kill point:\n{log.read_text()[-3000:]}")
        time.sleep(poll_s)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_kill_9_at_several_moments_then_resume_logs_each_step_once(tmp_path: Path, tiny_model_dir: Path) -> None:
    straight = Trainer(parse_config(_config(tmp_path / "straight", tiny_model_dir)))
    straight.train()

    run, log = tmp_path / "run", tmp_path / "train.log"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(_config(run, tiny_model_dir)))
    ckpts = run / "checkpoints"

    def writing(step: int) -> Callable[[], bool]:  # its temp dir (or, should the poll miss that, the result)
        name = f"step_{step:06d}"
        return lambda: ckpts.is_dir() and any(n.startswith(f".{name}.") or n == name for n in os.listdir(ckpts))

    # (moment, kill condition, poll interval, metrics steps the file must then hold: each once, in order)
    kills = [
        ("step 1 logged, before any checkpoint", lambda: 1 in _steps(run), 0.02, [0, 1]),
        ("writing the step-4 checkpoint", writing(4), 0.001, [0, 1, 2, 3, 4]),
        ("step 5 logged after the step-4 checkpoint", lambda: 5 in _steps(run), 0.02, [0, 1, 2, 3, 4, 5]),
    ]
    for i, (moment, ready, poll_s, steps) in enumerate(kills):
        _kill_when(_start(cfg, log, resume=i > 0), ready, log, poll_s)
        assert _steps(run)[: len(steps)] == steps  # the previous resume cut what this run then redid
        ckpt = latest_checkpoint(ckpts)
        left = sorted(n for n in os.listdir(ckpts) if n.startswith(".")) if ckpts.is_dir() else []
        kept = json.loads((ckpt / "meta.json").read_text())["log_bytes"] if ckpt else dict.fromkeys(RUN_LOGS, 0)
        lines = {n: (run / n).read_bytes()[:size].count(b"\n") for n, size in kept.items()}
        print(f"kill {i + 1} ({moment}): {_counts(run)}; resume point {ckpt and ckpt.name}, "
              f"which keeps {lines}; temp {left}")
        ckpt_step = int(ckpt.name.removeprefix("step_")) if ckpt else -1
        assert lines["metrics.jsonl"] == ckpt_step + 1 and lines["trajectories.jsonl"] == 2 * max(ckpt_step, 0)
    proc = _start(cfg, log, resume=True)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    print(f"finished after resume: {_counts(run)}")

    assert _steps(run) == list(range(STEPS + 1))  # step 0: the eval before training
    for got, want in zip(_records(run / "metrics.jsonl"), _records(tmp_path / "straight" / "metrics.jsonl"),
                         strict=True):
        assert got.keys() == want.keys()
        if "loss" in got:
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    trajs = _records(run / "trajectories.jsonl")
    assert [t["seed"] for t in trajs] == [s for k in range(1, STEPS + 1) for s in step_seeds(0, k, 2)]
    assert len({t["id"] for t in trajs}) == len(trajs)
    for name in ("trajectories.jsonl", "eval_trajectories.jsonl"):  # the same episodes, token for token
        tokens = [[turn["token_ids"] for turn in t["turns"]] for t in _records(run / name)]
        assert tokens == [[turn["token_ids"] for turn in t["turns"]]
                          for t in _records(tmp_path / "straight" / name)], name
    assert sorted(os.listdir(ckpts)) == ["latest", "step_000002", "step_000004", "step_000006"]
    weights = load_file(ckpts / "step_000006" / "model" / "model.safetensors")
    want = load_file(tmp_path / "straight" / "checkpoints" / "step_000006" / "model" / "model.safetensors")
    assert weights.keys() == want.keys()
    assert max((weights[k] - want[k]).abs().max().item() for k in want) < 1e-6
