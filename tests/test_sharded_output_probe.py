"""Probes of inference's sharded outputs beyond tests/test_sharded_output.py: edge shards of a
volume that is no whole number of shards or inner chunks, blocks that are no multiple of the
inner chunk, 1, 3 and 12 channels, uint8 / float16 / float32, a sharded pyramid, two worker
processes, and a resumption after a block was written in part. Every sharded output is
compared bit for bit with the unsharded output of the same run, and every write is checked
to cover whole shards only (a write into part of a shard rewrites its file: two writers of
one shard lose each other's chunks)."""

from __future__ import annotations

import itertools
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from test_infer import OFFSETS, make_inputs, make_recipe
from test_sharded_output import sharded_channels

from emrun.geometry import Roi
from emrun.infer import job as job_module
from emrun.infer.job import output_chunks
from emrun.infer.plan import Layout
from emrun.infer.run import run_inference
from emrun.io import pyramid
from emrun.io import write as write_module
from emrun.io.pyramid import write_chunks
from emrun.io.write import build_pyramid, create_volume, shard_chunks, write_volume
from emrun.recipe import Recipe

SHAPE = (16, 80, 80)
SMALL_INNER = (4, 16, 16)  # stands for INNER_ZYX, so that a small volume's shards are cut


class Stop(Exception):
    """Stands for a run killed after some blocks."""


def _inputs(tmp: Path, recipe: Recipe, shape: tuple[int, int, int] = SHAPE) -> None:
    """A checkpoint with lively random weights for ``recipe`` and a random uint8 input."""
    make_inputs(tmp, shape, recipe)


def _infer(tmp: Path, recipe: Recipe, out: str, **options: Any) -> Path:
    run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), tmp / out, device="cpu",
                  **options)
    return tmp / out


def _unsharded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(job_module, "shard_chunks", lambda shard: None)


def _levels(out: Path, task: str) -> list[str]:
    return sorted((p.name for p in (out / task).iterdir() if p.name.isdigit()), key=int)


def _same(a: Path, b: Path, recipe: Recipe) -> None:
    """Equal outputs, every task and level, bit for bit."""
    for task in recipe.tasks:
        assert _levels(a, task) == _levels(b, task)
        for level in _levels(a, task):
            np.testing.assert_array_equal(zarr.open_array(str(a / task / level))[...],
                                          zarr.open_array(str(b / task / level))[...],
                                          err_msg=f"{task}/{level}")


