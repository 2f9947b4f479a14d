"""Divergence-policy ablations: plain OPD vs the turn-level policies, one grid per workload.

    python bench/ablation.py --seeds 0 1 2 --jobs 2                       # Arithmetic grid (docs/divergence.md)
    python bench/ablation.py --grid textworld --seeds 0 --jobs 2          # TextWorld screen: every variant, 1 seed
    python bench/ablation.py --grid textworld --seeds 1 2 --variants plain sod iw-opd off-plan --jobs 2
    python bench/ablation.py --table-from docs/results/tw-ablation/ablation-2026-12-01-teacherB.json  # tables only

Every run is `opd-agents train -c CONFIG --set seed=S --set run_dir=OUT/VARIANT-sS` plus the variant's
`--set divergence.…` overrides, so any single cell can be rerun by hand. Prerequisites are made here when
missing (the grid's teacher) and the start student (and, for a privileged teacher, the teacher itself) is
evaluated once on the same held-out seeds with the same greedy decoding as every run's final eval. Runs
already finished (summary.json present) are not redone, and ``OUT/ablation.json`` + ``OUT/table.md`` are
rewritten after every finished run, so an interrupted grid keeps its results and continues where it stopped.
`--jobs 2` runs two trainings side by side with OMP_NUM_THREADS = cores / jobs each: wall times are
comparable within one grid, not with lone runs.

Grids:
- ``arithmetic`` (configs/ablation.yaml): the quickstart's student goes on to difficulty 2 against an SFT
  teacher built here (OUT/teacher-d2); needs `make quickstart` first.
- ``textworld`` (configs/ablation-textworld.yaml): quest length 4; the privileged SFT teacher (and the
  student's start weights) from `bench/textworld_cascade.py --teacher-steps 32 --out runs/tw-opd`, built
  here when missing (≈ 35 min on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Grid:
    config: Path
    variants: dict[str, list[str]]  # variant -> its `--set` overrides
    build_teacher: Callable[[Any, Path], Path]  # (RunConfig, OUT) -> the teacher's model dir, built if missing


def _arithmetic_teacher(cfg: Any, out: Path) -> Path:
    from opd_agents.env.registry import make_env
    from opd_agents.teacher.sft import build_sft_teacher

    student = Path(cfg.student.model)
    if not (REPO / student).is_dir():
        sys.exit(f"start student {student} is missing: run `make quickstart` first")
    parser = make_env(cfg.env.id, **cfg.env.kwargs).unwrapped.parser
    env_factory = lambda: make_env(cfg.env.id, **cfg.env.kwargs, limits=cfg.env.limits).unwrapped  # noqa: E731
    return build_sft_teacher("smollm2-135m-instruct", env_factory, cfg.env.id, parser, out / "teacher-d2",
                             episodes=96, steps=20, batch_size=4, lr=2e-4, seed=0, log=print,
                             env_kwargs=cfg.env.kwargs)


def _textworld_teacher(cfg: Any, out: Path) -> Path:
    from textworld_cascade import build_sft  # bench/ is the script's directory, so it is importable

    teacher = REPO / cfg.teacher.model
    return build_sft("teacher", "smollm2-135m-instruct", TEXTWORLD_TEACHER_STEPS, teacher, print)


TEXTWORLD_TEACHER_STEPS = 32


def _policies(*specs: str) -> list[str]:
    return [f"divergence.policies=[{', '.join(specs)}]"] if specs else []


GRIDS: dict[str, Grid] = {
    "arithmetic": Grid(REPO / "configs" / "ablation.yaml", {
        "plain": [],
        "loss-trunc": _policies("{name: loss_truncation, mode: first_error}"),
        # tau from the START student's greedy turns against the teacher (before any run): on-track turns
        # d_k <= 0.8, the turn where it leaves the expert's plan >= 1.2
        "rollout-trunc": _policies("{name: rollout_truncation, mode: both, max_invalid_calls: 2, tau: 1.5}"),
        "sod": _policies("{name: sod}"),
    }, _arithmetic_teacher),
    "textworld": Grid(REPO / "configs" / "ablation-textworld.yaml", {
        "plain": [],
        "sod": _policies("{name: sod}"),
        "loss-trunc": _policies("{name: loss_truncation, mode: first_error}"),
        "rollout-trunc": _policies("{name: rollout_truncation, mode: invalid_calls, max_invalid_calls: 2}"),
        "iw-opd": _policies("{name: iw_opd, gamma: 0.5}"),
        "topk-drift": _policies("{name: topk_drift}"),
        "change-point": _policies("{name: change_point}"),
        "horizon": _policies("{name: horizon, start_turns: 1}"),
        "off-plan": _policies("{name: off_plan}"),
    }, _textworld_teacher),
}


def prepare(grid: Grid, out: Path) -> dict[str, Any]:
    """Build the teacher if missing; evaluate the start student (and a privileged teacher) once."""
    from opd_agents.config import load_config
    from opd_agents.env.registry import make_env
    from opd_agents.models import load_model
    from opd_agents.rollout.renderer import ChatMLRenderer
    from opd_agents.training.components import pick_device, privileged_reference
    from opd_agents.training.evaluation import Evaluator

    cfg = load_config(grid.config)
    teacher_dir = grid.build_teacher(cfg, out)
    env_factory = lambda: make_env(cfg.env.id, **cfg.env.kwargs, limits=cfg.env.limits).unwrapped  # noqa: E731
    parser = env_factory().parser
    before: dict[str, Any] = {"teacher_dir": str(teacher_dir)}
    players = [("start", REPO / cfg.student.model, False)]
    if cfg.teacher.privileged:  # the gap the student can close: the teacher playing with its privileged prompt
        players.append(("teacher", teacher_dir, True))
    for who, model_dir, privileged in players:
        result_file = out / f"{who}-eval.json"
        if not result_file.exists():
            run_cfg = cfg.model_copy(update={"run_dir": str(out / f"{who}-eval")})  # where its episodes go
            model, tok = load_model(str(model_dir), device=pick_device("auto", "auto")[0])
            evaluator = Evaluator(run_cfg, env_factory, ChatMLRenderer(tok, parser),
                                  privileged_reference(env_factory) if privileged else None)
            result_file.write_text(json.dumps(evaluator.evaluate(model, who, privileged=privileged), indent=1))
        before[who] = json.loads(result_file.read_text())
    return before


def run_one(grid: Grid, out: Path, variant: str, seed: int, threads: int) -> Path:
    run_dir = out / f"{variant}-s{seed}"
    if (run_dir / "summary.json").exists():
        return run_dir
    resume = (run_dir / "checkpoints").is_dir()  # an interrupted run continues from its last checkpoint
    run_dir.mkdir(parents=True, exist_ok=True)
    sets = [f"seed={seed}", f"run_dir={run_dir}", *grid.variants[variant]]
    cmd = [sys.executable, "-m", "opd_agents.cli", "train", "-c", str(grid.config), *(["--resume"] if resume else [])]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(run_dir / "train.log", "a" if resume else "w") as log:
        subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    return run_dir


SCORED = "eval_trajectories.scored.jsonl"


def score_heldout(run_dirs: list[Path], teacher_dir: Path, cfg: Any) -> None:
    """Teacher logprobs on each run's final held-out episodes, with the prompt the teacher trains with
    (privileged or not). Runs already scored are skipped; the teacher is loaded only if some run needs it."""
    from opd_agents.analysis.export import rescore_file
    from opd_agents.env.registry import make_env
    from transformers import AutoTokenizer

    from opd_agents.rollout.renderer import ChatMLRenderer
    from opd_agents.teacher import TeacherConfig, make_teacher
    from opd_agents.training.components import privileged_reference

    todo = [d for d in run_dirs if not (d / SCORED).exists()]
    if not todo:
        return
    env_factory = lambda: make_env(cfg.env.id, **cfg.env.kwargs).unwrapped  # noqa: E731
    privileged = privileged_reference(env_factory) if cfg.teacher.privileged else None
    renderer = ChatMLRenderer(AutoTokenizer.from_pretrained(teacher_dir), env_factory().parser) if privileged else None
    with make_teacher(TeacherConfig(backend="hf", model=str(teacher_dir)), renderer=renderer,
                      privileged=privileged) as scorer:
        for run_dir in todo:
            rescore_file(run_dir / "eval_trajectories.jsonl", run_dir / SCORED, scorer, batch_size=8)


def heldout_teacher_nll(run_dir: Path) -> float:
    """Mean -log pi_T over the student's tokens in its final held-out episodes (``score_heldout`` first):
    how teacher-like the trained student behaves, a finer signal than success when few episodes succeed."""
    from opd_agents.store import iter_trajectories

    nll = [-lp for t in iter_trajectories(run_dir / SCORED) for turn in t.turns for lp in turn.teacher_logprobs or []]
    return statistics.mean(nll)


def run_record(run_dir: Path) -> dict[str, Any]:
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    final_eval = next(r for r in reversed(rows) if "eval/success_rate" in r)
    return {
        "after": summary["student_after"], "wall_s": summary["wall_s"],
        "eval_tool_error_rate": final_eval["eval/tool_error_rate"], "eval_mean_turns": final_eval["eval/mean_turns"],
        "train_tool_error_rate": statistics.mean(r["rollout/tool_error_rate"] for r in steps[-3:]),
        "teacher_tokens": sum(r["teacher_tokens"] + r["teacher_tokens_rollout"] for r in steps),
        "trajectory_tokens": sum(r["trajectory_tokens"] for r in steps),
        "step_s": statistics.mean(r["time/step_s"] for r in steps),
        "train_success": statistics.mean(r["rollout/success_rate"] for r in steps[-3:]),
        "stop_divergence": statistics.mean(r.get("div/stop_divergence", 0.0) for r in steps),
        "stop_parse_error": statistics.mean(r.get("div/stop_parse_error", 0.0) for r in steps),
        "mean_weight": statistics.mean(r.get("div/mean_weight", 1.0) for r in steps),
    }


def mean_spread(xs: list[float]) -> str:
    if len(xs) < 2:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f} (min {min(xs):.3f}, max {max(xs):.3f})"


def table(records: dict[str, list[dict[str, Any]]], before: dict[str, Any], before_nll: float) -> str:
    lines = [f"start student: held-out success {before['start']['success_rate']:.3f}, "
             f"held-out teacher NLL / token {before_nll:.3f}"]
    if "teacher" in before:
        lines.append(f"teacher (privileged prompt): held-out success {before['teacher']['success_rate']:.3f}")
    lines += ["",
             "| variant | held-out success after | per seed | held-out teacher NLL / token | held-out tool-error rate | held-out turns "
             "| train success / tool-error rate (last 3 steps) | teacher tokens / run | train episodes stopped: divergence / parse_error "
             "| mean turn weight | step time (s) | wall (s) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for variant, recs in records.items():
        if not recs:
            continue
        per_seed = ", ".join(f"{r['after']:.3f}" for r in recs)
        lines.append(
            f"| {variant} | {mean_spread([r['after'] for r in recs])} | {per_seed} "
            f"| {mean_spread([r['heldout_teacher_nll'] for r in recs])} "
            f"| {statistics.mean(r['eval_tool_error_rate'] for r in recs):.3f} "
            f"| {statistics.mean(r['eval_mean_turns'] for r in recs):.2f} "
            f"| {statistics.mean(r['train_success'] for r in recs):.3f} / "
            f"{statistics.mean(r['train_tool_error_rate'] for r in recs):.3f} "
            f"| {statistics.mean(r['teacher_tokens'] for r in recs):.0f} "
            f"| {statistics.mean(r['stop_divergence'] for r in recs):.3f} / "
            f"{statistics.mean(r['stop_parse_error'] for r in recs):.3f} "
            f"| {statistics.mean(r['mean_weight'] for r in recs):.3f} "
            f"| {statistics.mean(r['step_s'] for r in recs):.1f} | {statistics.mean(r['wall_s'] for r in recs):.0f} |")
    return "\n".join([*lines, "", paired_table(records)])


def paired_table(records: dict[str, list[dict[str, Any]]], baseline: str = "plain") -> str:
    """Each variant minus the baseline on the seeds both have run (same seed = same task draws and sampling
    seed): held-out success and teacher NLL. Pairing removes the seed-to-seed spread both share."""
    base = {r["seed"]: r for r in records.get(baseline, [])}
    lines = [(f"| variant − {baseline}, same seeds | seeds | held-out success Δ (mean) | per seed | "
              "held-out teacher NLL Δ (mean) | per seed |"), "|---|---|---|---|---|---|"]
    for variant, recs in records.items():
        pairs = [(r, base[r["seed"]]) for r in recs if variant != baseline and r["seed"] in base]
        if not pairs:
            continue
        wins = [r["after"] - b["after"] for r, b in pairs]
        nll = [r["heldout_teacher_nll"] - b["heldout_teacher_nll"] for r, b in pairs]
        lines.append(f"| {variant} | {', '.join(str(r['seed']) for r, _ in pairs)} | {statistics.mean(wins):+.3f} "
                     f"| {', '.join(f'{w:+.3f}' for w in wins)} | {statistics.mean(nll):+.4f} "
                     f"| {', '.join(f'{x:+.4f}' for x in nll)} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def report(grid: Grid, out: Path, before: dict[str, Any], cfg: Any) -> str:
    """Score, collect and tabulate every finished run of the grid in OUT (all seeds so far); written to
    OUT/ablation.json and OUT/table.md, so the results grow run by run."""
    finished = {v: sorted(out.glob(f"{v}-s*/summary.json")) for v in grid.variants}
    dirs = [p.parent for paths in finished.values() for p in paths]
    score_heldout([*dirs, out / "start-eval"], Path(before["teacher_dir"]), cfg)
    records = {v: [run_record(p.parent) | {"seed": int(p.parent.name.rsplit("-s", 1)[1]),
                                           "heldout_teacher_nll": heldout_teacher_nll(p.parent)}
                   for p in paths] for v, paths in finished.items()}
    before_nll = heldout_teacher_nll(out / "start-eval")
    (out / "ablation.json").write_text(json.dumps({"before": before, "before_teacher_nll": before_nll,
                                                   "runs": records}, indent=1))
    text = table(records, before, before_nll)
    (out / "table.md").write_text(text + "\n")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", choices=list(GRIDS), default="arithmetic")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", help="default: all of the grid's")
    ap.add_argument("--jobs", type=int, default=1, help="trainings run side by side")
    ap.add_argument("--out", type=Path, help="default: runs/ablation (arithmetic), runs/tw-ablation (textworld)")
    ap.add_argument("--table-from", type=Path, metavar="ABLATION_JSON",
                    help="print the tables of a finished grid's OUT/ablation.json and run nothing")
    args = ap.parse_args()
    if args.table_from:
        saved = json.loads(args.table_from.read_text())
        print(table(saved["runs"], saved["before"], saved["before_teacher_nll"]))
        return
    grid = GRIDS[args.grid]
    variants = args.variants or list(grid.variants)
    if unknown := sorted(set(variants) - set(grid.variants)):
        ap.error(f"unknown variants for --grid {args.grid}: {unknown}; known: {list(grid.variants)}")
    out = args.out or Path("runs/ablation" if args.grid == "arithmetic" else "runs/tw-ablation")
    out = out if out.is_absolute() else REPO / out
    out.mkdir(parents=True, exist_ok=True)
    from opd_agents.config import load_config

    cfg = load_config(grid.config)
    before = prepare(grid, out)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    cells = [(v, s) for s in args.seeds for v in variants]  # seed-major: a partial grid is still paired
    lock = threading.Lock()

    def cell_done(cell: tuple[str, int]) -> None:
        try:
            run_one(grid, out, *cell, threads)
        except subprocess.CalledProcessError as e:  # the other cells go on; a rerun resumes this one
            how = "killed (SIGKILL: out of memory?)" if e.returncode == -9 else f"exit code {e.returncode}"
            print(f"{cell[0]}-s{cell[1]} failed: {how}; its train.log has the details, rerunning the grid resumes "
                  f"it from its last checkpoint", flush=True)
            return
        with lock:  # one report at a time; each rewrites the whole table
            print(report(grid, out, before, cfg), flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(cell_done, cells))


if __name__ == "__main__":
    main()
