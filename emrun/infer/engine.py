"""The inference engine: blended predictions of one block on one device.

For each block (a whole number of output chunks) the engine reads the input its lattice
patches need, once, padded by reflection about the volume's own borders (so padding does not
depend on the block). It predicts only the patches the block owns (``plan``: those that start
in it), in the owner's fixed batches, and sums ``window x prediction`` over the block and the
later blocks they reach, in float32 on the device. The block's value is the sum of its
owners' partial sums in block order, divided by the sum of the windows: an earlier owner's
partial sum is handed over by the worker when it predicted that owner in the same unit, and
recomputed here from that owner's batches otherwise (a unit border, a resumed run, a masked
owner); a recomputed sum is handed on in turn to the later blocks of the unit it reaches.
Multiplications and additions are separate operations on the same operands in the same
order either way, so hand-over and recomputation agree to the last bit: the output
does not depend on units, resumption or how many workers there are (given the same
per-patch network output; CPU thread counts change that in the last bits). Only the block's
write region travels back to the host, quantised on the device. Scheduling, IO overlap and
done-markers live in ``worker``, ``schedule`` and ``job``.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import threading
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..geometry import Coordinate, Roi, Zyx, zyx
from ..io import Volume, masks
from ..io.intensity import default_intensity
from ..io.package import load_network
from ..models import build_model, weights_mismatch
from ..recipe import Recipe
from ..recipe.tasks import AffinityTarget, LSDTarget
from ..registry import blends
from .plan import Layout

G = TypeVar("G")
"""What a forward pass's batch is made from (`Engine.passes`): a block's patch starts, or a
benchmark's ready batch."""

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sigmoid": torch.sigmoid, "tanh": torch.tanh, "none": lambda t: t}


def reflect_index(index: np.ndarray, n: int) -> np.ndarray:
    """Indices mirrored into [0, n) about the volume's borders (numpy's 'reflect' mode)."""
    if n == 1:
        return np.zeros_like(index)
    period = 2 * n - 2
    folded = np.abs(index) % period
    return np.where(folded >= n, period - folded, folded)


def read_reflected(volume: Volume, box: Roi, mask: Volume | None = None,
                   low: float = 0.0) -> np.ndarray:
    """The input over ``box``, reflected about the volume's borders where outside, with
    non-finite voxels outside ``mask`` read as ``low`` as `Engine.read_input` reads them
    (a recomputed patch must see what the block that handed it over saw)."""
    source, index = reflected_source(volume, box)
    data = finite_input(volume, source, volume.read(source), mask, low,
                        f"around patches {list(box.begin)} to {list(box.end)}")
    return spread(data, index)


def spread(data: np.ndarray, index: list[np.ndarray]) -> np.ndarray:
    """``data[np.ix_(*index)]`` with an axis whose index is the identity left as it is: a
    block away from the volume's borders reads no voxel twice and is returned as read (a
    view, no copy; the fancy index copied every block's input, a tenth of a reader's
    time), the others take only the axes that repeat voxels."""
    for axis, rows in enumerate(index):
        if len(rows) != data.shape[axis] or \
                (len(rows) and (rows[0] != 0 or np.any(np.diff(rows) != 1))):
            data = np.take(data, rows, axis=axis)
    return data


def finite_input(volume: Volume, source: Roi, data: np.ndarray, mask: Volume | None,
                 low: float, where: str) -> np.ndarray:
    """``data`` (the volume over ``source``) with its NaN and infinite voxels outside
    ``mask`` read as ``low`` (black, as the blank input around a mask is), so a block inside
    the mask can be predicted beside them; any inside the mask (or with no mask) are
    refused: they would spread through every patch that sees them. Counted in the volume,
    not in the reflected input (which repeats voxels near its borders)."""
    if data.dtype.kind != "f":
        return data
    bad = ~np.isfinite(data)
    if not bad.any():
        return data
    if mask is not None:
        bad_inside = bad & masks.inside(mask.read(source))
        if not bad_inside.any():
            return np.where(bad, data.dtype.type(low), data)
        bad = bad_inside
    raise UserError(f"{volume}: {int(bad.sum())} NaN or infinite voxels "
                    f"{'inside the mask ' if mask is not None else ''}{where} (input "
                    f"{list(source.begin)} to {list(source.end)}); they would spread through "
                    "every patch that sees them: replace them, or leave their blocks out with "
                    "--mask (finished blocks are kept: --resume)")


