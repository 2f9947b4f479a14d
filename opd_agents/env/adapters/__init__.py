"""Adapters that make other ecosystems' environments ``ToolEnv``s (one module each)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from opd_agents.errors import ConfigError

Rows = Sequence[Mapping[str, Any]]


def load_rows(rows: Rows | str | Path | None, what: str) -> list[Mapping[str, Any]]:
    """A dataset given inline or as a JSONL file; every row needs a ``prompt``. ``what`` names it in errors
    (e.g. "MCP env dataset")."""
    if isinstance(rows, (str, Path)):
        path = Path(rows)
        if not path.is_file():
            raise ConfigError(f"{what}: no such file {path}")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out = list(rows or [])
    if not out or not all(isinstance(r, Mapping) and "prompt" in r for r in out):
        raise ConfigError(f"{what}: needs rows with a 'prompt' (got {len(out)} rows)")
    return out
