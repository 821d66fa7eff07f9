"""One inference worker: loads the model once, then predicts blocks with IO overlapped.

A reader pool fetches the input of the next blocks while the device predicts the current one;
a writer pool compresses and writes finished blocks and only then writes their done-markers.
The queues are short (``PREFETCH`` blocks read ahead, ``WRITES_IN_FLIGHT`` blocks being
written), so host memory is bounded by the block size, never by the volume's. Every
scheduler (in-process, local processes, daisy) runs blocks through this class.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import DISK_FULL, UserError
from ..geometry import Coordinate, Roi, Zyx, slices
from ..io import masks, open_volume
from ..io.one_channel import single_channel
from ..io.pyramid import clear_shards
from ..io.window import placed_over
from .engine import Engine, load_model, quantise, read_reflected
from .job import Job, open_output_arrays
from .plan import Layout
from .transfer import DeviceQueue, HostArray, pinned, to_device, to_host

RawInput = np.ndarray | torch.Tensor | None

PREFETCH = 2
WRITES_IN_FLIGHT = 2
STAGES = ("read", "pin", "predict", "write", "wait_read", "wait_write")
"""Seconds a worker sums per stage: reading (reader threads; ``pin`` is the part of it spent
copying the input into page-locked memory for a GPU), predicting and quantising (the device;
main thread), writing (writer threads), and the main thread waiting for a read or for a
write slot. Waits near zero: the device bounds the rate; large: the IO does."""


@dataclass(frozen=True)
class BlockDone:
    """What a worker reports after a block's chunks and marker are written."""

    block: Zyx
    voxels: int
    patches: int  # forward-passed for it (own and recomputed)
    empty: bool = False  # skipped: outside the mask or a blank input; no chunk written,
    # it reads as zeros
    nonfinite: int = 0  # NaN or infinite network outputs blended as 0: of its own patches,
    # and within it of patches whose owner was skipped (`BlockWorker._nonfinite`)


