"""Rock tokens across a run's checkpoints: which probe tokens stay in the top loss quantile at every one.

    .venv/bin/python bench/rock_tokens.py runs/quickstart --probe-step 1

The probe is the run's first training batch (teacher logprobs stored with it); every model in turn -- the
run's start student, then each checkpoint -- re-reads it, exactly as `divergence.rock_tokens: track` does
step by step inside training (opd_agents/training/rock_tokens.py). With N models and rock_min_steps = N a rock
token is high (loss above the quantile) at every checkpoint. Prints the share of probe tokens that are
rock tokens, their share of the loss, and the most frequent rock tokens.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from opd_agents.training.divergence import DivergencePolicyConfig
from opd_agents.models import load_model
from opd_agents.training.rock_tokens import RockTokenMonitor
from opd_agents.store import iter_trajectories


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--probe-step", type=int, default=1, help="training step whose batch is the probe")
    ap.add_argument("--tasks-per-step", type=int, default=None, help="default: the run's train.tasks_per_step")
    ap.add_argument("--quantile", type=float, default=0.9)
    args = ap.parse_args()

    cfg = json.loads((args.run_dir / "config.json").read_text())
    per_step = args.tasks_per_step or cfg["train"]["tasks_per_step"] * cfg["train"]["group_size"]
    trajs = list(iter_trajectories(args.run_dir / "trajectories.jsonl"))
    probe = trajs[(args.probe_step - 1) * per_step : args.probe_step * per_step]
    models = [cfg["student"]["model"]] + sorted(
        str(p / "model") for p in (args.run_dir / "checkpoints").glob("step_*") if (p / "model").is_dir())
    monitor = RockTokenMonitor(DivergencePolicyConfig(rock_tokens="track", rock_quantile=args.quantile,
                                                      rock_min_steps=len(models)), pad_token_id=0)
    tokenizer = None
    print(f"probe: step {args.probe_step} of {args.run_dir} ({len(probe)} trajectories); quantile {args.quantile}")
    for name in models:
        model, tokenizer = load_model(name)
        monitor.pad_token_id = int(tokenizer.pad_token_id)
        row = monitor.observe(model, probe)
        print(f"{name:<55} mean |log pi_S - log pi_T| {row['rock/probe_loss']:.3f}   "
              f"rock share {row['rock/share']:.3f}   rock loss share {row['rock/loss_share']:.3f}")
    tokens = monitor.probe_tokens()
    total = len(tokens)
    rocks = Counter(repr(tokenizer.decode([token_id])) for token_id, is_rock in tokens if is_rock)
    print(f"\nrock tokens (high at all {len(models)} models): {sum(rocks.values())} of {total} probe tokens; "
          f"most frequent: {', '.join(f'{tok} x{n}' for tok, n in rocks.most_common(12))}")


if __name__ == "__main__":
    main()
