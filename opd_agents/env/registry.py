"""Environment references: shipped envs (``opd_agents/`` namespace), envs of installed packages (entry
points in the ``opd_agents.envs`` group) and envs by import path.

Everywhere an env id is accepted (configs, ``--env``) it may be:
- a registered gymnasium id, or its short name without ``opd_agents/`` (``Arithmetic-v0``);
- ``module:ClassName``: the class is imported and made directly (no registration needed);
- ``module:registered-id``: gymnasium's own convention (importing the module registers the id).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata

import gymnasium as gym
from gymnasium.envs.registration import EnvSpec

from opd_agents.errors import UnknownEnvError

SHIPPED_ENVS: dict[str, str] = {
    "opd_agents/Arithmetic-v0": "environments.arithmetic:ArithmeticEnv",
    "opd_agents/PythonMath-v0": "environments.python_math:PythonMathEnv",
    "opd_agents/RetrievalQA-v0": "environments.retrieval_qa:RetrievalQAEnv",
    "opd_agents/TextWorld-v0": "environments.textworld_quest:TextWorldEnv",  # extra: opd-agents[textworld]
}


ENTRY_POINT_GROUP = "opd_agents.envs"


def plugin_envs() -> dict[str, str]:
    """Envs that installed packages declare, ``{id: "module:Class"}``: in pyproject.toml,
    ``[project.entry-points."opd_agents.envs"]`` ``"mypkg/Units-v0" = "mypkg.envs:UnitsEnv"``."""
    return {ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def register_shipped_envs() -> None:
    """Register the shipped envs and the installed packages' envs with gymnasium (once)."""
    for env_id, entry_point in {**SHIPPED_ENVS, **plugin_envs()}.items():
        if env_id not in gym.registry:
            # The env checker wrapper would sample observations from our custom space; the test suite
            # runs gymnasium.utils.env_checker.check_env on every env explicitly instead.
            gym.register(id=env_id, entry_point=entry_point, disable_env_checker=True)


def _import_reference(ref: str) -> EnvSpec | str:
    """``module:ClassName`` -> a spec of that class; ``module:id`` -> ``id`` (the import registered it)."""
    module_name, _, name = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UnknownEnvError(f"environment {ref!r}: cannot import module {module_name!r} ({e})") from e
    obj = getattr(module, name, None)
    if obj is None:
        return name
    if not (isinstance(obj, type) and issubclass(obj, gym.Env)):
        raise UnknownEnvError(f"environment {ref!r}: {module_name}.{name} is not a gymnasium.Env subclass")
    return EnvSpec(id=ref, entry_point=obj, disable_env_checker=True)


def env_spec(ref: str) -> EnvSpec:
    """The gymnasium spec an env reference names (see the module docstring)."""
    if ":" in ref:
        found = _import_reference(ref)
        if isinstance(found, EnvSpec):
            return found
        return gym.spec(resolve_env_id(found))
    return gym.spec(resolve_env_id(ref))


def resolve_env_id(env_id: str) -> str:
    """The canonical form of an env reference: the registered id of ``env_id`` (the short name
    ``Arithmetic-v0`` works too), or ``module:ClassName`` itself. UnknownEnvError lists the opd_agents envs
    and suggests the closest registered id."""
    register_shipped_envs()
    if ":" in env_id:
        found = _import_reference(env_id)
        return env_id if isinstance(found, EnvSpec) else resolve_env_id(found)
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
    """``gymnasium.make`` on any env reference (``.unwrapped`` is the ToolEnv)."""
    register_shipped_envs()
    return gym.make(env_spec(env_id), **kwargs)
