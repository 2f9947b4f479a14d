"""The sampling boundary: one engine protocol at the token level, and the registry of engines.

An engine turns token ids into sampled token ids, per request, asynchronously (in the spirit of
tinker-cookbook's ``TokenCompleter``). A request carries the episode's whole sequence so far; an engine
may reuse what it cached for the same ``session`` (the HF engine keeps the episode's KV cache between
turns, vLLM its prefix cache), so callers never manage caches. ``Rollout``, evaluation and the teacher
players depend on this protocol only; adding an engine = one class + one ``register_engine`` line.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from opd_agents.errors import ConfigError

if TYPE_CHECKING:
    from opd_agents.rollout.renderer import Renderer

Finish = Literal["stop", "tool_call", "length"]


@dataclass(frozen=True)
class CompletionRequest:
    prompt_ids: list[int]  # the whole sequence so far (prompt, earlier turns, observations)
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # per-request RNG: results do not depend on what else is in the batch
    session: str | None = None  # the episode: what the engine cached for it may be reused
    order: int = 0  # requests admitted together are batched in this order (the episode's place in its rollout)


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # log pi(token | prefix) at the sampling temperature (1 if greedy), before top-p
    finish: Finish


@runtime_checkable
class SamplingEngine(Protocol):
    """Samples one assistant turn per request. Stops at the renderer's end-of-turn ids, after a closed
    tool call (its stop strings) or at ``max_tokens``; ``renderer`` says which ids and strings those are."""

    renderer: Renderer

    async def complete(self, request: CompletionRequest) -> Completion: ...

    def release(self, session: str) -> None:
        """The episode ended: forget what was cached for it."""

    def load_weights(self, model: Any) -> None:
        """Sample with ``model``'s current weights from now on (the trainer calls it after every optimizer
        step; an engine that runs the trainer's own module needs to do nothing)."""

    def close(self) -> None: ...


AdmissionGate = Callable[[], Awaitable[None]]


@runtime_checkable
class GatedEngine(Protocol):
    """An engine that batches requests by arrival can wait on a gate before it admits new ones. The rollout
    gates it until no env step is in flight (every live episode is waiting on the engine), so which requests
    share a batch is a function of the seeds, not of thread timing: a seeded run repeats bit for bit."""

    admission_gate: AdmissionGate | None


EngineFactory = Callable[..., SamplingEngine]
ENGINES: dict[str, EngineFactory] = {}


def register_engine(name: str) -> Callable[[EngineFactory], EngineFactory]:
    def add(factory: EngineFactory) -> EngineFactory:
        ENGINES[name] = factory
        return factory

    return add


def engine_names() -> list[str]:
    """The registered engines (the built-in ones are registered on first call)."""
    import opd_agents.rollout.hf_engine  # noqa: F401  (registers "hf")
    import opd_agents.rollout.vllm_engine  # noqa: F401  (registers "vllm"; vllm itself is imported on use)

    return sorted(ENGINES)


def check_engine(name: str) -> None:
    if name not in engine_names():
        raise ConfigError(f"unknown rollout engine '{name}'; known: {', '.join(engine_names())}")


def make_engine(name: str, **kwargs: Any) -> SamplingEngine:
    """Build a registered engine (``hf``, ``vllm``, ...) from its keyword arguments (model, renderer, ...)."""
    check_engine(name)
    return ENGINES[name](**kwargs)
