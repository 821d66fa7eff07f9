"""`emrun bench segment`: the graph pipeline's throughput on synthetic affinities, by workers.

The affinities (uint8, three nearest-neighbour channels) are generated block by block, never
whole, so any shape fits: cells are the Voronoi regions (in units of the box) of one
jittered seed per ``CELL``-sized box of a coarse grid (the seed of a box is a hash of its
index, so each block computes its own labels and a one-voxel margin below without seeing
the others), and the
affinity of an edge is 0.8 within a cell and 0.2 across, plus Gaussian noise (sigma 0.1)
from a generator seeded by the block. Generation is not timed. They are stored as `emrun
infer` stores its outputs (`affinity_layout`: zarr 3 shards of the layout's chunks, cut into
inner chunks), so a block's halo costs what it costs on infer's outputs.

For each worker count the whole pipeline runs on the same affinities into a fresh output
with local worker processes, and reports seconds by step, the throughput per core of
fragments + graph (voxels / (seconds x busy cores): the workers, or fewer where the blocks
or this process's cores are fewer), scaling against the first worker count's, the
database's share of the workers' time in those steps (SQLite: writing a block's nodes and
edges), and the database's size per voxel. The adapted Rand error against the generated
cells checks the result when the volume is small enough to score in memory.

What the user asks for is checked before anything is made (`check_size`): the number of
blocks, the disk the affinities take and the memory a block's generation takes per worker.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ..capacity import check_work_folder, free_disk, size_text
from ..devices import available_memory, cpu_cores
from ..errors import Interrupted, UserError
from ..geometry import BlockGrid, Roi, box_of, slices, zyx
from ..infer.job import output_chunks
from ..infer.plan import Layout, choose_chunks_and_block
from ..io.write import create_volume, volume_around
from .workdir import made_folder, remove_tree

__all__ = ["CELL", "affinity_layout", "bench_segment", "check_size", "make_affinities",
           "report_lines", "synthetic_cells"]

CELL = (16, 48, 48)
"""The coarse grid of cell seeds (z, y, x voxels): one cell per 37,000 voxels, elongated in
z like neurites in anisotropic EM."""
OFFSETS = ((-1, 0, 0), (0, -1, 0), (0, 0, -1))
SCORE_VOXELS = 64 * 2**20
"""Volumes up to this many voxels are scored against the generated cells (when the memory
for it, ``SCORE_BYTES_PER_VOXEL``, is free)."""
SCORE_BYTES_PER_VOXEL = 64
"""Peak memory of scoring per voxel: the segmentation and the generated cells, uint64, and
the score's tables (50 measured with tracemalloc on 32x256x256)."""
GENERATE_BYTES_PER_VOXEL = 100
"""Peak memory of generating one block's affinities, per voxel of the block (95 measured
with tracemalloc on a 16x128x128 block)."""
MAX_BLOCKS = 100_000
"""More blocks than this is a typo in --block or --shape: the pipeline's cost per block
(tasks, database transactions, files) would be all the benchmark measured, for hours."""


def _hash(values: np.ndarray) -> np.ndarray:
    """A 64-bit integer hash (splitmix64's finaliser) of non-negative integers."""
    x = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def synthetic_cells(box: Roi, shape: Sequence[int]) -> np.ndarray:
    """Cell ids (uint64, from 1) of the voxels of ``box`` in a volume of ``shape``: each voxel
    takes the nearest seed (in units of ``CELL``) among the 27 boxes around its own, so a
    voxel's id depends on its position alone, whichever block computes it."""
    counts = [math.ceil(n / c) for n, c in zip(shape, CELL, strict=True)]
    position = [((np.arange(b, e) + 0.5) / c).astype(np.float32)
                for b, e, c in zip(box.begin, box.end, CELL, strict=True)]
    home = [np.floor(p).astype(np.int64) for p in position]
    low = [int(h[0]) - 1 for h in home]  # the boxes whose seeds may be nearest, padded
    size = [int(h[-1]) + 2 - lo for h, lo in zip(home, low, strict=True)]
    grid = np.meshgrid(*[np.arange(lo, lo + n) for lo, n in zip(low, size, strict=True)],
                       indexing="ij")
    inside = np.all([(g >= 0) & (g < n) for g, n in zip(grid, counts, strict=True)], axis=0)
    index = (grid[0] * counts[1] + grid[1]) * counts[2] + grid[2]
    seeds = [(g + 0.25 + (_hash(np.clip(index, 0, None) * 3 + a) % np.uint64(1000)) / 2000.0)
             .astype(np.float32) for a, g in enumerate(grid)]
    for seed in seeds:
        seed[~inside] = np.inf  # no seed outside the volume
    best = np.full(box.shape, np.inf, np.float32)
    label = np.zeros(box.shape, np.uint64)
    local = [h - lo for h, lo in zip(home, low, strict=True)]
    for step in np.ndindex(3, 3, 3):
        at = np.ix_(*[loc + d - 1 for loc, d in zip(local, step, strict=True)])
        distance = sum((p.reshape([-1 if i == a else 1 for i in range(3)]) - seed[at]) ** 2
                       for a, (p, seed) in enumerate(zip(position, seeds, strict=True)))
        closer = distance < best
        best[closer] = distance[closer]
        label[closer] = np.broadcast_to(index[at], box.shape)[closer].astype(np.uint64) + 1
    return label


