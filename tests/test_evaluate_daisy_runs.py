"""daisy hands out runs of blocks (`Work.run_box`, `Work.run_at`), not single blocks: with
blocks thinner than the chunks, every daisy worker took some blocks of each region and
decoded that region's chunks again; a run is now one daisy block, so each region's chunks
are decoded once across all workers, and the scores stay those of one process."""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from emrun.evaluate import Parallel, score_volumes
from emrun.evaluate.blockwise import prepare
from emrun.evaluate.schedule import _Observer, score_blocks
from emrun.geometry import BlockGrid, Roi, box_of
from emrun.io import open_volume, write_volume
from emrun.io.volume import Volume

CHUNKS = (8, 32, 32)


def _volumes(folder: Path, shape: tuple[int, int, int]) -> list:
    rng = np.random.default_rng(5)
    truth = rng.integers(0, 4, [-(-n // 4) for n in shape]).repeat(4, 0).repeat(4, 1)
    truth = truth.repeat(4, 2)[: shape[0], : shape[1], : shape[2]].astype(np.uint32)
    seg = ((truth.astype(np.uint64) * 5 + (rng.random(shape) < 0.2)) % 7).astype(np.uint64)
    write_volume(folder / "v.zarr", "truth", truth, chunks=CHUNKS)
    write_volume(folder / "v.zarr", "seg", seg, chunks=CHUNKS)
    return [open_volume(str(folder / "v.zarr" / name)) for name in ("seg", "truth")]


@pytest.mark.parametrize("block", [(4, 32, 32), (3, 10, 12), (8, 16, 64), (16, 64, 64),
                                   (5, 7, 3), (2, 64, 48)])
def test_the_run_box_grid_hands_out_exactly_the_runs(tmp_path, block):
    """Each box of the run-box grid (cut at the volume's end, as daisy's fit='shrink'
    does) holds the blocks of one run, and the boxes together hold every run once."""
    work = prepare(_volumes(tmp_path, (13, 50, 45)), block)
    boxes = BlockGrid(box_of(work.shape), work.run_box)
    handed = [work.run_at(box) for box in boxes.boxes()]
    assert sorted(map(tuple, handed)) == sorted(map(tuple, work.runs()))
    assert all(handed)


def test_the_observer_counts_blocks_when_daisy_counts_runs():
    """daisy's completed count is of runs; the progress goes 1..blocks in steps of one,
    reaching the total with the last run."""
    calls: list[tuple[int, int]] = []
    observer = _Observer(lambda done, total: calls.append((done, total)), 10)

    class State:
        total_block_count = 3

        def __init__(self, completed: int) -> None:
            self.completed_count = completed

    for completed in (0, 1, 1, 2, 3):
        observer.on_progress({"task": State(completed)})
    assert calls == [(n, 10) for n in range(1, 11)]


@dataclass(frozen=True, kw_only=True)
class LoggedReads(Volume):
    """A volume that logs each read (a line of JSON to ``log``), in whatever process reads
    it: daisy's workers are subprocesses that unpickle the work (this module on their
    PYTHONPATH)."""

    inner: Volume
    log: str

    def _read(self, roi: Roi) -> np.ndarray:
        with open(self.log, "a") as out:
            out.write(json.dumps([str(self.dataset), list(roi.begin), list(roi.end)]) + "\n")
        return self.inner.read(roi)

    @property
    def chunks(self) -> tuple[int, ...] | None:
        return self.inner.chunks


def test_daisy_workers_decode_each_region_once_and_score_like_one_process(
        tmp_path, monkeypatch):
    """Two daisy workers scoring blocks 4 voxels thick in chunks 8 thick: each chunk read
    once in all (handed out one by one, twice: each worker took half of a region's
    blocks), progress in blocks, and the scores of one process."""
    pytest.importorskip("daisy")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    volumes = _volumes(tmp_path, (16, 64, 64))
    log = tmp_path / "reads.log"
    logged = [LoggedReads(inner=v, path=v.path, dataset=v.dataset, shape=v.shape,
                          dtype=v.dtype, log=str(log)) for v in volumes]
    calls: list[tuple[int, int]] = []
    work = prepare(logged, (4, 16, 32))
    score_blocks(work, Parallel(scheduler="daisy", workers=2, work_dir=str(tmp_path / "w")),
                 lambda done, total: calls.append((done, total)))
    decodes: Counter[tuple[str, tuple[int, ...]]] = Counter()
    for line in log.read_text().splitlines():
        name, begin, end = json.loads(line)
        ranges = [range(b // c, -(-e // c)) for b, e, c in zip(begin, end, CHUNKS, strict=True)]
        decodes.update((name, i) for i in itertools.product(*ranges))
    assert len(decodes) == 2 * 2 * 2 * 2  # both volumes' 8 chunks were read
    assert set(decodes.values()) == {1}
    total = len(work.grid)
    assert calls == [(n, total) for n in range(1, total + 1)]
    assert score_volumes(*volumes, parallel=Parallel(
        scheduler="daisy", workers=2, block=(4, 16, 32), work_dir=str(tmp_path / "w"))
    ) == score_volumes(*volumes)
