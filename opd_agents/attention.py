"""The attention a loaded model runs on the CPU: grouped heads read natively, and a prompt prefix that many
rows share attended from one copy of its keys/values (cascade attention).

``GQA_SDPA`` is transformers' ``sdpa`` without its ``repeat_kv``. Inside ``attending_to(prefix)`` every row
of the batch also attends to ``prefix`` — the keys/values of positions ``0..P-1`` that all rows start with,
held once ([1, H, P, D] per layer) instead of once per row — while the model's own cache holds only what
follows it. The two parts are computed separately (each with its log-sum-exp) and merged exactly, so the
result equals attention over the concatenated keys up to floating-point rounding. The engine's 32 episodes of
the quickstart share a 354-token system prompt + tool schemas: one copy instead of 32, and a decode step reads
it once.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

GQA_SDPA = "opd_sdpa_native_gqa"

# Per layer (keys, values) [1, H_kv, P, D] of the prefix every row of the current forward continues.
_PREFIX: contextvars.ContextVar[tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]] | None] = \
    contextvars.ContextVar("opd_agents_attended_prefix", default=None)


@contextlib.contextmanager
def attending_to(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> Iterator[None]:
    """Forwards inside this block attend to these per-layer prefix keys/values before their own cache
    (no grad: the prefix part's log-sum-exp has no backward). Only a model that ``cascades`` reads them."""
    token = _PREFIX.set((keys, values))
    try:
        yield
    finally:
        _PREFIX.reset(token)


def cascades(model: torch.nn.Module) -> bool:
    """Whether ``model`` honours ``attending_to``: it runs ``GQA_SDPA`` on the CPU, over full (not sliding or
    soft-capped) attention."""
    config = getattr(model, "config", None)
    return (getattr(config, "_attn_implementation", None) == GQA_SDPA
            and next(model.parameters()).device.type == "cpu"
            and getattr(config, "sliding_window", None) is None
            and getattr(config, "attn_logit_softcapping", None) is None)


def _flash(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
           causal: bool, scaling: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's CPU attention kernel: output [B, Hq, T, D] and its log-sum-exp [B, Hq, T] (fp32)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, is_causal=causal, attn_mask=mask, scale=scaling)


def _cascade(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
             causal: bool, scaling: float | None, prefix_keys: torch.Tensor,
             prefix_values: torch.Tensor) -> torch.Tensor:
    """Attention of ``query`` [B, Hq, T, D] over the shared prefix [1, Hkv, P, D] and then the rows' own
    ``key`` / ``value`` [B, Hkv, S, D] (``mask``: bool [B, 1, T, S], True = attend), as [B, Hq, T, D]."""
    rows, heads, length, dim = query.shape
    kv_heads = prefix_keys.shape[1]
    # Prefix: every row's queries (and the query heads of a key/value head) as one long sequence of one row.
    folded = query.reshape(rows, kv_heads, -1, dim).transpose(0, 1).reshape(1, kv_heads, -1, dim)
    out_p, lse_p = _flash(folded, prefix_keys.to(query.dtype), prefix_values.to(query.dtype), None, False, scaling)
    out_p = out_p.reshape(kv_heads, rows, -1, dim).transpose(0, 1).reshape(rows, heads, length, dim)
    lse_p = lse_p.reshape(kv_heads, rows, -1).transpose(0, 1).reshape(rows, heads, length)
    if key.shape[2] == 0:
        return out_p
    additive = None
    if mask is not None:  # the kernel takes an additive mask in the query's dtype
        additive = torch.zeros(mask.shape, dtype=query.dtype).masked_fill_(~mask, float("-inf"))
    out_s, lse_s = _flash(query, key, value, additive, causal, scaling)
    if mask is not None:  # the kernel gives a query that sees none of its own keys (left padding) lse 0
        lse_s = lse_s.masked_fill(~mask.any(dim=-1), float("-inf"))
    top = torch.maximum(lse_p, lse_s)
    w_p, w_s = (lse_p - top).exp(), (lse_s - top).exp()
    merged = (out_p.float() * w_p[..., None] + out_s.float() * w_s[..., None]) / (w_p + w_s)[..., None]
    return merged.to(query.dtype)


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
    causal = bool(query.shape[2] > 1 and attention_mask is None and
                  (is_causal if is_causal is not None else getattr(module, "is_causal", True)))
    prefix = _PREFIX.get()
    if prefix is not None:
        layer = getattr(module, "layer_idx", 0)
        out = _cascade(query, key, value, attention_mask, causal, scaling, prefix[0][layer], prefix[1][layer])
    else:
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=causal,
            enable_gqa=True)
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
