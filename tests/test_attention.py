"""The CPU attention: grouped heads read natively, and a shared prefix attended from one copy (cascade)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from opd_agents import attention
from opd_agents.attention import GQA_SDPA, attending_to
from opd_agents.models import load_model


def test_native_gqa_attention_equals_transformers_sdpa(tiny_model_dir: Path) -> None:
    """The CPU attention without repeat_kv (load_model's default for grouped-query models) gives the same
    logits as transformers' sdpa over a left-padded batch, in a cached decode step, and the same gradients."""
    from transformers import DynamicCache

    model, _ = load_model(tiny_model_dir)
    assert model.config._attn_implementation == GQA_SDPA  # 4 query heads over 2 key/value heads
    ids = torch.randint(10, 1000, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # a left-padded row
    step = torch.tensor([[11], [12], [13]])

    def run(impl: str) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        model.set_attn_implementation(impl)
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, past_key_values=(cache := DynamicCache()), use_cache=True)
        decoded = model(input_ids=step, attention_mask=torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1),
                        past_key_values=cache, use_cache=True).logits
        (out.logits[mask.bool()].logsumexp(-1).sum() + decoded.logsumexp(-1).sum()).backward()
        return out.logits.detach(), decoded.detach(), [p.grad.clone() for p in model.parameters()]

    plain, native = run("sdpa"), run(GQA_SDPA)
    assert torch.allclose(plain[0][mask.bool()], native[0][mask.bool()], atol=1e-5)
    assert torch.allclose(plain[1], native[1], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(plain[2], native[2], strict=True))


def test_native_gqa_attention_is_transformers_sdpa_off_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model loaded on the CPU keeps ``GQA_SDPA`` when moved to a GPU: there the call goes to transformers'
    ``sdpa`` (the fused GPU kernels want repeat_kv), with every argument."""
    calls: list[dict[str, object]] = []
    monkeypatch.setattr(attention, "sdpa_attention_forward", lambda *args, **kwargs: calls.append(kwargs) or ("out", None))
    q, kv = torch.empty(1, 4, 3, 8, device="meta"), torch.empty(1, 2, 3, 8, device="meta")
    assert attention._sdpa_native_gqa(torch.nn.Module(), q, kv, kv, None, scaling=0.5, is_causal=True) == ("out", None)
    assert calls == [{"dropout": 0.0, "scaling": 0.5, "is_causal": True}]


class _Layer(torch.nn.Module):
    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx, self.is_causal = layer_idx, True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("length", "masked"), [(1, True), (4, True), (4, False)])
def test_cascade_equals_attention_over_the_concatenated_keys(dtype: torch.dtype, length: int, masked: bool) -> None:
    """Rows attending to one copy of a prefix (9 query heads over 3 key/value heads) and then to their own
    keys equal plain attention over [prefix, own keys] in every row: with left padding (a padding query sees
    none of its own keys, only the prefix), in a decode step and in a causal chunk without a mask."""
    gen = torch.Generator().manual_seed(0)
    rows, heads, kv_heads, dim, prefix, own = 3, 9, 3, 16, 11, 6 if masked else length

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    query, keys, values = randn(rows, heads, length, dim), randn(rows, kv_heads, own, dim), randn(rows, kv_heads, own, dim)
    prefix_keys, prefix_values = randn(1, kv_heads, prefix, dim), randn(1, kv_heads, prefix, dim)
    mask = None
    if masked:
        mask = torch.ones(rows, 1, length, own, dtype=torch.bool)
        mask[..., own - length:] = torch.ones(length, length, dtype=torch.bool).tril()
        mask[0, ..., : own - 1] = False  # row 0: left padding; its first queries see no key of their own
        mask[0, :, 0, own - length] = False
    with attending_to([prefix_keys], [prefix_values]):
        out, _ = attention._sdpa_native_gqa(_Layer(0), query, keys, values, mask, scaling=0.25)

    full_keys = torch.cat([prefix_keys.expand(rows, -1, -1, -1), keys], dim=2)
    full_values = torch.cat([prefix_values.expand(rows, -1, -1, -1), values], dim=2)
    own_mask = mask if mask is not None else torch.ones(length, own, dtype=torch.bool).tril(own - length).expand(
        rows, 1, -1, -1)
    full_mask = torch.cat([torch.ones(rows, 1, length, prefix, dtype=torch.bool), own_mask], dim=3)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query.float(), full_keys.float(), full_values.float(), attn_mask=full_mask, scale=0.25, enable_gqa=True)
    assert out.shape == (rows, length, heads, dim) and out.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected.transpose(1, 2), atol=tolerance, rtol=tolerance)


def test_only_a_cpu_gqa_sdpa_model_cascades(tiny_model_dir: Path) -> None:
    model, _ = load_model(tiny_model_dir)
    assert attention.cascades(model)
    model.set_attn_implementation("sdpa")
    assert not attention.cascades(model)
