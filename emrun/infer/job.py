"""One inference job: what to predict, where, on which block layout, and which blocks are done.

The parent checks everything a user can get wrong (input, mask, output, checkpoint) and creates
the output arrays before any worker starts; a worker, local or on another machine, needs only
the job's JSON description. Done-markers are explicit files under
``OUT.zarr/.emrun-done/<layout hash>/<bz>_<by>_<bx>``, written after a block's chunks: every
scheduler reads and writes the same markers, so a job started by one can be finished by another.
A marker also says what daisy's scheduler cannot otherwise learn from its workers: that the
block was skipped, or how many non-finite network outputs were written as 0 in it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from .. import __version__
from ..capacity import check_block_count, check_output_fits, size_text
from ..devices import available_memory
from ..errors import UserError, disk_full
from ..geometry import Roi, Zyx, box_of, zyx
from ..io import PRIVATE_PREFIX, Volume, open_volume
from ..io.completion import mark_finished, unfinished
from ..io.intensity import outside_unit
from ..io.layout import PARTIAL_SUFFIX, group_attrs
from ..io.metadata import multiscale_dataset
from ..io.one_channel import single_channel
from ..io.pyramid import level_factors
from ..io.sample import contents_sample, sample_boxes
from ..io.window import off_grid, placed_over
from ..io.write import (
    build_pyramid,
    create_volume,
    hold_store,
    release_store,
    shard_chunks,
    store_entries,
)
from ..paths import is_link_loop, suffix_only
from ..recipe import Recipe
from ..recipe.loader import resolved_now
from ..recipe.tasks import AffinityTarget
from .engine import file_digest, intensity_range, load_model, tta_variants
from .plan import Layout, choose_chunks_and_block

DONE = f"{PRIVATE_PREFIX}done"
EMPTY = "empty"
"""A done-marker's text for a block skipped without writing a chunk (`Job.mark_done`)."""
JOB_FILE = "job.json"
OUTPUT_ADVICE = "give another --output"
"""What an `emrun infer` refused an output another emrun is writing is told (`emrun.locks`)."""


@dataclass(frozen=True)
class Job:
    """Everything a worker needs to predict any block of the output."""

    recipe: Recipe
    checkpoint: Path
    input_path: str
    output: Path
    mask_path: str | None
    layout: Layout
    scale: tuple[float, float]
    tta: int | None = None
    roi_offset: Zyx = (0, 0, 0)  # where the layout's (0, 0, 0) lies in the input
    levels: int | None = None  # pyramid levels built after the last block (None: default)
    handover: int | None = None  # bytes each worker may hold for hand-over (None: default)
    handover_host: int = 0  # and beyond them in host memory (GPU workers: pinned)

    def digest(self) -> str:
        """The layout's hash, and the ROI's when there is one: done-markers are keyed by it."""
        return self._digest

    @cached_property
    def _digest(self) -> str:
        """`digest`, computed once: every marker's path asked for it, a JSON dump and a
        hash per block (a resumption's scan of 7,400 markers spent 2 s on it, 4 s with
        `finish_job`'s; a million-block job minutes)."""
        if self.roi_offset == (0, 0, 0):
            return self.layout.digest()
        return hashlib.sha256(f"{self.layout.digest()}@{self.roi_offset}".encode()
                              ).hexdigest()[:16]

    @cached_property
    def done_dir(self) -> Path:
        return self.output / DONE / self.digest()

    def marker(self, block: Zyx) -> Path:
        return self.done_dir / marker_name(block)

    def is_done(self, block: Zyx) -> bool:
        return self.marker(block).exists()

    def mark_done(self, block: Zyx, nonfinite: int = 0, empty: bool = False) -> None:
        """Write the block's done-marker: empty, ``EMPTY`` when the block was skipped (outside
        the mask or of blank input: no chunk written), or the count of NaN or infinite
        network outputs blended as 0 in it when there were any (daisy's workers have no
        other way to tell the scheduler)."""
        marker = self.marker(block)
        if empty:
            marker.write_text(f"{EMPTY}\n")
        elif nonfinite:
            marker.write_text(f"{nonfinite}\n")
        else:
            marker.touch()

    def nonfinite(self, block: Zyx) -> int:
        """The count `mark_done` wrote for a done block (0 for an empty marker)."""
        text = self._marker_text(block)
        return int(text) if text.isdigit() else 0

    def is_empty(self, block: Zyx) -> bool:
        """Whether `mark_done` marked the block as skipped (no chunk written)."""
        return self._marker_text(block) == EMPTY

    def _marker_text(self, block: Zyx) -> str:
        marker = self.marker(block)
        try:  # a stat for the usual empty marker: a job may have a million of them
            return marker.read_text().strip() if marker.stat().st_size else ""
        except OSError:
            return ""

    def pending(self) -> list[Zyx]:
        """Blocks without a done-marker, z-major: the marker folder is listed once (one
        look-up per block was a round trip each on a network filesystem)."""
        try:
            with os.scandir(self.done_dir) as entries:
                marked = {entry.name for entry in entries}
        except FileNotFoundError:
            marked = set()
        return [b for b in self.layout.block_grid() if marker_name(b) not in marked]

    def to_json(self) -> str:
        return json.dumps({
            "recipe": self.recipe.resolved(), "checkpoint": str(self.checkpoint),
            "input": self.input_path, "output": str(self.output), "mask": self.mask_path,
            "layout": asdict(self.layout), "scale": list(self.scale), "tta": self.tta,
            "roi_offset": list(self.roi_offset), "levels": self.levels,
            "handover": self.handover, "handover_host": self.handover_host,
        })

    @classmethod
    def from_json(cls, text: str) -> Job:
        data = json.loads(text)
        layout = {k: zyx(v) for k, v in data["layout"].items()}
        return cls(recipe=Recipe.model_validate(data["recipe"]),
                   checkpoint=Path(data["checkpoint"]), input_path=data["input"],
                   output=Path(data["output"]), mask_path=data["mask"],
                   layout=Layout(**layout),
                   scale=tuple(data["scale"]), tta=data["tta"],  # type: ignore[arg-type]
                   roi_offset=zyx(data["roi_offset"]), levels=data.get("levels"),
                   handover=data.get("handover"),
                   handover_host=data.get("handover_host", 0))

    def save(self) -> Path:
        """Write the job description next to its done-markers (for remote workers)."""
        path = self.done_dir / JOB_FILE
        path.write_text(self.to_json())
        return path


