"""Probe of blockwise evaluation's local workers handed a region's blocks together
(`Work.runs`, `Work.order`, `Regions`, `schedule._run_local`): every block shape (thin along
one, two or three axes, not dividing the chunks), worker count, --connected-truth and
--binary with a mask gives the streamed (one-process) scores; progress counts each block
once; a worker's unreadable chunk is one UserError and leaves no work folder."""

from __future__ import annotations

import itertools
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import zarr

from emrun.errors import UserError
from emrun.evaluate import Parallel, binary_scores_volumes, score_volumes
from emrun.evaluate.blockwise import Regions, prepare
from emrun.evaluate.schedule import PREFIX, score_blocks
from emrun.io import open_volume, write_volume

CHUNKS = (8, 32, 32)
EVEN = (16, 64, 64)  # 2 x 2 x 2 chunks
ODD = (13, 50, 45)  # not a multiple of the chunk along any axis
NAMES = ("seg", "truth", "mask", "pred")

# z-thin, y-thin, z+y-thin, thin along all three, not dividing the chunks, thin in z and
# larger than the chunks (not a multiple) in x
BLOCKS = [(4, 32, 32), (8, 16, 32), (4, 16, 32), (4, 16, 16), (3, 10, 12), (2, 64, 48)]


def _arrays(shape: tuple[int, int, int], seed: int) -> dict[str, np.ndarray]:
    """A blocky truth whose objects cross block faces (and leave and re-enter blocks: pieces
    for --connected-truth), a segmentation that splits and merges it, a mask, a
    probability map."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 5, [-(-n // s) for n, s in zip(shape, (2, 5, 5), strict=True)])
    truth = coarse.repeat(2, 0).repeat(5, 1).repeat(5, 2)[: shape[0], : shape[1], : shape[2]]
    truth = truth.astype(np.uint32)
    flip = rng.random(shape) < 0.1
    truth[flip] = rng.integers(0, 5, int(flip.sum()))
    seg = ((truth.astype(np.uint64) * 3 + (rng.random(shape) < 0.15)) % 9).astype(np.uint64)
    seg[:, shape[1] // 3: shape[1] // 2] = 4  # a merge across objects
    return {"truth": truth, "seg": seg,
            "mask": (rng.random(shape) < 0.85).astype(np.uint8),
            "pred": rng.integers(0, 256, shape).astype(np.uint8)}


def _write(folder: Path, shape: tuple[int, int, int], seed: int) -> dict[str, str]:
    for name, array in _arrays(shape, seed).items():
        write_volume(folder / "v.zarr", name, array, chunks=CHUNKS)
    return {name: str(folder / "v.zarr" / name) for name in NAMES}


@pytest.fixture(scope="module")
def even(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return _write(tmp_path_factory.mktemp("even"), EVEN, 3)


@pytest.fixture(scope="module")
def odd(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return _write(tmp_path_factory.mktemp("odd"), ODD, 4)


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the runs' work folders go (tempfile's default folder), to see them go."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _opened(paths: dict[str, str], *names: str) -> list:
    return [open_volume(paths[name]) for name in names]


def _runs_check(paths: dict[str, str], block: tuple[int, int, int]) -> None:
    work = prepare(_opened(paths, "seg", "truth"), block)
    total = len(work.grid)
    runs = work.runs()
    order = work.order()
    assert [i for run in runs for i in run] == order
    assert sorted(order) == list(range(total))  # every block exactly once
    assert all(run for run in runs)
    counts = tuple(int(c) for c in work.grid.counts)
    chunked = [b < min(c, n) for b, c, n in zip(work.block, CHUNKS, work.shape, strict=True)]
    thin = any(chunked)
    assert thin == any(isinstance(v, Regions) for v in work.volumes)

    def region(index: int) -> tuple[int, ...]:
        where = np.unravel_index(index, counts)
        return tuple(int(w) * b // (c if t else 1) for w, b, c, t in zip(
            where, work.block, CHUNKS, chunked, strict=True))

    keys = [region(run[0]) for run in runs]
    for run in runs:
        assert {region(i) for i in run} == {region(run[0])}  # one region per run
        assert run == sorted(run)  # raster order within a region
    assert len(set(keys)) == len(keys)  # a region's blocks in one run only
    assert keys == sorted(keys)  # regions in raster order
    if not thin:
        assert runs == [[i] for i in range(total)]


@pytest.mark.parametrize("block", [*BLOCKS, (8, 32, 32), (16, 64, 64), (1, 1, 64), (5, 7, 3),
                                   (9, 33, 31)])
def test_runs_cover_every_block_once_a_region_at_a_time(even, odd, block):
    _runs_check(even, block)
    _runs_check(odd, block)


def _streamed(paths: dict[str, str]) -> dict[str, object]:
    seg, truth, mask, pred = _opened(paths, *NAMES)
    return {"plain": score_volumes(seg, truth, mask, min_overlap=3),
            "connected": score_volumes(seg, truth, mask, min_overlap=3, connected_truth=True),
            "nomask": score_volumes(seg, truth, min_overlap=3, connected_truth=True),
            "binary": binary_scores_volumes(pred, truth, mask, threshold=0.4)}


def _in_blocks(paths: dict[str, str], what: str, parallel: Parallel,
               seen: list[tuple[int, int]]) -> object:
    seg, truth, mask, pred = _opened(paths, *NAMES)

    def on_slab(done: int, total: int) -> None:
        seen.append((done, total))

    if what == "binary":
        return binary_scores_volumes(pred, truth, mask, threshold=0.4, parallel=parallel,
                                     on_slab=on_slab)
    return score_volumes(seg, truth, None if what == "nomask" else mask, min_overlap=3,
                         connected_truth=what != "plain", parallel=parallel, on_slab=on_slab)


def _blocks_of(paths: dict[str, str], block: tuple[int, int, int]) -> int:
    shape = open_volume(paths["seg"]).shape
    return int(np.prod([-(-n // min(b, n)) for n, b in zip(shape, block, strict=True)]))


@pytest.fixture(scope="module")
def streamed(even, odd) -> dict[str, dict[str, object]]:
    return {"even": _streamed(even), "odd": _streamed(odd)}


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("which", ["even", "odd"])
def test_one_worker_scores_every_block_shape_like_one_process(which, block, even, odd,
                                                              streamed, private_tmp):
    paths = even if which == "even" else odd
    expected = streamed[which]
    for what in expected:
        seen: list[tuple[int, int]] = []
        got = _in_blocks(paths, what, Parallel(workers=1, block=block), seen)
        assert got == expected[what], (block, what)
        total = _blocks_of(paths, block)
        assert seen == [(n, total) for n in range(1, total + 1)], (block, what)
    assert list(private_tmp.iterdir()) == []


@pytest.mark.parametrize(("workers", "which", "block", "what"), [
    (2, "even", (4, 16, 16), "connected"),  # 8 regions, 2 workers: a region per task
    (3, "odd", (3, 10, 12), "connected"),  # blocks not dividing the chunks, odd volume
    (3, "even", (8, 16, 32), "binary"),  # thin along one axis, binary with a mask
    (2, "odd", (4, 16, 32), "nomask"),  # thin along two axes, no mask
    (3, "even", (2, 64, 64), "plain"),  # 2 regions < 3 workers: blocks one by one
])
def test_worker_processes_score_like_one_process_and_count_each_block(
        even, odd, private_tmp, workers, which, block, what):
    paths = even if which == "even" else odd
    seg, truth, mask, pred = _opened(paths, *NAMES)
    if what == "binary":
        expected = binary_scores_volumes(pred, truth, mask, threshold=0.4)
    else:
        expected = score_volumes(seg, truth, None if what == "nomask" else mask,
                                 min_overlap=3, connected_truth=what != "plain")
    seen: list[tuple[int, int]] = []
    got = _in_blocks(paths, what, Parallel(workers=workers, block=block), seen)
    assert got == expected
    total = _blocks_of(paths, block)
    assert seen == [(n, total) for n in range(1, total + 1)]
    assert list(private_tmp.iterdir()) == []


def test_score_blocks_progress_through_the_api(even, private_tmp):
    """score_blocks' on_block: once per block, done 1..total, total right, whether the runs
    go to workers whole (4 runs, 2 workers), one by one (2 runs, 3 workers), or all here
    (more workers than blocks)."""
    for workers, block in ((2, (8, 16, 64)), (3, (4, 64, 64)), (4, (16, 64, 64))):
        work = prepare(_opened(even, "seg", "truth"), block)
        calls: list[tuple[int, int]] = []
        score_blocks(work, Parallel(workers=workers), lambda d, t, c=calls: c.append((d, t)))
        total = len(work.grid)
        assert calls == [(n, total) for n in range(1, total + 1)], (workers, block)
        assert Counter(t for _, t in calls) == {total: total}
    assert list(private_tmp.iterdir()) == []


def _corrupt(folder: Path, name: str) -> Path:
    """Overwrite one chunk file of ``name`` with garbage."""
    chunk = next(p for p in sorted(folder.rglob("*"))
                 if p.is_file() and name in p.parts and "c" in p.parts)
    chunk.write_bytes(b"not a chunk")
    return chunk


@pytest.mark.parametrize(("workers", "block", "connected_truth"), [
    (2, (4, 16, 16), False),  # 8 runs of 8 blocks
    (3, (2, 64, 64), True),  # 2 runs < 3 workers: blocks one by one, several may fail
])
def test_an_unreadable_chunk_in_a_worker_is_one_user_error_and_no_work_folder(
        tmp_path, private_tmp, workers, block, connected_truth):
    paths = _write(tmp_path, EVEN, 5)
    _corrupt(tmp_path / "v.zarr", "truth")
    seg, truth = _opened(paths, "seg", "truth")
    seen: list[tuple[int, int]] = []
    with pytest.raises(UserError) as caught:
        score_volumes(seg, truth, connected_truth=connected_truth,
                      parallel=Parallel(workers=workers, block=block),
                      on_slab=lambda d, t: seen.append((d, t)))
    message = str(caught.value)
    assert "v.zarr/truth" in message and len(message.splitlines()) == 1, message
    assert "reading" in message
    assert not [p for p in private_tmp.iterdir() if p.name.startswith(PREFIX)]
    assert list(private_tmp.iterdir()) == []
    total = _blocks_of(paths, block)
    assert len(seen) < total and seen == [(n, total) for n in range(1, len(seen) + 1)]


def test_mixed_chunks_small_axes_and_sections_in_thin_blocks(tmp_path, private_tmp):
    """Volumes chunked differently (the largest chunk per axis makes the regions), a volume
    smaller than a chunk along z and y, and a 2-d image: one worker and two give the
    streamed scores, --connected-truth and binary with a mask included."""
    arrays = _arrays((5, 20, 70), 6)
    sections = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    for name, chunks in (("seg", (8, 32, 32)), ("truth", (4, 8, 16)), ("mask", (2, 64, 8)),
                         ("pred", (8, 32, 32))):
        write_volume(tmp_path / "v.zarr", name, arrays[name], chunks=chunks)
        two = sections.create_array(name, shape=arrays[name].shape[1:],
                                    dtype=arrays[name].dtype, chunks=chunks[1:])
        two[...] = arrays[name][2]
    for store, block in (("v.zarr", (2, 7, 16)), ("s.zarr", (1, 6, 9))):
        paths = {name: str(tmp_path / store / name) for name in NAMES}
        work = prepare(_opened(paths, "seg", "truth"), block)
        assert any(isinstance(v, Regions) for v in work.volumes)
        _runs_check_any(work)
        expected = _streamed(paths)
        for workers, what in ((1, "connected"), (1, "binary"), (1, "plain"),
                              (2, "connected")):
            seen: list[tuple[int, int]] = []
            got = _in_blocks(paths, what, Parallel(workers=workers, block=block), seen)
            assert got == expected[what], (store, workers, what)
            total = len(work.grid)
            assert seen == [(n, total) for n in range(1, total + 1)]
    assert list(private_tmp.iterdir()) == []


def _runs_check_any(work) -> None:
    runs = work.runs()
    assert sorted(i for run in runs for i in run) == list(range(len(work.grid)))
    assert [i for run in runs for i in run] == work.order()


def test_a_larger_truth_and_mask_read_where_the_segmentation_sits_in_thin_blocks(
        tmp_path, private_tmp):
    """A truth and mask larger than the segmentation (read through their placed part, off
    the chunk grid by 3 voxels in z and 5 in y): thin blocks, one worker and two, give the
    streamed scores."""
    arrays = _arrays((20, 72, 64), 7)
    for name in ("truth", "mask"):
        write_volume(tmp_path / "t.zarr", name, arrays[name], voxel_size=(30, 6, 6),
                     chunks=CHUNKS)
    write_volume(tmp_path / "s.zarr", "seg", arrays["seg"][3:19, 5:69],
                 voxel_size=(30, 6, 6), offset=(3, 5, 0), chunks=CHUNKS)
    seg, truth, mask = (open_volume(tmp_path / p) for p in ("s.zarr/seg", "t.zarr/truth",
                                                           "t.zarr/mask"))
    for connected in (False, True):
        expected = score_volumes(seg, truth, mask, connected_truth=connected)
        for workers in (1, 2):
            assert score_volumes(seg, truth, mask, connected_truth=connected,
                                 parallel=Parallel(workers=workers, block=(4, 16, 16))
                                 ) == expected, (connected, workers)
    assert list(private_tmp.iterdir()) == []


def test_cli_an_unreadable_mask_chunk_in_thin_blocks_is_one_line_exit_2(tmp_path,
                                                                        private_tmp):
    """Through the command: 3 workers, blocks thin along every axis (8 runs), a mask chunk
    that cannot be decoded: exit 2, one error line naming the mask, no traceback, no work folder
    left in --work-dir."""
    from typer.testing import CliRunner

    from emrun.cli import app

    paths = _write(tmp_path, EVEN, 8)
    _corrupt(tmp_path / "v.zarr", "mask")
    work = tmp_path / "work"
    result = CliRunner().invoke(app, [
        "evaluate", paths["seg"], paths["truth"], "--mask", paths["mask"], "--workers", "3",
        "--block", "4", "16", "16", "--work-dir", str(work)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()  # progress lines may come first
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1] and "v.zarr/mask" in errors[0], lines
    assert "Traceback" not in result.output
    assert list(work.iterdir()) == []


@pytest.mark.parametrize("block", [(3, 10, 12), (6, 16, 16)])
def test_a_run_of_blocks_not_dividing_the_chunks_decodes_each_chunk_once(
        even, tmp_path, monkeypatch, block):
    """A run (`Work.runs`: one worker task) is one region's blocks, so that the worker
    decodes the region's chunks once (schedule._run_local: "its chunks decoded by one worker
    once"). With blocks that do not divide the chunks (3 x 10 x 12 in 8 x 32 x 32) the run of
    region (0, 0, 0) decoded chunk (0, 0, 0) of each volume 8 times (6 x 16 x 16: twice):
    the blocks reaching past the chunk's edge each read their own, larger, region."""
    from emrun.evaluate import blockwise, schedule
    from emrun.evaluate.blockwise import save_work
    from emrun.io.zarr_volume import ZarrVolume

    decodes: Counter[tuple[str, tuple[int, ...]]] = Counter()
    real = ZarrVolume._read

    def counting(self, roi):
        ranges = [range(b // c, -(-e // c)) for b, e, c in zip(roi.begin, roi.end, CHUNKS,
                                                                 strict=True)]
        decodes.update((str(self.dataset), i) for i in itertools.product(*ranges))
        return real(self, roi)

    monkeypatch.setattr(ZarrVolume, "_read", counting)
    work = prepare(_opened(even, "seg", "truth"), block)
    save_work(tmp_path, work)
    most = []
    try:
        for run in work.runs():  # each as a fresh worker process takes it
            blockwise.load_work.cache_clear()
            decodes.clear()
            schedule._score_here(str(tmp_path), run)
            most.append(max(decodes.values()))
    finally:
        blockwise.load_work.cache_clear()
    assert most == [1] * len(most)
