"""`opd-agents` command line: envs, rollout (and the training / analysis commands as they land)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from opd_agents.env import HELDOUT_SEED_START
from opd_agents.errors import OpdError
from opd_agents.registry import SHIPPED_ENVS, make_env

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm must not fetch its cost map

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="On-policy distillation of small tool-using agent models.")
console = Console()


def fail(err: Exception) -> None:
    console.print(f"[bold red]error:[/] {err}")
    raise typer.Exit(code=2)


@app.command()
def envs() -> None:
    """List the registered environments and their tools."""
    table = Table("id", "tools", "description")
    for env_id in SHIPPED_ENVS:
        env = make_env(env_id).unwrapped
        tools = ", ".join(t.name for t in env.toolbox.tools.values())
        table.add_row(env_id, tools, (type(env).__doc__ or "").strip().splitlines()[0])
    console.print(table)


def print_summary(title: str, summary: dict[str, Any]) -> None:
    table = Table(title=title, show_header=False)
    for k, v in summary.items():
        table.add_row(k, json.dumps(v) if isinstance(v, dict) else (f"{v:.4g}" if isinstance(v, float) else str(v)))
    console.print(table)


@app.command()
def rollout(
    env: Annotated[str, typer.Option("--env", help="environment id, e.g. opd_agents/Arithmetic-v0")],
    out: Annotated[Path, typer.Option("--out", help="JSONL file the trajectories are appended to")],
    model: Annotated[str, typer.Option("--model", help="local model dir or built-in name")] = "smollm2-135m-instruct",
    n: Annotated[int, typer.Option("-n", help="number of episodes")] = 8,
    split: Annotated[str, typer.Option(help="train | heldout (which seeds)")] = "heldout",
    seed: Annotated[int, typer.Option(help="first task seed offset within the split")] = 0,
    expert: Annotated[bool, typer.Option("--expert", help="play the scripted expert instead of a model")] = False,
    temperature: Annotated[float, typer.Option()] = 1.0,
    max_tokens_per_turn: Annotated[int, typer.Option()] = 256,
    batch_size: Annotated[int, typer.Option()] = 16,
    parser: Annotated[str, typer.Option(help="tool-call format: hermes | fenced_json | react")] = "hermes",
    sample_seed: Annotated[Optional[int], typer.Option(help="sampling RNG seed")] = 0,
) -> None:
    """Play N episodes, write trajectories, print success rate and stop reasons."""
    from opd_agents.expert import play_expert
    from opd_agents.stats import summarize
    from opd_agents.store import TrajectoryWriter

    if split not in ("train", "heldout"):
        fail(ValueError(f"--split must be 'train' or 'heldout', got {split!r}"))
    seeds = [(HELDOUT_SEED_START if split == "heldout" else 0) + seed + i for i in range(n)]
    env_kwargs = {"parser": parser}
    try:
        make_env(env, **env_kwargs)
        t0 = time.perf_counter()
        if expert:
            trajs = play_expert(lambda: make_env(env, **env_kwargs).unwrapped, seeds, env_id=env)
        else:
            from opd_agents.models import load_model
            from opd_agents.parsers import get_parser
            from opd_agents.renderer import ChatMLRenderer
            from opd_agents.rollout import Rollout
            from opd_agents.sampler import HFSampler
            from opd_agents.types import SamplingParams

            lm, tok = load_model(model)
            sampler = HFSampler(lm, ChatMLRenderer(tok, get_parser(parser)))
            sampling = SamplingParams(temperature=temperature, max_tokens_per_turn=max_tokens_per_turn,
                                      seed=sample_seed)
            t0 = time.perf_counter()
            runner = Rollout.for_env(env, sampler, env_kwargs=env_kwargs, sampling=sampling, model_id=model,
                                     batch_size=batch_size)
            trajs = runner.run(seeds, progress=True)
        wall = time.perf_counter() - t0
    except (OpdError, ValueError) as e:
        fail(e)
    with TrajectoryWriter(out) as writer:
        for t in trajs:
            writer.write(t)
    print_summary(f"{env} · {'scripted expert' if expert else model} · {split} seeds", summarize(trajs, wall))
    console.print(f"wrote {len(trajs)} trajectories to {out}")


def _parse_overrides(pairs: list[str]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            fail(ValueError(f"--set expects key=value (e.g. train.steps=10), got {pair!r}"))
        out[key.strip()] = yaml.safe_load(value)
    return out


@app.command()
def train(
    config: Annotated[Path, typer.Option("-c", "--config", help="YAML run config (see configs/)")],
    resume: Annotated[bool, typer.Option("--resume", help="continue from the last complete checkpoint")] = False,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a key: --set train.steps=10")] = None,
) -> None:
    """Distil a teacher into the student on a tool environment (on-policy by default)."""
    from opd_agents.config import load_config
    from opd_agents.trainer import Trainer

    t0 = time.perf_counter()
    try:
        cfg = load_config(config, _parse_overrides(set_ or []))
        trainer = Trainer(cfg, console)
        if resume:
            trainer.resume()
        summary = trainer.train()
    except OpdError as e:
        fail(e)
    table = Table(title=f"{cfg.env.id} · held-out success ({cfg.eval.episodes} tasks, seed {cfg.seed})")
    for key, label in (("student_before", "student before"), ("student_after", "student after"),
                       ("teacher", "teacher")):
        if key in summary:
            table.add_row(label, f"{summary[key]:.3f}")
    table.add_row("wall time", f"{time.perf_counter() - t0:.0f} s")
    console.print(table)
    console.print(f"run dir: {cfg.run_dir}  (metrics.jsonl, trajectories.jsonl, checkpoints/)")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