def output_bytes(recipe: Recipe, shape: Zyx) -> int:
    """The outputs' bytes before compression: every head's channels over ``shape``."""
    channels = sum(recipe.head_channels().values())
    return channels * math.prod(shape) * np.dtype(recipe.infer.dtype).itemsize


def marker_name(block: Zyx) -> str:
    """The file name of a block's done-marker (`Job.marker`)."""
    return "_".join(str(i) for i in block)


def prepare_job(recipe: Recipe, checkpoint: Path, input_path: str, output: Path, *,
                block: Zyx | None = None, tta: int | None = None, resume: bool = False,
                mask_path: str | None = None, roi: Roi | None = None,
                levels: int | None = None, workers: int = 1,
                handover: int | None = None, handover_host: int = 0,
                plan_only: bool = False) -> Job:
    """Check the inputs, create (or with ``resume`` reopen and check) the outputs.

    ``roi`` (offset, shape) predicts only that box of the input; the output has the box's
    shape, and the input around the box still serves as context where it exists.
    ``levels``: the outputs' pyramid levels (`finish_job`; None: the default, or on a
    resume the levels the output was started with).
    ``workers``: the worker processes that will predict on this machine, each holding its
    own block's working set (`check_memory`).
    ``handover``: the bytes of partial sums each worker may hold for later blocks of its
    unit (None: `schedule.handover_budget`'s default); it decides only how often patches at
    unit borders are predicted again, never the output, so a resumed run may change it.
    ``handover_host``: the bytes of host memory each worker may hold such sums in beyond
    ``handover`` (the units are chosen for both together: `Carries`).
    ``plan_only``: every check of the inputs, then the job, with nothing created or held.

    The output is held against other emrun processes (`emrun.io.write.hold_store`) from
    before its contents are checked until `release_job` or this process's end: a second
    `infer` into it (the same command run twice, or the --resume that the refusal of a rerun
    advises) predicted every block again beside the first. The job's workers never take it."""
    volume = single_channel(open_volume(input_path))  # (1, z, y, x): bioformats2raw's
    if len(volume.shape) != 3:
        raise UserError(f"{volume}: inference needs a 3D (z, y, x) volume, got shape "
                        f"{list(volume.shape)}")
    if volume.dtype.kind not in "uif":
        raise UserError(f"{volume}: dtype {volume.dtype} is not a numeric image")
    if volume.segmentation:
        raise UserError(f"{volume}: is a segmentation (OME-Zarr image-label), not an EM "
                        "image; give the image volume as --input")
    if 0 in volume.shape:
        raise UserError(f"{volume} is empty (shape {list(volume.shape)}): nothing to predict")
    if block is not None and any(b < 1 for b in block):
        raise UserError(f"--block {' '.join(map(str, block))}: sizes must be at least 1 voxel")
    _refuse_same(volume, output)
    box = _check_roi(roi, volume)
    if mask_path:
        mask = single_channel(open_volume(mask_path))  # (1, z, y, x): a binary task's
        if mask.dtype.kind not in "biuf":  # strings: no 0 outside, non-zero inside
            raise UserError(f"{mask}: a mask holds numbers or booleans (0 outside), not "
                            f"{mask.dtype}")
        _check_mask_place(placed_over(volume, mask, box), volume)
    # A bad checkpoint or TTA setting fails here, once, before any output exists (each
    # worker builds its engine where it runs).
    load_model(recipe, checkpoint, torch.device("cpu"))
    tta_variants(recipe, tta or recipe.infer.tta)
    patch = recipe.infer_patch()
    stride = recipe.infer.resolved_stride(patch)
    offset, shape = zyx(box.offset), zyx(box.shape)
    _check_float_scale(recipe, volume, offset, shape)
    if levels is None and resume:  # the pyramid it was started with: the default would
        levels = started_with(output).get("levels")  # delete a --levels run's extra ones
    level_factors(shape, volume.voxel_size, levels)  # a bad --levels, before any work
    given = block or recipe.infer.block
    chunks, block = choose_chunks_and_block(shape, patch, stride, recipe.infer.chunks, given)
    if resume and recipe.infer.chunks is None:
        chunks, block = _started_layout(output, shape, patch, stride, given) or (chunks, block)
    if given is not None:  # the default block is four strides: a user's may be anything
        check_block(block, stride, shape)
    try:
        layout = Layout(shape, patch, stride, chunks, block)
    except ValueError as exc:  # a block that is no whole number of the recipe's chunks
        raise UserError(f"--block / infer.block: {exc}") from None
    check_memory(recipe, layout, workers)
    job = Job(recipe=recipe, checkpoint=checkpoint.resolve(),  # located: a worker started
              input_path=volume.location(),  # elsewhere (daisy, --launch) opens them too
              output=output.resolve(), mask_path=mask.location() if mask_path else None,
              layout=layout,
              scale=intensity_range(recipe, volume), tta=tta, roi_offset=offset,
              levels=levels, handover=handover, handover_host=handover_host)
    if not resume and mask_path is None:  # a mask may leave most of a huge volume out
        channels = sum(recipe.head_channels().values())
        check_output_fits(output, output_bytes(recipe, shape),
                          f"predicting {volume} ({channels} x "
                          f"{'x'.join(map(str, shape))} {recipe.infer.dtype})",
                          "check the input's shape, or predict a box of it (--roi) or the "
                          "blocks of a --mask")
    if resume and not output.exists():  # as train and segment: --resume says to continue
        raise UserError(f"{output}: holds no inference run to resume (no such output); drop "
                        "--resume to start one")
    # before the lock (a user's folder gets no lock file), with --resume too: it said to
    # remove a user's folder as if it were an output cut short
    _refuse_foreign(output, list(recipe.tasks))
    if plan_only:
        _check_outputs(job, volume, resume)
        return job
    new = hold_store(output, OUTPUT_ADVICE)
    try:
        _open_outputs(job, volume, resume)
        job.done_dir.mkdir(parents=True, exist_ok=True)
        job.save()
    except BaseException:
        release_store(output, new, failed=True)  # a new output that got nothing goes again
        raise
    return job


