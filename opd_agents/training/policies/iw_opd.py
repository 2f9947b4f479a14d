"""IW-OPD (arXiv 2606.22600): weight each token by how little discrepancy came before it.

w_t = 1 + gamma * (1 - sum_{s<t} |D_s| / sum_s |D_s|),  D = log pi_T - log pi_S (sampled tokens).

s < t runs over TOKENS, not turns: the trajectory's scored assistant tokens in order, across turn
boundaries (observation tokens carry no D and are skipped). The paper and TRL's implementation are per
token on single-turn text; keeping token order across turns lets a long turn's own drift count, which a
per-turn sum would flatten. Early tokens (before the discrepancy accumulates) weigh up to 1 + gamma, the
last ones about 1. Unscored turns keep weight 1 and add nothing to the sums; a trajectory with no
discrepancy at all gets 1 + gamma everywhere (nothing accumulated before any token).
"""

from __future__ import annotations

from pydantic import Field

from opd_agents.training.policies.base import LossPolicy, PolicyParams, Signals, Weights, register
from opd_agents.types import Trajectory


class IWOPDParams(PolicyParams):
    gamma: float = Field(0.5, ge=0.0, description="extra weight of tokens before any discrepancy")


def iw_opd_weights(deltas: list[list[float] | None], gamma: float) -> list[list[float] | None]:
    """Per turn, per token weights from D_t (None = unscored turn, left None)."""
    total = sum(abs(d) for turn in deltas if turn is not None for d in turn)
    out: list[list[float] | None] = []
    before = 0.0
    for turn in deltas:
        if turn is None:
            out.append(None)
            continue
        row = []
        for d in turn:
            row.append(1.0 + gamma * (1.0 - before / total) if total > 0 else 1.0 + gamma)
            before += abs(d)
        out.append(row)
    return out


@register
class IWOPD(LossPolicy):
    name = "iw_opd"
    Params = IWOPDParams
    params: IWOPDParams

    def weights(self, traj: Trajectory, progress: float, signals: Signals | None = None) -> Weights:
        deltas = [None if t.teacher_logprobs is None else
                  [lt - ls for lt, ls in zip(t.teacher_logprobs, t.sampling_logprobs, strict=True)]
                  for t in traj.turns]
        rows = iw_opd_weights(deltas, self.params.gamma)
        token = [row if row is not None else [1.0] * len(t.token_ids) for row, t in zip(rows, traj.turns, strict=True)]
        return Weights([1.0] * len(traj.turns), token)
