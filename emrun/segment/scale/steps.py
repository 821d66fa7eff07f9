"""A worker's work on one block of each step, and the one global step (agglomeration).

Every function here takes the job and a block index and leaves the block done (its
done-marker written after its data), so it can run in any process on any machine that sees
the output folder and the database. Blocks are written whole: each block owns whole chunks
of the output arrays (the chunks divide the block), so workers never share a chunk.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ...atomic import atomic_output
from ...geometry import Roi, Zyx, local_slices, slices
from ...io import Volume, open_volume
from ...io.layout import volume_dir
from ..affinities import Offset, is_nearest, to_float
from .agglomerate import agglomerate
from .fragments import HALO, block_fragments
from .graphdb import GraphStore
from .job import FRAGMENTS, ScaleJob
from .rag import block_graph

__all__ = ["BLOCK_STEPS", "agglomerate_graph", "lut_key", "run_block"]

BLOCK_STEPS = ("fragments", "graph", "relabel")


@functools.cache
def _job(job_file: str) -> ScaleJob:
    return ScaleJob.load(job_file)


@functools.cache
def _volume(path: str) -> Volume:
    return open_volume(path)


@functools.cache
def _store(url: str) -> GraphStore:
    return GraphStore(url)


def fragments_array(job: ScaleJob, mode: str = "r") -> zarr.Array:
    return zarr.open_array(str(volume_dir(job.output, FRAGMENTS, True) / "0"), mode=mode)


def segmentation_array(job: ScaleJob, name: str) -> zarr.Array:
    return zarr.open_array(str(volume_dir(job.output, name, True) / "0"), mode="r+")


def _mask(job: ScaleJob, box: Roi) -> np.ndarray | None:
    return None if job.mask is None else _volume(job.mask).read(box) != 0


def lut_key(job: ScaleJob) -> str:
    """What decides the lookup tables and the segmentations: the graph and the agglomeration
    settings. Relabel markers and table files are keyed by it."""
    text = json.dumps([job.digest(), list(job.thresholds), job.scoring, job.min_size,
                       job.name])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def lut_file(job: ScaleJob, name: str) -> Path:
    return job.folder / "lut" / f"{lut_key(job)}-{name}.npz"


def run_block(job_file: str, step: str, index: Zyx) -> dict[str, float]:
    """Do ``step`` on block ``index`` unless it is done; returns seconds by part."""
    job = _job(job_file)
    index = tuple(int(i) for i in index)  # type: ignore[assignment]
    if step == "fragments":
        return _fragments(job, index)
    if step == "graph":
        return _graph(job, index)
    if step == "relabel":
        return _relabel(job, index)
    raise ValueError(f"unknown step {step!r}")


def _fragments(job: ScaleJob, index: Zyx) -> dict[str, float]:
    if job.is_done("fragments", index):
        return {}
    start = time.perf_counter()
    box = job.box(index)
    region = job.grid.box(index, context=HALO)
    affs = to_float(_volume(job.affinities).read(region), job.affinities)
    read = time.perf_counter()
    first = job.block_id(index) * int(np.prod(job.block))
    labels, _ = block_fragments(affs, job.offsets, _mask(job, region), job.fragments, first,
                                local_slices(box, region.offset))
    work = time.perf_counter()
    fragments_array(job, "r+")[slices(box)] = labels
    job.mark_done("fragments", index)
    return {"read": read - start, "fragments": work - read,
            "write": time.perf_counter() - work}


def _graph(job: ScaleJob, index: Zyx) -> dict[str, float]:
    store = _store(job.db)
    start = time.perf_counter()
    core = job.box(index)
    region = graph_region(core, job.offsets, job.grid.total)
    labels = np.asarray(fragments_array(job)[slices(region)])
    affs = to_float(_volume(job.affinities).read(core), job.affinities)
    read = time.perf_counter()
    graph = block_graph(labels, region, core, affs, job.offsets)
    work = time.perf_counter()
    before = store.seconds
    store.write_block(job.block_id(index), graph)
    return {"read": read - start, "graph": work - read, "database": store.seconds - before}


def graph_region(core: Roi, offsets: Sequence[Offset], total: Roi) -> Roi:
    """The core and the one-voxel margin its edges reach, on the sides the nearest-neighbour
    offsets point to only (DeepEM's (-1, 0, 0) ...: the lower faces), so that a block decodes
    the fewest neighbouring chunks."""
    begin, end = list(core.begin), list(core.end)
    for offset in offsets:
        if not is_nearest(offset):
            continue
        for axis, d in enumerate(offset):
            begin[axis] = min(begin[axis], core.begin[axis] + d)
            end[axis] = max(end[axis], core.end[axis] + d)
    grown = Roi(begin, [e - b for b, e in zip(begin, end, strict=True)])
    return grown.intersect(total)


def _relabel(job: ScaleJob, index: Zyx) -> dict[str, float]:
    start = time.perf_counter()
    step = f"relabel-{lut_key(job)}"
    if job.is_done(step, index):
        return {}
    box = job.box(index)
    fragments = np.asarray(fragments_array(job)[slices(box)])
    for name in job.names:
        ids, segments = _lut(str(lut_file(job, name)))
        segmentation_array(job, name)[slices(box)] = lookup(fragments, ids, segments)
    job.mark_done(step, index)
    return {"relabel": time.perf_counter() - start}


def lookup(fragments: np.ndarray, ids: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """``fragments`` through the table ``ids`` (sorted) -> ``segments``; 0 (and any id the
    table lacks) -> 0."""
    if ids.size == 0:
        return np.zeros(fragments.shape, np.uint64)
    flat = fragments.ravel()
    where = np.minimum(np.searchsorted(ids, flat), ids.size - 1)
    out = np.where(ids[where] == flat, segments[where], 0).astype(np.uint64)
    return out.reshape(fragments.shape)


@functools.cache
def _lut(path: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as data:
        return data["ids"], data["segments"]


def agglomerate_graph(job: ScaleJob) -> dict[str, Any]:
    """Read the whole graph, agglomerate it at every threshold and write each threshold's
    lookup table (atomically); skipped when the tables exist. Returns counts and seconds."""
    files = [lut_file(job, name) for name in job.names]
    if all(f.exists() for f in files):
        return {}
    store = _store(job.db)
    start = time.perf_counter()
    graph = store.read(histograms=job.scoring != "mean")
    read = time.perf_counter()
    segments = agglomerate(graph, job.thresholds, job.scoring, job.min_size)
    done = time.perf_counter()
    for path, seg in zip(files, segments, strict=True):
        with atomic_output(path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, ids=graph.ids, segments=seg.astype(np.uint64))
    return {"nodes": int(graph.ids.size), "edges": int(graph.u.size),
            "read": read - start, "agglomerate": done - read,
            "segments": [int(s.max(initial=0)) for s in segments]}

