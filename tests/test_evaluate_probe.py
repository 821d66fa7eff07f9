"""`emrun evaluate` (in memory, streamed, in blocks), masks, binary scores, connected truth
and `segment --sweep` scoring: what a probe found wrong, each fixed and kept fixed here, and
the scores checked against an independent numpy reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from scipy import ndimage
from test_segeval_probe import NEAREST, SHAPE, VOXEL, boxes, prediction
from typer.testing import CliRunner

from emrun.cli import app
from emrun.errors import UserError
from emrun.evaluate import Parallel, binary_scores, score, score_volumes
from emrun.io import open_volume, write_volume
from emrun.segment.sweep import SweepResult, check_scorable

runner = CliRunner()


def evaluate(*args: object):
    return runner.invoke(app, ["evaluate", *map(str, args)])


def segment(*args: object):
    return runner.invoke(app, ["segment", *map(str, args)])


# --------------------------------------------------------------------------- reference


def reference(seg: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None
              ) -> tuple[float, float, float, int]:
    """(arand, voi_split, voi_merge, voxels) from the definitions, written apart from
    emrun's table: a dense matrix over the ids' ranks, voxels with truth 0 or mask 0 out."""
    keep = truth != 0 if mask is None else (truth != 0) & mask
    _, s = np.unique(seg[keep], return_inverse=True)
    _, t = np.unique(truth[keep], return_inverse=True)
    joint = np.zeros((s.max() + 1, t.max() + 1))
    np.add.at(joint, (s, t), 1)
    sizes_s, sizes_t, total = joint.sum(1), joint.sum(0), joint.sum()
    n2 = (joint ** 2).sum()
    arand = 1 - 2 * n2 / ((sizes_s ** 2).sum() + (sizes_t ** 2).sum())
    p = joint[joint > 0] / total

    def entropy(q: np.ndarray) -> float:
        q = q[q > 0] / total
        return float(-(q * np.log2(q)).sum())

    joint_h = float(-(p * np.log2(p)).sum())
    return arand, joint_h - entropy(sizes_t), joint_h - entropy(sizes_s), int(total)


def reference_pieces(truth: np.ndarray) -> np.ndarray:
    """Each non-zero id's 6-connected pieces as ids of their own (scipy, one id at a time)."""
    out = np.zeros(truth.shape, np.int64)
    count = 0
    for value in np.unique(truth[truth != 0]):
        labels, found = ndimage.label(truth == value)  # default structure: face neighbours
        out[labels > 0] = labels[labels > 0] + count
        count += found
    return out


def close_to(scores, expected: tuple[float, float, float, int]) -> bool:
    arand, split, merge, voxels = expected
    return (abs(scores.arand - arand) < 1e-12 and abs(scores.voi_split - split) < 1e-12
            and abs(scores.voi_merge - merge) < 1e-12 and scores.voxels == voxels)


