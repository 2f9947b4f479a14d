"""Registers every shipped environment with gymnasium under the ``opd_agents/`` namespace."""

from __future__ import annotations

import gymnasium as gym

SHIPPED_ENVS: dict[str, str] = {
    "opd_agents/Arithmetic-v0": "environments.arithmetic:ArithmeticEnv",
    "opd_agents/PythonMath-v0": "environments.python_math:PythonMathEnv",
    "opd_agents/RetrievalQA-v0": "environments.retrieval_qa:RetrievalQAEnv",
}


def register_shipped_envs() -> None:
    for env_id, entry_point in SHIPPED_ENVS.items():
        if env_id not in gym.registry:
            # The env checker wrapper would sample observations from our custom space; the test suite
            # runs gymnasium.utils.env_checker.check_env on every env explicitly instead.
            gym.register(id=env_id, entry_point=entry_point, disable_env_checker=True)


def make_env(env_id: str, **kwargs: object) -> gym.Env:
    """``gymnasium.make`` that accepts the short name (``Arithmetic-v0``) too; returns the unwrapped env."""
    register_shipped_envs()
    if env_id not in gym.registry and f"opd_agents/{env_id}" in gym.registry:
        env_id = f"opd_agents/{env_id}"
    if env_id not in gym.registry:
        known = ", ".join(sorted(k for k in gym.registry if k.startswith("opd_agents/")))
        raise ValueError(f"unknown environment {env_id!r}; registered opd_agents envs: {known}")
    return gym.make(env_id, **kwargs)
