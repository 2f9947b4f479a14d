"""KV caches of many token sequences: one batch that grows chunk by chunk, and dense per-sequence sessions.

A ``KVBatch`` holds the rows the engine is working on in one ``GrowingCache`` (a ``DynamicCache`` that
appends in place). Each call feeds one chunk
per row, left-padded to a rectangle; padding can sit anywhere in the cache, the 2-D attention mask hides
it and explicit position ids keep RoPE positions contiguous per row, so a row's logits equal an unpadded
forward pass over its own ids. Rows leave (``keep``), are cut out as dense ``KVSession``s (their padding
dropped) while their episode waits for a tool, and come back merged with other rows (``from_sessions``,
``absorb``): that is what lets an engine batch whichever episodes are waiting.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer


def autocast(device: torch.device, compute_dtype: torch.dtype | None) -> torch.autocast:
    """Autocast to ``compute_dtype`` on ``device`` (a no-op context for None)."""
    return torch.autocast(device.type, dtype=compute_dtype or torch.float32, enabled=compute_dtype is not None)


@dataclass
class KVSession:
    """One sequence's cache without padding: ``keys[l]`` / ``values[l]`` are [1, H, len(tokens), D]."""

    tokens: list[int]  # the ids whose keys/values are cached, in order (positions 0..n-1)
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    def crop(self, n: int) -> KVSession:
        """The first ``n`` cached positions only (to re-feed a suffix whose logits are needed)."""
        return KVSession(self.tokens[:n], [k[:, :, :n] for k in self.keys], [v[:, :, :n] for v in self.values])


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys/values live in buffers with spare columns. ``DynamicLayer`` appends by
    ``torch.cat``, a copy of the layer's whole cache at every decode step (on a CPU, for 8 rows of 500 tokens,
    ≈ 0.2 GB per step over all layers); here a step writes its columns in place and the buffer is copied only
    when it is full. ``keys`` / ``values`` are views of the filled columns; assigning them (batch selection,
    cropping) replaces the buffer."""

    HEADROOM = 128  # spare columns allocated when a buffer grows

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor | None] = {"keys": None, "values": None}
        self._filled = {"keys": 0, "values": 0}  # set apart: batch selection assigns keys, then values
        super().__init__()

    def _view(self, name: str) -> torch.Tensor | None:
        buffer = self._buffers[name]
        return None if buffer is None else buffer[:, :, : self._filled[name]]

    def _assign(self, name: str, tensor: torch.Tensor | None) -> None:
        self._buffers[name] = tensor
        self._filled[name] = 0 if tensor is None else tensor.shape[2]

    keys = property(lambda self: self._view("keys"), lambda self, t: self._assign("keys", t))  # type: ignore[assignment]
    values = property(lambda self: self._view("values"), lambda self, t: self._assign("values", t))  # type: ignore[assignment]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self._filled["keys"] if self.is_initialized else 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self._append("keys", key_states), self._append("values", value_states)

    def _append(self, name: str, states: torch.Tensor) -> torch.Tensor:
        buffer, start = self._buffers[name], self._filled[name]
        end = start + states.shape[2]
        if buffer is None or end > buffer.shape[2]:
            shape = list(states.shape)
            shape[2] = end + self.HEADROOM
            grown = states.new_empty(shape)
            if buffer is not None and start:
                grown[:, :, :start] = buffer[:, :, :start]
            buffer = self._buffers[name] = grown
        buffer[:, :, start:end] = states
        self._filled[name] = end
        return buffer[:, :, :end]


class GrowingCache(DynamicCache):
    """A ``DynamicCache`` of ``GrowingLayer``s, optionally holding per-layer (keys, values): the tensors are
    taken as they are (the callers built them fresh), spare columns come with the first append."""

    def __init__(self, layers: Sequence[tuple[torch.Tensor, torch.Tensor]] = ()) -> None:
        _fill(self, GrowingLayer, layers)


def _fill(cache: DynamicCache, layer_class: type[DynamicLayer],
          layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Initialise ``cache`` with ``layer_class`` layers (more are made as needed) holding ``layers``' per-layer
    (keys, values) as they are."""
    Cache.__init__(cache, layer_class_to_replicate=layer_class)
    for keys, values in layers:
        layer = layer_class()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        cache.layers.append(layer)


