"""The metrics stream of a run: ``metrics.jsonl`` (always) plus the experiment trackers ``report_to`` names.

One class per tracker in ``TRACKERS`` (tensorboard, wandb, trackio), each importing its package only when a
run asks for it; ``check_report_to`` (the trainer's preflight) refuses a tracker whose package is missing
before any work, naming the extra to install. Only rank 0 writes metrics (``Trainer._log``), so trackers only
start there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from opd_agents.errors import ConfigError

PROJECT = "opd-agents"  # wandb / trackio project unless WANDB_PROJECT / TRACKIO_PROJECT says otherwise


class Tracker:
    """One experiment tracker. ``resume_step``: the first step a resumed run logs again (None: a new run)."""

    name: ClassVar[str]
    module: ClassVar[str]  # the package it imports; the pip extra has the tracker's name

    def __init__(self, run_dir: Path, config: dict[str, Any], resume_step: int | None) -> None:
        raise NotImplementedError

    def log(self, scalars: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


TRACKERS: dict[str, type[Tracker]] = {}


def register(cls: type[Tracker]) -> type[Tracker]:
    TRACKERS[cls.name] = cls
    return cls


@register
class TensorBoardTracker(Tracker):
    """Event files in RUN_DIR/tensorboard; a resumed run purges the earlier files' steps >= the resume step
    (they are redone and logged again)."""

    name, module = "tensorboard", "tensorboard"

    def __init__(self, run_dir: Path, config: dict[str, Any], resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


@register
class WandbTracker(Tracker):
    """A wandb run named after the run dir, files under RUN_DIR/wandb (or WANDB_DIR); WANDB_MODE=offline
    works as usual. A resumed run continues the same wandb run (its id is kept in RUN_DIR/wandb_run_id);
    wandb ignores steps it already has, so steps redone after a resume keep their first values there."""

    name, module = "wandb", "wandb"

    def __init__(self, run_dir: Path, config: dict[str, Any], resume_step: int | None) -> None:
        import wandb

        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if resume_step is not None and id_file.is_file() else None
        if run_id is None:  # a new run (a run dir used again starts a new wandb run too)
            run_id = uuid.uuid4().hex[:12]
            id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=run_dir.name, id=run_id,
                              resume="allow", config=config, dir=os.environ.get("WANDB_DIR", str(run_dir)))

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


@register
class TrackioTracker(Tracker):
    """A trackio run named after the run dir, stored locally (TRACKIO_DIR, by default the Hugging Face cache;
    ``trackio show`` opens the dashboard). A resumed run continues the run of that name."""

    name, module = "trackio", "trackio"

    def __init__(self, run_dir: Path, config: dict[str, Any], resume_step: int | None) -> None:
        import trackio

        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", PROJECT), name=run_dir.name,
                                config=config, resume="never" if resume_step is None else "allow")

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


def tracker_names(value: str | Sequence[str] | None) -> list[str]:
    """``report_to`` as transformers' TrainingArguments takes it: a name, a list of names, or "none"."""
    names = [value] if isinstance(value, str) else list(value or [])
    names = [n for n in names if n != "none"]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ValueError(f"unknown tracker {', '.join(map(repr, unknown))}; allowed: {', '.join(TRACKERS)}, none")
    return list(dict.fromkeys(names))


def check_report_to(names: Sequence[str]) -> None:
    """Every tracker in ``names`` (validated names, see ``tracker_names``) has its package installed (looked
    up, not imported: importing wandb alone takes seconds)."""
    for name in names:
        if importlib.util.find_spec(TRACKERS[name].module) is None:
            raise ConfigError(f"report_to: {name} needs the {TRACKERS[name].module!r} package: "
                              f"pip install 'opd-agents[{name}]' (or remove {name} from report_to)")


class MetricsLog:
    """metrics.jsonl in the run dir, and every tracker of ``report_to`` (opened at the first row, so a
    resume has set ``purge_step`` by then)."""

    def __init__(self, run_dir: Path, report_to: Sequence[str] = (), config: dict[str, Any] | None = None) -> None:
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self.report_to = list(report_to)
        self.config = config or {}
        # Set on resume: the first step logged again (TensorBoard drops the earlier event files' steps >= it).
        self.purge_step: int | None = None
        self.trackers: list[Tracker] | None = None

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.trackers is None:
            self.trackers = [TRACKERS[n](self.run_dir, self.config, self.purge_step) for n in self.report_to]
        scalars = {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        for tracker in self.trackers:
            tracker.log(scalars, int(row.get("step", 0)))

    def close(self) -> None:
        """Flush and end the trackers' runs (the end of training)."""
        for tracker in self.trackers or []:
            tracker.close()
        self.trackers = None
