"""Change-point truncation (Prefix Teach, Suffix Fade, arXiv 2605.13643): teach the prefix, fade the suffix
after the turn where the teacher's per-turn margin shifts down.

Margin m_k = mean log pi_T over turn k's sampled tokens: how plausible the teacher finds what the student
wrote (the paper's margin is over the student's top-K; this one needs only sampled-token logprobs, so it
works with every teacher backend). Estimator, over the scored non-empty turns m_0..m_{n-1} (n >=
``min_turns``): the max two-segment mean-shift split, j* = argmax_j j(n-j)/n (mean(m_<j) - mean(m_>=j))^2
(the split that removes the most squared error; ties -> the earliest), accepted only as a DROP of at least
``min_drop`` nats (mean before - mean after). The first turn of the low segment is kept (its teacher
signal is the correction, as for loss truncation on the first error); the turns after it get
``suffix_weight`` (0 = truncate).
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

from opd_agents.training.policies.base import LossPolicy, PolicyParams, Signals, Weights, keep_through, register
from opd_agents.types import Trajectory


class ChangePointParams(PolicyParams):
    min_drop: float = Field(0.5, gt=0.0, description="smallest accepted drop of the mean margin (nats)")
    min_turns: int = Field(3, ge=2, description="scored turns needed to look for a change point")
    suffix_weight: float = Field(0.0, ge=0.0, le=1.0, description="weight of the turns after the change turn")


def change_point(margins: Sequence[float], min_drop: float) -> int | None:
    """Position j (first of the lower segment) of the max mean-shift split, if it drops by >= min_drop."""
    n = len(margins)
    best, best_j = -1.0, None
    for j in range(1, n):
        left, right = sum(margins[:j]) / j, sum(margins[j:]) / (n - j)
        score = j * (n - j) / n * (left - right) ** 2
        if score > best:
            best, best_j = score, j
    if best_j is None:
        return None
    drop = sum(margins[:best_j]) / best_j - sum(margins[best_j:]) / (n - best_j)
    return best_j if drop >= min_drop else None


@register
class ChangePoint(LossPolicy):
    name = "change_point"
    Params = ChangePointParams
    params: ChangePointParams

    def weights(self, traj: Trajectory, progress: float, signals: Signals | None = None) -> Weights:
        scored = [(i, sum(t.teacher_logprobs) / len(t.teacher_logprobs)) for i, t in enumerate(traj.turns)
                  if t.teacher_logprobs]
        if len(scored) < self.params.min_turns:
            return Weights.ones(traj)
        j = change_point([m for _, m in scored], self.params.min_drop)
        stop = None if j is None else scored[j][0]
        return Weights(keep_through(len(traj.turns), stop, self.params.suffix_weight))