def _affinity_block(path: str, shape: tuple[int, ...], index: tuple[int, ...],
                    block: tuple[int, ...]) -> None:
    """Write the affinities of one block (its cells and a one-voxel margin below)."""
    grid = BlockGrid(box_of(shape), block)
    core = grid.box(index)
    below = Roi([max(0, b - 1) for b in core.begin],
                [e - max(0, b - 1) for b, e in zip(core.begin, core.end, strict=True)])
    labels = synthetic_cells(below, shape)
    inner = labels[tuple(slice(c - b, None) for c, b in zip(core.begin, below.begin,
                                                             strict=True))]
    rng = np.random.default_rng(int(np.ravel_multi_index(index, grid.counts)))
    affs = np.zeros((3, *core.shape), np.float32)
    for axis in range(3):
        if core.begin[axis] == 0:
            sl = [slice(None)] * 3
            sl[axis] = slice(1, None)
            prev = [slice(None)] * 3
            prev[axis] = slice(0, -1)
            affs[axis][tuple(sl)] = inner[tuple(sl)] == inner[tuple(prev)]
        else:
            prev = [slice(c - b, None) if a != axis else slice(0, -1)
                    for a, (c, b) in enumerate(zip(core.begin, below.begin, strict=True))]
            affs[axis] = inner == labels[tuple(prev)]
    noisy = np.clip(affs * 0.6 + 0.2 + rng.normal(0, 0.1, affs.shape), 0, 1)
    array = zarr.open_array(path, mode="r+")
    array[(slice(None), *slices(core))] = np.round(noisy * 255).astype(np.uint8)


def affinity_layout(shape: tuple[int, int, int], block: tuple[int, int, int]
                    ) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """(chunks, shards) of the affinities as `emrun infer` with ``--block`` ``block`` would
    store them (its layout's chunks, each a shard cut into inner chunks: `output_chunks`).
    Unsharded chunks of the whole block made the segmentation's 2 x 8 x 8 halo decode its 26
    neighbours' chunks whole, a cost the pipeline on infer's outputs no longer pays. Each
    shard lies inside one block, so the generating workers never share a file."""
    chunks, grown = choose_chunks_and_block(zyx(shape), zyx(block), zyx(block), None,
                                            zyx(block))
    layout = Layout(zyx(shape), grown, grown, chunks, grown)
    return output_chunks(len(OFFSETS), layout)


def make_affinities(folder: Path, shape: tuple[int, int, int], block: tuple[int, int, int],
                    workers: int) -> str:
    """The synthetic affinity volume ``folder/affs.zarr/affinity``, written block by block
    in the layout infer writes (`affinity_layout`)."""
    store = folder / "affs.zarr"
    chunks, shards = affinity_layout(shape, block)
    create_volume(store, "affinity", (3, *shape), np.uint8, chunks=chunks, shards=shards,
                  channel_axis=True, attrs={"offsets": [list(o) for o in OFFSETS]})
    path = str(store / "affinity" / "0")
    grid = BlockGrid(box_of(shape), block)
    jobs = [(path, shape, index, block) for index in grid.indices()]
    workers = min(workers, len(jobs), cpu_cores())  # untimed: more would only be spawned
    if workers > 1:  # an executor, not a Pool: a worker that dies stops it (a Pool would
        # start another forever, e.g. when a script calling this lacks a __main__ guard)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            try:
                list(pool.map(_affinity_block, *zip(*jobs, strict=True)))
            except BrokenProcessPool:
                raise RuntimeError(
                    "a worker generating the affinities died: killed for memory, or a script "
                    "calling make_affinities without an `if __name__ == '__main__':` guard "
                    "(workers are spawned and import the main module)") from None
    else:
        for job in jobs:
            _affinity_block(*job)
    return str(store / "affinity")


