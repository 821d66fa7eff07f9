"""The work of `emrun segment`: affinities on disk -> a uint64 segmentation written atomically
as an OME-Zarr image group `OUT.zarr/NAME`, voxel size carried over.

Checks come first, before any voxel is read: method and parameters, the output (no file
in the way, nothing overwritten, no other emrun writing it), the affinities (c, z, y, x;
uint8 or float; one offset per channel, from the `offsets` attribute or ``--offsets``), mask
and truth shapes. From then until its volumes are written the output store is held against
other emrun processes (`emrun.io.write.held_store`): a second `segment` into it removed the
first one's volume being written as stale, and the two wrote one volume.

A volume whose working set fits ``MEMORY_BYTES`` is segmented in one piece; a larger one
(or any, given ``block``) block by block (emrun.segment.blockwise), writing straight into
the output. A method without a blockwise path (waterz) runs in memory as long as the
machine's available memory holds it. Sweeps run in memory.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from .. import __version__
from ..capacity import check_block_count, check_output_fits
from ..devices import available_memory
from ..errors import UserError
from ..geometry import Roi, zyx
from ..io import Volume, open_volume
from ..io.masks import inside
from ..io.pyramid import level_factors
from ..io.window import off_grid
from ..io.write import adding_all, check_new_volume, held_store
from ..paths import is_link_loop, suffix_only
from ..recipe.recipe import Recipe
from ..recipe.run import SegmenterBase
from ..registry import segmenters
from .affinities import (
    Offset,
    check_distinct_offsets,
    check_offsets,
    parse_offsets,
    to_float,
)
from .base import Segmenter, respec, said_as, spec_problems
from .parallel import MEMORY_SHARE
from .request import SegmentRequest
from .scale.job import FOLDER as SCALE_FOLDER

__all__ = ["DEFAULT_BLOCK", "DEFAULT_METHOD", "MEMORY_BYTES", "SegmentResult", "default_block",
           "recorded_segmenter", "run_segment"]

DEFAULT_METHOD: str = Recipe.model_fields["segment"].default_factory().type  # type: ignore[misc]
"""The recipe's default segmenter (mws), also the command's."""

MEMORY_BYTES = 4 * 2**30
"""Working-set limit (estimated by the segmenter) below which a volume is done in memory."""

DEFAULT_BLOCK = (32, 512, 512)
"""Largest blockwise block when none is given (whole output chunks of (16, 256, 256)); it
is halved, y and x first, until a block with its halo fits ``MEMORY_BYTES``."""

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass
class SegmentResult:
    """What was written, for the command's report and its JSON line."""

    input: str
    output: str
    method: str
    parameters: dict[str, Any]
    mode: str
    outputs: list[dict[str, Any]] = field(default_factory=list)
    segmenter_from: str | None = None  # where the segmenter came from when not from the command
    block: list[int] | None = None
    seconds: float = 0.0
    sweep: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None  # the graph pipeline's, by step
    mask: str | None = None  # the mask used: given, or a resumed job's

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def make_segmenter(request: SegmentRequest, spec: SegmenterBase | None
                   ) -> tuple[Segmenter, list[float] | None]:
    """The segmenter from ``spec`` (None: the request's method, or the default, with its spec
    defaults) and the request's overrides, and the values of its parameter to run (None:
    the spec's own)."""
    if spec is None:
        spec = segmenters.entry(request.method or DEFAULT_METHOD).spec()
    method = spec.type  # type: ignore[attr-defined]
    if request.min_size is not None:
        spec = respec(spec, min_size=request.min_size)  # type: ignore[assignment]
    segmenter: Segmenter = segmenters.build(spec)
    parameter = segmenter.value_name
    wrong = next((name for name in request.values if name != parameter), None)
    if wrong:
        raise UserError(f"--{wrong} does not apply to --method {method}; it takes "
                        f"--{parameter}")
    values = list(request.values.get(parameter, ())) or None
    own = getattr(spec, spec.value_field)
    if values is None and isinstance(own, list) and len(own) > 1:  # a recipe's thresholds:
        values = [float(v) for v in own]  # one output each, as --threshold T1,T2 (the first
        # alone was run, without a word, where the graph pipeline ran each)
    for value in values or []:  # a value out of range fails here, before any work
        said_as(f"--{parameter}", segmenter.with_value, value)
    if values and len(values) == 1:
        segmenter, values = segmenter.with_value(values[0]), None
    return segmenter, values


