"""Per-turn divergence in a policy grid's training rollouts, from each cell's per-step metrics.

    python bench/grid_dk.py docs/results/tw-ablation/cells/*.metrics.jsonl

Every training step logs d_k by turn index (``div/d_turn_{k}``) and around the first failing turn
(``div/d_before_error`` / ``d_error_turn`` / ``d_after_error``) over that step's 4 training episodes, scored
by the teacher the cell trains against. Averaged here over a cell's steps (a step without turn k is left out
of that column's mean), and over its first and last four steps: does divergence grow with the turn index
(a compounding cascade), and does that change as training goes on?
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def mean_of(steps: list[dict[str, Any]], key: str) -> str:
    values = [r[key] for r in steps if r.get(key) is not None]
    return f"{statistics.mean(values):.3f}" if values else "–"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("metrics", type=Path, nargs="+", help="cells' metrics.jsonl files")
    ap.add_argument("--turns", type=int, default=8)
    args = ap.parse_args()
    turns = range(args.turns)
    print("| cell | steps | " + " | ".join(f"d turn {k + 1}" for k in turns)
          + " | before first failing turn | at it | after it | cascade rate | episodes with a failing turn |")
    print("|---" * (args.turns + 7) + "|")
    for path in args.metrics:
        steps = [r for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]
        cell = path.name.split(".")[0]
        for label, part in (("all", steps), ("first 4", steps[:4]), ("last 4", steps[-4:])):
            print(f"| {cell} ({label}) | {len(part)} | "
                  + " | ".join(mean_of(part, f"div/d_turn_{k}") for k in turns)
                  + " | " + " | ".join(mean_of(part, f"div/{k}") for k in
                                       ("d_before_error", "d_error_turn", "d_after_error", "cascade_rate",
                                        "error_share")) + " |")


if __name__ == "__main__":
    main()
