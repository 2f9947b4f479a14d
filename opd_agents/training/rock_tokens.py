"""Rock tokens (arXiv 2605.09253): tokens whose OPD loss stays high while the rest converges.

They take a large share of the gradient and barely matter for accuracy. Token identity only means
something on fixed text, so tracking runs on a FIXED probe set: the first on-policy batch a run scores,
kept for the whole run. Every step the current student re-reads the probe (no grad) and each assistant
token's loss |log pi_S - log pi_T| goes to a ``RockTokenTracker``. The training batch changes every step,
so "mask"/"downweight" act on token *ids*: an id whose probe occurrences are mostly rock tokens is
multiplied by 0 / ``rock_weight`` wherever it appears in the training loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch
from transformers import PreTrainedModel

from opd_agents.training.policies import DivergencePolicyConfig, RockMode
from opd_agents.training.policy import assistant_batch
from opd_agents.training.view import TrainingView
from opd_agents.types import Trajectory


class RockTokenTracker:
    """Tokens whose per-token OPD loss stays in the top loss quantile across training steps.

    Token identity only means something on fixed text, so the tracker runs on a FIXED probe set (e.g.
    stored trajectories re-scored at each checkpoint): ``key`` names one probe trajectory and position i
    is its i-th assistant token. Each step, ``update(key, losses)`` once per probe, then ``end_step()``:
    the step's threshold is the ``quantile`` of all losses updated in that step (torch.quantile, linear
    interpolation); a token is *high* when its loss is strictly above it (so a flat loss has no high
    tokens). A rock token has been high for at least ``min_steps`` consecutive committed steps.
    """

    def __init__(self, quantile: float = 0.9, min_steps: int = 3) -> None:
        if not 0.0 < quantile < 1.0 or min_steps < 1:
            raise ValueError(f"need 0 < quantile < 1 and min_steps >= 1, got {quantile}, {min_steps}")
        self.quantile = quantile
        self.min_steps = min_steps
        self._pending: dict[str, list[float]] = {}
        self._streak: dict[str, list[int]] = {}  # consecutive high steps per token
        self._last: dict[str, list[float]] = {}  # losses of the last committed step

    @classmethod
    def from_config(cls, cfg: DivergencePolicyConfig) -> RockTokenTracker:
        return cls(cfg.rock_quantile, cfg.rock_min_steps)

    def update(self, key: str, per_token_losses: Sequence[float]) -> None:
        """Record one probe trajectory's per-token losses for the current step."""
        known = self._streak.get(key)
        if known is not None and len(known) != len(per_token_losses):
            raise ValueError(f"probe {key!r}: {len(per_token_losses)} losses, tracked {len(known)} tokens "
                             f"(the probe set must be fixed)")
        self._pending[key] = [float(x) for x in per_token_losses]

    def end_step(self) -> None:
        """Commit this step's updates: compute the threshold and advance every token's streak."""
        flat = [x for losses in self._pending.values() for x in losses]
        if not flat:
            return
        threshold = float(torch.quantile(torch.tensor(flat, dtype=torch.float64), self.quantile))
        for key, losses in self._pending.items():
            old = self._streak.get(key, [0] * len(losses))
            self._streak[key] = [s + 1 if x > threshold else 0 for s, x in zip(old, losses, strict=True)]
            self._last[key] = losses
        self._pending = {}

    def state_dict(self) -> dict[str, Any]:
        return {"streak": self._streak, "last": self._last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._streak, self._last, self._pending = state["streak"], state["last"], {}

    def rock_mask(self, key: str) -> list[bool]:
        """Per token of probe ``key``: is it a rock token? KeyError if the probe was never committed."""
        return [s >= self.min_steps for s in self._streak[key]]

    def share(self) -> float:
        """Fraction of tracked tokens that are rock tokens (0.0 when nothing is tracked)."""
        masks = [m for key in self._streak for m in self.rock_mask(key)]
        return sum(masks) / len(masks) if masks else 0.0

    def loss_share(self) -> float:
        """Share of the last committed step's total loss carried by rock tokens (their gradient share)."""
        total = rock = 0.0
        for key, losses in self._last.items():
            total += sum(losses)
            rock += sum(x for x, m in zip(losses, self.rock_mask(key), strict=True) if m)
        return rock / total if total > 0 else 0.0


class RockTokenMonitor:
    """The trainer's side: owns the probe set and the tracker, reports ``rock/*`` metrics, weights tokens."""

    def __init__(self, cfg: DivergencePolicyConfig, pad_token_id: int, micro_batch_size: int = 4) -> None:
        self.cfg = cfg
        self.tracker = RockTokenTracker.from_config(cfg)
        self.pad_token_id = pad_token_id
        self.micro_batch_size = micro_batch_size
        self.probe: list[TrainingView] = []
        self._probe_ids: dict[str, list[int]] = {}
        self._rock_ids: torch.Tensor = torch.empty(0, dtype=torch.long)

    def observe(self, student: PreTrainedModel, trajs: Sequence[Trajectory]) -> dict[str, float]:
        """One tracking step: the first call with trajectories fixes the probe (its teacher-scored ones with
        assistant tokens; the trainer passes on-policy batches only), then the current student re-reads the
        probe, the step is committed and the rock ids refreshed. Returns the ``rock/*`` metrics."""
        if not self.probe:
            self.probe = [TrainingView.from_trajectory(t) for t in trajs
                          if t.num_assistant_tokens and all(turn.teacher_logprobs is not None for turn in t.turns)]
        if not self.probe:
            return {}
        total = n = 0.0
        with torch.no_grad():
            for start in range(0, len(self.probe), self.micro_batch_size):
                views = self.probe[start : start + self.micro_batch_size]
                batch = assistant_batch(student, views, self.pad_token_id)
                losses = (batch.logprobs - batch.teacher_logprobs).abs() * batch.mask
                total += float(losses.sum())
                n += float(batch.mask.sum())
                for row, view in enumerate(views):
                    count = int(batch.mask[row].sum())
                    self.tracker.update(view.trajectory_id, losses[row, :count].tolist())
                    self._probe_ids[view.trajectory_id] = batch.targets[row, :count].tolist()
        self.tracker.end_step()
        self._rock_ids = torch.tensor(self.rock_token_ids(), dtype=torch.long)
        return {"rock/share": self.tracker.share(), "rock/loss_share": self.tracker.loss_share(),
                "rock/probe_loss": total / max(n, 1.0), "rock/ids": float(len(self._rock_ids))}

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue tracking exactly (saved in trainer_state.pt)."""
        return {"probe": [asdict(v) for v in self.probe], "probe_ids": self._probe_ids,
                "tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.probe = [TrainingView(**v) for v in state["probe"]]
        self._probe_ids = state["probe_ids"]
        self.tracker.load_state_dict(state["tracker"])
        self._rock_ids = torch.tensor(self.rock_token_ids(), dtype=torch.long)

    def probe_tokens(self) -> list[tuple[int, bool]]:
        """(token id, is a rock token) for every assistant token of the probe."""
        return [(token_id, is_rock) for key, ids in self._probe_ids.items()
                for token_id, is_rock in zip(ids, self.tracker.rock_mask(key), strict=True)]

    def rock_token_ids(self) -> list[int]:
        """Token ids of which at least half the probe occurrences are rock tokens."""
        seen: dict[int, list[int]] = {}
        for token_id, is_rock in self.probe_tokens():
            counts = seen.setdefault(token_id, [0, 0])
            counts[0] += is_rock
            counts[1] += 1
        return sorted(i for i, (rock, total) in seen.items() if 2 * rock >= total and rock > 0)

    def token_weights(self, targets: torch.Tensor) -> torch.Tensor:
        """Multipliers for a training batch's target ids [B, N]: 1, or 0 / rock_weight on rock ids."""
        mode: RockMode = self.cfg.rock_tokens
        ones = torch.ones(targets.shape, dtype=torch.float32, device=targets.device)
        if mode not in ("mask", "downweight") or not len(self._rock_ids):
            return ones
        low = 0.0 if mode == "mask" else self.cfg.rock_weight
        is_rock = torch.isin(targets, self._rock_ids.to(targets.device))
        return torch.where(is_rock, torch.full_like(ones, low), ones)