class ReadOnlyLayer(DynamicLayer):
    """A layer's cache that a forward attends to but does not grow: ``update`` returns the cached keys/values
    followed by the new ones and leaves the cache as it was. Running the same layer on the same input twice
    then gives the same result, which a layer recomputed under activation checkpointing needs (a
    ``DynamicLayer`` would append the chunk a second time)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        # Always a new (contiguous) tensor, as DynamicLayer's: handing back the projections' own keys gave the
        # same forward but bf16 gradients that differed in rounding (measured against DynamicCache).
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


class RecordingLayer(ReadOnlyLayer):
    """A ``ReadOnlyLayer`` that also keeps what its last ``update`` returned (``last``): how ``run_prefix``
    takes a prefix's keys/values out of a forward whose layers may be recomputed."""

    def __init__(self) -> None:
        super().__init__()
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        self.last = super().update(key_states, value_states)
        return self.last


class ReadOnlyCache(DynamicCache):
    """A ``DynamicCache`` of ``layer_class`` layers (``ReadOnlyLayer``s) over per-layer (keys, values) (none: an
    empty past)."""

    def __init__(self, layers: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
                 layer_class: type[ReadOnlyLayer] = ReadOnlyLayer) -> None:
        _fill(self, layer_class, layers)


def _right_aligned(parts: Sequence[torch.Tensor], width: int, dim: int) -> torch.Tensor:
    """``parts`` stacked along dim 0 into one new tensor, each right-aligned in ``width`` columns of ``dim``
    (zeros on the left): one copy of each part, where padding each and then stacking would make two."""
    shape = list(parts[0].shape)
    shape[0], shape[dim] = sum(p.shape[0] for p in parts), width
    out = parts[0].new_zeros(shape)
    row = 0
    for part in parts:
        n = part.shape[dim]
        out[row : row + part.shape[0]].narrow(dim, width - n, n).copy_(part)
        row += part.shape[0]
    return out


