"""Divergence-policy ablation: plain OPD vs loss-time truncation vs rollout-time truncation vs SOD weights.

    python bench/ablation.py --seeds 0 1 2 --jobs 2          # the grid behind docs/divergence.md

Every run is `opd-agents train -c configs/ablation.yaml --set seed=S --set run_dir=OUT/VARIANT-sS` plus the
variant's `--set divergence.…` overrides, so any single cell can be rerun by hand. Prerequisites are made
here when missing: the difficulty-2 SFT teacher (OUT/teacher-d2); the start student is the quickstart's
step-20 checkpoint (`make quickstart`). The start student is evaluated once (same held-out seeds and greedy
decoding as every run's final eval). Runs already finished (summary.json present) are not redone, so an
interrupted grid continues where it stopped. `--jobs 2` runs two trainings side by side with
OMP_NUM_THREADS = cores / jobs each: wall times are comparable within one grid, not with lone runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "ablation.yaml"
VARIANTS: dict[str, list[str]] = {
    "plain": [],
    "loss-trunc": ["divergence.policies=[{name: loss_truncation, mode: first_error}]"],
    # tau from the START student's greedy turns against the teacher (before any run): on-track turns
    # d_k <= 0.8, the turn where it leaves the expert's plan >= 1.2
    "rollout-trunc": ["divergence.policies=[{name: rollout_truncation, mode: both, max_invalid_calls: 2, tau: 1.5}]"],
    "sod": ["divergence.policies=[{name: sod}]"],
}


def prepare(out: Path) -> dict[str, Any]:
    """Build the teacher if missing and evaluate the start student once; returns {'before': ...}."""
    from opd_agents.training.components import pick_device
    from opd_agents.config import load_config
    from opd_agents.training.evaluation import Evaluator
    from opd_agents.models import load_model
    from opd_agents.env.registry import make_env
    from opd_agents.rollout.renderer import ChatMLRenderer
    from opd_agents.teacher.sft import build_sft_teacher

    cfg = load_config(CONFIG)
    cfg = cfg.model_copy(update={"run_dir": str(out / "start-eval")})  # where the evaluator writes its episodes
    student = Path(cfg.student.model)
    if not (REPO / student).is_dir():
        sys.exit(f"start student {student} is missing: run `make quickstart` first")
    env_factory = lambda: make_env(cfg.env.id, **cfg.env.kwargs, limits=cfg.env.limits).unwrapped  # noqa: E731
    parser = env_factory().parser
    build_sft_teacher("smollm2-135m-instruct", env_factory, cfg.env.id, parser, out / "teacher-d2", episodes=96,
                      steps=20, batch_size=4, lr=2e-4, seed=0, log=print, env_kwargs=cfg.env.kwargs)
    before_file = out / "before.json"
    if not before_file.exists():
        model, tok = load_model(str(REPO / student), device=pick_device("auto", "auto")[0])
        result = Evaluator(cfg, env_factory, ChatMLRenderer(tok, parser), None).evaluate(model, "start")
        before_file.write_text(json.dumps(result, indent=1))
    return {"before": json.loads(before_file.read_text())}


def run_one(out: Path, variant: str, seed: int, threads: int) -> Path:
    run_dir = out / f"{variant}-s{seed}"
    if (run_dir / "summary.json").exists():
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    sets = [f"seed={seed}", f"run_dir={run_dir}", *VARIANTS[variant]]
    cmd = [sys.executable, "-m", "opd_agents.cli", "train", "-c", str(CONFIG)]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(run_dir / "train.log", "w") as log:
        subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    return run_dir


SCORED = "eval_trajectories.scored.jsonl"


def score_heldout(run_dirs: list[Path], teacher_dir: Path) -> None:
    """Teacher logprobs on each run's final held-out episodes (once: runs already scored are skipped; the
    teacher is loaded only if some run needs it)."""
    from opd_agents.analysis.export import rescore_file
    from opd_agents.teacher import TeacherConfig, make_teacher

    todo = [d for d in run_dirs if not (d / SCORED).exists()]
    if not todo:
        return
    with make_teacher(TeacherConfig(backend="hf", model=str(teacher_dir))) as scorer:
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


def table(records: dict[str, list[dict[str, Any]]], before: float, before_nll: float) -> str:
    lines = [f"start student: held-out success {before:.3f}, held-out teacher NLL / token {before_nll:.3f}", "",
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
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--jobs", type=int, default=1, help="trainings run side by side")
    ap.add_argument("--out", type=Path, default=Path("runs/ablation"))
    args = ap.parse_args()
    out = args.out if args.out.is_absolute() else REPO / args.out
    out.mkdir(parents=True, exist_ok=True)
    before = prepare(out)["before"]["success_rate"]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    cells = [(v, s) for s in args.seeds for v in args.variants]  # seed-major: a partial grid is still paired
    with ThreadPoolExecutor(args.jobs) as pool:
        dirs = list(pool.map(lambda cell: run_one(out, cell[0], cell[1], threads), cells))
    score_heldout([*dirs, out / "start-eval"], out / "teacher-d2")
    records: dict[str, list[dict[str, Any]]] = {v: [] for v in args.variants}
    for (variant, _), run_dir in zip(cells, dirs, strict=True):
        records[variant].append(run_record(run_dir) | {"heldout_teacher_nll": heldout_teacher_nll(run_dir)})
    before_nll = heldout_teacher_nll(out / "start-eval")
    (out / "ablation.json").write_text(json.dumps({"before": before, "before_teacher_nll": before_nll,
                                                   "runs": records}, indent=1))
    print(table(records, before, before_nll))


if __name__ == "__main__":
    main()
