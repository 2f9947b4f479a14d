"""Builds the run's parts from a RunConfig: device, student (+LoRA), teacher (+SFT teacher), privileged view."""

from __future__ import annotations

import threading

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from safetensors.torch import load_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opd_agents.config import RunConfig
from opd_agents.env.core import ToolEnv
from opd_agents.models import load_model, native_bf16
from opd_agents.rollout.renderer import Renderer
from opd_agents.teacher.sft import build_sft_teacher
from opd_agents.training.distributed import Dist
from opd_agents.teacher import PrivilegedFn, Teacher, make_teacher
from opd_agents.types import Trajectory


def pick_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype, torch.dtype | None]:
    """The device, the trained weights' dtype and the dtype forwards compute in under autocast (None: the
    weights' own). auto: CUDA when present; where the device multiplies bf16 natively (GPUs, AMX CPUs) fp32
    weights with bf16 compute (mixed precision: AdamW's small updates would round away in bf16 weights),
    elsewhere plain fp32 (bf16 would be emulated: slower, not faster)."""
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    if dtype == "auto":
        dtype = "bf16-mixed" if native_bf16(dev) else "float32"
    if dtype == "bf16-mixed":
        return dev, torch.float32, torch.bfloat16
    return dev, getattr(torch, dtype), None


def load_student(cfg: RunConfig, device: torch.device, dtype: torch.dtype,
                 ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model, tok = load_model(cfg.student.model, dtype=dtype, device=str(device))
    if cfg.student.lora is not None:
        from peft import LoraConfig, get_peft_model

        lc = cfg.student.lora
        model = get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                                 target_modules=lc.target_modules, task_type="CAUSAL_LM"))
    return model, tok


def load_weights(model: PreTrainedModel, model_dir: Path) -> None:
    """Load weights saved by ``save_pretrained`` (a full model, or a LoRA adapter) into ``model``."""
    adapter = model_dir / "adapter_model.safetensors"
    if adapter.is_file():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(adapter))
        return
    state: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"checkpoint {model_dir} does not match the model: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")


def privileged_reference(env_factory: Callable[[], ToolEnv]) -> PrivilegedFn:
    """The privileged context: the task's reference solution, regenerated from the trajectory's seed. Safe
    to call from several threads (the rollout starts episodes concurrently): its one env is used by one at
    a time."""
    env = env_factory()
    lock = threading.Lock()

    def reference(traj: Trajectory) -> str:
        with lock:
            task = env.generate_task(np.random.default_rng(traj.seed), traj.seed, traj.split)
        return f"Reference solution (only you can see it; the answer must be worked out with the tools):\n{task.reference}"

    return reference


def build_teacher(cfg: RunConfig, env_factory: Callable[[], ToolEnv], student_tok: PreTrainedTokenizerBase,
                  renderer: Renderer, privileged: PrivilegedFn | None, device: torch.device,
                  console: Console, dist: Dist = Dist(), compute_dtype: torch.dtype | None = None) -> Teacher:
    """The run's teacher; an SFT teacher is trained first (``compute_dtype``: the run's mixed precision)."""
    tcfg = cfg.teacher.backend_config()
    if cfg.teacher.sft_from_expert is not None:
        sft = cfg.teacher.sft_from_expert
        if not dist.is_main:  # rank 0 builds it (within train.dist_timeout_s); the others then reuse it
            dist.barrier()
        path = build_sft_teacher(cfg.teacher.model, env_factory, cfg.env.id, renderer.parser,
                                 Path(cfg.run_dir) / "sft_teacher", sft.episodes, sft.steps, sft.batch_size,
                                 sft.lr, cfg.seed, log=console.print, env_kwargs=cfg.env.kwargs,
                                 chat_template=cfg.student.chat_template, device=device,
                                 compute_dtype=compute_dtype)
        if dist.is_main:
            dist.barrier()
        tcfg = tcfg.model_copy(update={"model": str(path)})
    if tcfg.backend == "hf" and tcfg.device == "cpu" and device.type != "cpu":
        tcfg = tcfg.model_copy(update={"device": str(device)})
    return make_teacher(tcfg, student_tokenizer=student_tok, renderer=renderer, privileged=privileged)


def scores_while_rolling_out(cfg: RunConfig, device: torch.device) -> bool:
    """``teacher.overlap`` resolved. ``auto`` leaves it off for an in-process teacher on the CPU (``hf`` on the
    CPU, where ``build_teacher`` keeps it when the run is on the CPU too): a scoring thread gains nothing on
    cores the sampler already fills, and its OpenMP team slows every forward of the process
    (bench/engine_threads.py; +8 % student tokens/s on the single-turn workload with it off)."""
    if cfg.teacher.overlap != "auto":
        return cfg.teacher.overlap
    return not (cfg.teacher.backend == "hf" and cfg.teacher.device == "cpu" and device.type == "cpu")
