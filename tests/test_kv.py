"""The engine's KV batch: left-padded rows over a cache that grows in place equal unpadded forward passes."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from opd_agents.rollout.kv import GrowingCache, GrowingLayer, KVBatch, KVSession


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


def test_rows_continuing_one_shared_prefix_hold_only_their_own_columns(tiny_model: Any) -> None:
    """Episodes that start with the same prompt keep one copy of its keys/values: the batch's cache and the
    sessions hold the columns after it, and every row still equals an unpadded forward over its ids —
    through decode steps, a session that leaves and comes back, a crop into the prefix, and a merge with
    rows that do not share it (then each row gets a copy)."""
    model, _ = tiny_model
    gen = torch.Generator().manual_seed(1)

    def ids(n: int) -> list[int]:
        return torch.randint(5, 2000, (n,), generator=gen).tolist()

    one = KVBatch.from_sessions(model, 0, [None])
    one.extend([ids(20)])
    prefix = one.session(0)
    assert prefix.prefix is None and prefix.keys[0].shape[2] == 20

    batch = KVBatch.from_sessions(model, 0, [KVSession.continuing(prefix)] * 3)
    assert batch.prefix is prefix and batch.mask.shape == (3, 0)
    fed = [ids(3), ids(5), ids(1)]
    assert_rows_match(model, batch, batch.extend(fed), fed)
    for _ in range(3):
        fed = [ids(1), ids(1), ids(1)]
        assert_rows_match(model, batch, batch.extend(fed), fed)
    assert batch.cache.layers[0].keys.shape[2] == batch.mask.shape[1] == 8  # 5 + 3: no prefix column

    waiting = batch.session(1)
    assert waiting.prefix is prefix and waiting.keys[0].shape[2] == len(waiting.tokens) - 20 == 8
    assert waiting.crop(24).keys[0].shape[2] == 4 and waiting.crop(12).prefix is None
    batch.keep([0, 2])
    back = KVBatch.from_sessions(model, 0, [waiting, KVSession.continuing(prefix)])
    fed = [ids(2), ids(6)]
    assert back.prefix is prefix
    assert_rows_match(model, back, back.extend(fed), fed)
    batch.absorb(back)
    assert batch.prefix is prefix and batch.size == 4
    fed = [ids(1)] * 4
    assert_rows_match(model, batch, batch.extend(fed), fed)

    plain = KVBatch.from_sessions(model, 0, [None, waiting.crop(12)])  # not all continue the prefix
    assert plain.prefix is None
    fed = [ids(7), ids(2)]
    assert_rows_match(model, plain, plain.extend(fed), fed)
    batch.absorb(plain)
    assert batch.prefix is None and batch.mask.shape[1] == batch.cache.layers[0].keys.shape[2]
    for _ in range(2):
        fed = [ids(1)] * 6
        assert_rows_match(model, batch, batch.extend(fed), fed)


def test_a_model_that_does_not_cascade_copies_the_prefix_into_each_row(tiny_model: Any) -> None:
    model, _ = tiny_model
    model.set_attn_implementation("sdpa")
    one = KVBatch.from_sessions(model, 0, [None])
    one.extend([list(range(100, 120))])
    batch = KVBatch.from_sessions(model, 0, [KVSession.continuing(one.session(0))] * 2)
    assert batch.prefix is None and batch.mask.shape == (2, 20)
    fed = [[7, 8], [9]]
    assert_rows_match(model, batch, batch.extend(fed), fed)
