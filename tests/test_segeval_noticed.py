"""`emrun segment` and `emrun evaluate`: problems noticed in segmentation and evaluation
(2-d affinities of one section, negative ids outside sample boxes, odd but valid inputs),
each fixed and kept fixed here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from emrun.cli import app
from emrun.data.targets import Affinity, Patch
from emrun.io import open_volume, write_volume

runner = CliRunner()

NEAREST = ((-1, 0, 0), (0, -1, 0), (0, 0, -1))
LONG = ((0, -3, 0), (0, 0, -3))


def invoke(*args: object):
    return runner.invoke(app, [*map(str, args)])


def quadrants(shape: tuple[int, int, int] = (1, 24, 24)) -> np.ndarray:
    """Four cells (ids 1..4), the quadrants of each section."""
    _, y, x = np.indices(shape)
    return (1 + (y >= shape[1] // 2) * 2 + (x >= shape[2] // 2)).astype(np.uint32)


def noisy_affinities(truth: np.ndarray, offsets, seed: int = 0) -> np.ndarray:
    """float32 affinities of ``truth``: about 0.8 inside a cell, 0.2 across, with noise."""
    target, _ = Affinity(tuple(offsets), relabel=False)(Patch(labels=truth))
    rng = np.random.default_rng(seed)
    return np.clip(target * 0.6 + 0.2 + rng.normal(0, 0.1, target.shape), 0, 1).astype(
        np.float32)


def write_affinities(folder: Path, name: str, affs: np.ndarray, offsets) -> str:
    write_volume(folder / f"{name}.zarr", "affinity", affs, channel_axis=True,
                 attrs={"offsets": [list(o) for o in offsets]})
    return f"{folder}/{name}.zarr/affinity"


# --------------------------------------------------------------------------- 2-d affinities


@pytest.fixture
def one_section(tmp_path: Path) -> tuple[Path, str, str]:
    """(folder, 3-channel-plus-long-range affinities, the same without the z channel) of
    one section (z = 1)."""
    offsets = (*NEAREST, *LONG)
    affs = noisy_affinities(quadrants(), offsets)
    three = write_affinities(tmp_path, "three", affs, offsets)
    two = write_affinities(tmp_path, "two", affs[1:], offsets[1:])
    return tmp_path, three, two


@pytest.mark.parametrize(("method", "extra"), [
    ("mws", ()), ("mws", ("--block", 1, 8, 8)), ("cc", ()), ("cc", ("--block", 1, 8, 8)),
    ("waterz", ()), ("mws", ("--min-size", 40)),
    ("waterz", ("--scheduler", "local", "--workers", 1)),
])
def test_two_d_affinities_of_one_section_segment_as_the_three_channel_ones(
        one_section, method, extra):
    """Offsets without a z channel ([0,-1,0], [0,0,-1], ...) were refused for a one-section
    volume ('no nearest-neighbour affinity along z'), where no z edge exists; waterz then
    failed on its missing z channel. Now each method segments them as it segments the same
    affinities with a z channel (which one section never uses)."""
    tmp, three, two = one_section
    got = []
    for name, affs in (("three", three), ("two", two)):
        out = tmp / f"{method}-{name}.zarr"
        result = invoke("segment", affs, out, "--method", method, *extra)
        assert result.exit_code == 0, result.output
        got.append(open_volume(f"{out}/segmentation").read())
    assert np.array_equal(got[0], got[1])
    assert len(np.unique(got[1])) == 4  # the four cells, not one, not noise


def test_two_d_affinities_sweep_on_one_section(one_section):
    """The sweep checked the offsets as well (its own check_offsets call)."""
    tmp, _, two = one_section
    write_volume(tmp / "truth.zarr", "labels", quadrants())
    result = invoke("segment", two, tmp / "seg.zarr", "--method", "cc", "--sweep", "--truth",
                    f"{tmp}/truth.zarr/labels", "--threshold", "0.3,0.5")
    assert result.exit_code == 0, result.output
    assert "best threshold 0.5" in result.output


def test_two_d_affinities_of_several_sections_are_still_refused(tmp_path):
    """Sections z > 1 do have z edges: without a z channel they would never join, so the
    refusal stays there, saying which offset to add."""
    affs = noisy_affinities(quadrants((3, 12, 12)), NEAREST)[1:]
    path = write_affinities(tmp_path, "two", affs, NEAREST[1:])
    result = invoke("segment", path, tmp_path / "seg.zarr", "--method", "cc")
    assert result.exit_code == 2, result.output
    assert "no nearest-neighbour affinity along z" in result.output
    assert "(-1, 0, 0)" in result.output and "Traceback" not in result.output


def test_waterz_layout_of_two_d_affinities_has_a_zero_z_channel():
    """waterz takes three channels z, y, x: 2-d affinities get a z channel of 0."""
    pytest.importorskip("waterz")
    from emrun.segment.waterz import waterz_affinities

    affs = noisy_affinities(quadrants(), NEAREST)
    three = waterz_affinities(affs, NEAREST, None)
    two = waterz_affinities(affs[1:], NEAREST[1:], None)
    assert two.shape == (3, 1, 24, 24)
    assert np.array_equal(two, three) and not two[0].any()


# --------------------------------------------------------------------------- negative ids

EVAL_SHAPE = (10, 80, 80)
HIDDEN = (slice(5, 6), slice(40, 42), slice(10, 13))
"""Six voxels that none of the nine sample boxes (corners and centre, 4 x 32 x 32) reads."""


def signed_volumes(tmp_path: Path) -> dict[str, np.ndarray]:
    """int32 truth and segmentation (ids by 10-voxel bands of x), a uint8 mask; the truth
    is -1 and the segmentation -7 on the six hidden voxels, and the segmentation -3 on two
    voxels of truth 0 (not scored)."""
    _, _, x = np.indices(EVAL_SHAPE)
    truth = (1 + x // 10).astype(np.int32)
    truth[0, 0, :2] = 0
    seg = truth.copy()
    truth[HIDDEN] = -1
    seg[HIDDEN] = -7
    seg[0, 0, :2] = -3
    mask = np.ones(EVAL_SHAPE, np.uint8)
    arrays = {"seg": seg, "truth": truth, "mask": mask}
    for name, array in arrays.items():
        write_volume(tmp_path / f"{name}.zarr", name, array, chunks=(2, 40, 40))
    return arrays


@pytest.mark.parametrize("connected_truth", [False, True])
def test_negative_ids_anywhere_are_warned_of_in_memory_streamed_and_in_blocks(
        tmp_path, connected_truth):
    """Negative ids were looked for in nine sample boxes only (and in the truth only): a
    volume's -1 elsewhere went unreported. Now every way of scoring counts the scored
    voxels with negative ids where it reads them and hands the same warnings to ``warn``
    (with connected truth too, whose pieces replace the truth's ids)."""
    from emrun.evaluate import Parallel, score, score_volumes

    arrays = signed_volumes(tmp_path)
    volumes = {name: open_volume(f"{tmp_path}/{name}.zarr/{name}") for name in arrays}
    said: list[str] = []
    want = score(arrays["seg"], arrays["truth"], arrays["mask"],
                 connected_truth=connected_truth, warn=said.append)
    assert said == [
        "the segmentation holds negative ids: each is scored as a segment, as every "
        "segmentation id is (6 scored voxels)",
        "the truth holds negative ids: each is scored as an object (only 0 is unlabelled); "
        "map them to 0 first if they mean unlabelled (6 scored voxels)"]
    blocks = Parallel(scheduler="local", workers=1, block=(4, 32, 32),
                      work_dir=str(tmp_path / "work"))
    names = [str(volumes["seg"]), str(volumes["truth"])]
    for slab_voxels, parallel in ((7_000, None), (10**7, None), (1, blocks)):
        lines: list[str] = []
        got = score_volumes(volumes["seg"], volumes["truth"], volumes["mask"],
                            slab_voxels=slab_voxels, connected_truth=connected_truth,
                            parallel=parallel, warn=lines.append)
        assert got == want
        assert lines == [line.replace("the segmentation", names[0], 1).replace(
            "the truth", names[1], 1) for line in said]
    outside = arrays["mask"].copy()
    outside[HIDDEN] = 0  # negatives outside the mask are not scored: nothing to say
    score(arrays["seg"], arrays["truth"], outside, connected_truth=connected_truth,
          warn=pytest.fail)
    score(arrays["seg"].astype(np.int64) + 7, arrays["truth"].astype(np.uint32),
          warn=pytest.fail)  # none below 0; unsigned ids have no sign


def test_contingency_tables_carry_the_negative_counts_through_merges():
    from emrun.evaluate import count_pairs, merge_tables

    seg = np.array([-1, -1, 2, 3, -4], np.int8)
    truth = np.array([5, -6, 0, -6, 7], np.int64)
    first, second = count_pairs(seg[:3], truth[:3]), count_pairs(seg[3:], truth[3:])
    assert (first.negative, second.negative) == ((2, 1), (1, 1))
    assert merge_tables([first, second]).negative == (3, 2)
    assert count_pairs(seg, truth, mask=np.array([1, 0, 1, 1, 0])).negative == (1, 1)


@pytest.mark.parametrize("extra", [(), ("--workers", "1")])
def test_evaluate_warns_of_negative_ids_outside_the_sample_boxes(tmp_path, extra):
    signed_volumes(tmp_path)
    result = invoke("evaluate", f"{tmp_path}/seg.zarr/seg", f"{tmp_path}/truth.zarr/truth",
                    *extra)
    assert result.exit_code == 0, result.output
    assert "truth.zarr/truth holds negative ids: each is scored as an object" in result.stderr
    assert "seg.zarr/seg holds negative ids: each is scored as a segment" in result.stderr
    assert "(6 scored voxels)" in result.stderr


# --------------------------------------------------------------------------- odd inputs

SHAPE = (4, 16, 16)


@pytest.fixture
def anisotropic(tmp_path: Path) -> tuple[Path, str]:
    """(folder, uint8 affinities of four columns of cells) with anisotropic long-range
    offsets (z 2, y 9, x 9 and a diagonal), wider than the blocks used below."""
    offsets = (*NEAREST, (-2, 0, 0), (0, -9, 0), (0, 0, -9), (-1, -3, -3))
    target, _ = Affinity(offsets, relabel=False)(Patch(labels=quadrants(SHAPE)))
    affs = np.round((target * 0.6 + 0.2) * 255).astype(np.uint8)
    return tmp_path, write_affinities(tmp_path, "aniso", affs, offsets)


@pytest.mark.parametrize("extra", [("--method", "mws"), ("--method", "cc"),
                                   ("--method", "waterz"), ("--scheduler", "local")])
def test_long_range_offsets_without_nearest_neighbours_are_refused_naming_them(
        tmp_path, extra):
    offsets = ((-2, 0, 0), (0, -3, 0), (0, 0, -3))
    affs = write_affinities(tmp_path, "long", np.full((3, *SHAPE), 200, np.uint8), offsets)
    result = invoke("segment", affs, tmp_path / "seg.zarr", *extra)
    assert result.exit_code == 2, result.output
    assert ("no nearest-neighbour affinity along z, y, x (offsets [[-2, 0, 0], [0, -3, 0], "
            "[0, 0, -3]]); segmentation needs one along every axis longer than one voxel: "
            "add (-1, 0, 0), (0, -1, 0), (0, 0, -1)") in " ".join(result.output.split())
    assert not (tmp_path / "seg.zarr/labels/segmentation").exists()


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.int64])
@pytest.mark.parametrize("extra", [("--method", "mws"), ("--method", "cc", "--block", 1, 5, 5),
                                   ("--method", "mws", "--block", 2, 3, 8, "--min-size", 3),
                                   ("--method", "waterz")])
