"""A pyramid build cut short resumes at its finished blocks and ends as an uninterrupted
build would, bit for bit; a complete pyramid is not built again for nothing; a level 0
written again after a partial build starts it over; a failed block does not wait for the
rest of the level; a block's downsampling holds no output-sized temporaries beyond its
sum."""

from __future__ import annotations

import json
import shutil
import tracemalloc
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import ome_zarr_models
import pytest
import zarr

from emrun.io import open_volume, pyramid
from emrun.io.pyramid import downsample, write_level
from emrun.io.write import PYRAMID_PROGRESS, build_pyramid, create_volume, write_volume


class Killed(Exception):
    """Stands for a kill (a time limit, Ctrl-C) in the middle of a build."""


def _volume(kind: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Level 0 of odd shape, and how it is written."""
    rng = np.random.default_rng(7)
    if kind == "labels":
        data = rng.integers(0, 5, (5, 37, 29), dtype=np.uint64) * np.uint64(2**40 + 3)
        return data, {"label": True}
    if kind == "channels":
        data = rng.random((2, 5, 37, 29)).astype(np.float32)
        return data, {"channel_axis": True}
    return rng.integers(0, 256, (9, 37, 29), dtype=np.uint8), {"voxel_size": (8, 8, 8)}


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of a few chunks, so that a small volume's levels have several blocks."""
    monkeypatch.setattr(pyramid, "BLOCK_ZYX", (2, 8, 8))


def _store(tmp_path: Path, name: str, data: np.ndarray, options: dict[str, Any]) -> Path:
    """A volume whose level 0 is written and whose pyramid is not built yet."""
    label = options.get("label", False)
    array = create_volume(tmp_path / name, "v", data.shape, data.dtype,
                          chunks=(*data.shape[:-3], 2, 4, 4), **options)
    array[...] = data
    return tmp_path / name / ("labels/v" if label else "v")


def _levels(group: Path) -> list[np.ndarray]:
    datasets = json.loads((group / "zarr.json").read_text())["attributes"]["ome"][
        "multiscales"][0]["datasets"]
    return [zarr.open_array(str(group / d["path"]))[...] for d in datasets]


def _same_bits(got: list[np.ndarray], want: list[np.ndarray]) -> bool:
    """Every level equal byte for byte, and as many levels."""
    return all(a.tobytes() == b.tobytes() for a, b in zip(got, want, strict=True))


def _counting(monkeypatch: pytest.MonkeyPatch, kill_after: int | None = None) -> list[int]:
    """Count the blocks downsampled; raise `Killed` at block `kill_after` + 1."""
    calls: list[int] = []
    real = pyramid.downsample

    def counted(*args: Any, **kwargs: Any) -> np.ndarray:
        if kill_after is not None and len(calls) == kill_after:
            raise Killed
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pyramid, "downsample", counted)
    return calls


def _reference(tmp_path: Path, data: np.ndarray, options: dict[str, Any],
               levels: int) -> tuple[list[np.ndarray], int]:
    """An uninterrupted build's levels, and how many blocks it downsampled."""
    group = _store(tmp_path, "ref.zarr", data, options)
    with pytest.MonkeyPatch.context() as patch:
        calls = _counting(patch)
        assert build_pyramid(group, levels, threads=1) == levels
    return _levels(group), len(calls)


def _readers_see_a_volume(group: Path, shape: tuple[int, ...]) -> None:
    """The progress folder is no zarr node, OME readers and emrun read past it."""
    assert open_volume(str(group)).shape == shape
    found = ome_zarr_models.open_ome_zarr(str(group))
    assert type(found).__name__ in ("Image", "ImageLabel")


