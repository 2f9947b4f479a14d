"""Message-level tool environments on top of ``gymnasium.Env``.

``reset`` returns the opening messages, ``step(assistant_text)`` parses tool calls, runs the tools and
returns the observation messages. Token budgets (per turn, total, context) belong to the token adapter
(`opd_agents.rollout.runner`); this layer enforces the message-level limits: turns, tool calls, parse errors.
A subclass only provides ``tools``, ``generate_task``, ``grade`` and (optionally) ``expert_action``.
"""

from __future__ import annotations

import string
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from opd_agents.errors import EnvOrderError
from opd_agents.env.parsers import ParsedTurn, ToolCallParser, get_parser
from opd_agents.env.tool import Tool, ToolBox
from opd_agents.types import ErrorType, Message, StopReason, ToolResult

HELDOUT_SEED_START = 1_000_000  # seeds >= this are held-out tasks; below are training tasks


def split_of_seed(seed: int) -> str:
    return "heldout" if seed >= HELDOUT_SEED_START else "train"


def heldout_seeds(n: int, offset: int = 0) -> list[int]:
    return [HELDOUT_SEED_START + offset + i for i in range(n)]


class TextSpace(gym.spaces.Space[str]):
    """Free text (an assistant message). ``sample`` draws a random printable string."""

    def __init__(self, max_length: int = 4096, seed: int | None = None) -> None:
        super().__init__(shape=None, dtype=None, seed=seed)
        self.max_length = max_length

    def sample(self, mask: Any = None, probability: Any = None) -> str:
        n = int(self.np_random.integers(1, 64))
        chars = list(string.printable)
        return "".join(self.np_random.choice(chars, size=n))

    def contains(self, x: Any) -> bool:
        return isinstance(x, str) and len(x) <= self.max_length

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"TextSpace(max_length={self.max_length})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TextSpace) and other.max_length == self.max_length


class MessagesSpace(gym.spaces.Space[list]):
    """A list of chat messages ``{"role": ..., "content": ...}`` (the observation)."""

    def __init__(self, seed: int | None = None) -> None:
        super().__init__(shape=None, dtype=None, seed=seed)

    def sample(self, mask: Any = None, probability: Any = None) -> list[dict[str, Any]]:
        return [{"role": "user", "content": TextSpace(seed=int(self.np_random.integers(2**31))).sample()}]

    def contains(self, x: Any) -> bool:
        if not isinstance(x, list):
            return False
        try:
            [Message.model_validate(m) for m in x]
        except Exception:  # noqa: BLE001
            return False
        return True

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MessagesSpace)


class Task(BaseModel):
    """One procedurally generated problem. ``reference`` is what a privileged teacher may see."""

    model_config = ConfigDict(extra="forbid")

    id: str
    seed: int
    split: str
    prompt: str
    answer: Any
    reference: str = ""  # worked solution / hint shown only to a privileged-context teacher
    data: dict[str, Any] = Field(default_factory=dict)  # env-specific facts (used by the expert)


class EnvLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_turns: int = Field(8, gt=0)
    max_tool_calls: int = Field(16, gt=0)
    max_consecutive_parse_errors: int = Field(3, gt=0)
    # A longer assistant message is a parse error without being parsed (runaway output; bounds parse time).
    max_message_chars: int = Field(65_536, gt=0)
    parse_error_penalty: float = Field(0.0, ge=0.0)
    # Token-level limits, enforced by the rollout (the env only sees text).
    max_tokens_per_turn: int = Field(256, gt=0)
    max_total_tokens: int = Field(2048, gt=0)
    max_context_tokens: int = Field(4096, gt=0)
    fatal_exceptions: list[str] = Field(default_factory=list)  # exception type names that end an episode


