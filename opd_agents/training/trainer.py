"""The OPD loop: rollout (student, on-policy) -> teacher scoring -> loss on assistant tokens -> step.

One `Trainer` owns the student, its optimizer and the teacher; everything else is a stage module
(rollout, teacher, losses, checkpoint, evaluation). Data order is a pure function of (seed, step), so
`--resume` continues with exactly the batches an uninterrupted run would have seen.

Rank-aware throughout (``training/distributed.py``): under torchrun each rank plays its slice of a step's
tasks, the loss is normalised by the whole job's token count, and rank 0 alone writes logs; with one
process every collective is a no-op.
"""

from __future__ import annotations

import copy
import json
import random
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import get_scheduler

from opd_agents.training.checkpoint import (
    latest_checkpoint, load_optimizer, load_trainer_state, rewind_run_dir, save_checkpoint, set_rng_state, sync_logs,
)
from opd_agents.training.distributed import as_float, full_state_dict, gradient_sync, init_distributed, wrap
from opd_agents.config import RunConfig
from opd_agents.errors import OpdError
from opd_agents.training.divergence import annotate_turns, step_divergence_metrics
from opd_agents.training.evaluation import Evaluator
from opd_agents.training.tracking import MetricsLog
from opd_agents.training.losses import LossOutput, LossSpec, grpo_advantages, select_loss
from opd_agents.training.policies.base import Needs
from opd_agents.training.policies.signals import topk_signals
from opd_agents.training.policy import (SharedPrefix, StudentLogits, adamw, assistant_batch, checkpoint_layers,
                                       cross_entropy, pad_rows)
from opd_agents.training.preflight import preflight
from opd_agents.env.registry import make_env
from opd_agents.rollout.chat_template import template_parser
from opd_agents.rollout.renderer import make_renderer
from opd_agents.training.rock_tokens import RockTokenMonitor
from opd_agents.rollout.runner import Rollout
from opd_agents.rollout.engine import make_engine
from opd_agents.training.components import (build_teacher, load_student, load_weights, pick_device,
                                            privileged_reference, scores_while_rolling_out)
from opd_agents.store import TrajectoryWriter
from opd_agents.teacher import ServerTeacher
from opd_agents.teacher.online import OnlineTeacher
from opd_agents.training.producers import OffPolicyProducer
from opd_agents.training.signal import ScoringStream, TeacherSignal, gather_teacher_signal
from opd_agents.training.view import TrainingView
from opd_agents.types import SamplingParams, Trajectory


# Append-only logs of a run dir: a checkpoint records their sizes, --resume cuts them back to those.
RUN_LOGS = ("metrics.jsonl", "trajectories.jsonl", "eval_trajectories.jsonl")


class TeacherTooWeakError(OpdError):
    """The teacher is not clearly stronger than the student (teacher_strength.on_weak = stop)."""


def step_seeds(run_seed: int, step: int, n: int) -> list[int]:
    """Training task seeds of a step: deterministic in (run seed, step), independent of history."""
    rng = np.random.default_rng([run_seed, step])
    return [int(s) for s in rng.integers(0, 900_000, size=n)]