@pytest.mark.parametrize("kind", ["image", "labels", "channels"])
def test_a_build_cut_short_resumes_at_its_blocks_and_ends_bit_for_bit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    data, options = _volume(kind)
    want, total = _reference(tmp_path, data, options, 4)
    assert total > 12  # several blocks per level
    for kill in (1, total // 2, total - 1):  # early in level 1, midway, in the last level
        group = _store(tmp_path, f"cut{kill}.zarr", data, options)
        with monkeypatch.context() as patch:
            _counting(patch, kill_after=kill)
            with pytest.raises(Killed):
                build_pyramid(group, 4, threads=1)
        assert (group / PYRAMID_PROGRESS).is_dir()
        _readers_see_a_volume(group, data.shape)
        with monkeypatch.context() as patch:
            resumed = _counting(patch)
            assert build_pyramid(group, 4, threads=1) == 4
        assert len(resumed) == total - kill, kill  # the finished blocks were kept
        got = _levels(group)
        assert len(got) == 4
        for level, (a, b) in enumerate(zip(got, want, strict=True)):
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), (kill, level)
        assert not (group / PYRAMID_PROGRESS).exists()  # gone once complete


def test_two_cuts_in_a_row_still_end_as_one_build(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    data, options = _volume("image")
    want, total = _reference(tmp_path, data, options, 4)
    group = _store(tmp_path, "twice.zarr", data, options)
    done = 0
    for kill in (total // 4, total // 4):
        with monkeypatch.context() as patch:
            _counting(patch, kill_after=kill)
            with pytest.raises(Killed):
                build_pyramid(group, 4, threads=2)
        done += kill
    with monkeypatch.context() as patch:
        resumed = _counting(patch)
        build_pyramid(group, 4, threads=2)
    assert len(resumed) <= total - done + 2  # two threads: a block in flight may be redone
    assert _same_bits(_levels(group), want)


@pytest.mark.parametrize("same_values", [True, False])
def test_level_0_written_again_after_a_partial_build_starts_it_over(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, same_values: bool) -> None:
    data, options = _volume("image")
    other = (255 - data) if not same_values else data
    want, total = _reference(tmp_path, other, options, 4)
    group = _store(tmp_path, "rewritten.zarr", data, options)
    with monkeypatch.context() as patch:
        _counting(patch, kill_after=total // 2)
        with pytest.raises(Killed):
            build_pyramid(group, 4, threads=1)
    zarr.open_array(str(group / "0"), mode="r+")[...] = other
    with monkeypatch.context() as patch:
        calls = _counting(patch)
        build_pyramid(group, 4, threads=1)
    assert len(calls) == total  # nothing of the stale levels was reused
    assert _same_bits(_levels(group), want)


def test_a_complete_pyramid_is_not_built_again_for_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, options = _volume("labels")
    want, total = _reference(tmp_path, data, options, 4)
    group = tmp_path / "ref.zarr/labels/v"
    with monkeypatch.context() as patch:
        calls = _counting(patch)
        assert build_pyramid(group, 4) == 4  # e.g. a job killed before marking it finished
        assert calls == []
        assert build_pyramid(group, 3) == 3  # fewer levels: the last one goes, none built
        assert calls == [] and not (group / "3").exists()
        assert len(_levels(group)) == 3
        assert build_pyramid(group, 4) == 4  # one more: that one alone is built
        assert 0 < len(calls) < total / 2
    assert _same_bits(_levels(group), want)


def test_a_level_changed_since_its_build_is_rebuilt_with_those_after_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, options = _volume("image")
    want, total = _reference(tmp_path, data, options, 4)
    group = tmp_path / "ref.zarr/v"
    zarr.open_array(str(group / "2"), mode="r+")[...] = 7  # written over by someone
    with monkeypatch.context() as patch:
        calls = _counting(patch)
        build_pyramid(group, 4)
    assert 0 < len(calls) < total  # level 1 kept
    assert _same_bits(_levels(group), want)


def test_a_partial_build_resumed_with_other_levels_keeps_what_matches(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, options = _volume("channels")
    want, _ = _reference(tmp_path, data, options, 3)
    (tmp_path / "four").mkdir()
    _, total4 = _reference(tmp_path / "four", data, options, 4)
    group = _store(tmp_path, "other.zarr", data, options)
    with monkeypatch.context() as patch:
        _counting(patch, kill_after=total4 - 1)  # in the last of four levels
        with pytest.raises(Killed):
            build_pyramid(group, 4, threads=1)
    with monkeypatch.context() as patch:
        calls = _counting(patch)
        assert build_pyramid(group, 3, threads=1) == 3
    assert calls == []  # levels 1 and 2 were finished
    got = _levels(group)
    assert len(got) == 3 and not (group / "3").exists()
    assert _same_bits(got, want)


def test_a_staged_volume_leaves_no_progress_behind(tmp_path: Path) -> None:
    data, _ = _volume("image")
    write_volume(tmp_path / "w.zarr", "v", data, levels=3)
    hidden = [p.name for p in (tmp_path / "w.zarr/v").iterdir() if p.name.startswith(".")]
    assert hidden == []
    shutil.rmtree(tmp_path / "w.zarr")


def test_blocks_are_handed_to_the_pool_a_few_at_a_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`pool.map` queued every block of a level up front (1.7 kB each: 1.8 GB for the
    million blocks of an 8 TB volume's level 1); the result is the same either way."""
    data = np.random.default_rng(3).integers(0, 256, (4, 32, 32), dtype=np.uint8)
    source = zarr.create_array(str(tmp_path / "s.zarr"), shape=data.shape, dtype=np.uint8,
                               chunks=(2, 4, 4))
    source[...] = data
    target = zarr.create_array(str(tmp_path / "t.zarr"), shape=(4, 16, 16), dtype=np.uint8,
                               chunks=(2, 2, 2))
    queued: list[int] = []

    class Counting(ThreadPoolExecutor):
        def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
            future = super().submit(fn, *args, **kwargs)
            queued.append(self._work_queue.qsize())
            return future

    monkeypatch.setattr(pyramid, "ThreadPoolExecutor", Counting)
    write_level(source, target, (1, 2, 2), False, block=(2, 2, 2), threads=2)
    assert len(queued) == 2 * 8 * 8  # every block
    assert max(queued) <= 2  # never more waiting than there are threads
    np.testing.assert_array_equal(target[...], downsample(data, (1, 2, 2), labels=False))


class _Plain:
    """A level as write_level sees it, in memory: the test times blocks, not zarr."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.data = np.zeros(shape, np.uint8)
        self.shape, self.chunks, self.dtype = shape, (1, 1, 1), self.data.dtype

    def __setitem__(self, key: Any, value: np.ndarray) -> None:
        self.data[key] = value


def test_a_level_s_blocks_are_not_listed_up_front() -> None:
    """The list of every block's box took 0.4 kB a block (420 MB for a million); they are
    made one at a time now."""
    source, target = _Plain((1, 64, 128)), _Plain((1, 32, 64))  # 2048 blocks of one voxel
    tracemalloc.start()
    try:
        write_level(source, target, (1, 2, 2), False, block=(1, 1, 1), threads=1,
                    read=lambda array, roi: np.full(tuple(roi.shape), 3, np.uint8))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (target.data == 3).all()
    assert peak < 400_000, peak


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_a_block_is_downsampled_without_block_sized_temporaries(dtype: type) -> None:
    """The counts of every window (int64, twice the float32 mean) and `mean + 0.5` made the
    peak four times the block read; now the float sum and the result are all."""
    data = (np.random.default_rng(1).random((32, 256, 256)) * 200).astype(dtype)
    step = (1, 2, 2)
    tracemalloc.start()
    try:
        out = downsample(data, step, labels=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    sum_bytes = out.size * 4
    assert peak < sum_bytes + out.nbytes + sum_bytes // 4, peak / sum_bytes
    mean = data.astype(np.float64).reshape(32, 1, 128, 2, 128, 2).mean(axis=(1, 3, 5))
    expected = np.floor(mean + 0.5).astype(dtype) if dtype != np.float32 else mean
    if dtype == np.float32:
        np.testing.assert_allclose(out, expected, rtol=1e-6)
    else:
        np.testing.assert_array_equal(out, expected)


def test_the_segment_stop_line_does_not_promise_a_whole_rebuild() -> None:
    from emrun.segment.scale.command import PYRAMID_CUT

    assert "whole" not in PYRAMID_CUT.format(what="fragments")
