"""Plays an env's scripted expert and records it as trajectories (for SFT teachers, tests, baselines).

With a renderer the expert's turns are tokenized exactly as a sampled turn would be stored (text ids +
end-of-turn), so off-policy / SFT training can consume them like student trajectories.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from opd_agents.env.core import ToolEnv
from opd_agents.rollout.renderer import Renderer
from opd_agents.rollout.runner import open_trajectory, record_step
from opd_agents.types import Message, Trajectory, Turn


def play_expert(env_factory: Callable[[], ToolEnv], seeds: Sequence[int], env_id: str = "custom",
                renderer: Renderer | None = None) -> list[Trajectory]:
    out = []
    for seed in seeds:
        env = env_factory()
        traj = open_trajectory(env, seed, env_id, "scripted-expert", renderer)
        assert env.task is not None
        while True:
            text = env.expert_action(env.task, list(env.history))
            obs, reward, terminated, truncated, info = env.step(text)
            ids = renderer.encode_assistant(text) if renderer else []
            turn = Turn(index=len(traj.turns), token_ids=ids, sampling_logprobs=[0.0] * len(ids), text=text,
                        finish="stop")
            traj.turns.append(turn)
            record_step(traj, turn, reward, info)
            if terminated or truncated:
                traj.stop_reason, traj.terminated, traj.truncated = info["stop_reason"], terminated, truncated
                break
            if renderer is not None:
                turn.observation_ids = renderer.observation_ids(
                    [Message.model_validate(m) for m in obs], turn_closed=True)
        traj.messages = list(env.history)
        env.close()
        out.append(traj)
    return out
