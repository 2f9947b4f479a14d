"""The engine's KV batch: left-padded rows over a cache that grows in place equal unpadded forward passes."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from opd_agents.rollout.kv import GrowingCache, GrowingLayer, KVBatch


def last_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


def assert_rows_match(model: torch.nn.Module, batch: KVBatch, logits: torch.Tensor, fed: list[list[int]]) -> None:
    for row, chunk in enumerate(fed):
        if chunk:  # a row fed nothing this call has no new logits
            torch.testing.assert_close(logits[row, -1], last_logits(model, batch.tokens[row]), atol=1e-5, rtol=1e-5)


def test_growing_batch_equals_unpadded_forwards_through_growth_selection_and_merges(
        tiny_model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = tiny_model
    monkeypatch.setattr(GrowingLayer, "HEADROOM", 3)  # outgrow the buffers every few steps
    gen = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(5, 2000, (n,), generator=gen).tolist()

    batch = KVBatch.from_sessions(model, 0, [None, None, None])
    prompts = [ids(7), ids(12), ids(4)]
    assert_rows_match(model, batch, batch.extend(prompts), prompts)
    for step in range(6):  # decode steps; row 1 skips one (an empty chunk)
        fed = [ids(1), [] if step == 2 else ids(1), ids(1)]
        assert_rows_match(model, batch, batch.extend(fed), fed)
    layer = batch.cache.layers[0]
    assert isinstance(batch.cache, GrowingCache) and isinstance(layer, GrowingLayer)
    assert layer.keys is not None and layer.keys.shape[2] == batch.mask.shape[1] == 18
    buffer = layer._buffers["keys"]
    assert buffer is not None and buffer.shape[2] > layer.keys.shape[2]  # spare columns

    batch.keep([0, 2])  # row 1 finishes
    fed = [ids(2), ids(1)]
    assert_rows_match(model, batch, batch.extend(fed), fed)

    waiting = batch.session(1)  # row 2 waits for a tool, then comes back with a new episode
    batch.keep([0])
    other = KVBatch.from_sessions(model, 0, [waiting, None])
    fed = [ids(3), ids(9)]
    assert_rows_match(model, other, other.extend(fed), fed)
    batch.absorb(other)
    for _ in range(4):
        fed = [ids(1), ids(1), ids(1)]
        assert_rows_match(model, batch, batch.extend(fed), fed)