def release_job(job: Job) -> None:
    """Let other processes write the job's output again (`prepare_job` held it)."""
    release_store(job.output)


def finish_job(job: Job) -> bool:
    """Once every block is done, build each output's pyramid from its level 0 (a build
    killed part-way goes on from its finished blocks when the job is resumed, and ends as
    one uninterrupted build would); returns whether it was built."""
    if job.pending():
        return False
    for name in job.recipe.tasks:
        try:
            build_pyramid(job.output / name, job.levels)
        except Exception as exc:  # zarr may raise it chained to its own
            if (full := disk_full(exc)) is None:
                raise
            # the generic line named no output, and said nothing half-written stands under
            # a final name: a level in progress does (unlisted, its volume unfinished)
            raise UserError(f"{job.output / name}: the disk is full ({full.strerror or full}) "
                            "while building its pyramid; every block is done and kept, and the "
                            "volume stays marked unfinished: free space and run again with "
                            "--resume, which goes on with the pyramid") from None
        mark_finished(job.output / name)
    return True


def _check_mask_place(mask: Volume, volume: Volume) -> None:
    """The mask must lie on the input's grid: its shape (or the part of a larger mask the
    input's offset places it in, or a smaller one placed over the box predicted), and where
    both state them its voxel size and offset (the same shape at another offset or
    resolution is another box, which masked the wrong voxels, silently). The grid first: a
    mask of another resolution (the full one, for a coarser level) has another shape too,
    and its voxel size is what is wrong."""
    if (problem := off_grid(mask, volume, "mask", "the input")) is not None:
        raise UserError(problem)
    if tuple(mask.shape) != tuple(volume.shape):
        raise UserError(f"{mask}: mask shape {list(mask.shape)} differs from the input's "
                        f"{list(volume.shape)} (and their offsets place neither the input "
                        "inside it nor it over the box predicted)")


