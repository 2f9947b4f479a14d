"""Held-out evaluation (the metrics stream is training/tracking.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from transformers import PreTrainedModel

from opd_agents.analysis.stats import summarize
from opd_agents.config import RunConfig
from opd_agents.env.core import ToolEnv, heldout_seeds
from opd_agents.rollout.engine import SamplingEngine
from opd_agents.rollout.renderer import ChatMLRenderer
from opd_agents.store import TrajectoryWriter
from opd_agents.teacher import PrivilegedFn, TeacherView
from opd_agents.training.distributed import Dist
from opd_agents.training.producers import play
from opd_agents.types import Trajectory

EVAL_KEYS = ("success_rate", "mean_reward", "tool_error_rate", "mean_turns")


class Evaluator:
    def __init__(self, cfg: RunConfig, env_factory: Callable[[], ToolEnv], renderer: ChatMLRenderer,
                 privileged: PrivilegedFn | None, dist: Dist = Dist()) -> None:
        self.cfg = cfg
        self.dist = dist
        self.env_factory = env_factory
        self.renderer = renderer
        self.teacher_view = TeacherView(renderer, privileged) if privileged else None
        self.eval_path = Path(cfg.run_dir) / "eval_trajectories.jsonl"

    @staticmethod
    def summary(trajs: Sequence[Trajectory]) -> dict[str, float]:
        s = summarize(trajs)
        return {k: float(s[k]) for k in EVAL_KEYS}  # type: ignore[arg-type]

    def evaluate(self, model: PreTrainedModel, who: str, episodes: int | None = None,
                 privileged: bool = False, engine: SamplingEngine | None = None) -> dict[str, float]:
        """Success, reward, tool-error rate and turns on the held-out seeds (the same seeds every time), played
        on ``engine`` when given (the run's rollout engine, for the student), else on an HF engine. In a
        distributed job each rank plays its slice; every rank gets the whole job's result, rank 0 logs it."""
        seeds = heldout_seeds(episodes or self.cfg.eval.episodes)
        mine = self.dist.shard(len(seeds))
        prompt = self.teacher_view.prompt_ids if (privileged and self.teacher_view) else None
        trajs = self.dist.gather(play(self.cfg, self.env_factory, self.renderer, model, seeds[mine.start:mine.stop],
                                      self.cfg.eval.temperature, self.cfg.seed, prompt, first_position=mine.start,
                                      engine=engine))
        if self.dist.is_main:
            with TrajectoryWriter(self.eval_path) as w:
                for t in trajs:
                    t.metrics["eval_of_" + who] = 1.0
                    w.write(t)
        return self.summary(trajs)