class ToolEnv(gym.Env[list, str]):
    """Base class of every tool environment. Subclass it and fill in the four hooks below."""

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["ansi"]}
    tools: ClassVar[list[Tool]] = []
    system_prompt: ClassVar[str] = "You are a helpful assistant that uses tools to solve tasks."

    def __init__(self, parser: str | ToolCallParser = "hermes", limits: EnvLimits | dict[str, Any] | None = None,
                 render_mode: str | None = None) -> None:
        self.parser = get_parser(parser) if isinstance(parser, str) else parser
        self.limits = limits if isinstance(limits, EnvLimits) else EnvLimits.model_validate(limits or {})
        fatal = tuple(_exception_type(n) for n in self.limits.fatal_exceptions)
        self.toolbox = ToolBox(self.bound_tools(), fatal_exceptions=fatal)
        self.action_space = TextSpace()
        self.observation_space = MessagesSpace()
        self.render_mode = render_mode
        self.task: Task | None = None
        self.history: list[Message] = []
        self._done = True
        self._started = False

    # ---- hooks for subclasses -------------------------------------------------------------------
    def generate_task(self, rng: np.random.Generator, seed: int, split: str) -> Task:
        raise NotImplementedError

    def grade(self, task: Task, answer: str) -> float:
        """Score a final answer in [0, 1]; 1.0 counts as success."""
        raise NotImplementedError

    def expert_action(self, task: Task, history: list[Message]) -> str:
        """The scripted expert's next assistant message (tool calls in this env's format, or the answer)."""
        raise NotImplementedError(f"{type(self).__name__} has no scripted expert")

    def bound_tools(self) -> list[Tool]:
        """Tools of this instance; methods decorated with @tool are bound to self."""
        return [t.__get__(self, type(self)) if _is_method_tool(t) else t for t in self.tools]

    # ---- gymnasium API --------------------------------------------------------------------------
    @property
    def tool_schemas(self) -> list[dict[str, Any]]:
        return self.toolbox.schemas()

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[list, dict]:
        super().reset(seed=seed)
        options = options or {}
        task_seed = seed if seed is not None else int(self.np_random.integers(0, HELDOUT_SEED_START))
        split = options.get("split", split_of_seed(task_seed))
        self.task = self.generate_task(np.random.default_rng(task_seed), task_seed, split)
        self.history = [Message(role="system", content=self.system_prompt),
                        Message(role="user", content=self.task.prompt)]
        self._turns = self._tool_calls = self._parse_streak = 0
        self._done, self._started = False, True
        info = {"task_id": self.task.id, "seed": task_seed, "split": split, "tool_schemas": self.tool_schemas}
        return [m.model_dump(exclude_none=True) for m in self.history], info

    def step(self, action: str) -> tuple[list, float, bool, bool, dict[str, Any]]:
        if not self._started:
            raise EnvOrderError("step() called before reset()")
        if self._done:
            raise EnvOrderError("step() called after the episode ended; call reset()")
        assert self.task is not None
        self._turns += 1
        self.history.append(Message(role="assistant", content=action))
        if len(action) > self.limits.max_message_chars:
            parsed = ParsedTurn(errors=[f"message longer than {self.limits.max_message_chars} characters"])
        else:
            parsed = self.parser.parse(action)
        info: dict[str, Any] = {"tool_calls": parsed.calls, "tool_results": [], "stop_reason": None}

        if parsed.is_final:
            correct = float(self.grade(self.task, action))
            info.update(success=correct >= 1.0, reward_parts={"correct": correct})
            return self._finish([], correct, StopReason.completed, info, terminated=True)

        results: list[ToolResult] = [
            ToolResult(name=None, content=f"formatting issue: {err}", error_type=ErrorType.parse_error)
            for err in parsed.errors
        ]
        room = max(self.limits.max_tool_calls - self._tool_calls, 0)
        self._tool_calls += len(parsed.calls)
        results += self.toolbox.execute(parsed.calls[:room])
        results += [  # every call gets a result, so the trajectory says what became of it
            ToolResult(call_id=c.id, name=c.name, error_type=ErrorType.max_tool_calls,
                       content=f"Not executed: the limit of {self.limits.max_tool_calls} tool calls per episode "
                               "was reached")
            for c in parsed.calls[room:]
        ]
        info["tool_results"] = results
        obs = [Message(role="tool", name=r.name, tool_call_id=r.call_id, content=r.content) for r in results]
        self.history.extend(obs)
        obs_dicts = [m.model_dump(exclude_none=True) for m in obs]

        penalty = self.limits.parse_error_penalty * len(parsed.errors)
        info.update(success=False, reward_parts={"parse_penalty": -penalty})
        self._parse_streak = self._parse_streak + 1 if parsed.errors and not parsed.calls else 0
        if any(r.stop_episode for r in results):
            return self._finish(obs_dicts, -penalty, StopReason.tool_stop, info, terminated=True)
        if self._parse_streak >= self.limits.max_consecutive_parse_errors:
            return self._finish(obs_dicts, -penalty, StopReason.parse_error, info, terminated=False)
        if self._tool_calls > self.limits.max_tool_calls:
            return self._finish(obs_dicts, -penalty, StopReason.max_tool_calls, info, terminated=False)
        if self._turns >= self.limits.max_turns:
            return self._finish(obs_dicts, -penalty, StopReason.max_turns, info, terminated=False)
        return obs_dicts, -penalty, False, False, info

    def _finish(self, obs: list, reward: float, reason: StopReason, info: dict[str, Any],
                terminated: bool) -> tuple[list, float, bool, bool, dict[str, Any]]:
        self._done = True
        info["stop_reason"] = reason
        return obs, reward, terminated, not terminated, info

    def end_episode(self) -> None:
        """Called by the rollout when a token-level limit ended the episode outside ``step``."""
        self._done = True

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        return "\n".join(f"[{m.role}{':' + m.name if m.name else ''}] {m.content}" for m in self.history)


def _is_method_tool(t: Tool) -> bool:
    import inspect

    params = list(inspect.signature(t.fn).parameters)
    return bool(params) and params[0] == "self" and t._bound_to is None


def _exception_type(name: str) -> type[BaseException]:
    import builtins

    exc = getattr(builtins, name, None)
    if not (isinstance(exc, type) and issubclass(exc, BaseException)):
        raise ValueError(f"fatal_exceptions: {name!r} is not a built-in exception type")
    return exc