def check_size(shape: tuple[int, int, int], block: tuple[int, int, int], workers: int,
               folder: Path | None) -> None:
    """Refuse, in one line and before anything is made, a volume in more blocks than
    ``MAX_BLOCKS``, affinities that would not fit the disk of ``folder`` (the system's
    temporary folder if None) and blocks whose generation would not fit the memory with
    ``workers`` generating at once."""
    check_folder(folder)
    asked = f"--shape {' '.join(map(str, shape))} --block {' '.join(map(str, block))}"
    blocks = math.prod(math.ceil(n / b) for n, b in zip(shape, block, strict=True))
    if blocks > MAX_BLOCKS:
        raise UserError(f"{asked}: {blocks:,} blocks, more than the {MAX_BLOCKS:,} this "
                        "benchmark runs: give a larger --block or a smaller --shape")
    where = folder if folder is not None else Path(tempfile.gettempdir())
    disk, free = 3 * math.prod(shape), free_disk(where)
    if disk > free:
        raise UserError(f"{asked}: the synthetic affinities would need {size_text(disk)} of "
                        f"disk in {where} (3 uint8 channels, before compression); "
                        f"{size_text(free)} is free: give a smaller --shape or another --folder")
    block_voxels = math.prod(min(n, b) for n, b in zip(shape, block, strict=True))
    at_once = min(workers, blocks)
    memory, room = at_once * block_voxels * GENERATE_BYTES_PER_VOXEL, available_memory()
    if memory > room:
        raise UserError(f"{asked}: generating the affinities would need {size_text(memory)} "
                        f"of memory ({at_once} worker(s) with a block each); "
                        f"{size_text(room)} is free: give a smaller --block or fewer --workers")


def check_folder(folder: Path | None) -> None:
    """Refuse a --folder the run cannot use, naming it, before anything is made: a file
    ('cannot make a folder there (File exists)'), a folder inside a zarr volume (refused
    later as the run's own temporary store inside it, a path the user never gave)."""
    if folder is None:
        return
    check_work_folder(folder, "--folder")
    if (holder := volume_around(Path(folder) / "affs.zarr")) is not None:
        raise UserError(f"--folder {folder}: lies inside the volume {holder}; give a folder "
                        "outside it")


def bench_segment(shape: tuple[int, int, int], block: tuple[int, int, int],
                  workers: Sequence[int], threshold: float = 0.5,
                  folder: Path | None = None, agglomeration: str = "global"
                  ) -> dict[str, Any]:
    """Run the graph pipeline with each worker count; see the module docstring. A folder
    made for ``folder`` is removed again if the run fails."""
    from ..segment.job import run_segment
    from ..segment.request import SegmentRequest

    check_size(shape, block, max(workers), folder)
    voxels = math.prod(shape)
    scored = voxels <= SCORE_VOXELS and voxels * SCORE_BYTES_PER_VOXEL <= available_memory()
    with made_folder(folder, "--folder") as parent:
        tmp = Path(tempfile.mkdtemp(prefix="emrun-bench-segment-", dir=parent))
        stopped = False
        try:
            started = time.perf_counter()
            affs = make_affinities(tmp, shape, block, max(workers))
            generated = time.perf_counter() - started
            runs = []
            for n in workers:
                out = tmp / f"workers{n}.zarr"
                request = SegmentRequest(affinities=affs, output=out, scheduler="local",
                                         workers=n, block=block,
                                         values={"threshold": (threshold,)}, levels=1,
                                         agglomeration=agglomeration)
                started = time.perf_counter()
                result = run_segment(request)
                seconds = time.perf_counter() - started
                runs.append(_run_figures(result, n, seconds, voxels,
                                         _score(out, shape) if scored else None,
                                         busy_cores(n, shape, block)))
                remove_tree(out)
            base = runs[0]["rate"]
            for run in runs:  # from the rates before rounding: a tiny volume's round to 0
                run["scaling"] = round(run.pop("rate") / max(base, 1e-12), 3)
            chunks, shards = affinity_layout(shape, block)
            return {"shape": list(shape), "block": list(block), "threshold": threshold,
                    "chunks": list(chunks), "shards": None if shards is None else list(shards),
                    "agglomeration": agglomeration,
                    "voxels": voxels, "generate_s": round(generated, 1), "runs": runs,
                    "cores": cpu_cores(), "machine": f"{platform.node()} ({os.cpu_count()} "
                    f"CPUs, {platform.processor() or platform.machine()})"}
        except KeyboardInterrupt:
            stopped = True
            raise
        except Interrupted as stop:  # the pipeline's "--resume" advice: a benchmark has none
            stopped = True
            raise Interrupted(stop.signal_name, "bench segment stopped; its temporary "
                              "volumes are removed (nothing to resume: run it again)") from None
        finally:
            remove_tree(tmp, interrupted=stopped)


