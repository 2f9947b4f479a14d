"""report_to: metrics.jsonl always, plus TensorBoard / wandb (offline) / trackio (local), each read back with
the tracker's own files; a tracker whose package is missing is refused by the preflight."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from opd_agents.config import parse_config
from opd_agents.errors import ConfigError
from opd_agents.training.tracking import MetricsLog, WandbTracker, check_report_to
from tests.test_preflight import run_config, train_refuses

ROWS = [{"step": 0, "eval/success_rate": 0.25}, {"step": 1, "loss": 2.0, "note": "text"}, {"step": 2, "loss": 1.5}]


def log_rows(run_dir: Path, report_to: list[str], rows: list[dict[str, Any]], purge_step: int | None = None) -> None:
    log = MetricsLog(run_dir, report_to, config={"seed": 7})
    log.purge_step = purge_step
    for row in rows:
        log.write(row)
    log.close()


def test_report_to_takes_what_transformers_takes() -> None:
    assert parse_config({}).report_to == []
    assert parse_config({"report_to": "none"}).report_to == []
    assert parse_config({"report_to": "wandb"}).report_to == ["wandb"]
    assert parse_config({"report_to": ["tensorboard", "trackio"]}).report_to == ["tensorboard", "trackio"]
    with pytest.raises(ConfigError, match="unknown tracker 'mlflow'; allowed: tensorboard, wandb, trackio, none"):
        parse_config({"report_to": ["wandb", "mlflow"]})


def test_metrics_jsonl_alone(tmp_path: Path) -> None:
    log_rows(tmp_path, [], ROWS)
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == ROWS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_missing_package_refused_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(WandbTracker, "module", "wandb_is_not_installed")
    with pytest.raises(ConfigError, match=r"report_to: wandb needs .* pip install 'opd-agents\[wandb\]'"):
        check_report_to(["tensorboard", "wandb"])
    # The CLI: one line, exit 2, no run dir; it comes before the model check (this model path does not exist).
    cfg = run_config(tmp_path, tmp_path / "no-model", report_to=["wandb"])
    assert "opd-agents[wandb]" in train_refuses(tmp_path, cfg, monkeypatch)


def test_tensorboard_and_resume_purge(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_rows(tmp_path, ["tensorboard"], ROWS)
    # A resume from the step-1 checkpoint redoes step 2: the earlier step 2 is purged, not shown twice.
    log_rows(tmp_path, ["tensorboard"], [{"step": 2, "loss": 1.25}, {"step": 3, "loss": 1.0}], purge_step=2)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 2.0), (2, 1.25), (3, 1.0)]
    assert [(e.step, e.value) for e in events.Scalars("eval/success_rate")] == [(0, 0.25)]
    assert "note" not in events.Tags()["scalars"]


def wandb_records(path: Path) -> Iterator[Any]:
    """The records of a .wandb transaction log (LevelDB log format: 32 KiB blocks of checksum, length, type
    headers; wandb no longer ships a Python reader). Parsed with wandb's own protobuf."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        length, kind = struct.unpack_from("<HB", data, pos + 4) if left >= 7 else (0, 0)
        if kind == 0:  # block padding
            pos += left
            continue
        if pos + 7 + length > len(data):  # a record still being written
            return
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST piece of a record
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def test_wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_PROJECT": "opd-test"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("WANDB_DIR", raising=False)  # the default: inside the run dir
    run_dir = tmp_path / "my-run"
    run_dir.mkdir()
    log_rows(run_dir, ["wandb"], ROWS)
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    (run_file,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    deadline = time.monotonic() + 60  # finish() returns before wandb-core has written the last records
    while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(run_file)):
        assert time.monotonic() < deadline, "wandb never wrote the run's exit record"
        time.sleep(0.2)
    history, config, run = [], {}, None
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history.append({k: v for k, v in items.items() if not k.startswith("_") or k == "_step"})
        elif kind in ("run", "config"):  # the config comes with the run record, updates in config records
            run = record.run if kind == "run" else run
            update = record.run.config.update if kind == "run" else record.config.update
            config.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in update})
    assert history == [{"_step": 0, "eval/success_rate": 0.25}, {"_step": 1, "loss": 2}, {"_step": 2, "loss": 1.5}]
    assert config["seed"] == 7 and run is not None
    assert (run.run_id, run.display_name, run.project) == (run_id, "my-run", "opd-test")
    # A resume continues the same wandb run; a new run in the same dir starts another.
    log_rows(run_dir, ["wandb"], [{"step": 3, "loss": 1.0}], purge_step=3)
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id
    log_rows(run_dir, ["wandb"], ROWS[:1])
    assert (run_dir / "wandb_run_id").read_text().strip() != run_id


def test_trackio_local(tmp_path: Path) -> None:
    # trackio reads TRACKIO_DIR when imported: a fresh interpreter keeps the user's store untouched.
    script = f"""
import json
from pathlib import Path
from opd_agents.training.tracking import MetricsLog
log = MetricsLog(Path({str(tmp_path)!r}) / "my-run", ["trackio"], config={{"seed": 7}})
(log.run_dir).mkdir()
for row in {ROWS!r}:
    log.write(row)
log.close()
from trackio.sqlite_storage import SQLiteStorage
logs = SQLiteStorage.get_logs("opd-test", "my-run")
print("LOGS", json.dumps([{{k: v for k, v in r.items() if k != "timestamp"}} for r in logs]))
"""
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "TRACKIO_PROJECT": "opd-test"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    logs = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("LOGS "))[5:])
    assert [{k: v for k, v in r.items() if not k.startswith("system/")} for r in logs] == [
        {"eval/success_rate": 0.25, "step": 0}, {"loss": 2.0, "step": 1}, {"loss": 1.5, "step": 2}]
    assert (tmp_path / "trackio" / "opd-test.db").is_file()