def reflected_source(volume: Volume, box: Roi) -> tuple[Roi, list[np.ndarray]]:
    """The voxels of the volume that ``box`` reflected about its borders reads (each once:
    reflecting a run of indices gives a run), and per axis the index into them of each
    voxel of ``box``."""
    shape = volume.shape[-3:]
    index = [reflect_index(np.arange(a, b), n)
             for a, b, n in zip(box.begin, box.end, shape, strict=True)]
    low = Coordinate(int(i.min()) for i in index)
    high = Coordinate(int(i.max()) + 1 for i in index)
    return Roi(low, high - low), [i - lo for i, lo in zip(index, low, strict=True)]


def _exact_in_float32(tensor: torch.Tensor) -> bool:
    """`emrun.io.intensity.exact_in_float32` of a tensor's dtype."""
    return tensor.element_size() <= 2 or tensor.dtype == torch.float32


def intensity_range(recipe: Recipe, volume: Volume) -> tuple[float, float]:
    """The training sources' intensity scale when they give one, else the dtype's."""
    return recipe.given_intensity() or default_intensity(volume.dtype)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for piece in iter(lambda: handle.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def load_model(recipe: Recipe, checkpoint: Path, device: torch.device) -> nn.Module:
    """The recipe's model with the weights of ``checkpoint`` (a training checkpoint or a
    model package), in eval mode on ``device``."""
    state = load_network(checkpoint)
    broken = [name for name, tensor in state.get("model", {}).items()
              if isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
              and not torch.isfinite(tensor).all()]
    if broken:
        raise UserError(f"{checkpoint}: its weights hold NaN or infinite values ({broken[0]}"
                        f"{f' and {len(broken) - 1} more' if len(broken) > 1 else ''}); a run "
                        "that diverged? Use an earlier checkpoint")
    model = build_model(recipe)
    if (why := weights_mismatch(model, state.get("model"))) is not None:
        raise UserError(f"{checkpoint}: its weights do not match the recipe's model and tasks "
                        f"(tensors: {why})")
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"{checkpoint}: its weights do not match the recipe's model and tasks "
                        f"({first})") from None
    return model.to(device).eval()


def tta_variants(recipe: Recipe, tta: int) -> list[Any]:
    """The test-time augmentation variants ``tta`` asks for (none for 1), checked against the
    recipe: transposing needs a square patch in y/x, and every affinity offset must map to
    an offset of the task under each variant."""
    if tta <= 1:
        return []
    from .tta import check_offsets, variants

    patch = recipe.infer_patch()
    if tta >= 8 and patch[1] != patch[2]:
        raise UserError(f"tta {tta} transposes y and x, which needs a square patch "
                        f"in y/x (infer patch {list(patch)}); use tta 4 or less")
    chosen = variants(tta, patch[1] == patch[2])
    for name, task in recipe.tasks.items():
        sigma = task.target.sigma_zyx() if isinstance(task.target, LSDTarget) else None
        if tta >= 8 and sigma is not None and sigma[1] != sigma[2]:
            raise UserError(f"tasks.{name}: tta {tta} transposes y and x, and this task's "
                            f"descriptors have another sigma in y than in x ({sigma[1]:g}, "
                            f"{sigma[2]:g} nm): a transposed prediction is not one of them; "
                            "use tta 4 or less")
        if isinstance(task.target, AffinityTarget):
            try:
                check_offsets(task.target.offsets, chosen)
            except ValueError as exc:
                raise UserError(f"tasks.{name}: {exc}") from None
    return chosen


