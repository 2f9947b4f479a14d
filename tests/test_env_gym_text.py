"""Any gymnasium env with a string action runs as a ToolEnv (GymTextEnv): through a tool, or with the
assistant's whole message as the action."""

from __future__ import annotations

import string
from typing import Any

import gymnasium as gym
from gymnasium.utils.env_checker import check_env

from opd_agents.env.adapters.gym_text import GymTextEnv
from opd_agents.env.registry import make_env


class HotColdEnv(gym.Env[str, str]):
    """A plain gymnasium text game (nothing opd-agents specific): find a number in 0-9, 4 tries."""

    observation_space = gym.spaces.Text(200, charset=string.printable)
    action_space = gym.spaces.Text(20, charset=string.printable)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict]:
        super().reset(seed=seed)
        self._target, self._tries = int(self.np_random.integers(0, 10)), 0
        return "Guess a number from 0 to 9.", {}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        self._tries += 1
        try:
            guess = int(action.strip())
        except ValueError:
            return "Not a number.", 0.0, False, self._tries >= 4, {}
        if guess == self._target:
            return "Correct!", 1.0, True, False, {}
        return ("Higher." if guess < self._target else "Lower."), 0.0, False, self._tries >= 4, {}


def target_of(env: GymTextEnv) -> int:
    return int(env.inner.unwrapped._target)


def test_the_action_as_a_tool_with_the_inner_env_rewards() -> None:
    env = GymTextEnv(HotColdEnv(), instructions="Play this game.")
    assert [s["function"]["name"] for s in env.tool_schemas] == ["act"]
    messages, _ = env.reset(seed=3)
    assert messages[1]["content"] == "Play this game.\n\nGuess a number from 0 to 9."
    target = target_of(env)
    obs, reward, terminated, _, info = env.step(env.parser.format_call("act", {"action": str((target + 1) % 10)}))
    assert obs[0]["content"] in ("Higher.", "Lower.") and reward == 0.0 and not terminated
    obs, reward, terminated, _, info = env.step(env.parser.format_call("act", {"action": str(target)}))
    assert reward == 1.0 and terminated and info["success"] and info["stop_reason"].value == "tool_stop"
    assert obs[0]["content"].startswith("Correct!")
    check_env(env, skip_render_check=True)


def test_the_whole_message_as_the_action_and_truncation() -> None:
    env = GymTextEnv(HotColdEnv(), action_as_text=True)
    env.reset(seed=5)
    wrong = (target_of(env) + 1) % 10
    for _ in range(3):
        _, reward, terminated, truncated, info = env.step(f" {wrong} ")
        assert not (terminated or truncated) and info["tool_results"][0].content in ("Higher.", "Lower.")
    _, reward, terminated, truncated, info = env.step(str(wrong))  # 4th try: the inner env truncates
    assert terminated and not info["success"] and reward == 0.0  # our episode ends by tool_stop


def test_by_reference_with_its_kwargs() -> None:
    gym.register("hotcold/HotCold-v0", entry_point=HotColdEnv)
    try:
        env = make_env("opd_agents.env.adapters.gym_text:GymTextEnv", env="hotcold/HotCold-v0").unwrapped
        messages, _ = env.reset(seed=0)
        assert messages[1]["content"] == "Guess a number from 0 to 9."
        assert 0 <= target_of(env) <= 9
    finally:
        gym.registry.pop("hotcold/HotCold-v0", None)
