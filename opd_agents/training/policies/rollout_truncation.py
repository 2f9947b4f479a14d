"""Rollout-time truncation: end the episode early (the rollout's ``turn_hook``).

``mode: invalid_calls``: once the episode's invalid calls (parse_error, tool_not_found, validation_failed,
counted over all turns so far; with ``count_invalid_outcomes`` also each turn the env marked
``TurnOutcome.invalid`` without such an error: a well-formed call the env refused, e.g. a TextWorld command
the game does not accept) reach m = ``max_invalid_calls``: ``StopReason.parse_error`` if they are all
parse errors, else ``StopReason.divergence``. ``mode: threshold``: the latest turn's d_k > tau ->
``StopReason.divergence`` (the online teacher scores each turn as it is sampled; an unscored turn never
stops). ``mode: both``: either check, invalid calls first.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from opd_agents.training.divergence import INVALID_CALL_ERRORS, turn_divergence
from opd_agents.training.policies.base import Needs, PolicyParams, RolloutPolicy, register
from opd_agents.types import ErrorType, StopReason, Trajectory, TurnOutcome


class RolloutTruncationParams(PolicyParams):
    mode: Literal["invalid_calls", "threshold", "both"] = "both"
    max_invalid_calls: int = Field(2, ge=1, description="m: stop the episode at the m-th invalid call")
    tau: float = Field(1.0, ge=0.0, description="d_k threshold (nats) for mode=threshold|both")
    count_invalid_outcomes: bool = Field(True, description=(
        "also count turns the env marked invalid (a call it refused) when they have no invalid-call error"))


@register
class RolloutTruncation(RolloutPolicy):
    name = "rollout_truncation"
    Params = RolloutTruncationParams
    params: RolloutTruncationParams

    @property
    def needs(self) -> Needs:
        return "none" if self.params.mode == "invalid_calls" else "logprobs"

    def should_stop(self, traj: Trajectory) -> StopReason | None:
        p = self.params
        if p.mode in ("invalid_calls", "both"):
            invalid = [e for t in traj.turns for e in t.tool_error_types if e in INVALID_CALL_ERRORS]
            refused = sum(  # turns the env refused; one with an invalid-call error is already counted above
                t.outcome == TurnOutcome.invalid and not INVALID_CALL_ERRORS.intersection(t.tool_error_types)
                for t in traj.turns) if p.count_invalid_outcomes else 0
            if len(invalid) + refused >= p.max_invalid_calls:
                return StopReason.parse_error if not refused and all(e == ErrorType.parse_error for e in invalid) \
                    else StopReason.divergence
        if p.mode in ("threshold", "both") and traj.turns:
            d = turn_divergence(traj.turns[-1])
            if d is not None and d > p.tau:
                return StopReason.divergence
        return None