def stored_offsets(volume: Volume) -> Any:
    """The `offsets` attribute of the affinity array or its image group, if any."""
    return volume.attributes().get("offsets")


def recorded_segmenter(affs_path: str) -> tuple[SegmenterBase, str] | None:
    """The ``segment`` section of the recipe an `emrun infer` output records (its
    container's ``emrun.recipe``), and a phrase saying so; None for affinities that record no
    recipe (or that do not open: the job's own check then says why).
    The network's recipe knows how its affinities segment best (SNEMI3D's: waterz, not the
    generic mws default)."""
    try:  # an unfinished one too: its recipe stands, and the job's own check names it
        volume = open_volume(find_affinities(affs_path) or affs_path, unfinished=True)
    except UserError:
        return None
    recipe = volume.container_attributes().get("emrun", {})
    recipe = recipe.get("recipe") if isinstance(recipe, dict) else None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("segment"), dict):
        return None
    section, name = dict(recipe["segment"]), str(recipe.get("name", "?"))
    where = f"the recipe {name!r} recorded in {volume.path}"
    kind = str(section.get("type"))
    if kind not in segmenters:
        raise UserError(f"{where} segments with {kind!r}, which is not available here "
                        f"({segmenters.unknown_message(kind)}); choose one with --method")
    try:
        spec = segmenters.entry(kind).spec.model_validate(section)
    except ValidationError as exc:
        raise UserError(f"{where}: its segment section is not valid here (segmenter {kind}: "
                        f"{spec_problems(exc)}); choose a segmenter with --method") from None
    return spec, where  # type: ignore[return-value]


def find_affinities(path: str) -> str | None:
    """In a zarr group such as an inference output (``pred.zarr``), the one volume with an
    `offsets` attribute, as ``path/NAME``; None if there is not exactly one."""
    import zarr

    if "://" in path:
        return None  # a URL: an inference output is a local folder
    try:
        node = zarr.open(path, mode="r")
        if not isinstance(node, zarr.Group):
            return None
        found = [name for name, child in node.members(max_depth=0)
                 if "offsets" in child.attrs and not name.endswith(".partial")]
    except (OSError, ValueError):  # not a zarr store, or unreadable: the caller's open says
        return None
    return f"{path.rstrip('/')}/{found[0]}" if len(found) == 1 else None


def open_affinities(path: str, offsets_text: str | None, offsets_of: str | None = None
                    ) -> tuple[Volume, tuple[Offset, ...]]:
    """The affinity volume and its offsets, checked. A zarr group holding exactly one
    volume with offsets (an inference output) stands for that volume. ``offsets_of``: the
    affinities a resumed job was started on, whose offsets ``offsets_text`` are (a channel
    count that differs says the input changed, not that offsets are missing)."""
    try:
        volume = open_volume(path)
    except UserError:
        inner = find_affinities(path)
        if inner is None:
            raise
        volume = open_volume(inner)
    if volume.ndim != 4:
        what = "a 3D (z, y, x) volume" if volume.ndim == 3 else f"{volume.ndim}-d"
        raise UserError(f"{volume}: is {what}, not affinities; expected (c, z, y, x) with one "
                        "channel per offset")
    if not (volume.dtype == np.uint8 or volume.dtype.kind in "fb"):
        raise UserError(f"{volume}: dtype {volume.dtype} is not affinities; expected uint8 "
                        "(255 = 1) or float probabilities")
    if 0 in volume.shape:  # evaluate refuses its empty segmentation: say it here
        raise UserError(f"{volume} is empty (shape {list(volume.shape)}): nothing to segment")
    if offsets_text is not None:
        offsets = parse_offsets(offsets_text, "--offsets")
    else:
        stored = stored_offsets(volume)
        if stored is None:
            raise UserError(f"{volume}: no 'offsets' attribute says which voxel pairs the "
                            f"{volume.shape[0]} channels connect; pass --offsets, e.g. "
                            "'[[-1,0,0],[0,-1,0],[0,0,-1]]'")
        offsets = parse_offsets(stored, f"{volume}: attribute 'offsets'")
    if offsets_of is not None and len(offsets) != volume.shape[0]:
        raise UserError(f"{volume}: {volume.shape[0]} affinity channels, but the job being "
                        f"resumed was started on {offsets_of} with {len(offsets)}; resume "
                        "with those affinities, or use another output")
    check_offsets(offsets, volume.shape[0], str(volume), volume.shape[1:])
    check_distinct_offsets(offsets, str(volume))
    return volume, offsets


