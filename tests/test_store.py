from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import pytest

from opd_agents.errors import TrajectoryFileError
from opd_agents.store import (
    ReadIssue,
    TrajectoryReadWarning,
    TrajectoryWriter,
    iter_trajectories,
    migrate,
    read_trajectories,
    write_trajectories,
)
from opd_agents.types import SCHEMA_VERSION, ErrorType, Message, StopReason, ToolCall, ToolResult, Trajectory, Turn


def make_traj(i: int) -> Trajectory:
    return Trajectory(
        env_id="opd_agents/Arithmetic-v0", task_id=f"task-{i}", seed=i,
        messages=[Message(role="user", content=f"What is {i}+1? ünïcödé ✓")],
        prompt_ids=[1, 2, 3],
        turns=[Turn(
            index=0, token_ids=[4, 5], sampling_logprobs=[-0.5, -1.25], text="<tool_call>…", finish="tool_call",
            observation_ids=[6], tool_calls=[ToolCall(id="c1", name="add", arguments={"a": i, "b": 1})],
            tool_results=[ToolResult(call_id="c1", name="add", content=str(i + 1)),
                          ToolResult(content="formatting issue: x", error_type=ErrorType.parse_error)],
            teacher_logprobs=[-0.25, -2.0], weight=0.5,
        )],
        reward=1.0, success=True, terminated=True, stop_reason=StopReason.completed, metrics={"t": 0.1},
    )


def collect(path: Path) -> tuple[list[Trajectory], list[ReadIssue]]:
    issues: list[ReadIssue] = []
    return read_trajectories(path, on_error=issues.append), issues


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "trajs.jsonl"
    trajs = [make_traj(i) for i in range(3)]
    with TrajectoryWriter(path) as w:
        w.write_many(trajs)
        assert w.count == 3
    back, issues = collect(path)
    assert back == trajs and issues == []
    assert back[0].turns[0].tool_results[1].error_type is ErrorType.parse_error


def test_writer_appends_across_sessions(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    with TrajectoryWriter(path) as w:
        w.write(make_traj(0))
    with TrajectoryWriter(path) as w:
        w.write(make_traj(1))
    assert [t.task_id for t in read_trajectories(path)] == ["task-0", "task-1"]


def test_each_record_is_one_whole_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[bytes] = []
    fsyncs: list[int] = []
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: (writes.append(bytes(data)), real_write(fd, data))[1])
    monkeypatch.setattr(os, "fsync", lambda fd: fsyncs.append(fd))
    with TrajectoryWriter(tmp_path / "t.jsonl") as w:
        w.write(make_traj(0))
        w.write(make_traj(1))
        assert fsyncs == []  # no fsync per record by default...
        w.flush()
        assert len(fsyncs) == 1  # ...only on flush
    assert len(fsyncs) == 2  # and on close
    assert len(writes) == 2
    assert all(data.endswith(b"\n") and data.count(b"\n") == 1 for data in writes)
    assert Trajectory.model_validate_json(writes[1]).task_id == "task-1"


def test_closed_writer_refuses(tmp_path: Path) -> None:
    w = TrajectoryWriter(tmp_path / "t.jsonl")
    w.close()
    w.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        w.write(make_traj(0))


