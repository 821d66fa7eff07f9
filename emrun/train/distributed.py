"""Distributed data parallel set-up under torchrun: who am I, and are the ranks in sync."""

from __future__ import annotations

import gc
import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def setup(device_type: str) -> World:
    """Join the process group torchrun describes in the environment (or run alone)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    world = World(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), size)
    if not dist.is_initialized():
        _import_what_ddp_imports()
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return world


def _import_what_ddp_imports() -> None:
    """Import before the group exists what DDP's constructor imports (torch._dynamo and,
    through it, torch.distributed.nn.functional): that module's functions take
    ``group=group.WORLD`` as a default argument, so imported after the group was made they
    held it for good, and ``teardown`` could not end its threads."""
    import torch._dynamo  # noqa: F401


def finish_together(world: World) -> None:
    """Wait for every rank at the end of a run, before any tears its process group down: a
    rank that tore down while rank 0 still wrote its last checkpoint was seen to abort in
    gloo ("terminate called without an active exception"). Not on an error path, where a
    rank that never arrives would hang the others."""
    if world.distributed and dist.is_initialized():
        dist.barrier()


def teardown(world: World) -> None:
    """Leave the process group and collect it now (the caller has dropped DDP's wrapper):
    its threads are joined when its last reference goes, with the GIL released, so a
    thread still finishing a collective can end it."""
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()


def parameter_digest(model: nn.Module, buffers: bool = True) -> str:
    """A hash of every parameter's bytes (and every buffer's, with ``buffers``)."""
    digest = hashlib.sha256()
    tensors = model.state_dict().values() if buffers else model.parameters()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def check_in_sync(model: nn.Module, world: World) -> str:
    """The model's digest (parameters and buffers), after checking that every rank has the
    same parameters. Buffers are left out of the comparison: BatchNorm's running statistics
    are each rank's own between DDP's broadcasts from rank 0 at each forward pass (only rank
    0's are saved), and comparing them stopped every DDP run of a BatchNorm model."""
    mine = parameter_digest(model)
    if not world.distributed:
        return mine
    weights = parameter_digest(model, buffers=False)
    digests: list[str | None] = [None] * world.size
    dist.all_gather_object(digests, weights)
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks are out of sync: parameter digests {digests}")
    return mine


def any_rank(flag: bool, world: World, device: torch.device) -> bool:
    """Whether ``flag`` is true on any rank: a decision every rank must take alike (skip a
    step whose loss was not finite on one of them)."""
    if not world.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def all_reduce_mean(values: torch.Tensor, world: World) -> torch.Tensor:
    """The mean of ``values`` over ranks (for logging)."""
    if world.distributed:
        values = values.clone()
        dist.all_reduce(values)
        values /= world.size
    return values