class KVBatch:
    """A batch of token sequences that grows chunk by chunk over one ``GrowingCache``."""

    def __init__(self, model: PreTrainedModel, pad_token_id: int) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.pad_token_id = pad_token_id
        self.cache: DynamicCache = GrowingCache()
        self.mask = torch.zeros((0, 0), dtype=torch.long)  # [B, cached_len] 1 = real token
        self.next_pos = torch.zeros(0, dtype=torch.long)  # [B] position id of each row's next token
        self.tokens: list[list[int]] = []  # per row: the ids fed so far

    @property
    def size(self) -> int:
        return len(self.tokens)

    @classmethod
    def from_sessions(cls, model: PreTrainedModel, pad_token_id: int, sessions: Sequence[KVSession | None]) -> KVBatch:
        """Rows that resume cached sequences (``None``: a new, empty one), left-padded to one width."""
        batch = cls(model, pad_token_id)
        batch.tokens = [list(s.tokens) if s else [] for s in sessions]
        lengths = [len(t) for t in batch.tokens]
        width = max(lengths, default=0)
        batch.mask = torch.zeros((len(sessions), width), dtype=torch.long)
        for i, n in enumerate(lengths):
            batch.mask[i, width - n:] = 1
        batch.next_pos = torch.tensor(lengths, dtype=torch.long)
        template = next((s for s in sessions if s and s.tokens), None)
        if template is not None:
            layers = []
            for layer in range(len(template.keys)):
                ks = [s.keys[layer] if s and s.tokens else template.keys[layer][:, :, :0] for s in sessions]
                vs = [s.values[layer] if s and s.tokens else template.values[layer][:, :, :0] for s in sessions]
                layers.append((_right_aligned(ks, width, 2), _right_aligned(vs, width, 2)))
            batch.cache = GrowingCache(layers)
        return batch

    @torch.no_grad()
    def extend(self, chunks: Sequence[Sequence[int]], keep_last: int = 1) -> torch.Tensor:
        """Feed one chunk per row (left-padded to a rectangle; an empty chunk feeds nothing for that row) and
        return fp32 logits of each row's last ``keep_last`` chunk positions [B, keep_last, V] (rows
        right-aligned: position -1 is the row's last fed token)."""
        width = max(len(c) for c in chunks)
        ids = torch.full((len(chunks), width), self.pad_token_id, dtype=torch.long)
        chunk_mask = torch.zeros((len(chunks), width), dtype=torch.long)
        for i, c in enumerate(chunks):
            if c:
                ids[i, width - len(c):] = torch.tensor(list(c), dtype=torch.long)
                chunk_mask[i, width - len(c):] = 1
                self.tokens[i].extend(c)
        # Position of a real token = row's next position + its rank among the row's real tokens.
        positions = self.next_pos[:, None] + (chunk_mask.cumsum(dim=1) - 1).clamp(min=0)
        self.mask = torch.cat([self.mask, chunk_mask], dim=1)
        self.next_pos = self.next_pos + chunk_mask.sum(dim=1)
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=self.mask.to(self.device),
            position_ids=positions.to(self.device),
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=keep_last,  # the full [B, T, V] prefill logits are huge
        )
        return out.logits.float()

    def session(self, row: int) -> KVSession:
        """Row ``row``'s cache as a dense session (its padding columns dropped)."""
        cols = self.mask[row].nonzero().squeeze(1).to(self.device)
        keys = [layer.keys[row : row + 1, :, cols] for layer in self.cache.layers]
        values = [layer.values[row : row + 1, :, cols] for layer in self.cache.layers]
        return KVSession(list(self.tokens[row]), keys, values)

    def keep(self, rows: Sequence[int]) -> None:
        """Drop every row not listed (finished requests leave the batch)."""
        if len(rows) == self.size:
            return
        index = torch.tensor(list(rows), dtype=torch.long)
        if rows:
            self.cache.batch_select_indices(index.to(self.device))
        else:
            self.cache = GrowingCache()
        self.mask, self.next_pos = self.mask[index], self.next_pos[index]
        self.tokens = [self.tokens[i] for i in rows]
        self._drop_dead_columns()

    def absorb(self, other: KVBatch) -> None:
        """Append ``other``'s rows (both left-padded to the wider cache)."""
        if other.size == 0:
            return
        if self.size == 0:
            self.cache, self.mask, self.next_pos, self.tokens = other.cache, other.mask, other.next_pos, other.tokens
            return
        width = max(self.mask.shape[1], other.mask.shape[1])
        layers = [(_right_aligned([a.keys, b.keys], width, 2), _right_aligned([a.values, b.values], width, 2))
                  for a, b in zip(self.cache.layers, other.cache.layers, strict=True)]
        self.cache = GrowingCache(layers)
        self.mask = _right_aligned([self.mask, other.mask], width, 1)
        self.next_pos = torch.cat([self.next_pos, other.next_pos])
        self.tokens = self.tokens + other.tokens

    def _drop_dead_columns(self) -> None:
        """Columns that are padding for every remaining row would only cost attention FLOPs."""
        live = self.mask.any(dim=0)
        if self.size == 0 or bool(live.all()) or self.cache.get_seq_length() != self.mask.shape[1]:
            return
        cols = live.nonzero().squeeze(1)
        for layer in self.cache.layers:
            layer.keys = layer.keys[:, :, cols.to(self.device)]
            layer.values = layer.values[:, :, cols.to(self.device)]
        self.mask = self.mask[:, cols]


MIN_SHARED_PREFIX = 16  # shorter common prefixes are not worth a separate forward pass