class BlockWorker:
    """Predicts and writes blocks of one job on one device."""

    def __init__(self, job: Job, device: torch.device, model: torch.nn.Module | None = None
                 ) -> None:
        self.job = job
        self.volume = single_channel(open_volume(job.input_path))
        # a larger mask: the part the input covers; one of the box predicted: 0 around it
        self.mask = placed_over(self.volume, single_channel(open_volume(job.mask_path)),
                                Roi(job.roi_offset, job.layout.shape)) \
            if job.mask_path else None
        self.arrays = open_output_arrays(job)
        if model is None:
            model = load_model(job.recipe, job.checkpoint, device)
        self.engine = Engine(job.recipe, model, device, tta=job.tta)
        self.dtype = job.recipe.infer.dtype
        self.seconds = {stage: 0.0 for stage in STAGES}
        self._lock = threading.Lock()
        self._queue = DeviceQueue(device)
        self._skips: dict[Zyx, bool] = {}  # block -> skipped (`_skipped`)

    def run(self, blocks: Iterable[Zyx], on_done: Callable[[BlockDone], None] | None = None
            ) -> None:
        """Predict and write ``blocks`` in this order, as one unit."""
        self.run_units([list(blocks)], on_done)

    def run_units(self, units: Iterable[Sequence[Zyx]],
                  on_done: Callable[[BlockDone], None] | None = None,
                  stop: Callable[[], bool] = lambda: False, budget: int = 0) -> None:
        """Predict and write each unit's blocks in order; ``on_done`` is called as each block
        is complete. Partial sums are handed from block to block within a unit, never
        across units (each unit can go to another worker). An owner's sum recomputed in a
        block (the owner lies in another unit, is done or was skipped) is handed on to the
        later blocks of the unit it reaches while every sum held fits ``budget`` bytes on
        the device (the hand-over budget the units were chosen for with the job's
        ``handover_host`` bytes of host memory beside it: `schedule.handover_budget`; see
        `Carries`); otherwise those blocks recompute it again, to the same bits. Once
        ``stop()`` is true no block is started; those read or predicted already are
        finished and marked."""
        with ThreadPoolExecutor(2, thread_name_prefix="emrun-read") as readers, \
                ThreadPoolExecutor(WRITES_IN_FLIGHT + 1, thread_name_prefix="emrun-write"
                                   ) as writers:
            reads: deque[tuple[Step, Future[RawInput]]] = deque()
            writes: deque[Future[BlockDone]] = deque()
            todo = _steps(units, stop)
            carries = Carries(budget, self.job.handover_host)
            unit: dict[Zyx, int] | None = None

            def refill() -> None:
                while len(reads) < PREFETCH:
                    step = next(todo, None)
                    if step is None:
                        return
                    reads.append((step, readers.submit(self._read, step.block)))

            refill()
            try:
                while reads:
                    step, pending = reads.popleft()
                    with self._timed("wait_read"):
                        raw = pending.result()
                    refill()
                    if step.unit is not unit:  # nothing is handed across units
                        unit = step.unit
                        carries.clear()
                    before = self.engine.predicted_patches
                    with self._timed("predict"):
                        values = self._predict(step, raw, carries)
                    writes.append(writers.submit(self._write, step.block, values,
                                                 self.engine.predicted_patches - before))
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

    def _read(self, block: Zyx) -> RawInput:
        """The block's input (pinned when bound for a GPU), or None when the mask excludes it
        or it is blank (`Engine.read_input`)."""
        with self._timed("read"):
            raw = self._read_input(block)
            if raw is None:
                return None
            with self._timed("pin"):
                return pinned(raw, self.engine.device)

    def _read_input(self, block: Zyx) -> np.ndarray | None:
        layout, origin = self.job.layout, self.job.roi_offset
        inside = layout.write_box(block).shift(Coordinate(origin))
        if self.mask is not None and not masks.inside(self.mask.read(inside)).any():
            return None
        return self.engine.read_input(self.volume, layout, block, origin, self.job.scale[0],
                                      mask=self.mask)

    def _predict(self, step: Step, raw: RawInput, carries: Carries) -> Outputs | None:
        """Quantised predictions of the block's write region on their way to the host, or
        None when skipped (masked out or a blank input). Takes the partial sums handed to
        this block from ``carries`` and leaves there those it hands to later blocks of its
        unit."""
        layout, block = self.job.layout, step.block
        carried, counts = carries.take(block, layout.owners(block))
        if raw is None:  # nothing is written: unwritten chunks read as the fill value, 0
            return None
        keep = later_reached(layout, step.unit, block)
        hand_on = carries.plan(layout, step, [o for o in layout.owners(block)
                                              if o != block and o not in carried],
                               sum(self.engine.channels.values()))
        with self.engine.host_threads():  # quantising too: elementwise (`Engine.predict`)
            result = self.engine.predict(raw, layout, block, self.job.scale, carried=carried,
                                         keep=keep, hand_on=hand_on, read=self._read_outside)
            values = {n: quantise(t, self.dtype, in_place=True)  # the block's own sums
                      for n, t in result.values.items()}
        carries.keep(step, result.carries, result.handed, sums_made(
            layout, step.unit, step.following, sum(self.engine.channels.values())))
        counts.update(result.recomputed)  # a handed-on sum's count came with it
        owners = list(counts)
        recomputed = to_host(torch.stack([counts[o] for o in owners])) if owners else None
        host = Outputs({n: to_host(t) for n, t in values.items()}, to_host(result.nonfinite),
                       owners, recomputed)
        self._queue.step()  # the previous block's device work is done (this one is queued):
        return host  # the predict stage measures the device, not the launches

    def _read_outside(self, box: Roi) -> np.ndarray:
        """Input beyond a block's own (a recomputed batch may reach there), reflected."""
        return read_reflected(self.volume, box.shift(Coordinate(self.job.roi_offset)),
                              self.mask, self.job.scale[0])

    def _nonfinite(self, values: Outputs) -> int:
        """The block's count of NaN or infinite network outputs written as 0: those of its
        own patches, and those within it of patches whose owner was skipped (masked out or
        blank: it predicted nothing, so only the blocks its patches reach see them; a
        predicted owner counts its own). Whether an owner was skipped is asked only when
        its patches gave such values here, which is rare."""
        count = int(values.nonfinite.numpy())
        if values.recomputed is None:
            return count
        found = values.recomputed.numpy()
        return count + sum(int(n) for owner, n in zip(values.owners, found, strict=True)
                           if n and self._skipped(owner))

    def _skipped(self, block: Zyx) -> bool:
        """Whether ``block`` is skipped, as its own worker decides it (`_read_input`)."""
        if block not in self._skips:
            self._skips[block] = self._read_input(block) is None
        return self._skips[block]

    def _write(self, block: Zyx, values: Outputs | None, patches: int) -> BlockDone:
        """Write the block's chunks (none when skipped), then its done-marker (never the
        marker before the data)."""
        with self._timed("write"):
            return self._write_block(block, values, patches)

    def _write_block(self, block: Zyx, values: Outputs | None, patches: int) -> BlockDone:
        box = self.job.layout.write_box(block)
        region = slices(box)
        nonfinite = 0 if values is None else self._nonfinite(values)
        try:
            if values is not None:
                for name, array in self.arrays.items():
                    clear_shards(array, (slice(None), *region))  # a torn one is not read
                    array[(slice(None), *region)] = values.arrays[name].numpy()
            self.job.mark_done(block, nonfinite, empty=values is None)
        except OSError as exc:
            if exc.errno in DISK_FULL:
                raise UserError(
                    f"{self.job.output}: the disk is full ({exc.strerror}) while writing block "
                    f"{list(block)}; free space and run again with --resume (finished blocks "
                    "are kept, this one is redone)") from None
            raise
        return BlockDone(block, box.size, patches, empty=values is None, nonfinite=nonfinite)


