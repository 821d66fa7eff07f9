"""Segmentation and evaluation at scale: what a job's cost grows with. Per-block work must not
grow with the number of blocks (no pass over all blocks kept, no array opened again for each
block), no more workers start than there are blocks, and numba's cached loops are rebuilt when
a file compiled into them changes. Operations are counted, never timed."""

from __future__ import annotations

import types
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from test_segment import affinities, arand, cells, noisy
from typer.testing import CliRunner

from emrun.cli import app
from emrun.io import write_volume
from emrun.segment.scale import graphdb, schedulers, steps
from emrun.segment.scale.graphdb import GraphStore, Neighbourhood
from emrun.segment.scale.job import ScaleJob
from emrun.segment.scale.rag import BINS, BlockGraph

runner = CliRunner()
NEAREST = ((-1, 0, 0), (0, -1, 0), (0, 0, -1))


def test_a_local_pool_starts_no_more_workers_than_blocks():
    with schedulers.local_pool("local", 8, 2) as pool:
        assert pool is not None and pool._max_workers == 2  # started on demand, up to this
    with schedulers.local_pool("local", 8, 1) as pool:
        assert pool is None  # one block: done in this process, no worker to import emrun
    with schedulers.local_pool("local", 3, 50) as pool:
        assert pool is not None and pool._max_workers == 3


def _job(tmp: Path) -> ScaleJob:
    return ScaleJob(affinities=str(tmp / "a.zarr/affinity"), offsets=NEAREST,
                    output=str(tmp / "out.zarr"), shape=(8, 64, 64), block=(8, 32, 32),
                    fragments="watershed", thresholds=(0.5,), scoring="mean", min_size=0,
                    db=f"sqlite:///{tmp / 'g.sqlite'}")


def test_daisy_steps_ask_no_more_workers_than_blocks_and_none_without_blocks(tmp_path,
                                                                               monkeypatch):
    runs: list[tuple[str, int]] = []
    monkeypatch.setattr(schedulers, "_run_daisy",
                        lambda job, step, workers, launch: runs.append((step, workers)))
    job = _job(tmp_path)
    for blocks in ([(0, 0, 0), (0, 0, 1)], []):
        schedulers.run_step(job, "fragments", blocks, scheduler="daisy", workers=8,
                            launch=None, pool=None, on_block=None)
    assert runs == [("fragments", 2)]  # a resume with nothing to do starts no daisy run


def test_evaluation_on_daisy_asks_no_more_workers_than_blocks(tmp_path, monkeypatch):
    from emrun.evaluate import schedule
    from emrun.evaluate.blockwise import prepare
    from emrun.io import open_volume

    labels = np.arange(1, 1 + 4 * 8 * 8, dtype=np.uint32).reshape(4, 8, 8)
    write_volume(tmp_path / "v.zarr", "seg", labels, chunks=(4, 8, 4))
    volume = open_volume(str(tmp_path / "v.zarr/seg"))
    work = prepare([volume, volume], (4, 8, 4))
    assert len(work.grid) == len(work.runs()) == 2  # a block per chunk: runs of one
    asked: dict[str, Any] = {}

    def task(name: str, **options: Any) -> str:
        asked.update(options)
        return name

    fake = types.SimpleNamespace(Roi=lambda *a: a, Task=task,
                                 run_blockwise=lambda *a, **k: {})
    monkeypatch.setattr(schedule, "daisy_package", lambda: fake)
    with pytest.raises(RuntimeError, match="not scored"):  # the fake scores nothing
        schedule._run_daisy(tmp_path, work, 8, None, None)
    assert asked["max_workers"] == 2