def busy_cores(workers: int, shape: tuple[int, int, int], block: tuple[int, int, int]) -> int:
    """The cores a run of ``workers`` can keep busy: no more than the blocks (a worker
    without a block is never started) nor the cores this process may use. The figures per
    core divide by it: dividing by ``--workers 1000`` on 2 cores and one block reported a
    thousandth of the rate."""
    blocks = math.prod(math.ceil(n / b) for n, b in zip(shape, block, strict=True))
    return max(1, min(workers, blocks, cpu_cores()))


def _run_figures(result: Any, workers: int, seconds: float, voxels: int,
                 arand: float | None, cores: int) -> dict[str, Any]:
    """One worker count's figures from `run_segment`'s result (``rate``: fragments + graph
    voxels per second per busy core, unrounded, for the scaling)."""
    t = result.timings or {}
    busy = sum(t[s].get(k, 0.0) for s in ("fragments", "graph") for k in t[s]
               if k not in ("seconds", "blocks"))
    steps = max(t["fragments"]["seconds"] + t["graph"]["seconds"], 1e-9)
    merged = t.get("merge") or t["agglomerate"]  # blockwise: the merge counts
    rate = voxels / steps / cores / 1e6
    return {
        "workers": workers, "busy_cores": cores, "seconds": round(seconds, 2),
        "steps": {s: t[s]["seconds"] for s in ("fragments", "graph", "agglomerate",
                                              "merge", "relabel", "pyramid") if s in t},
        "fragments_graph_mvox_per_s_per_core": round(rate, 3), "rate": rate,
        "database_share": round(t["graph"].get("database", 0.0) / max(busy, 1e-9), 3),
        "database_bytes_per_voxel": round((t.get("database_bytes") or 0) / voxels, 3),
        "nodes": merged.get("nodes"), "edges": merged.get("edges"),
        "segments": result.outputs[0]["segments"],
        "arand": arand,
    }


def _score(out: Path, shape: tuple[int, int, int]) -> float:
    from ..evaluate import score

    seg = zarr.open_array(str(out / "labels" / "segmentation" / "0"), mode="r")[...]
    return round(score(seg, synthetic_cells(box_of(shape), shape)).as_dict()["arand"], 4)


def _millions(count: float) -> str:
    """A count in millions, three significant figures below 10 M (a small volume's 65,536
    voxels are 0.0655 M, not 0 M)."""
    return f"{count / 1e6:,.0f}" if count >= 1e7 else f"{count / 1e6:.3g}"


def _layout_text(result: dict[str, Any]) -> str:
    """The affinities' storage, as infer writes it (a result without it: nothing)."""
    if "chunks" not in result:
        return ""
    chunks = "x".join(map(str, result["chunks"]))
    if result.get("shards") is None:
        return f" in unsharded chunks of {chunks}"
    return f" in shards of {'x'.join(map(str, result['shards']))} (inner chunks {chunks})"


def report_lines(result: dict[str, Any]) -> list[str]:
    shape = "x".join(map(str, result["shape"]))
    lines = [f"segment: {shape} synthetic affinities ({_millions(result['voxels'])} M voxels)"
             f"{_layout_text(result)}, "
             f"block {'x'.join(map(str, result['block']))}, threshold {result['threshold']:g}, "
             f"{result['agglomeration']} agglomeration; "
             f"{result['machine']}"]
    for run in result["runs"]:
        steps = ", ".join(f"{k} {v:.1f} s" for k, v in run["steps"].items())
        score = "" if run["arand"] is None else f", arand {run['arand']:.4f}"
        lines.append(
            f"  {run['workers']} worker{'s' if run['workers'] > 1 else ''}: {run['seconds']:.1f} s "
            f"({steps}); fragments + graph {run['fragments_graph_mvox_per_s_per_core']:.2f} "
            f"M voxels/s per core, scaling {run['scaling']:.2f}; database "
            f"{100 * run['database_share']:.0f} % of the workers' time, "
            f"{run['database_bytes_per_voxel']:.3f} bytes/voxel; {run['nodes']} fragments, "
            f"{run['edges']} edges, {run['segments']} segments{score}")
    return lines
