"""Student-side forward passes for training: logits only where the student sampled tokens.

The LM head over a 49k vocabulary dominates CPU training cost, so it runs only on the hidden states
that predict assistant tokens (prompt and observation positions never need logits).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.graph import increment_version
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from opd_agents.errors import ConfigError
from opd_agents.rollout.kv import (MIN_SHARED_PREFIX, KVSession, autocast, common_prefix_len, forward_shared_prefix,
                                  run_prefix)
from opd_agents.training.chunked import per_position
from opd_agents.training.view import TrainingView, collate


@dataclass
class AssistantBatch:
    """Per-trajectory rows of assistant tokens, padded to [B, N] (N = most assistant tokens in a row)."""

    logits: Tensor  # [B, N, V] student logits predicting each assistant token (with grad)
    targets: Tensor  # [B, N] the sampled token ids
    mask: Tensor  # [B, N] 1 on real assistant tokens
    sampling_logprobs: Tensor  # [B, N]
    teacher_logprobs: Tensor  # [B, N] (0 where a trajectory has none)
    weights: Tensor  # [B, N] per-turn weights broadcast onto tokens
    turn_index: Tensor  # [B, N]

    @property
    def logprobs(self) -> Tensor:
        """log pi_theta of the sampled tokens [B, N] (with grad; a chunk of positions at a time, so the
        [B, N, V] log-softmax never exists whole)."""
        return per_position(_sampled_logprobs, self.logits, self.targets)


def _sampled_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def pad_rows(rows: Sequence[Tensor], width: int, value: float = 0.0) -> Tensor:
    """Stack 1-D or 2-D per-trajectory tensors into [B, width, ...], padding with ``value``."""
    shape = (len(rows), width, *rows[0].shape[1:])
    out = rows[0].new_full(shape, value)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


class StudentLogits(torch.nn.Module):
    """The student's forward for training: decoder, then the LM head at the given positions only, in one
    ``forward`` so a DDP / FSDP wrapper around this module sees (syncs, gathers) every parameter it uses."""

    def __init__(self, model: PreTrainedModel, compute_dtype: torch.dtype | None = None) -> None:
        """``compute_dtype``: run the forward under autocast in this dtype (mixed precision: the weights, and
        so the optimizer's updates, stay in their own dtype)."""
        super().__init__()
        self.model = model
        self.compute_dtype = compute_dtype
        # Computing a shared prefix once runs each layer twice per forward; FSDP2 frees a layer's gathered
        # weights after each use, which the first use's backward still needs: sharded students feed whole rows.
        self.share_prefix = True

    def forward(self, input_ids: Tensor, attention_mask: Tensor, rows: Tensor, cols: Tensor, slots: Tensor,
                width: int, prefix: int = 0, cached: KVSession | None = None) -> Tensor:
        """Logits [B, width, V]: at [rows[i], slots[i]] the logits after position cols[i] of row rows[i] (the
        rest 0); ``prefix``: the rows' common prefix, computed once (``cached``: its keys/values, computed
        already)."""
        with autocast(input_ids.device, self.compute_dtype):
            decoder = self.model.get_decoder()
            if prefix:
                out = forward_shared_prefix(decoder, input_ids, attention_mask, prefix, cached)
            else:
                out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            hidden = out.last_hidden_state  # type: ignore[attr-defined]  # columns prefix..W-1
            head = self.model.get_output_embeddings()
            logits = head(hidden[rows, cols - prefix])  # [M, V]
            full = logits.new_zeros(len(input_ids), width, logits.shape[-1])
            full[rows, slots] = logits
            if not len(rows):  # keep the head in the graph: a wrapper expects a gradient for every parameter
                full = full + 0.0 * head(hidden[:1, 0]).sum()
        return full.float()  # the losses' softmaxes in fp32 whatever the compute dtype


def checkpoint_layers(model: PreTrainedModel) -> None:
    """Activation checkpointing of every decoder layer in training-mode forwards (non-reentrant
    ``torch.utils.checkpoint``). The caches training forwards carry (``ReadOnlyCache``: a shared prompt prefix
    and the recording of its keys/values) are only read, so the layers keep them when recomputed; transformers
    would otherwise drop every cache of a checkpointed layer."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.gradient_checkpointing: {type(model).__name__} does not support it")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module._can_checkpoint_with_cache = True


def _prefix_limit(views: Sequence[TrainingView]) -> int:
    """The longest prefix the views share that ends before any of their first assistant tokens."""
    first_targets = [v.loss_mask.index(1) if 1 in v.loss_mask else len(v) for v in views]
    return min(common_prefix_len([v.input_ids for v in views]), min(first_targets) - 1)


@dataclass
class SharedPrefix:
    """A training step's common prompt prefix, run once for all of the step's micro-batches instead of once
    in each. The micro-batches read ``session``: detached copies of its keys/values whose gradients add up
    over their backward passes; ``backward()`` then takes that sum through the prefix's forward, once. The
    parameters' gradients equal those of running the prefix in every micro-batch (floating-point sums aside).
    One process only: a DDP wrapper syncs gradients inside the last micro-batch's backward, before this one."""

    session: KVSession  # leaves (requires_grad) the micro-batches attend to
    computed: list[Tensor]  # the same keys, then values, as the decoder computed them (in the autograd graph)

    @classmethod
    def build(cls, student: StudentLogits, views: Sequence[TrainingView]) -> SharedPrefix | None:
        """The views' shared prefix through ``student``'s decoder (None when it is shorter than
        ``MIN_SHARED_PREFIX``)."""
        n = _prefix_limit(views)
        if n < MIN_SHARED_PREFIX:
            return None
        device = next(student.parameters()).device
        with autocast(device, student.compute_dtype):
            run = run_prefix(student.model.get_decoder(), torch.tensor([views[0].input_ids[:n]], device=device))
        leaves = KVSession(run.tokens, [k.detach().requires_grad_() for k in run.keys],
                           [v.detach().requires_grad_() for v in run.values])
        return cls(leaves, run.keys + run.values)

    def backward(self) -> None:
        leaves = self.session.keys + self.session.values
        pairs = [(t, leaf.grad) for t, leaf in zip(self.computed, leaves, strict=True) if leaf.grad is not None]
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])


