"""Summary numbers over a set of trajectories (CLI output, evaluation metrics)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from opd_agents.types import Trajectory


def summarize(trajs: Sequence[Trajectory], wall_s: float | None = None) -> dict[str, float | dict[str, int]]:
    n = max(len(trajs), 1)
    calls = sum(len(t.tool_calls) for tr in trajs for t in tr.turns)
    errors = Counter(e.value for tr in trajs for t in tr.turns for e in t.tool_error_types)
    out: dict[str, float | dict[str, int]] = {
        "episodes": len(trajs),
        "success_rate": sum(t.success for t in trajs) / n,
        "mean_reward": sum(t.reward for t in trajs) / n,
        "mean_turns": sum(len(t.turns) for t in trajs) / n,
        "tool_calls": calls,
        "tool_errors": sum(errors.values()),
        "tool_error_rate": sum(errors.values()) / max(calls + errors.get("parse_error", 0), 1),
        "tool_errors_by_type": dict(errors),
        "stop_reasons": dict(Counter(t.stop_reason.value if t.stop_reason else "none" for t in trajs)),
        "generated_tokens": sum(t.num_assistant_tokens for t in trajs),
    }
    if wall_s:
        out["wall_s"] = wall_s
        out["episodes_per_s"] = len(trajs) / wall_s
        out["tokens_per_s"] = float(out["generated_tokens"]) / wall_s  # type: ignore[arg-type]
    return out
