"""A worker's work on one block of each step, and the global steps (agglomeration of the
whole graph, or the merge of the blocks' agglomerations).

Every function here takes the job and a block index and leaves the block done (its
done-marker written after its data), so it can run in any process on any machine that sees
the output folder and the database. Blocks are written whole: each block owns whole chunks
of the output arrays (the chunks divide the block), so workers never share a chunk.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ...atomic import atomic_output
from ...geometry import Roi, Zyx, local_slices, slices
from ...io import Volume, open_volume
from ...io.completion import UNFINISHED
from ...io.layout import group_attrs, volume_dir
from ...io.masks import inside
from ...io.one_channel import single_channel
from ...io.window import covered_part
from ..affinities import Offset, is_nearest, to_float
from .abandon import abandonable
from .agglomerate import agglomerate, join_levels, merge_sequence, segments_from_levels
from .fragments import HALO, block_fragments
from .graphdb import GraphData, GraphStore, Neighbourhood
from .job import FRAGMENTS, ScaleJob
from .rag import block_graph

__all__ = ["AGGLOMERATION_CONTEXT", "agglomerate_graph", "finished_volume", "forget_caches",
           "levels_key", "lut_key", "run_block"]

AGGLOMERATION_CONTEXT = 0.5
"""Blockwise agglomeration: the graph a block agglomerates reaches this fraction of a block
beyond each of its faces (nodes by centre), and always the neighbours of its own nodes."""


def _job(job_file: str) -> ScaleJob:
    """The job as its file says now (a resumed job rewrites it: another threshold, name or
    agglomeration), parsed once per content."""
    return _parsed(Path(job_file).read_text())


@functools.cache
def _parsed(text: str) -> ScaleJob:
    return ScaleJob.from_json(text)


@functools.cache
def _volume(path: str) -> Volume:
    return open_volume(path)


@functools.cache
def _store(url: str) -> GraphStore:
    return GraphStore(url)


def forget_caches() -> None:
    """Drop what this process kept between blocks (opened volumes, database engines and the
    blocks' rows they keep, mapped lookup tables): their keys are paths and URLs, so a job
    run again in the same process (its output deleted and made again, the affinities
    rewritten at the same path) was relabelled through the last run's tables."""
    for cached in (_volume, _mask_volume, _store, _mapped, _array, _finished):
        cached.cache_clear()


@functools.cache
def _array(path: str, mode: str) -> zarr.Array:
    """A level-0 array of the output, opened once per process: each opening reads and parses
    its metadata (3-4 ms; it was done for every block, 16 % of a job of 1,024 small
    blocks)."""
    return zarr.open_array(path, mode=mode)


def fragments_array(job: ScaleJob, mode: str = "r") -> zarr.Array:
    return _array(str(volume_dir(job.output, FRAGMENTS, True) / "0"), mode)


def finished_volume(job: ScaleJob, name: str) -> bool:
    """Whether the segmentation ``name`` exists and is finished: a resume at other thresholds
    that shares it with an earlier run leaves it alone (relabelling it again rewrote a
    finished volume under its readers)."""
    attrs = group_attrs(volume_dir(job.output, name, True))
    note = None if attrs is None else attrs.get("emrun")
    return isinstance(note, dict) and UNFINISHED not in note


def segmentation_array(job: ScaleJob, name: str) -> zarr.Array:
    return _array(str(volume_dir(job.output, name, True) / "0"), "r+")


@functools.cache
def _mask_volume(mask: str, affinities: str) -> Volume:
    """The mask in the affinities' voxels: a larger one (placed by its offsets, as the
    command checked) read at the part they cover, not at their own voxel indices."""
    return covered_part(_volume(affinities), single_channel(_volume(mask)))


def _mask(job: ScaleJob, box: Roi) -> np.ndarray | None:
    if job.mask is None:
        return None
    return inside(_mask_volume(job.mask, job.affinities).read(box))


@functools.lru_cache(maxsize=64)
def lut_key(job: ScaleJob) -> str:
    """What decides the lookup tables and the segmentations: the graph and the agglomeration
    settings. Relabel markers and table files are keyed by it. The thresholds as a set:
    each one's segmentation is the same whatever the others, so the same command with
    them in another order finds its volumes (it was refused as 'another threshold')."""
    text = json.dumps([levels_key(job), sorted(job.thresholds), job.min_size, job.name])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=64)
def levels_key(job: ScaleJob) -> str:
    """What decides the blocks' join levels (and the global agglomeration): the graph, the
    scoring and how it agglomerates. The levels in the database are keyed by it."""
    how: list[Any] = [job.agglomeration]
    if job.agglomeration == "blockwise":
        how.append(AGGLOMERATION_CONTEXT)
    text = json.dumps([job.digest(), job.scoring, *how])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=64)
