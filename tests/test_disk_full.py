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


def test_declared_huge_inputs_are_refused_before_any_work(tmp_path):
    """A zarr array can declare 100,000^3 voxels over a few chunks: converting, segmenting or
    predicting it would run for days and then fill the disk; refuse at once, saying what it
    would take."""
    import zarr

    from emrun.models import build_model
    from emrun.recipe import Recipe

    huge = (100_000, 100_000, 100_000)
    image = zarr.create_array(str(tmp_path / "in.zarr"), name="image", shape=huge,
                              chunks=(8, 64, 64), dtype="uint8")
    image[:8, :64, :64] = 7
    affs = zarr.create_array(str(tmp_path / "a.zarr"), name="affinity", shape=(3, *huge),
                             chunks=(3, 8, 64, 64), dtype="float32")
    affs.attrs["offsets"] = [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]
    recipe = Recipe.model_validate({
        "name": "h", "data": {"sources": {"a": {"type": "synthetic", "shape": [8, 32, 32]}}},
        "model": {"type": "rsunet", "widths": [2, 4]},
        "tasks": {"aff": {"target": {"type": "affinity"}}},
        "train": {"patch": [4, 16, 16], "iterations": 1}})
    model = build_model(recipe)  # importing emrun.models registers them: no test order
    import torch
    import yaml

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe.resolved()))
    torch.save({"model": model.state_dict(), "iteration": 1}, tmp_path / "c.pt")
    for args, says in (
            (["data", "convert", str(tmp_path / "in.zarr/image"), str(tmp_path / "o.zarr")],
             "1.0 PB before compression"),
            (["segment", str(tmp_path / "a.zarr/affinity"), str(tmp_path / "s.zarr")],
             "8.0 PB before compression"),
            (["infer", "--checkpoint", str(tmp_path / "c.pt"), "--recipe",
              str(tmp_path / "r.yaml"), "--input", str(tmp_path / "in.zarr/image"),
              "--output", str(tmp_path / "p.zarr"), "--device", "cpu"],
             "3.0 PB before compression")):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert says in result.stderr and "is free there" in result.stderr
    assert not (tmp_path / "p.zarr" / "aff").exists()


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_a_place_this_user_may_not_write_is_the_users_to_fix(tmp_path, monkeypatch, code):
    """A read-only mount or a folder of another user (root runs these tests, so the error is
    raised where the file is written): one line naming the file, exit 2, not a bug report."""
    import emrun.atomic

    target = tmp_path / "ro" / "s.json"

    def refuse(path, text):  # type: ignore[no-untyped-def]
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(emrun.atomic, "write_text", refuse)
    result = runner.invoke(app, ["schema", "--output", str(target)])
    assert result.exit_code == 2, result.output
    assert f"cannot write or read {target} ({os.strerror(code)})" in result.stderr
    assert "internal error" not in result.stderr and len(result.stderr.splitlines()) == 1