def note_other_offsets(volume: Volume, offsets: Sequence[Offset], given: str | None,
                       say: Callable[[str], None]) -> None:
    """``--offsets`` replace the ones the affinities store; when they differ, say so (a
    channel order mistyped segments into fragments without a word otherwise)."""
    stored = stored_offsets(volume) if given is not None else None
    if stored is None:
        return
    try:
        kept = parse_offsets(stored, f"{volume}: attribute 'offsets'")
    except UserError:
        return  # a broken attribute that --offsets replaces
    if tuple(kept) != tuple(offsets):
        say(f"note: --offsets {[list(o) for o in offsets]} replace the offsets {volume} "
            f"stores, {[list(o) for o in kept]}")


def open_spatial(path: str, affinities: Volume, what: str, integer: bool = False) -> Volume:
    """A mask or truth volume matching the affinities' z, y, x shape (a (1, z, y, x) one as
    its channel, as `emrun evaluate` takes it), or a larger one that holds them (by their
    offsets: the part they cover is read). One of the same shape elsewhere (another offset)
    or on another grid (another voxel size) is refused: it would be compared voxel by voxel
    with affinities of other places."""
    from ..io.one_channel import single_channel
    from ..io.window import covered_part

    volume = covered_part(affinities, single_channel(open_volume(path)))
    shape = affinities.shape[1:]
    _check_same_grid(volume, affinities, what)  # first: another resolution is another shape
    if tuple(volume.shape) != tuple(shape):
        raise UserError(f"{what} {volume}: shape {list(volume.shape)} differs from the "
                        f"affinities' volume {list(shape)} (and their offsets do not place "
                        "the affinities inside it)")
    if integer and volume.dtype.kind not in "biu":
        raise UserError(f"{what} {volume}: dtype {volume.dtype}; expected integer ids")
    return volume


def _check_same_grid(volume: Volume, affinities: Volume, what: str) -> None:
    """The voxel size and offset (where both volumes state them) of a mask or truth must be
    the affinities': the same shape alone does not make the same box."""
    if (problem := off_grid(volume, affinities, what, "the affinities")) is not None:
        raise UserError(problem)


def check_output(output: Path, names: Sequence[str]) -> None:
    """Refuse early what writing would refuse late: a file in the way, an existing
    volume (never overwritten), a bad name."""
    if not output.name.lower().endswith(".zarr"):
        raise UserError(f"{output}: the output must be a folder whose name ends in .zarr")
    if (why := suffix_only(output)) is not None:
        raise UserError(f"{output}: {why}")
    if is_link_loop(output):
        raise UserError(f"{output} is a loop of symbolic links; give a .zarr folder")
    if output.exists() and not output.is_dir():
        raise UserError(f"{output}: exists and is a file; give a new or existing .zarr folder")
    twice = next((name for name in names if names.count(name) > 1), None)
    if twice is not None:  # values that differ beyond 6 digits: the second output failed late
        raise UserError(f"two of the values given name the same output {output / twice} "
                        "(values are named to 6 significant digits); give values that differ "
                        "within 6 digits")
    for name in names:
        if not _NAME.fullmatch(name) or name.endswith(".partial"):
            raise UserError(f"--name {name!r}: use letters, digits, '_', '-' and '.'")
        if (output / name).exists():
            raise UserError(f"{output / name}: already exists; not overwriting it (choose "
                            "another --name or output)")
        if not (output / SCALE_FOLDER).exists():  # a graph job's own check says --resume
            check_new_volume(output, name, label=True)  # where it goes: OUT/labels/NAME


def default_block(segmenter: Segmenter, offsets: Sequence[Offset],
                  channels: int) -> tuple[int, int, int]:
    """The largest block up to ``DEFAULT_BLOCK`` whose working set, halo included, fits
    ``MEMORY_BYTES`` (blocks never shrink below 8 x 64 x 64)."""
    halo = segmenter.halo(offsets)
    block = list(DEFAULT_BLOCK)

    def need() -> int:
        return math.prod(b + 2 * h for b, h in zip(block, halo, strict=True)) * \
            segmenter.bytes_per_voxel(channels)

    while need() > MEMORY_BYTES:
        if max(block[1], block[2]) > 64:
            block[1 if block[1] >= block[2] else 2] //= 2
        elif block[0] > 8:
            block[0] //= 2
        else:
            break
    return zyx(block)