def lut_file(job: ScaleJob, name: str) -> Path:
    """A threshold's segment of every fragment (in the order of `ids_file`), a .npy file that
    workers map rather than load: a block reads only its own fragments' stretch."""
    return job.folder / "lut" / f"{lut_key(job)}-{name}.npy"


@functools.lru_cache(maxsize=64)
def ids_file(job: ScaleJob) -> Path:
    """Every fragment id, sorted: the rows of the lookup tables."""
    return job.folder / "lut" / f"{job.digest()}-ids.npy"


def run_block(job_file: str, step: str, index: Zyx) -> dict[str, float]:
    """Do ``step`` on block ``index`` unless it is done; returns seconds by part."""
    job = _job(job_file)
    index = tuple(int(i) for i in index)  # type: ignore[assignment]
    if step == "fragments":
        return _fragments(job, index)
    if step == "graph":
        return _graph(job, index)
    if step == "agglomerate":
        return _agglomerate(job, index)
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
    first = job.block_id(index) * job.block_voxels
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
    region = graph_region(core, job.offsets, job.shape)
    labels = np.asarray(fragments_array(job)[slices(region)])
    affs = to_float(_volume(job.affinities).read(core), job.affinities)
    read = time.perf_counter()
    graph = block_graph(labels, region, core, affs, job.offsets)
    work = time.perf_counter()
    before = store.seconds
    store.write_block(job.block_id(index), graph)
    return {"read": read - start, "graph": work - read, "database": store.seconds - before}


def graph_region(core: Roi, offsets: Sequence[Offset], shape: Sequence[int]) -> Roi:
    """The core and the one-voxel margin its edges reach, on the sides the nearest-neighbour
    offsets point to only (DeepEM's (-1, 0, 0) ...: the lower faces), so that a block decodes
    the fewest neighbouring chunks; inside the volume of ``shape``."""
    low, high = _margins(tuple(tuple(int(d) for d in o) for o in offsets))
    begin = [max(b + m, 0) for b, m in zip(core.offset, low, strict=True)]
    end = [min(b + n + m, size) for b, n, m, size in zip(core.offset, core.shape, high, shape,
                                                        strict=True)]
    return Roi(begin, [e - b for b, e in zip(begin, end, strict=True)])


@functools.cache
def _margins(offsets: tuple[tuple[int, ...], ...]) -> tuple[Zyx, Zyx]:
    """How far below and above a block its nearest-neighbour edges reach, by axis (a few
    offsets per job: worked out once, not for every block)."""
    low, high = [0, 0, 0], [0, 0, 0]
    for offset in offsets:
        if is_nearest(offset):
            for axis, d in enumerate(offset):
                low[axis], high[axis] = min(low[axis], d), max(high[axis], d)
    return (low[0], low[1], low[2]), (high[0], high[1], high[2])


def neighbourhood(job: ScaleJob, index: Zyx) -> Neighbourhood:
    """The graph block ``index`` agglomerates: its nodes, those whose centre lies within
    ``AGGLOMERATION_CONTEXT`` blocks of its faces, and those touching its own. Plain integer
    arithmetic: funlib boxes and a grid per block cost more than the rest of the block's
    bookkeeping."""
    context, reach = _context(job.block)
    (z, y, x), (bz, by, bx), (cz, cy, cx) = index, job.block, context
    nz, ny, nx = job.shape
    begin = (max(z * bz - cz, 0), max(y * by - cy, 0), max(x * bx - cx, 0))
    end = (min((z + 1) * bz + cz, nz), min((y + 1) * by + cy, ny), min((x + 1) * bx + cx, nx))
    counts = job.counts
    ranges = [range(max(i - r, 0), min(i + r, n - 1) + 1)
              for i, r, n in zip(index, reach, counts, strict=True)]
    block = job.block_id(index)
    first = block * job.block_voxels
    return Neighbourhood(block, first + 1, first + job.block_voxels, begin, end,
                         tuple((k * counts[1] + j) * counts[2] + i
                               for k, j, i in itertools.product(*ranges)))


