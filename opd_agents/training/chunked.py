"""Per-position functions over full-vocabulary tensors, a chunk of positions at a time.

A loss over the full vocabulary builds several [positions, V] fp32 tensors per micro-batch (log-softmaxes,
probabilities, their products; V = 49k for SmolLM2), and autograd keeps most of them until the backward
pass: at 4 rows of 150 assistant tokens that is ≈ 0.1 GB each, the largest part of a training step's
activations after the decoder's. Checkpointing each chunk keeps only its inputs (the logits, alive anyway):
the chunk's intermediates are freed after its forward and recomputed in the backward, one chunk at a time.
The recomputation is elementwise work over [chunk, V], small beside the model's forward and backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

CHUNK_POSITIONS = 128


def per_position(fn: Callable[..., Tensor], *tensors: Tensor, chunk: int = CHUNK_POSITIONS) -> Tensor:
    """``fn`` maps tensors whose first dim is positions (e.g. logits [n, V], token ids [n]) to one value per
    position [n]. Here the tensors share leading dims [...] (the first tensor's all but its last), and
    ``fn`` runs on ``chunk`` positions at a time, checkpointed under autograd. Returns [...]: the values, and
    under autograd the gradients, of ``fn`` over all positions at once."""
    lead = tensors[0].shape[:-1]
    if any(t.shape[: len(lead)] != lead for t in tensors):
        raise ValueError(f"per-position tensors must share leading dims {tuple(lead)}, got "
                         f"{[tuple(t.shape) for t in tensors]}")
    flat = [t.reshape(-1, *t.shape[len(lead):]) for t in tensors]
    n = flat[0].shape[0]
    track = torch.is_grad_enabled() and any(t.requires_grad for t in flat)
    parts = []
    for start in range(0, n, chunk):
        pieces = [t[start : start + chunk] for t in flat]
        parts.append(checkpoint(fn, *pieces, use_reentrant=False) if track else fn(*pieces))
    return (torch.cat(parts) if parts else fn(*flat)).reshape(lead)
