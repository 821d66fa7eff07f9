"""Non-finite numbers in blockwise inference: the network's outputs and the input's voxels.

A NaN or infinite network output is blended as 0 (deterministic, resumable) but was never
reported: in an affinity 0 is a boundary, so the segmentation split there unseen. A NaN
input voxel outside the --mask refused every block whose patches saw it, though the
refusal's own advice was to leave such blocks out with --mask.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from test_infer_probe import (
    Lopsided,
    checkpoint,
    lattice,
    probe_recipe,
    read,
    run_job,
    sliding_window,
    volume,  # noqa: F401 (a fixture)
    window_of,
)
from torch import nn
from typer.testing import CliRunner

from emrun.cli import app
from emrun.errors import UserError
from emrun.infer import schedule, worker
from emrun.infer.job import prepare_job, release_job
from emrun.infer.schedule import run_local
from emrun.io.write import write_volume

PATCH, STRIDE, BLOCK = (4, 8, 8), (3, 6, 5), (4, 6, 10)
SPIKES = 3  # non-finite values per patch of `Spiky`


class Spiky(Lopsided):
    """Lopsided, with NaN, +inf and -inf at fixed places of every patch (``value`` there
    instead, when given: what the blend makes of them)."""

    def __init__(self, value: float | None = None) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().forward(x)
        aff, dist = out["aff"].clone(), out["dist"].clone()
        nan, inf = (float("nan"), float("inf")) if self.value is None else (self.value,) * 2
        aff[:, 0, 0, 0, 0] = nan
        aff[:, 2, -1, -1, -1] = -inf
        dist[:, 0, 1, 2, 3] = inf
        return {"aff": aff, "dist": dist}


def make_spiky(recipe) -> nn.Module:
    return Spiky()


def make_zeroed(recipe) -> nn.Module:
    return Spiky(0.0)


def patches_of(shape) -> int:
    return int(np.prod([len(a) for a in lattice(shape, PATCH, STRIDE)]))


def test_non_finite_outputs_are_counted_once_per_patch_and_still_written_as_zero(
        volume, monkeypatch):  # noqa: F811
    """Each lattice patch is counted by the block that owns it: the same count with one
    unit (partial sums handed over) as with one unit per block (recomputed at borders)."""
    image, tmp = volume
    recipe = probe_recipe(PATCH, stride=STRIDE)
    source = str(tmp / "in.zarr/image")
    one = run_job(recipe, tmp, source, tmp / "one.zarr", factory=make_spiky, block=BLOCK)
    zeroed = run_job(recipe, tmp, source, tmp / "zero.zarr", factory=make_zeroed, block=BLOCK)
    monkeypatch.setattr(schedule, "handover_budget", lambda *args, **kwargs: 0)
    many = run_job(recipe, tmp, source, tmp / "many.zarr", factory=make_spiky, block=BLOCK)
    assert many.patches > one.patches  # recomputed patches are not counted twice
    assert one.nonfinite == many.nonfinite == SPIKES * patches_of(image.shape)
    assert zeroed.nonfinite == zeroed.nonfinite_blocks == 0
    assert 1 < one.nonfinite_blocks == many.nonfinite_blocks <= one.done
    for task in ("aff", "dist"):  # written as 0 at full weight, as before
        np.testing.assert_array_equal(read(tmp / "one.zarr", task), read(tmp / "zero.zarr", task))
        np.testing.assert_array_equal(read(tmp / "many.zarr", task), read(tmp / "one.zarr", task))
    whole = run_job(recipe, tmp, source, tmp / "whole.zarr", factory=make_spiky,
                    block=image.shape)
    assert whole.nonfinite == one.nonfinite and whole.nonfinite_blocks == 1


def test_the_count_travels_in_the_done_markers_for_daisy(volume):  # noqa: F811
    """daisy's workers report nothing back but their markers: the scheduler reads the
    count there."""
    image, tmp = volume
    recipe = probe_recipe(PATCH, stride=STRIDE)
    job = prepare_job(recipe, checkpoint(recipe, tmp), str(tmp / "in.zarr/image"),
                      tmp / "o.zarr", block=BLOCK)
    try:
        progress = run_local(job, [("cpu", 1)], model=make_spiky)
        counts = [job.nonfinite(b) for b in job.layout.block_grid()]
    finally:
        release_job(job)
    assert sum(counts) == progress.nonfinite == SPIKES * patches_of(image.shape)
    assert sum(c > 0 for c in counts) == progress.nonfinite_blocks


def test_infer_warns_once_when_the_network_output_nan(volume, monkeypatch):  # noqa: F811
    image, tmp = volume
    recipe = probe_recipe(PATCH, stride=STRIDE)
    (tmp / "r.yaml").write_text(yaml.safe_dump(recipe.resolved()))
    base = ["infer", "--recipe", str(tmp / "r.yaml"), "--checkpoint",
            str(checkpoint(recipe, tmp)), "--input", str(tmp / "in.zarr/image"),
            "--device", "cpu", "--block", *map(str, BLOCK)]
    runner = CliRunner()
    for network, name in ((Lopsided(), "clean"), (Spiky(), "spiky")):
        monkeypatch.setattr(worker, "load_model", lambda *args, network=network: network)
        result = runner.invoke(app, [*base, "--output", str(tmp / f"{name}.zarr")])
        assert result.exit_code == 0, result.output
        said = [line for line in result.stderr.splitlines() if "NaN or infinite" in line]
        if name == "clean":
            assert not said
            continue
        values = SPIKES * patches_of(image.shape)
        assert len(said) == 1 and f"output {values} NaN or infinite values in" in said[0]
        assert "infer.precision=fp32" in said[0] and "checkpoint" in said[0]


@pytest.fixture
def nan_beyond_x20(volume):  # noqa: F811
    """The probe volume with NaN at x < 3 and x >= 20, and a mask that lets in x 5-14."""
    image, tmp = volume
    image = image.copy()
    image[:, :, 20:] = np.nan
    image[:, :, :3] = np.nan
    write_volume(tmp / "nan.zarr", "image", image, voxel_size=(30, 6, 6), offset=(1, 2, 3))
    mask = np.zeros(image.shape, np.uint8)
    mask[:, :, 5:15] = 1
    write_volume(tmp / "nan.zarr", "mask", mask, voxel_size=(30, 6, 6), offset=(1, 2, 3))
    return image, tmp


def test_nan_input_outside_the_mask_reads_as_black(nan_beyond_x20, monkeypatch):
    """Blocks x 0-9 and 10-19 lie inside the mask and their patches reach x -1 and x 26:
    they were refused for NaN voxels the mask leaves out. Those voxels now read as the
    scale's low end (0), in handed-over and recomputed partial sums alike (a recomputed
    batch reads patches beyond the block's input: x -1 to 6 for the block at x 10)."""
    image, tmp = nan_beyond_x20
    recipe = probe_recipe(PATCH, stride=STRIDE)
    options = {"block": BLOCK, "mask_path": str(tmp / "nan.zarr/mask")}
    source = str(tmp / "nan.zarr/image")
    progress = run_job(recipe, tmp, source, tmp / "one.zarr", **options)
    monkeypatch.setattr(schedule, "handover_budget", lambda *args, **kwargs: 0)
    run_job(recipe, tmp, source, tmp / "many.zarr", **options)
    assert progress.empty == progress.done // 3  # the blocks at x 20-22
    want = sliding_window(np.nan_to_num(image, nan=0.0), Lopsided(), PATCH, STRIDE,
                          window_of(recipe))
    for task in ("aff", "dist"):
        got = read(tmp / "one.zarr", task)
        np.testing.assert_allclose(got[..., :20], want[task][..., :20], atol=2e-6, rtol=0)
        assert not got[..., 20:].any()
        np.testing.assert_array_equal(read(tmp / "many.zarr", task), got)


def test_nan_input_inside_the_mask_is_still_refused(nan_beyond_x20):
    image, tmp = nan_beyond_x20
    mask = np.zeros(image.shape, np.uint8)
    mask[:, :, 5:15] = 1
    mask[3, 4, 21] = 1  # one NaN voxel let in: the first block that sees it refuses
    write_volume(tmp / "nan.zarr", "mask2", mask, voxel_size=(30, 6, 6), offset=(1, 2, 3))
    with pytest.raises(UserError, match=r": 1 NaN or infinite voxels inside the mask around "
                       r"block \[0, 0, [12]\]"):
        run_job(probe_recipe(PATCH, stride=STRIDE), tmp, str(tmp / "nan.zarr/image"),
                tmp / "o.zarr", block=BLOCK, mask_path=str(tmp / "nan.zarr/mask2"))