def run_segment(request: SegmentRequest, *,
                on_block: Callable[[str, int, int], None] | None = None,
                on_stage: Callable[[str], None] | None = None) -> SegmentResult:
    """Segment ``request.affinities`` into ``request.output``/``name`` (or one volume per
    value, or the sweep's best); see the module docstring and :class:`SegmentRequest`.
    ``on_block(stage, done, total)`` follows blockwise work, ``on_stage(text)`` the steps."""
    start = time.perf_counter()
    if request.scheduler is not None:
        return _run_graph(request, start, say=on_stage, on_block=on_block)
    spec, segmenter_from = _chosen_spec(request)
    segmenter, values = make_segmenter(request, spec)
    method = segmenter.spec.type
    output, name, block = request.output, request.name, request.block
    sweeping, mask_path = request.sweep, request.mask
    if sweeping and values is None:  # one value given (already set on the segmenter), or none
        values = list(request.values.get(segmenter.value_name, ())) or list(
            segmenter.spec.sweep_values)
    names = ([f"{name}_{v:g}" for v in values] if values and not sweeping else [name])
    check_output(output, names)
    say = on_stage or (lambda text: None)

    volume, offsets = open_affinities(request.affinities, request.offsets)
    note_other_offsets(volume, offsets, request.offsets, say)
    spatial = volume.shape[1:]
    level_factors(spatial, volume.voxel_size, request.levels)  # a bad --levels, before work
    check_output_fits(output, 8 * math.prod(spatial) * len(names),
                      f"segmenting {volume} ({len(names)} x {'x'.join(map(str, spatial))} "
                      "uint64)")
    mask = None if mask_path is None else open_spatial(mask_path, volume, "mask")
    truth = (None if request.truth is None
             else open_spatial(request.truth, volume, "truth", integer=True))
    need = math.prod(spatial) * segmenter.bytes_per_voxel(len(segmenter.channels(offsets)))
    blockwise = not sweeping and (block is not None or need > MEMORY_BYTES)
    if blockwise and not segmenter.blockwise:
        # no blockwise path: in memory while the machine has room, whatever MEMORY_BYTES says
        room = int(MEMORY_SHARE * available_memory())
        if block is not None:
            which = f"--method {method}" if segmenter_from is None else \
                f"{method} (the segmenter of {segmenter_from})"
            raise UserError(f"{which} runs in memory only; drop --block, or use "
                            "--method mws or cc")
        if need > room:
            raise UserError(f"--method {method} runs in memory only and this volume needs "
                            f"about {need / 2**30:.1f} GiB, more than the {room / 2**30:.1f} "
                            "GiB this machine has free for it; segment a smaller box, or "
                            "use --method mws or cc (block by block)")
        blockwise = False
    result = SegmentResult(input=str(volume), output=str(output), method=method,
                           parameters=segmenter.spec.model_dump(),
                           mode="blockwise" if blockwise else "memory",
                           segmenter_from=segmenter_from, mask=mask_path)
    if values and not sweeping:  # one output per value: the spec's own value was not run
        result.parameters[segmenter.spec.value_field] = list(values)  # waterz: thresholds
    info = {"version": __version__, "input": str(volume), "offsets": [list(o) for o in offsets],
            "mask": mask_path, "segmenter": segmenter.spec.model_dump()}
    write_args = {"voxel_size": volume.voxel_size, "offset": volume.offset,
                  "shift_nm": volume.shift_nm, "label": True, "levels": request.levels}

    with held_store(output) as new_store, adding_all(output, [(n, True) for n in names],
                                                      new_store):  # one value per volume:
        if sweeping:  # all or none, or a rerun was refused the ones written before a kill
            _sweep(result, volume, offsets, segmenter, values or [], mask, truth, request.workers,
                   output, name, info, write_args, request.connected_truth, say)
        elif blockwise:
            if block is not None:  # the defaults scale with the volume; a user's may not
                check_block_count(spatial, block)
            chosen = (tuple(block) if block is not None
                      else default_block(segmenter, offsets, volume.shape[0]))
            result.block = [min(b, n) for b, n in zip(chosen, spatial, strict=True)]
            runs = ([(names[0], segmenter)] if values is None
                    else [(n, segmenter.with_value(v)) for n, v in zip(names, values, strict=True)])
            for out_name, run in runs:
                _blockwise(result, volume, offsets, run, mask, output, out_name, chosen, info,
                           write_args, on_block)
        else:
            say(f"reading {volume} ({'x'.join(map(str, spatial))} voxels)")
            affs, used = read_channels(volume, offsets, segmenter)
            mask_array = None if mask is None else inside(mask.read())
            from .pipeline import segment_values

            chosen = values or [segmenter.value]
            say(f"segmenting in memory ({method}, {segmenter.value_name} "
                f"{', '.join(f'{v:g}' for v in chosen)})")
            for out_name, value, seg in zip(
                    names, chosen, segment_values(affs, used, segmenter, chosen, mask_array),
                    strict=True):
                run = segmenter if values is None else segmenter.with_value(value)
                say(f"writing {output / out_name}")
                _write(result, output, out_name, seg, run, info, write_args)
    result.seconds = round(time.perf_counter() - start, 3)
    return result


