"""Plays an env's scripted expert and records it as trajectories (for SFT teachers, tests, baselines).

With a renderer the expert's turns are tokenized exactly as a sampled turn would be stored (text ids +
end-of-turn), so off-policy / SFT training can consume them like student trajectories.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from opd_agents.env import ToolEnv
from opd_agents.renderer import ChatMLRenderer
from opd_agents.types import Message, Trajectory, Turn


def play_expert(env_factory: Callable[[], ToolEnv], seeds: Sequence[int], env_id: str = "custom",
                renderer: ChatMLRenderer | None = None) -> list[Trajectory]:
    out = []
    for seed in seeds:
        env = env_factory()
        obs, info = env.reset(seed=seed)
        messages = [Message.model_validate(m) for m in obs]
        traj = Trajectory(env_id=env_id, task_id=info["task_id"], seed=seed, split=info["split"],
                          model_id="scripted-expert", tool_schemas=env.tool_schemas, messages=messages)
        if renderer is not None:
            traj.prompt_ids = renderer.prompt_ids(messages, env.tool_schemas)
        assert env.task is not None
        while True:
            text = env.expert_action(env.task, list(env.history))
            obs, reward, terminated, truncated, info = env.step(text)
            ids = renderer.encode_assistant(text) if renderer else []
            turn = Turn(index=len(traj.turns), token_ids=ids, sampling_logprobs=[0.0] * len(ids), text=text,
                        finish="stop", tool_calls=info.get("tool_calls", []),
                        tool_results=info.get("tool_results", []))
            traj.turns.append(turn)
            traj.reward += float(reward)
            if terminated or truncated:
                traj.success = bool(info.get("success", False))
                traj.stop_reason, traj.terminated, traj.truncated = info["stop_reason"], terminated, truncated
                break
            if renderer is not None:
                turn.observation_ids = renderer.observation_ids(
                    [Message.model_validate(m) for m in obs], turn_closed=True)
        traj.messages = list(env.history)
        out.append(traj)
    return out
