"""One inference worker: loads the model once, then predicts blocks with IO overlapped.

A reader pool fetches the input of the next blocks while the device predicts the current one;
a writer pool compresses and writes finished blocks and only then writes their done-markers.
The queues are short (``PREFETCH`` blocks read ahead, ``WRITES_IN_FLIGHT`` blocks being
written), so host memory is bounded by the block size, never by the volume's. Every
scheduler (in-process, local processes, daisy) runs blocks through this class.
"""

from __future__ import annotations

import errno
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError
from ..io import open_volume
from .engine import Engine, load_model, quantise
from .job import Job, open_output_arrays
from .plan import Zyx

PREFETCH = 2
WRITES_IN_FLIGHT = 2
STAGES = ("read", "predict", "write", "wait_read", "wait_write")
"""Seconds a worker sums per stage: reading (reader threads), predicting and quantising
(the device; main thread), writing (writer threads), and the main thread waiting for a read
or for a write slot. Waits near zero: the device bounds the rate; large: the IO does."""
DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


@dataclass(frozen=True)
class BlockDone:
    """What a worker reports after a block's chunks and marker are written."""

    block: Zyx
    voxels: int
    predicted: bool  # False: skipped by the mask or an all-zero input, written as zeros


class BlockWorker:
    """Predicts and writes blocks of one job on one device."""

    def __init__(self, job: Job, device: torch.device, model: torch.nn.Module | None = None
                 ) -> None:
        self.job = job
        self.volume = open_volume(job.input_path)
        self.mask = open_volume(job.mask_path) if job.mask_path else None
        self.arrays = open_output_arrays(job)
        if model is None:
            model = load_model(job.recipe, job.checkpoint, device)
        self.engine = Engine(job.recipe, model, device, tta=job.tta)
        self.dtype = job.recipe.infer.dtype
        self.seconds = {stage: 0.0 for stage in STAGES}
        self._lock = threading.Lock()

    def run(self, blocks: Iterable[Zyx], on_done: Callable[[BlockDone], None] | None = None
            ) -> None:
        """Predict and write ``blocks``; ``on_done`` is called as each one is complete."""
        with ThreadPoolExecutor(2, thread_name_prefix="emrun-read") as readers, \
                ThreadPoolExecutor(2, thread_name_prefix="emrun-write") as writers:
            reads: deque[tuple[Zyx, Future[np.ndarray | None]]] = deque()
            writes: deque[Future[BlockDone]] = deque()
            todo = iter(blocks)

            def refill() -> None:
                while len(reads) < PREFETCH:
                    block = next(todo, None)
                    if block is None:
                        return
                    reads.append((block, readers.submit(self._read, block)))

            refill()
            try:
                while reads:
                    block, pending = reads.popleft()
                    with self._timed("wait_read"):
                        raw = pending.result()
                    refill()
                    with self._timed("predict"):
                        values = self._predict(block, raw)
                    writes.append(writers.submit(self._write, block, values, raw is not None))
                    while len(writes) > WRITES_IN_FLIGHT or (writes and writes[0].done()):
                        with self._timed("wait_write"):
                            done = writes.popleft().result()
                        _report(done, on_done)
                while writes:
                    with self._timed("wait_write"):
                        done = writes.popleft().result()
                    _report(done, on_done)
            except BaseException:
                for _, future in reads:
                    future.cancel()
                for future in writes:
                    future.cancel()
                raise

    @contextmanager
    def _timed(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self.seconds[stage] += time.perf_counter() - started

    def _read(self, block: Zyx) -> np.ndarray | None:
        """The block's input, or None when the mask excludes it or it is all zero."""
        with self._timed("read"):
            return self._read_input(block)

    def _read_input(self, block: Zyx) -> np.ndarray | None:
        layout, origin = self.job.layout, self.job.roi_offset
        if self.mask is not None:
            start, stop = layout.write_box(block)
            if not self.mask.read(tuple(slice(a + o, b + o) for a, b, o in zip(
                    start, stop, origin, strict=True))).any():
                return None
        return self.engine.read_input(self.volume, layout, block, origin)

    def _predict(self, block: Zyx, raw: np.ndarray | None) -> dict[str, np.ndarray]:
        """Quantised predictions of the block's write region, or zeros when skipped."""
        if raw is None:
            start, stop = self.job.layout.write_box(block)
            size = tuple(b - a for a, b in zip(start, stop, strict=True))
            return {n: np.zeros((a.shape[0], *size), dtype=a.dtype)
                    for n, a in self.arrays.items()}
        blended = self.engine.predict(raw, self.job.layout, block, self.job.scale)
        return {n: quantise(t, self.dtype) for n, t in blended.items()}

    def _write(self, block: Zyx, values: dict[str, np.ndarray], predicted: bool) -> BlockDone:
        """Write the block's chunks, then its done-marker (never the marker before the data)."""
        with self._timed("write"):
            return self._write_block(block, values, predicted)

    def _write_block(self, block: Zyx, values: dict[str, np.ndarray],
                     predicted: bool) -> BlockDone:
        start, stop = self.job.layout.write_box(block)
        region = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
        try:
            for name, array in self.arrays.items():
                array[(slice(None), *region)] = values[name]
            self.job.marker(block).touch()
        except OSError as exc:
            if exc.errno in DISK_FULL:
                raise UserError(
                    f"{self.job.output}: the disk is full ({exc.strerror}) while writing block "
                    f"{list(block)}; free space and run again with --resume (finished blocks "
                    "are kept, this one is redone)") from None
            raise
        return BlockDone(block, math.prod(b - a for a, b in zip(start, stop, strict=True)),
                         predicted)


def _report(done: BlockDone, on_done: Callable[[BlockDone], None] | None) -> None:
    if on_done is not None:
        on_done(done)