@dataclass(frozen=True)
class Outputs:
    """A block's quantised outputs per task and its count of non-finite network outputs,
    on their way to the host (the writer thread waits for them); ``recomputed`` holds,
    for each of ``owners`` whose partial sum the block recomputed, the non-finite outputs
    of that owner's patches within the block."""

    arrays: dict[str, HostArray]
    nonfinite: HostArray
    owners: list[Zyx] = field(default_factory=list)
    recomputed: HostArray | None = None


class Carries:
    """The partial sums a worker holds for later blocks of its unit, keyed (to block, from
    owner): on the device within ``budget`` bytes, and beyond it within ``host_budget``
    bytes of host memory (`emrun infer --handover-host-memory`: pinned, copied back while
    the block before theirs is predicted, `transfer.to_device`; on a CPU the two are one
    memory and simply add up). An owner's own
    sums are held whatever they take: the unit's shape bounds them below the two budgets
    (`plan.choose_tiling`). Sums a block recomputed and hands on, with their counts of
    non-finite outputs, take what is left: one is let in only where it fits. When the
    device's share is full, the sum needed last goes to host memory, or, where that is
    full too, a handed-on one is dropped, the one needed last first. A dropped or refused
    sum is recomputed by its block, to the same bits (a copy is exact), so only forward
    passes depend on what fitted where."""

    def __init__(self, budget: int, host_budget: int = 0) -> None:
        self.budget = budget
        self.host_budget = host_budget
        self.sums: dict[tuple[Zyx, Zyx], torch.Tensor] = {}  # on the device
        self.away: dict[tuple[Zyx, Zyx], tuple[HostArray, torch.device]] = {}  # in host
        # memory, with the device each goes back to
        self.counts: dict[tuple[Zyx, Zyx], torch.Tensor] = {}  # of the handed-on sums
        self.needed: dict[tuple[Zyx, Zyx], int] = {}  # sum held -> its block's rank
        self.held = 0  # bytes of the sums held on the device
        self.held_away = 0  # and in host memory
        self.taken = 0  # bytes of the sums the block being predicted took (still alive)

    def clear(self) -> None:
        """A new unit: nothing is handed across units."""
        self.sums.clear()
        self.away.clear()
        self.counts.clear()
        self.needed.clear()
        self.held = self.held_away = self.taken = 0

    def take(self, block: Zyx, owners: Sequence[Zyx]
             ) -> tuple[dict[Zyx, torch.Tensor], dict[Zyx, torch.Tensor]]:
        """The sums handed to ``block`` by owner (on the device), and the counts of those
        recomputed elsewhere in the unit; taken off (a skipped block frees them too)."""
        sums, counts = {}, {}
        for owner in owners:
            key = (block, owner)
            if key in self.counts:
                counts[owner] = self.counts[key]
            if key in self.sums or key in self.away:
                sums[owner] = self._pop(key)
        self.taken = sum(map(_bytes, sums.values()))
        return sums, counts

    def plan(self, layout: Layout, step: Step, recomputed: Sequence[Zyx], channels: int
             ) -> dict[Zyx, list[Zyx]]:
        """For each owner ``step``'s block recomputes, the later blocks of its unit to hand
        that sum on to: those the owner's patches reach at or after this block on every axis
        (each of the owner's patches that reaches one also reaches this block: the forward
        passes here are all it needs), not already given it, while the budgets last: beside
        every sum held, those this block took and those it makes (`sums_made`), all alive
        until the block is done."""
        block = step.block
        room = self.budget + self.host_budget - self.held - self.held_away - self.taken - \
            sums_made(layout, step.unit, block, channels)
        targets: dict[Zyx, list[Zyx]] = {}
        for owner in recomputed:
            owned = layout.owned_box(owner)
            if owned is None:
                continue
            for target in layout.reached(owner):
                if target == block or step.unit.get(target, -1) <= step.rank or \
                        (target, owner) in self.sums or (target, owner) in self.away or \
                        any(t < b for t, b in zip(target, block, strict=True)):
                    continue
                size = 4 * channels * layout.write_box(target).intersect(owned).size
                if 0 < size <= room:
                    room -= size
                    targets.setdefault(owner, []).append(target)
        return targets

    def keep(self, step: Step, own: dict[Zyx, torch.Tensor],
             handed: dict[tuple[Zyx, Zyx], tuple[torch.Tensor, torch.Tensor]],
             reserve: int = 0) -> None:
        """Hold ``step``'s block's own sums for later blocks (making room on the device,
        `_make_room`), then the recomputed ones it hands on that still fit, on the device
        or else in host memory, leaving ``reserve`` device bytes free: what the next block
        will make beside them (its own sums fit with the unit's by the unit's shape,
        `plan._in_flight`; handed-on ones filling the budget made a block's sums pass it
        while it ran)."""
        self.taken = 0
        for target, partial in own.items():
            key = (target, step.block)
            self._put(key, partial)
            self.needed[key] = step.unit[target]
        self._make_room(reserve)
        for key, (partial, count) in handed.items():
            size = _bytes(partial)
            if self.held + size + reserve <= self.budget:
                self._put(key, partial)
            elif self.held_away + _away_bytes(partial) <= self.host_budget:
                self._put_away(key, partial)
            else:
                continue
            self.counts[key] = count
            self.needed[key] = step.unit[key[0]]

    def _make_room(self, reserve: int) -> None:
        """Bring the device's share down to ``budget - reserve``: the sum needed last goes
        to host memory where it fits, else the handed-on sum needed last, on the device or
        in host memory (making room there), is dropped; own sums that fit nowhere stay (the
        unit's shape keeps that from happening)."""
        while self.held + reserve > self.budget:
            room = self.host_budget - self.held_away
            movable = [k for k in self.sums if _away_bytes(self.sums[k]) <= room]
            if movable:
                key = max(movable, key=self.needed.__getitem__)
                partial = self.sums.pop(key)
                self.held -= _bytes(partial)
                self._put_away(key, partial)
                continue
            handed = [k for k in self.counts if k in self.sums or k in self.away]
            if not handed:
                return
            self._drop(max(handed, key=self.needed.__getitem__))

    def _put(self, key: tuple[Zyx, Zyx], partial: torch.Tensor) -> None:
        self.sums[key] = partial
        self.held += _bytes(partial)

    def _put_away(self, key: tuple[Zyx, Zyx], partial: torch.Tensor) -> None:
        """Hold a sum in host memory (its copy runs beside the device's work)."""
        self.away[key] = to_host(partial), partial.device
        self.held_away += _away_bytes(partial)

    def _pop(self, key: tuple[Zyx, Zyx]) -> torch.Tensor:
        """Take a sum off, on the device (a handed-on one's count and rank with it)."""
        partial = to_device(*self.away[key]) if key in self.away else self.sums[key]
        self._drop(key)
        return partial

    def _drop(self, key: tuple[Zyx, Zyx]) -> None:
        """Forget a sum, wherever it waits (a handed-on one's count and rank with it)."""
        if key in self.away:
            host, device = self.away.pop(key)
            self.held_away -= _away_bytes(host.tensor, device)
        else:
            self.held -= _bytes(self.sums.pop(key))
        self.counts.pop(key, None)
        self.needed.pop(key, None)