@functools.cache
def _context(block: Zyx) -> tuple[Zyx, Zyx]:
    """``AGGLOMERATION_CONTEXT`` of a block in voxels, and in blocks (at least one)."""
    context = [math.ceil(b * AGGLOMERATION_CONTEXT) for b in block]
    reach = [max(-(-c // b), 1) for c, b in zip(context, block, strict=True)]
    return (context[0], context[1], context[2]), (reach[0], reach[1], reach[2])


def _agglomerate(job: ScaleJob, index: Zyx) -> dict[str, float]:
    """Agglomerate the graph around the block to the end; store the join levels of the edges
    it owns (those whose lower-id end is one of its nodes)."""
    store = _store(job.db)
    start = time.perf_counter()
    around = neighbourhood(job, index)
    found = store.read_region(around, histograms=job.scoring != "mean")
    graph = found.graph
    read = time.perf_counter()
    merges = merge_sequence(graph, 1.0, job.scoring)
    owned = found.blocks[graph.u] == around.block  # u < v: positions follow ids
    u, v = graph.u[owned], graph.v[owned]
    level = join_levels(graph.ids.size, merges, u, v)
    joined = np.isfinite(level)
    work = time.perf_counter()
    before = store.seconds
    store.write_levels(levels_key(job), around.block, graph.ids[u[joined]],
                       graph.ids[v[joined]], level[joined])
    return {"read": read - start, "agglomerate": work - read,
            "database": store.seconds - before}


def _relabel(job: ScaleJob, index: Zyx) -> dict[str, float]:
    start = time.perf_counter()
    step = f"relabel-{lut_key(job)}"
    if job.is_done(step, index):
        return {}
    box = job.box(index)
    fragments = np.asarray(fragments_array(job)[slices(box)])
    ids = _mapped(str(ids_file(job)))
    first = job.block_id(index) * job.block_voxels  # the block's ids: first + 1 ...
    bounds = np.array([first + 1, first + job.block_voxels + 1], np.uint64)
    stretch = slice(*np.searchsorted(ids, bounds).tolist())
    for name in job.names:
        if _finished(job, name):
            continue
        segments = _mapped(str(lut_file(job, name)))[stretch]
        segmentation_array(job, name)[slices(box)] = lookup(fragments, np.asarray(ids[stretch]),
                                                            np.asarray(segments))
    job.mark_done(step, index)
    return {"relabel": time.perf_counter() - start}


def lookup(fragments: np.ndarray, ids: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """``fragments`` through the table ``ids`` (sorted, unique) -> ``segments``; 0 (and any
    id the table lacks) -> 0. The table is made dense over the ids' span and read by index
    (5x faster than a binary search per voxel): a block's ids span at most its voxels."""
    if ids.size == 0:
        return np.zeros(fragments.shape, np.uint64)
    first = np.uint64(ids[0])
    span = int(ids[-1] - first) + 1
    table = np.zeros(span + 1, np.uint64)  # the last entry: ids outside the table
    table[(ids - first).astype(np.int64)] = segments
    flat = fragments.ravel().astype(np.uint64, copy=False)
    local = np.minimum(flat - first, np.uint64(span))  # below first: wraps, so above span
    return table[local].reshape(fragments.shape)


@functools.cache
def _mapped(path: str) -> np.ndarray:
    return np.load(path, mmap_mode="r")


@functools.cache
def _finished(job: ScaleJob, name: str) -> bool:
    """`finished_volume`, read once per job and process (not from the volume's attributes
    for every block): the relabel step never finishes a volume, the command does after it,
    and `forget_caches` drops it before the next job."""
    return finished_volume(job, name)


def agglomerate_graph(job: ScaleJob) -> dict[str, Any]:
    """Each threshold's lookup table (written atomically; skipped when the tables exist):
    global, from the whole graph agglomerated here; blockwise, from the blocks' join levels.
    Returns counts and seconds. The reads run where a stop can leave them (`abandonable`):
    the driver fills the arrays in one call that a SIGTERM or Ctrl-C waited for."""
    files = [lut_file(job, name) for name in job.names]
    if ids_file(job).exists() and all(f.exists() for f in files):
        return {}
    store = _store(job.db)
    store.drop_region_rows()  # kept by a blockwise step that ran in this process
    start = time.perf_counter()
    if job.agglomeration == "global":
        graph = abandonable(store.read, job.scoring != "mean")
        read = time.perf_counter()
        segments = agglomerate(graph, job.thresholds, job.scoring, job.min_size)
        edges = graph.u.size
    else:
        graph = abandonable(store.read, False) if job.min_size > 1 else \
            _nodes_only(*abandonable(store.read_nodes))
        ends_u, ends_v, level = abandonable(store.read_levels, levels_key(job))
        read = time.perf_counter()
        u, v = np.searchsorted(graph.ids, ends_u), np.searchsorted(graph.ids, ends_v)
        del ends_u, ends_v
        segments = segments_from_levels(graph, u, v, level, job.thresholds, job.min_size)
        edges = level.size
    done = time.perf_counter()
    for path, values in [(ids_file(job), graph.ids),
                         *((f, seg.astype(np.uint64)) for f, seg in zip(files, segments,
                                                                         strict=True))]:
        with atomic_output(path) as tmp, open(tmp, "wb") as handle:
            np.save(handle, values)
    return {"nodes": int(graph.ids.size), "edges": int(edges),
            "read": read - start, "agglomerate": done - read,
            "segments": [int(s.max(initial=0)) for s in segments]}



def _nodes_only(ids: np.ndarray, sizes: np.ndarray) -> GraphData:
    none = np.zeros(0, np.int64)
    return GraphData(ids, sizes, none, none, np.zeros(0), none, np.zeros((0, 0), np.int64))
