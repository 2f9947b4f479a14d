"""JSONL trajectory store: one ``Trajectory`` per line, appended whole, read back as a stream.

Writing: every record is one ``os.write`` of the complete line on an ``O_APPEND`` descriptor, so
concurrent writers never interleave and a killed writer can at worst leave a torn *last* line. Reading:
line by line (the file is never loaded whole); a corrupt or truncated line is reported as
``file:line: reason`` and skipped. Only a record from a newer schema stops reading, because guessing at
its meaning could silently corrupt training data.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import pydantic

from opd_agents.errors import TrajectoryFileError
from opd_agents.env.tool import format_validation_error, shorten
from opd_agents.types import SCHEMA_VERSION, Trajectory

MIN_SCHEMA_VERSION = 1
# _MIGRATIONS[v] turns a version-v record into a version-(v+1) record. Empty while only v1 exists.
_MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


class TrajectoryReadWarning(UserWarning):
    """A line of a trajectory file was skipped (the default report of ``iter_trajectories``)."""


@dataclass(frozen=True)
class ReadIssue:
    """One skipped line: where it is and why."""

    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


def _warn(issue: ReadIssue) -> None:
    warnings.warn(str(issue), TrajectoryReadWarning, stacklevel=3)


def migrate(record: dict[str, Any]) -> dict[str, Any]:
    """Bring a record up to ``SCHEMA_VERSION``; a version this code cannot read raises TrajectoryFileError."""
    version = record["schema_version"]
    if version > SCHEMA_VERSION:
        raise TrajectoryFileError(f"trajectory schema_version {version} is newer than this opd-agents supports "
                                  f"({SCHEMA_VERSION}); upgrade opd-agents to read this file")
    if version < MIN_SCHEMA_VERSION:
        raise TrajectoryFileError(f"schema_version {version} is not a valid trajectory schema "
                                  f"(supported: {MIN_SCHEMA_VERSION}..{SCHEMA_VERSION})")
    while version < SCHEMA_VERSION:
        record = _MIGRATIONS[version](record)
        version = record["schema_version"] = version + 1
    return record


# ---- writing --------------------------------------------------------------------------------------
class TrajectoryWriter:
    """Appends trajectories to a JSONL file; use as a context manager (fsyncs on flush and close)."""

    def __init__(self, path: str | os.PathLike[str], *, fsync_each: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fsync_each = fsync_each
        self.count = 0
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        # A writer killed mid-line left a torn tail: end it, so our first record starts on its own line
        # (the torn line is then reported by the reader instead of swallowing our record too).
        try:
            if not _ends_with_newline(self.path):
                os.write(self._fd, b"\n")
        except BaseException:
            self.close()
            raise

    def write(self, traj: Trajectory) -> None:
        if self._fd is None:
            raise ValueError(f"TrajectoryWriter for {self.path} is closed")
        data = (traj.model_dump_json() + "\n").encode("utf-8")
        written = os.write(self._fd, data)
        if written != len(data):  # only on a full disk; the reader reports the torn line
            raise OSError(f"short write to {self.path}: {written} of {len(data)} bytes (disk full?)")
        self.count += 1
        if self.fsync_each:
            os.fsync(self._fd)

    def write_many(self, trajs: Iterable[Trajectory]) -> None:
        for t in trajs:
            self.write(t)

    def flush(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> TrajectoryWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def write_trajectories(path: str | os.PathLike[str], trajs: Iterable[Trajectory], *, append: bool = False) -> int:
    """Write a whole file atomically (temp file + rename), or append to it; returns the record count."""
    path = Path(path)
    if append:
        with TrajectoryWriter(path) as w:
            w.write_many(trajs)
            return w.count
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it private; match what the appending writer creates
        with TrajectoryWriter(tmp) as w:
            w.write_many(trajs)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return w.count


# ---- reading --------------------------------------------------------------------------------------
def iter_trajectories(
    path: str | os.PathLike[str], *, on_error: Callable[[ReadIssue], None] | None = None
) -> Iterator[Trajectory]:
    """Stream the trajectories of a JSONL file. Bad lines go to ``on_error`` (default: a
    ``TrajectoryReadWarning``) and are skipped; a newer schema raises ``TrajectoryFileError``."""
    report = on_error or _warn
    name = str(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield _parse_line(raw, name, lineno)
            except _BadLine as e:
                report(ReadIssue(name, lineno, str(e)))


class _BadLine(Exception):
    """A line that is skipped and reported (never escapes this module)."""


def _parse_line(raw: bytes, name: str, lineno: int) -> Trajectory:
    torn = "" if raw.endswith(b"\n") else " (truncated last line: no newline at end of file)"
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _BadLine(f"invalid JSON: {shorten(str(e), 120)}{torn}") from None
    if not isinstance(record, dict):
        raise _BadLine(f"expected a JSON object, got {type(record).__name__}")
    version = record.get("schema_version")
    if type(version) is not int:
        raise _BadLine(f"missing or non-integer schema_version: {shorten(repr(version), 40)}")
    try:
        record = migrate(record)
    except TrajectoryFileError as e:
        raise TrajectoryFileError(f"{name}:{lineno}: {e}") from None
    try:
        return Trajectory.model_validate(record)
    except pydantic.ValidationError as e:
        raise _BadLine(f"invalid trajectory: {format_validation_error(e, 200)}") from None


def read_trajectories(
    path: str | os.PathLike[str], *, on_error: Callable[[ReadIssue], None] | None = None
) -> list[Trajectory]:
    return list(iter_trajectories(path, on_error=on_error))