def test_concurrent_writer_processes_never_interleave(tmp_path: Path) -> None:
    path = tmp_path / "shared.jsonl"
    # Large records (~200 KB) so a non-atomic writer would interleave with the others.
    script = textwrap.dedent(f"""
        import sys
        from opd_agents.store import TrajectoryWriter
        from opd_agents.types import Trajectory
        with TrajectoryWriter({str(path)!r}) as w:
            for i in range(20):
                w.write(Trajectory(env_id="e", task_id=f"{{sys.argv[1]}}-{{i}}", seed=i,
                                   metrics={{f"m{{k}}": float(k) for k in range(8000)}}))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(n)]) for n in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    trajs, issues = collect(path)
    assert issues == []
    assert sorted(t.task_id for t in trajs) == sorted(f"{n}-{i}" for n in range(4) for i in range(20))


def test_corrupt_middle_line_is_reported_and_skipped(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    torn = '{"schema_version": 1, "env_id": "e", "task_id": '
    lines = [make_traj(0).model_dump_json(), torn, make_traj(2).model_dump_json()]
    path.write_text("\n".join(lines) + "\n")
    trajs, issues = collect(path)
    assert [t.task_id for t in trajs] == ["task-0", "task-2"]
    assert len(issues) == 1 and issues[0].line == 2 and issues[0].path == str(path)
    assert str(issues[0]).startswith(f"{path}:2: invalid JSON")


def test_invalid_record_reported_with_field(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    bad_type = make_traj(1).model_dump(mode="json") | {"seed": "not-a-number"}
    unknown = make_traj(2).model_dump(mode="json") | {"surprise": 1}
    path.write_text("\n".join(json.dumps(r) for r in (bad_type, [1, 2], unknown, {"env_id": "e"})) + "\n\n")
    trajs, issues = collect(path)
    assert trajs == []
    assert [i.line for i in issues] == [1, 2, 3, 4]
    assert "invalid trajectory: seed:" in issues[0].reason
    assert issues[1].reason == "expected a JSON object, got list"
    assert "surprise: Extra inputs are not permitted" in issues[2].reason
    assert "schema_version" in issues[3].reason


def test_truncated_last_line(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    write_trajectories(path, [make_traj(0), make_traj(1)])
    with open(path, "ab") as f:  # a writer killed mid-record
        f.write(make_traj(2).model_dump_json().encode()[:57])
    trajs, issues = collect(path)
    assert [t.task_id for t in trajs] == ["task-0", "task-1"]
    assert len(issues) == 1 and issues[0].line == 3 and "truncated last line" in issues[0].reason


def test_writer_after_torn_tail_keeps_new_record_intact(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_bytes(make_traj(0).model_dump_json().encode() + b"\n" + b'{"schema_vers')
    with TrajectoryWriter(path) as w:
        w.write(make_traj(1))
    trajs, issues = collect(path)
    assert [t.task_id for t in trajs] == ["task-0", "task-1"]
    assert [i.line for i in issues] == [2]


def test_default_report_is_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text("garbage\n" + make_traj(0).model_dump_json() + "\n")
    with pytest.warns(TrajectoryReadWarning, match=r"t\.jsonl:1: invalid JSON"):
        trajs = read_trajectories(path)
    assert len(trajs) == 1


def test_newer_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    newer = make_traj(1).model_dump(mode="json") | {"schema_version": SCHEMA_VERSION + 1}
    path.write_text(make_traj(0).model_dump_json() + "\n" + json.dumps(newer) + "\n")
    it = iter_trajectories(path)
    assert next(it).task_id == "task-0"  # records before it are still delivered
    with pytest.raises(TrajectoryFileError) as e:
        next(it)
    msg = str(e.value)
    assert msg.startswith(f"{path}:2:")
    assert f"schema_version {SCHEMA_VERSION + 1}" in msg and f"({SCHEMA_VERSION})" in msg
    assert "upgrade opd-agents" in msg


def test_older_unsupported_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(make_traj(0).model_dump(mode="json") | {"schema_version": 0}) + "\n")
    with pytest.raises(TrajectoryFileError, match=r"t\.jsonl:1: schema_version 0 is not a valid"):
        read_trajectories(path)


def test_migrate_current_version_is_identity() -> None:
    record = make_traj(0).model_dump(mode="json")
    assert migrate(dict(record)) == record
    with pytest.raises(TrajectoryFileError, match="upgrade opd-agents"):
        migrate({"schema_version": SCHEMA_VERSION + 5})


def test_iteration_streams(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        f.write(make_traj(0).model_dump_json() + "\n")
        f.write("x" * 30_000_000 + "\n")  # a 30 MB corrupt line the first read must never touch
    it = iter_trajectories(path, on_error=lambda issue: pytest.fail(f"read too far: {issue}"))
    assert inspect.isgenerator(it)
    tracemalloc.start()
    try:
        first = next(it)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    it.close()
    assert first.task_id == "task-0"
    assert peak < 2_000_000


def test_write_trajectories_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    assert write_trajectories(path, [make_traj(0), make_traj(1)]) == 2
    assert write_trajectories(path, [make_traj(2)]) == 1  # overwrite
    assert write_trajectories(path, [make_traj(3)], append=True) == 1

    def failing() -> object:
        yield make_traj(4)
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        write_trajectories(path, failing())
    assert [t.task_id for t in read_trajectories(path)] == ["task-2", "task-3"]  # old file untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]  # no temp file left behind
    assert path.stat().st_mode & 0o777 == 0o644