class Writes:
    """Records every region written into a zarr array of a store (array path, box), from
    any thread of this process."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.regions: list[tuple[str, tuple[slice, ...]]] = []
        self._lock = threading.Lock()
        real = zarr.Array.__setitem__
        outer = self

        def recorded(array: zarr.Array, key: Any, value: Any) -> None:
            keys = key if isinstance(key, tuple) else (key,)
            keys = tuple(slice(None) if k is Ellipsis else k for k in keys)
            keys += (slice(None),) * (len(array.shape) - len(keys))
            box = tuple(k.indices(n)[:2] for k, n in zip(keys, array.shape, strict=True))
            with outer._lock:
                outer.regions.append((str(array.store_path), box))  # type: ignore[arg-type]
            real(array, key, value)

        monkeypatch.setattr(zarr.Array, "__setitem__", recorded)

    def shard_owners(self, array: zarr.Array) -> dict[tuple[int, ...], int]:
        """How many writes touched each shard (write unit) of ``array``; asserts each write
        covers the shards it touches whole (up to the array's end)."""
        unit = write_chunks(array)
        owners: dict[tuple[int, ...], int] = {}
        for path, box in self.regions:
            if path != str(array.store_path):
                continue
            ranges = []
            for (begin, end), u, n in zip(box, unit, array.shape, strict=True):
                first, last = begin // u, (end - 1) // u
                assert begin == first * u and end == min(n, (last + 1) * u), (
                    f"{path}: write {box} covers part of a shard of {unit}")
                ranges.append(range(first, last + 1))
            for index in itertools.product(*ranges):
                owners[index] = owners.get(index, 0) + 1
        return owners


def _shard_grid(array: zarr.Array) -> set[tuple[int, ...]]:
    unit = write_chunks(array)
    return set(itertools.product(*(range(-(-n // u)) for n, u in
                                   zip(array.shape, unit, strict=True))))


# --- the inner-chunk rule -----------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3, 12])
def test_inner_chunks_divide_every_shard_and_keep_channels_whole(channels: int) -> None:
    """For a sample of shards up to 70 x 300 x 300 (odd and prime axes among them), the
    inner chunk divides the shard, is at most INNER_ZYX or the whole axis, and holds every
    channel; output_chunks puts the layout chunk as the shard."""
    for z, y, x in itertools.product((1, 7, 8, 9, 12, 16, 37, 64, 70),
                                     (1, 100, 127, 128, 129, 192, 254, 262, 300),
                                     (5, 128, 200, 256, 263)):
        shard = (channels, z, y, x)
        inner = shard_chunks(shard)
        if inner is None:  # no axis worth cutting: each within the limit or no divisor
            assert all(s <= c or not any(s % d == 0 for d in range(-(-c // 2), c + 1))
                       for s, c in zip((z, y, x), write_module.INNER_ZYX, strict=True))
            continue
        assert inner[0] == channels
        for s, c, limit in zip(shard[1:], inner[1:], write_module.INNER_ZYX, strict=True):
            assert s % c == 0 and (c <= limit or c == s)
            assert c == s or 2 * c >= limit  # no axis cut into slivers
        layout = Layout((100, 1000, 1000), (8, 64, 64), (4, 32, 32), (z, y, x), (z, y, x))
        assert output_chunks(channels, layout) == (inner, shard)


# --- inference: edge shards, odd blocks, dtypes -------------------------------------------


def _sharded_as_unsharded(tmp: Path, recipe: Recipe, monkeypatch: pytest.MonkeyPatch,
                          **options: Any) -> Path:
    """Run ``options`` sharded (inner chunks `SMALL_INNER`) and unsharded: every shard of
    every level written once and whole, and the same values bit for bit."""
    monkeypatch.setattr(write_module, "INNER_ZYX", SMALL_INNER)
    with monkeypatch.context() as watched:
        writes = Writes(watched)
        sharded = _infer(tmp, recipe, "s.zarr", **options)
    for task in recipe.tasks:
        for level in _levels(sharded, task):
            array = zarr.open_array(str(sharded / task / level))
            assert array.shards is not None and str(array.dtype) == recipe.infer.dtype
            assert all(s % c == 0 for s, c in zip(array.shards, array.chunks, strict=True))
            owners = writes.shard_owners(array)
            assert set(owners.values()) <= {1}, f"{task}/{level}: a shard written twice"
            if "mask_path" not in options:
                assert set(owners) == _shard_grid(array), f"{task}/{level}: shards unwritten"
    with monkeypatch.context() as plain:
        _unsharded(plain)
        unsharded = _infer(tmp, recipe, "u.zarr", **options)
    assert zarr.open_array(str(unsharded / "aff/0")).shards is None
    _same(sharded, unsharded, recipe)
    return sharded


@pytest.mark.parametrize(("dtype", "block"), [
    ("uint8", (8, 48, 48)),  # 80 = 48 + 32: edge shards cut by the volume's end
    ("float16", (6, 30, 50)),  # no multiple of the inner chunk: inner 3 x 15 x 10
    ("float32", (16, 40, 40)),  # inner 10 x 10 (largest divisor of 40 up to 16)
])
def test_edge_and_odd_shards_hold_an_unsharded_run_s_values(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str,
        block: tuple[int, int, int]) -> None:
    recipe = make_recipe(dtype=dtype)
    _inputs(tmp_path, recipe)
    sharded = _sharded_as_unsharded(tmp_path, recipe, monkeypatch, block=block, levels=3)
    for task in recipe.tasks:
        base = zarr.open_array(str(sharded / task / "0"))
        assert base.shards == (base.shape[0], *block)


def test_recipe_chunks_smaller_than_the_block_are_the_shards(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """infer.chunks 8 x 32 x 32 in blocks of 16 x 64 x 64: four shards a block, edge ones
    past the volume's end (80 = 64 + 16)."""
    recipe = make_recipe(dtype="uint8", chunks=[8, 32, 32])
    _inputs(tmp_path, recipe)
    sharded = _sharded_as_unsharded(tmp_path, recipe, monkeypatch, block=(16, 64, 64),
                                    levels=2)
    base = zarr.open_array(str(sharded / "aff/0"))
    assert (base.shards, base.chunks) == ((4, 8, 32, 32), (4, 4, 16, 16))


def test_a_roi_and_a_mask_keep_whole_shards(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A box of the input whose shards start at the box's corner, and a mask that leaves
    blocks out (no shard written for them): the values are an unsharded run's."""
    recipe = make_recipe(dtype="uint8")
    _inputs(tmp_path, recipe)
    mask = np.zeros(SHAPE, np.uint8)
    mask[:, :20, :20] = 1  # the first block in y and x only (of the ROI's 2 x 2)
    write_volume(tmp_path / "m.zarr", "mask", mask, voxel_size=(30, 6, 6), label=False)
    sharded = _sharded_as_unsharded(
        tmp_path, recipe, monkeypatch, block=(8, 32, 32), levels=2,
        roi=Roi((0, 5, 3), (16, 70, 75)), mask_path=str(tmp_path / "m.zarr/mask"))
    base = zarr.open_array(str(sharded / "aff/0"))
    assert base.shape == (4, 16, 70, 75) and base.shards == (4, 8, 32, 32)
    assert base[:, :, 40:, :].max() == 0 and base[:, :, :32, :32].max() > 0


def _channels_recipe() -> Recipe:
    """Three tasks of 3, 12 and 1 channels."""
    offsets12 = [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [-2, 0, 0], [0, -3, 0], [0, 0, -3],
                 [-3, 0, 0], [0, -9, 0], [0, 0, -9], [-4, 0, 0], [0, -27, 0], [0, 0, -27]]
    return Recipe.model_validate({
        "name": "c", "data": {"sources": {"a": {"type": "synthetic", "shape": [16, 64, 64]}}},
        "model": {"type": "rsunet", "widths": [4, 8]},
        "tasks": {"aff3": {"target": {"type": "affinity", "offsets": OFFSETS[:3]}},
                  "aff12": {"target": {"type": "affinity", "offsets": offsets12}},
                  "mito": {"target": {"type": "binary", "volume": "mito"}}},
        "train": {"patch": [4, 16, 16], "iterations": 1},
        "infer": {"dtype": "uint8", "overlap": [0.5, 0.25, 0.25], "batch_size": 3,
                  "precision": "fp32"},
    })


def test_one_three_and_twelve_channels_shard_alike(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The real INNER_ZYX: a 16-section block is cut in z only (8 sections), every channel
    in each inner chunk."""
    recipe = _channels_recipe()
    _inputs(tmp_path, recipe, (16, 40, 72))
    sharded = _infer(tmp_path, recipe, "s.zarr", block=(16, 40, 36), levels=2)
    for task, channels in (("aff3", 3), ("aff12", 12), ("mito", 1)):
        base = zarr.open_array(str(sharded / task / "0"))
        assert (base.shape, base.shards, base.chunks) == (
            (channels, 16, 40, 72), (channels, 16, 40, 36), (channels, 8, 40, 36))
        level = zarr.open_array(str(sharded / task / "1"))
        assert (level.shape, level.shards, level.chunks) == (
            (channels, 16, 20, 36), (channels, 16, 20, 36), (channels, 8, 20, 36))
    with monkeypatch.context() as plain:
        _unsharded(plain)
        unsharded = _infer(tmp_path, recipe, "u.zarr", block=(16, 40, 36), levels=2)
    _same(sharded, unsharded, recipe)


# --- the pyramid over a sharded level 0 ---------------------------------------------------


@pytest.mark.parametrize(("shape", "shards", "chunks"), [
    ((3, 16, 80, 80), (3, 8, 48, 48), (3, 4, 16, 16)),  # edge shards, level 1 < one shard
    ((1, 20, 90, 70), (1, 6, 30, 50), (1, 3, 15, 10)),  # odd everything
    ((12, 9, 100, 36), (12, 9, 40, 36), (12, 3, 20, 12)),  # 12 channels, one shard in x
])
def test_pyramid_writers_own_whole_shards_of_every_level(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...],
        shards: tuple[int, ...], chunks: tuple[int, ...]) -> None:
    """Pyramid blocks as small as the write unit allows (a read budget of 1 byte), four
    threads: every shard of every level is written once, whole, and the values are an
    unsharded pyramid's."""
    monkeypatch.setattr(pyramid, "READ_BYTES", 1)
    data = np.random.default_rng(4).random(shape).astype(np.float32)
    sharded = create_volume(tmp_path / "s.zarr", "v", shape, np.float32, chunks=chunks,
                            shards=shards, channel_axis=True, voxel_size=(8, 8, 8))
    sharded[...] = data
    plain = create_volume(tmp_path / "p.zarr", "v", shape, np.float32, chunks=shards,
                          channel_axis=True, voxel_size=(8, 8, 8))
    plain[...] = data
    with monkeypatch.context() as watched:
        writes = Writes(watched)
        count = build_pyramid(tmp_path / "s.zarr/v", 3, threads=4)
    assert count == build_pyramid(tmp_path / "p.zarr/v", 3, threads=4) == 3
    for level in ("1", "2"):
        array = zarr.open_array(str(tmp_path / "s.zarr/v" / level))
        owners = writes.shard_owners(array)
        assert set(owners) == _shard_grid(array) and set(owners.values()) == {1}
        assert all(s % c == 0 for s, c in zip(write_chunks(array), array.chunks, strict=True))
        np.testing.assert_array_equal(array[...], zarr.open_array(
            str(tmp_path / "p.zarr/v" / level))[...])


# --- two worker processes -----------------------------------------------------------------


@pytest.mark.slow
def test_two_worker_processes_write_neighbouring_edge_shards_as_one_does(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 8 x 48 x 48 over 16 x 80 x 80 (edge shards in y and x), inner chunks cut
    small: two spawned workers write neighbouring blocks of one output; its every level
    equals a one-worker run's bit for bit."""
    recipe = make_recipe(dtype="uint8")
    _inputs(tmp_path, recipe)
    monkeypatch.setattr(write_module, "INNER_ZYX", SMALL_INNER)  # arrays made by the parent
    one = _infer(tmp_path, recipe, "one.zarr", block=(8, 48, 48), levels=2)
    progress = run_inference(recipe, tmp_path / "c.pt", str(tmp_path / "in.zarr/image"),
                             tmp_path / "two.zarr", block=(8, 48, 48), levels=2,
                             workers=2, device="cpu")
    assert progress.done == progress.total == 8
    assert zarr.open_array(str(tmp_path / "two.zarr/aff/0")).chunks == (4, 4, 16, 16)
    _same(one, tmp_path / "two.zarr", recipe)


# --- resuming after a block was written in part -------------------------------------------


def test_resume_after_a_block_was_written_in_part(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A run killed while writing its second block: one task's shards of it written (with
    stale values, an edge shard among them), the other's missing, no done-marker. The
    resumption rewrites the block's shards whole and ends as an uninterrupted run."""
    recipe = make_recipe(dtype="float16")
    _inputs(tmp_path, recipe)
    monkeypatch.setattr(write_module, "INNER_ZYX", SMALL_INNER)
    block = (16, 48, 48)
    straight = _infer(tmp_path, recipe, "straight.zarr", block=block, levels=2)

    def stop_after_one(progress: Any) -> None:
        if progress.done == 1:
            raise Stop

    with pytest.raises(Stop):
        _infer(tmp_path, recipe, "cut.zarr", block=block, levels=2, on_block=stop_after_one)
    cut = tmp_path / "cut.zarr"
    job = job_module.Job.from_json(next((cut / job_module.DONE).glob("*/job.json"))
                                   .read_text())
    pending = job.pending()
    done = set(job.layout.block_grid()) - set(pending)
    assert len(pending) == 3 and len(done) == 1  # 2 x 2 blocks in y, x; 80 = 48 + 32
    aff = zarr.open_array(str(cut / "aff/0"), mode="r+")
    for b in pending:  # stale values in the unmarked blocks' shards of aff, mito's unwritten
        box = job.layout.write_box(b)
        aff[(slice(None), *(slice(o, o + n) for o, n in zip(box.offset, box.shape,
                                                              strict=True)))] = 7
    mito = cut / "mito/0/c"
    for shard in list(mito.rglob("*")) if mito.exists() else []:
        if shard.is_file() and tuple(int(p) for p in shard.relative_to(mito).parts[1:]
                                     ) not in done:  # a shard is a block here
            shard.unlink()
    _infer(tmp_path, recipe, "cut.zarr", block=block, levels=2, resume=True)
    _same(cut, straight, recipe)


def test_one_file_per_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sharding keeps the file count: one chunk file per layout chunk (shard), edge ones
    included."""
    recipe = make_recipe(dtype="uint8")
    _inputs(tmp_path, recipe)
    monkeypatch.setattr(write_module, "INNER_ZYX", SMALL_INNER)
    out = _infer(tmp_path, recipe, "s.zarr", block=(8, 48, 48), levels=1)
    for task in recipe.tasks:
        array = zarr.open_array(str(out / task / "0"))
        files = [p for p in (out / task / "0" / "c").rglob("*") if p.is_file()]
        assert len(files) == math.prod(-(-n // u) for n, u in
                                       zip(array.shape, array.shards, strict=True)) == 8


@pytest.mark.parametrize("sharded", [False, True])
def test_resume_rewrites_a_torn_chunk_file_of_an_unfinished_block(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sharded: bool) -> None:
    """A block whose write was cut short inside a file (zarr 3.1.0 to 3.1.2 write chunk
    files in place, which pyproject's zarr>=3.1 allows; a machine's crash on any): the
    resumption redoes the block, as it does any unmarked block. An unsharded chunk is simply
    overwritten; a shard, though written whole again, is read first and fails its check."""
    recipe = make_recipe(dtype="uint8")
    _inputs(tmp_path, recipe)
    monkeypatch.setattr(write_module, "INNER_ZYX", SMALL_INNER)
    if not sharded:
        _unsharded(monkeypatch)
    block = (16, 48, 48)
    straight = _infer(tmp_path, recipe, "straight.zarr", block=block)

    def stop_after_one(progress: Any) -> None:
        if progress.done == 1:
            raise Stop

    with pytest.raises(Stop):
        _infer(tmp_path, recipe, "cut.zarr", block=block, on_block=stop_after_one)
    cut = tmp_path / "cut.zarr"
    job = job_module.Job.from_json(next((cut / job_module.DONE).glob("*/job.json"))
                                   .read_text())
    torn = job.pending()[0]
    aff = zarr.open_array(str(cut / "aff/0"), mode="r+")
    box = job.layout.write_box(torn)
    aff[(slice(None), *(slice(o, o + n) for o, n in zip(box.offset, box.shape, strict=True)))
        ] = 3  # the killed write had begun this block's file ...
    chunk = cut / "aff/0/c/0" / "/".join(map(str, torn))  # one file: block = layout chunk
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 2])  # ... and got half way
    _infer(tmp_path, recipe, "cut.zarr", block=block, resume=True)
    _same(cut, straight, recipe)


def test_a_resumed_pyramid_rewrites_a_torn_shard_of_an_unfinished_block(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As for level 0: a pyramid build killed while writing a block's shard in place (level
    1 of 3 x 3 shards here, one block per shard) resumes at its unfinished blocks, and one
    of those holds half a file."""
    monkeypatch.setattr(pyramid, "BLOCK_ZYX", (2, 8, 8))  # rounded up to whole shards
    data = sharded_channels(tmp_path / "p.zarr", seed=5)
    calls = [0]
    downsample = pyramid.downsample

    def killed_at_the_fifth(*args: Any) -> np.ndarray:
        calls[0] += 1
        if calls[0] == 5:
            raise Stop
        return downsample(*args)

    with monkeypatch.context() as killed:
        killed.setattr(pyramid, "downsample", killed_at_the_fifth)
        with pytest.raises(Stop):
            build_pyramid(tmp_path / "p.zarr/v", 2, threads=1)
    level = zarr.open_array(str(tmp_path / "p.zarr/v/1"), mode="r+")
    level[:, :, 16:32, 16:32] = 1  # block 4 (raster order), unfinished: begun in place ...
    shard = tmp_path / "p.zarr/v/1/c/0/0/1/1"
    shard.write_bytes(shard.read_bytes()[:20])  # ... and cut short
    assert build_pyramid(tmp_path / "p.zarr/v", 2, threads=1) == 2
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "p.zarr/v/1"))[...],
                                  pyramid.downsample(data, (1, 2, 2), False))


def test_clear_shards_removes_only_the_shards_a_region_covers_whole(tmp_path: Path) -> None:
    """A writer owns whole shards: those it covers whole (the volume's edge shards too) are
    removed before it writes; one it covers in part keeps its file (others' chunks)."""
    array = create_volume(tmp_path / "s.zarr", "v", (2, 8, 40, 40), np.uint8,
                          chunks=(2, 4, 8, 8), shards=(2, 8, 16, 16), channel_axis=True)
    array[...] = 1
    folder = tmp_path / "s.zarr/v/0/c/0/0"

    def present() -> set[tuple[int, int]]:
        return {(int(p.parent.name), int(p.name)) for p in folder.glob("*/*")}

    assert len(present()) == 9  # 3 x 3 shards, the last row and column at the edge
    pyramid.clear_shards(array, (slice(None), slice(0, 8), slice(16, 40), slice(0, 20)))
    assert present() == {(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 1), (2, 2)}
    plain = create_volume(tmp_path / "p.zarr", "v", (8, 16, 16), np.uint8, chunks=(4, 8, 8))
    plain[...] = 1
    pyramid.clear_shards(plain, (slice(None), slice(None), slice(None)))
    assert np.all(plain[...] == 1)  # unsharded: nothing removed