def _chosen_spec(request: SegmentRequest) -> tuple[SegmenterBase | None, str | None]:
    """The request's segmenter spec, else the one the affinities' recipe records (and a
    phrase saying where it came from), else None (the method's or the default's)."""
    if request.spec is None and request.method is None:
        recorded = recorded_segmenter(request.affinities)
        if recorded is not None:
            return recorded
    return request.spec, None


def _run_graph(request: SegmentRequest, start: float, *, say: Callable[[str], None] | None,
               on_block: Callable[[str, int, int], None] | None) -> SegmentResult:
    """The graph pipeline (emrun.segment.scale) on local workers or daisy. From its first
    read a SIGTERM or SIGINT stops it in one line (`main_stops`): at once while it only
    reads and checks, else where all it wrote is whole."""
    from .scale.command import run_scaled
    from .scale.schedulers import main_stops

    with main_stops() as stops:
        with stops.starting():
            result, agglo, volume, offsets, mask = _graph_inputs(request, say)
        with held_store(request.output):  # the job's workers write it too, and never take it
            result.timings = run_scaled(request, agglo, volume, offsets, mask, result,
                                        say or (lambda text: None), on_block, stops)
    result.block = list(result.timings.pop("block"))
    result.seconds = round(time.perf_counter() - start, 3)
    return result


def _graph_inputs(request: SegmentRequest, say: Callable[[str], None] | None
                  ) -> tuple[SegmentResult, Any, Volume, tuple[Offset, ...], Volume | None]:
    """The graph pipeline's checks and inputs: the result to fill, the agglomeration spec,
    the affinities and their offsets, the mask (a resume's: the job's where not given)."""
    from .scale.command import resumed_inputs, waterz_spec

    spec, segmenter_from = _chosen_spec(request)
    if spec is not None and spec.type != "waterz" and request.spec is None and \
            request.method is None:  # the recorded recipe's, not asked for: say, and go on
        if say is not None:
            say(f"{segmenter_from} segments with {spec.type}, which has no graph pipeline; "
                "agglomerating with waterz's settings (--threshold, --min-size to choose)")
        spec, segmenter_from = None, None
    agglo = waterz_spec(request, spec)
    names = [request.name] if len(agglo.thresholds) == 1 else [
        f"{request.name}_{t:g}" for t in agglo.thresholds]
    output = request.output
    if not request.resume:
        check_output(output, names)
    inputs = resumed_inputs(request)  # a resume's: the job's where not given
    volume, offsets = open_affinities(request.affinities, inputs.offsets, inputs.offsets_of)
    note_other_offsets(volume, offsets, request.offsets, say or (lambda text: None))
    spatial = volume.shape[1:]
    level_factors(spatial, volume.voxel_size, request.levels)
    if not request.resume:
        check_output_fits(output, 8 * math.prod(spatial) * (len(names) + 1),
                          f"segmenting {volume} (fragments and {len(names)} segmentations, "
                          f"{'x'.join(map(str, spatial))} uint64)")
    mask = None if inputs.mask is None else open_spatial(inputs.mask, volume, "mask")
    result = SegmentResult(input=str(volume), output=str(output), method="waterz",
                           parameters=agglo.model_dump(), mode=f"graph ({request.scheduler})",
                           segmenter_from=segmenter_from, mask=inputs.mask)
    return result, agglo, volume, offsets, mask


