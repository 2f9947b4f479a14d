"""The top-k signals the trainer gathers for policies that compare the teacher's and the student's top-k
token sets (``needs == "topk"``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel

from opd_agents.teacher import TeacherScores
from opd_agents.training.policies.base import Signals
from opd_agents.training.policy import assistant_batch
from opd_agents.training.view import TrainingView
from opd_agents.types import Trajectory


def split_turns(traj: Trajectory, flat: Sequence[Any]) -> list[list[Any]]:
    """Cut a per-assistant-token list into per-turn lists."""
    out, start = [], 0
    for turn in traj.turns:
        out.append(list(flat[start : start + len(turn.token_ids)]))
        start += len(turn.token_ids)
    return out


def topk_signals(k: int, trajs: Sequence[Trajectory], scores: Sequence[TeacherScores],
                 online_topk: dict[str, list[list[list[int]]]], teacher_rows: dict[str, torch.Tensor],
                 student: PreTrainedModel, pad_id: int, micro_batch_size: int) -> dict[str, Signals]:
    """Per trajectory id: the teacher's top-k ids from its scores, from the online teacher (rollout-time
    scoring) or, on the full-logits path, from its logits rows (free); the student's from one no-grad pass
    of the current student (the one that sampled the batch: the update comes after), micro-batch by
    micro-batch."""
    teacher = {t.id: s.topk_ids for t, s in zip(trajs, scores, strict=False) if s.topk_ids is not None}
    teacher |= online_topk
    for t in trajs:
        if t.id in teacher_rows:
            teacher[t.id] = split_turns(t, teacher_rows[t.id].topk(k, dim=-1).indices.tolist())
    students: dict[str, list[list[Any]]] = {}
    with torch.no_grad():
        for start in range(0, len(trajs), micro_batch_size):
            micro = [t for t in trajs[start : start + micro_batch_size] if t.num_assistant_tokens]
            if not micro:
                continue
            batch = assistant_batch(student, [TrainingView.from_trajectory(t) for t in micro], pad_id)
            ids = batch.logits.topk(k, dim=-1).indices.tolist()
            for row, t in enumerate(micro):
                students[t.id] = split_turns(t, ids[row][: t.num_assistant_tokens])
    return {t.id: Signals(teacher.get(t.id), students.get(t.id)) for t in trajs}