def common_prefix_len(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest prefix every row starts with."""
    if not rows:
        return 0
    n = min(len(r) for r in rows)
    first = rows[0]
    for i in range(n):
        if any(r[i] != first[i] for r in rows[1:]):
            return i
    return n


def weights_version(model: torch.nn.Module) -> int:
    """Changes whenever a parameter is modified in place (an optimizer step, a state-dict load)."""
    return sum(p._version for p in model.parameters())


def run_prefix(module: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> KVSession:
    """``ids`` [1, n] through ``module`` (a causal LM or its decoder); their keys/values as a session (in the
    autograd graph when grad is on; the layers may be checkpointed: the cache only records)."""
    cache = ReadOnlyCache(layer_class=RecordingLayer)
    head_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(module.forward).parameters else {}
    # use_cache=False: ours is read anyway, and a checkpointed model would warn that it turned caching off
    module(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=False, **head_kwargs)
    recorded = [layer.last for layer in cache.layers]  # type: ignore[attr-defined]
    return KVSession(ids[0].tolist(), [k for k, _ in recorded], [v for _, v in recorded])


@torch.no_grad()
def prefix_session(model: torch.nn.Module, ids: Sequence[int]) -> KVSession:
    """``ids`` run through ``model`` (a causal LM) at batch 1, without grad; their keys/values as a session."""
    return run_prefix(model, torch.tensor([list(ids)], dtype=torch.long, device=next(model.parameters()).device))


class PrefixCache:
    """The KV of the prompt prefix a run's sequences start with (system prompt + tool schemas), kept while
    the model's weights stay the same: a frozen teacher computes it once instead of once per batch, and a
    batch of one sequence (an episode scored as soon as it ends) reuses the last one. A batch of several
    sequences always uses exactly their common prefix, computed by a batch-1 forward over those ids, cached or
    not: its result does not depend on earlier batches (a resumed run scores as an uninterrupted one)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._session: KVSession | None = None
        self._version = -1

    def lookup(self, rows: Sequence[Sequence[int]], limit: int) -> KVSession | None:
        """The prefix the rows share, at most ``limit`` ids long (the rows must still feed the positions
        whose logits they need); None when it is shorter than ``MIN_SHARED_PREFIX`` (or, for one row, when
        the cached prefix does not fit it)."""
        version = weights_version(self.model)
        cached = self._session if self._version == version else None
        if len(rows) == 1:
            fits = cached is not None and len(cached.tokens) <= limit and \
                list(rows[0][: len(cached.tokens)]) == cached.tokens
            return cached if fits else None
        n = min(common_prefix_len(rows), limit)
        if n < MIN_SHARED_PREFIX:
            return None
        if cached is None or cached.tokens != list(rows[0][:n]):
            self._session, self._version = prefix_session(self.model, rows[0][:n]), version
        return self._session


def forward_shared_prefix(module: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, prefix: int,
                          cached: KVSession | None = None, **kwargs: object) -> object:
    """``module`` (a causal LM or its decoder) over a RIGHT-padded batch whose rows all start with the same
    ``prefix`` ids: the prefix runs once (batch 1), its cache is expanded to the rows, and only the rest of
    each row is fed on top. Returns the module's output for columns ``prefix..W-1`` (logits / hidden states
    of the suffix). Under autograd the rows' gradients flow back into the one prefix computation. Equal to
    the plain forward pass up to floating-point differences. ``cached``: the prefix's keys/values computed
    earlier (``prefix`` ids; gradients reach its tensors, see ``training.policy.SharedPrefix``)."""
    rows, width = ids.shape
    if cached is None:
        cached = run_prefix(module, ids[:1, :prefix], mask[:1, :prefix])
    cache = ReadOnlyCache([(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1))
                           for k, v in zip(cached.keys, cached.values, strict=True)])
    positions = torch.arange(prefix, width, device=ids.device).expand(rows, -1)
    return module(input_ids=ids[:, prefix:], attention_mask=mask, position_ids=positions, past_key_values=cache,
                  use_cache=False, **kwargs)
