"""`emrun bench segment` stores its synthetic affinities as `emrun infer` stores its outputs
(zarr 3 shards of the layout's chunks, cut into inner chunks): with unsharded chunks of the
whole block, its fragments figures included decoding the 26 neighbouring chunks whole for
each block's 2 x 8 x 8 halo, a cost the pipeline on infer's outputs no longer pays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from test_infer import make_inputs

from emrun.bench import segment
from emrun.bench.segment import affinity_layout, make_affinities, report_lines
from emrun.infer.run import run_inference


def _array(path: str) -> zarr.Array:
    return zarr.open_array(f"{path}/0", mode="r")


def test_the_affinities_are_sharded_as_infer_shards_an_output_of_that_block(
        tmp_path: Path) -> None:
    shape, block = (16, 20, 80), (16, 20, 40)
    recipe, _, _, tmp = make_inputs(tmp_path, shape=shape)
    run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), tmp / "out.zarr",
                  block=block)
    inferred = zarr.open_array(str(tmp / "out.zarr/aff/0"), mode="r")
    bench = _array(make_affinities(tmp / "bench", shape, block, 1))
    assert bench.shards == (3, 16, 20, 40) and bench.chunks == (3, 8, 20, 40)
    assert inferred.shards is not None  # the channels differ (3 here), the spatial layout not
    assert (bench.shards[1:], bench.chunks[1:]) == (inferred.shards[1:], inferred.chunks[1:])


def test_a_block_wider_than_infer_s_chunks_is_whole_shards_holding_the_same_values(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A block of 300 in x is two of infer's chunks (the largest divisor up to 256), each a
    shard cut into inner chunks of at most 128; the values are those of the unsharded
    layout the bench wrote before (generation is seeded by the block, not the storage)."""
    shape, block = (8, 40, 600), (8, 40, 300)
    sharded = _array(make_affinities(tmp_path / "sharded", shape, block, 1))
    assert sharded.shards == (3, 8, 40, 150) and sharded.chunks == (3, 8, 40, 75)
    monkeypatch.setattr(segment, "affinity_layout", lambda s, b: ((3, *b), None))
    plain = _array(make_affinities(tmp_path / "plain", shape, block, 1))
    assert plain.shards is None and plain.chunks == (3, *block)
    np.testing.assert_array_equal(sharded[...], plain[...])
    assert np.unique(sharded[...]).size > 100  # generated, not left at zero


@pytest.mark.parametrize(("shape", "block"), [
    ((128, 1024, 1024), (32, 512, 512)),  # 4 shards of 32 x 256 x 256 per block
    ((20, 300, 500), (32, 256, 256)),  # cut short at the volume's end
    ((37, 64, 64), (37, 64, 64)),  # a prime axis spanned by one block: chunks of 19
    ((100, 100, 100), (37, 50, 50)),  # blocks of a prime length, not spanning
])
def test_each_shard_lies_in_one_block(shape: tuple[int, int, int],
                                      block: tuple[int, int, int]) -> None:
    """Blocks are written by parallel workers: two writing into one shard would each
    rewrite its file, losing the other's voxels."""
    chunks, shards = affinity_layout(shape, block)
    unit = shards if shards is not None else chunks
    assert unit[0] == 3 and (shards is None or all(
        s % c == 0 for s, c in zip(shards, chunks, strict=True)))
    for n, b, u in zip(shape, block, unit[1:], strict=True):
        assert b >= n or b % u == 0, (shape, block, unit)


def test_the_report_names_the_shards_and_inner_chunks() -> None:
    result = {"shape": [64, 512, 512], "block": [32, 512, 512], "threshold": 0.5,
              "agglomeration": "global", "voxels": 64 * 512 * 512, "machine": "m", "runs": [],
              "chunks": [3, 8, 128, 128], "shards": [3, 32, 256, 256]}
    assert "in shards of 3x32x256x256 (inner chunks 3x8x128x128), block 32x512x512" \
        in report_lines(result)[0]
    result.update(chunks=[3, 2, 2, 2], shards=None)
    assert "in unsharded chunks of 3x2x2x2, block" in report_lines(result)[0]