def _check_float_scale(recipe: Recipe, volume: Volume, offset: Zyx, shape: Zyx) -> None:
    """A float image is read as intensities in [0, 1] (training refuses others unless its
    source gives `intensity`): one in 0..255 was predicted as if saturated, silently.
    Checked on nine small boxes of the box to predict. A scale the recipe gives is used
    as given, clipping what lies outside it as training does (also one of 0..1)."""
    if volume.dtype.kind != "f" or recipe.given_intensity() is not None:
        return
    for values in sample_boxes(volume, offset, shape):
        finite = values[np.isfinite(values)]
        if finite.size and outside_unit(float(finite.min()), float(finite.max())):
            raise UserError(f"{volume}: a float image is read as intensities in [0, 1], and "
                            f"this one holds values in [{finite.min():g}, {finite.max():g}]; "
                            "scale it to [0, 1], or store it as uint8 (emrun data convert)")


def _check_roi(roi: Roi | None, volume: Volume) -> Roi:
    """The box to predict: the ROI, checked, or the whole volume."""
    whole = box_of(volume.shape)
    if roi is None:
        return whole
    if roi.dims != 3 or roi.empty or not whole.contains(roi):
        raise UserError(f"--roi {list(roi.offset)}/{list(roi.shape)} does not lie inside "
                        f"{volume} (shape {list(volume.shape)}); give offset/shape with "
                        "shape >= 1")
    return roi


def open_output_arrays(job: Job) -> dict[str, zarr.Array]:
    """The job's output arrays, one per task, opened for writing.

    They write every chunk, also one that holds only the fill value: zarr's check for such
    chunks compares each chunk on its single IO thread (two thirds of a block's write under
    cProfile), so on a 16-core GPU host writes were no faster than on 2 cores and held up the
    reads queued behind them; an all-zero chunk compresses to a few hundred bytes, and
    skipped blocks write nothing. Opened under the setting rather than with
    ``Array.with_config``, which zarr 3.1.0 lacks."""
    with zarr.config.set({"array.write_empty_chunks": True}):
        return {name: level_array(job.output / name) for name in job.recipe.tasks}


def level_array(group_path: Path) -> zarr.Array:
    """The full-resolution array of an OME-Zarr image group (one task's output), opened for
    writing: the first multiscale level its metadata names."""
    group = zarr.open_group(str(group_path), mode="r")
    level = multiscale_dataset(dict(group.attrs))
    if level is None:
        raise UserError(f"{group_path}: has no OME-Zarr multiscales metadata; not an output "
                        "of emrun infer")
    return zarr.open_array(str(group_path / level), mode="r+")


def _refuse_same(volume: Volume, output: Path) -> None:
    if (why := suffix_only(output)) is not None:
        raise UserError(f"--output {output}: {why}")
    if is_link_loop(output):
        raise UserError(f"--output {output} is a loop of symbolic links; give a .zarr folder")
    if "://" not in volume.path:
        source, target = Path(volume.path).resolve(), output.resolve()
        if source == target:
            raise UserError(f"--output {output} is the input's own container; write elsewhere")
        if target.is_relative_to(source) or source.is_relative_to(target):
            raise UserError(f"--output {output} and the input {volume} lie one inside the "
                            "other: the predictions would become part of the input's store "
                            "(or the reverse); write elsewhere")
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; give a new .zarr folder")


def check_block(block: Zyx, stride: Zyx, shape: Zyx) -> None:
    """A write block is at least one patch stride (or the whole axis, when shorter) and the
    job at most `MAX_BLOCKS` blocks: `--block 1 1 1` wrote a block and its chunk files per
    voxel."""
    if any(b < min(s, n) for b, s, n in zip(block, stride, shape, strict=True)):
        raise UserError(f"--block / infer.block {' '.join(map(str, block))}: smaller than one "
                        f"patch stride ({' '.join(map(str, stride))}); give at least that")
    check_block_count(shape, block, "--block / infer.block")


