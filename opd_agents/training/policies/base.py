"""The divergence-policy protocol and its registry.

A policy is a small object built from validated params. It declares when it acts (``acts_at``: "loss"
sets weights on a scored trajectory before the loss; "rollout" may end an episode after each turn) and
which teacher signal it reads (``needs``), so the trainer can supply it and the config can refuse a
teacher backend that cannot. Policies compose: loss-time weights multiply (a 0 truncates), a rollout
stops when any rollout-time policy says so.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from opd_agents.types import StopReason, Trajectory

ActsAt = Literal["rollout", "loss"]
# What a policy reads from the teacher, cheapest first: nothing; log pi_T of the sampled tokens; the
# teacher's top-k ids per position (with the student's top-k, computed by the trainer); full logits.
Needs = Literal["none", "logprobs", "topk", "logits"]
NEEDS_ORDER: tuple[Needs, ...] = ("none", "logprobs", "topk", "logits")


class PolicyParams(BaseModel):
    """Base of every policy's params: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class Signals:
    """What a loss-time policy may read besides the trajectory: per turn, per sampled token, the top-k
    token ids of the teacher and of the student at the position predicting it (best first)."""

    teacher_topk_ids: list[list[list[int]]] | None = None
    student_topk_ids: list[list[list[int]]] | None = None


@dataclass
class Weights:
    """A loss-time policy's factors: one per turn, and optionally one per sampled token of each turn."""

    turn: list[float]
    token: list[list[float]] | None = None

    @classmethod
    def ones(cls, traj: Trajectory) -> Weights:
        return cls([1.0] * len(traj.turns))


class DivergencePolicy(ABC):
    """One divergence policy. Subclasses set ``name``, ``acts_at``, ``Params`` and implement ``weights``
    (loss time) or ``should_stop`` (rollout time)."""

    name: ClassVar[str]
    acts_at: ClassVar[ActsAt]
    Params: ClassVar[type[PolicyParams]]

    def __init__(self, params: PolicyParams) -> None:
        self.params = params

    @property
    def needs(self) -> Needs:
        return "logprobs"

    @property
    def top_k(self) -> int:
        """Width of the top-k lists it reads (``needs == "topk"``), else 0."""
        return 0

    @property
    def label(self) -> str:
        """How config-time messages name it, e.g. ``rollout_truncation=both`` (a policy with a ``mode``)."""
        mode = getattr(self.params, "mode", None)
        return self.name if mode is None else f"{self.name}={mode}"

    def weights(self, traj: Trajectory, progress: float, signals: Signals | None = None) -> Weights:
        """Loss time: factors for ``traj``; ``progress`` = step / total steps, in (0, 1]."""
        raise NotImplementedError(f"{self.name} acts at {self.acts_at} time")

    def should_stop(self, traj: Trajectory) -> StopReason | None:
        """Rollout time: called after each turn is recorded; a StopReason ends the episode there."""
        raise NotImplementedError(f"{self.name} acts at {self.acts_at} time")


class LossPolicy(DivergencePolicy):
    acts_at: ClassVar[ActsAt] = "loss"

    @abstractmethod
    def weights(self, traj: Trajectory, progress: float, signals: Signals | None = None) -> Weights: ...


class RolloutPolicy(DivergencePolicy):
    acts_at: ClassVar[ActsAt] = "rollout"

    @abstractmethod
    def should_stop(self, traj: Trajectory) -> StopReason | None: ...


REGISTRY: dict[str, type[DivergencePolicy]] = {}


def register(cls: type[DivergencePolicy]) -> type[DivergencePolicy]:
    """Class decorator: one file per policy registers itself under its ``name``."""
    if cls.name in REGISTRY:
        raise ValueError(f"divergence policy {cls.name!r} is registered twice")
    REGISTRY[cls.name] = cls
    return cls


def keep_through(n_turns: int, stop_at: int | None, after: float = 0.0) -> list[float]:
    """1.0 for turns up to and including list position ``stop_at``, ``after`` past it (all 1.0 if None)."""
    return [1.0 if stop_at is None or i <= stop_at else after for i in range(n_turns)]
