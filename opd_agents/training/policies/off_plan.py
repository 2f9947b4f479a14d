"""Off-plan truncation: keep the first turn that left the plan, zero the turns after it.

The failing turn is ``first_failing_turn``: the first turn whose ``Turn.outcome`` (set by envs that can
tell, from step info["turn_outcome"]) is ``invalid`` or ``off_plan``; when the env reports no outcome on
any turn, the first turn whose tool call failed (then it acts like ``loss_truncation`` on first_error).
"""

from __future__ import annotations

from opd_agents.training.divergence import first_failing_turn
from opd_agents.training.policies.base import LossPolicy, Needs, PolicyParams, Signals, Weights, keep_through, register
from opd_agents.types import Trajectory


class OffPlanParams(PolicyParams):
    pass


@register
class OffPlan(LossPolicy):
    name = "off_plan"
    Params = OffPlanParams

    @property
    def needs(self) -> Needs:
        return "none"

    def weights(self, traj: Trajectory, progress: float, signals: Signals | None = None) -> Weights:
        first = first_failing_turn(traj)
        stop = next((i for i, t in enumerate(traj.turns) if t.index == first), None)
        return Weights(keep_through(len(traj.turns), stop))
