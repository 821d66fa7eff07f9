"""Segment and score several values of a segmenter's parameter at once, one worker process
per value, so that a sweep (and the trainer's validation) costs the slowest value, not the sum.

The inputs (float32 affinities, truth, mask) go into shared memory once; each spawned worker
maps them, segments with its value, scores against the truth and returns the scores and the
segmentation. Spawned, not forked: the parent may hold a CUDA context, zarr's event-loop
thread and data-loader threads. The number of workers is bounded by the cores this process
may use and by the memory one value needs (the segmenter's ``bytes_per_voxel``).
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from ..devices import available_memory, cpu_cores
from .affinities import Offset
from .base import Segmenter
from .pipeline import segment_values

__all__ = ["parallel_workers", "shares_work", "sweep_in_parallel"]

MIN_VOXELS = 1 << 20
"""Below this many voxels per value a sweep stays in this process unless workers are given:
starting a worker (a new interpreter importing emrun) costs more than segmenting."""
MEMORY_SHARE = 0.8
"""Fraction of the available memory the workers may plan to use together."""

Shared = tuple[str, tuple[int, ...], str]
"""A shared-memory block's name, the array's shape and dtype."""


def parallel_workers(values: int, voxels: int, bytes_per_voxel: int, *,
                     cores: int | None = None, memory: int | None = None) -> int:
    """How many values to segment at once: at most one per value and per core, and no more
    than the available memory holds (at least 1)."""
    if cores is None:
        cores = cpu_cores()
    memory = available_memory() if memory is None else memory
    fit = int(memory * MEMORY_SHARE) // max(1, voxels * bytes_per_voxel)
    return max(1, min(values, cores, fit))


def shares_work(segmenter: Segmenter) -> bool:
    """Whether the segmenter computes all values in one pass (waterz refines one
    agglomeration through increasing thresholds): such a sweep stays sequential."""
    return type(segmenter).fragments_for is not Segmenter.fragments_for


def sweep_in_parallel(affs: np.ndarray, offsets: Sequence[Offset], segmenter: Segmenter,
                      values: Sequence[float], truth: np.ndarray, mask: np.ndarray | None,
                      workers: int) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
    """(scores, segmentation) per value, in the order of ``values``; the same results as
    segmenting and scoring each value in this process. ``affs`` float32 (c, z, y, x)."""
    context = multiprocessing.get_context("spawn")
    with ExitStack() as stack:
        shared = {}
        for key, array in (("affs", affs), ("truth", truth), ("mask", mask)):
            if array is None:
                continue
            block = shared_memory.SharedMemory(create=True, size=max(1, array.nbytes))
            stack.callback(block.unlink)
            stack.callback(block.close)
            np.ndarray(array.shape, array.dtype, buffer=block.buf)[...] = array
            shared[key] = (block.name, tuple(array.shape), array.dtype.str)
        pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=context))
        futures = [pool.submit(_segment_and_score, shared, tuple(map(tuple, offsets)),
                               segmenter.with_value(v)) for v in values]
        for value, future in zip(values, futures, strict=True):
            try:
                yield future.result()
            except BrokenProcessPool:
                raise RuntimeError(
                    f"a sweep worker died while segmenting {segmenter.value_name} {value:g}: "
                    "killed for memory (run fewer values at once: --workers, or a smaller "
                    "volume), or a script calling emrun without an `if __name__ == "
                    "'__main__':` guard (workers are spawned and import the main module)"
                    ) from None


def _attach(name: str) -> shared_memory.SharedMemory:
    """Map a block the parent owns. Spawned workers share the parent's resource tracker, so
    attaching (which registers the name again, a no-op) leaves the parent's ``unlink`` as
    the one clean-up; from Python 3.13 the worker does not register it at all."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)
    return shared_memory.SharedMemory(name=name)


def _segment_and_score(shared: dict[str, Shared], offsets: tuple[Offset, ...],
                       segmenter: Segmenter) -> tuple[dict[str, Any], np.ndarray]:
    """In a worker: map the shared inputs, segment with this segmenter's value, score."""
    from ..evaluate import score

    blocks = {key: _attach(name) for key, (name, _, _) in shared.items()}
    try:
        arrays = {key: np.ndarray(shape, np.dtype(dtype), buffer=blocks[key].buf)
                  for key, (_, shape, dtype) in shared.items()}
        affs, truth, mask = arrays["affs"], arrays["truth"], arrays.get("mask")
        seg = next(segment_values(affs, offsets, segmenter, [segmenter.value], mask))
        scores = score(seg, truth, mask).as_dict()
        del arrays, affs, truth, mask  # views into the blocks must go before closing them
        return scores, seg
    finally:
        for block in blocks.values():
            block.close()
