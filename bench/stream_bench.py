"""Streaming benchmark: replay-filter and export over a large trajectory JSONL, wall time and peak RSS.

    python bench/stream_bench.py                  # generate ~1 GB of synthetic trajectories, then measure
    python bench/stream_bench.py --size-mb 50     # a quick run
    python bench/stream_bench.py --file runs/x/trajectories.jsonl

Each measured command runs as its own child process (the real CLI), and its peak RSS is that child's
``ru_maxrss`` from ``os.wait4``, so the numbers are per command and include interpreter + imports (the
"import only" row). Streaming code keeps the peak flat as the file grows; a loader that reads the whole
file would grow with it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from opd_agents.types import ErrorType, Message, StopReason, ToolCall, ToolResult, Trajectory, Turn

TURNS, TOKENS_PER_TURN, PROMPT_TOKENS = 4, 128, 200


def template() -> dict:
    """A valid schema-v1 record (built through the model, so the bench follows schema changes)."""
    turns = [Turn(index=k, token_ids=[0], sampling_logprobs=[0.0], teacher_logprobs=[0.0], text="",
                  finish="tool_call", observation_ids=[0],
                  tool_calls=[ToolCall(id=f"c{k}", name="calculator", arguments={"expression": ""})],
                  tool_results=[ToolResult(call_id=f"c{k}", name="calculator", content="")])
             for k in range(TURNS)]
    traj = Trajectory(env_id="opd_agents/Arithmetic-v0", task_id="t", seed=0, model_id="bench", teacher_id="bench",
                      messages=[Message(role="system", content="You are a careful assistant."),
                                Message(role="user", content="What is 17*23?")],
                      prompt_ids=[0], turns=turns, stop_reason=StopReason.completed, terminated=True)
    return traj.model_dump(mode="json")


def generate(path: Path, size_mb: float, seed: int = 0) -> int:
    """Write synthetic trajectories until the file reaches ``size_mb``; streamed, one line at a time."""
    rng = random.Random(seed)
    base = template()
    target, n = int(size_mb * 1024 * 1024), 0
    with path.open("w") as f:
        while f.tell() < target:
            rec = json.loads(json.dumps(base))  # deep copy
            rec["id"], rec["seed"], rec["task_id"] = uuid.UUID(int=rng.getrandbits(128)).hex, n, f"task-{n}"
            rec["prompt_ids"] = [rng.randrange(49152) for _ in range(PROMPT_TOKENS)]
            rec["reward"] = rng.random()
            rec["success"] = rec["reward"] > 0.5
            error_at = rng.randrange(TURNS) if rng.random() < 0.2 else None
            for k, turn in enumerate(rec["turns"]):
                turn["token_ids"] = [rng.randrange(49152) for _ in range(TOKENS_PER_TURN)]
                turn["sampling_logprobs"] = [-rng.expovariate(1.0) for _ in range(TOKENS_PER_TURN)]
                shift = 1.5 if error_at is not None and k > error_at else 0.3
                turn["teacher_logprobs"] = [s - rng.expovariate(1 / shift) for s in turn["sampling_logprobs"]]
                turn["observation_ids"] = [rng.randrange(49152) for _ in range(24)]
                turn["text"] = "<tool_call>" + " ".join("token" for _ in range(40)) + "</tool_call>"
                turn["tool_results"][0]["content"] = str(rng.randrange(10**6))
                if k == error_at:
                    turn["tool_results"][0]["error_type"] = ErrorType.execution_failed.value
            f.write(json.dumps(rec) + "\n")
            n += 1
    return n


def measure(name: str, argv: list[str], size_bytes: int, out: Path | None = None) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        sys.exit(f"{name} failed (exit {proc.returncode}):\n{stderr[-2000:]}")
    out_size = sum(p.stat().st_size for p in ([out] if out.is_file() else out.rglob("*"))) if out else 0
    return {"step": name, "wall_s": wall, "mb_per_s": size_bytes / 2**20 / wall if size_bytes else 0.0,
            "peak_rss_mb": usage.ru_maxrss / 1024, "out_mb": out_size / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=float, default=1024, help="size of the generated file (default 1024)")
    ap.add_argument("--file", type=Path, help="measure this trajectory file instead of generating one")
    ap.add_argument("--workdir", type=Path, help="where the generated file and outputs go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the temp work dir (printed)")
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="opd-stream-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.keep:
        print(f"work dir: {work}")
    try:
        src = args.file
        if src is None:
            src = work / "trajectories.jsonl"
            t0 = time.perf_counter()
            n = generate(src, args.size_mb)
            mb = src.stat().st_size / 2**20
            print(f"generated {n} trajectories, {mb:.0f} MB in {time.perf_counter() - t0:.0f} s")
        size = src.stat().st_size
        cli = [sys.executable, "-m", "opd_agents.cli"]
        rows = [
            measure("import only", [sys.executable, "-c", "import opd_agents.cli"], 0),
            measure("replay filter (full scan)", [*cli, "replay", str(src), "--min-reward", "0.999",
                                                  "--has-tool-error", "--limit", "0", "--no-tokens"], size),
            measure("export parquet (trajectory)", [*cli, "export", str(src), "--out", str(work / "t.parquet")],
                    size, work / "t.parquet"),
            measure("export parquet (turn)", [*cli, "export", str(src), "--level", "turn", "--out",
                                              str(work / "turns.parquet")], size, work / "turns.parquet"),
            measure("export hf (trajectory)", [*cli, "export", str(src), "--format", "hf", "--out", str(work / "ds")],
                    size, work / "ds"),
        ]
    finally:
        if args.workdir is None and not args.keep:  # a --workdir is the caller's: left as it is
            shutil.rmtree(work, ignore_errors=True)
    print(f"\ninput: {size / 2**20:.0f} MB  ({src})")
    print(f"{'step':<30} {'wall s':>8} {'MB/s':>7} {'peak RSS MB':>12} {'out MB':>8}")
    for r in rows:
        print(f"{r['step']:<30} {r['wall_s']:>8.1f} {r['mb_per_s']:>7.1f} {r['peak_rss_mb']:>12.0f} "
              f"{r['out_mb']:>8.1f}")


if __name__ == "__main__":
    main()
