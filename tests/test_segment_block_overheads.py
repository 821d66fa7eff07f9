"""Per-block bookkeeping of `emrun segment --scheduler`: the boxes a block works on come from
integer arithmetic (not funlib boxes and a grid per block) and equal funlib's; daisy's
done-check reads the job and what is done once per step run, not once per block, and a
later run (a resume, or a new job at the same path) sees what is done now; the caches of
the blocks' steps do not carry one job's answers into the next. Synthetic cells made in
code."""

from __future__ import annotations

import itertools
import shutil
import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import zarr
from test_segment import affinities, cells, noisy
from typer.testing import CliRunner

from emrun.cli import app
from emrun.geometry import BlockGrid, Roi, box_of, grow_within
from emrun.io import write_volume
from emrun.segment.affinities import is_nearest
from emrun.segment.scale import schedulers, steps
from emrun.segment.scale.job import FOLDER, ScaleJob

runner = CliRunner()
NEAREST = ((-1, 0, 0), (0, -1, 0), (0, 0, -1))
SHAPE = (12, 40, 40)
BLOCK = ("6", "20", "20")  # 2 x 2 x 2 blocks


def _job(shape: tuple[int, int, int], block: tuple[int, int, int],
         offsets: tuple[tuple[int, int, int], ...] = NEAREST) -> ScaleJob:
    return ScaleJob(affinities="a.zarr/affinity", offsets=offsets, output="out.zarr",
                    shape=shape, block=block, fragments="watershed", thresholds=(0.5,),
                    scoring="mean", min_size=0, db="sqlite:///x.sqlite")


GRIDS = [((12, 40, 40), (6, 20, 20)), ((13, 41, 37), (6, 20, 16)), ((5, 7, 9), (2, 3, 4)),
         ((3, 3, 3), (8, 8, 8)), ((9, 30, 30), (1, 5, 7))]


@pytest.mark.parametrize(("shape", "block"), GRIDS)
def test_a_blocks_box_from_integers_is_the_grids(shape, block):
    job = _job(shape, block)
    grid = BlockGrid(box_of(shape), block)
    for index in grid.indices():
        assert job.box(index) == grid.box(index), index
    assert job.box((0, 0, job.counts[2])) == grid.box((0, 0, job.counts[2]))  # outside
    assert job.block_voxels == int(np.prod(block))


def _region_by_funlib(core: Roi, offsets: Any, total: Roi) -> Roi:
    """`graph_region` as it was written with funlib boxes (the definition)."""
    begin, end = list(core.begin), list(core.end)
    for offset in offsets:
        if is_nearest(offset):
            for axis, d in enumerate(offset):
                begin[axis] = min(begin[axis], core.begin[axis] + d)
                end[axis] = max(end[axis], core.end[axis] + d)
    return Roi(begin, [e - b for b, e in zip(begin, end, strict=True)]).intersect(total)


