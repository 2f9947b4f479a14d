"""Any gymnasium env whose action is a string (GEM-style text games, tau2's ``AgentGymEnv``, ...) as a
``ToolEnv``: the student acts through one tool, or with its whole message.

    env = GymTextEnv("my_pkg:WordleEnv")                      # the action is a tool call act(action=...)
    env = GymTextEnv(inner_env, action_as_text=True)          # the assistant's message is the action

The inner env's ``reset(seed)`` observation (a string, or anything ``str()`` renders) becomes the task
prompt, after ``instructions``; each action's observation is the tool result. Its rewards are summed into
the episode's reward (``reward_parts["env"]``); when it terminates or truncates the episode ends
(``tool_stop``), and ``success`` is "the summed reward reached ``success_reward``". In tool mode a message
without a tool call ends the episode too (graded the same way).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from opd_agents.env.core import Task, ToolEnv
from opd_agents.env.parsers import ParsedTurn, ToolCallParser
from opd_agents.env.tool import StopEpisode, Tool
from opd_agents.types import ToolCall


class _WholeMessage(ToolCallParser):
    """Every assistant message is one call of the action tool with the message as its argument."""

    name = "whole_message"
    stop_strings: tuple[str, ...] = ()

    def __init__(self, tool_name: str) -> None:
        self.tool_name = tool_name

    def parse(self, text: str) -> ParsedTurn:
        return ParsedTurn(calls=[ToolCall(name=self.tool_name, arguments={"action": text.strip()})])

    def format_call(self, name: str, arguments: dict[str, Any]) -> str:
        return str(arguments["action"])


class GymTextEnv(ToolEnv):
    def __init__(self, env: str | gym.Env, env_kwargs: dict[str, Any] | None = None, action_tool: str = "act",
                 action_description: str = "Send one action to the environment; returns what it observes.",
                 instructions: str = "", success_reward: float = 1.0, action_as_text: bool = False,
                 **kwargs: Any) -> None:
        from opd_agents.env.registry import make_env

        self.inner = env if isinstance(env, gym.Env) else make_env(env, **(env_kwargs or {}))
        self.action_tool, self.action_description = action_tool, action_description
        self.instructions, self.success_reward = instructions, success_reward
        self._return = 0.0
        if action_as_text:
            kwargs["parser"] = _WholeMessage(action_tool)
        super().__init__(**kwargs)

    def bound_tools(self) -> list[Tool]:
        def act(action: str) -> str:
            """Send one action to the environment.

            Args:
                action: the action, as the environment expects it
            """
            obs, reward, terminated, truncated, _ = self.inner.step(action)
            self._return += float(reward)
            if terminated or truncated:
                raise StopEpisode(f"{obs}\n\n(The episode is over.)")
            return str(obs)

        return [Tool(act, name=self.action_tool, description=self.action_description)]

    def generate_task(self, rng: np.random.Generator, seed: int, split: str) -> Task:
        obs, _ = self.inner.reset(seed=seed)
        self._return = 0.0
        prompt = f"{self.instructions}\n\n{obs}" if self.instructions else str(obs)
        return Task(id=f"{getattr(self.inner.spec, 'id', type(self.inner).__name__)}-{seed}", seed=seed, split=split,
                    prompt=prompt, answer="")

    def grade(self, task: Task, answer: str) -> float:
        return float(self._return >= self.success_reward)

    def step(self, action: str) -> tuple[list, float, bool, bool, dict[str, Any]]:
        before = self._return
        obs, reward, terminated, truncated, info = super().step(action)
        gained = self._return - before
        info["reward_parts"]["env"] = gained
        if info["stop_reason"] is not None and "correct" not in info["reward_parts"]:
            info["success"] = self._return >= self.success_reward
        return obs, reward + gained, terminated, truncated, info

    def close(self) -> None:
        self.inner.close()
        super().close()