def read_channels(volume: Volume, offsets: Sequence[Offset], segmenter: Segmenter
                  ) -> tuple[np.ndarray, tuple[Offset, ...]]:
    """The whole volume's float affinities of the channels the segmenter reads, and their
    offsets; one channel at a time, so a nearest-neighbour method never holds the others."""
    used = segmenter.channels(offsets)
    if len(used) == len(offsets):
        return to_float(volume.read(), str(volume)), tuple(offsets)
    affs = np.empty((len(used), *volume.shape[1:]), np.float32)
    for i, c in enumerate(used):
        channel = Roi((c, 0, 0, 0), (1, *volume.shape[1:]))
        affs[i] = to_float(volume.read(channel)[0], str(volume))
    return affs, tuple(offsets[c] for c in used)


def _record(result: SegmentResult, name: str, segmenter: Segmenter, segments: int) -> None:
    result.outputs.append({"name": name, segmenter.value_name: segmenter.value,
                           "segments": segments})


def _write(result: SegmentResult, output: Path, name: str, seg: np.ndarray,
           segmenter: Segmenter, info: dict[str, Any], write_args: dict[str, Any],
           extra: dict[str, Any] | None = None) -> None:
    from ..io import write_volume

    segments = int(seg.max(initial=0))
    attrs = {"emrun": {"segment": {**info, "segmenter": segmenter.spec.model_dump(),
                                   "segments": segments, "blockwise": None, **(extra or {})}}}
    write_volume(output, name, seg, attrs=attrs, **write_args)
    _record(result, name, segmenter, segments)


def _blockwise(result: SegmentResult, volume: Volume, offsets: Sequence[Offset],
               segmenter: Segmenter, mask: Volume | None, output: Path, name: str,
               block: tuple[int, ...], info: dict[str, Any], write_args: dict[str, Any],
               on_block: Callable[[str, int, int], None] | None) -> None:
    import zarr

    from ..io import staged_volume
    from ..io.layout import PARTIAL_SUFFIX, volume_dir
    from .blockwise import segment_into

    attrs = {"emrun": {"segment": {**info, "segmenter": segmenter.spec.model_dump()}}}
    with staged_volume(output, name, volume.shape[1:], np.uint64, attrs=attrs,
                       **write_args) as array:
        done = segment_into(array, volume, offsets, segmenter, mask=mask,
                            block=block, on_block=on_block)  # type: ignore[arg-type]
        group = zarr.open_group(str(volume_dir(output, name + PARTIAL_SUFFIX, True)),
                                mode="r+")
        meta = dict(group.attrs)["emrun"]
        meta["segment"].update(segments=done.segments, blockwise={
            "block": list(done.block), "halo": list(done.halo), "blocks": done.blocks,
            "fragments": done.fragments})
        group.attrs["emrun"] = meta
    _record(result, name, segmenter, done.segments)


def _sweep(result: SegmentResult, volume: Volume, offsets: Sequence[Offset],
           segmenter: Segmenter, values: Sequence[float], mask: Volume | None,
           truth: Volume | None, workers: int | None, output: Path, name: str,
           info: dict[str, Any], write_args: dict[str, Any], connected_truth: bool,
           say: Callable[[str], None]) -> None:
    from ..evaluate.pieces import connected_pieces
    from .sweep import check_scorable, sweep, value_line

    assert truth is not None
    say(f"reading {truth}" + ("" if mask is None else f" and {mask}"))
    labels = truth.read()
    kept = None if mask is None else inside(mask.read())
    check_scorable(labels, kept, str(truth), str(mask))  # before minutes of segmenting
    say(f"reading {volume}")
    affs, used = read_channels(volume, offsets, segmenter)
    say(f"segmenting at {len(values)} values of {segmenter.value_name} and scoring each")
    found = sweep(affs, used, segmenter, values,
                  connected_pieces(labels) if connected_truth else labels,
                  kept, workers=workers,
                  on_value=lambda i, row: say(value_line(segmenter.value_name, values, i, row)))
    summary = {**found.summary(), "truth": str(truth), "connected_truth": connected_truth}
    result.sweep = summary
    chosen = segmenter.with_value(found.best_value)
    result.parameters = chosen.spec.model_dump()  # the value written, not the spec's default
    _write(result, output, name, found.segmentation, chosen, info, write_args,
           extra={"sweep": summary})