def test_anisotropic_offsets_and_one_voxel_masks_of_any_integer_dtype(anisotropic, dtype,
                                                                      extra):
    """A mask of one voxel (here at the far corner, past every block's start) gives that
    voxel one segment and 0 elsewhere, whatever the method, path or mask dtype."""
    tmp, affs = anisotropic
    mask = np.zeros(SHAPE, dtype)
    mask[-1, -1, -1] = 1
    write_volume(tmp / "mask.zarr", "mask", mask)
    out = tmp / "seg.zarr"
    result = invoke("segment", affs, out, "--mask", f"{tmp}/mask.zarr/mask", *extra)
    assert result.exit_code == 0, result.output
    seg = open_volume(f"{out}/segmentation").read()
    assert seg[-1, -1, -1] == 1 and np.count_nonzero(seg) == 1


@pytest.mark.parametrize("extra", [(), ("--workers", "1"), ("--connected-truth",)])
def test_evaluate_scores_label_dtypes_alike(tmp_path, extra):
    """uint16 segmentation, uint32 or int64 truth, int64 mask: the same scores as uint64."""
    truth = quadrants(SHAPE)
    seg = truth.copy()
    seg[truth == 2] = 1  # two cells merged
    seg[:, 12:, 8:] = 5  # one split
    mask = np.ones(SHAPE, np.int64)
    mask[0] = 0
    lines = []
    for seg_dtype, truth_dtype in ((np.uint64, np.uint64), (np.uint16, np.uint32),
                                   (np.uint16, np.int64)):
        folder = tmp_path / f"{np.dtype(seg_dtype).name}-{np.dtype(truth_dtype).name}"
        write_volume(folder / "v.zarr", "seg", seg.astype(seg_dtype))
        write_volume(folder / "v.zarr", "truth", truth.astype(truth_dtype))
        write_volume(folder / "v.zarr", "mask", mask)
        result = invoke("evaluate", f"{folder}/v.zarr/seg", f"{folder}/v.zarr/truth",
                        "--mask", f"{folder}/v.zarr/mask", "--json", *extra)
        assert result.exit_code == 0, result.output
        line = json.loads(result.stdout.strip().splitlines()[-1])
        lines.append({k: v for k, v in line.items() if k not in ("seg", "truth", "mask")})
    assert lines[0]["voxels"] == 3 * 16 * 16 and lines[0]["arand"] > 0
    assert lines[1] == lines[0] and lines[2] == lines[0]


@pytest.mark.parametrize("extra", [("--method", "mws"),
                                   ("--method", "waterz", "--threshold", "0.3,0.6")])
def test_a_mask_of_zeros_only_is_warned_of(anisotropic, extra):
    """A mask that is 0 everywhere (the wrong volume, another level) wrote a segmentation of
    zeros and said '0 segments' only; infer warns of the same case."""
    tmp, affs = anisotropic
    write_volume(tmp / "mask.zarr", "mask", np.zeros(SHAPE, np.uint8))
    result = invoke("segment", affs, tmp / "seg.zarr", "--mask", f"{tmp}/mask.zarr/mask",
                    *extra)
    assert result.exit_code == 0, result.output
    assert "holds zeros only: --mask" in result.stderr
    one = np.zeros(SHAPE, np.uint8)
    one[0, 0, 0] = 1
    write_volume(tmp / "one.zarr", "mask", one)
    result = invoke("segment", affs, tmp / "seg1.zarr", "--mask", f"{tmp}/one.zarr/mask",
                    *extra)
    assert result.exit_code == 0 and "zeros only" not in result.stderr