class Engine:
    """Predicts blocks of a volume with one model on one device."""

    def __init__(self, recipe: Recipe, model: nn.Module, device: torch.device, *,
                 batch_size: int | None = None, precision: str | None = None,
                 tta: int | None = None, compile: bool | None = None) -> None:
        self.recipe = recipe
        self.device = device
        self.patch: Zyx = recipe.infer_patch()
        self.stride: Zyx = recipe.infer.resolved_stride(self.patch)
        self.batch_size = batch_size or recipe.infer.batch_size
        precision = precision or recipe.infer.precision
        self.autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        if device.type == "cpu" and self.autocast is torch.float16:
            self.autocast = torch.bfloat16
        self.tasks = {name: task for name, task in recipe.tasks.items()}
        self.channels = recipe.head_channels()
        self.channels_last = recipe.infer.channels_last
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last_3d)
        compile = recipe.infer.compile if compile is None else compile
        mode = recipe.infer.compile_mode
        self.model = torch.compile(model, mode=None if mode == "default" else mode) \
            if compile else model
        # CUDA graphs reuse their output memory on the next replay: copy outputs out first.
        self.graphs = bool(compile) and mode == "reduce-overhead"
        # A compiled model sees one batch shape: a short last batch is padded, not recompiled
        # (cuDNN autotunes each new shape once and keeps it, so eager models need no padding).
        self.pad_batches = bool(compile)
        window = blends.build(recipe.infer.blend, patch=self.patch)
        self.window = torch.from_numpy(window).to(device)
        self.predicted_patches = 0  # forward passes of lattice patches (padding excluded)
        self.tta = tta or recipe.infer.tta
        self.variants: list[Any] = tta_variants(recipe, self.tta)
        self._buffers: dict[str, torch.Tensor] = {}  # `_buffer`
        self._weights: dict[tuple[Any, ...], torch.Tensor] = {}  # `_weight`
        self._passes: tuple[tuple[int, int], ThreadPoolExecutor] | None = None  # threads, pid

    def _forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Activated predictions for a batch (b, 1, z, y, x), TTA-reduced when enabled."""
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.autocast,
                                             enabled=self.autocast is not None):
            if not self.variants:
                raw = self._model(batch)
                return {n: ACTIVATIONS[t.activation](raw[n].float())
                        for n, t in self.tasks.items()}
            from .tta import reduce

            stacks: dict[str, list[torch.Tensor]] = {n: [] for n in self.tasks}
            gaps: dict[str, list[torch.Tensor]] = {n: [] for n in self.tasks}
            for variant in self.variants:
                raw = self._model(variant.apply(batch))
                for name, task in self.tasks.items():
                    out = ACTIVATIONS[task.activation](raw[name].float())
                    if isinstance(task.target, AffinityTarget):
                        offsets = task.target.offsets
                        gaps[name].append(variant.affinity_gaps(offsets, out.shape, out.device))
                        out = variant.invert_affinity(out, offsets)
                    elif isinstance(task.target, LSDTarget):
                        out = variant.invert_lsd(out)
                    else:
                        out = variant.invert(out)
                    stacks[name].append(out)
            how = self.recipe.infer.tta_reduce
            return {n: reduce(torch.stack(s), how.get(n, "mean"),
                              torch.stack(gaps[n])[:, None] if gaps[n] else None)
                    for n, s in stacks.items()}

    def _model(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.graphs:
            return self.model(batch)
        torch.compiler.cudagraph_mark_step_begin()
        return {name: out.clone() for name, out in self.model(batch).items()}

    def read_input(self, volume: Volume, layout: Layout, block: Zyx,
                   origin: Zyx = (0, 0, 0), low: float = 0.0, mask: Volume | None = None
                   ) -> np.ndarray | None:
        """The raw input the patches covering the block need (host memory, the volume's
        dtype), or None when every voxel is at ``low``, the intensity scale's low end (black,
        0 after scaling: outside the tissue; nothing to predict). Not raw 0: in a signed
        image that is mid-grey, and skipping it made the output depend on the block size.
        ``origin``: where the layout's (0, 0, 0) lies in ``volume`` (a ROI). Non-finite
        voxels outside ``mask`` (a volume of the input's shape) read as ``low``
        (`finite_input`). Runs in reader threads."""
        box = layout.read_box(block).shift(Coordinate(origin))
        source, index = reflected_source(volume, box)
        data = finite_input(volume, source, volume.read(source), mask, low,
                            f"around block {list(block)}")
        blank = not data.any() if low == 0 else bool((data == low).all())
        return None if blank else spread(data, index)  # the same voxels, repeated

    def predict(self, raw: np.ndarray | torch.Tensor, layout: Layout, block: Zyx,
                scale: tuple[float, float], *, carried: Mapping[Zyx, torch.Tensor] | None = None,
                keep: Collection[Zyx] = (), hand_on: Mapping[Zyx, Sequence[Zyx]] | None = None,
                read: PatchReader | None = None) -> Prediction:
        """The blended prediction of the block's write region, on the device, from the input
        ``read_input`` returned.

        The block predicts the patches it owns; each other owner's partial sum over the block
        comes from ``carried`` (owner -> partial, handed over by whoever predicted that owner
        in this unit) or is recomputed here from that owner's own batches (so it is the same
        to the last bit). Partial sums over the blocks in ``keep`` are returned for hand-over.
        A recomputed owner's sums over its blocks in ``hand_on`` (owner -> later blocks, each
        at or after this block on every axis) come back too, from the same forward passes:
        a patch of that owner reaching such a block also reaches this one, so the batches
        recomputed here are every batch the later block would recompute, and sums over it
        are the same bits as its own recomputation would give.
        ``read(box)`` gives input outside ``raw`` (only a recomputed batch needs it).

        On a CPU the block's own tensor work (scaling, blending, summing, dividing) runs on
        one thread: it is elementwise, so the bits do not depend on it, and its small
        slices were several times slower split over threads (a busy 2-core machine: the
        bench's weight sums took 0.57 s a block against 0.009 s); the forward passes still
        run side by side on as many threads as the process has (`passes`)."""
        with self.host_threads():
            return self._predict(raw, layout, block, scale, carried or {}, keep,
                                 hand_on or {}, read)

    @contextmanager
    def host_threads(self) -> Iterator[None]:
        """One torch thread inside on a CPU (in this thread, restored when its outermost use
        leaves; see `predict` and `_one_thread`); the forward passes still use the count
        from before (`_pass_threads`)."""
        with _one_thread(self.device.type == "cpu"):
            yield

    def _predict(self, raw: np.ndarray | torch.Tensor, layout: Layout, block: Zyx,
                 scale: tuple[float, float], carried: Mapping[Zyx, torch.Tensor],
                 keep: Collection[Zyx], hand_on: Mapping[Zyx, Sequence[Zyx]],
                 read: PatchReader | None) -> Prediction:
        image = self._image(raw, scale)
        source = PatchSource(image, zyx(layout.read_box(block).offset), self.patch, read,
                             self._normalise(scale))
        box = layout.write_bounds(block)  # plain ints: `Roi` arithmetic per owner was slow
        total = torch.zeros((sum(self.channels.values()), *_size(box)), device=self.device)
        carries: dict[Zyx, torch.Tensor] = {}
        nonfinite = torch.zeros((), dtype=torch.int64, device=self.device)
        recomputed: dict[Zyx, torch.Tensor] = {}
        handed: dict[tuple[Zyx, Zyx], tuple[torch.Tensor, torch.Tensor]] = {}
        for owner in layout.owners(block):
            owned = layout.owned_box(owner)
            assert owned is not None  # an owner owns a patch
            own = zyx(owned.offset), zyx(owned.end)
            if owner == block:  # each lattice patch counted once: by its owner
                partial = self._accumulate(source, layout.batches(block, self.batch_size), own,
                                           nonfinite)
                carries = {t: partial[_local(common, own[0])].clone() for t in keep
                           if (common := _common(layout.write_bounds(t), own)) is not None}
                common = _common(box, own)
                if common is not None:
                    total[_local(common, box[0])] += partial[_local(common, own[0])]
                continue
            common = _common(box, own)
            if common is None:
                continue
            piece = carried.get(owner)
            if piece is None:  # recompute that owner's batches that reach this block
                batches = [b for b in layout.batches(owner, self.batch_size)
                           if any(overlap(p, self.patch, *box) is not None for p in b)]
                piece = self._recompute(source, batches, owner, common, [
                    (t, c) for t in hand_on.get(owner, ())
                    if (c := _common(layout.write_bounds(t), own)) is not None],
                    recomputed, handed)
            total[_local(common, box[0])] += piece
        total /= self._weight(layout, block)
        values, first = {}, 0
        for name, channels in self.channels.items():
            values[name] = total[first:first + channels]
            first += channels
        return Prediction(values, carries, nonfinite, recomputed, handed)

    def _recompute(self, source: PatchSource, batches: list[list[Zyx]], owner: Zyx,
                   common: tuple[Zyx, Zyx], targets: list[tuple[Zyx, tuple[Zyx, Zyx]]],
                   recomputed: dict[Zyx, torch.Tensor],
                   handed: dict[tuple[Zyx, Zyx], tuple[torch.Tensor, torch.Tensor]]
                   ) -> torch.Tensor:
        """``owner``'s partial sum over ``common`` (this block's part of its patches) from
        ``batches``, its count of non-finite outputs there into ``recomputed``, and for each
        later block in ``targets`` (block, its part of the owner's patches) the sum and
        count over that part into ``handed``: one pass over the box that holds them all."""
        def counter() -> torch.Tensor:
            return torch.zeros((), dtype=torch.int64, device=self.device)

        recomputed[owner] = counter()
        regions = [(common, recomputed[owner])]
        counts = {t: counter() for t, _ in targets}
        regions += [(part, counts[t]) for t, part in targets]
        span = (zyx(min(r[0][a] for r, _ in regions) for a in range(3)),
                zyx(max(r[1][a] for r, _ in regions) for a in range(3)))
        acc = self._accumulate(source, batches, span, inside=regions)
        for t, part in targets:
            handed[(t, owner)] = acc[_local(part, span[0])].clone(), counts[t]
        return acc[_local(common, span[0])]

    def _image(self, raw: np.ndarray | torch.Tensor, scale: tuple[float, float]) -> torch.Tensor:
        """The input on the device, scaled to [0, 1] (a pinned host tensor copies
        asynchronously)."""
        tensor = raw if isinstance(raw, torch.Tensor) else torch.from_numpy(
            np.ascontiguousarray(raw))
        image = self._buffer("image", tuple(tensor.shape))
        low, high = scale
        if not _exact_in_float32(tensor):  # as training scales it (`exact_in_float32`)
            wide = tensor.to(self.device, torch.float64, non_blocking=True, copy=True)
            return image.copy_(wide.sub_(low).div_(high - low)).clamp_(0, 1)
        image.copy_(tensor.to(self.device, non_blocking=True))  # as .to(float32) converts
        return image.sub_(low).div_(high - low).clamp_(0, 1)

    def _buffer(self, role: str, shape: tuple[int, ...], zero: bool = False) -> torch.Tensor:
        """A float32 work tensor of ``shape`` on the device, the same memory block after
        block (a fresh block-sized one cost its page faults every time: a fifth of the
        bench's host time); ``zero``: cleared. Only for tensors that no result keeps."""
        size = math.prod(shape)
        buffer = self._buffers.get(role)
        if buffer is None or buffer.numel() < size:  # edge blocks are smaller: kept
            buffer = self._buffers[role] = torch.empty(size, device=self.device)
        view = buffer[:size].view(shape)
        return view.zero_() if zero else view

    def _normalise(self, scale: tuple[float, float]) -> Callable[[torch.Tensor], torch.Tensor]:
        low, high = scale  # in place on a float copy (never on the caller's array)

        def normalise(t: torch.Tensor) -> torch.Tensor:
            if not _exact_in_float32(t):  # as training scales it (`exact_in_float32`)
                return t.to(torch.float64, copy=True).sub_(low).div_(high - low).float(
                ).clamp_(0, 1)
            return t.to(torch.float32, copy=True).sub_(low).div_(high - low).clamp_(0, 1)
        return normalise

    def _accumulate(self, source: PatchSource, batches: list[list[Zyx]], box: tuple[Zyx, Zyx],
                    nonfinite: torch.Tensor | None = None,
                    inside: Sequence[tuple[tuple[Zyx, Zyx], torch.Tensor]] = ()
                    ) -> torch.Tensor:
        """The sum of window x prediction of the patches in ``batches`` over ``box``, added
        patch by patch in batch order (multiply, then add: no fused rounding, so the same
        patches give the same sums in any box). NaN and infinite outputs are summed as 0
        (deterministic, and resumable) and counted: all of each patch's into ``nonfinite``,
        and for each (region, counter) of ``inside`` those within the region (device
        scalars: no wait for the device per batch). Boxes: their begin and end."""
        acc = self._buffer("acc", (sum(self.channels.values()), *_size(box)), zero=True)
        begin, end = box
        for group, outputs in self._forwards(source, batches):
            self.predicted_patches += len(group)
            weighted, flags = self._weighted(outputs, len(group))
            if nonfinite is not None and flags is not None:
                nonfinite += torch.count_nonzero(flags)
            for i, start in enumerate(group):
                place = overlap(start, self.patch, begin, end)
                if place is None:
                    continue
                into, within = place
                if flags is not None:
                    for region, counter in inside:
                        if (part := overlap(start, self.patch, *region)) is not None:
                            counter += torch.count_nonzero(flags[(i, slice(None), *part[1])])
                acc[(slice(None), *into)] += weighted[(i, slice(None), *within)]
        return acc

    def _weighted(self, outputs: dict[str, torch.Tensor], count: int
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The first ``count`` outputs of a batch, all tasks' channels, times the window with
        their NaN and infinite values as 0, and flags that are NaN exactly there (x - x;
        two light passes, isfinite and a bool sum, took 5x nan_to_num on a CPU); no flags
        when every value is finite.

        On a CPU the product goes straight into a reused buffer and one sum tells whether
        any value is not finite (a finite sum has none; a sum that overflowed only costs
        the exact count): three passes fewer per batch than concatenating, flagging and
        clearing first. The products are the same, the window being positive: x times it
        is finite exactly where x is. A GPU would wait for that sum: there, as before."""
        if self.device.type != "cpu":
            stacked = torch.cat([outputs[n] for n in self.channels], dim=1)[:count]
            flags = stacked - stacked
            return torch.nan_to_num(stacked, nan=0.0, posinf=0.0, neginf=0.0) * self.window, \
                flags
        weighted = self._buffer("weighted", (count, sum(self.channels.values()), *self.patch))
        first = 0
        for name, channels in self.channels.items():
            torch.mul(outputs[name][:count], self.window,
                      out=weighted[:, first:first + channels])
            first += channels
        if math.isfinite(float(weighted.sum())):
            return weighted, None
        flags = weighted - weighted
        return weighted.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0), flags

    def _batch(self, source: PatchSource, group: list[Zyx]) -> torch.Tensor:
        inputs = [source.get(p) for p in group]
        if self.pad_batches:
            inputs += [inputs[-1]] * (self.batch_size - len(inputs))
        batch = torch.stack(inputs)[:, None]
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last_3d)
        return batch

    def _forwards(self, source: PatchSource, batches: list[list[Zyx]]
                  ) -> Iterator[tuple[list[Zyx], dict[str, torch.Tensor]]]:
        """Each batch's outputs, in batch order (`passes`; a batch's input is assembled as
        its pass is queued)."""
        return self.passes(batches, lambda group: self._batch(source, group))

    def passes(self, groups: Sequence[G], make: Callable[[G], torch.Tensor]
               ) -> Iterator[tuple[G, dict[str, torch.Tensor]]]:
        """The forward pass of each group's batch (``make(group)``), in group order, run as
        inference runs them: `emrun bench infer` times the model alone through this too.

        On a CPU every forward pass runs on one thread, as many passes at once as the
        process has threads. oneDNN and BLAS split a layer's sums by thread count, so passes
        spread over threads would round differently under another worker count (a resumed
        job, another --workers); one thread per pass makes the outputs independent of both,
        and side by side the passes run as fast or faster (2 cores: demo 1.19 s against
        1.37 s, a SNEMI3D network 16.3 s against 17.0 s)."""
        threads = _pass_threads()
        if self.device.type != "cpu" or threads == 1 or len(groups) < 2:
            with _one_thread(self.device.type == "cpu"):
                for group in groups:
                    yield group, self._forward(make(group))
            return
        pool = self._pass_pool(threads)
        pending: deque[tuple[G, Future[dict[str, torch.Tensor]]]] = deque()
        with _one_thread(True):
            try:
                for group in groups:
                    pending.append((group, pool.submit(self._forward, make(group))))
                    if len(pending) >= threads:  # at most one pass per thread waiting
                        yield _first_done(pending)
                while pending:
                    yield _first_done(pending)
            finally:  # stopped early: no pass of this block outlives it (as a pool's exit)
                wait([future for _, future in pending])

    def _pass_pool(self, threads: int) -> ThreadPoolExecutor:
        """The engine's pool of ``threads`` forward-pass threads (`_pass_pool`), kept from
        block to block: a pool per block started its threads anew each time, a tenth of the
        host time per block of a small-block run. Its idle threads end with the engine; a
        forked process, which has none of them, starts its own."""
        key = (threads, os.getpid())
        if self._passes is None or self._passes[0] != key:
            if self._passes is not None and self._passes[0][1] == key[1]:
                self._passes[1].shutdown(wait=True)
            self._passes = (key, _pass_pool(threads))
        return self._passes[1]

    def _weight(self, layout: Layout, block: Zyx) -> torch.Tensor:
        """The sum of the windows of every patch covering the block, in lattice order (not
        to be changed: blocks placed alike on the lattice share it). A voxel's sum depends
        only on where the lattice's patches lie around it, so it is cut from a sum kept
        (the last ``WEIGHTS``) over a box placed alike (`_span`): keyed by the block's own
        starts, a block size that is not a multiple of the stride gave every block another
        key, and its sum (one add per patch) was computed again for each block."""
        begin, end = layout.write_bounds(block)
        spans = [_span(layout, axis, b, e)
                 for axis, (b, e) in enumerate(zip(begin, end, strict=True))]
        key = tuple((length, starts) for length, starts, _ in spans)
        weight = self._weights.pop(key, None)
        if weight is None:
            weight = self._window_sum(zyx(length for length, _, _ in spans),
                                      [starts for _, starts, _ in spans])
            while len(self._weights) >= WEIGHTS:
                self._weights.pop(next(iter(self._weights)))
        self._weights[key] = weight  # the most recent last
        return weight[tuple(slice(cut, cut + e - b)
                            for (_, _, cut), b, e in zip(spans, begin, end, strict=True))]

    def _window_sum(self, shape: Zyx, starts: list[tuple[int, ...]]) -> torch.Tensor:
        """The windows of the patches at every combination of ``starts`` (per axis, in a box
        of ``shape`` whose first voxel is 0) summed over the box, patch by patch in lattice
        order."""
        weight = torch.zeros(shape, device=self.device)
        for start in itertools.product(*starts):
            place = overlap(zyx(start), self.patch, (0, 0, 0), shape)
            assert place is not None
            weight[place[0]] += self.window[place[1]]
        return weight


def _span(layout: Layout, axis: int, begin: int, end: int) -> tuple[int, tuple[int, ...], int]:
    """Along ``axis``, the box a block's weight is cut from: its length, the starts of the
    patches summed in it (relative to its first voxel) and where the block begins in it.
    Blocks a whole number of strides long all lie alike (one phase), and where the lattice
    ends within a patch of the block it is cut there: the block's own span and starts.
    Elsewhere every lattice start that reaches the block is there, so each voxel's sum
    depends only on its place between starts: a tile one stride (less a voxel) longer than
    the block, beginning on a lattice start, with an endless lattice's starts, cut at the
    block's phase; every such block of this size shares it, whatever its phase."""
    covering = layout.covering(axis, begin, end)
    o, p, s = layout.origin[axis], layout.patch[axis], layout.stride[axis]
    endless = range(o + -(-(begin - p + 1 - o) // s) * s, end, s)
    if layout.block[axis] % s == 0 or len(covering) != len(endless):
        return end - begin, tuple(c - begin for c in covering), 0  # one phase, or cut
    length = end - begin + s - 1
    return length, tuple(range(-((p - 1) // s) * s, length, s)), (begin - o) % s


PatchReader = Callable[[Roi], np.ndarray]

WEIGHTS = 4
"""Blocks' weight sums an engine keeps (`Engine._weight`): along a row of blocks the first,
the inner (all of them, whatever their phase on the lattice) and the last differ."""


def overlap(start: Zyx, size: Zyx, begin: Zyx, end: Zyx
            ) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """Where the box of ``size`` at ``start`` meets the box [begin, end): its index in an
    array whose first voxel lies at ``begin``, and in one whose first voxel lies at
    ``start``; None when they do not meet. Plain integers: `Roi` arithmetic per patch
    was a tenth of the engine's host time."""
    into, within = [], []
    for s, n, b, e in zip(start, size, begin, end, strict=True):
        low, high = max(s, b), min(s + n, e)
        if low >= high:
            return None
        into.append(slice(low - b, high - b))
        within.append(slice(low - s, high - s))
    return tuple(into), tuple(within)


def _common(a: tuple[Zyx, Zyx], b: tuple[Zyx, Zyx]) -> tuple[Zyx, Zyx] | None:
    """The boxes ``a`` and ``b`` (begin, end) have in common, or None when nothing (as
    ``Roi.intersect`` and ``Roi.empty``, in plain ints)."""
    begin = zyx(max(x, y) for x, y in zip(a[0], b[0], strict=True))
    end = zyx(min(x, y) for x, y in zip(a[1], b[1], strict=True))
    if any(lo >= hi for lo, hi in zip(begin, end, strict=True)):
        return None
    return begin, end


def _local(box: tuple[Zyx, Zyx], origin: Zyx) -> tuple[slice, ...]:
    """Index of ``box`` (begin, end) in a (channel, z, y, x) tensor whose first voxel lies at
    ``origin``, every channel."""
    return (slice(None), *(slice(b - o, e - o) for b, e, o in zip(*box, origin, strict=True)))


def _size(box: tuple[Zyx, Zyx]) -> Zyx:
    return zyx(e - b for b, e in zip(*box, strict=True))


class _SingleThread:
    """Who is inside `_one_thread`. torch's count is a thread's own once that thread has
    used torch (OpenMP's per-thread setting; a new thread's first use takes the last count
    set anywhere), so each user thread sets and restores its own (`_ThreadUse`). The
    process-wide count (``users``, ``saved``: the count from before the first of them)
    tells a thread whose first use of torch fell inside another user's span, and so read
    that user's 1, what its count was meant to be. (One count for the whole process, as
    this was before, left the first of two overlapping threads at one thread for good, and
    the second at its own count inside.)"""

    lock = threading.Lock()
    users = 0
    saved = 0
    here = threading.local()


@dataclass
class _ThreadUse:
    """One thread's use of `_one_thread`: how deep it is, and its count from before."""

    depth: int = 0
    before: int = 1


def _thread_use() -> _ThreadUse:
    """This thread's `_ThreadUse`, made on its first use."""
    use = getattr(_SingleThread.here, "use", None)
    if use is None:
        use = _SingleThread.here.use = _ThreadUse()
    return use


@contextmanager
def _one_thread(active: bool) -> Iterator[None]:
    """torch's intra-op threads set to one inside, in this thread; its count from before
    is restored when its outermost use leaves."""
    if not active:
        yield
        return
    use = _thread_use()  # kept: a generator's exit may run in another thread
    if use.depth == 0:
        _enter(use)
    use.depth += 1
    try:
        yield
    finally:
        use.depth -= 1
        if use.depth == 0:
            _leave(use)


def _enter(use: _ThreadUse) -> None:
    """This thread to one torch thread, its count from before kept in ``use``."""
    with _SingleThread.lock:
        found = torch.get_num_threads()
        if _SingleThread.users == 0:
            _SingleThread.saved = found
        elif found == 1:  # likely the 1 of a user inside when this thread first used torch
            found = _SingleThread.saved
        _SingleThread.users += 1
        use.before = found
        torch.set_num_threads(1)


def _leave(use: _ThreadUse) -> None:
    """This thread's count from before back (`_enter`)."""
    with _SingleThread.lock:
        _SingleThread.users -= 1
        torch.set_num_threads(use.before)


def _pass_threads() -> int:
    """The threads forward passes may run side by side on: this thread's count, the one
    from before `_one_thread` set it to one while that is in force."""
    use = _thread_use()
    return use.before if use.depth else torch.get_num_threads()


def _first_done(pending: deque[tuple[G, Future[dict[str, torch.Tensor]]]]
                ) -> tuple[G, dict[str, torch.Tensor]]:
    """The first pending pass's batch and outputs, taken off ``pending`` only once it has
    them: a KeyboardInterrupt while waiting for it leaves it there for `Engine.passes`
    to wait for (taken off first, it ran on after its block was over)."""
    group, future = pending[0]
    outputs = future.result()
    pending.popleft()
    return group, outputs


def _single_threaded() -> None:
    """A pass thread set to one torch thread for good. torch takes a thread's count from
    the count set last anywhere at the thread's first use (a get or any parallel op), even
    after the thread set its own: a thread that only set 1 took, at its first pass, the
    count another user had put back meanwhile, and split its passes over that many."""
    torch.get_num_threads()  # its first use: from here on the count is its own
    torch.set_num_threads(1)


PASS_START_S = 60.0
"""How long `_pass_pool` waits for its threads to start before it goes on without."""


def _pass_pool(threads: int) -> ThreadPoolExecutor:
    """The threads that run forward passes side by side, each set to one thread itself: a
    new thread would take the last count set anywhere, another user's leaving included.
    All are started, and set, before it is returned (in the caller's `_one_thread`): one
    started as a pass was queued could set itself after its block was over, storing 1 as
    the count every thread started later takes. The start tasks meet at a barrier, so each
    needs a thread of its own (an idle one would take the next otherwise)."""
    pool = ThreadPoolExecutor(threads, initializer=_single_threaded)
    started = threading.Barrier(threads, timeout=PASS_START_S)
    try:
        wait([pool.submit(started.wait) for _ in range(threads)])
    except BaseException:
        started.abort()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    return pool


@dataclass(frozen=True)
class Prediction:
    """A block's blended values per task (c, z, y, x; float32 on the device), its partial
    sums over the blocks it was asked to hand over to, and how many output values of the
    patches it owns were NaN or infinite (summed as 0; an int64 scalar on the device, read
    with the values so that no batch waits for it). ``recomputed``: for each other owner
    whose partial sum was recomputed here, the NaN or infinite values of its patches within
    this block (its own count covers them, unless it was skipped: the worker decides).
    ``handed``: (later block, recomputed owner) -> that owner's partial sum over the later
    block and its count there, for the worker to hand on (`Engine.predict`'s ``hand_on``)."""

    values: dict[str, torch.Tensor]
    carries: dict[Zyx, torch.Tensor]
    nonfinite: torch.Tensor
    recomputed: dict[Zyx, torch.Tensor] = field(default_factory=dict)
    handed: dict[tuple[Zyx, Zyx], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict)


@dataclass(frozen=True)
class PatchSource:
    """Patch inputs on the device: cut from the block's input, or read (a recomputed batch
    may hold patches beyond it)."""

    image: torch.Tensor
    start: Zyx  # where image[0, 0, 0] lies in the layout
    size: Zyx  # the patch
    read: PatchReader | None
    normalise: Callable[[torch.Tensor], torch.Tensor]

    def get(self, start: Zyx) -> torch.Tensor:
        """The patch at ``start``: a view of the block's input when it lies inside (found
        with plain ints, once per patch), read otherwise."""
        index = []
        for s, n, first, length in zip(start, self.size, self.start, self.image.shape,
                                       strict=True):
            low = s - first
            if low < 0 or low + n > length:
                break
            index.append(slice(low, low + n))
        else:
            return self.image[tuple(index)]
        if self.read is None:
            raise ValueError(f"patch {list(start)} lies outside the block's input")
        tensor = torch.from_numpy(np.ascontiguousarray(self.read(Roi(start, self.size))))
        return self.normalise(tensor.to(self.image.device))


def quantise(values: torch.Tensor, dtype: str, in_place: bool = False) -> torch.Tensor:
    """On the device: uint8 stores round(255 p) of p clipped to [0, 1] (a quarter of the
    bytes travel back); float types store values as is. ``to_host`` brings it back.
    ``in_place``: ``values`` may be overwritten on the way (no block-sized temporary)."""
    if dtype == "uint8":
        scaled = values.clamp_(0.0, 1.0) if in_place else values.clamp(0.0, 1.0)
        return scaled.mul_(255.0).round_().to(torch.uint8)
    return values.to(getattr(torch, dtype))
