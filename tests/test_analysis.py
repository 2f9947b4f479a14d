"""Analysis API, replay, export and re-scoring of stored trajectories."""

from __future__ import annotations

import json
import math
from pathlib import Path
import pytest
from typer.testing import CliRunner

from opd_agents.analysis.trajectories import (
    TrajectoryFilter, iter_filtered, iter_turns, ratio_rgb, to_pandas, trajectory_record,
)
from opd_agents import cli
from opd_agents.cli import app
from opd_agents.analysis.export import SCHEMAS, export_hf, export_parquet
from opd_agents.analysis.replay import TokenDecoder, token_text
from opd_agents.store import ReadIssue, read_trajectories, write_trajectories
from opd_agents.types import ErrorType, Message, StopReason, ToolCall, ToolResult, Trajectory, Turn

runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rich wraps at 80 columns off a terminal; wide output keeps the asserted lines whole."""
    monkeypatch.setattr(cli.console, "_width", 200)


def make_turn(index: int, sampling: list[float], teacher: list[float] | None, error: ErrorType | None = None,
              ids: list[int] | None = None) -> Turn:
    ids = ids if ids is not None else [100 + index * 10 + i for i in range(len(sampling))]
    return Turn(index=index, token_ids=ids, sampling_logprobs=sampling, teacher_logprobs=teacher, text=f"turn {index}",
                finish="tool_call", observation_ids=[7, 8], weight=1.0 - 0.25 * index,
                tool_calls=[ToolCall(id=f"c{index}", name="calculator", arguments={"expr": "1+1"})],
                tool_results=[ToolResult(call_id=f"c{index}", name="calculator",
                                         content="Tool execution failed: ZeroDivisionError" if error else "2",
                                         error_type=error)])


def make_traj(tid: str, reward: float, turns: list[Turn], stop: StopReason = StopReason.completed,
              env: str = "opd_agents/Arithmetic-v0") -> Trajectory:
    return Trajectory(id=tid, env_id=env, task_id=f"task-{tid}", seed=len(tid), prompt_ids=[1, 2, 3],
                      messages=[Message(role="system", content="sys"), Message(role="user", content="1+1?")],
                      turns=turns, reward=reward, success=reward > 0.5, terminated=stop == StopReason.completed,
                      truncated=stop != StopReason.completed, stop_reason=stop, teacher_id="teacher-x")


def sample_trajs() -> list[Trajectory]:
    """a: clean, scored (d = 0.5, 0.25); b: execution error at turn 1, d grows to 2.0; c: unscored,
    parse error at turn 0, other env; d: no turns."""
    return [
        make_traj("a", 1.0, [make_turn(0, [-1.0, -2.0], [-0.5, -2.5]), make_turn(1, [-1.0], [-1.25])]),
        make_traj("b", 0.0, [make_turn(0, [-1.0], [-1.5]), make_turn(1, [-1.0], [-2.0], ErrorType.execution_failed),
                             make_turn(2, [-0.5, -0.5], [-2.5, -2.5])], StopReason.max_turns),
        make_traj("c", 0.2, [make_turn(0, [-1.0], None, ErrorType.parse_error)], StopReason.parse_error,
                  env="opd_agents/Retrieval-v0"),
        make_traj("d", 0.0, [], StopReason.max_tokens),
    ]


@pytest.fixture()
def traj_file(tmp_path: Path) -> Path:
    path = tmp_path / "trajs.jsonl"
    write_trajectories(path, sample_trajs())
    return path


@pytest.mark.parametrize(("flt", "expected"), [
    (TrajectoryFilter(), ["a", "b", "c", "d"]),
    (TrajectoryFilter(env="opd_agents/Retrieval-v0"), ["c"]),
    (TrajectoryFilter(min_reward=0.1), ["a", "c"]),
    (TrajectoryFilter(max_reward=0.2), ["b", "c", "d"]),
    (TrajectoryFilter(stop_reasons=["max_turns", StopReason.parse_error]), ["b", "c"]),
    (TrajectoryFilter(stop_reasons="completed"), ["a"]),
    (TrajectoryFilter(has_tool_error=True), ["b", "c"]),
    (TrajectoryFilter(has_tool_error=False), ["a", "d"]),
    (TrajectoryFilter(first_error_turn=1), ["b"]),
    (TrajectoryFilter(min_divergence=0.5), ["a", "b"]),
    (TrajectoryFilter(min_divergence=1.0), ["b"]),
    (TrajectoryFilter(ids=["d", "a"], max_reward=0.5), ["d"]),
])
def test_filter(traj_file: Path, flt: TrajectoryFilter, expected: list[str]) -> None:
    assert [t.id for t in iter_filtered(traj_file, flt)] == expected


def test_turn_records_and_divergence(traj_file: Path) -> None:
    rows = list(iter_turns(iter_filtered(traj_file)))
    assert [(r["trajectory_id"], r["turn"]) for r in rows] == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("b", 2),
                                                               ("c", 0)]
    b2 = rows[4]
    assert b2["divergence"] == pytest.approx(2.0) and b2["after_error"] and b2["first_error_turn"] == 1
    assert rows[3]["error_types"] == ["execution_failed"] and not rows[3]["after_error"]
    assert rows[0]["divergence"] == pytest.approx(0.5) and rows[0]["token_ids"] == [100, 101]
    assert rows[5]["divergence"] is None and rows[5]["teacher_logprobs"] is None
    assert rows[1]["weight"] == 0.75 and rows[1]["tool_calls"] == ["calculator"]


def test_to_pandas(traj_file: Path) -> None:
    df = to_pandas(traj_file)
    assert list(df["id"]) == ["a", "b", "c", "d"] and "token_ids" not in df.columns
    assert list(df["num_tool_errors"]) == [0, 1, 1, 0]
    assert df.set_index("id").loc["b", "max_divergence"] == pytest.approx(2.0)
    turns = to_pandas(read_trajectories(traj_file), level="turn", tokens=True, flt=TrajectoryFilter(ids=["b"]))
    assert len(turns) == 3 and turns["sampling_logprobs"].iloc[2] == [-0.5, -0.5]
    with pytest.raises(ValueError, match="level"):
        to_pandas(traj_file, level="token")  # type: ignore[arg-type]


def test_export_schemas_match_records() -> None:
    traj = sample_trajs()[1]
    assert SCHEMAS["trajectory"].names == list(trajectory_record(traj))
    assert SCHEMAS["turn"].names == list(next(iter_turns([traj])))


@pytest.mark.parametrize("level", ["trajectory", "turn"])
def test_parquet_round_trip(traj_file: Path, tmp_path: Path, level: str) -> None:
    import pyarrow.parquet as pq

    out = tmp_path / "out.parquet"
    result = runner.invoke(app, ["export", str(traj_file), "--format", "parquet", "--out", str(out), "--level", level])
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    originals = read_trajectories(traj_file)
    if level == "trajectory":
        assert table.num_rows == 4
        rows = table.to_pylist()
        for row, traj in zip(rows, originals, strict=True):
            assert (row["id"], row["reward"], row["stop_reason"]) == (traj.id, traj.reward, traj.stop_reason.value)
            assert row["prompt_ids"] == traj.prompt_ids
            assert row["token_ids"] == [t.token_ids for t in traj.turns]
            assert row["sampling_logprobs"] == [t.sampling_logprobs for t in traj.turns]
            assert row["teacher_logprobs"] == [t.teacher_logprobs for t in traj.turns]
            assert row["messages"][1] == {"role": "user", "content": "1+1?", "name": None, "tool_call_id": None}
    else:
        rows = table.to_pylist()
        flat = [(tr.id, t) for tr in originals for t in tr.turns]
        assert len(rows) == len(flat) == 6
        for row, (tid, turn) in zip(rows, flat, strict=True):
            assert (row["trajectory_id"], row["turn"]) == (tid, turn.index)
            assert row["token_ids"] == turn.token_ids and row["sampling_logprobs"] == turn.sampling_logprobs
            assert row["teacher_logprobs"] == turn.teacher_logprobs


def test_hf_round_trip(traj_file: Path, tmp_path: Path) -> None:
    from datasets import load_from_disk

    out = tmp_path / "ds"
    for _ in range(2):  # the second export replaces the first
        assert export_hf(traj_file, out, level="turn") == 6
    ds = load_from_disk(str(out))
    originals = [(tr, t) for tr in read_trajectories(traj_file) for t in tr.turns]
    assert ds["trajectory_id"] == [tr.id for tr, _ in originals]
    assert ds["reward"] == [tr.reward for tr, _ in originals]
    assert ds["token_ids"] == [t.token_ids for _, t in originals]
    assert ds["teacher_logprobs"] == [t.teacher_logprobs for _, t in originals]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not a saved dataset"):
        export_hf(traj_file, tmp_path / "other")


def _corrupt(path: Path) -> None:
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = '{"schema_version": 1, "id": "torn\n'
    path.write_text("".join(lines) + lines[0][:40])  # a garbled line 2 and a torn last line 5


def test_corrupt_lines_reported_and_skipped(traj_file: Path, tmp_path: Path) -> None:
    _corrupt(traj_file)
    result = runner.invoke(app, ["replay", str(traj_file), "--no-tokens"])
    assert result.exit_code == 0
    assert f"{traj_file}:2: invalid JSON" in result.stderr and f"{traj_file}:5:" in result.stderr
    assert "task-a" in result.stdout and "task-c" in result.stdout and "task-b" not in result.stdout
    issues: list[ReadIssue] = []
    assert export_parquet(traj_file, tmp_path / "x.parquet", on_error=issues.append) == 3
    assert [i.line for i in issues] == [2, 5]
    for fmt, out in (("parquet", tmp_path / "y.parquet"), ("hf", tmp_path / "ds")):
        result = runner.invoke(app, ["export", str(traj_file), "--format", fmt, "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert f"{traj_file}:2:" in result.stderr and "exported 3 trajectory rows" in result.stdout


@pytest.mark.parametrize("command", [["replay"], ["export", "--out", "OUT/x.parquet"], ["export", "--format", "hf",
                                                                                        "--out", "OUT/ds"]])
def test_newer_schema_refused(tmp_path: Path, command: list[str]) -> None:
    path = tmp_path / "new.jsonl"
    record = json.loads(sample_trajs()[0].model_dump_json())
    path.write_text(json.dumps(record) + "\n" + json.dumps({**record, "schema_version": 99}) + "\n")
    args = [a.replace("OUT", str(tmp_path)) for a in command]
    result = runner.invoke(app, [args[0], str(path), *args[1:]])
    assert result.exit_code == 2
    errors = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{path}:2:" in errors[0] and "schema_version 99 is newer" in errors[0]
    assert not (tmp_path / "x.parquet").exists() and not (tmp_path / "ds").exists()


def test_replay_shows_turns_errors_and_filters(traj_file: Path) -> None:
    result = runner.invoke(app, ["replay", str(traj_file), "--has-tool-error", "--no-tokens"])
    out = result.stdout
    assert result.exit_code == 0 and "task-a" not in out and "task-d" not in out
    assert "task-b" in out and "reward 0 failed  stop max_turns  3 turns  4 tokens" in out
    assert "[execution_failed] calculator: Tool execution failed: ZeroDivisionError" in out
    assert "turn 2  finish tool_call  2 tokens  d_k 2.000  weight 0.5" in out
    assert '→ call calculator({"expr": "1+1"})' in out
    assert "[parse_error]" in out
    limited = runner.invoke(app, ["replay", str(traj_file), "--limit", "1", "--no-tokens"]).stdout
    assert "task-a" in limited and "task-b" not in limited
    none = runner.invoke(app, ["replay", str(traj_file), "--min-reward", "5"])
    assert none.exit_code == 0 and "no trajectory matched" in none.stdout
    bad = runner.invoke(app, ["replay", str(traj_file), "--stop-reason", "bogus"])
    assert bad.exit_code == 2 and "unknown --stop-reason bogus" in bad.stdout


def test_replay_token_colours(tmp_path: Path, smollm2_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir).encode(" The answer is 42")
    sampling = [-1.0] * len(ids)
    teacher = [-1.0 + 2.0 * (i % 2) - 4.0 * (i == 0) for i in range(len(ids))]  # -5, +1, -1, +1, ...
    turn = make_turn(0, sampling, teacher, ids=ids)
    text = token_text(turn, TokenDecoder(smollm2_tokenizer_dir))
    assert text is not None and text.plain == " The answer is 42"
    styles = [str(s.style) for s in text.spans]
    assert styles[0] == "black on rgb(255,0,0)"  # ratio -4: saturated red
    assert styles[1] == "black on rgb(0,255,0)"  # ratio +2: saturated green
    assert styles[2] == "black on rgb(255,255,255)"  # ratio 0
    path = tmp_path / "t.jsonl"
    write_trajectories(path, [make_traj("tok", 1.0, [turn])])
    shown = runner.invoke(app, ["replay", str(path), "--tokenizer", str(smollm2_tokenizer_dir)]).stdout
    assert "log π_T − log π_S" in shown and " The answer is 42" in shown
    fallback = runner.invoke(app, ["replay", str(path), "--tokenizer", str(tmp_path / "missing")]).stdout
    assert "token view off" in fallback and "turn 0" in fallback and "log π_T − log π_S" not in fallback


def test_ratio_rgb_scale() -> None:
    assert ratio_rgb(0.0) == (255, 255, 255)
    assert ratio_rgb(1.0) == (128, 255, 128) and ratio_rgb(-1.0) == (255, 128, 128)
    assert ratio_rgb(-50.0) == (255, 0, 0) and ratio_rgb(math.inf) == (0, 255, 0)


# ---- re-scoring with another teacher -----------------------------------------------------------------
@pytest.fixture(scope="module")
def rolled_out(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from opd_agents.types import SamplingParams
    from tests.test_rollout import make_rollout

    rollout, _, _ = make_rollout(tiny_model_dir, {"max_turns": 2}, SamplingParams(max_tokens_per_turn=12, seed=0),
                                 batch_size=3)
    trajs = rollout.run([0, 1, 2])
    for t in trajs:
        for turn in t.turns:
            turn.divergence = 99.0  # stale value from an "old teacher": must be recomputed
    path = tmp_path_factory.mktemp("score") / "trajs.jsonl"
    write_trajectories(path, trajs)
    return path


def test_score_with_another_teacher(rolled_out: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    from opd_agents.teacher import make_teacher

    before = rolled_out.read_bytes()
    out = tmp_path / "rescored.jsonl"
    result = runner.invoke(app, ["score", str(rolled_out), "--teacher", str(tiny_model_dir), "--out", str(out),
                                 "--top-k", "3", "--batch-size", "2", "--student", str(tiny_model_dir)])
    assert result.exit_code == 0, result.output
    assert "re-scored 3 trajectories" in result.stdout
    assert rolled_out.read_bytes() == before
    originals, rescored = read_trajectories(rolled_out), read_trajectories(out)
    assert [t.id for t in rescored] == [t.id for t in originals]
    with make_teacher({"model": str(tiny_model_dir)}) as teacher:
        topk = teacher.score(originals, top_k=3)
    for orig, new, s in zip(originals, rescored, topk, strict=True):
        assert new.teacher_id == str(tiny_model_dir) and len(new.turns) == len(orig.turns) == 2
        for k, (o, n) in enumerate(zip(orig.turns, new.turns, strict=True)):
            assert n.token_ids == o.token_ids and n.sampling_logprobs == o.sampling_logprobs
            # The teacher is the sampling model itself: its logprobs reproduce the sampling ones, d_k ~ 0.
            assert max(abs(a - b) for a, b in zip(n.teacher_logprobs, o.sampling_logprobs, strict=True)) <= 1e-4
            assert n.divergence == pytest.approx(
                sum(abs(a - b) for a, b in zip(n.teacher_logprobs, n.sampling_logprobs, strict=True)) / len(n.token_ids))
            assert n.divergence <= 1e-4 and o.divergence == 99.0
            mass = [sum(math.exp(lp) for lp in pos) for pos in s.topk_logprobs[k]]
            assert n.metrics["teacher_topk_mass"] == pytest.approx(sum(mass) / len(mass))


def test_score_refuses_to_overwrite_its_input(rolled_out: Path, tmp_path: Path) -> None:
    before = rolled_out.read_bytes()
    link = tmp_path / "link.jsonl"
    link.symlink_to(rolled_out)
    for out in (rolled_out, link):
        result = runner.invoke(app, ["score", str(rolled_out), "--teacher", "nope", "--out", str(out)])
        assert result.exit_code == 2 and "is the input file itself" in result.stdout
    assert rolled_out.read_bytes() == before


def test_score_failure_leaves_no_partial_output(rolled_out: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    result = runner.invoke(app, ["score", str(rolled_out), "--teacher", str(tmp_path / "no-model"), "--out", str(out)])
    assert result.exit_code == 2 and "error:" in result.stdout
    assert not out.exists() and list(tmp_path.iterdir()) == []
