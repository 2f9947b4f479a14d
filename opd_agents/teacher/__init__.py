"""Teachers: score the student's sampled tokens with a frozen model, one forward pass per trajectory.

Backends: ``hf`` (in-process transformers; exact, gives full-vocabulary logits), ``server`` (a vLLM
OpenAI-compatible server via litellm; concurrent, retried) and ``vllm`` (an in-process vLLM engine).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from opd_agents.models import native_bf16, resolve_model
from opd_agents.rollout.renderer import Renderer
from opd_agents.teacher.base import (
    PrivilegedFn,
    Teacher,
    TeacherConfig,
    TeacherScores,
    TeacherSequence,
    TeacherView,
    apply_scores,
    check_same_tokenizer,
    parse_prompt_logprobs,
)
from opd_agents.teacher.hf import HFTeacher
from opd_agents.teacher.server import ServerTeacher, wait_for_server
from opd_agents.teacher.vllm_offline import VLLMTeacher

__all__ = [
    "HFTeacher", "PrivilegedFn", "ServerTeacher", "Teacher", "TeacherConfig", "TeacherScores", "TeacherSequence",
    "TeacherView", "VLLMTeacher", "apply_scores", "check_same_tokenizer", "make_teacher", "parse_prompt_logprobs",
    "wait_for_server",
]


def make_teacher(
    spec: TeacherConfig | Mapping[str, Any],
    *,
    student_tokenizer: PreTrainedTokenizerBase | None = None,
    renderer: Renderer | None = None,
    privileged: PrivilegedFn | None = None,
) -> Teacher:
    """Build a teacher from a config (unknown keys are refused). ``student_tokenizer``: checked against
    the teacher's tokenizer. A server is checked at once (``ServerTeacher.check``: it answers, serves the
    model and, given ``student_tokenizer``, tokenizes like the student; every server of a list), so a dead
    one fails here."""
    cfg = spec if isinstance(spec, TeacherConfig) else TeacherConfig.model_validate(dict(spec))
    if cfg.backend == "hf":
        dtype = cfg.dtype
        if dtype == "auto":  # frozen weights: bf16 loses no updates, only rounding
            dtype = "bfloat16" if native_bf16(torch.device(cfg.device)) else "float32"
        teacher = HFTeacher(cfg.model, device=cfg.device, dtype=getattr(torch, dtype), batch_size=cfg.batch_size,
                            renderer=renderer, privileged=privileged, teacher_id=cfg.teacher_id)
        if student_tokenizer is not None:
            check_same_tokenizer(student_tokenizer, teacher.tokenizer)
        return teacher
    if cfg.backend == "server":
        if not cfg.api_base:
            raise ValueError("teacher backend 'server' needs api_base (e.g. http://127.0.0.1:8000/v1)")
        server = ServerTeacher(cfg.model, cfg.api_base, api_key=cfg.api_key, concurrency=cfg.concurrency,
                               timeout_s=cfg.timeout_s, max_retries=cfg.max_retries, backoff_s=cfg.backoff_s,
                               score_timeout_s=cfg.score_timeout_s, check_timeout_s=cfg.check_timeout_s,
                               cooldown_s=cfg.cooldown_s, privileged=privileged, renderer=renderer,
                               teacher_id=cfg.teacher_id)
        server.check(student_tokenizer)
        return server
    path = resolve_model(cfg.model)
    if student_tokenizer is not None:  # before the engine starts (tens of seconds)
        check_same_tokenizer(student_tokenizer, AutoTokenizer.from_pretrained(path))
    return VLLMTeacher(path, dtype=cfg.dtype, max_model_len=cfg.max_model_len, renderer=renderer,
                       privileged=privileged, teacher_id=cfg.teacher_id or cfg.model)
