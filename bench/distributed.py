"""Training throughput on 1 vs N processes: the same config and global batch, run alone and under torchrun.

    python bench/distributed.py                                   # CPU: 1 vs 2 processes, 1 thread each
    python bench/distributed.py --ranks 1 8 --parallel fsdp --threads 0 --config configs/gpu-8x-fsdp.yaml
        # a GPU node: 1 vs 8 GPUs (threads 0 = leave OMP alone)

Each run is `opd-agents train -c CONFIG --set train.steps=S --set run_dir=OUT/…` (under `torchrun
--standalone --nproc_per_node N` with `--set train.parallel=P` for N > 1), repeated `--repeats` times with
the process counts interleaved (1, N, 1, N, …) so machine noise hits both alike. Reported per run, from the
run's metrics.jsonl (rank 0 logs the whole job): student tokens/s over the steps after the first (model
load, first-step warm-up and the final evaluation excluded: only training steps are timed), the ratio to 1
process, and the job's peak RSS (all ranks' peaks summed). With N processes each plays 1/N of every step's tasks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(config: Path, ranks: int, parallel: str, steps: int, out: Path, threads: int) -> dict[str, float]:
    sets = [f"train.steps={steps}", f"run_dir={out}", f"eval.every={steps + 1}", "eval.before=false", "eval.episodes=2",
            "teacher_strength.episodes=0", f"train.checkpoint_every={steps + 1}"]
    if ranks > 1:
        sets.append(f"train.parallel={parallel}")
    train = ["-m", "opd_agents.cli", "train", "-c", str(config), *(a for s in sets for a in ("--set", s))]
    cmd = [sys.executable, *train] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *train]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if threads:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r.get("step", 0) > 1]
    tokens, secs = sum(r["student_tokens"] for r in timed), sum(r["time/step_s"] for r in timed)
    return {"tokens_per_s": tokens / secs, "step_s": secs / len(timed),
            "rss_gb": rows[-1]["memory/job_peak_rss_gb"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "distributed-cpu.yaml")
    ap.add_argument("--ranks", type=int, nargs=2, default=[1, 2], metavar=("A", "B"))
    ap.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp")
    ap.add_argument("--steps", type=int, default=4, help="steps per run; the first is not timed")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per process (0: leave as is)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench-distributed")
    args = ap.parse_args()

    results: dict[int, list[dict[str, float]]] = {n: [] for n in args.ranks}
    for rep in range(args.repeats):
        for n in args.ranks:  # interleaved
            res = run(args.config, n, args.parallel, args.steps, args.out / f"r{n}-{rep}", args.threads)
            results[n].append(res)
            print(f"repeat {rep}: {n} process(es): {res['tokens_per_s']:.1f} student tokens/s, "
                  f"{res['step_s']:.1f} s/step, peak RSS (all ranks) {res['rss_gb']:.1f} GB", flush=True)
    base = statistics.median(r["tokens_per_s"] for r in results[args.ranks[0]])
    print(f"\n| processes | student tokens/s (median of {args.repeats}) | s/step | vs {args.ranks[0]} | peak RSS, all ranks |")
    print("|---|---|---|---|---|")
    for n, rs in results.items():
        tps = statistics.median(r["tokens_per_s"] for r in rs)
        print(f"| {n} ({args.parallel if n > 1 else 'none'}) | {tps:.1f} | "
              f"{statistics.median(r['step_s'] for r in rs):.1f} | {tps / base:.2f}x | "
              f"{max(r['rss_gb'] for r in rs):.1f} GB |")


if __name__ == "__main__":
    main()
