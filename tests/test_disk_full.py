"""A full disk while writing volumes (data synth, data convert, segment) is the user's to fix:
exit 2 with one line that says so, never an internal error, and no volume under its final
name."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from emrun.cli import app
from emrun.io.write import write_volume

runner = CliRunner()


@pytest.fixture
def full_disk(monkeypatch):
    """Every chunk zarr stores fails as on a full disk (zarr's group metadata still goes)."""
    from zarr.storage import LocalStore

    real = LocalStore.set

    async def set_or_fail(self, key, value):  # type: ignore[no-untyped-def]
        if key.endswith("zarr.json"):
            return await real(self, key, value)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(LocalStore, "set", set_or_fail)


def check_refused(result, volume):
    assert result.exit_code == 2, result.output
    assert "the disk is full" in result.stderr and "internal error" not in result.stderr
    assert not volume.exists()  # only a .partial name ever held the unfinished volume


def test_synth_convert_and_segment_on_a_full_disk(tmp_path, full_disk):
    result = runner.invoke(app, ["data", "synth", str(tmp_path / "s.zarr"), "--shape", "8",
                                 "64", "64"])
    check_refused(result, tmp_path / "s.zarr" / "image")
    image = np.random.default_rng(0).integers(1, 255, (4, 32, 32), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "in.tif", image, photometric="minisblack")
    result = runner.invoke(app, ["data", "convert", str(tmp_path / "in.tif"),
                                 str(tmp_path / "c.zarr"), "--name", "image"])
    check_refused(result, tmp_path / "c.zarr" / "image")


def test_segment_on_a_full_disk(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    write_volume(tmp_path / "a.zarr", "affinity", rng.random((3, 8, 32, 32), np.float32),
                 channel_axis=True, attrs={"offsets": [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]})
    from zarr.storage import LocalStore

    real = LocalStore.set

    async def set_or_fail(self, key, value):  # type: ignore[no-untyped-def]
        if "seg.zarr" in str(self.root) and not key.endswith("zarr.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return await real(self, key, value)

    monkeypatch.setattr(LocalStore, "set", set_or_fail)
    for extra in ([], ["--block", "8", "16", "16"]):
        result = runner.invoke(app, ["segment", str(tmp_path / "a.zarr/affinity"),
                                     str(tmp_path / "seg.zarr"), *extra])
        check_refused(result, tmp_path / "seg.zarr" / "segmentation")
