"""The token adapter: plays message-level envs with a token-level sampler and records trajectories.

Per turn, every active episode samples in one batch; the sampled ids are stored verbatim, the env turns
the decoded text into tool results, and only the new observation messages are tokenized. Token budgets
(per turn, per episode, context window) are enforced here, because the env only sees text.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from opd_agents.env.core import ToolEnv
from opd_agents.env.registry import make_env
from opd_agents.rollout.renderer import ChatMLRenderer
from opd_agents.rollout.sampler import HFSampler, TurnSample
from opd_agents.types import Message, SamplingParams, StopReason, Trajectory, Turn

if TYPE_CHECKING:
    from opd_agents.teacher.online import OnlineTeacher

# Called after each turn is recorded; returning a StopReason ends the episode there (rollout-time
# truncation policies plug in here).
TurnHook = Callable[[Trajectory, Turn], StopReason | None]


@dataclass
class _Episode:
    env: ToolEnv
    traj: Trajectory
    length: int  # tokens in the sequence so far (prompt + turns + observations)
    prompt: list[int] = field(default_factory=list)  # what the sampler is fed first
    generated: int = 0
    done: bool = False


def _token_budget(ep: _Episode, sampling: SamplingParams) -> tuple[int, StopReason]:
    """Tokens this turn may sample, and the stop reason if it runs out (the tightest limit wins)."""
    lim = ep.env.limits
    options = [
        (min(sampling.max_tokens_per_turn, lim.max_tokens_per_turn), StopReason.max_tokens),
        (lim.max_total_tokens - ep.generated, StopReason.max_total_tokens),
        (lim.max_context_tokens - ep.length, StopReason.context_overflow),
    ]
    return min(options, key=lambda o: o[0])


def open_trajectory(env: ToolEnv, seed: int, env_id: str, model_id: str,
                    renderer: ChatMLRenderer | None = None, **fields: Any) -> Trajectory:
    """Reset ``env`` on ``seed`` and start its trajectory record (prompt ids when a renderer is given)."""
    obs, info = env.reset(seed=seed)
    messages = [Message.model_validate(m) for m in obs]
    prompt_ids = renderer.prompt_ids(messages, env.tool_schemas) if renderer is not None else []
    return Trajectory(env_id=env_id, task_id=info["task_id"], seed=seed, split=info["split"], model_id=model_id,
                      tool_schemas=env.tool_schemas, messages=messages, prompt_ids=prompt_ids, **fields)


def record_step(traj: Trajectory, turn: Turn, reward: float, info: dict[str, Any]) -> None:
    """Store what ``env.step`` returned for ``turn``: its tool calls/results, the reward and its parts."""
    turn.tool_calls, turn.tool_results = info.get("tool_calls", []), info.get("tool_results", [])
    turn.outcome = info.get("turn_outcome")
    traj.reward += float(reward)
    for k, v in info.get("reward_parts", {}).items():
        traj.reward_parts[k] = traj.reward_parts.get(k, 0.0) + float(v)
    if info.get("stop_reason") is not None:
        traj.success = bool(info.get("success", False))


class Rollout:
    """Plays episodes of one environment with an HF sampler; ``run(seeds)`` returns trajectories."""

    def __init__(
        self,
        sampler: HFSampler,
        env_factory: Callable[[], ToolEnv],
        sampling: SamplingParams | None = None,
        model_id: str = "",
        batch_size: int = 16,
        turn_hook: TurnHook | None = None,
        env_id: str | None = None,
        sampling_prompt: Callable[[Trajectory], list[int]] | None = None,
        online_teacher: OnlineTeacher | None = None,
    ) -> None:
        """``sampling_prompt``: the prompt the policy samples from, if not the stored one (a privileged
        teacher playing the task sees extra context; the trajectory keeps the plain prompt, so it can be
        trained on off-policy). ``online_teacher``: scores every turn as it is sampled (rollout-time
        truncation on divergence reads ``turn.divergence`` in ``turn_hook``)."""
        self.online_teacher = online_teacher
        self.sampler = sampler
        self.renderer: ChatMLRenderer = sampler.renderer
        self.env_factory = env_factory
        self.sampling = sampling or SamplingParams()
        self.model_id = model_id
        self.batch_size = batch_size
        self.turn_hook = turn_hook
        self.env_id = env_id or "custom"
        self.sampling_prompt = sampling_prompt
        self._generator = torch.Generator()
        if self.sampling.seed is not None:
            self._generator.manual_seed(self.sampling.seed)
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="opd-env")

    @classmethod
    def for_env(cls, env_id: str, sampler: HFSampler, env_kwargs: dict[str, Any] | None = None,
                **kwargs: Any) -> Rollout:
        return cls(sampler, lambda: make_env(env_id, **(env_kwargs or {})).unwrapped, env_id=env_id, **kwargs)

    def reseed(self, seed: int) -> None:
        """Restart the sampling RNG (the trainer reseeds per step so a resumed run samples identically)."""
        self._generator.manual_seed(seed)

    def run(self, seeds: Sequence[int], progress: bool = False) -> list[Trajectory]:
        out: list[Trajectory] = []
        with Progress(TextColumn("rollout"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("{task.fields[status]}"), disable=not progress, transient=False) as bar:
            task = bar.add_task("episodes", total=len(seeds), status="")
            for start in range(0, len(seeds), self.batch_size):
                out.extend(self._run_batch(seeds[start : start + self.batch_size]))
                ok = sum(t.success for t in out)
                bar.update(task, completed=len(out), status=f"success {ok}/{len(out)}")
        return out

    # ---- one batch of episodes --------------------------------------------------------------------
    def _start(self, seed: int) -> _Episode:
        env = self.env_factory()
        traj = open_trajectory(env, seed, self.env_id, self.model_id, self.renderer, sampling=self.sampling)
        ep = _Episode(env=env, traj=traj, length=len(traj.prompt_ids), prompt=traj.prompt_ids)
        if self.sampling_prompt is not None:
            ep.prompt = self.sampling_prompt(traj)
            ep.length = len(ep.prompt)
        if ep.length >= env.limits.max_context_tokens:
            self._end(ep, StopReason.context_overflow, truncated=True)
        return ep

    def _run_batch(self, seeds: Sequence[int]) -> list[Trajectory]:
        t0 = time.perf_counter()
        episodes = [self._start(s) for s in seeds]
        active = [ep for ep in episodes if not ep.done]
        chunks = [ep.prompt for ep in active]
        batch = self.sampler.new_batch()
        online = self.online_teacher
        if online is not None:
            online.begin([ep.traj for ep in active])
        while active:
            budgets = [_token_budget(ep, self.sampling) for ep in active]
            samples = self.sampler.sample_turn(
                batch, chunks, [b for b, _ in budgets], self.sampling.temperature, self.sampling.top_p,
                self._generator,
            )
            teacher_lps = online.score([s.token_ids for s in samples]) if online else [None] * len(samples)
            steps = list(self._pool.map(self._step, active, samples, [r for _, r in budgets], teacher_lps))
            keep, chunks = [], []
            for row, (ep, obs_ids) in enumerate(zip(active, steps, strict=True)):
                if not ep.done:
                    keep.append(row)
                    chunks.append(obs_ids)
            active = [active[r] for r in keep]
            if active:
                batch.keep(keep)
                if online is not None:
                    online.keep(keep)
                    online.observe(chunks)
        wall = time.perf_counter() - t0
        for ep in episodes:
            ep.traj.metrics["batch_wall_s"] = wall
        return [ep.traj for ep in episodes]

    def _step(self, ep: _Episode, sample: TurnSample, budget_reason: StopReason,
              teacher_logprobs: list[float] | None = None) -> list[int]:
        """Record one sampled turn, run the env on it; return the observation ids to feed next."""
        traj = ep.traj
        text = self.renderer.decode(sample.token_ids)
        turn = Turn(index=len(traj.turns), token_ids=sample.token_ids, sampling_logprobs=sample.logprobs,
                    text=text, finish=sample.finish)
        if teacher_logprobs is not None:
            turn.teacher_logprobs = teacher_logprobs  # the hook's divergence policies read these
        traj.turns.append(turn)
        ep.generated += len(sample.token_ids)
        ep.length += len(sample.token_ids)
        if sample.finish == "length":  # structural cut: never execute a partial tool call
            ep.env.history.append(Message(role="assistant", content=text))
            self._end(ep, budget_reason, truncated=True)
            return []
        obs, reward, terminated, truncated, info = ep.env.step(text)
        record_step(traj, turn, reward, info)
        if terminated or truncated:
            self._end(ep, info["stop_reason"], truncated=truncated, terminated=terminated)
            return []
        obs_ids = self.renderer.observation_ids([Message.model_validate(m) for m in obs],
                                                turn_closed=sample.finish == "stop")
        turn.observation_ids = obs_ids
        ep.length += len(obs_ids)
        hook_reason = self.turn_hook(traj, turn) if self.turn_hook else None
        budget, budget_reason = _token_budget(ep, self.sampling)
        if hook_reason is not None:
            self._end(ep, hook_reason, truncated=True)
        elif budget <= 0:  # no room for even one more token: end now rather than sample past a limit
            self._end(ep, budget_reason, truncated=True)
        return obs_ids

    def _end(self, ep: _Episode, reason: StopReason, truncated: bool, terminated: bool = False) -> None:
        ep.done = True
        ep.env.end_episode()
        ep.traj.stop_reason = reason
        ep.traj.truncated, ep.traj.terminated = truncated, terminated
        ep.traj.messages = list(ep.env.history)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
