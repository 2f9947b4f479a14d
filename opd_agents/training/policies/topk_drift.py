"""Top-k overlap drift (Prune-OPD, arXiv 2605.07804): once the student's and the teacher's top-k token
sets stop overlapping for a span, the rest of the trajectory is down-weighted, then truncated.

Per scored assistant token t (in order across turns): overlap o_t = |top-k_S(t) & top-k_T(t)| / k, both
sets taken at the position that predicts token t. A token is *drifted* when o_t < ``min_overlap``. The
detector fires at the token that completes the first run of ``span`` consecutive drifted tokens (t_d);
from there the weights fall monotonically, w_t = decay^(t - t_d + 1), and are set to 0 (truncated) once
below ``floor``. Tokens without top-k lists (unscored turns) count as not drifted and break a run.
The teacher's top-k comes from its scoring pass (top-k scores, or the full-logits rows); the student's
from a no-grad pass of the current student over the batch (see ``Trainer``).
"""

from __future__ import annotations

from pydantic import Field

from opd_agents.training.policies.base import LossPolicy, Needs, PolicyParams, Signals, Weights, register
from opd_agents.types import Trajectory


class TopKDriftParams(PolicyParams):
    k: int = Field(8, ge=1, description="top-k width compared (a server teacher serves k <= its --max-logprobs)")
    min_overlap: float = Field(0.25, gt=0.0, le=1.0, description="a token drifts when overlap / k is below this")
    span: int = Field(4, ge=1, description="consecutive drifted tokens that fire the detector")
    decay: float = Field(0.9, gt=0.0, lt=1.0, description="per-token weight factor after the detector fired")
    floor: float = Field(0.1, ge=0.0, lt=1.0, description="weights below this are truncated to 0")


@register
class TopKDrift(LossPolicy):
    name = "topk_drift"
    Params = TopKDriftParams
    params: TopKDriftParams

    @property
    def needs(self) -> Needs:
        return "topk"

    @property
    def top_k(self) -> int:
        return self.params.k

    def weights(self, traj: Trajectory, progress: float, signals: Signals | None = None) -> Weights:
        lengths = [len(t.token_ids) for t in traj.turns]
        if signals is None or signals.teacher_topk_ids is None or signals.student_topk_ids is None:
            return Weights.ones(traj)
        overlaps = [o for turn in self.overlaps(signals, lengths) for o in turn]
        flat = self.token_weights(overlaps)
        token, start = [], 0
        for n in lengths:
            token.append(flat[start : start + n])
            start += n
        return Weights([1.0] * len(traj.turns), token)

    def overlaps(self, signals: Signals, lengths: list[int]) -> list[list[float | None]]:
        """o_t per turn and token (None where a side has no top-k list)."""
        k = self.params.k
        assert signals.teacher_topk_ids is not None and signals.student_topk_ids is not None
        out: list[list[float | None]] = []
        for i, n in enumerate(lengths):
            teacher, student = signals.teacher_topk_ids[i], signals.student_topk_ids[i]
            if len(teacher) != n or len(student) != n:
                out.append([None] * n)  # unscored turn (empty top-k lists)
                continue
            out.append([len(set(t[:k]) & set(s[:k])) / k if t and s else None
                        for t, s in zip(teacher, student, strict=True)])
        return out

    def token_weights(self, overlaps: list[float | None]) -> list[float]:
        p = self.params
        weights, run, fired_at = [], 0, None
        for t, o in enumerate(overlaps):
            if fired_at is None:
                run = run + 1 if o is not None and o < p.min_overlap else 0
                if run >= p.span:
                    fired_at = t
            if fired_at is None:
                weights.append(1.0)
            else:
                w = p.decay ** (t - fired_at + 1)
                weights.append(w if w >= p.floor else 0.0)
        return weights
