"""Per-turn divergence telemetry (read-only): d_k, per-turn metrics, step metrics, the cascade table.

Definitions (reference: opd-methods.md, "Step-wise divergence"):

- d_k, the divergence of turn k: mean over its sampled tokens of |log pi_S(y_t) - log pi_T(y_t)|, where
  log pi_S is the turn's ``sampling_logprobs`` (the student that sampled it). Unscored or empty turns: None.
- The *first failing turn* (``first_failing_turn``): when the env reports ``Turn.outcome`` on any turn, the
  first turn whose outcome is not ``ok`` (invalid or off_plan); otherwise the first turn whose tool call
  failed (parse errors included), ``Trajectory.first_error_turn``.
- An *invalid call* is a tool call that could not run as written: parse_error, tool_not_found or
  validation_failed. execution_failed and timeout are failures of valid calls and are not counted.

Nothing here changes a weight: the training policies that act on these numbers live in
``opd_agents.training.policies`` (one file per policy, composed from ``divergence.policies``).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from opd_agents.types import ErrorType, Trajectory, Turn, TurnOutcome

INVALID_CALL_ERRORS = frozenset({ErrorType.parse_error, ErrorType.tool_not_found, ErrorType.validation_failed})


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


def first_failing_turn(traj: Trajectory) -> int | None:
    """Index of the first failing turn: by ``Turn.outcome`` when the env reported any, else by tool errors."""
    if any(t.outcome is not None for t in traj.turns):
        return next((t.index for t in traj.turns if t.outcome not in (None, TurnOutcome.ok)), None)
    return traj.first_error_turn


def turn_divergence(turn: Turn) -> float | None:
    """d_k: the stored value, else computed from the logprobs (None if unscored or empty)."""
    if turn.divergence is not None:
        return turn.divergence
    diffs = _diffs(turn)
    return _mean([abs(x) for x in diffs]) if diffs else None


def repeated_calls(traj: Trajectory) -> list[bool | None]:
    """Per turn: do its tool calls (names and arguments, in order) repeat an earlier turn's exactly? None for a
    turn without calls. A student stuck in a loop repeats itself, and a teacher reading that context predicts the
    repetition as confidently as the student, so d_k falls on such turns: low late-episode divergence then
    means agreement on the loop, not recovery (docs/divergence.md, TextWorld)."""
    seen: set[str] = set()
    out: list[bool | None] = []
    for turn in traj.turns:
        if not turn.tool_calls:
            out.append(None)
            continue
        key = json.dumps([(c.name, c.arguments) for c in turn.tool_calls], sort_keys=True, default=str)
        out.append(key in seen)
        seen.add(key)
    return out


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
    ``traj.metrics["first_error_turn"]`` = index of the first failing turn (``first_failing_turn``), -1 if none.
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
    first = first_failing_turn(traj)
    traj.metrics["first_error_turn"] = float(-1 if first is None else first)


# ---- step metrics and the cascade table ------------------------------------------------------------
def _cascades(traj: Trajectory) -> bool | None:
    """Does divergence rise after the first tool error? Mean d over the scored turns after the first
    failing turn > d of the failing turn itself. None when undefined (no error, failing turn unscored,
    or no scored turn after it)."""
    first = first_failing_turn(traj)
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
    ``div/mean_weight``: mean ``turn.weight`` over all turns. ``div/repeat_share``: share of the turns with
    tool calls whose calls repeat an earlier turn's exactly (``repeated_calls``: a looping student), and
    ``div/d_repeated_call`` / ``div/d_new_call`` the mean d of those turns and of the others.
    """
    if not trajs:
        return {}
    by_turn: dict[int, list[float]] = {}
    groups: dict[str, list[float]] = {"before_error": [], "error_turn": [], "after_error": [], "no_error": []}
    cascades: list[bool] = []
    repeat_flags: list[bool] = []  # per turn with tool calls: do they repeat an earlier turn's?
    repeat_d: dict[bool, list[float]] = {True: [], False: []}
    for traj in trajs:
        first = first_failing_turn(traj)
        for turn, repeated in zip(traj.turns, repeated_calls(traj), strict=True):
            d = turn_divergence(turn)
            if repeated is not None:
                repeat_flags.append(repeated)
                if d is not None:
                    repeat_d[repeated].append(d)
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
    if repeat_flags:
        out["div/repeat_share"] = sum(repeat_flags) / len(repeat_flags)
    out |= {f"div/d_{'repeated' if r else 'new'}_call": sum(v) / len(v) for r, v in repeat_d.items() if v}
    n = len(trajs)
    out["div/error_share"] = sum(first_failing_turn(t) is not None for t in trajs) / n
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
        group = "with_error" if first_failing_turn(traj) is not None else "no_error"
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


def __getattr__(name: str) -> Any:
    # The config moved to opd_agents.training.policies; bench/rock_tokens.py still imports it from here.
    # Lazy, because the policies import this module.
    if name == "DivergencePolicyConfig":
        from opd_agents.training.policies.config import DivergencePolicyConfig

        return DivergencePolicyConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
