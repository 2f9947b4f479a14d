"""Atomic checkpoints: a step's model, optimizer, scheduler and RNG state appear whole or not at all.

Each checkpoint is written into a temporary sibling directory and renamed into place; ``latest`` is a
file replaced atomically after the rename, so a process killed at any moment leaves the previous
complete checkpoint as the resume point.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

LATEST = "latest"


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
                    scheduler: Any, extra: dict[str, Any], tokenizer: Any = None) -> Path:
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=f".step_{step:06d}."))
    try:
        model.save_pretrained(tmp / "model")  # LoRA: the adapter only; full fine-tune: the whole model
        if tokenizer is not None:  # so `--model RUN/checkpoints/step_N/model` loads like any model dir
            tokenizer.save_pretrained(tmp / "model")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rng_state(), "step": step, **extra}, tmp / "trainer_state.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_text_atomic(ckpt_root / LATEST, final.name)
    return final


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint (``latest`` pointer, else the highest complete step dir)."""
    pointer = ckpt_root / LATEST
    if pointer.is_file():
        path = ckpt_root / pointer.read_text().strip()
        if (path / "meta.json").is_file():
            return path
    complete = sorted(p for p in ckpt_root.glob("step_*") if (p / "meta.json").is_file())
    return complete[-1] if complete else None


def load_trainer_state(path: Path) -> dict[str, Any]:
    return torch.load(path / "trainer_state.pt", weights_only=False)
