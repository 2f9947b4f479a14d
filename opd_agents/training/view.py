"""The training view of a trajectory: flat, token-aligned arrays derived on demand (never stored twice).

Alignment convention (used by every consumer: loss, divergence, teacher scoring):
    position ``i`` holds token ``input_ids[i]`` and, where known, its log-probability
    ``log p(input_ids[i] | input_ids[:i])``.
A causal LM's logits at position ``i - 1`` predict token ``i``, so a forward pass's log-probs must be
shifted right by one to line up with these arrays (see ``token_logprobs``). Position 0 has no
prediction and is never trained on (it is always a prompt token).

Layout: ``prompt_ids`` then, for each turn, the student's sampled ``token_ids`` (loss_mask 1) followed by
its ``observation_ids`` (template glue, tool results, next assistant header; loss_mask 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from opd_agents.types import Trajectory


@dataclass
class TrainingView:
    trajectory_id: str
    input_ids: list[int]
    loss_mask: list[int]  # 1 on tokens the student sampled, 0 on prompt and observation tokens
    sampling_logprobs: list[float]  # student's logprobs at sampling time; 0.0 where loss_mask is 0
    teacher_logprobs: list[float]  # 0.0 where loss_mask is 0 or the turn is not scored yet
    turn_index: list[int]  # turn.index on the turn's sampled tokens, -1 elsewhere
    token_weights: list[float]  # turn.weight on the turn's sampled tokens, 0.0 elsewhere
    has_teacher: bool  # every turn carries teacher_logprobs (vacuously true with no turns)

    def __len__(self) -> int:
        return len(self.input_ids)

    @classmethod
    def from_trajectory(cls, traj: Trajectory) -> TrainingView:
        """Flatten ``traj``; ValueError if a turn's logprob lists do not match its token ids."""
        n_prompt = len(traj.prompt_ids)
        view = cls(
            trajectory_id=traj.id, input_ids=list(traj.prompt_ids), loss_mask=[0] * n_prompt,
            sampling_logprobs=[0.0] * n_prompt, teacher_logprobs=[0.0] * n_prompt, turn_index=[-1] * n_prompt,
            token_weights=[0.0] * n_prompt, has_teacher=all(t.teacher_logprobs is not None for t in traj.turns),
        )
        for turn in traj.turns:
            n = len(turn.token_ids)
            if len(turn.sampling_logprobs) != n:
                raise ValueError(f"trajectory {traj.id} turn {turn.index}: {len(turn.sampling_logprobs)} "
                                 f"sampling_logprobs for {n} token_ids")
            if turn.teacher_logprobs is not None and len(turn.teacher_logprobs) != n:
                raise ValueError(f"trajectory {traj.id} turn {turn.index}: {len(turn.teacher_logprobs)} "
                                 f"teacher_logprobs for {n} token_ids (scored against different tokens?)")
            m = len(turn.observation_ids)
            view.input_ids += [*turn.token_ids, *turn.observation_ids]
            view.loss_mask += [1] * n + [0] * m
            view.sampling_logprobs += [*turn.sampling_logprobs, *[0.0] * m]
            teacher = turn.teacher_logprobs if turn.teacher_logprobs is not None else [0.0] * n
            view.teacher_logprobs += [*teacher, *[0.0] * m]
            view.turn_index += [turn.index] * n + [-1] * m
            view.token_weights += [turn.weight] * n + [0.0] * m
        return view


def collate(views: Sequence[TrainingView], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad views into a batch. Padding: input_ids=pad_token_id, attention_mask/loss_mask/
    logprobs/weights=0, turn_index=-1. Masks used as multipliers are float32; ids and indices int64."""
    if not views:
        raise ValueError("collate() needs at least one TrainingView")
    width = max(len(v) for v in views)
    batch = {
        "input_ids": torch.full((len(views), width), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(views), width), dtype=torch.long),
        "loss_mask": torch.zeros((len(views), width), dtype=torch.float32),
        "sampling_logprobs": torch.zeros((len(views), width), dtype=torch.float32),
        "teacher_logprobs": torch.zeros((len(views), width), dtype=torch.float32),
        "turn_index": torch.full((len(views), width), -1, dtype=torch.long),
        "token_weights": torch.zeros((len(views), width), dtype=torch.float32),
    }
    for row, v in enumerate(views):
        n = len(v)
        batch["input_ids"][row, :n] = torch.tensor(v.input_ids, dtype=torch.long)
        batch["attention_mask"][row, :n] = 1
        batch["loss_mask"][row, :n] = torch.tensor(v.loss_mask, dtype=torch.float32)
        batch["sampling_logprobs"][row, :n] = torch.tensor(v.sampling_logprobs, dtype=torch.float32)
        batch["teacher_logprobs"][row, :n] = torch.tensor(v.teacher_logprobs, dtype=torch.float32)
        batch["turn_index"][row, :n] = torch.tensor(v.turn_index, dtype=torch.long)
        batch["token_weights"][row, :n] = torch.tensor(v.token_weights, dtype=torch.float32)
    batch["has_teacher"] = torch.tensor([v.has_teacher for v in views], dtype=torch.bool)
    return batch


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-token log p(input_ids[:, i] | input_ids[:, :i]) from causal-LM ``logits`` [B, T, V], in the
    view's convention: [B, T], position 0 (no prediction) set to 0. Computed in fp32."""
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logprobs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return torch.cat([torch.zeros_like(picked[:, :1]), picked], dim=1)
