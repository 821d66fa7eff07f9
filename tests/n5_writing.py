"""N5 nodes as other tools write them (n5-viewer, BigDataViewer, paintera), for the N5
tests: a dataset through tensorstore with the attributes a test gives, a group's
attributes, and where an opened volume's voxel 0 lies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from emrun.io import open_volume


def n5_attrs(folder: Path, **extra: object) -> None:
    """Merge ``extra`` into the node's attributes.json (a group's is created)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "attributes.json"
    found = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**found, **extra}))


def n5_dataset(folder: Path, data: np.ndarray, block: list[int] | None = None,
               codec: str = "raw", **extra: object) -> None:
    """An N5 dataset of ``data`` (z, y, x[, c]; N5 lists dimensions x first), with
    ``extra`` attributes."""
    ts = pytest.importorskip("tensorstore")
    store = ts.open({"driver": "n5", "kvstore": {"driver": "file", "path": str(folder)},
                     "metadata": {"dimensions": list(data.shape[::-1]),
                                  "blockSize": block or [8, 8, 4],
                                  "dataType": str(data.dtype), "compression": {"type": codec}},
                     "create": True}).result()
    store[...] = data.T
    if extra:
        n5_attrs(folder, **extra)


def voxel_0_at(path: str) -> tuple[float, ...]:
    """Where (nm, z, y, x) the volume's voxel 0 lies: its offset voxels plus its shift."""
    volume = open_volume(path)
    assert volume.voxel_size is not None
    offset = volume.offset or (0, 0, 0)
    shift = volume.shift_nm or (0.0, 0.0, 0.0)
    return tuple(o * v + s for o, v, s in zip(offset, volume.voxel_size, shift, strict=True))


def n5_viewer(tmp_path: Path, levels: tuple[np.ndarray, ...],
              factors: tuple[list[int], ...]) -> Path:
    """An n5-viewer pyramid (``setup0/timepoint0/sN``): every level its factors (x, y, z)
    and level 0's pixelResolution (4 x 4 x 30 nm), the group nothing."""
    group = tmp_path / "viewer.n5" / "setup0" / "timepoint0"
    pixel = {"dimensions": [4.0, 4.0, 30.0], "unit": "nm"}
    for index, (data, level_factors) in enumerate(zip(levels, factors, strict=True)):
        n5_dataset(group / f"s{index}", data, downsamplingFactors=level_factors,
                   pixelResolution=pixel)
    return group
