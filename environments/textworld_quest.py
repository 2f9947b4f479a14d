"""TextWorld: text-adventure quests (Microsoft TextWorld) played through one ``act`` tool.

Each task seed generates (once, then from a content-addressed cache) a TextWorld game of ``world_size``
rooms, ``nb_objects`` objects and a quest of ``quest_length`` actions. The student sends one game command
per ``act`` call; the episode ends by itself when the game is won (reward 1) or lost. The game's own
walkthrough from the current state is both the scripted expert (so it recovers after a student's
mistake) and the per-turn judge: a turn is ``invalid`` if a command was not admissible (it is then not
sent to the game), ``off_plan`` if the remaining walkthrough grew, ``ok`` otherwise.

With ``game_dir`` / ``game_files`` it plays existing TextWorld games instead (ALFWorld's ``*.tw-pddl``,
Inform ``*.z8`` with their ``.json``); nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from opd_agents.env.core import EnvLimits, Task, ToolEnv
from opd_agents.env.parsers import ToolCallParser
from opd_agents.env.tool import StopEpisode, Tool, tool
from opd_agents.errors import ConfigError
from opd_agents.types import ErrorType, Message, TurnOutcome

if TYPE_CHECKING:
    import textworld

INSTALL_HINT = "pip install 'opd-agents[textworld]'"
CACHE_ENV_VAR = "OPD_AGENTS_TEXTWORLD_CACHE"
GAME_SUFFIXES = (".z8", ".z5", ".tw-pddl")  # what a game_dir is searched for (a .z8's .json sits beside it)
CACHE_FORMAT = 2  # bump when generation changes, so old cached games are not reused
MAX_GENERATION_ATTEMPTS = 10
# textworld's generator (knowledge base, grammar) and its game loader (a shared tatsu parser: concurrent
# loads fail with "IndexError: pop from empty list") keep global state.
_LIBRARY_LOCK = threading.Lock()

PROMPT = (
    "You are playing a text adventure game. Send one game command per call to the act tool, for example "
    '"go north", "take key", "open door", "unlock chest with key", "put apple on table", "look" or '
    '"inventory". The game ends by itself once the quest is done.\n\n'
    "{objective}\n\n{description}"
)


def _require_textworld() -> Any:
    try:
        import textworld
        import textworld.generator
    except ImportError as e:
        raise ConfigError(f"opd_agents/TextWorld-v0 needs the textworld package ({e}); install it with: "
                          f"{INSTALL_HINT}") from None
    return textworld


def clean_feedback(text: str) -> str:
    """The game's answer without its end-of-game menu, command prompt and status line."""
    text = text.split("*** The End ***")[0]
    if "\n>" in text:
        text = text[: text.rindex("\n>")]
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def game_seeds(rng: np.random.Generator) -> dict[str, int]:
    """TextWorld's four generator seeds, drawn from the task seed's RNG."""
    return {k: int(rng.integers(65_535)) for k in ("map", "objects", "quest", "grammar")}


