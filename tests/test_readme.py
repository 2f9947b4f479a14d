"""The README's examples run as written (a newcomer's first attempt must succeed)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(section: str) -> list[str]:
    text = README.read_text()
    body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, re.S)


def test_define_your_own_environment_example_runs(tmp_path: Path, monkeypatch: Any, tiny_model_dir: Path) -> None:
    define, play = python_blocks("Define your own environment")[:2]  # then the adapters' (their own tests)
    out = io.StringIO()
    namespace: dict[str, Any] = {}
    with contextlib.redirect_stdout(out):
        exec(compile(define, "README:define", "exec"), namespace)
    assert out.getvalue().splitlines() == [
        "What is the capital of Japan? Finish with 'Answer: <city>'.", "Tokyo None", "1.0 True completed"]

    # The model-playing block, with the built-in model swapped for the tiny one (speed) and run in tmp.
    monkeypatch.chdir(tmp_path)
    exec(compile(play.replace('"smollm2-135m-instruct"', repr(str(tiny_model_dir))), "README:play", "exec"),
         namespace)
    trajs = namespace["trajectories"]
    assert len(trajs) == 8 and all(t.env_id == "custom" and t.turns for t in trajs)
    assert (tmp_path / "runs" / "capitals.jsonl").read_text().count("\n") == 8


def test_analysis_api_example_runs(tmp_path: Path, tiny_model_dir: Path) -> None:
    from opd_agents.training.divergence import annotate_turns
    from opd_agents.store import write_trajectories
    from opd_agents.teacher import HFTeacher
    from opd_agents.types import ErrorType, ToolResult
    from tests.test_rollout import make_rollout
    from opd_agents.types import SamplingParams

    rollout, _, _ = make_rollout(tiny_model_dir, {"max_turns": 3}, SamplingParams(max_tokens_per_turn=16, seed=0))
    trajs = rollout.run([0, 1, 2])
    HFTeacher(tiny_model_dir).score_and_apply(trajs)
    trajs[0].turns[0].tool_results.append(ToolResult(content="formatting issue", error_type=ErrorType.parse_error))
    for t in trajs:
        annotate_turns(t)
    path = tmp_path / "scored.jsonl"
    write_trajectories(path, trajs)

    (block,) = python_blocks("Replay and analysis")
    block = block.replace("runs/quickstart/trajectories.jsonl", str(path)).replace("min_divergence=0.5",
                                                                                   "min_divergence=0.0")
    out = io.StringIO()
    namespace: dict[str, Any] = {}
    with contextlib.redirect_stdout(out):
        exec(compile(block, "README:analysis", "exec"), namespace)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("0 ") and "parse_error" in lines[0]  # turn 0 of the failing trajectory
    assert list(namespace["turns"]["turn"].unique()) == [0, 1, 2]


def _blocks(subsection: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced block of a README ``### subsection``, in order."""
    body = README.read_text().split(f"### {subsection}", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", body, re.S)


@pytest.mark.slow
def test_your_env_from_the_command_line_runs_as_written(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The newcomer path in a fresh directory: module, gymnasium check, CLI rollouts (expert and model), a
    2-step training, replay — the README's blocks in order, the built-in model swapped for the tiny one."""
    cli = Path(sys.executable).with_name("opd-agents")  # the console script, as a user runs it
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    outputs = []
    for lang, code in _blocks("Your env from the command line, end to end"):
        code = code.replace("smollm2-135m-instruct", str(tiny_model_dir))
        if lang in ("python", "yaml"):  # a file: its first line names it
            (tmp_path / code.splitlines()[0].removeprefix("# ").split(":")[0]).write_text(code)
            continue
        for line in code.splitlines():
            argv = line.split("  #")[0].split()
            argv = [sys.executable if a == "python" else str(cli) if a == "opd-agents" else a for a in argv]
            proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, f"{line}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
            outputs.append(proc.stdout)
    assert outputs[0].strip() == "ok"
    expert = [json.loads(x) for x in (tmp_path / "runs" / "capitals-expert.jsonl").read_text().splitlines()]
    assert len(expert) == 4 and all(t["success"] and len(t["turns"]) == 2 for t in expert)
    played = [json.loads(x) for x in (tmp_path / "runs" / "capitals.jsonl").read_text().splitlines()]
    assert len(played) == 4 and all(t["turns"] and t["split"] == "heldout" for t in played)
    metrics = [json.loads(x) for x in (tmp_path / "runs" / "capitals-smoke" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and not any(k.startswith("eval/") for m in metrics for k in m)
    assert "capital" in outputs[-1].lower()  # replay shows the episode
