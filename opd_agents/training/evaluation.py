"""Held-out evaluation and the metrics stream."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from opd_agents.analysis.stats import summarize
from opd_agents.config import RunConfig
from opd_agents.env.core import ToolEnv, heldout_seeds
from opd_agents.rollout.renderer import ChatMLRenderer
from opd_agents.store import TrajectoryWriter
from opd_agents.teacher import PrivilegedFn, TeacherView
from opd_agents.training.distributed import Dist
from opd_agents.training.producers import play
from opd_agents.types import Trajectory

EVAL_KEYS = ("success_rate", "mean_reward", "tool_error_rate", "mean_turns")


class MetricsLog:
    """metrics.jsonl in the run dir (and TensorBoard when it is installed)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.tb_dir = run_dir / "tensorboard"
        # Set on resume: TensorBoard then drops the earlier event files' steps >= it (they are redone).
        self.purge_step: int | None = None
        self.tb: Any = None

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.tb_dir), purge_step=self.purge_step)
            except ImportError:
                self.tb = False
        if self.tb:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, row.get("step", 0))


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
                 privileged: bool = False) -> dict[str, float]:
        """Success, reward, tool-error rate and turns on the held-out seeds (the same seeds every time). In a
        distributed job each rank plays its slice; every rank gets the whole job's result, rank 0 logs it."""
        seeds = heldout_seeds(episodes or self.cfg.eval.episodes)
        mine = self.dist.shard(len(seeds))
        prompt = self.teacher_view.prompt_ids if (privileged and self.teacher_view) else None
        trajs = self.dist.gather(play(self.cfg, self.env_factory, self.renderer, model, seeds[mine.start:mine.stop],
                                      self.cfg.eval.temperature, self.cfg.seed, prompt, first_position=mine.start))
        if self.dist.is_main:
            with TrajectoryWriter(self.eval_path) as w:
                for t in trajs:
                    t.metrics["eval_of_" + who] = 1.0
                    w.write(t)
        return self.summary(trajs)
