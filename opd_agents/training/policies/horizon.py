"""Horizon curriculum (TCOD 2604.24005 / TOPD 2605.31490): the trained horizon grows with training.

With progress p = step / total steps and K turns in the trajectory, the first
n(p) = min(K, start_turns + floor(p * (K - start_turns + 1))) turns keep weight 1 and later turns get 0:
each horizon from start_turns to K gets an equal share of training, and from the last share on (at the
latest the final step, p = 1) every turn is trained.
"""

from __future__ import annotations

import math

from pydantic import Field

from opd_agents.training.policies.base import LossPolicy, Needs, PolicyParams, Signals, Weights, register
from opd_agents.types import Trajectory


class HorizonParams(PolicyParams):
    start_turns: int = Field(1, ge=1, description="turns trained at the start of training")


@register
class Horizon(LossPolicy):
    name = "horizon"
    Params = HorizonParams
    params: HorizonParams

    @property
    def needs(self) -> Needs:
        return "none"

    def horizon(self, n_turns: int, progress: float) -> int:
        start = self.params.start_turns
        if n_turns <= start:
            return n_turns
        return min(n_turns, start + math.floor(progress * (n_turns - start + 1)))

    def weights(self, traj: Trajectory, progress: float, signals: Signals | None = None) -> Weights:
        n = self.horizon(len(traj.turns), progress)
        return Weights([1.0 if i < n else 0.0 for i in range(len(traj.turns))])