def random_case(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A blobby truth (few ids, so pieces cross block faces; negative and 0 ids among them),
    a noisy segmentation with 0 and ids above 2^53, and a mask."""
    rng = np.random.default_rng(seed)
    shape = (7, 11, 9)
    coarse = rng.integers(-1, 4, (4, 4, 4))
    truth = coarse[tuple(np.minimum(np.indices(shape)[a] * 4 // shape[a], 3)
                         for a in range(3))].astype(np.int32)
    truth[rng.random(shape) < 0.1] = rng.integers(-1, 4)  # stray voxels: more pieces
    seg = rng.integers(0, 5, shape).astype(np.uint64)
    seg[seg > 2] += np.uint64(2**60)  # 2^60 + 3 and 2^60 + 4 stay apart (not as floats)
    mask = rng.random(shape) > 0.15
    return seg, truth, mask


# --------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_in_memory_streamed_and_blocks_agree_with_an_independent_reference(tmp_path, seed):
    """Adapted Rand and VOI from the definitions, against the truth as labelled and against
    its connected pieces, for every way evaluate scores a volume (slabs of a few voxels,
    blocks that cut the pieces at odd places)."""
    seg, truth, mask = random_case(seed)
    for name, array in (("seg", seg), ("truth", truth), ("mask", mask.astype(np.uint8))):
        write_volume(tmp_path / "v.zarr", name, array, chunks=(2, 4, 3))
    volumes = [open_volume(f"{tmp_path}/v.zarr/{n}") for n in ("seg", "truth", "mask")]
    for connected in (False, True):
        expected = reference(seg, reference_pieces(truth) if connected else truth, mask)
        assert close_to(score(seg, truth, mask, connected_truth=connected), expected)
        streamed = score_volumes(*volumes, connected_truth=connected, slab_voxels=20)
        assert close_to(streamed, expected)
        for block in ((3, 5, 4), (7, 2, 9)):
            blocks = score_volumes(*volumes, connected_truth=connected,
                                   parallel=Parallel(workers=1, block=block))
            assert blocks == streamed


def test_connected_truth_joins_pieces_only_through_other_blocks(tmp_path):
    """A U-shaped object whose arms meet only in the last block, and an object of the same
    id in two disconnected pieces: one whole object and two pieces, with every block size."""
    truth = np.zeros((1, 12, 12), np.uint32)
    truth[0, 0:10, 1] = truth[0, 0:10, 4] = truth[0, 9, 1:5] = 5  # a U, joined at y=9
    truth[0, 0:4, 8] = truth[0, 6:10, 8] = 7  # id 7 twice, cut at y=4..5
    seg = np.where(truth == 7, 7, 0).astype(np.uint32)  # one segment for both 7s, 0 elsewhere
    seg[0, 6:10, 8] = 8
    write_volume(tmp_path / "v.zarr", "seg", seg)
    write_volume(tmp_path / "v.zarr", "truth", truth)
    volumes = [open_volume(f"{tmp_path}/v.zarr/{n}") for n in ("seg", "truth")]
    expected = reference(seg, reference_pieces(truth))
    for block in ((1, 3, 3), (1, 5, 2), (1, 12, 12)):
        found = score_volumes(*volumes, connected_truth=True,
                              parallel=Parallel(workers=1, block=block))
        assert found.truth_objects == 3 and close_to(found, expected)
        assert found.arand == 0.0  # segment 7 and 8 are the two pieces; U is one segment


def test_two_dimensional_volumes_in_blocks_with_connected_truth(tmp_path):
    """(y, x) volumes are scored in blocks as one section, pieces joined across blocks."""
    seg, truth, _ = random_case(3)
    zarr.save_array(str(tmp_path / "s.zarr"), seg[2])
    zarr.save_array(str(tmp_path / "t.zarr"), truth[2])
    result = evaluate(tmp_path / "s.zarr", tmp_path / "t.zarr", "--connected-truth",
                      "--workers", "1", "--block", "1", "4", "3", "--json")
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout.strip().splitlines()[-1])
    arand, split, merge, voxels = reference(seg[2], reference_pieces(truth[2:3])[0])
    assert found["voxels"] == voxels and abs(found["arand"] - arand) < 1e-12
    assert abs(found["voi_split"] - split) < 1e-12 and abs(found["voi_merge"] - merge) < 1e-12


# --------------------------------------------------------------------------- masks


def nan_mask() -> np.ndarray:
    """A float mask with no value (NaN) in its first three sections, 1 elsewhere."""
    mask = np.ones(SHAPE, np.float32)
    mask[:3] = np.nan
    return mask


def test_nan_in_a_float_mask_is_outside_in_memory():
    """NaN != 0, so NaN voxels of a float mask (resampled, registered) were scored as inside."""
    truth, mask = boxes(), nan_mask()
    seg = truth.copy()
    seg[:3] = 1  # wrong only where the mask has no value
    assert score(seg, truth, mask).voxels == truth[3:].size
    assert score(seg, truth, mask).arand == 0.0
    counts = binary_scores(seg > 4, truth > 4, mask)
    assert counts.voxels == truth[3:].size and counts.fp == counts.fn == 0


@pytest.mark.parametrize("blocks", [[], ["--workers", "1", "--block", "2", "24", "24"]],
                         ids=["streamed", "blocks"])
@pytest.mark.parametrize("binary", [[], ["--binary"]], ids=["ids", "binary"])
def test_nan_in_a_float_mask_is_outside_on_disk(tmp_path, blocks, binary):
    truth = boxes()
    seg = truth.copy()
    seg[:3] = 1
    write_volume(tmp_path / "v.zarr", "seg", seg)
    write_volume(tmp_path / "v.zarr", "truth", truth)
    write_volume(tmp_path / "v.zarr", "mask", nan_mask())
    result = evaluate(f"{tmp_path}/v.zarr/seg", f"{tmp_path}/v.zarr/truth", "--mask",
                      f"{tmp_path}/v.zarr/mask", "--json", *blocks, *binary)
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["voxels"] == truth[3:].size
    assert found.get("arand", 0.0) == 0.0 and found.get("fp", 0) == 0


@pytest.mark.parametrize("blocks", [[], ["--workers", "1"]], ids=["streamed", "blocks"])
def test_an_all_nan_mask_is_named_as_the_empty_mask(tmp_path, blocks):
    write_volume(tmp_path / "v.zarr", "seg", boxes())
    write_volume(tmp_path / "v.zarr", "mask", np.full(SHAPE, np.nan, np.float32))
    result = evaluate(f"{tmp_path}/v.zarr/seg", f"{tmp_path}/v.zarr/seg", "--mask",
                      f"{tmp_path}/v.zarr/mask", *blocks)
    assert result.exit_code == 2, result.output
    assert "v.zarr/mask: the mask is 0 everywhere" in result.stderr


def test_sweep_function_takes_nan_in_a_float_mask_as_outside():
    """`sweep` (the trainer's validation, scripts) segmented and scored NaN voxels."""
    from emrun.recipe.run import ConnectedComponents
    from emrun.segment.sweep import sweep

    truth = boxes()
    affs = np.full((3, *truth.shape), 0.9, np.float32)
    found = sweep(affs, NEAREST, ConnectedComponents(), [0.5],
                  truth, nan_mask(), workers=1)
    assert found.best_scores["voxels"] == truth[3:].size
    assert (found.segmentation[:3] == 0).all()


def test_segment_sweep_takes_nan_in_a_float_mask_as_outside(tmp_path):
    truth = boxes()
    affs = prediction(tmp_path, truth)
    write_volume(tmp_path / "t.zarr", "l", truth, voxel_size=VOXEL)
    write_volume(tmp_path / "m.zarr", "l", nan_mask(), voxel_size=VOXEL)
    result = segment(affs, tmp_path / "o.zarr", "--method", "cc", "--sweep", "--truth",
                     f"{tmp_path}/t.zarr/l", "--mask", f"{tmp_path}/m.zarr/l",
                     "--threshold", "0.3,0.5", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["sweep"]["best"]["voxels"] == truth[3:].size


# --------------------------------------------------------------------------- binary


@pytest.mark.parametrize("blocks", [[], ["--workers", "1"]], ids=["streamed", "blocks"])
def test_logits_are_refused_naming_the_prediction(tmp_path, blocks):
    """'the prediction holds values in [...]' said which volume nowhere."""
    rng = np.random.default_rng(0)
    write_volume(tmp_path / "p.zarr", "logits", rng.normal(0, 3, (4, 8, 8)).astype(np.float32))
    write_volume(tmp_path / "p.zarr", "truth", np.ones((4, 8, 8), np.uint8))
    result = evaluate(f"{tmp_path}/p.zarr/logits", f"{tmp_path}/p.zarr/truth", "--binary",
                      *blocks)
    assert result.exit_code == 2, result.output
    assert "p.zarr/logits: the prediction holds values in" in result.stderr


# --------------------------------------------------------------------------- sweeps


@pytest.fixture
def swept(tmp_path: Path) -> tuple[Path, str]:
    """(folder, affinities) of the eight boxes."""
    return tmp_path, prediction(tmp_path, boxes())


def test_sweep_warns_about_negative_truth_ids_as_evaluate_does(swept):
    """evaluate warns that negative ids are objects; segment --sweep scored them silently."""
    tmp, affs = swept
    truth = boxes().astype(np.int32)
    truth[:, :2] = -1  # 'unlabelled' in some tools
    write_volume(tmp / "t.zarr", "l", truth, voxel_size=VOXEL)
    result = segment(affs, tmp / "o.zarr", "--method", "cc", "--sweep", "--truth",
                     f"{tmp}/t.zarr/l", "--threshold", "0.3,0.5")
    assert result.exit_code == 0, result.output
    assert "t.zarr/l holds negative ids: each is scored as an object" in result.stderr
    said = evaluate(f"{tmp}/o.zarr/segmentation", f"{tmp}/t.zarr/l")
    assert "t.zarr/l holds negative ids: each is scored as an object" in said.stderr


def test_check_scorable_hands_the_warning_to_its_caller():
    lines: list[str] = []
    check_scorable(np.array([[[-1, 2]]], np.int64), None, "t", warn=lines.append)
    assert lines and "holds negative ids" in lines[0]
    check_scorable(np.array([[[0, 2]]], np.int64), None, "t", warn=lines.append)
    assert len(lines) == 1


@pytest.mark.parametrize("connected", [[], ["--connected-truth"]], ids=["as-is", "pieces"])
def test_sweep_refuses_a_bool_truth_before_segmenting_naming_it(swept, connected):
    """A bool truth failed after the first value was segmented, as 'truth: truth has dtype
    bool' (no volume named); with --connected-truth it was scored, which evaluate refuses."""
    tmp, affs = swept
    write_volume(tmp / "b.zarr", "l", boxes() > 4, voxel_size=VOXEL)
    result = segment(affs, tmp / "o.zarr", "--method", "cc", "--sweep", "--truth",
                     f"{tmp}/b.zarr/l", "--threshold", "0.3,0.5", *connected)
    assert result.exit_code == 2, result.output
    assert "b.zarr/l: the truth has dtype bool, not integer ids" in result.stderr
    assert "segmenting at" not in result.stderr


def result_of(values: list[float], arand: list[float]) -> SweepResult:
    scores = tuple({"arand": a} for a in arand)
    best = int(np.argmin(arand))
    return SweepResult("cc", "threshold", tuple(values), scores, best, np.zeros(1))


@pytest.mark.parametrize(("values", "arand", "edge"), [
    ([0.3, 0.5, 0.7], [0.0, 0.0, 0.0], False),  # all perfect: the first is chosen, not an edge
    ([0.3, 0.5, 0.7], [0.1, 0.1, 0.2], False),  # tied with a value inside the range
    ([0.3, 0.7], [0.1, 0.1], False),  # both ends tie: no direction to widen in
    ([0.3, 0.5, 0.7], [0.1, 0.2, 0.3], True),
    ([0.7, 0.5, 0.3], [0.3, 0.2, 0.1], True),  # values need not be sorted
    ([0.3, 0.5, 0.7], [0.2, 0.1, 0.3], False),
    ([0.5], [0.1], False),
])
def test_at_edge_only_when_one_edge_alone_scores_best(values, arand, edge):
    assert result_of(values, arand).at_edge is edge


def test_a_sweep_tied_at_zero_prints_no_edge_note(swept):
    tmp, affs = swept
    write_volume(tmp / "t.zarr", "l", boxes(), voxel_size=VOXEL)
    result = segment(affs, tmp / "o.zarr", "--method", "cc", "--sweep", "--truth",
                     f"{tmp}/t.zarr/l", "--threshold", "0.3,0.5,0.7")
    assert result.exit_code == 0, result.output
    assert "arand 0.0000" in result.stdout and "edge of the values" not in result.stderr


def test_check_scorable_refuses_float_truth_in_memory():
    with pytest.raises(UserError, match="t: the truth has dtype float32"):
        check_scorable(np.ones((1, 2, 2), np.float32), None, "t")


# --------------------------------------------------------------------------- work folder


def test_a_users_folder_sharing_the_work_prefix_is_not_removed(tmp_path):
    """Cleaning up killed runs removed any emrun-evaluate-* folder a minute old in the work
    folder, a user's own results included; only folders of evaluate's own files go."""
    import os
    import time

    write_volume(tmp_path / "v.zarr", "seg", boxes())
    work = tmp_path / "scratch"
    mine, killed = work / "emrun-evaluate-results", work / "emrun-evaluate-x1"
    for folder, names in ((mine, ["table.csv"]),
                          (killed, ["block-0.npz", "launched/" + "0a" * 16])):
        for name in names:  # a --launch'ed worker killed: its start file stays
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text("kept")
        os.utime(folder, (time.time() - 3600,) * 2)
    result = evaluate(f"{tmp_path}/v.zarr/seg", f"{tmp_path}/v.zarr/seg", "--workers", "1",
                      "--work-dir", work)
    assert result.exit_code == 0, result.output
    assert (mine / "table.csv").read_text() == "kept" and not killed.exists()


def test_a_refused_volume_leaves_no_work_folder_behind(tmp_path):
    """--work-dir was made while the options were checked, before the volumes were opened,
    so a mistyped volume path left an empty folder (and its missing parents) behind."""
    work = tmp_path / "new" / "work"
    result = evaluate(f"{tmp_path}/missing.zarr/seg", f"{tmp_path}/missing.zarr/seg",
                      "--workers", "1", "--work-dir", work)
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("blocked", ["file", "readonly"])
def test_a_work_folder_that_cannot_be_made_is_refused_before_the_volumes(tmp_path, blocked):
    import os

    if blocked == "file":
        (tmp_path / "f").write_text("")
        work, said = tmp_path / "f" / "w", "is not a folder"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        (tmp_path / "ro").mkdir(mode=0o500)
        work, said = tmp_path / "ro" / "w", "is not writable"
    result = evaluate(f"{tmp_path}/missing.zarr/seg", f"{tmp_path}/missing.zarr/seg",
                      "--workers", "1", "--work-dir", work)
    assert result.exit_code == 2, result.output
    assert f"--work-dir {work}: cannot make a folder there" in result.stderr
    assert said in result.stderr
