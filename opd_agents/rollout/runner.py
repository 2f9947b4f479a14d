"""The token adapter: plays message-level envs through a sampling engine and records trajectories.

Every episode runs on its own: it sends its sequence so far to the engine, stores the sampled ids verbatim,
lets the env turn the decoded text into tool results (in a worker thread), tokenizes only the new
observation messages and asks for its next turn at once. There is no turn barrier: the engine batches
whichever episodes are waiting. A deterministic rollout (the default) makes a gated engine wait while env
steps are in flight, so the batches, and with them a seeded run, repeat exactly; otherwise tools run while
other episodes generate. Token budgets (per turn, per episode, context window) are enforced here, because
the env only sees text.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from opd_agents.env.core import ToolEnv
from opd_agents.env.registry import make_env
from opd_agents.rollout.engine import Completion, CompletionRequest, GatedEngine, SamplingEngine
from opd_agents.rollout.renderer import Renderer
from opd_agents.types import Message, SamplingParams, StopReason, Trajectory, Turn

if TYPE_CHECKING:
    from opd_agents.teacher.online import OnlineTeacher

# Called after each turn is recorded; returning a StopReason ends the episode there (rollout-time
# truncation policies plug in here).
TurnHook = Callable[[Trajectory, Turn], StopReason | None]
T = TypeVar("T")


@dataclass
class _Episode:
    env: ToolEnv
    traj: Trajectory
    length: int  # tokens in the sequence so far (prompt + turns + observations)
    prompt: list[int] = field(default_factory=list)  # what the engine is fed first
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
                    renderer: Renderer | None = None, **fields: Any) -> Trajectory:
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


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from sync code, also when the caller's thread already runs an event
    loop (a notebook): then it runs on a fresh loop in a helper thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            box.append(asyncio.run(coro))
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(e)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return box[0]


class _EnvGate:
    """Counts the episode slots doing env work (reset, tool calls, close) instead of waiting on the engine.
    A gated engine admits new requests only when there are none, so which requests share a batch depends on
    the seeds alone, not on how fast the env threads were. An engine resolves a completion inside its serving
    step and yields before its next admission; asyncio runs the woken episode first, so it is counted busy
    again before the engine looks."""

    def __init__(self, on_episode_end: Callable[[Trajectory], None] | None) -> None:
        self.busy = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.on_episode_end = on_episode_end
        self.finished: list[tuple[int, Trajectory]] = []  # (position, episode) not yet handed on

    def enter(self) -> None:
        self.busy += 1
        self._idle.clear()

    def leave(self) -> None:
        self.busy -= 1
        if self.busy == 0:
            self._idle.set()

    async def wait(self) -> None:
        while self.busy:
            await self._idle.wait()
        self.hand_on()

    def hand_on(self) -> None:
        """Pass the episodes that ended since the last admission to ``on_episode_end``, by position: threads
        decided the order they ended in, so a consumer that batches them (the scoring stream) would not
        batch alike in every run otherwise."""
        finished, self.finished = sorted(self.finished, key=lambda f: f[0]), []
        if self.on_episode_end is not None:
            for _, traj in finished:
                self.on_episode_end(traj)


class Rollout:
    """Plays episodes of one environment through a sampling engine; ``run(seeds)`` returns trajectories
    in the order of ``seeds``. ``max_episodes``: episodes in flight at once (a finished one frees its place
    for the next seed at once)."""

    def __init__(
        self,
        engine: SamplingEngine,
        env_factory: Callable[[], ToolEnv],
        sampling: SamplingParams | None = None,
        model_id: str = "",
        max_episodes: int = 16,
        turn_hook: TurnHook | None = None,
        env_id: str | None = None,
        sampling_prompt: Callable[[Trajectory], list[int]] | None = None,
        online_teacher: OnlineTeacher | None = None,
        deterministic: bool = True,
    ) -> None:
        """``sampling_prompt``: the prompt the policy samples from, if not the stored one (a privileged
        teacher playing the task sees extra context; the trajectory keeps the plain prompt, so it can be
        trained on off-policy). ``online_teacher``: scores every turn as it is sampled (rollout-time
        truncation on divergence reads ``turn.divergence`` in ``turn_hook``). ``deterministic``: a gated engine
        (HF) admits requests only while no env step is in flight, so a seeded rollout repeats bit for bit;
        False lets slow tools (subprocess sandboxes, servers) overlap decoding instead."""
        if max_episodes < 1:
            raise ValueError(f"max_episodes must be >= 1, got {max_episodes}")
        self.online_teacher = online_teacher
        self.engine = engine
        self.renderer: Renderer = engine.renderer
        self.env_factory = env_factory
        self.sampling = sampling or SamplingParams()
        self.model_id = model_id
        self.max_episodes = max_episodes
        self.turn_hook = turn_hook
        self.env_id = env_id or "custom"
        self.sampling_prompt = sampling_prompt
        self._seed = self.sampling.seed
        self.deterministic = deterministic

    @classmethod
    def for_env(cls, env_id: str, engine: SamplingEngine, env_kwargs: dict[str, Any] | None = None,
                **kwargs: Any) -> Rollout:
        return cls(engine, lambda: make_env(env_id, **(env_kwargs or {})).unwrapped, env_id=env_id, **kwargs)

    def reseed(self, seed: int) -> None:
        """Restart sampling from ``seed`` (the trainer reseeds per step so a resumed run samples identically)."""
        self._seed = seed

    def run(self, seeds: Sequence[int], progress: bool = False, first_position: int = 0,
            on_episode_end: Callable[[Trajectory], None] | None = None) -> list[Trajectory]:
        return run_sync(self.arun(seeds, progress, first_position, on_episode_end))

    async def arun(self, seeds: Sequence[int], progress: bool = False, first_position: int = 0,
                   on_episode_end: Callable[[Trajectory], None] | None = None) -> list[Trajectory]:
        """``first_position``: where ``seeds`` start in a longer list played elsewhere too (a rank's slice of
        a step): sampling depends on the place in the whole list, so the slices sample as the whole would.
        ``on_episode_end``: called with each finished trajectory at once (must not block: it runs on the
        rollout's event loop), e.g. to score it while the other episodes still play."""
        t0 = time.perf_counter()
        todo = deque(enumerate(seeds, first_position))
        played: dict[int, Trajectory] = {}
        wins = 0
        gate = _EnvGate(on_episode_end)
        gated = self.deterministic and isinstance(self.engine, GatedEngine) and self.engine.admission_gate is None
        with Progress(TextColumn("rollout"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("{task.fields[status]}"), disable=not progress, transient=False) as bar:
            task = bar.add_task("episodes", total=len(seeds), status="")

            async def worker() -> None:
                nonlocal wins
                # One of ``max_episodes`` episode slots: it takes the next seed the moment its episode ends, so
                # the set of live episodes never has a gap the engine could see.
                gate.enter()
                try:
                    while todo:
                        position, seed = todo.popleft()
                        traj = played[position] = await self._play(position, seed, gate)
                        gate.finished.append((position, traj))
                        if not gated:
                            gate.hand_on()
                        wins += traj.success
                        bar.update(task, completed=len(played), status=f"success {wins}/{len(played)}")
                finally:
                    gate.leave()

            if gated:
                self.engine.admission_gate = gate.wait  # type: ignore[union-attr]
            try:
                with ThreadPoolExecutor(max_workers=8, thread_name_prefix="opd-env") as self._pool:  # env steps
                    await asyncio.gather(*(worker() for _ in range(min(self.max_episodes, len(seeds)))))
            finally:
                if gated:
                    self.engine.admission_gate = None  # type: ignore[union-attr]
            gate.hand_on()
        trajs = [played[p] for p in sorted(played)]
        wall = time.perf_counter() - t0
        for traj in trajs:
            traj.metrics["rollout_wall_s"] = wall
        return trajs

    # ---- one episode ------------------------------------------------------------------------------
    def _request_seed(self, position: int, episode_seed: int, turn: int) -> int | None:
        """Per (run seed, place in ``seeds``, task seed, turn): the same request samples the same way
        whatever else is in the engine's batch; repeated task seeds (group sampling) differ."""
        if self._seed is None:
            return None
        return int(np.random.SeedSequence([self._seed, position, episode_seed, turn]).generate_state(1)[0])

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

    async def _play(self, position: int, seed: int, gate: _EnvGate) -> Trajectory:
        loop = asyncio.get_running_loop()
        ep = await loop.run_in_executor(self._pool, self._start, seed)  # reset may build the task (slow)
        traj, online = ep.traj, self.online_teacher
        ids = list(ep.prompt)
        teacher_ids = list(online.prompt_ids(traj)) if online is not None else []
        try:
            while not ep.done:
                budget, reason = _token_budget(ep, self.sampling)
                request = CompletionRequest(
                    prompt_ids=ids, max_tokens=budget, temperature=self.sampling.temperature,
                    top_p=self.sampling.top_p, seed=self._request_seed(position, seed, len(traj.turns)),
                    session=traj.id, order=position)
                gate.leave()
                try:
                    completion = await self.engine.complete(request)
                finally:
                    gate.enter()
                teacher_lps = None
                if online is not None:
                    teacher_ids += completion.token_ids
                    teacher_lps = await online.score_turn(traj.id, teacher_ids, len(completion.token_ids))
                obs_ids = await loop.run_in_executor(self._pool, self._step, ep, completion, reason, teacher_lps)
                ids += completion.token_ids + obs_ids
                teacher_ids += obs_ids
        finally:
            self.engine.release(traj.id)
            if online is not None:
                online.release(traj.id)
            # The rollout made the env, so it closes it (an MCP stdio server, a game engine stop with it).
            await loop.run_in_executor(self._pool, ep.env.close)
        return traj

    def _step(self, ep: _Episode, sample: Completion, budget_reason: StopReason,
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
        """Stop the engine's worker (and the online teacher's); a later ``run`` starts them again."""
        self.engine.close()
        if self.online_teacher is not None:
            self.online_teacher.close()
