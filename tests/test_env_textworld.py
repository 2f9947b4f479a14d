"""opd_agents/TextWorld-v0 on real textworld and real generated games (built once per session, ≈2 s each)."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

from environments.textworld_quest import TextWorldEnv
from opd_agents import heldout_seeds
from opd_agents.rollout.expert import play_expert
from opd_agents.env.parsers import ParsedTurn, ToolCallParser
from opd_agents.env.registry import make_env
from opd_agents.errors import ConfigError, EnvOrderError
from opd_agents.types import StopReason, ToolCall, TurnOutcome


@pytest.fixture(scope="session")
def tw_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One game cache for the session: each (settings, seed) is generated once, by the first test needing it."""
    return tmp_path_factory.mktemp("textworld-cache")


def make(cache: Path, **kwargs: Any) -> TextWorldEnv:
    return TextWorldEnv(cache_dir=cache, **kwargs)


def act(env: TextWorldEnv, command: str) -> tuple[list, float, bool, bool, dict[str, Any]]:
    return env.step(env.parser.format_call("act", {"command": command}))


@pytest.mark.parametrize("quest_length", [2, 4])
def test_expert_wins(tw_cache: Path, quest_length: int) -> None:
    trajs = play_expert(lambda: make(tw_cache, quest_length=quest_length), [0, 1], env_id="opd_agents/TextWorld-v0")
    for traj in trajs:
        assert traj.success and traj.reward == 1.0 and traj.terminated
        assert traj.stop_reason == StopReason.tool_stop
        assert all(t.outcome == TurnOutcome.ok for t in traj.turns)  # record_step stored the env's outcome
        assert "You won" in traj.messages[-1].content
        assert len(traj.turns) == len(_walkthrough(tw_cache, quest_length, traj.seed))  # no wasted turn


def test_unwinnable_games_are_redrawn(tw_cache: Path) -> None:
    """Seed 1000000 at quest length 8 first drew a game with a "box" and a "type B box", where the walkthrough's
    "take type B passkey from box" only ever gets "Which do you mean...?"; generation redraws such games."""
    traj = play_expert(lambda: make(tw_cache, quest_length=8), [1_000_000])[0]
    assert traj.success and not any("Which do you mean" in r.content for t in traj.turns for r in t.tool_results)


@pytest.mark.parametrize("parser", ["fenced_json", "react"])
def test_expert_wins_in_other_tool_call_formats(tw_cache: Path, parser: str) -> None:
    traj = play_expert(lambda: make(tw_cache, quest_length=2, parser=parser), [0])[0]
    assert traj.success and all(t.outcome == TurnOutcome.ok for t in traj.turns)


def _walkthrough(cache: Path, quest_length: int, seed: int) -> list[str]:
    env = make(cache, quest_length=quest_length)
    env.reset(seed=seed)
    assert env.task is not None
    return env.task.data["walkthrough"]


def test_invalid_command_is_refused_and_the_episode_goes_on(tw_cache: Path) -> None:
    env = make(tw_cache, quest_length=2)
    env.reset(seed=0)
    plan = list(env.task.data["walkthrough"])  # type: ignore[union-attr]
    obs, reward, terminated, truncated, info = act(env, "dance with the moon")
    assert info["turn_outcome"] == TurnOutcome.invalid and not (terminated or truncated) and reward == 0.0
    assert "not possible here" in obs[0]["content"] and "Possible commands:" in obs[0]["content"]
    _, _, _, _, info = env.step("no tool call here <tool_call>{broken")  # unparseable: refused too
    assert info["turn_outcome"] == TurnOutcome.invalid
    for command in plan:  # the game state did not move: the original walkthrough still wins
        obs, reward, terminated, _, info = act(env, command)
    assert terminated and reward == 1.0 and info["success"] and info["turn_outcome"] == TurnOutcome.ok
    assert env._game is None  # the interpreter is released when the episode ends
    with pytest.raises(EnvOrderError):
        act(env, "look")


def test_detour_is_off_plan_and_the_expert_recovers(tw_cache: Path) -> None:
    env = make(tw_cache, quest_length=4)
    env.reset(seed=0)
    _, _, _, _, info = act(env, "look")
    assert info["turn_outcome"] == TurnOutcome.ok  # looking around does not move the goal
    assert env.task is not None and env._state is not None
    first_step = env.task.data["walkthrough"][0]
    detours = [c for c in env._state.get("admissible_commands") if c.startswith("go ") and c != first_step]
    assert detours, "seed 0 starts in a room with a wrong exit"
    _, _, terminated, _, info = act(env, detours[0])
    assert info["turn_outcome"] == TurnOutcome.off_plan and not terminated
    for _ in range(12):
        obs, reward, terminated, truncated, info = env.step(env.expert_action(env.task, env.history))
        if terminated or truncated:
            break
    assert info["success"] and reward == 1.0


def test_cache_hit_is_fast_and_identical(tw_cache: Path) -> None:
    first = make(tw_cache, quest_length=2)
    obs1, _ = first.reset(seed=1)
    path = Path(first.task.data["game_file"])  # type: ignore[union-attr]
    mtime = path.stat().st_mtime_ns
    start = time.perf_counter()
    second = make(tw_cache, quest_length=2)
    obs2, _ = second.reset(seed=1)
    assert time.perf_counter() - start < 1.0  # starting a cached game, no generation
    assert obs1 == obs2 and second.task == first.task and path.stat().st_mtime_ns == mtime
    assert path.parent.parent.name == first.settings_hash() != make(tw_cache, quest_length=3).settings_hash()