def _neighbourhood_by_funlib(job: ScaleJob, index: tuple[int, int, int]) -> tuple[Any, ...]:
    """`neighbourhood`'s box and blocks as they were made with funlib boxes and a grid."""
    grid = BlockGrid(box_of(job.shape), job.block)
    context = [int(np.ceil(b * steps.AGGLOMERATION_CONTEXT)) for b in job.block]
    region = grow_within(grid.box(index), context, grid.total)
    reach = [max(-(-c // b), 1) for c, b in zip(context, job.block, strict=True)]
    ranges = [range(max(i - r, 0), min(i + r, n - 1) + 1)
              for i, r, n in zip(index, reach, grid.counts, strict=True)]
    blocks = tuple(int(np.ravel_multi_index(i, tuple(grid.counts)))
                   for i in itertools.product(*ranges))
    return tuple(region.begin), tuple(region.end), blocks


@pytest.mark.parametrize(("shape", "block"), GRIDS)
@pytest.mark.parametrize("offsets", [NEAREST, ((1, 0, 0), (0, -1, 0), (0, 0, 1), (-3, 0, 0),
                                               (0, -9, 0))])
def test_graph_region_and_neighbourhood_are_funlibs_boxes(shape, block, offsets):
    job = _job(shape, block, offsets)
    for index in BlockGrid(box_of(shape), block).indices():
        core = job.box(index)
        assert steps.graph_region(core, offsets, shape) == \
            _region_by_funlib(core, offsets, box_of(shape)), index
        around = steps.neighbourhood(job, index)
        begin, end, blocks = _neighbourhood_by_funlib(job, index)
        assert (around.begin, around.end, around.blocks) == (begin, end, blocks), index
        assert all(type(v) is int for v in (*around.begin, *around.end, *around.blocks))
        first = job.block_id(index) * int(np.prod(block))
        assert (around.block, around.first, around.last) == \
            (job.block_id(index), first + 1, first + int(np.prod(block)))


# --- daisy's done-check, run through `_run_daisy` with a stand-in for daisy -------------


@pytest.fixture(scope="module")
def affs(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("overheads")
    truth = cells(SHAPE, n=6, seed=5)
    values = noisy(affinities(truth, NEAREST), 0.1, seed=2)
    write_volume(tmp / "in.zarr", "affinity", np.round(values * 255).astype(np.uint8),
                 channel_axis=True, attrs={"offsets": [list(o) for o in NEAREST]})
    return tmp / "in.zarr" / "affinity"


def _segment(affs: Path, out: Path, *extra: str) -> None:
    result = runner.invoke(app, ["segment", str(affs), str(out), "--scheduler", "local",
                                 "--block", *BLOCK, "--levels", "1", *extra])
    assert result.exit_code == 0, result.output


class _FakeDaisy:
    """What `_run_daisy` uses of daisy: each run asks its check function about every block
    (as daisy does before it hands one out) and processes none."""

    def __init__(self) -> None:
        self.asked: list[dict[tuple[int, int, int], bool]] = []
        self.tasks: list[Any] = []

    @staticmethod
    def Roi(offset: Any, shape: Any) -> Any:
        return SimpleNamespace(offset=tuple(offset), shape=tuple(shape))

    def Task(self, name: str, **kwargs: Any) -> Any:
        task = SimpleNamespace(task_id=name, **kwargs)
        self.tasks.append(task)
        return task

    def run_blockwise(self, tasks: list[Any], **_: Any) -> dict[str, Any]:
        (task,) = tasks
        shape, block = task.total_roi.shape, task.write_roi.shape
        answers = {}
        for index in itertools.product(*(range(-(-n // b)) for n, b in zip(shape, block,
                                                                             strict=True))):
            offset = tuple(i * b for i, b in zip(index, block, strict=True))
            roi = SimpleNamespace(write_roi=SimpleNamespace(offset=offset))
            answers[index] = bool(task.check_function(roi))
        self.asked.append(answers)
        return {}


@pytest.fixture
def fake_daisy(monkeypatch: pytest.MonkeyPatch) -> _FakeDaisy:
    fake = _FakeDaisy()
    monkeypatch.setattr(schedulers, "daisy_package", lambda: fake)
    return fake


def _parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every parse of a job file from now on."""
    calls: list[str] = []
    parse = ScaleJob.from_json.__func__  # type: ignore[attr-defined]

    def counted(cls: type[ScaleJob], text: str) -> ScaleJob:
        calls.append(text)
        return parse(cls, text)

    monkeypatch.setattr(ScaleJob, "from_json", classmethod(counted))
    return calls


@pytest.fixture(scope="module")
def segmented(affs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished job (the tests reading it change nothing)."""
    out = tmp_path_factory.mktemp("segmented") / "out.zarr"
    _segment(affs, out, "--threshold", "0.5")
    return out


@pytest.mark.parametrize("step", ["fragments", "graph", "relabel"])
def test_daisys_done_check_parses_the_job_file_once_per_run_not_per_block(
        segmented, fake_daisy, monkeypatch, step):
    job = ScaleJob.load(segmented / FOLDER / "job.json")
    parses = _parses(monkeypatch)
    schedulers._run_daisy(job, step, 1, None)
    assert fake_daisy.asked == [dict.fromkeys(itertools.product(range(2), repeat=3), True)]
    assert parses == []  # was one parse per block (8 here, 10^5 on a large job)


def _drop_graph_blocks(out: Path, blocks: list[int]) -> None:
    with sqlite3.connect(out / FOLDER / "graph.sqlite") as conn:
        conn.executemany("DELETE FROM blocks WHERE block = ?", [(b,) for b in blocks])


def test_a_later_run_in_the_same_process_sees_what_is_done_now(affs, tmp_path, fake_daisy):
    """Each run of a step reads what is done once; the next run (a resume, here in the same
    process and without `forget_caches`) reads it again: the graph's done blocks were kept
    by job file for the process's life, so blocks undone since were taken as done."""
    out = tmp_path / "out.zarr"
    _segment(affs, out, "--threshold", "0.5")
    job = ScaleJob.load(out / FOLDER / "job.json")
    marker = f"relabel-{steps.lut_key(job)}"
    for step in ("graph", "fragments", "relabel"):
        schedulers._run_daisy(job, step, 1, None)
    assert all(all(run.values()) for run in fake_daisy.asked)
    _drop_graph_blocks(out, [0, 7])
    (job.marker("fragments", (0, 1, 0))).unlink()
    (job.marker(marker, (1, 0, 1))).unlink()
    fake_daisy.asked.clear()
    for step in ("graph", "fragments", "relabel"):
        schedulers._run_daisy(job, step, 1, None)
    undone = [sorted(i for i, done in run.items() if not done) for run in fake_daisy.asked]
    assert undone == [[(0, 0, 0), (1, 1, 1)], [(0, 1, 0)], [(1, 0, 1)]]


def test_a_stop_hands_out_no_block_even_after_the_done_blocks_were_read(
        affs, tmp_path, fake_daisy):
    out = tmp_path / "out.zarr"
    _segment(affs, out, "--threshold", "0.5")
    job = ScaleJob.load(out / FOLDER / "job.json")
    (job.marker("fragments", (0, 0, 0))).unlink()
    check = schedulers.DoneCheck(job, "fragments")
    block = SimpleNamespace(write_roi=SimpleNamespace(offset=(0, 0, 0)))
    assert not check(block)
    (job.folder / "stop").touch()
    assert check(block)


def test_two_jobs_at_one_path_in_one_process_segment_as_in_fresh_processes(affs, tmp_path):
    """A new job where another was (its output deleted), in this process with blocks run
    here: it writes what a job at another path writes, bit for bit (the relabel step's
    tables, keys and finished-volume checks kept per process must be the new job's)."""
    out, fresh = tmp_path / "out.zarr", tmp_path / "fresh.zarr"

    def labels(store: Path, name: str) -> np.ndarray:
        return zarr.open_array(str(store / "labels" / name / "0"), mode="r")[...]

    _segment(affs, out, "--threshold", "0.2")
    first = labels(out, "segmentation")
    shutil.rmtree(out)
    _segment(affs, out, "--threshold", "0.8")
    _segment(affs, fresh, "--threshold", "0.8,0.2")
    assert np.array_equal(labels(out, "segmentation"), labels(fresh, "segmentation_0.8"))
    assert np.array_equal(first, labels(fresh, "segmentation_0.2"))
    assert not np.array_equal(first, labels(fresh, "segmentation_0.8"))
