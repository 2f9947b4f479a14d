"""The one data model that flows through every stage: messages, tool calls, turns, trajectories.

Env -> rollout -> teacher -> divergence -> loss -> trainer -> store/replay all read and write these
records. Token ids live on the turns (exactly what the student sampled); text lives on the messages.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1


class ErrorType(str, Enum):
    """Why a tool call did not produce a normal result (bad-inputs.md taxonomy)."""

    parse_error = "parse_error"
    tool_not_found = "tool_not_found"
    validation_failed = "validation_failed"
    execution_failed = "execution_failed"
    timeout = "timeout"
    max_tool_calls = "max_tool_calls"  # the call was over the episode's tool-call limit: not executed
    not_executed = "not_executed"  # an earlier call in the same message ended the episode


class StopReason(str, Enum):
    completed = "completed"
    parse_error = "parse_error"
    max_turns = "max_turns"
    max_tokens = "max_tokens"
    max_total_tokens = "max_total_tokens"
    max_tool_calls = "max_tool_calls"
    context_overflow = "context_overflow"
    timeout = "timeout"
    divergence = "divergence"
    tool_stop = "tool_stop"


class TurnOutcome(str, Enum):
    """What an env says one assistant turn did to the task (envs that can tell: a planner, a walkthrough).
    The divergence telemetry takes the first non-``ok`` turn as the first failing turn."""

    ok = "ok"  # valid, and still on a shortest path to the goal
    invalid = "invalid"  # the env refused the action (not admissible in this state)
    off_plan = "off_plan"  # valid, but the goal got further away (the remaining plan grew)


Role = Literal["system", "user", "assistant", "tool"]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Role
    content: str
    name: str | None = None  # tool name for role="tool"
    tool_call_id: str | None = None


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(default_factory=lambda: f"call_{uuid.uuid4().hex[:12]}")
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class ToolResult(BaseModel):
    """Outcome of one tool call (or of one unparseable call, then ``name`` may be None)."""

    model_config = ConfigDict(extra="forbid")

    call_id: str | None = None
    name: str | None = None
    content: str
    error_type: ErrorType | None = None
    duration_s: float = 0.0
    stop_episode: bool = False  # a tool (or a configured fatal exception) ended the episode

    @property
    def ok(self) -> bool:
        return self.error_type is None


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(1.0, ge=0.0, description="0 = greedy (logprobs then recorded at temperature 1)")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens_per_turn: int = Field(256, gt=0)
    seed: int | None = None


class Turn(BaseModel):
    """One assistant turn: the tokens the student sampled and everything that followed it."""

    model_config = ConfigDict(extra="forbid")

    index: int
    token_ids: list[int]
    sampling_logprobs: list[float]
    text: str
    finish: Literal["stop", "tool_call", "length"]
    # Tokens appended after the turn (template glue + tool results + next assistant header); loss 0.
    observation_ids: list[int] = Field(default_factory=list)
    tool_calls: list[ToolCall] = Field(default_factory=list)
    tool_results: list[ToolResult] = Field(default_factory=list)
    # Filled by teacher scoring, possibly later and by another teacher.
    teacher_logprobs: list[float] | None = None
    teacher_id: str | None = None
    divergence: float | None = None  # d_k: mean |log pi_S - log pi_T| over the turn's tokens
    weight: float = 1.0
    metrics: dict[str, float] = Field(default_factory=dict)
    outcome: TurnOutcome | None = None  # from the env's step info["turn_outcome"], when the env can tell

    @property
    def tool_error_types(self) -> list[ErrorType]:
        return [r.error_type for r in self.tool_results if r.error_type is not None]


class Trajectory(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    env_id: str
    task_id: str
    seed: int
    split: str = "train"
    model_id: str = ""
    teacher_id: str | None = None
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    tool_schemas: list[dict[str, Any]] = Field(default_factory=list)
    messages: list[Message] = Field(default_factory=list)
    prompt_ids: list[int] = Field(default_factory=list)
    turns: list[Turn] = Field(default_factory=list)
    reward: float = 0.0
    reward_parts: dict[str, float] = Field(default_factory=dict)
    success: bool = False
    terminated: bool = False
    truncated: bool = False
    stop_reason: StopReason | None = None
    metrics: dict[str, float] = Field(default_factory=dict)

    @property
    def num_assistant_tokens(self) -> int:
        return sum(len(t.token_ids) for t in self.turns)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + sum(len(t.token_ids) + len(t.observation_ids) for t in self.turns)

    @property
    def tool_error_count(self) -> int:
        return sum(len(t.tool_error_types) for t in self.turns)

    @property
    def first_error_turn(self) -> int | None:
        """Index of the first turn whose tool call failed (parse errors included), or None."""
        return next((t.index for t in self.turns if t.tool_error_types), None)