def check_memory(recipe: Recipe, layout: Layout, workers: int = 1) -> None:
    """Refuse, before any output exists, a patch, batch or block whose working set cannot
    fit in this machine's memory (a 1000^3 patch ended in a MemoryError and left an output
    that the rerun refused). A lower bound: the blending window (float64), one batch of
    input patches with its first-level activations, and a block in the middle of the
    volume: its input (float32, as far as its patches read) and its float32 sums and
    weights (its own voxels). The sums were counted over the input's box, a patch wider per
    axis: 4 to 8 times what a block of about a patch holds, which refused jobs that fit.
    Each of ``workers`` processes on this machine holds its own."""
    patch, batch = math.prod(layout.patch), recipe.infer.batch_size
    channels = sum(recipe.head_channels().values())
    width = int((getattr(recipe.model, "widths", None) or [1])[0])
    middle = zyx(n // 2 for n in layout.grid())
    begin, end = layout.write_bounds(middle)
    read = math.prod(layout.read_box(middle).shape)
    block = math.prod(e - b for b, e in zip(begin, end, strict=True))
    one = (patch * 8 + batch * patch * 4 * (1 + 2 * width + channels) + read * 4
           + block * 4 * (channels + 1))
    need, free = workers * one, available_memory()
    if need > free:
        each = f" ({size_text(one)} in each of {workers} workers)" if workers > 1 else ""
        fewer = ", or fewer --workers" if workers > 1 else ""
        raise UserError(f"infer.patch {list(layout.patch)}, infer.batch_size {batch} and block "
                        f"{list(layout.block)} need at least {size_text(need)} of memory"
                        f"{each}, {size_text(free)} is available: lower them (or --block"
                        f"{fewer})")


def _check_outputs(job: Job, volume: Volume, resume: bool) -> bool:
    """Whether the output exists to be resumed (one cut short while being created does not:
    it is started over); refuses one this job must not overwrite or cannot resume. Reads
    only (`prepare_job`'s plan checks with it too)."""
    output, tasks = job.output, list(job.recipe.tasks)
    existing = _has_entries(output) and not _cut_short(output, tasks)
    if existing and not resume:
        _refuse_foreign(output, tasks)
        raise UserError(f"{output} already exists; use --resume to finish it, or another "
                        "--output (nothing was overwritten)")
    if existing:
        started = started_with(output)
        if "input_location" not in started and "checkpoint_sha256" not in started:
            raise UserError(f"{output} holds no record of the run that started it (it was "
                            "stopped while being created, before its first block): remove it "
                            "and run again without --resume")
        _check_same_input(output, started, volume)
        _check_same_box(output, started, job)
        _check_same_tta(output, started, job)
        _check_same_contents(output, started, volume, job)
        _check_same_network(output, started, job.checkpoint)
        _check_same_mask(output, started, job.mask_path)
        _check_same_values(output, started, job)
        for name in tasks:  # here, not as the arrays are opened: --plan checks it too
            _check_existing(output, name, job)
    return existing


def _open_outputs(job: Job, volume: Volume, resume: bool) -> None:
    """Create the output arrays, or with ``resume`` check the existing ones match the job."""
    layout, output, recipe = job.layout, job.output, job.recipe
    info = {"layout": job.digest(), "patch": list(layout.patch),
            "stride": list(layout.stride), "block": list(layout.block),
            "chunks": list(layout.chunks)}
    if _cut_short(output, list(recipe.tasks)):
        _start_over(output, list(recipe.tasks))
    existing = _check_outputs(job, volume, resume)
    # everything that reads (the input's sample, the checkpoint's digest) before anything is
    # made: a read that fails then leaves no output without its record
    record = {} if existing else {
        "version": __version__, "recipe": recipe.resolved(),
        "checkpoint": str(job.checkpoint), "checkpoint_sha256": file_digest(job.checkpoint),
        "input": job.input_path, "input_location": volume.location(),
        "input_shape": list(volume.shape),
        "input_sample": contents_sample(volume, job.roi_offset, job.layout.shape),
        "roi_offset": list(job.roi_offset), "output_shape": list(layout.shape),
        "tta": _tta_count(job), "mask": _mask_id(job.mask_path),
        "scale": list(job.scale), "levels": job.levels, **info}
    # where the output lies in the input's space: the input's own offset, plus the ROI's
    placed = tuple(int(o) + r for o, r in zip((volume.offset or (0, 0, 0))[-3:], job.roi_offset,
                                               strict=True))
    for name, task in recipe.tasks.items():
        if existing:  # checked by `_check_outputs`
            continue
        attrs: dict[str, Any] = {"emrun": {**info, "task": name, **unfinished(
            "emrun infer stopped before it finished (its blocks or its pyramid); run it again "
            "with --resume")}}
        if isinstance(task.target, AffinityTarget):
            attrs["offsets"] = [list(o) for o in task.target.offsets]
            names = [f"{name} {' '.join(map(str, o))}" for o in task.target.offsets]
        else:
            names = [f"{name} {c}" for c in range(task.channels())]
        chunks, shards = output_chunks(task.channels(), layout)
        create_volume(output, name, (task.channels(), *layout.shape), recipe.infer.dtype,
                      chunks=chunks, shards=shards, voxel_size=volume.voxel_size,
                      offset=placed, shift_nm=volume.shift_nm, channel_axis=True,
                      channel_names=names, attrs=attrs)
    if not existing:
        zarr.open_group(str(output), mode="r+").attrs["emrun"] = record


def output_chunks(channels: int, layout: Layout
                  ) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """(chunks, shards) of a new output array of ``channels``: the layout's chunks are its
    write unit, a whole number of them per block, so writers never share a file; stored as
    one shard each, cut into `shard_chunks` (all channels, at most 8 x 128 x 128), so that a
    later step reading a block and a thin halo decodes the inner chunks the halo touches,
    not its 26 neighbours' whole chunks (`emrun.io.write`, "Shards"). A layout chunk too
    small to cut stays an unsharded chunk. An output started before is resumed in its own
    arrays, sharded or not: the layout's digest does not depend on this."""
    unit = (channels, *layout.chunks)
    inner = shard_chunks(unit)
    return (unit, None) if inner is None else (inner, unit)


def _has_entries(output: Path) -> bool:
    """Whether ``output`` exists and holds anything (its `emrun.locks` file and zarr's
    temporaries that a killed writer left aside)."""
    return output.is_dir() and bool(store_entries(output))


def _cut_short(output: Path, tasks: list[str]) -> bool:
    """Whether ``output`` is an inference output whose creation was killed outright before
    its record was written (the record comes after the task volumes): no record, no block
    done, nothing but the root's metadata, the task volumes emrun creates (marked as this
    command's) and the done folder. Such an output was refused both with --resume ('holds
    no record') and without ('not an emrun inference output') until removed by hand."""
    record = _attributes(output).get("emrun")
    if not _has_entries(output) or (isinstance(record, dict) and "checkpoint_sha256" in record):
        return False
    done = output / DONE
    if done.is_dir() and any(p.is_file() and p.name != JOB_FILE for p in done.rglob("*")):
        return False
    names = {"zarr.json", DONE, *tasks, *(f"{t}{PARTIAL_SUFFIX}" for t in tasks)}
    if any(entry.name not in names for entry in store_entries(output)):
        return False
    if set(_attributes(output)) - {"ome"}:
        return False  # a group with a user's attributes: not ours to start over
    return all(_attributes(output / t).get("emrun", {}).get("task") == t
               for t in tasks if (output / t).exists())


def _start_over(output: Path, tasks: list[str]) -> None:
    """Remove what a creation cut short left (`_cut_short`): the output is new again."""
    for name in (DONE, *tasks, *(f"{t}{PARTIAL_SUFFIX}" for t in tasks)):
        if (output / name).is_dir():
            shutil.rmtree(output / name)
    (output / "zarr.json").unlink(missing_ok=True)


def _attributes(folder: Path) -> dict[str, Any]:
    """A zarr group's attributes; empty when it has none or is no group."""
    return group_attrs(folder) or {}


def _is_inference_output(output: Path) -> bool:
    """Whether ``output`` is an inference output: its done folder, or the record its run
    writes once the task volumes exist (a run killed just after leaves no done folder)."""
    record = _attributes(output).get("emrun")
    return (output / DONE).is_dir() or (
        isinstance(record, dict) and "checkpoint_sha256" in record)


def _refuse_foreign(output: Path, tasks: list[str]) -> None:
    """Refuse a folder with contents that is no inference output: --resume cannot help."""
    if _has_entries(output) and not _is_inference_output(output) and \
            not _cut_short(output, tasks):
        raise UserError(f"{output} already exists and is not an emrun inference output; "
                        "give a new --output (nothing was overwritten)")


def _mask_id(mask_path: str | None) -> str | None:
    """The mask's resolved location (the same mask named from another folder matches)."""
    if not mask_path:
        return None
    return open_volume(mask_path).location()


def _started_layout(output: Path, shape: Zyx, patch: Zyx, stride: Zyx,
                    given: Zyx | None = None) -> tuple[Zyx, Zyx] | None:
    """The chunks and block an output was started with, when it was for this box, patch and
    stride: a resumption that names no block, or the block it was started with (``given``),
    finishes it in them, though this emrun's default chunks may have changed since (an
    output started by an older one was refused as 'another block layout')."""
    saved = started_with(output)
    try:
        same = (zyx(saved["output_shape"]), zyx(saved["patch"]), zyx(saved["stride"])) == \
            (shape, patch, stride)
        recorded = zyx(saved["chunks"]), zyx(saved["block"])
    except (KeyError, TypeError, ValueError):
        return None
    return recorded if same and (given is None or zyx(given) == recorded[1]) else None


def started_with(output: Path) -> dict[str, Any]:
    """What the run that started ``output`` recorded (its ``emrun`` attributes); empty when
    there is no emrun group, and the per-task check says what is missing."""
    try:
        return dict(zarr.open_group(str(output), mode="r").attrs.get("emrun", {}))
    except Exception:
        return {}


def _check_same_mask(output: Path, saved: dict[str, Any], mask_path: str | None) -> None:
    """Refuse to finish an output under another mask: blocks outside a mask are marked done
    without writing a chunk, so a block half-written before and masked now would keep its
    partial values, and blocks skipped before would stay empty under the new mask."""
    if "mask" not in saved:  # written before emrun recorded the mask
        return
    now = _mask_id(mask_path)
    if saved["mask"] != now:
        raise UserError(
            f"{output} was started with {'--mask ' + saved['mask'] if saved['mask'] else 'no mask'}"
            f" and is resumed with {'--mask ' + now if now else 'no mask'}; resume with the "
            "same mask, or write to a new --output")


def _check_same_input(output: Path, saved: dict[str, Any], volume: Volume) -> None:
    """Refuse to finish an output from another input than the one that started it: blocks
    already done would stay the first volume's predictions (and, with its shape, the resume
    would report success). Outputs from before the location was recorded check the shape."""
    started, now = saved.get("input_location"), volume.location()
    if started is not None and started != now:
        raise UserError(f"{output} was started from the input {started} and is resumed with "
                        f"--input {now}; resume with that input, or write to a new --output")
    shape = saved.get("input_shape")
    if shape is not None and list(shape) != list(volume.shape):
        raise UserError(f"{output} was started from an input of shape {list(shape)}; --input "
                        f"{now} has shape {list(volume.shape)}; resume with that input, or "
                        "write to a new --output")


def _check_same_box(output: Path, saved: dict[str, Any], job: Job) -> None:
    """Refuse to finish an output with another --roi than it was started with: it was
    refused as if the input had been rewritten (its sample is taken over the box)."""
    offset, shape = saved.get("roi_offset"), saved.get("output_shape")
    if offset is None or shape is None:
        return  # recorded before the box was: the layout check still refuses it
    if list(offset) != list(job.roi_offset) or list(shape) != list(job.layout.shape):
        def box(o: Any, s: Any) -> str:
            return f"--roi {','.join(map(str, o))}/{','.join(map(str, s))}"
        raise UserError(f"{output} was started with {box(offset, shape)} and is resumed with "
                        f"{box(job.roi_offset, job.layout.shape)}; resume with the same "
                        "--roi (none: the whole input), or write to a new --output")


def _check_same_tta(output: Path, saved: dict[str, Any], job: Job) -> None:
    """Refuse to finish an output with another test-time augmentation than it was started
    with: its blocks would mix predictions with and without it, silently."""
    started, now = saved.get("tta"), _tta_count(job)
    if started is not None and started != now:
        raise UserError(f"{output} was started with --tta {started} and is resumed with --tta "
                        f"{now}; resume with --tta {started}, or write to a new --output")


def _tta_count(job: Job) -> int:
    """The test-time augmentations the job averages (the option's, else the recipe's)."""
    return int(job.tta or job.recipe.infer.tta)


def _check_same_contents(output: Path, saved: dict[str, Any], volume: Volume, job: Job
                         ) -> None:
    """Refuse to finish an output whose input was rewritten since it started (same name and
    shape, other voxels): the blocks done would be the old data's predictions."""
    if "input_sample" in saved and saved["input_sample"] != contents_sample(
            volume, job.roi_offset, job.layout.shape):
        unstarted = len(job.pending()) == len(job.layout.block_grid())
        raise UserError(f"{output} was started from other data than --input {volume} holds "
                        "now (a sample of its voxels differs: it was rewritten since); resume "
                        "only with the data it started from, or write to a new --output" + (
                            f" (it holds no finished block: removing {output} starts it "
                            "again there)" if unstarted else ""))


def _check_same_network(output: Path, saved: dict[str, Any], checkpoint: Path) -> None:
    """Refuse to finish an output with another network than the one that started it: its
    blocks would mix two networks under metadata that names one."""
    started = saved.get("checkpoint_sha256")
    now = file_digest(checkpoint) if started is not None else None
    if now is not None and started != now and Path(saved.get("checkpoint", "")) == checkpoint:
        raise UserError(f"{output} was started with {checkpoint}, which has changed since "
                        f"(sha256 {started[:12]}... then, {now[:12]}... now: trained further?); "
                        "write this network's predictions to a new --output, or remove "
                        f"{output} first")
    if now is not None and started != now:
        raise UserError(
            f"{output} was started with another checkpoint ({saved.get('checkpoint')}, "
            f"sha256 {started[:12]}...) than {checkpoint}; resume with that one, or write this "
            "network's predictions to a new --output")


VALUE_SETTINGS = (("infer", "dtype"), ("infer", "blend"), ("infer", "tta_reduce"),
                  ("infer", "precision"))
"""Recipe settings that change the values a block is written with (not the layout, which
`_check_existing` compares, nor the speed): a resumption under another one mixed two kinds of
blocks in one output without a word (float32 values cast into a uint8 array: all 0 or 1;
fp32 blocks beside bf16 ones, up to 15/255 apart)."""
TTA_REDUCE = "infer.tta_reduce"
"""How test-time variants are reduced: no value depends on it where none are made (tta 1)."""


def _value_settings(recipe: dict[str, Any]) -> dict[str, Any]:
    """The settings of a resolved recipe that change the values written: `VALUE_SETTINGS`
    and each task's target and activation."""
    found: dict[str, Any] = {}
    for section, key in VALUE_SETTINGS:
        found[f"{section}.{key}"] = (recipe.get(section) or {}).get(key)
    for name, task in (recipe.get("tasks") or {}).items():
        for key in ("target", "activation"):
            found[f"tasks.{name}.{key}"] = (task or {}).get(key)
    return json.loads(json.dumps(found))


def _check_same_values(output: Path, saved: dict[str, Any], job: Job) -> None:
    """Refuse to finish an output with settings (an -o override, another --recipe) that
    change the values its blocks are written with, or with another intensity scale."""
    if isinstance(saved.get("recipe"), dict):
        before = _value_settings(resolved_now(saved["recipe"]))
        now = _value_settings(job.recipe.resolved())
        if _tta_count(job) <= 1:  # no variants to reduce (`_check_same_tta`: nor before)
            before.pop(TTA_REDUCE, None)
            now.pop(TTA_REDUCE, None)
        for key in sorted(set(before) | set(now)):
            if before.get(key) != now.get(key):
                raise UserError(f"{output} was started with {key} {_shown(before.get(key))} "
                                f"and is resumed with {_shown(now.get(key))}; its blocks would "
                                "mix the two: resume with the settings it was started with, "
                                "or write to a new --output")
    scale = saved.get("scale")
    if scale is not None and [float(v) for v in scale] != [float(v) for v in job.scale]:
        raise UserError(f"{output} was started with input intensities scaled from "
                        f"{list(scale)} and is resumed with {list(job.scale)}; resume with the "
                        "settings it was started with, or write to a new --output")


def _shown(value: Any, limit: int = 80) -> str:
    """A setting's value on one line, as JSON writes it, cut to ``limit`` characters (a
    target's offsets may be long)."""
    text = "absent" if value is None else json.dumps(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _check_existing(output: Path, name: str, job: Job) -> None:
    """Refuse a task's array that is missing or was written in another block layout, naming
    the settings that differ (it named two hashes and five settings that might)."""
    try:
        level_array(output / name)
        saved = dict(zarr.open_group(str(output / name), mode="r").attrs).get("emrun", {})
    except (OSError, ValueError, UserError) as exc:  # missing, not zarr, not an image group
        raise UserError(f"{output}: cannot resume, no array for task {name!r} "
                        f"({type(exc).__name__})") from None
    if saved.get("layout") == job.digest():
        return
    layout = job.layout
    differ = [f"{what} {saved[key]} (now {list(now)})" for key, what, now in (
        ("block", "block", layout.block), ("patch", "infer.patch", layout.patch),
        ("stride", "a patch stride (infer.overlap)", layout.stride),
        ("chunks", "chunks", layout.chunks))
        if key in saved and [int(v) for v in saved[key]] != [int(v) for v in now]]
    said = "another block layout" + (f": {'; '.join(differ)}" if differ else "")
    block = f" (--block {' '.join(map(str, saved['block']))})" if "block" in saved and any(
        d.startswith("block ") for d in differ) else ""
    raise UserError(f"{output} was written with {said}: resume with the settings it was "
                    f"started with{block}, or write a new output")
