"""Batched multi-turn sampling with a transformers model and one KV cache reused across turns.

All active episodes share one batch. Each turn the new tokens of every row (the prompt, or the
observation ids after the previous turn) are fed as one left-padded chunk on top of the cache, then the
rows decode together until each stops on the end-of-turn token, a closed tool call or its token budget.
Padding can sit anywhere in the cache; the 2-D attention mask hides it and explicit position ids keep
RoPE positions contiguous per row, so a row's logits equal an unpadded forward pass over its own ids.
Finished episodes leave the batch (their cache rows are dropped).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import DynamicCache, PreTrainedModel

from opd_agents.rollout.renderer import ChatMLRenderer

Finish = Literal["stop", "tool_call", "length"]
_STOP_TAIL_TOKENS = 8  # how many trailing tokens are decoded to look for a stop string


@dataclass
class TurnSample:
    token_ids: list[int]
    logprobs: list[float]  # log pi(token | prefix) at the sampling temperature (1 if greedy), before top-p
    finish: Finish


class KVBatch:
    """A batch of token sequences that grows chunk by chunk over one DynamicCache."""

    def __init__(self, model: PreTrainedModel, pad_token_id: int) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.pad_token_id = pad_token_id
        self.cache = DynamicCache()
        self.mask: torch.Tensor | None = None  # [B, cached_len] 1 = real token
        self.next_pos: torch.Tensor | None = None  # [B] position id of each row's next token
        # Per row: tokens already sampled but not yet fed (a turn's last token), fed with the next chunk.
        self.pending: list[list[int]] = []

    @property
    def size(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    @torch.no_grad()
    def extend(self, chunks: Sequence[Sequence[int]], active: torch.Tensor | None = None,
               all_logits: bool = False) -> torch.Tensor:
        """Feed one chunk per row (left-padded to a rectangle); return fp32 logits of each row's last
        position [B, V] (``all_logits``: of every chunk position [B, W, V], rows right-aligned).
        ``active`` (bool [B]) marks rows whose chunk is real; others feed a masked pad."""
        if self.pending:
            chunks = [[*p, *c] for p, c in zip(self.pending, chunks, strict=True)]
            self.pending = []
        width = max(len(c) for c in chunks)
        ids = torch.full((len(chunks), width), self.pad_token_id, dtype=torch.long)
        chunk_mask = torch.zeros((len(chunks), width), dtype=torch.long)
        for i, c in enumerate(chunks):
            if c and (active is None or active[i]):
                ids[i, width - len(c):] = torch.tensor(c, dtype=torch.long)
                chunk_mask[i, width - len(c):] = 1
        if self.next_pos is None:
            self.next_pos = torch.zeros(len(chunks), dtype=torch.long)
        # Position of a real token = row's next position + its rank among the row's real tokens.
        positions = self.next_pos[:, None] + (chunk_mask.cumsum(dim=1) - 1).clamp(min=0)
        self.mask = chunk_mask if self.mask is None else torch.cat([self.mask, chunk_mask], dim=1)
        self.next_pos = self.next_pos + chunk_mask.sum(dim=1)
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=self.mask.to(self.device),
            position_ids=positions.to(self.device),
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=0 if all_logits else 1,  # the full [B, T, V] prefill logits are huge
        )
        return out.logits.float() if all_logits else out.logits[:, -1, :].float()

    def keep(self, rows: Sequence[int]) -> None:
        """Drop every row not listed (finished episodes leave the batch)."""
        if len(rows) == self.size:
            return
        index = torch.tensor(list(rows), dtype=torch.long)
        self.cache.batch_select_indices(index.to(self.device))
        assert self.mask is not None and self.next_pos is not None
        self.mask, self.next_pos = self.mask[index], self.next_pos[index]
        self.pending = [self.pending[i] for i in rows] if self.pending else []
        # Columns that are padding for every remaining row would only cost attention FLOPs.
        live = self.mask.any(dim=0)
        if not bool(live.all()) and self.cache.get_seq_length() == self.mask.shape[1]:
            cols = live.nonzero().squeeze(1)
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, cols.to(self.device)]
                layer.values = layer.values[:, :, cols.to(self.device)]
            self.mask = self.mask[:, cols]


class HFSampler:
    """Samples one assistant turn for every active episode of a KVBatch."""

    def __init__(self, model: PreTrainedModel, renderer: ChatMLRenderer) -> None:
        self.model = model.eval()
        self.renderer = renderer
        tok = renderer.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else renderer.im_end_id
        self.pad_token_id = int(pad)
        self.stop_ids = set(renderer.stop_token_ids)

    def new_batch(self) -> KVBatch:
        return KVBatch(self.model, self.pad_token_id)

    def _is_tool_stop(self, ids: list[int]) -> bool:
        stops = self.renderer.stop_strings
        if not stops:
            return False
        tail = self.renderer.tokenizer.decode(ids[-_STOP_TAIL_TOKENS:]).rstrip()
        return any(tail.endswith(s) for s in stops)

    @torch.no_grad()
    def sample_turn(
        self,
        batch: KVBatch,
        new_tokens: Sequence[Sequence[int]],
        max_new_tokens: Sequence[int],
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> list[TurnSample]:
        """Feed ``new_tokens[i]`` to row i, then sample until every row stopped."""
        rows = len(new_tokens)
        logits = batch.extend(new_tokens)
        sampled: list[list[int]] = [[] for _ in range(rows)]
        logprobs: list[list[float]] = [[] for _ in range(rows)]
        finish: list[Finish | None] = [None] * rows
        while True:
            live = [i for i in range(rows) if finish[i] is None]
            scaled = torch.log_softmax(logits / max(temperature, 1e-8) if temperature > 0 else logits, dim=-1)
            if temperature == 0:
                next_ids = scaled.argmax(dim=-1).cpu()
            else:
                probs = _top_p_filter(scaled.exp(), top_p) if top_p < 1.0 else scaled.exp()
                next_ids = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1)
            for i in live:
                tok = int(next_ids[i])
                sampled[i].append(tok)
                logprobs[i].append(float(scaled[i, tok]))
                if tok in self.stop_ids:
                    finish[i] = "stop"
                elif self._is_tool_stop(sampled[i]):
                    finish[i] = "tool_call"
                elif len(sampled[i]) >= max_new_tokens[i]:
                    finish[i] = "length"
            if all(f is not None for f in finish):
                break
            active = torch.tensor([finish[i] is None for i in range(rows)])
            step = [[sampled[i][-1]] if sampled[i] else [self.pad_token_id] for i in range(rows)]
            logits = batch.extend(step, active=active)
        # Each row's last sampled token was never fed (rows that stopped early fed masked pads since).
        batch.pending = [s[-1:] for s in sampled]
        return [TurnSample(s, lp, f) for s, lp, f in zip(sampled, logprobs, finish, strict=True) if f]


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_p, order = probs.sort(dim=-1, descending=True)
    drop = sorted_p.cumsum(dim=-1) - sorted_p > top_p
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_p)