class TextWorldEnv(ToolEnv):
    """Generated TextWorld quests (or local game files); the student plays with ``act(command)``."""

    system_prompt: ClassVar[str] = (
        "You are an agent playing a text adventure game. Read the room descriptions, then send exactly one "
        "game command per turn with the act tool until the quest is complete."
    )

    def __init__(self, quest_length: int = 4, nb_objects: int = 6, world_size: int = 3,
                 cache_dir: str | os.PathLike[str] | None = None, game_dir: str | os.PathLike[str] | None = None,
                 game_files: list[str] | str | None = None, parser: str | ToolCallParser = "hermes",
                 limits: EnvLimits | dict[str, Any] | None = None, render_mode: str | None = None) -> None:
        if not (isinstance(quest_length, int) and 2 <= quest_length <= 20):
            raise ConfigError(f"quest_length must be an integer in 2..20 (actions), got {quest_length!r}")
        if not (isinstance(world_size, int) and 1 <= world_size <= 20):
            raise ConfigError(f"world_size must be an integer in 1..20 (rooms), got {world_size!r}")
        if not (isinstance(nb_objects, int) and 0 <= nb_objects <= 50):
            raise ConfigError(f"nb_objects must be an integer in 0..50, got {nb_objects!r}")
        self.textworld = _require_textworld()
        self.quest_length, self.nb_objects, self.world_size = quest_length, nb_objects, world_size
        self.games = _list_games(game_dir, game_files)
        root = Path(cache_dir or os.environ.get(CACHE_ENV_VAR) or default_cache_dir()).expanduser()
        self.cache_root = root / self.settings_hash()
        if not isinstance(limits, EnvLimits):  # a quest needs about quest_length turns; leave room for detours
            budget = 3 * quest_length + 4
            limits = {"max_turns": budget, "max_tool_calls": budget, **(limits or {})}
        super().__init__(parser=parser, limits=limits, render_mode=render_mode)
        self._game: textworld.Environment | None = None
        self._state: textworld.GameState | None = None
        self._turn_invalid = False

    # ---- games ----------------------------------------------------------------------------------
    def settings_hash(self) -> str:
        settings = {"quest_length": self.quest_length, "nb_objects": self.nb_objects,
                    "world_size": self.world_size, "textworld": self.textworld.__version__, "format": CACHE_FORMAT}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

    def game_path(self, seed: int, rng: np.random.Generator) -> Path:
        """The task's game file: a local game (``seed % len(games)``) or the cached generated one."""
        if self.games:
            return self.games[seed % len(self.games)]
        path = self.cache_root / str(seed) / "game.z8"
        if not (path.is_file() and path.with_suffix(".json").is_file()):
            self._generate(seed, rng, path)
        return path

    def _generate(self, seed: int, rng: np.random.Generator, path: Path) -> None:
        """Build the game in a private dir, then rename it into place (concurrent builders cannot clash).

        Some generated games cannot be won by their own walkthrough (two objects named "box" and "type B box":
        the parser asks "Which do you mean?" forever); those are redrawn from the same RNG, so still
        deterministically."""
        path.parent.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{seed}-", dir=path.parent.parent))
        try:
            options = self.textworld.GameOptions()
            options.path, options.force_recompile = str(tmp / path.name), True
            options.nb_rooms, options.nb_objects, options.quest_length = (self.world_size, self.nb_objects,
                                                                          self.quest_length)
            for _ in range(MAX_GENERATION_ATTEMPTS):
                options.seeds = game_seeds(rng)
                with _LIBRARY_LOCK:
                    try:
                        game = self.textworld.generator.make_game(options)
                    except Exception as e:  # noqa: BLE001 - textworld's own errors: no quest fits these settings
                        raise ConfigError(
                            f"TextWorld cannot generate a quest_length={self.quest_length} quest in "
                            f"world_size={self.world_size} rooms with nb_objects={self.nb_objects} (task seed "
                            f"{seed}): {type(e).__name__}: {e}; try more rooms or objects") from e
                    self.textworld.generator.compile_game(game, options)
                if self._walkthrough_wins(tmp / path.name):
                    break
            else:
                raise ConfigError(f"TextWorld generated no winnable game for task seed {seed} in "
                                  f"{MAX_GENERATION_ATTEMPTS} attempts (quest_length={self.quest_length})")
            try:
                tmp.rename(path.parent)
            except OSError:  # another process built it first: same seed and settings, same game
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _walkthrough_wins(self, path: Path) -> bool:
        state = self._start(path)
        for _ in range(2 * self.quest_length + 4):
            plan = list(state.get("policy_commands") or [])
            if state.get("won") or state.get("lost") or not plan:
                break
            state, _, _ = self._game.step(plan[0])  # type: ignore[union-attr]
        self.close()
        return bool(state.get("won"))

    def _start(self, path: Path) -> textworld.GameState:
        self.close()
        infos = self.textworld.EnvInfos(admissible_commands=True, policy_commands=True, objective=True,
                                        description=True, won=True, lost=True)
        with _LIBRARY_LOCK, warnings.catch_warnings():  # jericho: "not fully supported" (its score tracking)
            warnings.filterwarnings("ignore", message=r".*is not fully supported")
            self._game = self.textworld.start(str(path), infos)
            self._state = self._game.reset()
        return self._state

    def close(self) -> None:
        if self._game is not None:
            self._game.close()
            self._game = None

    def _plan(self) -> list[str]:
        assert self._state is not None
        return list(self._state.get("policy_commands") or [])

    # ---- ToolEnv hooks --------------------------------------------------------------------------
    def generate_task(self, rng: np.random.Generator, seed: int, split: str) -> Task:
        path = self.game_path(seed, rng)
        state = self._start(path)
        walkthrough = self._plan()
        steps = "\n".join(f"{i}. {c}" for i, c in enumerate(walkthrough, 1))
        kind = f"game{seed % len(self.games)}" if self.games else f"q{self.quest_length}"
        return Task(
            id=f"textworld-{kind}-{seed}", seed=seed, split=split, answer="won",
            reference=f"Walkthrough (game commands in order):\n{steps}",
            prompt=PROMPT.format(objective=clean_feedback(state.get("objective") or ""),
                                 description=clean_feedback(state.get("description") or "")),
            data={"game_file": str(path), "walkthrough": walkthrough},
        )

    def grade(self, task: Task, answer: str) -> float:
        """A final message scores only if the quest is won (a won game already ended the episode)."""
        return 1.0 if self._state is not None and self._state.get("won") else 0.0

    def expert_action(self, task: Task, history: list[Message]) -> str:
        """The next command of the walkthrough from the current state (so it recovers from detours)."""
        plan = self._plan()
        if not plan:
            return "The quest is complete."
        return self.parser.format_call("act", {"command": plan[0]})

    @tool(timeout_s=30.0)
    def act(self, command: str) -> str:
        """Send one command to the text adventure game and return what the game answers.

        Args:
            command: one game command, e.g. "go east", "take key", "open box", "look", "inventory"
        """
        assert self._game is not None and self._state is not None
        command = " ".join(command.split())
        admissible = {c.lower(): c for c in self._state.get("admissible_commands") or []}
        if command.lower() not in admissible:  # refused, not sent: the game state stays as it was
            self._turn_invalid = True
            return (f"'{command}' is not possible here. Possible commands: "
                    + ", ".join(sorted(admissible.values())))
        self._state, _, _ = self._game.step(admissible[command.lower()])
        text = clean_feedback(self._state.feedback) or "(no answer)"
        if self._state.get("won"):
            raise StopEpisode(f"{text}\n\nYou won: the quest is complete.")
        if self._state.get("lost"):
            raise StopEpisode(f"{text}\n\nYou lost: the quest can no longer be completed.")
        return text

    tools: ClassVar[list[Tool]] = [act]

    # ---- gymnasium API --------------------------------------------------------------------------
    def step(self, action: str) -> tuple[list, float, bool, bool, dict[str, Any]]:
        plan_before = len(self._plan()) if self._state is not None else 0
        self._turn_invalid = False
        obs, reward, terminated, truncated, info = super().step(action)
        results = info["tool_results"]
        if results:  # a final message has no outcome: it does not act on the game
            # not_executed: calls after the winning one; every other error means the game refused the turn
            refused = self._turn_invalid or any(r.error_type not in (None, ErrorType.not_executed) for r in results)
            grew = bool(self._state.get("lost")) or len(self._plan()) > plan_before
            info["turn_outcome"] = (TurnOutcome.invalid if refused else
                                    TurnOutcome.off_plan if grew else TurnOutcome.ok)
        if self._state is not None and self._state.get("won") and info["stop_reason"] is not None:
            reward += 1.0
            info["success"] = True
            info["reward_parts"]["won"] = 1.0
        if terminated or truncated:
            self.close()  # the rollout makes an env per episode and drops it: free the interpreter now
        return obs, reward, terminated, truncated, info

    def end_episode(self) -> None:
        super().end_episode()
        self.close()


