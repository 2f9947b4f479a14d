"""Training data that the student did not sample: off-policy batches (GKD's 1 - lambda: the scripted
expert's or the teacher's own episodes) and best-of-N teacher trajectories (BRTS), and ``play``, which lets
any model play tasks (evaluation uses it too)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel

from opd_agents.config import RunConfig
from opd_agents.env.core import ToolEnv
from opd_agents.rollout.expert import play_expert
from opd_agents.errors import OpdError
from opd_agents.rollout.engine import SamplingEngine
from opd_agents.rollout.hf_engine import HFEngine
from opd_agents.rollout.renderer import Renderer
from opd_agents.rollout.runner import Rollout
from opd_agents.teacher import PrivilegedFn, Teacher, TeacherView
from opd_agents.training.policy import assistant_batch
from opd_agents.training.view import TrainingView
from opd_agents.types import SamplingParams, Trajectory

REACHABLE_TOP_K = 16  # BRTS: a teacher token is student-reachable if it is in the student's top-16


def play(cfg: RunConfig, env_factory: Callable[[], ToolEnv], renderer: Renderer, model: PreTrainedModel,
         seeds: Sequence[int], temperature: float, seed: int,
         prompt_ids: Callable[[Trajectory], list[int]] | None = None, first_position: int = 0,
         engine: SamplingEngine | None = None) -> list[Trajectory]:
    """``model`` plays the tasks of ``seeds``, on ``engine`` (e.g. the run's vLLM engine, which samples with
    the model's current weights; left running) or else on an HF engine of its own; ``prompt_ids``: another
    prompt (privileged); ``first_position``: where ``seeds`` start in the whole list (a rank's slice; see
    ``Rollout.arun``)."""
    sampling = SamplingParams(temperature=temperature, max_tokens_per_turn=cfg.max_tokens_per_turn, seed=seed)
    rollout = Rollout(engine or HFEngine(model, renderer), env_factory, sampling, model_id=str(model.name_or_path),
                      env_id=cfg.env.id, max_episodes=32, sampling_prompt=prompt_ids)
    try:
        return rollout.run(seeds, first_position=first_position)
    finally:
        if engine is None:
            rollout.close()


class OffPolicyProducer:
    def __init__(self, cfg: RunConfig, env_factory: Callable[[], ToolEnv], renderer: Renderer,
                 privileged: PrivilegedFn | None) -> None:
        self.cfg = cfg
        self.env_factory = env_factory
        self.renderer = renderer
        self.teacher_view = TeacherView(renderer, privileged) if privileged else None

    def teacher_play(self, teacher: Teacher, seeds: Sequence[int], seed: int) -> list[Trajectory]:
        """The teacher's own episodes, sampled like the student's, with its privileged prompt if it has one."""
        model = getattr(teacher, "model", None)
        if model is None:
            raise OpdError("teacher-played trajectories need an in-process (hf) teacher")
        prompt = self.teacher_view.prompt_ids if self.teacher_view else None
        return play(self.cfg, self.env_factory, self.renderer, model, seeds, self.cfg.sampling_temperature, seed,
                    prompt)

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
            b = assistant_batch(student, [TrainingView.from_trajectory(t) for t in chunk], self.renderer.eot_id)
            hit = (b.logits.topk(REACHABLE_TOP_K, dim=-1).indices == b.targets.unsqueeze(-1)).any(-1).float()
            share = ((hit * b.mask).sum(1) / b.mask.sum(1).clamp(min=1)).tolist()
            by_id.update({t.id: r for t, r in zip(chunk, share, strict=True)})
        return [by_id.get(t.id, 0.0) for t in trajs]
