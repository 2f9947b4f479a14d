"""One self-contained HTML report of a training run: learning curves, divergence by turn (with vs without a
tool error), stop reasons, tool errors and per-token teacher/student heatmaps.

No network and no external references: plots are matplotlib figures inlined as SVG (text kept as text,
no RDF metadata), styles are inline. Trajectory files are streamed in one pass; only the N heatmap
trajectories are kept. Any missing file or metric makes its section say "no data" instead of failing.
"""

from __future__ import annotations

import heapq
import html
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opd_agents.analysis.trajectories import RATIO_SCALE, log_ratios, max_divergence, ratio_rgb, turn_divergence
from opd_agents.training.divergence import divergence_table
from opd_agents.analysis.replay import TokenDecoder
from opd_agents.store import ReadIssue, iter_trajectories
from opd_agents.env.tool import shorten
from opd_agents.types import Trajectory

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars")
COMPLETED = {"completed", "tool_stop"}  # the episode's own end; everything else is a truncation
CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}h1{font-size:1.6em}
h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}table{border-collapse:collapse}
td,th{border:1px solid #ddd;padding:.2em .6em;text-align:left}svg{max-width:100%;height:auto}
.nodata{color:#888;font-style:italic}.warn{color:#a60}.turn{margin:.5em 0}.tok{border-radius:2px}
.traj{border:1px solid #ccc;border-radius:6px;padding:.6em;margin:1em 0}
.tokens{font-family:monospace;white-space:pre-wrap;line-height:1.7}
.err{color:#c00;font-weight:bold}.tool{font-family:monospace;font-size:.9em;color:#036}"""


# ---- inputs ----------------------------------------------------------------------------------------
@dataclass
class TrajStats:
    """One streamed pass over a trajectory file."""

    n: int = 0
    truncated: int = 0
    tool_calls: int = 0
    stops: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    divergence: dict[str, list[float | None]] = field(default_factory=dict)  # divergence.divergence_table
    issues: list[ReadIssue] = field(default_factory=list)
    top: list[tuple[float, int, Trajectory]] = field(default_factory=list)  # min-heap of the most divergent

    def add(self, traj: Trajectory, keep: int) -> None:
        self.n += 1
        self.truncated += traj.truncated
        self.tool_calls += sum(len(t.tool_calls) for t in traj.turns)
        self.stops[traj.stop_reason.value if traj.stop_reason else "none"] += 1
        self.errors.update(e.value for t in traj.turns for e in t.tool_error_types)
        d = max_divergence(traj)
        if keep and d is not None:
            item = (d, -self.n, traj)  # ties: the earlier trajectory wins
            (heapq.heappush if len(self.top) < keep else heapq.heappushpop)(self.top, item)


def read_trajectory_stats(path: Path, keep: int = 0, max_turns: int = 8) -> TrajStats | None:
    if not path.is_file():
        return None
    stats = TrajStats()

    def tap(trajs: Iterable[Trajectory]) -> Iterator[Trajectory]:  # one pass feeds both aggregates
        for traj in trajs:
            stats.add(traj, keep)
            yield traj

    stats.divergence = divergence_table(tap(iter_trajectories(path, on_error=stats.issues.append)), max_turns)
    return stats


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Metric rows (a torn line from a killed run is skipped and counted)."""
    rows, bad = [], 0
    if path.is_file():
        with path.open("rb") as f:
            for raw in f:
                try:
                    row = json.loads(raw)
                except ValueError:
                    bad += raw.strip() != b""
                    continue
                if isinstance(row, dict):
                    rows.append(row)
    return rows, bad


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = None
    return data if isinstance(data, dict) else {}


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pts = [(float(r["step"]), float(r[key])) for r in rows
           if isinstance(r.get(key), (int, float)) and isinstance(r.get("step"), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


# ---- plots -----------------------------------------------------------------------------------------
def svg(fig: Any, name: str) -> str:
    """A matplotlib figure as inline SVG markup (no XML prolog, no metadata with external URIs)."""
    import matplotlib

    buf = io.StringIO()
    # fonttype none: text stays <text>, so several inline SVGs share no glyph ids; the salt keeps
    # clip-path ids of different figures apart.
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": name}):
        fig.savefig(buf, format="svg", bbox_inches="tight")
    out = buf.getvalue()
    out = out[out.index("<svg"):]
    return re.sub(r"<metadata>.*?</metadata>", "", out, flags=re.S)


def figure(ncols: int, width: float = 11.0, height: float = 3.2) -> tuple[Any, Any]:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:  # steps and turn indices are integers
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, axes


def nodata(what: str) -> str:
    return f'<p class="nodata">no data: {html.escape(what)}</p>'


def curves_section(rows: list[dict[str, Any]]) -> str:
    panels = [("loss", ["loss"]), ("success rate", ["eval/success_rate", "rollout/success_rate"]),
              ("mean reward", ["eval/mean_reward", "rollout/mean_reward"])]
    if not any(series(rows, k)[0] for _, keys in panels for k in keys):
        return nodata("metrics.jsonl has no loss / success / reward rows")
    fig, axes = figure(3)
    for ax, (title, keys) in zip(axes, panels, strict=True):
        for key in keys:
            x, y = series(rows, key)
            if x:
                label = key.replace("eval/", "held-out ").replace("rollout/", "train ")
                ax.plot(x, y, marker="o", markersize=3, label=label)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_title(title)
        ax.set_xlabel("step")
    return svg(fig, "curves")


def divergence_section(stats: TrajStats | None) -> str:
    cells: dict[str, list[tuple[int, float, int]]] = {}  # group -> (turn index, mean d_k, scored turns)
    table = stats.divergence if stats else {}
    for g in ("with_error", "no_error") if table else ():
        cells[g] = [(k, m, int(n)) for k, (m, n) in enumerate(zip(table[g], table[f"{g}_n"], strict=True))
                    if m is not None]
    if not any(cells.values()):
        return nodata("no scored turns (teacher logprobs) in trajectories.jsonl")
    fig, (ax,) = figure(1, 7.0, 3.4)
    for group, label, color in (("no_error", "no tool error", "tab:blue"),
                                ("with_error", "with a tool error", "tab:red")):
        if cells[group]:
            ax.plot([k for k, _, _ in cells[group]], [m for _, m, _ in cells[group]], marker="o", color=color,
                    label=label)
    ax.set_xticks(sorted({k for pts in cells.values() for k, _, _ in pts}))
    ax.set_xlabel("turn index k")
    ax.set_ylabel("mean d_k = mean |log π_S − log π_T|")
    ax.set_title("divergence by turn")
    ax.legend(fontsize=8)
    rows = "".join(f"<tr><td>{g}</td>" + "".join(f"<td>k={k}: {m:.3f} (n={n})</td>" for k, m, n in pts) + "</tr>"
                   for g, pts in cells.items() if pts)
    return svg(fig, "divergence") + f"<table>{rows}</table>"


def div_metrics_section(rows: list[dict[str, Any]]) -> str:
    keys = sorted({k for r in rows for k in r if k.startswith("div/")})
    if not keys:
        return nodata("metrics.jsonl has no div/* metrics")
    turn_keys = sorted((k for k in keys if re.fullmatch(r"div/d_turn_\d+", k)), key=lambda k: int(k.rsplit("_", 1)[1]))
    panels = [("d_k around tool errors", ["div/d_before_error", "div/d_error_turn", "div/d_after_error",
                                          "div/d_no_error"]),
              ("cascade, truncation, loops", ["div/cascade_rate", "div/truncated_share", "div/repeat_share"])]
    fig, axes = figure(3)
    for ax, (title, names) in zip(axes, panels, strict=False):
        for key in names:
            x, y = series(rows, key)
            if x:
                ax.plot(x, y, marker="o", markersize=3, label=key[4:])
        if ax.lines:
            ax.legend(fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("step")
    means = [(int(k.rsplit("_", 1)[1]), series(rows, k)[1]) for k in turn_keys]
    means = [(k, sum(v) / len(v)) for k, v in means if v]
    if means:
        axes[2].bar([k for k, _ in means], [m for _, m in means], color="tab:purple")
    axes[2].set_title("d_k by turn (mean over steps)")
    axes[2].set_xlabel("turn index k")
    return svg(fig, "divmetrics")


def bars(ax: Any, groups: dict[str, dict[str, float]], ylabel: str) -> None:
    labels = sorted({k for g in groups.values() for k in g})
    width = 0.8 / max(len(groups), 1)
    for i, (name, values) in enumerate(groups.items()):
        xs = [j + i * width for j in range(len(labels))]
        ax.bar(xs, [values.get(lbl, 0.0) for lbl in labels], width, label=name)
    ax.set_xticks([j + width * (len(groups) - 1) / 2 for j in range(len(labels))], labels, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)


def stops_section(files: dict[str, TrajStats | None]) -> str:
    present = {name: s for name, s in files.items() if s and s.n}
    if not present:
        return nodata("no trajectories")
    fig, (ax,) = figure(1, 8.0, 3.4)
    bars(ax, {name: {k: v / s.n for k, v in s.stops.items()} for name, s in present.items()}, "share of episodes")
    ax.set_title("stop reasons")
    notes = "".join(f"<li>{html.escape(name)}: {s.n} episodes, {s.truncated / s.n:.1%} truncated; "
                    + ", ".join(f"{html.escape(k)} {v}" + ("" if k in COMPLETED else " (truncation)")
                                for k, v in s.stops.most_common()) + "</li>" for name, s in present.items())
    return svg(fig, "stops") + f"<ul>{notes}</ul>"


def errors_section(files: dict[str, TrajStats | None]) -> str:
    present = {name: s for name, s in files.items() if s and s.n}
    if not present:
        return nodata("no trajectories")
    # Rate denominator as in stats.summarize: parsed calls plus unparseable ones.
    rates = {name: {k: v / max(s.tool_calls + s.errors.get("parse_error", 0), 1) for k, v in s.errors.items()}
             for name, s in present.items()}
    calls = ", ".join(f"{html.escape(name)}: {s.tool_calls} tool calls, {sum(s.errors.values())} errors"
                      for name, s in present.items())
    if not any(rates.values()):
        return f'<p class="nodata">no tool errors ({calls})</p>'
    fig, (ax,) = figure(1, 8.0, 3.4)
    bars(ax, rates, "errors per tool call")
    ax.set_title("tool errors by type")
    return svg(fig, "errors") + f"<p>{calls}</p>"


# ---- token heatmap ---------------------------------------------------------------------------------
def heatmap_legend() -> str:
    cells = "".join(f'<span class="tok" style="background:rgb{ratio_rgb(v)}">&nbsp;{v:+.1f}&nbsp;</span>'
                    for v in (-RATIO_SCALE, -RATIO_SCALE / 2, 0.0, RATIO_SCALE / 2, RATIO_SCALE))
    return (f"<p>token colour = log π<sub>T</sub> − log π<sub>S</sub> (nats): {cells} — red: the teacher finds "
            f"the student's token unlikely; green: the teacher prefers it more. Hover a token for its numbers.</p>")


def heatmap_trajectory(traj: Trajectory, decode: TokenDecoder) -> str:
    reason = traj.stop_reason.value if traj.stop_reason else "none"
    d = max_divergence(traj)
    out = [f'<div class="traj"><b>{html.escape(traj.id)}</b> · {html.escape(traj.env_id)} · task '
           f'{html.escape(traj.task_id)} · reward {traj.reward:.3g} · {"success" if traj.success else "failed"} · '
           f'stop {html.escape(reason)} · max d_k {d:.3f}']
    for turn in traj.turns:
        ratios = log_ratios(turn)
        dk = "-" if (dv := turn_divergence(turn)) is None else f"{dv:.3f}"
        out.append(f'<div class="turn"><i>turn {turn.index} · d_k {dk} · weight {turn.weight:.3g}</i>'
                   f'<div class="tokens">')
        if ratios is None:
            out.append(html.escape(turn.text) + " <i>(not scored)</i>")
        else:
            pieces = decode(turn.token_ids) or [f"⟨{i}⟩" for i in turn.token_ids]
            for piece, r, s, t in zip(pieces, ratios, turn.sampling_logprobs, turn.teacher_logprobs or [], strict=True):
                out.append(f'<span class="tok" style="background:rgb{ratio_rgb(r)}" title="student {s:.2f} '
                           f'teacher {t:.2f} ratio {r:+.2f}">{html.escape(piece)}</span>')
        out.append("</div>")
        for res in turn.tool_results:
            err = f'<span class="err">[{res.error_type.value}]</span> ' if res.error_type else ""
            out.append(f'<div class="tool">← {err}{html.escape(res.name or "?")}: '
                       f"{html.escape(shorten(res.content, 200))}</div>")
        out.append("</div>")
    return "".join(out) + "</div>"


def heatmap_section(stats: TrajStats | None, tokenizer: str | Path | None) -> str:
    if not stats or not stats.top:
        return nodata("no trajectories with teacher logprobs")
    notes: list[str] = []
    decode = TokenDecoder(tokenizer, notes.append)
    picked = [t for _, _, t in sorted(stats.top, reverse=True)]
    body = "".join(heatmap_trajectory(t, decode) for t in picked)
    warn = "".join(f'<p class="warn">{html.escape(n)}; showing token ids</p>' for n in notes)
    return (f"<p>The {len(picked)} training trajectories with the largest turn divergence.</p>"
            + heatmap_legend() + warn + body)


# ---- assembly --------------------------------------------------------------------------------------
def _get(d: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        d = d.get(part) if isinstance(d, dict) else None  # type: ignore[assignment]
    return d


def overview(run_dir: Path, cfg: dict[str, Any], summary: dict[str, Any], files: dict[str, TrajStats | None],
             bad_metrics: int) -> str:
    rows = [(label, _get(cfg, key)) for label, key in (
        ("environment", "env.id"), ("student", "student.model"), ("teacher", "teacher.model"),
        ("teacher backend", "teacher.backend"), ("loss", "loss.kind"), ("steps", "train.steps"), ("seed", "seed"))]
    rows += [(f"summary: {k}", f"{v:.4g}" if isinstance(v, float) else v) for k, v in summary.items()]
    rows += [(f"{name} trajectories", s.n if s else "no file") for name, s in files.items()]
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                    for k, v in rows if v is not None)
    issues = [i for s in files.values() if s for i in s.issues]
    warn = "".join(f'<p class="warn">skipped {html.escape(str(i))}</p>' for i in issues[:20])
    if bad_metrics:
        warn += f'<p class="warn">skipped {bad_metrics} unreadable line(s) in metrics.jsonl</p>'
    return f"<h1>opd-agents run report: {html.escape(run_dir.name)}</h1><table>{cells}</table>{warn}"


def build_report(run_dir: str | os.PathLike[str], *, trajectories: int = 3,
                 tokenizer: str | os.PathLike[str] | None = None) -> str:
    """The report's HTML. Raises TrajectoryFileError for a trajectory file from a newer schema."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run directory {run} does not exist")
    rows, bad = read_metrics(run / "metrics.jsonl")
    cfg = read_json(run / "config.json")
    max_turns = _get(cfg, "env.limits.max_turns")  # the divergence table's width; 8 without a config
    max_turns = max_turns if isinstance(max_turns, int) and max_turns > 0 else 8
    train = read_trajectory_stats(run / "trajectories.jsonl", keep=trajectories, max_turns=max_turns)
    files = {"train": train, "held-out eval": read_trajectory_stats(run / "eval_trajectories.jsonl")}
    sections = [
        ("Learning curves", curves_section(rows)),
        ("Divergence by turn, with vs without a tool error", divergence_section(train)),
        ("Divergence metrics over training", div_metrics_section(rows)),
        ("Stop reasons and truncation", stops_section(files)),
        ("Tool errors by type", errors_section(files)),
        ("Per-token teacher vs student", heatmap_section(train, tokenizer)),
    ]
    body = overview(run, cfg, read_json(run / "summary.json"), files, bad)
    body += "".join(f"<section><h2>{title}</h2>{content}</section>" for title, content in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>opd-agents report: '
            f"{html.escape(run.name)}</title><style>{CSS}</style></head><body>{body}</body></html>\n")


def write_report(run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
                 trajectories: int = 3, tokenizer: str | os.PathLike[str] | None = None) -> Path:
    path = Path(out) if out else Path(run_dir) / "report.html"
    text = build_report(run_dir, trajectories=trajectories, tokenizer=tokenizer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


# ---- headless browser ------------------------------------------------------------------------------
def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if found := shutil.which(name):
            return found
    return None


def run_chromium(args: list[str], timeout_s: float = 180.0) -> subprocess.CompletedProcess[str]:
    """Headless Chromium with a throwaway profile and no network chatter (environment.md flags)."""
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("chromium not found; install it with `apt-get install -y chromium`")
    with tempfile.TemporaryDirectory(prefix="opd-chromium-") as profile:
        return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=timeout_s, check=True)


def screenshot(html_path: str | os.PathLike[str], png: str | os.PathLike[str], width: int = 1280,
               height: int = 4000) -> Path:
    """A PNG of the page at ``width`` x up to ``height`` px; the empty page background below the content
    is cropped off (headless Chromium has no full-page capture)."""
    from PIL import Image, ImageChops

    png_path = Path(png).resolve()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    run_chromium([f"--screenshot={png_path}", f"--window-size={width},{height}", Path(html_path).resolve().as_uri()])
    with Image.open(png_path) as img:
        img.load()
    background = Image.new(img.mode, img.size, img.getpixel((img.width - 1, img.height - 1)))
    box = ImageChops.difference(img, background).getbbox()
    if box and box[3] + 24 < img.height:
        img.crop((0, 0, img.width, box[3] + 24)).save(png_path)
    return png_path
