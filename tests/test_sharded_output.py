"""Inference writes its outputs as zarr 3 shards (one file per layout chunk, as before, cut
into small inner chunks that a reader decodes one at a time): the values are those of an
unsharded write, a block read with a thin halo decodes the inner chunks it touches and not
its neighbours' whole chunks, writers (inference blocks, pyramid blocks) own whole shards,
and an output started unsharded by an older emrun resumes unsharded."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from test_infer import make_inputs
from zarr.codecs import ZstdCodec

from emrun.geometry import Roi
from emrun.infer import job as job_module
from emrun.infer import plan
from emrun.infer.job import _started_layout, output_chunks
from emrun.infer.plan import Layout
from emrun.infer.run import run_inference
from emrun.io import open_volume, pyramid
from emrun.io.pyramid import write_chunks, write_level
from emrun.io.write import build_pyramid, create_volume, shard_chunks

SHAPE = (16, 20, 80)  # two blocks of BLOCK: a run can be stopped after the first
BLOCK = (16, 20, 40)


class Stop(Exception):
    """Stands for a run killed after its first block."""


def _stop_after_one(progress: Any) -> None:
    if progress.done == 1:
        raise Stop


def _infer(tmp: Path, out: str, **options: Any) -> Path:
    recipe = options.pop("recipe")
    run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), tmp / out, block=BLOCK,
                  **options)
    return tmp / out


def _unsharded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outputs created as the previous release created them: one chunk per layout chunk."""
    monkeypatch.setattr(job_module, "shard_chunks", lambda shard: None)


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Any, Path]:
    recipe, _, _, tmp = make_inputs(tmp_path, shape=SHAPE)
    return recipe, tmp


@pytest.mark.parametrize(("shard", "inner"), [
    ((12, 32, 256, 256), (12, 8, 128, 128)),  # today's default chunk of 12 affinities
    ((3, 20, 192, 250), (3, 5, 96, 125)),  # largest divisors up to 8, 128, 128
    ((4, 37, 300, 101), (4, 37, 100, 101)),  # a prime axis stays whole (chunks of 1 else)
    ((12, 8, 128, 128), None),  # already small: stays one unsharded chunk
])
def test_inner_chunks_follow_the_documented_rule(shard: tuple[int, ...],
                                                 inner: tuple[int, ...] | None) -> None:
    assert shard_chunks(shard) == inner
    layout = Layout((100, 1000, 1000), (8, 64, 64), (4, 32, 32), shard[1:], shard[1:])
    assert output_chunks(shard[0], layout) == ((shard, None) if inner is None
                                              else (inner, shard))


