"""OPD step benchmark: student tokens trained per second, teacher scoring cost, telemetry overhead.

    .venv/bin/python bench/opd_step.py                      # SmolLM2 student + SmolLM2 teacher, CPU
    .venv/bin/python bench/opd_step.py --steps 5 --device cuda

Variants (same seeds, same data):
  plain            one teacher forward pass per trajectory after the rollout (the default OPD loop)
  rollout-scoring  the teacher scores every turn while the episode is played (rollout-time truncation
                   with tau=inf, so nothing is cut: pure overhead), KV cache reused turn by turn
Reported per variant: median step time, student tokens trained / s, teacher tokens processed per
trajectory token, and for comparison the teacher tokens a naive per-turn re-scoring would need (O(T^2)).
Step 1 is a warm-up and excluded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from opd_agents.config import parse_config
from opd_agents.training.trainer import Trainer


def naive_rescoring_tokens(traj: dict[str, Any]) -> int:
    """Teacher tokens if every turn were scored by re-reading the whole prefix (one pass per turn)."""
    total, prefix = 0, len(traj["prompt_ids"])
    for turn in traj["turns"]:
        prefix += len(turn["token_ids"])
        total += prefix
        prefix += len(turn["observation_ids"])
    return total


def run(variant: str, args: argparse.Namespace, run_dir: Path) -> dict[str, float]:
    cfg = parse_config({
        "run_dir": str(run_dir), "seed": 0, "device": args.device,
        "env": {"id": args.env, "kwargs": {"difficulty": 2} if "Arithmetic" in args.env else {},
                "limits": {"max_turns": 6, "max_tokens_per_turn": 64, "max_total_tokens": 384}},
        "student": {"model": args.model}, "teacher": {"model": args.model},
        "loss": {"kind": args.loss},
        "train": {"steps": args.steps, "tasks_per_step": args.tasks, "micro_batch_size": 4, "checkpoint_every": 10**6},
        "eval": {"every": 10**6, "episodes": 1}, "teacher_strength": {"episodes": 0},
        "divergence": {"rollout_truncation": "threshold", "tau": 1e9} if variant == "rollout-scoring" else {},
        "max_tokens_per_turn": 64,
    })
    trainer = Trainer(cfg)
    trainer.start_step = 0
    from opd_agents.store import TrajectoryWriter

    rows = []
    with TrajectoryWriter(run_dir / "trajectories.jsonl") as writer:
        for step in range(1, args.steps + 1):
            t0 = time.perf_counter()
            row = trainer.train_step(step, writer)
            row["wall"] = time.perf_counter() - t0
            rows.append(row)
    trajs = [json.loads(line) for line in (run_dir / "trajectories.jsonl").read_text().splitlines()]
    measured = rows[1:] or rows
    traj_tokens = sum(r["trajectory_tokens"] for r in rows)
    teacher_tokens = sum(r["teacher_tokens"] + r["teacher_tokens_rollout"] for r in rows)
    return {
        "step_s": statistics.median(r["wall"] for r in measured),
        "rollout_s": statistics.median(r["time/rollout_s"] for r in measured),
        "student_tok_per_s": sum(r["student_tokens"] for r in measured) / sum(r["wall"] for r in measured),
        "teacher_tokens_per_traj_token": teacher_tokens / max(traj_tokens, 1),
        "naive_per_turn_rescoring": sum(naive_rescoring_tokens(t) for t in trajs) / max(traj_tokens, 1),
        "mean_turns": statistics.mean(len(t["turns"]) for t in trajs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--env", default="opd_agents/RetrievalQA-v0")
    ap.add_argument("--loss", default="reverse_kl")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--variants", default="plain,rollout-scoring")
    args = ap.parse_args()
    results = {}
    for variant in args.variants.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            results[variant] = run(variant, args, Path(tmp))
    print(f"\nOPD step bench: {args.model} student+teacher, {args.env}, loss={args.loss}, "
          f"{args.tasks} tasks/step, {args.steps} steps (first excluded), device={args.device}")
    keys = list(next(iter(results.values())))
    print(f"{'variant':<18}" + "".join(f"{k:>30}" for k in keys))
    for variant, res in results.items():
        print(f"{variant:<18}" + "".join(f"{res[k]:>30.3f}" for k in keys))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
