"""Loss-time truncation: keep the failing turn (the teacher's signal on the mistake is the useful
correction), zero the turns after it. ``mode: first_error`` = the first turn whose tool call failed;
``mode: threshold`` = the first turn whose d_k > tau."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from opd_agents.training.divergence import turn_divergence
from opd_agents.training.policies.base import LossPolicy, Needs, PolicyParams, Signals, Weights, keep_through, register
from opd_agents.types import Trajectory


class LossTruncationParams(PolicyParams):
    mode: Literal["first_error", "threshold"] = "first_error"
    tau: float = Field(1.0, ge=0.0, description="d_k threshold (nats) for mode=threshold")


@register
class LossTruncation(LossPolicy):
    name = "loss_truncation"
    Params = LossTruncationParams
    params: LossTruncationParams

    @property
    def needs(self) -> Needs:
        return "logprobs" if self.params.mode == "threshold" else "none"

    def weights(self, traj: Trajectory, progress: float, signals: Signals | None = None) -> Weights:
        turns = traj.turns
        if self.params.mode == "first_error":
            stop = next((i for i, t in enumerate(turns) if t.tool_error_types), None)
        else:
            stop = next((i for i, t in enumerate(turns)
                         if (d := turn_divergence(t)) is not None and d > self.params.tau), None)
        return Weights(keep_through(len(turns), stop))