def test_generation_is_deterministic(tw_cache: Path, tmp_path: Path) -> None:
    fresh = make(tmp_path, quest_length=2)
    cached = make(tw_cache, quest_length=2)
    assert fresh.reset(seed=1)[0] == cached.reset(seed=1)[0]
    assert fresh.task.data["walkthrough"] == cached.task.data["walkthrough"]  # type: ignore[union-attr]


def test_heldout_and_train_seeds_differ(tw_cache: Path) -> None:
    env = make(tw_cache, quest_length=2)
    obs_train, info_train = env.reset(seed=0)
    train_task = env.task
    obs_held, info_held = env.reset(seed=heldout_seeds(1)[0])
    assert env.task is not None and train_task is not None
    assert (info_train["split"], info_held["split"]) == ("train", "heldout")
    assert obs_train != obs_held and env.task.data["game_file"] != train_task.data["game_file"]
    assert "Walkthrough" in env.task.reference


def test_order_errors_and_gymnasium_make(tw_cache: Path) -> None:
    env = make_env("TextWorld-v0", quest_length=2, cache_dir=str(tw_cache))
    with pytest.raises(EnvOrderError):
        env.unwrapped.step("look")
    env.reset(seed=0)
    _, _, terminated, _, info = env.step("I give up.")  # a final message without a win scores 0
    assert terminated and info["stop_reason"] == StopReason.completed and not info["success"]
    assert "turn_outcome" not in info
    with pytest.raises(gym.error.ResetNeeded):
        env.step("look")
    env.close()


def test_check_env_passes(tw_cache: Path) -> None:
    """Gymnasium's checker (≈6 resets on seeds it draws, so ≈6 generated games: ≈9 s)."""
    check_env(make(tw_cache, quest_length=2), skip_render_check=True)


@pytest.mark.parametrize("kwargs", [{"quest_length": 1}, {"quest_length": 21}, {"world_size": 0},
                                    {"nb_objects": -1}, {"game_dir": "/nonexistent/games"},
                                    {"game_files": ["/nonexistent/g.z8"]}])
def test_bad_settings_are_refused(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        TextWorldEnv(cache_dir=tmp_path, **kwargs)


def test_missing_textworld_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "textworld", None)  # makes `import textworld` fail
    with pytest.raises(ConfigError, match=r"pip install 'opd-agents\[textworld\]'"):
        TextWorldEnv(cache_dir=tmp_path)


def test_local_game_files_are_playable(tw_cache: Path, tmp_path: Path) -> None:
    """A directory of ready-made games (as ALFWorld ships them) plays through the same adapter."""
    source = make(tw_cache, quest_length=2)
    for seed in (0, 1):
        source.reset(seed=seed)
        game = Path(source.task.data["game_file"])  # type: ignore[union-attr]
        shutil.copytree(game.parent, tmp_path / "games" / f"trial-{seed}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no game files"):
        TextWorldEnv(game_dir=tmp_path / "empty")
    trajs = play_expert(lambda: TextWorldEnv(game_dir=tmp_path / "games"), [0, 1, 2])
    assert all(t.success for t in trajs)
    assert [t.task_id for t in trajs] == ["textworld-game0-0", "textworld-game1-1", "textworld-game0-2"]
    assert trajs[0].messages[1] == trajs[2].messages[1]  # seed % number of games picks the game
    files = [str(tmp_path / "games" / "trial-1" / "game.z8")]
    assert play_expert(lambda: TextWorldEnv(game_files=files), [5])[0].success


class CommandParser(ToolCallParser):
    """Every message is an ``act`` command, so a random tiny model plays real (refused) game turns."""

    name = "command"
    stop_strings = tuple("aeiounst")

    def parse(self, text: str) -> ParsedTurn:
        return ParsedTurn(calls=[ToolCall(name="act", arguments={"command": text})])

    def format_call(self, name: str, arguments: dict[str, Any]) -> str:
        return str(arguments["command"])


def test_rollout_stores_turn_outcomes(tw_cache: Path, tiny_model_dir: Path) -> None:
    from opd_agents.models import load_model
    from opd_agents.rollout.renderer import ChatMLRenderer
    from opd_agents.rollout.runner import Rollout
    from opd_agents.rollout.hf_engine import HFEngine
    from opd_agents.types import SamplingParams

    model, tok = load_model(tiny_model_dir)
    factory = lambda: make(tw_cache, quest_length=2, parser=CommandParser(), limits={"max_turns": 3})  # noqa: E731
    engine = HFEngine(model, ChatMLRenderer(tok, factory().parser))
    trajs = Rollout(engine, factory, SamplingParams(max_tokens_per_turn=48, seed=0), max_episodes=2).run([0, 1])
    for traj in trajs:
        assert traj.stop_reason == StopReason.max_turns and not traj.success
        assert [t.outcome for t in traj.turns] == [TurnOutcome.invalid] * 3  # random text is never admissible


def test_episodes_start_concurrently(tw_cache: Path) -> None:
    """The rollout resets envs in worker threads; textworld's game loader shares one parser (concurrent
    loads failed with "IndexError: pop from empty list"), so loading is serialized inside the env."""
    from concurrent.futures import ThreadPoolExecutor

    seeds = [0, 1, 2, 3, 0, 1, 2, 3]
    for s in set(seeds):  # generated (or cached) first: this test is about loading
        make(tw_cache, quest_length=2).reset(seed=s)

    def start(seed: int) -> str:
        env = make(tw_cache, quest_length=2)
        messages, _ = env.reset(seed=seed)
        env.close()
        return messages[1]["content"]

    with ThreadPoolExecutor(8) as pool:
        prompts = list(pool.map(start, seeds))
    assert prompts[:4] == prompts[4:]