def _bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _away_bytes(tensor: torch.Tensor, device: torch.device | None = None) -> int:
    """Host memory a sum from ``device`` (``tensor``'s own by default) takes while it
    waits: on a GPU, pinned memory from torch's cache, which rounds each buffer up to a
    power of two (a sum of 5 MiB holds 8)."""
    size = _bytes(tensor)
    if (device or tensor.device).type != "cuda" or size <= 1:
        return size
    return 1 << (size - 1).bit_length()


@dataclass(frozen=True)
class Step:
    """A block, its unit (block -> rank in the unit), its own rank there and the unit's
    next block (None: the last)."""

    block: Zyx
    unit: dict[Zyx, int]
    rank: int
    following: Zyx | None = None


def _steps(units: Iterable[Sequence[Zyx]], stop: Callable[[], bool]) -> Iterator[Step]:
    for blocks in units:
        rank = {block: i for i, block in enumerate(blocks)}
        for i, block in enumerate(blocks):
            if stop():
                return
            yield Step(block, rank, i, blocks[i + 1] if i + 1 < len(blocks) else None)


def later_reached(layout: Layout, unit: dict[Zyx, int], block: Zyx) -> list[Zyx]:
    """The later blocks of ``block``'s unit that its own patches reach: those it keeps a
    partial sum for."""
    return [t for t in layout.reached(block) if unit.get(t, -1) > unit[block]]


def sums_made(layout: Layout, unit: dict[Zyx, int], block: Zyx | None, channels: int) -> int:
    """Bytes of the partial sums ``block`` makes for the later blocks of its unit (0 for
    None): float32 over each such block's part of its own patches."""
    owned = None if block is None else layout.owned_box(block)
    if owned is None:
        return 0
    return 4 * channels * sum(layout.write_box(t).intersect(owned).size
                              for t in later_reached(layout, unit, block))


def _report(done: BlockDone, on_done: Callable[[BlockDone], None] | None) -> None:
    if on_done is not None:
        on_done(done)