class _CountingZarr:
    """The zarr module, counting `open_array` calls."""

    def __init__(self) -> None:
        self.opened = 0

    def open_array(self, *args: Any, **kwargs: Any) -> zarr.Array:
        self.opened += 1
        return zarr.open_array(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(zarr, name)


def test_blocks_open_the_output_arrays_once_per_process(tmp_path, monkeypatch):
    """Opening an array reads and parses its metadata (3-4 ms): it was done for every block
    of the fragments, graph and relabel steps, 16 % of a job of 1,024 small blocks."""
    truth = cells((8, 64, 64), n=12, seed=2)
    affs = noisy(affinities(truth, NEAREST), 0.05, seed=1)
    write_volume(tmp_path / "in.zarr", "affinity", np.round(affs * 255).astype(np.uint8),
                 channel_axis=True, attrs={"offsets": [list(o) for o in NEAREST]})
    counting = _CountingZarr()
    monkeypatch.setattr(steps, "zarr", counting)
    out = tmp_path / "seg.zarr"
    result = runner.invoke(app, ["segment", str(tmp_path / "in.zarr/affinity"), str(out),
                                 "--scheduler", "local", "--workers", "1", "--block", "4",
                                 "32", "32", "--threshold", "0.5"])
    assert result.exit_code == 0, result.output
    assert counting.opened <= 3  # fragments to write, to read; the segmentation (8 blocks)
    seg = zarr.open_array(str(out / "labels/segmentation/0"), mode="r")[...]
    assert arand(seg, truth) < 1e-3  # the arrays kept open wrote every block


class _CountingCache(OrderedDict):
    """The blocks' rows a store keeps, counting the entries any pass over all of them reads."""

    passed = 0

    def values(self):  # type: ignore[override]
        _CountingCache.passed += len(self)
        return super().values()


def _graph_of(block: int) -> BlockGraph:
    """Two fragments per block, joined, and joined to the next block's first."""
    ids = np.array([10 * block + 1, 10 * block + 2], np.uint64)
    u = np.array([10 * block + 1, 10 * block + 2], np.uint64)
    v = np.array([10 * block + 2, 10 * block + 11], np.uint64)
    return BlockGraph(ids, np.array([5, 5]), np.array([[block, 0, 0], [block, 0, 1]], float),
                      u, v, np.array([0.9, 0.4]), np.array([1, 1]),
                      np.zeros((2, BINS), np.uint32))


def test_a_workers_kept_rows_are_not_summed_again_for_each_block(tmp_path):
    """Blockwise agglomeration: a worker keeps the rows of the blocks it read (up to 1 GiB),
    and summed the bytes of all of them at each block: O(n^2) for n blocks, 10^10 steps for
    the 10^5 blocks of a teravoxel."""
    store = GraphStore(f"sqlite:///{tmp_path / 'g.sqlite'}")
    store.create("digest")
    n = 60
    for block in range(n):
        store.write_block(block, _graph_of(block))
    store._cache = _CountingCache()
    for block in range(n):
        around = Neighbourhood(block, 10 * block + 1, 10 * block + 9, (block, 0, 0),
                               (block + 1, 1, 2),
                               tuple(range(max(block - 1, 0), min(block + 2, n))))
        graph = store.read_region(around, histograms=False).graph
        own = [10 * block + 1, 10 * block + 2]
        assert set(own) <= set(graph.ids.tolist())
    assert _CountingCache.passed <= 3 * n  # linear; it was 1,830 here
    assert store._held == sum(a.nbytes + b.nbytes for a, b in store._cache.values())
    store.dispose()


def test_rows_split_by_block_keep_their_order():
    rows = np.array([(5, 2), (1, 1), (4, 2), (2, 1), (3, 3)],
                    dtype=[("id", "<i8"), ("block", "<i8")])
    parts = graphdb._by_block(rows, [2, 7, 1])
    assert [p["id"].tolist() for p in parts] == [[5, 4], [], [1, 2]]
    assert all(p.base is None for p in parts)  # copies: each block's bytes its own


def test_a_plan_lists_each_steps_markers_once_rather_than_asking_each_block(tmp_path,
                                                                            monkeypatch):
    """The blocks still to do were found by a stat of each block's marker: 40 us a block
    here, more on a network file system, for each step of every run and resume."""
    import os

    job = _job(tmp_path)
    indices = [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)]
    for index in indices[1:3]:
        job.mark_done("fragments", index)
    stats = []
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda *a, **k: stats.append(a) or real_stat(*a, **k))
    assert job.undone("fragments", indices) == [(0, 0, 0), (0, 1, 1)]
    assert job.undone("relabel-x", indices) == indices  # no marker folder yet
    assert stats == []


def test_a_blocks_number_builds_no_grid(tmp_path, monkeypatch):
    """`block_id` runs for every block of a plan: it built a grid of coordinates each time
    (44 us; 4 s per step for 10^5 blocks)."""
    from emrun.segment.scale import job as job_module

    job = ScaleJob(affinities="a", offsets=NEAREST, output=str(tmp_path), shape=(70, 300, 90),
                   block=(32, 256, 64), fragments="watershed", thresholds=(0.5,),
                   scoring="mean", min_size=0, db="sqlite:///g")
    indices = [tuple(int(i) for i in index) for index in job.grid.indices()]
    built = []
    monkeypatch.setattr(job_module, "BlockGrid", lambda *a: built.append(a))
    assert [job.block_id(index) for index in indices] == list(range(3 * 2 * 2))
    assert built == []


def test_evaluation_finds_its_missing_blocks_in_one_listing(tmp_path, monkeypatch):
    import os

    from emrun.evaluate import blockwise
    from emrun.io import open_volume

    write_volume(tmp_path / "v.zarr", "seg", np.ones((4, 8, 8), np.uint32))
    volume = open_volume(str(tmp_path / "v.zarr/seg"))
    work = blockwise.prepare([volume, volume], (2, 4, 4))
    folder = tmp_path / "work"
    folder.mkdir()
    for index in (0, 3, 7):
        blockwise.write_block(folder, work, index)
    stats = []
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda *a, **k: stats.append(a) or real_stat(*a, **k))
    assert blockwise.missing_blocks(folder, work) == [1, 2, 4, 5, 6]
    assert stats == []
