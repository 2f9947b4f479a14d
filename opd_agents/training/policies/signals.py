"""The top-k signals the trainer gathers for policies that compare the teacher's and the student's top-k
token sets (``needs == "topk"``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel

from opd_agents.training.policies.base import Signals
from opd_agents.training.policy import assistant_batch
from opd_agents.training.signal import TeacherSignal, split_turns
from opd_agents.training.view import TrainingView
from opd_agents.types import Trajectory


def topk_signals(k: int, trajs: Sequence[Trajectory], teacher: TeacherSignal, student: PreTrainedModel,
                 pad_id: int, micro_batch_size: int) -> dict[str, Signals]:
    """Per trajectory id: the teacher's top-k ids from the step's teacher signal (``policy_topk_ids``); the
    student's from one no-grad pass of the current student (the one that sampled the batch: the update
    comes after), micro-batch by micro-batch."""
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
    return {t.id: Signals(teacher.policy_topk_ids(t, k), students.get(t.id)) for t in trajs}
