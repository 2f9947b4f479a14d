"""The README's examples run as written (a newcomer's first attempt must succeed)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Any

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
