"""Multi-process training on torch.distributed: the job's ranks, each rank's slice of a step, reductions,
and the student's wrapping (DDP, or FSDP2's ``fully_shard``).

Launched by ``torchrun`` / ``accelerate launch``: the variables they set (WORLD_SIZE, RANK, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) decide; without them the job is one process and every helper here is a no-op.
Backend: NCCL on GPUs, gloo on CPU. A rank that dies makes the others' next collective fail (gloo: the
peer's connection closes; NCCL / a silent hang: ``train.dist_timeout_s``), and torchrun then stops the job.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from opd_agents.errors import ConfigError

T = TypeVar("T")
PARALLEL_MODES = ("none", "ddp", "fsdp")


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives' tensors live

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> range:
        """This rank's contiguous part of ``n`` items (``n`` divisible by the world size: checked up front)."""
        per = n // self.world_size
        return range(self.rank * per, (self.rank + 1) * per)

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over ranks (float64, so token counts stay exact)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, items: list[T]) -> list[T]:
        """Every rank's ``items`` concatenated in rank order, on every rank (pickled: small objects only)."""
        if not self.enabled:
            return items
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, items)
        return [x for part in parts for x in part]

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: str, timeout_s: float) -> Dist:
    """Join the job torchrun started (once per process); one process without it."""
    world = launched_world_size()
    if world == 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return Dist(rank, world, local, torch.device("cuda", local) if cuda else torch.device("cpu"))


def check_launch(parallel: str, counts: dict[str, int], fsdp_refused: Sequence[str] = ()) -> None:
    """Refuse, before any work, a launch whose ranks would not split ``counts`` (config key -> tasks or
    episodes) evenly, would each run a whole training of their own into the same run dir, or asks FSDP
    for features that read the student outside its sharded forward (``fsdp_refused``)."""
    world = launched_world_size()
    if world == 1:
        return
    if parallel == "none":
        raise ConfigError(f"launched with WORLD_SIZE={world} but train.parallel is 'none': set train.parallel "
                          "to 'ddp' (the student fits one device) or 'fsdp' (it is sharded over the ranks)")
    for key, n in counts.items():
        if n % world:
            raise ConfigError(f"{key} = {n} does not split over {world} ranks: make it a multiple of {world}")
    if parallel == "fsdp" and fsdp_refused:
        raise ConfigError("train.parallel=fsdp does not support yet: " + "; ".join(fsdp_refused)
                          + " (use train.parallel=ddp)")


def wrap(module: nn.Module, parallel: str, dist_ctx: Dist) -> nn.Module:
    """DDP (a full replica per rank, gradients all-reduced) or FSDP2 (parameters, gradients and optimizer
    state sharded; each decoder layer gathered just for its forward / backward)."""
    if not dist_ctx.enabled or parallel == "none":
        return module
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [dist_ctx.local_rank] if dist_ctx.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    module.share_prefix = False  # see StudentLogits
    for layer in _decoder_layers(module):
        fully_shard(layer)
    fully_shard(module)  # the rest (embeddings, final norm, head) as one unit
    return module


def _decoder_layers(module: nn.Module) -> list[nn.Module]:
    blocks = [m for m in module.modules() if isinstance(m, nn.ModuleList)]
    if not blocks:
        raise ConfigError("train.parallel=fsdp: the student has no list of decoder layers to shard")
    return list(max(blocks, key=len))


@contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Accumulate a micro-batch's gradients locally (``enabled=False``) or reduce them over the ranks with
    this backward (the last micro-batch of a step)."""
    if hasattr(module, "no_sync") and not enabled:  # DDP
        with module.no_sync():
            yield
        return
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(enabled)
    yield


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state of a wrapped module on every rank, keys as in the unwrapped module."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))


def as_float(value: torch.Tensor) -> float:
    """A scalar that may be a sharded DTensor (FSDP2's gradient norm)."""
    full = getattr(value, "full_tensor", None)
    return float(full() if full is not None else value)