def default_cache_dir() -> Path:
    """Beside the other opd-agents caches (``models.cache_dir``; not imported: that module loads torch)."""
    return Path(os.environ.get("OPD_AGENTS_CACHE") or "~/.cache/opd_agents") / "textworld"


def _list_games(game_dir: str | os.PathLike[str] | None, game_files: list[str] | str | None) -> list[Path]:
    """Local game files, sorted (so a seed always picks the same game); ConfigError if none or missing."""
    if game_dir is None and game_files is None:
        return []
    if game_dir is not None and game_files is not None:
        raise ConfigError("give game_dir or game_files, not both")
    if game_dir is not None:
        root = Path(game_dir).expanduser()
        if not root.is_dir():
            raise ConfigError(f"game_dir {str(root)!r} is not a directory")
        games = sorted(p for p in root.rglob("*") if p.suffix in GAME_SUFFIXES and p.is_file())
        if not games:
            raise ConfigError(f"game_dir {str(root)!r} holds no game files ({', '.join(GAME_SUFFIXES)})")
        return games
    assert game_files is not None
    game_files = [game_files] if isinstance(game_files, str) else game_files
    missing = [f for f in game_files if not Path(f).expanduser().is_file()]
    if missing or not game_files:
        raise ConfigError(f"game_files: missing or empty: {missing or game_files!r}")
    return [Path(f).expanduser() for f in game_files]
