"""SOD (arXiv 2605.07725): w_k = min((d_a + eps) / (d_k + eps), 1 + delta), a = the first scored turn
(w_a = 1; d_1 in the paper); unscored turns get 1. Detached (plain floats). To keep the loss's scale,
set ``divergence.renormalize`` (it rescales the composed weights, see ``PolicySet``)."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

from opd_agents.training.divergence import turn_divergence
from opd_agents.training.policies.base import LossPolicy, PolicyParams, Signals, Weights, register
from opd_agents.types import Trajectory


class SODParams(PolicyParams):
    delta: float = Field(0.2, ge=0.0, description="weights are capped at 1 + delta")
    eps: float = Field(1e-6, gt=0.0)


def sod_weights(divergences: Sequence[float | None], eps: float = 1e-6, delta: float = 0.2) -> list[float]:
    """SOD per-turn weights from the turns' d_k (None = unscored)."""
    anchor = next((d for d in divergences if d is not None), None)
    if anchor is None:
        return [1.0] * len(divergences)
    return [1.0 if d is None else min((anchor + eps) / (d + eps), 1.0 + delta) for d in divergences]


@register
class SOD(LossPolicy):
    name = "sod"
    Params = SODParams
    params: SODParams

    def weights(self, traj: Trajectory, progress: float, signals: Signals | None = None) -> Weights:
        divs = [turn_divergence(t) for t in traj.turns]
        return Weights(sod_weights(divs, self.params.eps, self.params.delta))
