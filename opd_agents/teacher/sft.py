"""Supervised fine-tuning on given trajectories (scripted expert or teacher samples).

Used to build an SFT teacher from the scripted expert, and for off-policy KD batches.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opd_agents.env.core import ToolEnv
from opd_agents.rollout.expert import play_expert
from opd_agents.models import load_model
from opd_agents.env.parsers import ToolCallParser
from opd_agents.training.policy import StudentLogits, adamw, assistant_batch, cross_entropy
from opd_agents.rollout.renderer import ChatTemplateChoice, make_renderer
from opd_agents.training.view import TrainingView
from opd_agents.types import Trajectory


def sft_train(model: PreTrainedModel, trajs: Sequence[Trajectory], pad_token_id: int, steps: int,
              batch_size: int, lr: float, seed: int, log: Callable[[str], None] | None = None,
              micro_batch_size: int | None = None, compute_dtype: torch.dtype | None = None) -> list[float]:
    """Cross-entropy on the assistant tokens of ``trajs``, each turn scaled by its weight (0 = not trained
    on); returns the loss per step, logged every 5 steps when ``log`` is given. ``micro_batch_size``:
    episodes per forward/backward (gradients accumulate; the step's loss is the same weighted token mean),
    which bounds memory on long episodes. ``compute_dtype``: forwards under autocast in it (mixed precision;
    the weights and AdamW stay in their own dtype)."""
    rng = random.Random(seed)
    views = [TrainingView.from_trajectory(t) for t in trajs]
    opt = adamw([p for p in model.parameters() if p.requires_grad], lr)
    micro = micro_batch_size or batch_size
    trained = StudentLogits(model, compute_dtype)  # what assistant_batch wraps a bare model in, plus the dtype
    model.train()
    losses = []
    for _ in range(steps):
        batch = rng.sample(views, min(batch_size, len(views)))
        total = max(sum(w for v in batch for w, m in zip(v.token_weights, v.loss_mask, strict=True) if m), 1.0)
        step_loss = 0.0
        for start in range(0, len(batch), micro):
            part = cross_entropy(assistant_batch(trained, batch[start : start + micro], pad_token_id), weighted=True,
                                 denominator=total)
            part.backward()
            step_loss += part.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(step_loss)
        if log and (len(losses) % 5 == 0 or len(losses) == 1):
            log(f"  sft step {len(losses)}/{steps}: loss {losses[-1]:.3f}")
    model.eval()
    return losses


def build_sft_teacher(base_model: str, env_factory: Callable[[], ToolEnv], env_id: str, parser: ToolCallParser,
                      out_dir: Path, episodes: int, steps: int, batch_size: int, lr: float, seed: int,
                      log: Callable[[str], None] | None = None, env_kwargs: dict[str, Any] | None = None,
                      chat_template: ChatTemplateChoice = "chatml", device: str | torch.device = "cpu",
                      compute_dtype: torch.dtype | None = None) -> Path:
    """Fine-tune ``base_model`` on scripted-expert trajectories of the env's *training* seeds and save it.
    ``chat_template``: how the episodes are rendered (the run's ``student.chat_template``: the teacher learns
    the text it will score). ``device``: where it trains (fp32 weights everywhere); ``compute_dtype``: its
    forwards' autocast dtype (the run's mixed precision; part of the settings, since it changes the teacher).

    Reused when ``out_dir`` already holds a finished teacher built with the same settings (``env_kwargs``,
    e.g. the difficulty, are part of them: a teacher built for another task variant is rebuilt).
    """
    settings = {"base_model": base_model, "env_id": env_id, "env_kwargs": env_kwargs or {}, "episodes": episodes,
                "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed}
    if chat_template != "chatml":  # (absent for ChatML: teachers built before the option keep matching)
        settings["chat_template"] = chat_template
    if compute_dtype is not None:  # (absent for fp32, likewise)
        settings["compute_dtype"] = str(compute_dtype).removeprefix("torch.")
    marker = out_dir / "opd_sft_teacher.json"
    if marker.is_file() and json.loads(marker.read_text()).get("settings") == settings:
        return out_dir
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model, tok = load_model(base_model, device=device)
    rng = random.Random(seed)
    seeds = rng.sample(range(0, 900_000), episodes)
    renderer = make_renderer(tok, parser, chat_template)
    trajs = play_expert(env_factory, seeds, env_id=env_id, renderer=renderer)
    pad = tok.pad_token_id if tok.pad_token_id is not None else renderer.eot_id
    losses = sft_train(model, trajs, int(pad), steps, batch_size, lr, seed, compute_dtype=compute_dtype)
    _save_atomically(model, tok, out_dir, {"settings": settings, "losses": losses[-5:],
                                           "expert_success": sum(t.success for t in trajs) / len(trajs),
                                           "wall_s": time.perf_counter() - t0})
    if log:
        log(f"SFT teacher: {steps} steps on {episodes} expert episodes, final loss {losses[-1]:.3f} "
            f"({time.perf_counter() - t0:.0f}s) -> {out_dir}")
    return out_dir


def _save_atomically(model: PreTrainedModel, tok: PreTrainedTokenizerBase, out_dir: Path,
                     meta: dict[str, object]) -> None:
    """Written into ``.NAME.pid-PID.*`` beside ``out_dir``, then renamed; what a writer killed mid-save left
    (a dead PID's temp dir: a whole model's size) is removed first."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(f".{out_dir.name}.pid-*"):
        pid = stale.name.split(".pid-", 1)[1].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.pid-{os.getpid()}."))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "opd_sft_teacher.json").write_text(json.dumps(meta, indent=1))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
