"""Python API over trajectory files: stream, filter, flatten to per-turn records, load into pandas.

Everything here streams (``opd_agents.store.iter_trajectories``): a file is read record by record, so a
multi-GB trajectory file can be filtered or flattened in constant memory. Only ``to_pandas`` materialises,
and only the (token-free by default) rows it is asked for. Corrupt lines are reported as ``file:line``
and skipped by the store; a file from a newer schema raises ``TrajectoryFileError``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from opd_agents.training.divergence import turn_divergence
from opd_agents.store import ReadIssue, iter_trajectories
from opd_agents.types import Trajectory, Turn

if TYPE_CHECKING:
    import pandas as pd

Level = Literal["trajectory", "turn"]
# Log-ratios beyond this many nats get the full colour (most tokens of a decent student sit well inside).
RATIO_SCALE = 2.0


# ---- per-turn numbers ------------------------------------------------------------------------------
def log_ratios(turn: Turn) -> list[float] | None:
    """Per token log pi_T - log pi_S (positive: the teacher likes the token more); None if unscored."""
    if turn.teacher_logprobs is None or len(turn.teacher_logprobs) != len(turn.sampling_logprobs):
        return None
    return [t - s for t, s in zip(turn.teacher_logprobs, turn.sampling_logprobs, strict=True)]


def max_divergence(traj: Trajectory) -> float | None:
    values = [d for d in (turn_divergence(t) for t in traj.turns) if d is not None]
    return max(values) if values else None


def ratio_rgb(ratio: float, scale: float = RATIO_SCALE) -> tuple[int, int, int]:
    """Background colour of a token: white at 0, green as the teacher agrees more, red as it finds the
    token unlikely; saturates at ``scale`` nats. Shared by the terminal replay and the HTML report."""
    x = max(-1.0, min(1.0, ratio / scale))
    fade = round(255 * (1 - abs(x)))
    return (fade, 255, fade) if x >= 0 else (255, fade, fade)


# ---- filtering -------------------------------------------------------------------------------------
@dataclass
class TrajectoryFilter:
    """Which trajectories to keep; every criterion left at None matches everything."""

    env: str | None = None
    min_reward: float | None = None
    max_reward: float | None = None
    stop_reasons: frozenset[str] | None = None
    has_tool_error: bool | None = None
    first_error_turn: int | None = None
    min_divergence: float | None = None  # keep if some turn's d_k >= this
    ids: frozenset[str] | None = None
    success: bool | None = None

    def __post_init__(self) -> None:
        # Accept any iterable (or a single string) from callers; matching wants sets of plain strings.
        if isinstance(self.stop_reasons, str):
            self.stop_reasons = frozenset({self.stop_reasons})
        elif self.stop_reasons is not None:
            self.stop_reasons = frozenset(getattr(r, "value", r) for r in self.stop_reasons)
        if isinstance(self.ids, str):
            self.ids = frozenset({self.ids})
        elif self.ids is not None:
            self.ids = frozenset(self.ids)

    def matches(self, traj: Trajectory) -> bool:
        if self.ids is not None and traj.id not in self.ids:
            return False
        if self.env is not None and traj.env_id != self.env:
            return False
        if self.success is not None and traj.success != self.success:
            return False
        if self.min_reward is not None and traj.reward < self.min_reward:
            return False
        if self.max_reward is not None and traj.reward > self.max_reward:
            return False
        if self.stop_reasons is not None:
            reason = traj.stop_reason.value if traj.stop_reason else "none"
            if reason not in self.stop_reasons:
                return False
        if self.has_tool_error is not None and (traj.tool_error_count > 0) != self.has_tool_error:
            return False
        if self.first_error_turn is not None and traj.first_error_turn != self.first_error_turn:
            return False
        if self.min_divergence is not None:
            d = max_divergence(traj)
            if d is None or d < self.min_divergence:
                return False
        return True


def iter_filtered(
    path: str | os.PathLike[str], flt: TrajectoryFilter | None = None, *,
    on_error: Callable[[ReadIssue], None] | None = None,
) -> Iterator[Trajectory]:
    """Stream the trajectories of ``path`` that match ``flt`` (all of them without one)."""
    for traj in iter_trajectories(path, on_error=on_error):
        if flt is None or flt.matches(traj):
            yield traj


# ---- flat records ----------------------------------------------------------------------------------
def trajectory_record(traj: Trajectory, tokens: bool = True) -> dict[str, Any]:
    """One flat row per trajectory; with ``tokens``, per-turn list columns (token ids, logprobs...)."""
    divs = [turn_divergence(t) for t in traj.turns]
    known = [d for d in divs if d is not None]
    row: dict[str, Any] = {
        "id": traj.id, "schema_version": traj.schema_version, "created_at": traj.created_at,
        "env_id": traj.env_id, "task_id": traj.task_id, "seed": traj.seed, "split": traj.split,
        "model_id": traj.model_id, "teacher_id": traj.teacher_id,
        "reward": traj.reward, "success": traj.success, "terminated": traj.terminated, "truncated": traj.truncated,
        "stop_reason": traj.stop_reason.value if traj.stop_reason else None,
        "num_turns": len(traj.turns), "num_assistant_tokens": traj.num_assistant_tokens,
        "num_tokens": traj.num_tokens, "num_tool_calls": sum(len(t.tool_calls) for t in traj.turns),
        "num_tool_errors": traj.tool_error_count, "first_error_turn": traj.first_error_turn,
        "error_types": [e.value for t in traj.turns for e in t.tool_error_types],
        "max_divergence": max(known) if known else None,
        "mean_divergence": sum(known) / len(known) if known else None,
    }
    if tokens:
        row.update({
            "messages": [m.model_dump() for m in traj.messages],
            "prompt_ids": list(traj.prompt_ids),
            "token_ids": [list(t.token_ids) for t in traj.turns],
            "sampling_logprobs": [list(t.sampling_logprobs) for t in traj.turns],
            "teacher_logprobs": [t.teacher_logprobs for t in traj.turns],
            "observation_ids": [list(t.observation_ids) for t in traj.turns],
            "turn_divergence": divs,
            "turn_weight": [t.weight for t in traj.turns],
        })
    return row


def iter_turns(trajs: Iterable[Trajectory], tokens: bool = True) -> Iterator[dict[str, Any]]:
    """One flat record per assistant turn, carrying its trajectory's id, env, reward and stop reason."""
    for traj in trajs:
        first_error = traj.first_error_turn
        for turn in traj.turns:
            errors = [e.value for e in turn.tool_error_types]
            row: dict[str, Any] = {
                "trajectory_id": traj.id, "env_id": traj.env_id, "task_id": traj.task_id, "seed": traj.seed,
                "split": traj.split, "reward": traj.reward, "success": traj.success,
                "stop_reason": traj.stop_reason.value if traj.stop_reason else None,
                "turn": turn.index, "finish": turn.finish, "text": turn.text, "num_tokens": len(turn.token_ids),
                "tool_calls": [c.name for c in turn.tool_calls], "error_types": errors,
                "has_tool_error": bool(errors), "first_error_turn": first_error,
                "after_error": first_error is not None and turn.index > first_error,
                "divergence": turn_divergence(turn), "weight": turn.weight, "teacher_id": turn.teacher_id,
            }
            if tokens:
                row.update({
                    "token_ids": list(turn.token_ids), "sampling_logprobs": list(turn.sampling_logprobs),
                    "teacher_logprobs": turn.teacher_logprobs, "observation_ids": list(turn.observation_ids),
                })
            yield row


def iter_records(trajs: Iterable[Trajectory], level: Level, tokens: bool = True) -> Iterator[dict[str, Any]]:
    if level == "trajectory":
        return (trajectory_record(t, tokens) for t in trajs)
    if level == "turn":
        return iter_turns(trajs, tokens)
    raise ValueError(f"level must be 'trajectory' or 'turn', got {level!r}")


def to_pandas(source: str | os.PathLike[str] | Iterable[Trajectory], level: Level = "trajectory",
              tokens: bool = False, flt: TrajectoryFilter | None = None) -> pd.DataFrame:
    """A DataFrame of trajectory or turn rows from a file path or trajectories. Token/logprob list
    columns only with ``tokens=True`` (they dominate memory)."""
    import pandas as pd

    trajs = iter_filtered(source, flt) if isinstance(source, (str, os.PathLike)) else \
        (t for t in source if flt is None or flt.matches(t))
    return pd.DataFrame.from_records(list(iter_records(trajs, level, tokens)))
