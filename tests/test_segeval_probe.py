"""`emrun segment` in memory (sweeps, masks, truths, output names) and `emrun evaluate`
(binary scores, grids): what a probe found wrong, each fixed and kept fixed here."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from emrun.cli import app
from emrun.data.targets import Affinity, Patch
from emrun.errors import UserError
from emrun.evaluate import binary_scores
from emrun.io import open_volume, write_volume
from emrun.recipe.run import ConnectedComponents
from emrun.segment.sweep import sweep

runner = CliRunner()

NEAREST = ((-1, 0, 0), (0, -1, 0), (0, 0, -1))
SHAPE = (6, 24, 24)
VOXEL = (30, 6, 6)


def boxes() -> np.ndarray:
    """Eight cells: the 2 x 2 x 2 boxes of the volume (ids 1..8)."""
    z, y, x = np.indices(SHAPE)
    return (1 + (z >= 3) * 4 + (y >= 12) * 2 + (x >= 12)).astype(np.uint32)


def prediction(tmp_path: Path, truth: np.ndarray) -> str:
    """uint8 affinities as inference writes them: 0.8 inside a cell, 0.2 across (cc at 0.6
    finds the cells, at 0.1 one segment), with the offsets attribute."""
    target, _ = Affinity(NEAREST, relabel=False)(Patch(labels=truth))
    affs = np.round((target * 0.6 + 0.2) * 255).astype(np.uint8)
    write_volume(tmp_path / "pred.zarr", "affinity", affs, voxel_size=VOXEL, channel_axis=True,
                 attrs={"offsets": [list(o) for o in NEAREST]})
    return f"{tmp_path}/pred.zarr/affinity"


def segment(*args: object):
    return runner.invoke(app, ["segment", *map(str, args)])


def last_json(result) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture
def data(tmp_path: Path) -> tuple[Path, str, str]:
    """(folder, affinities, truth) on one grid."""
    truth = boxes()
    write_volume(tmp_path / "truth.zarr", "labels", truth, voxel_size=VOXEL)
    return tmp_path, prediction(tmp_path, truth), f"{tmp_path}/truth.zarr/labels"


# --------------------------------------------------------------------------- sweeps


def test_sweep_json_parameters_are_the_chosen_value_not_the_spec_default(data):
    """--json said parameters.threshold 0.5 (cc's default) while 0.6 was chosen and written."""
    tmp, affs, truth = data
    out = tmp / "seg.zarr"
    result = segment(affs, out, "--method", "cc", "--sweep", "--truth", truth,
                     "--threshold", "0.1,0.6", "--json")
    assert result.exit_code == 0, result.output
    report = last_json(result)
    assert report["sweep"]["chosen"] == 0.6
    assert report["parameters"]["threshold"] == 0.6
    assert report["outputs"][0]["threshold"] == 0.6
    assert "best threshold 0.6" in result.stderr  # the text (on stderr with --json) agrees
    meta = dict(zarr.open_group(str(out / "labels/segmentation"), mode="r").attrs)["emrun"]
    assert meta["segment"]["segmenter"] == report["parameters"]


def test_sweep_with_an_empty_mask_names_the_mask_and_segments_nothing(data):
    """An all-0 mask was reported as 'the truth has no labelled voxel', after segmenting."""
    tmp, affs, truth = data
    write_volume(tmp / "mask.zarr", "mask", np.zeros(SHAPE, np.uint8), voxel_size=VOXEL)
    result = segment(affs, tmp / "seg.zarr", "--method", "cc", "--sweep", "--truth", truth,
                     "--mask", f"{tmp}/mask.zarr/mask", "--threshold", "0.2,0.6")
    assert result.exit_code == 2, result.output
    assert "mask.zarr/mask: the mask is 0 everywhere" in result.stderr
    assert "truth has no labelled voxel" not in result.stderr
    assert "segmenting at" not in result.stderr
    assert not (tmp / "seg.zarr/labels/segmentation").exists()


def test_sweep_with_an_empty_truth_is_refused_before_any_value_is_segmented(data):
    """An all-0 truth was found only after every value had been segmented (minutes)."""
    tmp, affs, _ = data
    write_volume(tmp / "zero.zarr", "labels", np.zeros(SHAPE, np.uint32), voxel_size=VOXEL)
    result = segment(affs, tmp / "seg.zarr", "--method", "cc", "--sweep", "--truth",
                     f"{tmp}/zero.zarr/labels", "--threshold", "0.2,0.6")
    assert result.exit_code == 2, result.output
    assert "zero.zarr/labels: the truth has no labelled voxel (all 0)" in result.stderr
    assert "segmenting at" not in result.stderr and "adapted Rand error" not in result.stderr


def test_sweep_function_refuses_a_truth_outside_the_mask_before_segmenting(monkeypatch):
    """The trainer's validation calls `sweep` directly: the same checks, before the work."""
    module = importlib.import_module("emrun.segment.sweep")  # the package names a function so

    def never(*args, **kwargs):
        raise AssertionError("segmented although nothing could be scored")

    monkeypatch.setattr(module, "segment_values", never)
    truth = boxes()
    affs = np.full((3, *SHAPE), 0.9, np.float32)
    mask = np.zeros(SHAPE, bool)
    mask[0, 0, 0] = True
    truth[0, 0, 0] = 0
    with pytest.raises(UserError, match="no labelled voxel inside the mask"):
        sweep(affs, NEAREST, ConnectedComponents(), [0.5, 0.6], truth, mask, workers=1)
    with pytest.raises(UserError, match="the mask is 0 everywhere"):
        sweep(affs, NEAREST, ConnectedComponents(), [0.5, 0.6], truth, mask & False, workers=1)


@pytest.mark.parametrize(("where", "message"), [
    ({"voxel_size": (40, 4, 4)}, "voxel size [40.0, 4.0, 4.0] nm but the affinities"),
    ({"voxel_size": VOXEL, "offset": (1, 0, 0)}, "lies at offset [1, 0, 0] (voxels)"),
])
def test_sweep_refuses_a_truth_on_another_grid(data, where, message):
    """A truth of the same shape but another voxel size or offset was scored voxel by voxel
    against affinities of other places (evaluate refuses the offset; now both refuse both)."""
    tmp, affs, _ = data
    write_volume(tmp / "other.zarr", "labels", boxes(), **where)
    result = segment(affs, tmp / "seg.zarr", "--method", "cc", "--sweep", "--truth",
                     f"{tmp}/other.zarr/labels", "--threshold", "0.6")
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output


def test_a_mask_with_its_channel_axis_is_taken_and_one_on_another_grid_refused(data):
    """A (1, z, y, x) mask (as inference writes one-channel tasks) was refused as of another
    shape, though `evaluate` takes it; a mask of another voxel size was taken silently."""
    tmp, affs, _ = data
    mask = np.ones(SHAPE, np.uint8)
    mask[:, :4] = 0
    write_volume(tmp / "m.zarr", "c1", mask[None], voxel_size=VOXEL, channel_axis=True)
    write_volume(tmp / "m.zarr", "coarse", mask, voxel_size=(60, 12, 12))
    result = segment(affs, tmp / "seg.zarr", "--method", "cc", "--mask", f"{tmp}/m.zarr/c1")
    assert result.exit_code == 0, result.output
    seg = open_volume(tmp / "seg.zarr/segmentation").read()
    assert (seg[:, :4] == 0).all() and (seg[:, 4:] != 0).all()
    result = segment(affs, tmp / "other.zarr", "--method", "cc", "--mask",
                     f"{tmp}/m.zarr/coarse")
    assert result.exit_code == 2 and "voxel size [60.0, 12.0, 12.0] nm" in result.stderr


# --------------------------------------------------------------------------- outputs


def test_values_that_name_the_same_output_are_refused_before_writing(data):
    """0.1234561 and 0.1234562 both name `segmentation_0.123456`: the first was written,
    the second failed on it (exit 2 after work, half the outputs there)."""
    tmp, affs, _ = data
    out = tmp / "seg.zarr"
    result = segment(affs, out, "--method", "cc", "--threshold", "0.1234561,0.1234562")
    assert result.exit_code == 2, result.output
    assert "two of the values given name the same output" in result.stderr
    assert not (out / "labels").exists()


@pytest.mark.parametrize("block", [[], ["--block", "3", "12", "12"]], ids=["memory", "blocks"])
def test_json_parameters_of_several_values_list_them(data, block):
    """With one output per value, parameters.threshold was cc's default 0.5, a value that
    was not run; now the values run, as the graph pipeline's `thresholds` are."""
    tmp, affs, _ = data
    result = segment(affs, tmp / "seg.zarr", "--method", "cc", "--threshold", "0.3,0.7",
                     *block, "--json")
    assert result.exit_code == 0, result.output
    report = last_json(result)
    assert report["parameters"]["threshold"] == [0.3, 0.7]
    assert [o["threshold"] for o in report["outputs"]] == [0.3, 0.7]


def test_offsets_that_replace_different_stored_ones_are_noted(data):
    """--offsets silently replaced the stored offsets (a swapped channel order segmented
    into fragments without a word)."""
    tmp, affs, _ = data
    result = segment(affs, tmp / "seg.zarr", "--method", "cc", "--offsets",
                     "0,-1,0 -1,0,0 0,0,-1")
    assert result.exit_code == 0, result.output
    assert "replace the offsets" in result.stderr
    same = segment(affs, tmp / "same.zarr", "--method", "cc", "--offsets",
                   "-1,0,0 0,-1,0 0,0,-1")
    assert same.exit_code == 0 and "replace the offsets" not in same.stderr


# --------------------------------------------------------------------------- evaluate


def test_binary_ratios_without_a_denominator_are_undefined():
    """Recall was 0 when the truth had no foreground, yet 1.0 when neither had any: a ratio
    of 0/0 is now None (null, n/a), whatever the other side holds."""
    empty = np.zeros((2, 2, 2), np.uint8)
    s = binary_scores(np.zeros((2, 2, 2), bool), empty)
    assert (s.precision, s.recall, s.f1, s.iou) == (None, None, None, None)
    s = binary_scores(np.ones((2, 2, 2), bool), empty)
    assert (s.precision, s.recall, s.f1, s.iou, s.fp) == (0.0, None, 0.0, 0.0, 8)
    s = binary_scores(np.zeros((2, 2, 2), bool), empty + 1)
    assert (s.precision, s.recall, s.f1, s.iou, s.fn) == (None, 0.0, 0.0, 0.0, 8)


def test_evaluate_binary_text_and_json_agree_on_undefined_ratios(tmp_path):
    pred = np.zeros(SHAPE, np.float32)
    pred[:, :4] = 0.9
    write_volume(tmp_path / "v.zarr", "pred", pred)
    write_volume(tmp_path / "v.zarr", "truth", np.zeros(SHAPE, np.uint8))
    result = runner.invoke(app, ["evaluate", f"{tmp_path}/v.zarr/pred",
                                 f"{tmp_path}/v.zarr/truth", "--binary", "--json"])
    assert result.exit_code == 0, result.output
    report = last_json(result)
    assert report["recall"] is None and report["precision"] == 0.0 and report["f1"] == 0.0
    assert "recall n/a" in result.stderr and "the truth has no foreground" in result.stderr


def test_evaluate_refuses_a_truth_at_another_voxel_size(tmp_path):
    """Same shape, other grid: scored voxel by voxel without a word."""
    write_volume(tmp_path / "s.zarr", "seg", boxes(), voxel_size=VOXEL)
    write_volume(tmp_path / "t.zarr", "labels", boxes(), voxel_size=(40, 4, 4))
    result = runner.invoke(app, ["evaluate", f"{tmp_path}/s.zarr/seg",
                                 f"{tmp_path}/t.zarr/labels"])
    assert result.exit_code == 2, result.output
    assert "voxel size [40.0, 4.0, 4.0] nm" in result.stderr and "same grid" in result.stderr


@pytest.mark.parametrize("blocks", [[], ["--workers", "1"]], ids=["streamed", "blocks"])
def test_evaluate_with_an_empty_mask_names_the_mask(tmp_path, blocks):
    """An all-0 mask was reported as 'the truth has no labelled voxel (all 0)'."""
    write_volume(tmp_path / "v.zarr", "seg", boxes())
    write_volume(tmp_path / "v.zarr", "mask", np.zeros(SHAPE, np.uint8))
    result = runner.invoke(app, ["evaluate", f"{tmp_path}/v.zarr/seg", f"{tmp_path}/v.zarr/seg",
                                 "--mask", f"{tmp_path}/v.zarr/mask", *blocks])
    assert result.exit_code == 2, result.output
    assert "v.zarr/mask: the mask is 0 everywhere" in result.stderr
    assert "truth has no labelled voxel" not in result.stderr
