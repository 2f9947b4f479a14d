"""Registers every shipped environment with gymnasium under the ``opd_agents/`` namespace."""

from __future__ import annotations

import difflib

import gymnasium as gym

from opd_agents.errors import UnknownEnvError

SHIPPED_ENVS: dict[str, str] = {
    "opd_agents/Arithmetic-v0": "environments.arithmetic:ArithmeticEnv",
    "opd_agents/PythonMath-v0": "environments.python_math:PythonMathEnv",
    "opd_agents/RetrievalQA-v0": "environments.retrieval_qa:RetrievalQAEnv",
    "opd_agents/TextWorld-v0": "environments.textworld_quest:TextWorldEnv",  # extra: opd-agents[textworld]
}


def register_shipped_envs() -> None:
    for env_id, entry_point in SHIPPED_ENVS.items():
        if env_id not in gym.registry:
            # The env checker wrapper would sample observations from our custom space; the test suite
            # runs gymnasium.utils.env_checker.check_env on every env explicitly instead.
            gym.register(id=env_id, entry_point=entry_point, disable_env_checker=True)


def resolve_env_id(env_id: str) -> str:
    """The registered id of ``env_id`` (the short name ``Arithmetic-v0`` works too). UnknownEnvError lists the
    opd_agents envs and suggests the closest registered id."""
    register_shipped_envs()
    if env_id not in gym.registry and f"opd_agents/{env_id}" in gym.registry:
        env_id = f"opd_agents/{env_id}"
    if env_id in gym.registry:
        return env_id
    known = ", ".join(sorted(k for k in gym.registry if k.startswith("opd_agents/")))
    # Short names compete too, so "Arithmetic" finds opd_agents/Arithmetic-v0; 0.75 keeps "Nope-v0" hint-free.
    names = {k.removeprefix("opd_agents/"): k for k in gym.registry} | {k: k for k in gym.registry}
    close = difflib.get_close_matches(env_id.removeprefix("opd_agents/"), list(names), n=1, cutoff=0.75)
    hint = f" (did you mean {names[close[0]]!r}?)" if close else ""
    raise UnknownEnvError(f"unknown environment {env_id!r}{hint}; registered opd_agents envs: {known}")


def make_env(env_id: str, **kwargs: object) -> gym.Env:
    """``gymnasium.make`` that accepts the short name (``Arithmetic-v0``) too (``.unwrapped`` is the ToolEnv)."""
    return gym.make(resolve_env_id(env_id), **kwargs)
