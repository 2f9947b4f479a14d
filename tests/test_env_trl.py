"""A TRL environment_factory class runs here unchanged (TRLEnvironment): public methods are the tools,
reset(**row) starts an episode, get_reward() scores it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from gymnasium.utils.env_checker import check_env
from typer.testing import CliRunner

from opd_agents.cli import app
from opd_agents.env.adapters.trl import TRLEnvironment
from opd_agents.env.registry import make_env
from opd_agents.errors import ConfigError

REF = "opd_agents.env.adapters.trl:TRLEnvironment"


class GuessEnv:
    """Written for TRL's GRPOTrainer(environment_factory=GuessEnv): nothing opd-agents specific."""

    def reset(self, **kwargs: Any) -> str:
        self._target = int(kwargs["target"])
        self._solved = False
        self._guesses = 0
        return "You have 5 guesses."

    def guess(self, number: int) -> str:
        """Guess the secret number.

        Args:
            number: your guess
        """
        self._guesses += 1
        self._solved = number == self._target
        return "correct" if self._solved else ("higher" if number < self._target else "lower")

    def get_reward(self) -> float:
        return 1.0 if self._solved else 0.0

    def _helper(self) -> None:  # private: not a tool
        pass


ROWS = [{"prompt": "Find the secret number between 1 and 10.", "target": 7},
        {"prompt": [{"role": "system", "content": "x"}, {"role": "user", "content": "Find it (1-10)."}], "target": 3}]


def call(env: Any, number: int) -> str:
    return env.parser.format_call("guess", {"number": number})


def test_public_methods_are_tools_reset_gets_the_row_and_get_reward_scores() -> None:
    env = TRLEnvironment(factory=GuessEnv, dataset=ROWS)
    assert [s["function"]["name"] for s in env.tool_schemas] == ["guess"]
    assert env.tool_schemas[0]["function"]["parameters"]["properties"]["number"]["type"] == "integer"
    messages, info = env.reset(seed=0)
    assert messages[1]["content"] == "Find the secret number between 1 and 10.\n\nYou have 5 guesses."
    obs, *_ = env.step(call(env, 3))
    assert obs[0]["content"] == "higher"
    env.step(call(env, 7))
    _, reward, terminated, _, info = env.step("I found it: 7")
    assert reward == 1.0 and terminated and info["success"]
    messages, _ = env.reset(seed=1)  # row 1: chat-message prompt, target 3
    assert messages[1]["content"].startswith("Find it (1-10).")
    _, reward, *_ = env.step("no idea")
    assert reward == 0.0
    check_env(env, skip_render_check=True)


def test_from_a_config_or_the_cli_by_reference(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = tmp_path / "guess.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    env = make_env(REF, factory=f"{__name__}:GuessEnv", dataset=str(data)).unwrapped
    assert isinstance(env.instance, GuessEnv)
    out = tmp_path / "r.jsonl"
    result = CliRunner().invoke(app, ["rollout", "--env", REF, "--env-arg", f"factory={__name__}:GuessEnv",
                                      "--env-arg", f"dataset={data}", "--model", str(tiny_model_dir), "-n", "2",
                                      "--max-tokens-per-turn", "8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    trajs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(trajs) == 2 and all(t["env_id"] == REF for t in trajs)
    assert trajs[0]["tool_schemas"][0]["function"]["name"] == "guess"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"factory": "no_such_mod:Env", "dataset": ROWS}, "factory 'no_such_mod:Env' not found"),
    ({"factory": GuessEnv, "dataset": [{"target": 1}]}, "needs rows with a 'prompt'"),
    ({"factory": GuessEnv, "dataset": "/no/such.jsonl"}, "no such file"),
    ({"factory": object, "dataset": ROWS}, "has no public methods"),
])
def test_bad_setups_are_config_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TRLEnvironment(**kwargs)
