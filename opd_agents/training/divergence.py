"""Per-turn divergence telemetry and the policies built on it: SOD reweighting, truncation, rock tokens.

Definitions (reference: opd-methods.md, "Step-wise divergence", "Truncation", "Rock tokens"):

- d_k, the divergence of turn k: mean over its sampled tokens of |log pi_S(y_t) - log pi_T(y_t)|, where
  log pi_S is the turn's ``sampling_logprobs`` (the student that sampled it). Unscored or empty turns: None.
- A turn *failed* when any of its tool results has an error (parse errors included); the first failing
  turn is ``Trajectory.first_error_turn``.
- An *invalid call* is a tool call that could not run as written: parse_error, tool_not_found or
  validation_failed. execution_failed and timeout are failures of valid calls and are not counted.

Policies (``DivergencePolicyConfig``; every option at its default is plain OPD, weight 1 everywhere):

- loss-time truncation sets per-turn weights 0/1: "first_error" keeps every turn up to and including the
  first failing turn (the teacher's signal on the mistake is the useful correction) and zeroes the turns
  after it; "threshold" does the same with the first turn whose d_k > tau.
- SOD: w_k = min((d_a + eps) / (d_k + eps), 1 + delta), a the first scored turn (w_a = 1); unscored
  turns get 1. Optionally renormalised so the kept turns' token-weighted sum stays the token count.
  ``turn.weight`` = loss-time weight x SOD weight (they compose by multiplication).
- rollout-time truncation: see ``rollout_stop_reason``.
- rock tokens: see ``opd_agents.training.rock_tokens``.

Policies read ``turn.divergence`` when set, else compute d_k from the turn's logprobs, so they work
whether or not ``annotate_turns`` ran first.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from opd_agents.types import ErrorType, StopReason, Trajectory, Turn

INVALID_CALL_ERRORS = frozenset({ErrorType.parse_error, ErrorType.tool_not_found, ErrorType.validation_failed})
RockMode = Literal["off", "track", "mask", "downweight"]


class DivergencePolicyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    loss_truncation: Literal["none", "first_error", "threshold"] = "none"
    tau: float = Field(1.0, ge=0.0, description="d_k threshold (nats) for the 'threshold' truncations")
    rollout_truncation: Literal["none", "invalid_calls", "threshold", "both"] = "none"
    max_invalid_calls: int = Field(2, ge=1, description="m: stop the episode at the m-th invalid call")
    sod: bool = False
    sod_eps: float = Field(1e-6, gt=0.0)
    sod_delta: float = Field(0.2, ge=0.0, description="SOD weights are capped at 1 + delta")
    sod_renormalize: bool = Field(False, description="rescale SOD weights so sum_k w_k n_k = sum_k n_k")
    rock_tokens: RockMode = Field("off", description="track: rock/* metrics on a fixed probe; mask/downweight "
                                                       "also scale rock token ids in the loss (opd_agents.training.rock_tokens)")
    rock_quantile: float = Field(0.9, gt=0.0, lt=1.0, description="a token is 'high' above this loss quantile")
    rock_min_steps: int = Field(3, ge=1, description="consecutive high steps that make a rock token")
    rock_weight: float = Field(0.1, ge=0.0, le=1.0, description="multiplier of rock tokens in 'downweight'")


# ---- per-turn numbers ------------------------------------------------------------------------------
def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _diffs(turn: Turn) -> list[float] | None:
    """Per token log pi_S - log pi_T; None if unscored. ValueError on misaligned lists."""
    if turn.teacher_logprobs is None:
        return None
    if len(turn.teacher_logprobs) != len(turn.sampling_logprobs):
        raise ValueError(f"turn {turn.index}: {len(turn.teacher_logprobs)} teacher_logprobs for "
                         f"{len(turn.sampling_logprobs)} sampling_logprobs")
    return [s - t for s, t in zip(turn.sampling_logprobs, turn.teacher_logprobs, strict=True)]


def turn_divergence(turn: Turn) -> float | None:
    """d_k: the stored value, else computed from the logprobs (None if unscored or empty)."""
    if turn.divergence is not None:
        return turn.divergence
    diffs = _diffs(turn)
    return _mean([abs(x) for x in diffs]) if diffs else None


def _topk_stats(positions: Sequence[Sequence[float]]) -> tuple[float, float] | None:
    """(mean top-k mass, mean top-k entropy) over positions that have top-k values."""
    masses, entropies = [], []
    for position in positions:
        lps = [lp for lp in position if lp > -math.inf]  # a -inf entry holds no mass (and would give nan)
        if not lps:
            continue
        top = max(lps)
        log_z = top + math.log(sum(math.exp(lp - top) for lp in lps))  # logsumexp: no underflow
        masses.append(math.exp(log_z))
        entropies.append(-sum(math.exp(lp - log_z) * (lp - log_z) for lp in lps))
    if not masses:
        return None
    return sum(masses) / len(masses), sum(entropies) / len(entropies)


def annotate_turns(traj: Trajectory, topk_logprobs: list[list[list[float]]] | None = None) -> None:
    """Write per-turn telemetry onto ``traj`` (in place).

    Scored turns: ``divergence`` = d_k (recomputed, None when empty) and ``metrics["reverse_kl"]`` =
    mean(log pi_S - log pi_T), the sampled-token reverse-KL estimate. With ``topk_logprobs`` (per turn,
    per position, k teacher logprobs best first, as ``TeacherScores.topk_logprobs``):
    ``metrics["teacher_topk_mass"]`` = mean over positions of sum(exp(top-k)) and
    ``metrics["teacher_entropy"]`` = mean entropy of the top-k renormalised, a top-k *estimate* of the
    teacher's entropy (it ignores the tail, so it under-reads when the mass is low). Every turn:
    ``metrics["tool_ok"]`` (1.0 if all its tool results are ok) and ``metrics["tool_errors"]``.
    ``traj.metrics["first_error_turn"]`` = index of the first failing turn, -1 if none.
    """
    if topk_logprobs is not None and len(topk_logprobs) != len(traj.turns):
        raise ValueError(f"topk_logprobs has {len(topk_logprobs)} turns, trajectory {len(traj.turns)}")
    for i, turn in enumerate(traj.turns):
        diffs = _diffs(turn)
        if diffs is not None:
            turn.divergence = _mean([abs(x) for x in diffs])
            if diffs:
                turn.metrics["reverse_kl"] = sum(diffs) / len(diffs)
        if topk_logprobs is not None:
            if len(topk_logprobs[i]) != len(turn.token_ids):
                raise ValueError(f"turn {turn.index}: top-k for {len(topk_logprobs[i])} positions, "
                                 f"{len(turn.token_ids)} tokens")
            stats = _topk_stats(topk_logprobs[i])
            if stats is not None:
                turn.metrics["teacher_topk_mass"], turn.metrics["teacher_entropy"] = stats
        errors = len(turn.tool_error_types)
        turn.metrics["tool_ok"] = 0.0 if errors else 1.0
        turn.metrics["tool_errors"] = float(errors)
    first = traj.first_error_turn
    traj.metrics["first_error_turn"] = float(-1 if first is None else first)


# ---- step metrics and the cascade table ------------------------------------------------------------
def _cascades(traj: Trajectory) -> bool | None:
    """Does divergence rise after the first tool error? Mean d over the scored turns after the first
    failing turn > d of the failing turn itself. None when undefined (no error, failing turn unscored,
    or no scored turn after it)."""
    first = traj.first_error_turn
    if first is None:
        return None
    at_error = next((turn_divergence(t) for t in traj.turns if t.index == first), None)
    after = _mean([d for t in traj.turns if t.index > first and (d := turn_divergence(t)) is not None])
    if at_error is None or after is None:
        return None
    return after > at_error


def step_divergence_metrics(trajs: Sequence[Trajectory]) -> dict[str, float]:
    """Divergence metrics of one step's trajectories, keyed for the metrics stream.

    Means over turns (each scored turn counts once): ``div/d_turn_{k}`` by turn index k;
    ``div/d_before_error`` / ``div/d_error_turn`` / ``div/d_after_error`` over trajectories with a tool
    error, turns strictly before / at / strictly after the first failing turn; ``div/d_no_error`` over
    trajectories without one. A mean with no turns is left out rather than reported as 0.
    ``div/cascade_rate``: share of trajectories whose divergence rises after the first tool error (mean d
    over the scored turns after the first failing turn > d of the failing turn), over the
    ``div/cascade_n`` trajectories where that is defined (an error, the failing turn scored, at least one
    scored turn after it); left out when ``div/cascade_n`` is 0. Shares over trajectories:
    ``div/error_share``, ``div/truncated_share``, ``div/stop_{reason}`` ("none" when unset).
    ``div/mean_weight``: mean ``turn.weight`` over all turns.
    """
    if not trajs:
        return {}
    by_turn: dict[int, list[float]] = {}
    groups: dict[str, list[float]] = {"before_error": [], "error_turn": [], "after_error": [], "no_error": []}
    cascades: list[bool] = []
    for traj in trajs:
        first = traj.first_error_turn
        for turn in traj.turns:
            d = turn_divergence(turn)
            if d is None:
                continue
            by_turn.setdefault(turn.index, []).append(d)
            if first is None:
                groups["no_error"].append(d)
            else:
                where = "before_error" if turn.index < first else "error_turn" if turn.index == first else "after_error"
                groups[where].append(d)
        if (c := _cascades(traj)) is not None:
            cascades.append(c)
    out = {f"div/d_turn_{k}": sum(v) / len(v) for k, v in sorted(by_turn.items())}
    out |= {f"div/d_{g}": sum(v) / len(v) for g, v in groups.items() if v}
    out["div/cascade_n"] = float(len(cascades))
    if cascades:
        out["div/cascade_rate"] = sum(cascades) / len(cascades)
    n = len(trajs)
    out["div/error_share"] = sum(t.first_error_turn is not None for t in trajs) / n
    out["div/truncated_share"] = sum(t.truncated for t in trajs) / n
    stops = Counter(t.stop_reason.value if t.stop_reason else "none" for t in trajs)
    out |= {f"div/stop_{r}": c / n for r, c in sorted(stops.items())}
    weights = [turn.weight for t in trajs for turn in t.turns]
    if weights:
        out["div/mean_weight"] = sum(weights) / len(weights)
    return out


def divergence_table(trajs: Iterable[Trajectory], max_turns: int = 8) -> dict[str, list[float | None]]:
    """Mean d_k by turn index k = 0..max_turns-1 for trajectories with a tool error vs without (the SOD
    cascade plot). Keys "with_error" / "no_error" (None in an empty cell) and "with_error_n" /
    "no_error_n" (scored turns per cell). Turns at index >= max_turns are left out."""
    sums = {g: [0.0] * max_turns for g in ("with_error", "no_error")}
    counts = {g: [0] * max_turns for g in sums}
    for traj in trajs:
        group = "with_error" if traj.first_error_turn is not None else "no_error"
        for turn in traj.turns:
            d = turn_divergence(turn)
            if d is not None and 0 <= turn.index < max_turns:
                sums[group][turn.index] += d
                counts[group][turn.index] += 1
    out: dict[str, list[float | None]] = {}
    for g in sums:
        out[g] = [s / c if c else None for s, c in zip(sums[g], counts[g], strict=True)]
        out[f"{g}_n"] = [float(c) for c in counts[g]]
    return out


# ---- loss-time policies ----------------------------------------------------------------------------
def _keep_through(turns: Sequence[Turn], stop_at: int | None) -> list[float]:
    """1.0 for turns up to and including list position ``stop_at``, 0.0 after (all 1.0 if None)."""
    return [1.0 if stop_at is None or i <= stop_at else 0.0 for i in range(len(turns))]


def loss_time_weights(traj: Trajectory, cfg: DivergencePolicyConfig) -> list[float]:
    """Per-turn 0/1 weights of loss-time truncation (see the module docstring)."""
    turns = traj.turns
    if cfg.loss_truncation == "first_error":
        return _keep_through(turns, next((i for i, t in enumerate(turns) if t.tool_error_types), None))
    if cfg.loss_truncation == "threshold":
        over = (i for i, t in enumerate(turns) if (d := turn_divergence(t)) is not None and d > cfg.tau)
        return _keep_through(turns, next(over, None))
    return [1.0] * len(turns)


def sod_weights(divergences: Sequence[float | None], eps: float = 1e-6, delta: float = 0.2) -> list[float]:
    """SOD per-turn weights: w_k = min((d_a + eps) / (d_k + eps), 1 + delta), anchored on the first
    scored turn a (so w_a = 1; d_1 in the paper). Unscored turns (None) get 1.0. Plain floats, so
    detached by construction."""
    anchor = next((d for d in divergences if d is not None), None)
    if anchor is None:
        return [1.0] * len(divergences)
    return [1.0 if d is None else min((anchor + eps) / (d + eps), 1.0 + delta) for d in divergences]


def apply_policies(traj: Trajectory, cfg: DivergencePolicyConfig) -> None:
    """Set every ``turn.weight`` = loss-time weight x SOD weight (overwriting earlier weights).

    With ``sod_renormalize`` the SOD weights are scaled by one factor so that, over the kept turns,
    sum_k w_k n_k = sum_k n_k (n_k = the turn's tokens): SOD then redistributes the loss between turns
    without changing its total scale (individual weights may then exceed 1 + delta).
    Records ``traj.metrics["loss_truncated_turns"]`` = number of turns left with weight 0.
    """
    keep = loss_time_weights(traj, cfg)
    sod = [1.0] * len(traj.turns)
    if cfg.sod:
        sod = sod_weights([turn_divergence(t) for t in traj.turns], cfg.sod_eps, cfg.sod_delta)
        if cfg.sod_renormalize:
            tokens = [len(t.token_ids) * k for t, k in zip(traj.turns, keep, strict=True)]
            weighted = sum(w * n for w, n in zip(sod, tokens, strict=True))
            if weighted > 0:
                sod = [w * sum(tokens) / weighted for w in sod]
    for turn, k, w in zip(traj.turns, keep, sod, strict=True):
        turn.weight = k * w
    traj.metrics["loss_truncated_turns"] = float(keep.count(0.0))


# ---- rollout-time policy ---------------------------------------------------------------------------
def rollout_stop_reason(traj: Trajectory, cfg: DivergencePolicyConfig) -> StopReason | None:
    """Whether to end the episode now; call after each turn is recorded (fits ``rollout.TurnHook``).

    "invalid_calls": once the episode's invalid calls (parse_error, tool_not_found, validation_failed,
    counted over all turns so far) reach m = ``max_invalid_calls``, stop: ``StopReason.parse_error`` if
    they are all parse errors, else ``StopReason.divergence``. "threshold": the latest turn's d_k > tau
    -> ``StopReason.divergence`` (the caller scores the turn first; an unscored turn never stops).
    "both": either check, invalid calls first. "none": never stops.
    """
    mode = cfg.rollout_truncation
    if mode in ("invalid_calls", "both"):
        invalid = [e for t in traj.turns for e in t.tool_error_types if e in INVALID_CALL_ERRORS]
        if len(invalid) >= cfg.max_invalid_calls:
            if all(e == ErrorType.parse_error for e in invalid):
                return StopReason.parse_error
            return StopReason.divergence
    if mode in ("threshold", "both") and traj.turns:
        d = turn_divergence(traj.turns[-1])
        if d is not None and d > cfg.tau:
            return StopReason.divergence
    return None