def test_output_is_sharded_and_holds_what_an_unsharded_write_holds(
        setup: tuple[Any, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    recipe, tmp = setup
    sharded = _infer(tmp, "sharded.zarr", recipe=recipe, levels=2)
    base = zarr.open_array(str(sharded / "aff/0"))
    assert base.shards == (4, 16, 20, 40) and base.chunks == (4, 8, 20, 40)
    level = zarr.open_array(str(sharded / "aff/1"))  # y and x halved
    assert level.shards == (4, 16, 10, 40) and level.chunks == (4, 8, 10, 40)
    _unsharded(monkeypatch)
    plain = _infer(tmp, "plain.zarr", recipe=recipe, levels=2)
    assert zarr.open_array(str(plain / "aff/0")).shards is None
    for task in ("aff", "mito"):
        for lvl in ("0", "1"):
            np.testing.assert_array_equal(zarr.open_array(str(sharded / task / lvl))[...],
                                          zarr.open_array(str(plain / task / lvl))[...])
    read = open_volume(str(sharded / "aff"))  # the Volume API reads it as before
    assert read.shape == (4, *SHAPE) and read.chunks == (4, 8, 20, 40)
    np.testing.assert_array_equal(read.read(), zarr.open_array(str(plain / "aff/0"))[...])


def _decoded_bytes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Bytes zstd decodes from now on (each chunk, or each inner chunk of a shard)."""
    counts: list[int] = []
    decode = ZstdCodec._decode_single

    async def counted(self: ZstdCodec, data: Any, spec: Any) -> Any:
        out = await decode(self, data, spec)
        counts.append(len(out))
        return out

    monkeypatch.setattr(ZstdCodec, "_decode_single", counted)
    return counts


def test_a_block_with_a_thin_halo_decodes_fewer_inner_chunks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The segment-at-scale fragments read: a block of the layout and 2 x 8 x 8 around it."""
    shape, block = (3, 48, 96, 96), (3, 16, 32, 32)
    data = np.random.default_rng(1).integers(0, 255, shape, dtype=np.uint8)
    arrays = {}
    for name, shards in (("plain", None), ("sharded", block)):
        chunks = shard_chunks(block, (3, 8, 16, 16)) if shards else block
        arrays[name] = create_volume(tmp_path / f"{name}.zarr", "aff", shape, np.uint8,
                                     chunks=chunks, shards=shards, channel_axis=True)
        arrays[name][...] = data
    halo = (slice(None), slice(14, 34), slice(24, 72), slice(24, 72))  # block (1, 1, 1)
    decoded = {}
    for name, array in arrays.items():
        counts = _decoded_bytes(monkeypatch)
        np.testing.assert_array_equal(array[halo], data[halo])
        decoded[name] = sum(counts)
    assert decoded["plain"] == 27 * math.prod(block)  # the 26 neighbours' chunks, whole
    # the core's 8 inner chunks and the halo's: 4 x 4 x 4 of (8, 16, 16) each
    assert decoded["sharded"] == 4 * 4 * 4 * 3 * 8 * 16 * 16 < decoded["plain"] / 3


def test_an_output_started_unsharded_resumes_unsharded(
        setup: tuple[Any, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    recipe, tmp = setup
    straight = _infer(tmp, "straight.zarr", recipe=recipe)
    with monkeypatch.context() as patched:
        _unsharded(patched)
        with pytest.raises(Stop):
            _infer(tmp, "old.zarr", recipe=recipe, on_block=_stop_after_one)
    old = tmp / "old.zarr"
    digest = zarr.open_group(str(old / "aff")).attrs["emrun"]["layout"]
    _infer(tmp, "old.zarr", recipe=recipe, resume=True)  # refused were the layout other
    for task in ("aff", "mito"):
        array = zarr.open_array(str(old / task / "0"))
        assert array.shards is None and array.chunks == (array.shape[0], *BLOCK)
        np.testing.assert_array_equal(array[...], zarr.open_array(str(straight / task / "0"))[...])
    assert (old / ".emrun-done" / digest).is_dir()
    assert zarr.open_group(str(old / "aff")).attrs["emrun"]["layout"] == digest


def test_a_sharded_output_resumes_in_its_shards(
        setup: tuple[Any, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    recipe, tmp = setup
    straight = _infer(tmp, "straight.zarr", recipe=recipe)
    with pytest.raises(Stop):
        _infer(tmp, "cut.zarr", recipe=recipe, on_block=_stop_after_one)
    cut = tmp / "cut.zarr"
    # this emrun's default chunks change meanwhile: the resumption keeps the shards it began
    monkeypatch.setattr(plan, "CHUNK_LIMIT", (8, 256, 256))
    patch = recipe.infer_patch()
    stride = recipe.infer.resolved_stride(patch)
    assert plan.choose_chunks_and_block(SHAPE, patch, stride, None, BLOCK)[0] == (8, 20, 40)
    assert _started_layout(cut, SHAPE, patch, stride, BLOCK) == ((16, 20, 40), BLOCK)
    _infer(tmp, "cut.zarr", recipe=recipe, resume=True)
    for task in ("aff", "mito"):
        array = zarr.open_array(str(cut / task / "0"))
        assert write_chunks(array) == (array.shape[0], 16, 20, 40) and array.shards
        np.testing.assert_array_equal(array[...], zarr.open_array(str(straight / task / "0"))[...])


def test_pyramid_blocks_are_whole_shards_of_a_sharded_level(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pyramid block of the inner chunks only (the read budget halves y and x down to a
    chunk) would share a shard with the blocks beside it: each writer rewrites the whole
    shard file, and threads writing one lose each other's chunks."""
    monkeypatch.setattr(pyramid, "READ_BYTES", 1)  # blocks as small as the write unit allows
    data = np.random.default_rng(2).random((2, 4, 64, 64)).astype(np.float32)
    source = create_volume(tmp_path / "s.zarr", "v", data.shape, data.dtype,
                           chunks=(2, 4, 32, 32), channel_axis=True)
    source[...] = data
    target = create_volume(tmp_path / "t.zarr", "v", (2, 4, 32, 32), data.dtype,
                           chunks=(2, 4, 8, 8), shards=(2, 4, 16, 16), channel_axis=True)
    boxes: list[Roi] = []

    def read(array: zarr.Array, roi: Roi) -> np.ndarray:
        boxes.append(roi)
        return np.asarray(array[tuple(slice(b, e) for b, e in zip(roi.begin, roi.end,
                                                                   strict=True))])

    write_level(source, target, (1, 2, 2), False, read=read, threads=4)
    assert sorted(tuple(b.shape[-2:]) for b in boxes) == [(32, 32)] * 4  # 4 shards, whole
    np.testing.assert_allclose(target[...], pyramid.downsample(data, (1, 2, 2), False),
                               rtol=1e-6)


def sharded_channels(store: Path, seed: int) -> np.ndarray:
    """Random 3-channel uint8 data of 16 x 96 x 96 written to ``store``/v in shards of
    16 x 16 x 16 cut into inner chunks of 8 x 8 x 8 (all channels); returns the data."""
    data = np.random.default_rng(seed).integers(0, 255, (3, 16, 96, 96), dtype=np.uint8)
    array = create_volume(store, "v", data.shape, data.dtype, chunks=(3, 8, 8, 8),
                          shards=(3, 16, 16, 16), channel_axis=True, voxel_size=(30, 6, 6))
    array[...] = data
    return data


def test_a_sharded_volume_s_pyramid_is_sharded_alike_and_resumes_at_its_blocks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pyramid, "BLOCK_ZYX", (2, 8, 8))  # rounded up to whole shards
    data = sharded_channels(tmp_path / "p.zarr", seed=3)
    plain = create_volume(tmp_path / "q.zarr", "v", data.shape, data.dtype,
                          chunks=(3, 16, 16, 16), channel_axis=True, voxel_size=(30, 6, 6))
    plain[...] = data
    assert build_pyramid(tmp_path / "q.zarr/v", 3) == 3
    calls, kill = [0], [True]
    downsample = pyramid.downsample

    def killed_at_the_fifth(*args: Any) -> np.ndarray:
        calls[0] += 1
        if kill[0] and calls[0] == 5:
            raise Stop
        return downsample(*args)

    monkeypatch.setattr(pyramid, "downsample", killed_at_the_fifth)
    with pytest.raises(Stop):  # level 1: 9 shards, 4 written
        build_pyramid(tmp_path / "p.zarr/v", 3, threads=1)
    calls[0], kill[0] = 0, False
    assert build_pyramid(tmp_path / "p.zarr/v", 3, threads=1) == 3
    assert calls[0] == 5 + 4  # level 1's last 5 blocks, then level 2's 4: none done twice
    for level, shape in (("1", (3, 16, 48, 48)), ("2", (3, 16, 24, 24))):
        found = zarr.open_array(str(tmp_path / "p.zarr/v" / level))
        assert (found.shape, found.shards, found.chunks) == (shape, (3, 16, 16, 16),
                                                             (3, 8, 8, 8))
        np.testing.assert_array_equal(found[...], zarr.open_array(
            str(tmp_path / "q.zarr/v" / level))[...])
    record = zarr.open_group(str(tmp_path / "q.zarr/v")).attrs["emrun-pyramid"]["levels"]
    assert all("shards" not in spec for spec in record)  # an unsharded record as before