class Trainer:
    def __init__(self, cfg: RunConfig, console: Console | None = None) -> None:
        preflight(cfg)  # before the run dir or any model: a bad id, path or server fails in seconds
        self.cfg = cfg
        self.dist = init_distributed(cfg.device, cfg.train.dist_timeout_s)
        self.console = (console or Console()) if self.dist.is_main else Console(quiet=True)
        self.run_dir = Path(cfg.run_dir)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(cfg.model_dump_json(indent=1))
        self.device, self.dtype, compute_dtype = pick_device(cfg.device, cfg.train.dtype)
        if self.dist.device.type == "cuda":
            self.device = self.dist.device
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)

        self.student, self.tokenizer = load_student(cfg, self.device, self.dtype)
        env_kwargs = dict(cfg.env.kwargs, limits=cfg.env.limits)
        family = template_parser(self.tokenizer) if cfg.student.chat_template != "chatml" else None
        if family and "parser" not in env_kwargs:  # the model's template teaches its own tool-call format
            env_kwargs["parser"] = family
        self.env_factory = lambda: make_env(cfg.env.id, **env_kwargs).unwrapped
        self.parser = self.env_factory().parser  # the env's tool-call format decides the sampler's stops
        # The module the optimizer steps (forward + head in one call, so a DDP / FSDP wrapper sees it all);
        # sampling and evaluation run a whole model: the student itself, or under FSDP a full copy that
        # takes the gathered weights after every step.
        self.sampler = copy.deepcopy(self.student) if cfg.train.parallel == "fsdp" and self.dist.enabled else self.student
        if cfg.train.gradient_checkpointing:
            checkpoint_layers(self.student)
        self.trained = wrap(StudentLogits(self.student, compute_dtype), cfg.train.parallel, self.dist)
        self.renderer = make_renderer(self.tokenizer, self.parser, cfg.student.chat_template)
        self.pad_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                          else self.renderer.eot_id)
        self.sampling = SamplingParams(temperature=cfg.sampling_temperature,
                                       max_tokens_per_turn=cfg.max_tokens_per_turn, seed=cfg.seed)
        server = {"api_base": cfg.rollout.api_base, "weight_sync": cfg.rollout.weight_sync,
                  "weights_host": cfg.rollout.weights_host} if cfg.rollout.api_base else {}
        self.rollout = Rollout(make_engine(cfg.rollout.engine, model=self.sampler, renderer=self.renderer,
                                           compute_dtype=compute_dtype, **server),
                               self.env_factory, self.sampling, model_id=cfg.student.model, env_id=cfg.env.id,
                               max_episodes=cfg.rollout.max_episodes, deterministic=cfg.rollout.deterministic)
        self.privileged = privileged_reference(self.env_factory) if cfg.teacher.privileged else None
        self.teacher = build_teacher(cfg, self.env_factory, self.tokenizer, self.renderer, self.privileged,
                                     self.device, self.console, self.dist, compute_dtype)
        self.scoring_overlap = scores_while_rolling_out(cfg, self.device)
        self.policies = cfg.divergence.build()
        self._setup_rollout_policies()
        self.rock = (RockTokenMonitor(cfg.divergence, self.pad_id, cfg.train.micro_batch_size)
                     if cfg.divergence.rock_tokens != "off" else None)
        self.evaluator = Evaluator(cfg, self.env_factory, self.renderer, self.privileged, self.dist)
        self.producer = OffPolicyProducer(cfg, self.env_factory, self.renderer, self.privileged)
        params = [p for p in self.trained.parameters() if p.requires_grad]
        self.optimizer = adamw(params, cfg.train.lr)
        self.scheduler = get_scheduler(cfg.train.lr_schedule, self.optimizer, cfg.train.warmup_steps, cfg.train.steps)
        self.metrics = MetricsLog(self.run_dir, cfg.report_to, cfg.model_dump(mode="json"))
        self.start_step = 0
        self.summary: dict[str, Any] = {}
        self._token_factors: dict[str, list[float]] = {}  # this step's per-token policy factors per trajectory
        self._mismatch: list[torch.Tensor] = []  # this step's |log pi_trainer - log pi_engine| per sampled token

    def _setup_rollout_policies(self) -> None:
        """Rollout-time policies end episodes from the rollout's turn hook; those that read the teacher
        (d_k) get every turn scored as it is sampled, with the teacher's KV cache reused."""
        if not self.policies.rollout:
            return
        self.rollout.turn_hook = lambda traj, turn: self.policies.should_stop(traj)
        if self.policies.needs("rollout") != "none":
            model = getattr(self.teacher, "model", None)
            if model is None:
                raise OpdError("a rollout-time divergence policy on d_k needs an in-process (hf) teacher")
            # Full-vocabulary losses take the online pass's logits too: the teacher reads each token once.
            self.rollout.online_teacher = OnlineTeacher(model, self.renderer, self.teacher.view.prompt_ids,
                                                        keep_logits=self._loss_for(on_policy=True).needs == "logits",
                                                        keep_topk=self.policies.top_k)

    # ---- resume ------------------------------------------------------------------------------------
    def resume(self) -> bool:
        ckpt = self.dist.broadcast(latest_checkpoint(self.run_dir / "checkpoints"))
        if ckpt is None:  # train() then clears the run dir: its logs start over empty
            self.console.print("[yellow]--resume: no complete checkpoint yet; starting from step 0")
            return False
        if self.dist.is_main:
            cut = {name: n for name, n in rewind_run_dir(self.run_dir, ckpt).items() if n}
            if cut:  # records of steps after the checkpoint: they are redone, and logged again
                self.console.print("cut back to the checkpoint: " + ", ".join(f"{n} bytes of {k}" for k, n in cut.items()))
        self.dist.barrier()
        load_weights(self.sampler, ckpt / "model")
        if self.sampler is not self.student:  # FSDP: each rank keeps its shard of the loaded weights
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.trained, {f"model.{k}": v for k, v in self.sampler.state_dict().items()},
                                 options=StateDictOptions(full_state_dict=True))
        self.rollout.engine.load_weights(self.sampler)
        state = load_trainer_state(ckpt)
        if "optimizer" in state:  # a checkpoint from before the optimizer state had its own dir
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            load_optimizer(ckpt, self.trained, self.optimizer, self.dist)
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.summary = state.get("summary", {})
        if self.rock is not None and "rock" in state:
            self.rock.load_state_dict(state["rock"])
        self.start_step = int(state["step"])
        self.metrics.purge_step = self.start_step + 1
        self.console.print(f"resumed from {ckpt} (next step {self.start_step + 1})")
        return True

    # ---- main loop ---------------------------------------------------------------------------------
    def train(self, until_step: int | None = None) -> dict[str, Any]:
        """Run to ``train.steps`` (or stop after ``until_step``, as if the process had been killed there)."""
        cfg, t_start = self.cfg, time.perf_counter()
        last = min(cfg.train.steps, until_step or cfg.train.steps)
        if self.start_step == 0:
            if self.dist.is_main:
                self._clear_previous_run()
            self.dist.barrier()
            if cfg.eval.episodes and (cfg.eval.before or cfg.teacher_strength.episodes):
                before = self.evaluator.evaluate(self.sampler, "student", engine=self.rollout.engine)
                self.summary["student_before"] = before["success_rate"]
                self._log({"step": 0, **{f"eval/{k}": v for k, v in before.items()}})
                self._check_teacher_strength(before["success_rate"])
        writer = TrajectoryWriter(self.run_dir / "trajectories.jsonl") if self.dist.is_main else None
        try:
            self._loop(last, writer)
        finally:
            if writer is not None:
                writer.close()
            self.rollout.close()
            self.metrics.close()
        self.summary["wall_s"] = self.summary.get("wall_s", 0.0) + time.perf_counter() - t_start
        if self.dist.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(self.summary, indent=1))
        return self.summary

    def _log(self, row: dict[str, Any]) -> None:
        if self.dist.is_main:
            self.metrics.write(row)

    def _loop(self, last: int, writer: TrajectoryWriter | None) -> None:
        cfg = self.cfg
        with Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("{task.fields[live]}"), console=self.console) as bar:
            task = bar.add_task("steps", total=cfg.train.steps, completed=self.start_step, live="")
            for step in range(self.start_step + 1, last + 1):
                row = self.train_step(step, writer)
                if cfg.eval.episodes and (step % cfg.eval.every == 0 or step == cfg.train.steps):
                    ev = self.evaluator.evaluate(self.sampler, "student", engine=self.rollout.engine)
                    row.update({f"eval/{k}": v for k, v in ev.items()})
                    self.summary["student_after"] = ev["success_rate"]
                self._log(row)
                if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
                    extra = {"summary": self.summary, **({"rock": self.rock.state_dict()} if self.rock else {})}
                    # The step's records are all written: their end on disk is where a resume cuts back to.
                    save_checkpoint(self.run_dir / "checkpoints", step, self.sampler, self.optimizer,
                                    self.scheduler, extra, tokenizer=self.tokenizer,
                                    log_bytes=sync_logs(self.run_dir, RUN_LOGS) if self.dist.is_main else None,
                                    trained=self.trained, dist=self.dist, keep=cfg.train.keep_checkpoints)
                live = f"loss {row['loss']:.3f} train-success {row['rollout/success_rate']:.2f}"
                if "eval/success_rate" in row:
                    live += f" heldout {row['eval/success_rate']:.2f}"
                bar.update(task, completed=step, live=live)

    def _clear_previous_run(self) -> None:
        """A new run (not --resume) in a used run dir replaces the earlier run's outputs instead of mixing
        into them; an SFT teacher built there is kept (it is reused when its settings match)."""
        stale = [self.run_dir / n for n in (*RUN_LOGS, "summary.json") if (self.run_dir / n).exists()]
        if stale or (self.run_dir / "checkpoints").exists():
            self.console.print(f"[yellow]{self.run_dir} holds an earlier run: starting over (use --resume to continue it)")
        for path in stale:
            path.unlink()
        shutil.rmtree(self.run_dir / "checkpoints", ignore_errors=True)
        shutil.rmtree(self.run_dir / "tensorboard", ignore_errors=True)  # append-only too: its events would mix

    def _check_teacher_strength(self, student_success: float) -> None:
        strength = self.cfg.teacher_strength
        if strength.episodes == 0:
            return
        teacher_model = getattr(self.teacher, "model", None)
        if teacher_model is None:
            self.console.print("[yellow]teacher-strength check skipped: it needs an in-process (hf) teacher")
            return
        res = self.evaluator.evaluate(teacher_model, "teacher", episodes=strength.episodes, privileged=True)
        self.summary["teacher"] = res["success_rate"]
        self._log({"step": 0, **{f"teacher_eval/{k}": v for k, v in res.items()}})
        gap = res["success_rate"] - student_success
        msg = (f"teacher success {res['success_rate']:.2f} vs student {student_success:.2f} on "
               f"{strength.episodes} held-out tasks (gap {gap:+.2f}, required {strength.min_gap:.2f})")
        if gap < strength.min_gap:
            if strength.on_weak == "stop":
                raise TeacherTooWeakError(msg + "; the teacher is not clearly stronger (teacher_strength.on_weak=stop)")
            self.console.print(f"[bold yellow]warning:[/] {msg}; its signal may teach wrong behaviour")
        else:
            self.console.print(msg)

    # ---- one step ----------------------------------------------------------------------------------
    def train_step(self, step: int, writer: TrajectoryWriter | None) -> dict[str, Any]:
        cfg, tc, dist = self.cfg, self.cfg.train, self.dist
        t0 = time.perf_counter()
        tasks = step_seeds(cfg.seed, step, tc.tasks_per_step)
        mine = dist.shard(len(tasks))  # this rank's tasks; sampling depends on the place in the whole step
        seeds = [s for s in tasks[mine.start:mine.stop] for _ in range(tc.group_size)]
        on_policy = np.random.default_rng([cfg.seed, step, 1]).random() < tc.on_policy_fraction
        self.rollout.reseed(cfg.seed * 1_000_003 + step)
        online_before = self.rollout.online_teacher.tokens_processed if self.rollout.online_teacher else 0
        loss_spec = self._loss_for(on_policy)
        need, top_k = self._teacher_need(loss_spec, on_policy), max(cfg.loss.top_k, self.policies.top_k)
        stream = None
        if on_policy:
            # Without an online teacher, finished episodes are scored while the others still play.
            if self.scoring_overlap and need != "none" and self.rollout.online_teacher is None:
                # Two batches or more per step: the first one's pass hides behind the rest of the rollout.
                chunk = max(1, min(cfg.teacher.batch_size, -(-len(seeds) // 2)))
                stream = ScoringStream(self.teacher, need, top_k, chunk=chunk)
            try:
                trajs = self.rollout.run(seeds, first_position=mine.start * tc.group_size,
                                         on_episode_end=stream.submit if stream else None)
            except BaseException:
                if stream is not None:  # no scoring thread outlives a failed rollout
                    stream.close()
                raise
        else:
            trajs = self.producer.off_policy_trajectories(seeds, self.teacher, tc.off_policy_source)
        t_roll = time.perf_counter()
        online = self.rollout.online_teacher if on_policy else None
        online_tokens = online.tokens_processed - online_before if online else 0
        teacher = gather_teacher_signal(self.teacher, trajs, online, need, top_k,
                                        streamed=stream.result() if stream else None)
        t_div = time.perf_counter()
        signals = topk_signals(self.policies.top_k, trajs, teacher, self.student, self.pad_id,
                               tc.micro_batch_size) if self.policies.top_k else {}
        for t in trajs:
            annotate_turns(t, teacher.topk_logprobs.get(t.id))
            factors = self.policies.apply(t, step / tc.steps, signals.get(t.id))
            if factors is not None:
                self._token_factors[t.id] = factors
        everyone = dist.gather(trajs)  # the whole step's episodes, scored and weighted: telemetry and logs
        div_metrics = step_divergence_metrics(everyone) | self.policies.step_metrics(len(everyone), dist.sum)
        t_telemetry = time.perf_counter()
        rock_metrics = self.rock.observe(self.student, everyone if on_policy else []) if self.rock else {}
        t_rock = time.perf_counter()
        aux = self.producer.best_teacher_trajectories(tasks, self.teacher, self.student) \
            if tc.teacher_rollouts_per_task > 1 else []

        self.trained.train()
        advantages = self._outcome_advantages(trajs)
        local_tokens = sum(t.num_assistant_tokens for t in trajs)
        n_tokens = max(dist.sum([local_tokens])[0], 1)  # token-mean over the whole job's step
        agg: dict[str, float] = {}
        total_loss = 0.0
        starts = range(0, len(trajs), tc.micro_batch_size)
        # Several micro-batches of one process: their common prompt prefix runs once for the step.
        views = [TrainingView.from_trajectory(t) for t in trajs]
        shared = SharedPrefix.build(self.trained, views) \
            if len(starts) > 1 and isinstance(self.trained, StudentLogits) and self.trained.share_prefix else None
        for start in starts:
            micro = trajs[start : start + tc.micro_batch_size]
            micro_tokens = sum(t.num_assistant_tokens for t in micro)
            if not micro_tokens and not dist.enabled:  # (every rank runs as many passes as the others)
                continue
            adv = advantages[start : start + tc.micro_batch_size] if advantages is not None else None
            with gradient_sync(self.trained, enabled=start == starts[-1]):
                out = self._micro_loss(micro, views[start : start + tc.micro_batch_size], loss_spec, on_policy, adv,
                                       teacher, shared)
                share = micro_tokens / n_tokens
                # The wrapper averages gradients over the ranks: scaled back up, the job's gradient is
                # the token-mean one, as one process with the whole batch would compute.
                (out.loss * share * dist.world_size).backward()
            total_loss += out.loss.item() * share
            for k, v in out.metrics.items():
                agg[k] = agg.get(k, 0.0) + v * share
        if shared is not None:
            shared.backward()
        self._token_factors = {}
        mismatch = torch.tensor(dist.gather(torch.cat(self._mismatch).tolist() if self._mismatch else []))
        self._mismatch = []
        mismatch_metrics = {"mismatch/mean_abs": float(mismatch.mean()), "mismatch/p99": float(mismatch.quantile(0.99)),
                            "mismatch/max": float(mismatch.max())} if mismatch.numel() else {}
        aux_loss = self._aux_loss(aux) if aux else 0.0
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trained.parameters(), tc.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.trained.eval()
        if self.sampler is not self.student:  # FSDP: the sampler takes the gathered new weights
            self.sampler.load_state_dict({k.removeprefix("model."): v for k, v in full_state_dict(self.trained).items()})
        t_sync = time.perf_counter()
        self.rollout.engine.load_weights(self.sampler)  # the next rollout samples with the new weights
        t_synced = time.perf_counter()
        if writer is not None:
            for t in everyone:
                writer.write(t)
        roll = self.evaluator.summary(everyone)
        names = sorted(agg)
        servers = list(self.teacher.stats().values()) if isinstance(self.teacher, ServerTeacher) else []
        peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
        total_loss, teacher_tokens, online_tokens, requests, failures, job_rss_gb, *sums = dist.sum(
            [total_loss, teacher.tokens_processed, online_tokens, sum(s["requests"] for s in servers),
             sum(s["failures"] for s in servers), peak_rss_gb, *(agg[k] for k in names)])
        server_metrics = {"teacher/requests": int(requests), "teacher/request_failures": int(failures),
                          "teacher/servers_down": sum(not s["up"] for s in servers)} if servers else {}
        return {
            "step": step, "on_policy": on_policy, "loss": total_loss, "aux_loss": aux_loss,
            "lr": self.scheduler.get_last_lr()[0], "grad_norm": as_float(grad_norm),
            **{f"loss/{k}": v for k, v in zip(names, sums, strict=True)},
            **{f"rollout/{k}": v for k, v in roll.items()},
            **div_metrics, **rock_metrics, **mismatch_metrics, **server_metrics,
            "teacher_tokens": int(teacher_tokens), "teacher_tokens_rollout": int(online_tokens),
            "trajectory_tokens": sum(t.num_tokens for t in everyone), "student_tokens": int(n_tokens),
            "time/rollout_s": t_roll - t0, "time/teacher_s": t_div - t_roll, "time/telemetry_s": t_telemetry - t_div,
            "time/rock_s": t_rock - t_telemetry, "time/weight_sync_s": t_synced - t_sync,
            "memory/peak_rss_gb": peak_rss_gb, "memory/job_peak_rss_gb": job_rss_gb,  # rank 0's; all ranks'
            "time/step_s": time.perf_counter() - t0,
        }

    def _loss_for(self, on_policy: bool) -> LossSpec:
        """The registered loss of this step's batches. Off-policy batches without teacher distributions
        (expert data; teacher samples when the teacher gives no logits and loss.top_k = 0) are plain SFT."""
        lc = self.cfg.loss
        full = hasattr(self.teacher, "logits_for")  # in-process teachers give full-vocabulary logits
        sft = not on_policy and (self.cfg.train.off_policy_source == "expert" or (not full and not lc.top_k))
        spec = select_loss(lc.kind, lc.top_k, on_policy, sft)
        if spec.needs == "logits" and not full:
            raise OpdError(f"loss.kind={lc.kind} over the full vocabulary needs an in-process (hf) teacher; "
                           f"with a server teacher set loss.top_k > 0")
        return spec

    def _teacher_need(self, loss: LossSpec, on_policy: bool) -> Needs:
        """What a step reads from the teacher: the loss's need, widened for telemetry and policies (on-policy
        batches always get the sampled-token logprobs; a top-k run gets the top-k lists of every batch)."""
        if loss.needs == "logits":
            return "logits"
        if self.cfg.loss.top_k:
            return "topk"
        return "logprobs" if on_policy else "none"

    def _outcome_advantages(self, trajs: list[Trajectory]) -> torch.Tensor | None:
        if self.cfg.loss.outcome_coef <= 0:
            return None
        rewards = torch.tensor([t.reward for t in trajs], dtype=torch.float32)
        return grpo_advantages(rewards, [t.seed for t in trajs]) * self.cfg.loss.outcome_coef

    def _micro_loss(self, micro: list[Trajectory], views: list[TrainingView], loss: LossSpec, on_policy: bool,
                    advantages: torch.Tensor | None, teacher: TeacherSignal,
                    shared: SharedPrefix | None = None) -> LossOutput:
        batch = assistant_batch(self.trained, views, self.pad_id, shared)
        factors = [self._token_factors.get(t.id) for t in micro]
        if any(f is not None for f in factors):  # token-level policies (iw_opd, topk_drift)
            rows = [torch.tensor(f if f is not None else [1.0] * t.num_assistant_tokens, dtype=torch.float32)
                    for f, t in zip(factors, micro, strict=True)]
            batch.weights = batch.weights * pad_rows(rows, batch.weights.shape[1]).to(batch.weights.device)
        if self.rock is not None:
            batch.weights = batch.weights * self.rock.token_weights(batch.targets)
        batch.mask = batch.mask * (batch.weights > 0)  # turns a truncation policy dropped carry no loss
        if on_policy and self.cfg.sampling_temperature == 1.0:  # engine vs trainer numerics, same weights
            with torch.no_grad():
                self._mismatch.append((batch.logprobs - batch.sampling_logprobs)[batch.mask > 0].abs().cpu())
        tensors = teacher.tensors(micro, batch, loss.needs, self.cfg.loss.top_k)
        return loss.fn(batch, tensors, self.cfg.loss, advantages)

    def _aux_loss(self, teacher_trajs: list[Trajectory]) -> float:
        """Best-of-N auxiliary loss: NLL of the selected teacher trajectories, small weight (BRTS)."""
        weight = self.cfg.train.teacher_aux_weight
        batch = assistant_batch(self.student, [TrainingView.from_trajectory(t) for t in teacher_trajs], self.pad_id)
        loss = cross_entropy(batch)
        (loss * weight).backward()
        return loss.item()
