"""How `data convert` lays a volume out on disk for training's random patch reads.

Measured on SNEMI3D (70 x 1024 x 1024, uint8 image + uint16 labels, 2-core VM, zarr 3.1.6):
zarr 3 shards cut into inner chunks (8 x 128 x 128, 16 x 64 x 64, 8 x 256 x 256, 16 x 256 x 256
in shards of 16 x 256 x 256 or 32 x 512 x 512) read a training crop no faster than plain
16 x 256 x 256 chunks (each inner chunk costs zarr ~0.4-1 ms whatever its size), so the
converted layout stays unsharded chunks, one file each, and these tests keep it so.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from emrun.cli import app
from emrun.io import open_volume
from emrun.io.convert import convert
from emrun.io.layout import volume_dir
from emrun.io.pyramid import write_chunks
from emrun.io.write import CHUNK_ZYX

runner = CliRunner()
SHAPE = (20, 300, 260)  # more than one default chunk along every axis, partial ones at the ends


def _volume(dtype: str, seed: int = 0) -> np.ndarray:
    """Random values over the dtype's whole range (every bit pattern matters)."""
    info = np.iinfo(dtype)
    rng = np.random.default_rng(seed)
    return rng.integers(info.min, int(info.max) + 1, SHAPE, dtype=dtype)


def _level_arrays(out: Path, name: str, label: bool) -> list[zarr.Array]:
    """Every level's array of the converted volume `out/name` (under labels/ for a label)."""
    group = zarr.open_group(str(volume_dir(out, name, label)), mode="r")
    names = sorted((name for name, _ in group.arrays()), key=int)
    return [group[name] for name in names]


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int64"])
def test_default_layout_is_unsharded_default_chunks_and_bit_exact(
        tmp_path: Path, dtype: str) -> None:
    data = _volume(dtype)
    np.save(tmp_path / "v.npy", data)
    result = convert(tmp_path / "v.npy", tmp_path / "o.zarr", progress=False)
    assert result.chunks == CHUNK_ZYX == (16, 256, 256)
    levels = _level_arrays(tmp_path / "o.zarr", result.name, dtype != "uint8")
    assert len(levels) >= 2  # the pyramid is built over the same layout
    for array in levels:
        assert array.shards is None  # one chunk, one file: what a reader decodes whole
        assert array.chunks == tuple(min(c, n) for c, n in zip(CHUNK_ZYX, array.shape,
                                                               strict=True))
    written = open_volume(result.path).read()
    assert written.dtype == data.dtype
    assert written.tobytes() == data.tobytes()


def test_each_stored_chunk_is_written_once_by_one_whole_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _volume("uint16")
    np.save(tmp_path / "v.npy", data)
    writes: list[tuple[slice, ...]] = []
    original = zarr.Array.__setitem__

    def spy(self: zarr.Array, selection: Any, value: Any) -> None:
        if self.shape == SHAPE:  # level 0; the pyramid's levels have other shapes
            writes.append(tuple(selection))
            assert write_chunks(self) == (4, 64, 64)
        original(self, selection, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", spy)
    convert(tmp_path / "v.npy", tmp_path / "o.zarr", chunks=(4, 64, 64), progress=False,
            max_slab_bytes=100 * 260 * 2 * 4)  # slabs cut along y, at 64 rows
    monkeypatch.undo()
    unit = (4, 64, 64)
    owners: Counter[tuple[int, ...]] = Counter()
    for selection in writes:
        for axis, (s, c, n) in enumerate(zip(selection, unit, SHAPE, strict=True)):
            assert s.start % c == 0, f"write {selection} starts inside a chunk on axis {axis}"
            assert s.stop % c == 0 or s.stop == n, f"write {selection} ends inside a chunk"
        owners.update(_chunks_of(selection, unit))
    every = {tuple(i) for i in np.ndindex(*(-(-n // c) for n, c in zip(SHAPE, unit,
                                                                          strict=True)))}
    assert set(owners) == every and set(owners.values()) == {1}  # no chunk written twice
    np.testing.assert_array_equal(open_volume(tmp_path / "o.zarr/labels").read(), data)


def _chunks_of(selection: tuple[slice, ...], unit: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The chunk indices a chunk-aligned write covers."""
    ranges = [range(s.start // c, -(-s.stop // c)) for s, c in zip(selection, unit, strict=True)]
    return [tuple(i) for i in np.array(np.meshgrid(*ranges, indexing="ij")).reshape(3, -1).T]


def test_given_chunks_are_the_stored_unsharded_chunks(tmp_path: Path) -> None:
    data = _volume("uint8", seed=1)
    np.save(tmp_path / "v.npy", data)
    out = tmp_path / "c.zarr"
    result = runner.invoke(app, ["data", "convert", str(tmp_path / "v.npy"), str(out),
                                 "--chunks", "8", "32", "64"])
    assert result.exit_code == 0, result.output
    assert "chunks [8, 32, 64]" in result.stdout
    level0 = _level_arrays(out, "image", False)[0]
    assert level0.chunks == (8, 32, 64) and level0.shards is None
    assert open_volume(f"{out}/image").read().tobytes() == data.tobytes()
