"""Terminal replay of stored trajectories: turn by turn, with teacher-vs-student colouring of the tokens.

Streams the file (never loads it). Every piece of model or tool text goes through ``rich.text.Text``
(never markup), so a model that writes ``[red]`` cannot restyle the output.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from rich.console import Console, Group
from rich.panel import Panel
from rich.text import Text

from opd_agents.analysis.trajectories import RATIO_SCALE, log_ratios, ratio_rgb, turn_divergence
from opd_agents.env.tool import shorten
from opd_agents.types import Trajectory, Turn

TOOL_RESULT_CHARS = 300


class TokenDecoder:
    """Decodes token ids one by one; the tokenizer is loaded on first use, and when it cannot be loaded
    (no built-in package, bad dir) decoding is off and the caller falls back to the turn text."""

    def __init__(self, tokenizer: str | os.PathLike[str] | None,
                 on_unavailable: Callable[[str], None] | None = None) -> None:
        self.source = tokenizer
        self.on_unavailable = on_unavailable
        self._tok: object | None = None
        self._failed = False

    def _load(self) -> object | None:
        if self._tok is None and not self._failed:
            try:
                from transformers import AutoTokenizer

                from opd_agents.models import tokenizer_dir

                self._tok = AutoTokenizer.from_pretrained(self.source if self.source else tokenizer_dir())
            except Exception as e:  # noqa: BLE001 - any failure only turns the token view off
                self._failed = True
                if self.on_unavailable:
                    self.on_unavailable(f"token view off (tokenizer {self.source or 'smollm2 built-in'} "
                                        f"unavailable: {type(e).__name__}: {shorten(str(e), 160)}); showing text")
        return self._tok

    @property
    def available(self) -> bool:
        return self._load() is not None

    def __call__(self, ids: list[int]) -> list[str] | None:
        tok = self._load()
        if tok is None:
            return None
        return [tok.decode([i]) for i in ids]  # type: ignore[attr-defined]


def legend(scale: float = RATIO_SCALE) -> Text:
    text = Text("token colour = log π_T − log π_S:  ")
    for value in (-scale, -scale / 2, 0.0, scale / 2, scale):
        r, g, b = ratio_rgb(value, scale)
        text.append(f" {value:+.1f} ", style=f"black on rgb({r},{g},{b})")
    text.append("  (red: the teacher finds the token unlikely; green: the teacher prefers it more)")
    return text


def token_text(turn: Turn, decode: TokenDecoder) -> Text | None:
    """The turn's tokens on their log-ratio colour, or None (unscored turn / no tokenizer)."""
    ratios = log_ratios(turn)
    if ratios is None:
        return None
    pieces = decode(turn.token_ids)
    if pieces is None:
        return None
    out = Text()
    for piece, ratio in zip(pieces, ratios, strict=True):
        r, g, b = ratio_rgb(ratio)
        out.append(piece, style=f"black on rgb({r},{g},{b})")
    return out


def header(traj: Trajectory) -> Text:
    reason = traj.stop_reason.value if traj.stop_reason else "none"
    t = Text()
    t.append(traj.id, style="bold")
    t.append(f"  {traj.env_id}  task {traj.task_id}  ")
    t.append(f"reward {traj.reward:.3g} ", style="bold")
    t.append("success" if traj.success else "failed", style="green" if traj.success else "red")
    t.append(f"  stop {reason}", style="yellow" if traj.truncated else "")
    t.append(f"  {len(traj.turns)} turns  {traj.num_assistant_tokens} tokens")
    if traj.teacher_id:
        t.append(f"  teacher {traj.teacher_id}", style="dim")
    return t


def render_turn(turn: Turn, decode: TokenDecoder | None) -> Group:
    d = turn_divergence(turn)
    head = Text(f"turn {turn.index}", style="bold cyan")
    head.append(f"  finish {turn.finish}  {len(turn.token_ids)} tokens  ")
    head.append(f"d_k {d:.3f}" if d is not None else "d_k -", style="magenta")
    head.append(f"  weight {turn.weight:.3g}")
    body = (token_text(turn, decode) if decode is not None else None) or Text(turn.text)
    parts: list[Text] = [head, body]
    for call in turn.tool_calls:
        parts.append(Text(f"→ call {call.name}({json.dumps(call.arguments, ensure_ascii=False)})", style="blue"))
    for res in turn.tool_results:
        line = Text("← ")
        if res.error_type is not None:
            line.append(f"[{res.error_type.value}] ", style="bold red")
        line.append(f"{res.name or '?'}: ", style="red" if res.error_type else "green")
        line.append(shorten(res.content, TOOL_RESULT_CHARS), style="red" if res.error_type else "")
        parts.append(line)
    return Group(*parts)


def render_trajectory(traj: Trajectory, decode: TokenDecoder | None) -> Panel:
    turns = [render_turn(t, decode) for t in traj.turns] or [Text("(no turns)")]
    return Panel(Group(header(traj), *turns), border_style="green" if traj.success else "red")


def replay(trajs: Iterable[Trajectory], console: Console, *, limit: int | None = None,
           tokenizer: str | Path | None = None, tokens: bool = True) -> int:
    """Print trajectories one by one as they stream in; returns how many were shown."""
    decode = TokenDecoder(tokenizer, lambda msg: console.print(Text(msg, style="yellow"))) if tokens else None
    shown, legend_shown = 0, False
    if limit is not None and limit <= 0:
        return 0
    for traj in trajs:
        scored = any(t.teacher_logprobs is not None for t in traj.turns)
        if scored and not legend_shown and decode is not None and decode.available:
            console.print(legend())
            legend_shown = True
        console.print(render_trajectory(traj, decode))
        shown += 1
        if limit is not None and shown >= limit:
            break  # before pulling (and parsing) another record
    return shown
