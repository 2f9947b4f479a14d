"""Atomic checkpoints: a step's model, optimizer, scheduler and RNG state appear whole or not at all.

Each checkpoint is written into a temporary sibling directory and renamed into place; ``latest`` is a
file replaced atomically after the rename, so a process killed at any moment leaves the previous
complete checkpoint as the resume point.

The run's append-only logs (metrics, trajectories) run ahead of the last checkpoint, so each checkpoint
records their byte sizes at its step; ``rewind_run_dir`` cuts them back to those sizes on resume, so the
steps replayed after it are not logged twice, and removes what killed writers left behind.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from opd_agents.errors import OpdError
from opd_agents.training.distributed import Dist

LATEST = "latest"
META = "meta.json"
OPTIMIZER = "optimizer"  # torch.distributed.checkpoint dir: one shard file per rank


class ResumeError(OpdError):
    """The run dir does not match its checkpoint (e.g. a log is shorter than the checkpoint recorded)."""


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(ckpt_root: Path, step: int, model: Any, optimizer: torch.optim.Optimizer,
                    scheduler: Any, extra: dict[str, Any], tokenizer: Any = None,
                    log_bytes: dict[str, int] | None = None, trained: torch.nn.Module | None = None,
                    dist: Dist = Dist(), keep: int | None = None) -> Path:
    """``model``: the whole model (saved as a model dir); ``trained``: the module the optimizer steps (maybe
    DDP / FSDP-wrapped; default ``model``), whose optimizer state every rank writes its shard of
    (torch.distributed.checkpoint: loadable on any number of ranks). ``log_bytes``: the run logs' sizes at
    this step (``sync_logs``), which ``rewind_run_dir`` cuts back to. ``keep``: then delete all but the newest
    ``keep`` step dirs (None: keep all). Called by every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    final = ckpt_root / f"step_{step:06d}"
    tmp: Path | None = None
    if dist.is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=f".step_{step:06d}."))
    tmp = dist.broadcast(tmp)
    assert tmp is not None
    try:
        dcp.save({"optimizer": get_optimizer_state_dict(trained or model, optimizer)}, checkpoint_id=tmp / OPTIMIZER,
                 no_dist=not dist.enabled)
        if dist.is_main:
            model.save_pretrained(tmp / "model")  # LoRA: the adapter only; full fine-tune: the whole model
            if tokenizer is not None:  # so `--model RUN/checkpoints/step_N/model` loads like any model dir
                tokenizer.save_pretrained(tmp / "model")
            torch.save({"scheduler": scheduler.state_dict(), "rng": rng_state(), "step": step, **extra},
                       tmp / "trainer_state.pt")
            (tmp / META).write_text(json.dumps({"step": step, "log_bytes": log_bytes or {}}))
            if final.exists():  # moved aside first: a kill mid-delete must not leave a half-deleted step dir
                os.replace(final, Path(tempfile.mkdtemp(dir=ckpt_root, prefix=f".step_{step:06d}.old-")) / "x")
            os.replace(tmp, final)
    except BaseException:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dist.is_main:
        _remove_temp(ckpt_root, f".step_{step:06d}.old-*")
        _write_text_atomic(ckpt_root / LATEST, final.name)
        if keep is not None:  # only after `latest` names the new one: a kill here leaves a resumable root
            for old in sorted(ckpt_root.glob("step_*"), key=_step_of)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()  # no rank goes on (or resumes) before the checkpoint is whole
    return final


def load_optimizer(ckpt: Path, trained: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   dist: Dist = Dist()) -> None:
    """Every rank loads its part of the optimizer state, whatever the world size it was saved with."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(trained, optimizer)}  # the layout to read into
    dcp.load(state, checkpoint_id=ckpt / OPTIMIZER, no_dist=not dist.enabled)
    set_optimizer_state_dict(trained, optimizer, state["optimizer"])


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint (``latest`` pointer, else the highest complete step dir)."""
    pointer = ckpt_root / LATEST
    if pointer.is_file():
        path = ckpt_root / pointer.read_text().strip()
        if (path / META).is_file():
            return path
    complete = sorted(p for p in ckpt_root.glob("step_*") if (p / META).is_file())
    return complete[-1] if complete else None


def load_trainer_state(path: Path) -> dict[str, Any]:
    return torch.load(path / "trainer_state.pt", weights_only=False)


def sync_logs(run_dir: Path, names: Iterable[str]) -> dict[str, int]:
    """fsync each log and return its size in bytes (0 when absent). Call after the step's last record and
    before the checkpoint: the sizes then end exactly after that step's records, on disk."""
    sizes = {}
    for name in names:
        path = run_dir / name
        if not path.is_file():
            sizes[name] = 0
            continue
        with open(path, "ab") as f:  # fsync via any descriptor flushes the file; append mode changes nothing
            os.fsync(f.fileno())
            sizes[name] = os.fstat(f.fileno()).st_size
    return sizes


def rewind_run_dir(run_dir: Path, ckpt: Path) -> dict[str, int]:
    """Make ``run_dir`` what it was when ``ckpt`` was written: each log cut to its recorded size (the
    records of later steps and any torn last line go), checkpoints after ``ckpt`` (their steps are redone)
    and temp files of killed writers removed. Returns the bytes cut per log. A log shorter than recorded
    raises ResumeError before anything is changed: records the checkpoint counts on are gone. (A checkpoint
    written before log sizes were recorded cuts nothing.)"""
    recorded: dict[str, int] = json.loads((ckpt / META).read_text()).get("log_bytes", {})
    sizes = {name: (run_dir / name).stat().st_size if (run_dir / name).is_file() else 0 for name in recorded}
    short = [f"{n} has {sizes[n]} bytes, {recorded[n]} recorded" for n in recorded if sizes[n] < recorded[n]]
    if short:
        raise ResumeError(f"cannot resume {run_dir} from {ckpt.name}: {'; '.join(short)} (a log was truncated or "
                          f"replaced after the checkpoint); start the run over without --resume")
    for name, size in recorded.items():
        if sizes[name] > size:
            os.truncate(run_dir / name, size)
    ckpt_root = ckpt.parent
    for path in ckpt_root.glob("step_*"):
        if _step_of(path) > _step_of(ckpt) or not (path / META).is_file():
            shutil.rmtree(path)
    _remove_temp(ckpt_root, ".step_*")
    _remove_temp(ckpt_root, f".{LATEST}.*")
    return {name: sizes[name] - size for name, size in recorded.items()}


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


def _remove_temp(folder: Path, pattern: str) -> None:
    """Temp dirs and files of a writer that is gone (killed, or done with them)."""
    for path in folder.glob(pattern):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
