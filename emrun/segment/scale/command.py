"""`emrun segment --scheduler local|daisy`: the checks, then the four steps, resumable.

Everything a user can get wrong is checked before any block is done: the segmenter (the
graph pipeline agglomerates by threshold, as waterz: ``--method waterz`` or a recipe whose
``segment`` is waterz), thresholds in [0, 1], the affinities and their nearest-neighbour
offsets, the mask, the output (never overwritten; an unfinished job only with ``--resume``,
and only if its fragments were made the same way; ``--resume`` only where a job is) and the
database (it must answer and accept the tables). Affinities moved since the job started
resume at their new place when they are the same volume (`_moved_inputs`). A SIGTERM or
SIGINT stops the job where all it wrote is whole (in a step between blocks, `run_step`;
outside, `MainStops`: at once while it starts, waits for its database, agglomerates the
whole graph or builds a pyramid) and says how to go on.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import fields as dataclass_fields
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import zarr

from ... import __version__
from ...capacity import check_block_count
from ...devices import daisy_package
from ...errors import UserError
from ...geometry import Zyx, zyx
from ...io import Volume, open_volume
from ...io.completion import mark_finished, unfinished
from ...io.layout import level_count, volume_dir
from ...io.opener import split_volume_path
from ...io.sample import contents_sample, sample_boxes
from ...io.write import CHUNK_ZYX, build_pyramid, create_volume
from ...recipe.run import SegmenterBase, Waterz
from ...registry import segmenters
from ..affinities import Offset, parse_offsets, to_float
from ..base import respec, said_as
from ..request import SegmentRequest
from .abandon import abandonable
from .fragments import FRAGMENT_METHODS, HALO, MAX_VOXELS
from .graphdb import (
    SQLITE_FILE,
    GraphStore,
    default_url,
    job_url,
    password_to_environment,
    shown_url,
)
from .job import FOLDER, FRAGMENTS, JOB_FILE, ScaleJob, saved_job
from .schedulers import MainStops, forget_caches, local_pool, main_stops, run_step
from .steps import agglomerate_graph, finished_volume, levels_key, lut_file, lut_key

__all__ = ["AGGLOMERATIONS", "DEFAULT_BLOCK", "Inputs", "block_chunks", "resumed_inputs",
           "run_scaled", "volume_key"]

AGGLOMERATIONS = ("global", "blockwise")
"""global: the whole graph agglomerated in one process (exact; about 500 bytes per edge);
blockwise: each block agglomerates the graph around it on the workers, then one process
joins the edges below each threshold (about 100 bytes per edge)."""

DEFAULT_BLOCK = (32, 256, 256)
"""Blocks of 2 M voxels: about 0.3 GB of working memory per worker (1 GB at 32 x 512 x 512),
and faster per voxel than larger ones (the watershed's union-find outgrows the caches).
Fragments + graph on affinities stored as `emrun infer` stores them (shards of 32 x 256 x 256,
inner chunks 8 x 128 x 128), `emrun bench segment --shape 64 1024 1024`, 1 worker, medians
of 3 on the 2-core development VM under light load from other work: 2.48 M voxels/s per
core against 2.13 at 32 x 512 x 512; under heavier load 1.95, 1.73, and 1.59 at
64 x 256 x 256."""

Say = Callable[[str], None]

PYRAMID_CUT = ("the pyramid of {what} was cut short (a resume finishes it from the blocks "
               "built; the volume stays unfinished until then); all else done is kept")


def block_chunks(block: Sequence[int]) -> Zyx:
    """Storage chunks that divide the block (so no two blocks share a chunk), as large as
    the usual chunks (16, 256, 256) allow."""
    return zyx(max(d for d in range(1, min(b, c) + 1) if b % d == 0)
               for b, c in zip(block, CHUNK_ZYX, strict=True))


def _default(option: str) -> Any:
    """The request's value of ``option`` when the command does not give it."""
    return next(f.default for f in dataclass_fields(SegmentRequest) if f.name == option)


def _given(request: SegmentRequest, option: str) -> bool:
    """Whether the command gave ``option`` (`SegmentRequest.given`; a caller that does not
    say: whether its value is another than the default). An explicit default counted as not
    given: ``--resume --name segmentation`` finished the job's own volumes instead."""
    return option in request.given or getattr(request, option) != _default(option)


def _plain_resume(request: SegmentRequest) -> ScaleJob | None:
    """The saved job, when ``--resume`` gives none of --threshold, --name, --min-size: it
    finishes the job as it was last started (it agglomerated at waterz's default threshold
    into a new volume, and left the job's own unfinished for good). With any of them, the
    command says what to make, as for a new job, and the other options keep their defaults."""
    if not request.resume or request.values.get("threshold") or \
            _given(request, "name") or request.min_size is not None:
        return None
    return saved_job(request.output)


def waterz_spec(request: SegmentRequest, spec: SegmenterBase | None) -> Waterz:
    """The agglomeration settings: the recipe's waterz section, or waterz's defaults, with the
    command's thresholds and min size, or a plain ``--resume``'s saved ones."""
    if request.method not in (None, "waterz") or (
            spec is not None and spec.type != "waterz"):  # type: ignore[attr-defined]
        kind = request.method or spec.type  # type: ignore[union-attr]
        raise UserError(f"--scheduler runs the graph pipeline (fragments, a region graph, "
                        f"agglomeration by threshold as waterz), not {kind}; use --method "
                        "waterz, or drop --scheduler for mws or cc on one machine (--block)")
    if request.values.get("bias"):  # it would be dropped without a word
        raise UserError("--bias is for mws; --scheduler agglomerates by --threshold (as "
                        "waterz): give --threshold, or drop --scheduler")
    base = spec if isinstance(spec, Waterz) else segmenters.entry("waterz").spec()
    changes: dict[str, Any] = {}
    if (saved := _plain_resume(request)) is not None:
        changes.update(thresholds=list(saved.thresholds), min_size=saved.min_size)
    if request.values.get("threshold"):
        changes.pop("thresholds", None)  # the given ones, not the resumed job's
        base = said_as("--threshold", respec, base, thresholds=list(request.values["threshold"]))
    if request.min_size is not None:
        changes["min_size"] = request.min_size
    return respec(base, **changes) if changes else base  # type: ignore[return-value]


def run_scaled(request: SegmentRequest, agglo: Waterz, volume: Volume,
               offsets: tuple[Any, ...], mask: Volume | None, result: Any,
               say: Say, on_block: Callable[[str, int, int], None] | None,
               stops: MainStops | None = None) -> dict[str, Any]:
    """Run (or resume) the job with the agglomeration settings ``agglo`` (`waterz_spec`);
    fills ``result.outputs``; returns the timings by step (and the block). ``stops``: the
    caller's `main_stops` (None: this run's own)."""
    with contextlib.ExitStack() as scope:
        if stops is None:
            stops = scope.enter_context(main_stops())
        with stops.starting():  # reads and checks: a signal stops the command at once
            job, old = _checked_job(request, agglo, volume, offsets, mask, say)
            info = _output_info(job, volume, mask)
            _check_outputs(job, info)  # refused before the database or the job's folder
        return _run_job(job, old, request, agglo, volume, info, result, stops, say, on_block)


def _checked_job(request: SegmentRequest, agglo: Waterz, volume: Volume,
                 offsets: tuple[Any, ...], mask: Volume | None,
                 say: Say) -> tuple[ScaleJob, ScaleJob | None]:
    """The job to run, checked, and the saved job it resumes (None: a new one)."""
    if request.fragments not in FRAGMENT_METHODS:
        raise UserError(f"--fragments {request.fragments!r}: choose "
                        f"{' or '.join(FRAGMENT_METHODS)}")
    if request.agglomeration not in AGGLOMERATIONS:
        raise UserError(f"--agglomeration {request.agglomeration!r}: choose "
                        f"{' or '.join(AGGLOMERATIONS)}")
    if request.scheduler == "daisy":
        daisy_package()  # missing: said before the output is made (a rerun was refused)
    output = request.output
    spatial = zyx(volume.shape[1:])
    layout = _resumed_layout(request, spatial)
    settings = _resumed_settings(request)
    job = ScaleJob(affinities=volume.location(), offsets=tuple(offsets),
                   output=str(output.resolve()), shape=spatial, block=layout.block,
                   fragments=settings.fragments, thresholds=tuple(agglo.thresholds),
                   scoring=agglo.scoring, min_size=int(agglo.min_size), db=layout.db,
                   name=settings.name, mask=None if mask is None else mask.location(),
                   levels=settings.levels, agglomeration=settings.agglomeration)
    forget_caches()  # an earlier run in this process kept blocks' data by path and URL
    old = _check_resume(job, request.resume, volume)
    if taken := _taken_inputs(request, job, volume) + layout.taken:
        listed = ", ".join(taken[:-1]) + " and " + taken[-1] if len(taken) > 1 else taken[0]
        say(f"resuming with the job's {listed} (as it was started)")
    job = replace(job, run=_run_token(old))
    if old is not None:  # moved inputs: the job keeps the places its digest was made from
        job = replace(job, started=old.started)
    _warn_left_unfinished(old, job, say)
    _check_values(volume, job.affinities)
    return job, old


def _run_job(job: ScaleJob, old: ScaleJob | None, request: SegmentRequest, agglo: Waterz,
             volume: Volume, info: dict[str, Any], result: Any, stops: MainStops, say: Say,
             on_block: Callable[[str, int, int], None] | None) -> dict[str, Any]:
    """From the job's first write on: a signal stops the command where all it wrote is
    whole (`MainStops`)."""
    output = request.output
    store = GraphStore(job.db)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(store.dispose)  # stopped or not
        if not (output / "zarr.json").is_file():  # new (held: its folder holds only the lock)
            zarr.open_group(str(output), mode="a", zarr_format=3)  # the store, then its folder
        job.folder.mkdir(parents=True, exist_ok=True)
        # the database answers and takes the tables, and holds no other run's graph, first
        _create_tables(job, store, resumed=old is not None, stops=stops)
        _prepare_outputs(job, volume, agglo, info)
        job.save()
        stops.check("making its volumes")
        timings = _run_steps(job, store, request, stops, say, on_block)
        started = time.perf_counter()
        for i, volume_name in enumerate(job.names):
            segments = _finish(job, volume_name, stops)
            result.outputs.append({"name": volume_name, "threshold": job.thresholds[i],
                                   "segments": segments})
            if i + 1 < len(job.names):
                stops.check(f"finishing {volume_name} ({i + 1} of {len(job.names)} "
                            "segmentations finished)")
        fragments = timings.pop("fragments pyramid")
        timings["pyramid"] = {"seconds": round(time.perf_counter() - started + fragments, 3),
                              "fragments": fragments}
        timings["database_bytes"] = store.size_bytes()
    return timings


def _to_do(pending: int, blocks: int, workers: int, kind: str) -> str:
    """'3 of 8 blocks to do (local, 2 workers)': the workers that can be busy, no more than
    the blocks to do (`local_pool` and the daisy runs start no more; it said --workers,
    'local, 4 workers' for a job of one block done in this process)."""
    busy = min(workers, pending) if pending else min(workers, blocks)
    return (f"{pending} of {blocks} block{'' if blocks == 1 else 's'} to do ({kind}, {busy} "
            f"worker{'' if busy == 1 else 's'})")


def _create_tables(job: ScaleJob, store: GraphStore, resumed: bool, stops: MainStops) -> None:
    """`GraphStore.create`, left at once by a stop: a server that does not answer held a
    SIGTERM or Ctrl-C for its connect timeout (a locked SQLite file, for its busy timeout),
    and then ended the command as a database error. Its one transaction is rolled back when
    the stopped process closes the connection."""
    create = functools.partial(store.create, job.digest(), job.run, job.output,
                               resumed=resumed)
    with stops.at_once(f"the job stopped while waiting for its database "
                       f"{shown_url(job.db)}, before it changed anything there: run the "
                       "same command again"):
        abandonable(create)


class Layout(NamedTuple):
    """The job's block and database (`_resumed_layout`), and what of them a resume took from
    the saved job (for one line saying so)."""

    block: Zyx
    db: str
    taken: list[str]


def _resumed_layout(request: SegmentRequest, spatial: Zyx) -> Layout:
    """The block and the database: the command's; on a resume, the saved job's where
    --block or --db is not given (a job started with --block or --db was refused on a
    plain --resume: 'made with another block', 'resume with --db'). A given one that
    differs from the job's is still refused (`_check_resume`)."""
    saved = saved_job(request.output) if request.resume else None
    folder = request.output / FOLDER
    default = zyx(min(b, n) for b, n in zip(DEFAULT_BLOCK, spatial, strict=True))
    taken: list[str] = []
    if request.block is None and saved is not None:
        block = zyx(min(b, n) for b, n in zip(saved.block, spatial, strict=True))
        if block != default:
            taken.append(f"--block {' '.join(map(str, block))}")
    else:
        block = _checked_block(request.block, spatial)
    if request.db:
        db = job_url(password_to_environment(request.db))
    elif saved is not None:
        db = _carried_db(saved.db, Path(saved.output) / FOLDER, folder)
        if db != default_url(folder):
            taken.append(f"--db {shown_url(db)}")
    else:
        db = default_url(folder)
    return Layout(block, db, taken)


class Inputs(NamedTuple):
    """The offsets (as ``--offsets`` text; None: the affinities' attribute) and the mask of
    the job (`resumed_inputs`)."""

    offsets: str | None
    mask: str | None
    offsets_of: str | None = None  # the affinities whose job gave ``offsets`` (a resume's)


def resumed_inputs(request: SegmentRequest) -> Inputs:
    """The command's --offsets and --mask; on a resume, the saved job's where they are not
    given (its fragments were made with them: a job started with --mask was refused on a
    resume without it, 'made with another mask'). A given one that differs from the job's is
    still refused (`_check_resume`). The job keeps the mask's resolved location (in its
    digest too): a mask inside the output moves with it (`carried_mask`); one moved
    elsewhere is refused with one line."""
    saved = saved_job(request.output) if request.resume else None
    if saved is None:
        return Inputs(request.offsets, request.mask)
    offsets, offsets_of = request.offsets, None
    if offsets is None:
        offsets = json.dumps([list(o) for o in saved.offsets])
        offsets_of = saved.affinities
    mask = request.mask
    if mask is None and saved.mask is not None:
        mask = carried_mask(saved.mask, saved.output, str(request.output.resolve()))
        try:
            open_volume(mask)
        except UserError as exc:
            raise UserError(f"--resume takes the job's --mask {mask}, which does not open "
                            f"now: {exc}; its fragments were made with it: put it back "
                            "there, or use another output") from None
    return Inputs(offsets, mask, offsets_of)


def _within(path: str, folder: str) -> bool:
    """Whether the local ``path`` lies inside ``folder``."""
    return "://" not in path and Path(path).is_relative_to(folder)


def _taken_inputs(request: SegmentRequest, job: ScaleJob, volume: Volume) -> list[str]:
    """What of the offsets and the mask a resume took from the saved job (`resumed_inputs`),
    for the line saying so: its mask, and its offsets where the affinities' attribute gives
    others (or none)."""
    if not request.resume or saved_job(request.output) is None:
        return []
    taken = []
    if request.offsets is None and _stored_offsets(volume) != job.offsets:
        text = json.dumps([list(o) for o in job.offsets], separators=(",", ":"))
        taken.append(f"--offsets '{text}'")
    if request.mask is None and job.mask is not None:
        taken.append(f"--mask {job.mask}")
    return taken


def _stored_offsets(volume: Volume) -> tuple[Offset, ...] | None:
    """The offsets the affinities' `offsets` attribute gives (None: none, or not valid)."""
    stored = volume.attributes().get("offsets")
    try:
        return None if stored is None else tuple(parse_offsets(stored, "offsets"))
    except UserError:
        return None


def _checked_block(given: tuple[int, int, int] | None, spatial: Zyx) -> Zyx:
    """``--block`` (or the default), no larger than the volume; refused if its blocks are
    too many or too large for a worker."""
    block = zyx(min(b, n) for b, n in zip(given or DEFAULT_BLOCK, spatial, strict=True))
    if given is not None:  # a user's block; the default is the fastest per voxel
        check_block_count(spatial, block)
    if math.prod(b + 2 * h for b, h in zip(block, HALO, strict=True)) > MAX_VOXELS:
        raise UserError(f"--block {list(block)}: too large, a block with its context "
                        f"({list(HALO)} on each side) may hold at most {MAX_VOXELS:,} voxels; "
                        f"the default {list(DEFAULT_BLOCK)} is also the fastest per voxel")
    return block


def _carried_db(db: str, was: Path, folder: Path) -> str:
    """The saved job's database ``db`` for the job whose private folder is now ``folder``
    (``was`` when it was saved): its default SQLite file, inside the output, is the one the
    output carries now (it may have been moved or copied); any other database stays."""
    if db in (default_url(was), f"sqlite:///{was / SQLITE_FILE}"):
        return default_url(folder)
    return db


class Resumed(NamedTuple):
    """The job's settings a resume may take from the saved job (`_resumed_settings`)."""

    name: str
    levels: int | None
    agglomeration: str
    fragments: str


def _run_steps(job: ScaleJob, store: GraphStore, request: SegmentRequest, stops: MainStops,
               say: Say, on_block: Callable[[str, int, int], None] | None) -> dict[str, Any]:
    """The four steps, each skipping what is done; a signal between them (``stops``) stops
    the command there, and during the agglomeration at once (its tables are written only
    whole, at its end). Returns the timings by step."""
    timings: dict[str, Any] = {"block": list(job.block), "blocks": len(job.grid)}
    workers, kind, launch = request.workers or 1, request.scheduler or "local", request.launch
    with local_pool(kind, workers, len(job.grid)) as pool:

        def step(name: str, pending: list[Zyx]) -> None:
            say(f"{name}: {_to_do(len(pending), len(job.grid), workers, kind)}")
            started = time.perf_counter()
            parts = run_step(job, name, pending, scheduler=kind, workers=workers,
                             launch=launch, pool=pool, on_block=on_block)
            timings[name] = {"seconds": round(time.perf_counter() - started, 3),
                             "blocks": len(pending),
                             **{k: round(v, 3) for k, v in parts.items()}}
            stops.check(f"the {name} step")

        indices = [zyx(i) for i in job.grid.indices()]
        step("fragments", job.undone("fragments", indices))
        timings["fragments pyramid"] = _finish_fragments(job, stops)  # every block is in
        stops.check("the fragments step and the fragments' pyramid")
        done = store.done_blocks()
        step("graph", [i for i in indices if job.block_id(i) not in done])
        thresholds = ", ".join(f"{t:g}" for t in job.thresholds)
        kept = "the fragments and the graph are kept"
        if job.agglomeration == "blockwise":
            agglomerated = store.agglomerated_blocks(levels_key(job))
            step("agglomerate", [i for i in indices if job.block_id(i) not in agglomerated])
            say(f"merging the blocks' agglomerations (thresholds {thresholds})")
            what, kept = "merge", "the fragments, the graph and the blocks' agglomerations " \
                "are kept"
        else:
            say(f"agglomerating the graph (thresholds {thresholds}, {job.scoring})")
            what = "agglomerate"
        started = time.perf_counter()
        with stops.cut_short(f"the agglomeration was cut short (its tables are written "
                             f"only when it is done); {kept}"):
            timings[what] = {**agglomerate_graph(job),
                             "seconds": round(time.perf_counter() - started, 3)}
        stops.check("the agglomeration")
        relabel = f"relabel-{lut_key(job)}"
        todo = any(not finished_volume(job, name) for name in job.names)
        step("relabel", job.undone(relabel, indices) if todo else [])
    return timings


def _finish_fragments(job: ScaleJob, stops: MainStops) -> float:
    """Give the fragments the segmentations' pyramid levels (labels: downsampled by mode) and
    mark them finished, unless an earlier run did; returns the seconds. They had level 0
    only: a viewer zoomed out read the whole volume. A stop cuts the pyramid short (a
    resume goes on from its finished blocks: the fragments stay unfinished until it is
    done)."""
    folder = volume_dir(job.output, FRAGMENTS, True)
    started = time.perf_counter()
    if not finished_volume(job, FRAGMENTS):
        with stops.cut_short(PYRAMID_CUT.format(what="fragments")):
            build_pyramid(folder, job.levels, label=True)
        mark_finished(folder)
    return round(time.perf_counter() - started, 3)


def _resumed_settings(request: SegmentRequest) -> Resumed:
    """The volumes' name, the pyramid levels, the agglomeration and the fragments method:
    the command's; a plain ``--resume`` (`_plain_resume`) takes the saved job's name, and its
    agglomeration unless --agglomeration is given; any resume the saved pyramid levels and
    fragments method unless --levels or --fragments is given (the fragments must be the
    job's: it was refused, a job started with --fragments mws, resumed without)."""
    name, levels, agglomeration = request.name, request.levels, request.agglomeration
    fragments = request.fragments
    saved = saved_job(request.output) if request.resume else None
    if saved is not None:
        if levels is None:
            levels = saved.levels
        if not _given(request, "fragments"):
            fragments = saved.fragments
    if (plain := _plain_resume(request)) is not None:
        name = plain.name
        if not _given(request, "agglomeration"):
            agglomeration = plain.agglomeration
    return Resumed(name, levels, agglomeration, fragments)


def _warn_left_unfinished(old: ScaleJob | None, job: ScaleJob, say: Say) -> None:
    """A resume at other thresholds (or name) leaves the segmentations an earlier run of the
    job started and did not finish as they are: say which, and how to finish them (job.json
    keeps only the last run's settings, so a later plain --resume does not either)."""
    if old is None:
        return
    labels = volume_dir(job.output, FRAGMENTS, True).parent
    left = [f"{folder.name} (--resume {options})"
            for folder in (sorted(labels.iterdir()) if labels.is_dir() else [])
            if folder.name not in job.names and (folder / "zarr.json").is_file()
            and not finished_volume(job, folder.name)
            and (options := _started_with(folder.name, _attr(Path(job.output), folder.name,
                                                               "segment")))]
    if left:
        say(f"warning: {'; '.join(left)}: started by an earlier run and unfinished, left so "
            "by this one (other thresholds or name); finish each with the options shown")


def _started_with(name: str, made: dict[str, Any]) -> str:
    """The options that made the graph segmentation ``name`` ('' if not one)."""
    segmenter = made.get("segmenter")
    if made.get("mode") != "graph" or not isinstance(segmenter, dict) or \
            not isinstance(segmenter.get("thresholds"), list):
        return ""
    together = [float(t) for t in segmenter["thresholds"]]
    base = name.removesuffix(f"_{made.get('threshold', 0):g}") if len(together) > 1 else name
    options = f"--threshold {','.join(f'{t:g}' for t in together)}"
    if segmenter.get("min_size") is not None:
        options += f" --min-size {segmenter['min_size']}"
    if base != _default("name"):
        options += f" --name {base}"
    if made.get("agglomeration", "global") != _default("agglomeration"):
        options += f" --agglomeration {made['agglomeration']}"
    return options


def _rebased(old: ScaleJob, job: ScaleJob) -> ScaleJob:
    """The saved job of an output since moved (or copied): its default SQLite database, inside
    the output, is the one the output carries now, not the one at the old place."""
    if old.output == job.output:
        return old
    db = _carried_db(old.db, Path(old.output) / FOLDER, job.folder)
    return old if db == old.db else replace(old, output=job.output, db=db)


def _check_resume(job: ScaleJob, resume: bool, volume: Volume | None = None
                  ) -> ScaleJob | None:
    """The job this one resumes (None: a new one); refused if it is not the same job.
    ``volume``: the affinities, to tell them moved (`_moved_inputs`; None: not moved)."""
    if not job.job_file.exists():
        if resume:  # a user who says --resume expects to go on, not a new job
            raise UserError(f"{job.output}: holds no scaled segmentation job to resume (no "
                            f"{FOLDER}/{JOB_FILE}); drop --resume to start one")
        return None
    if not resume:
        raise UserError(f"{job.output}: holds an unfinished or finished scaled segmentation; "
                        "use --resume to finish or extend it, or another output (nothing was "
                        "overwritten)")
    try:
        saved = ScaleJob.load(job.job_file)
    except (OSError, ValueError, TypeError, KeyError):
        raise UserError(f"{job.job_file}: unreadable; remove {job.folder} to start over") \
            from None
    old = _moved_inputs(_rebased(saved, job), job, volume, saved.output)
    # a moved job's digest is of where its inputs started: where they are now is compared too
    if old.digest() != replace(job, started=old.started).digest() or \
            (old.affinities, old.mask) != (job.affinities, job.mask):
        fields = {"input": "affinities", "offsets": "offsets", "shape": "shape",
                  "block": "block", "fragments": "fragments", "mask": "mask"}
        what = [shown for shown, field in fields.items()
                if getattr(old, field) != getattr(job, field)]
        was = ", ".join(f"{w} {getattr(old, fields[w])}" for w in what)
        raise UserError(f"{job.output}: its fragments were made with another "
                        f"{', '.join(what) or 'layout'} ({was}); resume with the same "
                        "settings, or use another output")
    if old.db != job.db:  # a given --db (`_resumed_layout` takes the job's otherwise)
        raise UserError(f"--db {shown_url(job.db)}: this job's graph is in "
                        f"{shown_url(old.db)}; resume with that --db")
    return old


def _moved_inputs(old: ScaleJob, job: ScaleJob, volume: Volume | None, was: str
                  ) -> ScaleJob:
    """The saved job with the affinities and the mask at their places now, where they moved:
    affinities that no longer open where the job started and are the same volume here
    (`_same_affinities`), and a mask that lay inside the output (once at ``was``), now
    moved with it (`carried_mask`). Their first places stay in ``started`` (the digest's).
    Affinities that still open at the old place are other ones (a copy may differ since):
    refused."""
    moved: dict[str, Any] = {}
    if volume is not None and old.affinities != job.affinities and \
            _gone(old.affinities):
        if not _same_affinities(job, volume):
            raise UserError(f"{job.affinities}: not the affinities {job.output} was started "
                            f"from ({old.affinities}, which is no longer there): their "
                            "placement or a sample of their voxels differs; resume with those "
                            "affinities, or use another output")
        moved["affinities"] = job.affinities
    if old.mask is not None and old.mask != job.mask and \
            job.mask == carried_mask(old.mask, was, job.output):
        moved["mask"] = job.mask
    if not moved:
        return old
    return replace(old, started=old.started or (old.affinities, old.mask), **moved)


def _gone(path: str) -> bool:
    """Whether the volume at ``path`` is gone from there (moved): on this machine, its file
    or folder no longer exists (one that exists and fails to open for a moment, on a network
    file system, is not taken for moved); a URL, that it no longer opens."""
    if "://" not in path:
        return not Path(split_volume_path(path)[0]).exists()
    try:
        open_volume(path, unfinished=True)
    except UserError:
        return True
    return False


def _same_affinities(job: ScaleJob, volume: Volume) -> bool:
    """Whether ``volume`` is the affinities the job's fragments were made from, as far as
    can be told without reading them all: the same shape and offsets (the digest's), the
    same placement (voxel size and offset, as the fragments carry them) and the same sample
    of voxels (its bytes: the dtype too). Chunks do not matter: a rechunked copy is the
    same volume."""
    folder = volume_dir(job.output, FRAGMENTS, True)
    if not folder.is_dir():
        return False
    made = _attr(Path(job.output), FRAGMENTS, "fragments")
    fragments = open_volume(str(folder), unfinished=True)
    return (made.get("input_sample") == contents_sample(volume)
            and tuple(fragments.voxel_size) == tuple(volume.voxel_size)
            and tuple(fragments.offset) == tuple(volume.offset))


def carried_mask(mask: str, was: str, now: str) -> str:
    """The job's ``mask`` location for its output, once at ``was``, now at ``now``: inside
    the output, it moved with it; elsewhere it stays."""
    if was == now or not _within(mask, was):
        return mask
    return str(Path(now) / Path(mask).relative_to(was))


def _check_values(volume: Volume, where: str) -> None:
    """Logits or NaN in nine small boxes are refused before the output exists: found by the
    first fragments block, they left an output that the rewritten affinities may not resume
    (their sample differs), so the user had to delete it by hand."""
    for box in sample_boxes(volume):
        to_float(box, where)


def _run_token(old: ScaleJob | None) -> str:
    """The run's token (`ScaleJob.run`): the resumed job's; new for a new job; for a job
    saved before tokens, one made from its digest, so that each of its resumes claims the
    database as the same run even if one stops before it saves the job again."""
    if old is None:
        return uuid.uuid4().hex
    return old.run or f"job-{old.digest()}"


def _output_info(job: ScaleJob, volume: Volume, mask: Volume | None) -> dict[str, Any]:
    """What the output volumes record of the job (and samples of the affinities and of the
    mask: the job's digest holds their paths, not what they hold)."""
    return {"version": __version__, "input": job.affinities,
            "offsets": [list(o) for o in job.offsets], "mask": job.mask,
            "block": list(job.block), "fragments": job.fragments,
            "input_sample": contents_sample(volume),
            "mask_sample": None if mask is None else contents_sample(mask)}


def _check_outputs(job: ScaleJob, info: dict[str, Any]) -> None:
    """Refuse any volume in the way that this job (with these settings) did not create."""
    output = Path(job.output)
    if volume_dir(output, FRAGMENTS, True).exists():
        made = _attr(output, FRAGMENTS, "fragments")
        if made.get("digest") != job.digest():
            raise UserError(f"{volume_dir(output, FRAGMENTS, True)}: already exists and was "
                            "not made by this job; not overwriting it (use another output)")
        _check_samples(job, made, info)
    for name, threshold in zip(job.names, job.thresholds, strict=True):
        if not volume_dir(output, name, True).exists():
            continue
        made = _attr(output, name, "segment")
        if not _same_volume(job, threshold, made):
            raise UserError(f"{volume_dir(output, name, True)}: already exists, made with "
                            f"{_made_otherwise(job, threshold, made)}; not overwriting it "
                            "(choose another --name)")
        _check_samples(job, made, info)  # also where the fragments were removed since
    for name in (FRAGMENTS, *job.names):
        folder = volume_dir(output, name, True)
        if job.levels is not None and finished_volume(job, name) and \
                (count := level_count(folder)) != job.levels:
            raise UserError(f"{folder}: finished with {count} pyramid level"
                            f"{'s' if count != 1 else ''}; --levels {job.levels} would not "
                            "change it (a finished volume is left as it is): drop --levels, "
                            "or segment into another output")


def _made_otherwise(job: ScaleJob, threshold: float, made: dict[str, Any]) -> str:
    """What the volume in the way was made with that this job would not: its threshold,
    agglomeration, min size or scoring, else another graph (it was always 'another threshold
    or method', where only --agglomeration or --min-size differed)."""
    segmenter = made.get("segmenter") if isinstance(made.get("segmenter"), dict) else {}
    differ = [f"{what} {theirs} (this run: {mine})" for what, theirs, mine in (
        ("threshold", made.get("threshold"), threshold),
        ("agglomeration", made.get("agglomeration"), job.agglomeration),
        ("min size", segmenter.get("min_size"), job.min_size),
        ("scoring", segmenter.get("scoring"), job.scoring))
        if theirs is not None and theirs != mine]
    return ", ".join(differ) if differ else "another region graph (fragments, block or input)"


def _check_samples(job: ScaleJob, made: dict[str, Any], info: dict[str, Any]) -> None:
    """Refuse a resume whose affinities or mask hold other data than when the volume that
    recorded ``made`` was started (a volume started before a sample was recorded has none
    to compare)."""
    output = Path(job.output)
    for key, what, path in (("input_sample", "affinities", job.affinities),
                            ("mask_sample", "mask", job.mask)):
        if made.get(key, info[key]) != info[key]:
            raise UserError(f"{path}: holds other data than when {output} was started (a "
                            "sample of its voxels differs: it was rewritten since); resume "
                            f"only with the {what} it started from, or use another output")


def _prepare_outputs(job: ScaleJob, volume: Volume, agglo: Waterz,
                     info: dict[str, Any]) -> None:
    """Create the fragments volume and one segmentation per threshold, unless this job
    created them already (`_check_outputs` refused any other volume in the way)."""
    output = Path(job.output)
    chunks = block_chunks(job.block)
    args = {"chunks": chunks, "voxel_size": volume.voxel_size, "offset": volume.offset,
            "shift_nm": volume.shift_nm, "label": True}
    _check_outputs(job, info)
    if not volume_dir(output, FRAGMENTS, True).exists():
        # removed since its blocks were marked (a resume): they are made again, else the
        # new volume stayed empty and was marked finished; with the same affinities (checked
        # against the segmentations' samples) they are the graph's fragments
        shutil.rmtree(job.folder / "fragments", ignore_errors=True)
        create_volume(output, FRAGMENTS, job.shape, np.uint64,
                      attrs={"emrun": {"fragments": {**info, "digest": job.digest()},
                                       **unfinished("emrun segment stopped before its last "
                                                    "block; run it again with --resume")}},
                      **args)
    for name, threshold in zip(job.names, job.thresholds, strict=True):
        if not volume_dir(output, name, True).exists():
            # relabelled again (each finished volume is skipped): its blocks' markers were
            # for the volume that was removed
            shutil.rmtree(job.folder / f"relabel-{lut_key(job)}", ignore_errors=True)
            key = volume_key(job, threshold)
            attrs = {"emrun": {"segment": {**info, "segmenter": agglo.model_dump(),
                                           "threshold": threshold, "key": key,
                                           "agglomeration": job.agglomeration,
                                           "mode": "graph"}, **unfinished(
                "emrun segment stopped before it finished (its blocks or its pyramid); run it "
                "again with --resume")}}
            create_volume(output, name, job.shape, np.uint64, attrs=attrs, **args)


def volume_key(job: ScaleJob, threshold: float) -> str:
    """What decides one threshold's segmentation: the graph and how it is agglomerated
    (`levels_key`), the threshold, the min size and the name. Not the other thresholds (as
    `lut_key`, which keyed the volumes before): a resume adding a threshold refused the
    volume of a threshold it shared with the job as 'another threshold'."""
    text = json.dumps([levels_key(job), float(threshold), job.min_size, job.name])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _same_volume(job: ScaleJob, threshold: float, made: dict[str, Any]) -> bool:
    """Whether the volume whose ``segment`` attributes are ``made`` is this job's
    ``threshold``: keyed by `volume_key`, or (written before it) by the `lut_key` of the
    thresholds it was made with."""
    key = made.get("key")
    if key == volume_key(job, threshold):
        return True
    together = made.get("segmenter", {}).get("thresholds") if isinstance(
        made.get("segmenter"), dict) else None
    if made.get("threshold") != threshold or not isinstance(together, list):
        return False
    return key == lut_key(replace(job, thresholds=tuple(float(t) for t in together)))


def _attr(output: Path, name: str, key: str) -> dict[str, Any]:
    group = zarr.open_group(str(volume_dir(output, name, True)), mode="r")
    found = dict(group.attrs).get("emrun", {})
    return found.get(key, {}) if isinstance(found, dict) else {}


def _finish(job: ScaleJob, name: str, stops: MainStops) -> int:
    """Build the segmentation's pyramid and record its segment count; returns the count (a
    volume finished before, by a run at other thresholds, is left as it is). A stop cuts
    the pyramid short, as the fragments' (`_finish_fragments`)."""
    folder = volume_dir(job.output, name, True)
    if finished_volume(job, name):
        return int(_attr(Path(job.output), name, "segment").get("segments", 0))
    segments = int(np.load(lut_file(job, name), mmap_mode="r").max(initial=0))
    with stops.cut_short(PYRAMID_CUT.format(what=name)):
        build_pyramid(folder, job.levels, label=True)
    group = zarr.open_group(str(folder), mode="r+")
    meta = dict(group.attrs)["emrun"]
    meta["segment"]["segments"] = segments
    group.attrs["emrun"] = meta
    mark_finished(folder)
    return segments
