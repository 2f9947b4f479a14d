"""Held-out evaluation, teacher-played trajectories (off-policy KD, best-of-N) and the metrics stream."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from opd_agents.config import RunConfig
from opd_agents.env.core import ToolEnv, heldout_seeds
from opd_agents.errors import OpdError
from opd_agents.env.expert import play_expert
from opd_agents.training.policy import assistant_batch
from opd_agents.rollout.renderer import ChatMLRenderer
from opd_agents.rollout.runner import Rollout
from opd_agents.rollout.hf_engine import HFEngine
from opd_agents.analysis.stats import summarize
from opd_agents.store import TrajectoryWriter
from opd_agents.teacher import PrivilegedFn, Teacher, TeacherView
from opd_agents.training.view import TrainingView
from opd_agents.types import SamplingParams, Trajectory

EVAL_KEYS = ("success_rate", "mean_reward", "tool_error_rate", "mean_turns")
REACHABLE_TOP_K = 16  # BRTS: a teacher token is student-reachable if it is in the student's top-16


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
                 privileged: PrivilegedFn | None) -> None:
        self.cfg = cfg
        self.env_factory = env_factory
        self.renderer = renderer
        self.teacher_view = TeacherView(renderer, privileged) if privileged else None
        self.eval_path = Path(cfg.run_dir) / "eval_trajectories.jsonl"

    def _play(self, model: PreTrainedModel, seeds: Sequence[int], temperature: float, privileged: bool,
              seed: int) -> list[Trajectory]:
        sampling = SamplingParams(temperature=temperature, max_tokens_per_turn=self.cfg.max_tokens_per_turn, seed=seed)
        prompt = self.teacher_view.prompt_ids if (privileged and self.teacher_view) else None
        rollout = Rollout(HFEngine(model, self.renderer), self.env_factory, sampling, model_id=str(model.name_or_path),
                          env_id=self.cfg.env.id, max_episodes=32, sampling_prompt=prompt)
        try:
            return rollout.run(seeds)
        finally:
            rollout.close()

    @staticmethod
    def summary(trajs: Sequence[Trajectory]) -> dict[str, float]:
        s = summarize(trajs)
        return {k: float(s[k]) for k in EVAL_KEYS}  # type: ignore[arg-type]

    def evaluate(self, model: PreTrainedModel, who: str, episodes: int | None = None,
                 privileged: bool = False) -> dict[str, float]:
        """Success, reward, tool-error rate and turns on the held-out seeds (the same seeds every time)."""
        seeds = heldout_seeds(episodes or self.cfg.eval.episodes)
        trajs = self._play(model, seeds, self.cfg.eval.temperature, privileged, self.cfg.seed)
        with TrajectoryWriter(self.eval_path) as w:
            for t in trajs:
                t.metrics["eval_of_" + who] = 1.0
                w.write(t)
        return self.summary(trajs)

    def teacher_play(self, teacher: Teacher, seeds: Sequence[int], seed: int) -> list[Trajectory]:
        model = getattr(teacher, "model", None)
        if model is None:
            raise OpdError("teacher-played trajectories need an in-process (hf) teacher")
        return self._play(model, seeds, self.cfg.sampling_temperature, True, seed)

    def off_policy_trajectories(self, seeds: Sequence[int], teacher: Teacher, source: str) -> list[Trajectory]:
        """GKD's (1 - lambda) batches: the scripted expert's or the teacher's own trajectories."""
        if source == "expert":
            return play_expert(self.env_factory, seeds, env_id=self.cfg.env.id, renderer=self.renderer)
        return self.teacher_play(teacher, seeds, seed=seeds[0] if seeds else 0)

    def best_teacher_trajectories(self, task_seeds: Sequence[int], teacher: Teacher,
                                  student: PreTrainedModel) -> list[Trajectory]:
        """Best-of-N (BRTS): per task, the highest-reward teacher rollout; ties go to the most
        student-reachable one (share of its tokens inside the student's top-16)."""
        n = self.cfg.train.teacher_rollouts_per_task
        trajs = self.teacher_play(teacher, [s for s in task_seeds for _ in range(n)], seed=task_seeds[0])
        reach = self._reachability(trajs, student)
        best: dict[int, tuple[float, float, Trajectory]] = {}
        for t, r in zip(trajs, reach, strict=True):
            t.metrics["student_reachability"] = r
            key = (t.reward, r)
            if t.num_assistant_tokens and (t.seed not in best or key > best[t.seed][:2]):
                best[t.seed] = (t.reward, r, t)
        return [v[2] for v in best.values()]

    @torch.no_grad()
    def _reachability(self, trajs: Sequence[Trajectory], student: PreTrainedModel) -> list[float]:
        scored = [t for t in trajs if t.num_assistant_tokens]
        by_id: dict[str, float] = {}
        size = self.cfg.train.micro_batch_size  # batched like training: bounded [B, N, V] logits
        for start in range(0, len(scored), size):
            chunk = scored[start : start + size]
            b = assistant_batch(student, [TrainingView.from_trajectory(t) for t in chunk], self.renderer.im_end_id)
            hit = (b.logits.topk(REACHABLE_TOP_K, dim=-1).indices == b.targets.unsqueeze(-1)).any(-1).float()
            share = ((hit * b.mask).sum(1) / b.mask.sum(1).clamp(min=1)).tolist()
            by_id.update({t.id: r for t, r in zip(chunk, share, strict=True)})
        return [by_id.get(t.id, 0.0) for t in trajs]
