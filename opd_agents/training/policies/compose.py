"""Composing the configured policies: loss-time weights multiply (a 0 truncates), a rollout stops when any
rollout-time policy says so (the first in list order names the reason)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

from opd_agents.training.policies.base import NEEDS_ORDER, DivergencePolicy, Needs, Signals, Weights
from opd_agents.types import StopReason, Trajectory


class PolicySet:
    """The run's policies. ``apply`` (loss time) and ``should_stop`` (rollout time) also count, per
    policy, what it did; ``step_metrics`` reports and resets those counts once per step."""

    def __init__(self, policies: Sequence[DivergencePolicy], renormalize: bool = False) -> None:
        self.loss = [p for p in policies if p.acts_at == "loss"]
        self.rollout = [p for p in policies if p.acts_at == "rollout"]
        self.renormalize = renormalize
        self._weight_sum: Counter[str] = Counter()
        self._zeros: Counter[str] = Counter()
        self._tokens = 0
        self._stops: Counter[str] = Counter()

    @property
    def top_k(self) -> int:
        """Widest top-k list a loss-time policy reads (0: none needs top-k)."""
        return max((p.top_k for p in self.loss), default=0)

    def needs(self, acts_at: str) -> Needs:
        """The most a policy acting at ``acts_at`` needs from the teacher."""
        levels = [NEEDS_ORDER.index(p.needs) for p in (self.loss if acts_at == "loss" else self.rollout)]
        return NEEDS_ORDER[max(levels, default=0)]

    def unsupplied(self, backend: str) -> list[str]:
        """What this teacher backend cannot give the policies (the config refuses these)."""
        if backend == "hf":
            return []
        out = [f"divergence.{p.label} scores each turn as it is sampled (teacher.backend=hf)"
               for p in self.rollout if p.needs != "none"]
        out += [f"divergence.{p.label} needs full teacher logits (teacher.backend=hf)"
                for p in self.loss if p.needs == "logits"]
        return out

    # ---- loss time ---------------------------------------------------------------------------------
    def apply(self, traj: Trajectory, progress: float, signals: Signals | None = None) -> list[float] | None:
        """Set every ``turn.weight`` to the product of the policies' turn factors (overwriting earlier
        weights); return the product of their token factors, flat over the assistant tokens, or None when
        no policy sets token factors. With ``renormalize`` the turn weights are scaled by one factor so
        that the kept tokens' total weight equals their number (the policies then redistribute the loss
        without changing its scale). Records ``traj.metrics["loss_truncated_turns"]`` (turns at 0)."""
        lengths = [len(t.token_ids) for t in traj.turns]
        turn_w = [1.0] * len(lengths)
        token_w: list[list[float]] | None = None
        for policy in self.loss:
            w = policy.weights(traj, progress, signals)
            self._check(policy, w, lengths)
            self._record(policy.name, w, lengths)
            turn_w = [a * b for a, b in zip(turn_w, w.turn, strict=True)]
            if w.token is not None:
                token_w = w.token if token_w is None else [
                    [a * b for a, b in zip(x, y, strict=True)] for x, y in zip(token_w, w.token, strict=True)]
        self._tokens += sum(lengths)
        if self.renormalize:
            turn_w = _renormalized(turn_w, token_w, lengths)
        for turn, w in zip(traj.turns, turn_w, strict=True):
            turn.weight = w
        traj.metrics["loss_truncated_turns"] = float(turn_w.count(0.0))
        return None if token_w is None else [x for row in token_w for x in row]

    @staticmethod
    def _check(policy: DivergencePolicy, w: Weights, lengths: list[int]) -> None:
        if len(w.turn) != len(lengths) or (w.token is not None and [len(r) for r in w.token] != lengths):
            raise ValueError(f"divergence policy {policy.name} returned weights that do not match the turns")

    def _record(self, name: str, w: Weights, lengths: list[int]) -> None:
        for k, n in enumerate(lengths):
            factors = w.token[k] if w.token is not None else [1.0] * n
            self._weight_sum[name] += sum(w.turn[k] * f for f in factors)
            self._zeros[name] += sum(w.turn[k] * f == 0.0 for f in factors)

    # ---- rollout time ------------------------------------------------------------------------------
    def should_stop(self, traj: Trajectory) -> StopReason | None:
        """Fits ``rollout.TurnHook`` (called after each recorded turn)."""
        for policy in self.rollout:
            if (reason := policy.should_stop(traj)) is not None:
                self._stops[policy.name] += 1
                return reason
        return None

    # ---- telemetry ---------------------------------------------------------------------------------
    def step_metrics(self, n_trajs: int, reduce: Callable[[Sequence[float]], list[float]] = list,
                     ) -> dict[str, float]:
        """``div/policy/{name}/mean_weight`` and ``/zero_share`` (over this step's assistant tokens, the
        policy's own factor) for loss-time policies; ``/stop_share`` (episodes it ended) for rollout ones.
        ``reduce``: sums the counts over the ranks of a distributed job (``n_trajs``: the job's episodes)."""
        loss, rollout = [p.name for p in self.loss], [p.name for p in self.rollout]
        counts = reduce([self._tokens, *(self._weight_sum[n] for n in loss), *(self._zeros[n] for n in loss),
                         *(self._stops[n] for n in rollout)])
        tokens, weight_sums, zeros, stops = counts[0], counts[1:1 + len(loss)], counts[1 + len(loss):1 + 2 * len(loss)], \
            counts[1 + 2 * len(loss):]
        out: dict[str, float] = {}
        if tokens:
            for name, w, z in zip(loss, weight_sums, zeros, strict=True):
                out[f"div/policy/{name}/mean_weight"] = w / tokens
                out[f"div/policy/{name}/zero_share"] = z / tokens
        if n_trajs:
            out |= {f"div/policy/{name}/stop_share": n / n_trajs for name, n in zip(rollout, stops, strict=True)}
        self._weight_sum, self._zeros, self._stops, self._tokens = Counter(), Counter(), Counter(), 0
        return out


def _renormalized(turn_w: list[float], token_w: list[list[float]] | None, lengths: list[int]) -> list[float]:
    """Scale turn weights so that sum over kept tokens of (turn x token) weight = the kept token count."""
    if token_w is None:
        kept = sum(n for n, w in zip(lengths, turn_w, strict=True) if w > 0)
        weighted = sum(w * n for w, n in zip(turn_w, lengths, strict=True))
    else:
        kept = sum(w * f > 0 for w, row in zip(turn_w, token_w, strict=True) for f in row)
        weighted = sum(w * f for w, row in zip(turn_w, token_w, strict=True) for f in row)
    if weighted <= 0:
        return turn_w
    return [w * kept / weighted for w in turn_w]