def assistant_batch(model: PreTrainedModel | torch.nn.Module, views: Sequence[TrainingView],
                    pad_token_id: int, shared: SharedPrefix | None = None) -> AssistantBatch:
    """The student's logits at every assistant token of ``views`` (with grad). ``model``: a causal LM, or
    its ``StudentLogits`` (possibly inside DDP / FSDP). The rows' common prefix (system prompt + tool
    schemas; the whole task prompt under group sampling) runs once and its cache is shared by the rows,
    so its forward and backward cost is paid once per batch; ``shared``: the step's prefix, computed once
    for all its micro-batches (every view starts with it)."""
    forward = StudentLogits(model) if hasattr(model, "get_decoder") else model
    batch = collate(views, pad_token_id)
    device = next(forward.parameters()).device
    if shared is not None:
        prefix = len(shared.session.tokens)
    else:
        prefix = _prefix_limit(views)
        prefix = prefix if len(views) > 1 and prefix >= MIN_SHARED_PREFIX and getattr(forward, "share_prefix", True) else 0
    loss_mask = batch["loss_mask"]
    rows, pos = loss_mask.nonzero(as_tuple=True)  # row-major: each row's targets in order
    slots = (loss_mask.cumsum(1) - 1).long()[rows, pos]  # the target's place among its row's targets
    counts = [int(v.sum()) for v in loss_mask]
    width = max(max(counts), 1)
    # logits at p-1 predict the token at p
    logits = forward(batch["input_ids"].to(device), batch["attention_mask"].to(device), rows.to(device),
                     (pos - 1).to(device), slots.to(device), width, prefix,
                     shared.session if shared is not None else None)
    fields: dict[str, list[Tensor]] = {k: [] for k in ("input_ids", "sampling_logprobs", "teacher_logprobs",
                                                        "token_weights", "turn_index")}
    for b in range(len(views)):
        at = loss_mask[b].nonzero().squeeze(1)
        for k in fields:
            fields[k].append(batch[k][b, at])
    mask = pad_rows([torch.ones(c) for c in counts], width)
    return AssistantBatch(
        logits=logits,
        targets=pad_rows(fields["input_ids"], width, 0).long().to(device),
        mask=mask.to(device),
        sampling_logprobs=pad_rows(fields["sampling_logprobs"], width).to(device),
        teacher_logprobs=pad_rows(fields["teacher_logprobs"], width).to(device),
        weights=pad_rows(fields["token_weights"], width).to(device),
        turn_index=pad_rows(fields["turn_index"], width, -1).to(device),
    )


def adamw(params: Sequence[torch.nn.Parameter], lr: float) -> torch.optim.AdamW:
    """AdamW without weight decay, fused (one kernel for all tensors) where torch has it for the device."""
    try:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    except (RuntimeError, ValueError):  # a device / dtype without a fused kernel
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    # The fused kernel writes the weights without bumping their version counters (torch 2.13), and what
    # follows the weights by version (``weights_version``: an engine's bf16 copy, cached prompt prefixes)
    # would miss the step.
    opt.register_step_post_hook(lambda optimizer, args, kwargs: increment_version(
        [p for group in optimizer.param_groups for p in group["params"]]))
    return opt


def cross_entropy(batch: AssistantBatch, weighted: bool = False, denominator: float | None = None) -> Tensor:
    """Mean negative log-likelihood of the assistant tokens (SFT / off-policy on expert data); ``weighted``
    scales each token by its turn's weight (a 0-weight turn is not trained on). ``denominator``: divide by
    this instead of the batch's own (weighted) token count, e.g. a whole step's when accumulating parts."""
    mask = batch.mask * batch.weights if weighted else batch.mask
    return -(batch.logprobs * mask).sum() / (denominator if denominator is not None else mask.sum().clamp(min=1))
