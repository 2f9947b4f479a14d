"""TRL ``environment_factory`` classes as opd-agents envs, unchanged.

TRL's GRPOTrainer takes an ``environment_factory``: a class whose public methods are the tools (typed,
Google-style docstrings), whose ``reset(**row)`` gets the dataset row before an episode (and may return an
observation that is appended to the prompt), and whose optional ``get_reward()`` scores the finished
episode. ``TRLEnvironment`` plays such a class with the rows of a dataset (``prompt`` column: a string or
chat messages):

    env = TRLEnvironment(factory=WordleEnv, dataset=[{"prompt": "Guess the word."}, ...])

or, from a config / the CLI (strings resolve to the class and to a JSON-lines file of rows)::

    env: {id: "opd_agents.env.adapters.trl:TRLEnvironment",
          kwargs: {factory: "my_envs:WordleEnv", dataset: data/wordle.jsonl}}

Task seed ``s`` plays row ``s mod len(dataset)`` (held-out seeds use ``eval_dataset`` when given). The
episode ends when the model answers without a tool call; the reward is ``get_reward()`` (0 without it),
and 1.0 counts as success. ``reset`` and ``get_reward`` are never exposed as tools, nor are ``_`` names.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from opd_agents.env.adapters import Rows, load_rows
from opd_agents.env.core import Task, ToolEnv
from opd_agents.env.tool import Tool
from opd_agents.errors import ConfigError

RESERVED = {"reset", "get_reward"}


def _load_factory(factory: Callable[[], Any] | str) -> Callable[[], Any]:
    if not isinstance(factory, str):
        return factory
    module, _, name = factory.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"TRL environment factory {factory!r} not found ({e}); expected 'module:Class'") from e


def _prompt_text(prompt: str | Sequence[Mapping[str, Any]]) -> str:
    """A row's prompt: a string, or chat messages (their user turns)."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(str(m["content"]) for m in prompt if m.get("role") == "user")


class TRLEnvironment(ToolEnv):
    """A TRL ``environment_factory`` class played on a dataset's rows."""

    def __init__(self, factory: Callable[[], Any] | str, dataset: Rows | str | Path,
                 eval_dataset: Rows | str | Path | None = None, system_prompt: str | None = None,
                 **kwargs: Any) -> None:
        self.instance = _load_factory(factory)()
        self.rows = load_rows(dataset, "TRL environment dataset")
        self.eval_rows = load_rows(eval_dataset, "TRL environment eval_dataset") if eval_dataset is not None else self.rows
        if system_prompt is not None:
            self.system_prompt = system_prompt
        super().__init__(**kwargs)

    def bound_tools(self) -> list[Tool]:
        names = [n for n, m in inspect.getmembers(self.instance, inspect.ismethod)
                 if not n.startswith("_") and n not in RESERVED]
        if not names:
            raise ConfigError(f"{type(self.instance).__name__} has no public methods to expose as tools")
        return [Tool(getattr(self.instance, n), name=n) for n in names]

    def generate_task(self, rng: np.random.Generator, seed: int, split: str) -> Task:
        rows = self.eval_rows if split == "heldout" else self.rows
        row = rows[seed % len(rows)]
        prompt = _prompt_text(row["prompt"])
        observation = self.instance.reset(**row) if hasattr(self.instance, "reset") else None
        if isinstance(observation, str) and observation:
            prompt = f"{prompt}\n\n{observation}"
        return Task(id=f"trl-{split}-{seed % len(rows)}", seed=seed, split=split, prompt=prompt, answer="")

    def grade(self, task: Task, answer: str) -> float:
        get_reward = getattr(self.instance, "get_reward", None)
        return float(get_reward()) if callable(get_reward) else 0.0
