"""emrun evaluate: the contingency table, adapted Rand / VOI / CREMI, binary scores, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from emrun.cli import app
from emrun.errors import UserError
from emrun.evaluate import (
    MIN_OVERLAP,
    EvaluationError,
    binary_scores,
    binary_scores_volumes,
    count_pairs,
    score,
    score_volumes,
)
from emrun.evaluate.contingency import TableAccumulator, merge_tables
from emrun.evaluate.volumes import slabs
from emrun.io import open_volume, write_volume

runner = CliRunner()

# Two true objects of 4 voxels; the prediction cuts object 1 in two halves.
TRUTH = np.array([[[1, 1, 1, 1], [2, 2, 2, 2]]], np.uint32)
SPLIT = np.array([[[1, 1, 3, 3], [2, 2, 2, 2]]], np.uint32)


def blobs(rng: np.random.Generator, shape: tuple[int, ...], ids: int, noise: float = 0.1
          ) -> np.ndarray:
    """Blocky random labels (4^3 blocks) with a fraction of voxels relabelled at random."""
    coarse = rng.integers(0, ids, tuple(-(-n // 4) for n in shape))
    labels = coarse.repeat(4, 0).repeat(4, 1).repeat(4, 2)[: shape[0], : shape[1], : shape[2]]
    flip = rng.random(shape) < noise
    labels[flip] = rng.integers(0, ids, int(flip.sum()))
    return labels.astype(np.uint32)


def assert_same(a, b):
    """Equal scores up to float summation order (a relabelling reorders the table)."""
    assert a.as_dict() == pytest.approx(b.as_dict(), rel=1e-12, abs=1e-15)


def test_split_by_hand():
    # Pairs (seg, truth): (1, 1) x2, (3, 1) x2, (2, 2) x4; N = 8.
    # truth sizes T = 4, 4; segment sizes S = 2, 2, 4.
    # sum n^2 = 4 + 4 + 16 = 24; sum T^2 = 32; sum S^2 = 4 + 4 + 16 = 24.
    # rand_split = 24 / 32 = 0.75; rand_merge = 24 / 24 = 1;
    # arand = 1 - 2 * 24 / (32 + 24) = 1 - 48 / 56 = 1 / 7.
    # voi_split = H(seg|truth) = -(1/8) (2 log2(2/4) + 2 log2(2/4) + 4 log2(4/4)) = 4/8 = 0.5.
    # voi_merge = H(truth|seg) = -(1/8) (2 log2(2/2) + 2 log2(2/2) + 4 log2(4/4)) = 0.
    s = score(SPLIT, TRUTH, min_overlap=1)
    assert s.rand_split == pytest.approx(0.75)
    assert s.rand_merge == 1.0
    assert s.arand == pytest.approx(1 / 7)
    assert s.voi_split == pytest.approx(0.5)
    assert s.voi_merge == 0.0
    assert s.voi == pytest.approx(0.5)
    assert s.cremi_score == pytest.approx(math.sqrt(1 / 7 * 0.5))
    assert (s.splits, s.merges) == (1, 0)
    assert (s.voxels, s.truth_objects, s.segments) == (8, 2, 3)


def test_merge_by_hand_is_the_mirror_of_the_split():
    # Same table with the roles swapped: the truth has objects 1 and 3, the prediction
    # joins them: rand_merge = 24 / 32, rand_split = 1, voi_merge = 0.5, voi_split = 0.
    s = score(TRUTH, SPLIT, min_overlap=1)
    assert (s.rand_split, s.rand_merge) == (1.0, pytest.approx(0.75))
    assert (s.voi_split, s.voi_merge) == (0.0, pytest.approx(0.5))
    assert s.arand == pytest.approx(1 / 7)
    assert (s.splits, s.merges) == (0, 1)


def test_three_way_table_by_hand():
    # truth: object 1 (6 voxels), object 2 (2 voxels), 0 (2 voxels, ignored)
    # seg:   a = 5 covers 4 of object 1 and both of object 2; b = 6 covers 2 of object 1;
    #        seg 0 over the truth-0 voxels does not count.
    truth = np.array([[1, 1, 1, 1, 1, 1, 2, 2, 0, 0]], np.uint8)
    seg = np.array([[5, 5, 5, 5, 6, 6, 5, 5, 0, 7]], np.int16)
    # Pairs: (5,1) 4, (6,1) 2, (5,2) 2; N = 8. T = 6, 2; S = 6 (seg 5), 2 (seg 6).
    # sum n^2 = 16 + 4 + 4 = 24; sum T^2 = 36 + 4 = 40; sum S^2 = 36 + 4 = 40.
    # rand_split = rand_merge = 24 / 40 = 0.6; arand = 1 - 48 / 80 = 0.4.
    # voi_split = -(1/8)(4 log2(4/6) + 2 log2(2/6) + 2 log2(2/2)) = -(4 log2(2/3) - 2 log2 3) / 8
    # voi_merge = -(1/8)(4 log2(4/6) + 2 log2(2/2) + 2 log2(2/6)): the same number here.
    s = score(seg, truth, min_overlap=2)
    expected_voi = -(4 * math.log2(4 / 6) + 2 * math.log2(2 / 6)) / 8
    assert s.rand_split == pytest.approx(0.6)
    assert s.rand_merge == pytest.approx(0.6)
    assert s.arand == pytest.approx(0.4)
    assert s.voi_split == pytest.approx(expected_voi)
    assert s.voi_merge == pytest.approx(expected_voi)
    assert (s.splits, s.merges) == (1, 1)  # object 1 in seg 5 and 6; seg 5 over 1 and 2
    assert score(seg, truth, min_overlap=3).as_dict()["splits"] == 0  # overlap of 2 is noise


def test_perfect_segmentation_scores_exactly_zero_under_any_relabelling():
    rng = np.random.default_rng(0)
    truth = blobs(rng, (12, 20, 20), 30, noise=0.0) + 1
    relabel = rng.permutation(200).astype(np.uint64) + (1 << 62)
    s = score(relabel[truth], truth)
    assert (s.arand, s.voi_split, s.voi_merge, s.cremi_score) == (0.0, 0.0, 0.0, 0.0)
    assert (s.rand_split, s.rand_merge, s.splits, s.merges) == (1.0, 1.0, 0, 0)


def test_splitting_lowers_rand_split_only_and_merging_rand_merge_only():
    rng = np.random.default_rng(1)
    truth = blobs(rng, (16, 24, 24), 20, noise=0.0) + 1
    split = truth + np.uint32(1000) * (np.arange(16)[:, None, None] >= 8)  # cut at z = 8
    merged = np.where(truth <= 10, 1, truth)
    s, m = score(split, truth), score(merged, truth)
    assert s.rand_merge == 1.0 and s.voi_merge == 0.0 and s.merges == 0
    assert s.rand_split < 1.0 and s.voi_split > 0.0 and s.splits > 0
    assert m.rand_split == 1.0 and m.voi_split == 0.0 and m.splits == 0
    assert m.rand_merge < 1.0 and m.voi_merge > 0.0 and m.merges == 1


def test_truth_zero_is_ignored_and_predicted_zero_is_a_segment():
    rng = np.random.default_rng(2)
    truth = blobs(rng, (8, 16, 16), 10)
    seg = blobs(rng, (8, 16, 16), 10)
    scrambled = np.where(truth == 0, rng.integers(0, 99, truth.shape), seg).astype(np.uint32)
    assert score(scrambled, truth) == score(seg, truth)
    # Predicted 0 is an ordinary label: renaming it changes nothing.
    assert_same(score(np.where(seg == 0, 77, seg), truth), score(seg, truth))


def test_relabelling_invariance_and_dtypes():
    rng = np.random.default_rng(3)
    truth = blobs(rng, (8, 16, 16), 12)
    seg = blobs(rng, (8, 16, 16), 15)
    base = score(seg, truth)
    truth_map = np.concatenate(([0], rng.permutation(np.arange(1, 12)) + 2**61)).astype(np.uint64)
    seg_map = (rng.permutation(15) - 7).astype(np.int64)  # signed ids, negatives included
    assert_same(score(seg_map[seg], truth_map[truth]), base)
    assert score(seg.astype(np.int16), truth.astype(np.uint8)) == base


def test_huge_uint64_ids():
    ids = np.array([2**64 - 1, 2**63 + 5, 2**60 + 1, 3], np.uint64)
    rng = np.random.default_rng(4)
    small_truth = rng.integers(0, 4, (6, 10, 10))
    small_seg = rng.integers(0, 4, (6, 10, 10))
    table = count_pairs(ids[small_seg], ids[small_truth])
    assert int(table.seg.max()) <= 2**64 - 1 and table.seg.dtype == np.uint64
    assert set(table.truth.tolist()) <= set(ids.tolist())
    expected = score(small_seg.astype(np.uint8), (small_truth + 1).astype(np.uint8))
    assert_same(score(ids[small_seg], ids[small_truth]), expected)


def test_table_is_sorted_unique_and_merges_exactly():
    rng = np.random.default_rng(5)
    truth = blobs(rng, (10, 12, 12), 8)
    seg = blobs(rng, (10, 12, 12), 8)
    whole = count_pairs(seg, truth)
    keys = list(zip(whole.seg.tolist(), whole.truth.tolist(), strict=True))
    assert keys == sorted(set(keys))
    accumulator = TableAccumulator(reduce_every=1)
    for z in range(10):
        accumulator.add(count_pairs(seg[z], truth[z]))
    merged = accumulator.result()
    by_slab = merge_tables([count_pairs(seg[z:z + 3], truth[z:z + 3]) for z in range(0, 10, 3)])
    for table in (merged, by_slab):
        for field in ("seg", "truth", "counts"):
            np.testing.assert_array_equal(getattr(table, field), getattr(whole, field))


def test_streamed_volumes_equal_in_memory_for_any_slab(tmp_path):
    rng = np.random.default_rng(6)
    truth = blobs(rng, (9, 20, 18), 25)
    seg = blobs(rng, (9, 20, 18), 30).astype(np.uint64) * np.uint64(2**40)
    mask = (rng.random(truth.shape) < 0.8).astype(np.uint8)
    write_volume(tmp_path / "v.zarr", "truth", truth, chunks=(2, 8, 8))
    write_volume(tmp_path / "v.zarr", "seg", seg, chunks=(3, 4, 8))
    np.save(tmp_path / "mask.npy", mask)
    volumes = [open_volume(tmp_path / "v.zarr/seg"), open_volume(tmp_path / "v.zarr/truth")]
    mask_volume = open_volume(tmp_path / "mask.npy")
    expected = score(seg, truth, mask, min_overlap=3)
    for slab_voxels in (1, 7, 200, 10**9):
        seen: list[tuple[int, int]] = []
        streamed = score_volumes(*volumes, mask_volume, min_overlap=3, slab_voxels=slab_voxels,
                                 on_slab=lambda done, total, seen=seen: seen.append((done, total)))
        assert streamed == expected
        # progress follows every slab, in order, against a known total
        assert [d for d, _ in seen] == list(range(1, len(seen) + 1))
        assert {t for _, t in seen} == {len(seen)}
    assert score_volumes(*volumes) == score(seg, truth)


def test_slabs_cover_the_volume_once_along_chunks():
    class Fake:
        shape = (10, 30, 7)
        chunks = None

    rois = list(slabs([Fake()], slab_voxels=50))  # no chunks known: 1 section deep
    covered = np.zeros(Fake.shape, int)
    for roi in rois:
        covered[roi.to_slices()] += 1
    assert (covered == 1).all()
    assert all(r.shape[0] == 1 for r in rois)


def test_mask_zero_voxels_are_ignored():
    rng = np.random.default_rng(7)
    truth = blobs(rng, (8, 16, 16), 10)
    seg = blobs(rng, (8, 16, 16), 10)
    mask = rng.random(truth.shape) < 0.5
    assert score(seg, truth, mask) == score(seg, np.where(mask, truth, 0))
    assert score(seg, truth, np.ones_like(mask)) == score(seg, truth)


def test_two_dimensional_images_are_scored():
    assert score(SPLIT[0], TRUTH[0], min_overlap=1) == score(SPLIT, TRUTH, min_overlap=1)


@pytest.mark.parametrize(("seg", "truth", "mask", "message"), [
    (np.zeros((2, 3, 4), np.uint32), np.ones((2, 3, 5), np.uint32), None, "has shape [2, 3, 5]"),
    (np.zeros((2, 3, 4), np.float32), np.ones((2, 3, 4), np.uint32), None, "use --binary"),
    (np.zeros((2, 3, 4), bool), np.ones((2, 3, 4), np.uint32), None, "not integer ids"),
    (np.zeros((2, 2, 3, 4), np.uint32), np.ones((2, 2, 3, 4), np.uint32), None, "4 axes"),
    (np.zeros(5, np.uint32), np.ones(5, np.uint32), None, "1 axes"),
    (np.zeros((2, 3, 4), np.uint32), np.ones((2, 3, 4), np.uint32), np.ones((2, 3)), "mask"),
    (np.zeros((2, 3, 4), np.uint32), np.zeros((2, 3, 4), np.uint32), None, "no labelled voxel"),
])
def test_bad_inputs_raise_user_errors(seg, truth, mask, message):
    with pytest.raises(EvaluationError, match=message.replace("[", r"\[")):
        score(seg, truth, mask)


def test_matches_scikit_image():
    """VOI equals scikit-image's. Its adapted Rand error leaves self-pairs out of every sum
    (sum n^2 - N, sum T^2 - N, sum S^2 - N) and names the split score "precision" and the
    merge score "recall": rebuilt from our table with that formula it is equal; on a large
    volume, where the self-pair terms are small, it is also close to ours."""
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(8)
    for shape, ids in (((6, 10, 10), 5), ((24, 48, 48), 12)):
        truth = blobs(rng, shape, ids)
        seg = np.where(rng.random(shape) < 0.2, blobs(rng, shape, ids + 3), truth + 1)
        ours = score(seg, truth)
        voi = metrics.variation_of_information(truth, seg, ignore_labels=[0])
        assert ours.voi_split == pytest.approx(voi[0], rel=1e-12, abs=1e-12)
        assert ours.voi_merge == pytest.approx(voi[1], rel=1e-12, abs=1e-12)

        table = count_pairs(seg, truth)
        n = table.counts.astype(float)
        t_sizes = np.bincount(np.unique(table.truth, return_inverse=True)[1], weights=n)
        s_sizes = np.bincount(np.unique(table.seg, return_inverse=True)[1], weights=n)
        total = n.sum()
        pairs, t_pairs = n @ n - total, t_sizes @ t_sizes - total
        s_pairs = s_sizes @ s_sizes - total
        are, split_like, merge_like = metrics.adapted_rand_error(truth, seg)
        assert split_like == pytest.approx(pairs / t_pairs, rel=1e-12)
        assert merge_like == pytest.approx(pairs / s_pairs, rel=1e-12)
        assert are == pytest.approx(1 - 2 * pairs / (t_pairs + s_pairs), rel=1e-12)
    assert ours.voxels > 50_000  # the large case: objects of ~5000 voxels, N / sum n^2 ~ 1e-4
    assert ours.rand_split == pytest.approx(split_like, rel=1e-3)
    assert ours.rand_merge == pytest.approx(merge_like, rel=1e-3)
    assert ours.arand == pytest.approx(are, rel=1e-3)


def test_binary_scores_by_hand():
    truth = np.array([[[0, 0, 1, 1, 1, 0]]], np.uint32)
    pred = np.array([[[0.9, 0.1, 0.8, 0.6, 0.2, 0.5]]], np.float32)
    # Foreground > 0.5: voxels 0, 2, 3. tp = 2 (2, 3), fp = 1 (0), fn = 1 (4), tn = 2.
    # precision 2/3, recall 2/3, F1 = 4 / (4 + 1 + 1) = 2/3, IoU = 2 / 4 = 0.5.
    s = binary_scores(pred, truth)
    assert (s.tp, s.fp, s.fn, s.tn, s.voxels) == (2, 1, 1, 2, 6)
    assert (s.precision, s.recall) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert (s.f1, s.iou) == (pytest.approx(2 / 3), 0.5)
    assert binary_scores((pred * 255).astype(np.uint8), truth) == s  # 229, 25, 204, 153, 51, 127
    assert binary_scores(pred > 0.5, truth) == s
    assert binary_scores((pred > 0.5).astype(np.uint16) * 7, truth) == s  # ids: non-zero
    # The mask drops voxels 0 and 4: tp 2, fp 0, fn 0.
    masked = binary_scores(pred, truth, np.array([[[0, 1, 1, 1, 0, 1]]]))
    assert (masked.precision, masked.recall, masked.iou, masked.voxels) == (1.0, 1.0, 1.0, 4)
    assert binary_scores(pred, truth, threshold=0.05).recall == 1.0


def test_binary_refuses_logits_and_leaves_nan_truth_out():
    """Logits were thresholded at 0.5 silently, and NaN in a float truth counted as
    foreground."""
    truth = np.array([[[0, 1, 1, np.nan]]], np.float32)
    pred = np.array([[[0.1, 0.9, 0.2, 0.9]]], np.float32)
    s = binary_scores(pred, truth)
    assert (s.tp, s.fp, s.fn, s.tn) == (1, 1, 1, 1)  # the NaN voxel: predicted, not true
    for logits in (pred * 8 - 4, pred + 1):
        with pytest.raises(UserError, match=r"outside \[0, 1\]: a float prediction is a "
                                            "probability"):
            binary_scores(logits, truth)
    assert binary_scores(np.clip(pred + 1e-6, 0, 1 + 1e-6), truth).tp == 1  # rounding is fine


def test_binary_streamed_equals_in_memory(tmp_path):
    rng = np.random.default_rng(9)
    pred = rng.integers(0, 256, (7, 11, 13)).astype(np.uint8)
    truth = (rng.random(pred.shape) < 0.3).astype(np.uint8)
    write_volume(tmp_path / "v.zarr", "pred", pred, chunks=(2, 4, 4))
    np.save(tmp_path / "truth.npy", truth)
    expected = binary_scores(pred, truth, threshold=0.3)
    volumes = open_volume(tmp_path / "v.zarr/pred"), open_volume(tmp_path / "truth.npy")
    for slab_voxels in (1, 50, 10**9):
        assert binary_scores_volumes(*volumes, threshold=0.3, slab_voxels=slab_voxels) == expected


def _write(tmp_path, name, array):
    path = tmp_path / f"{name}.npy"
    np.save(path, array)
    return str(path)


def test_cli_scores_and_ends_with_one_json_line(tmp_path):
    seg = _write(tmp_path, "seg", np.repeat(SPLIT, 3, axis=0))
    write_volume(tmp_path / "t.zarr", "labels", np.repeat(TRUTH, 3, axis=0))
    result = runner.invoke(app, ["evaluate", seg, str(tmp_path / "t.zarr/labels"), "--json",
                                 "--min-overlap", "1"])
    assert result.exit_code == 0, result.output
    assert "adapted Rand error" in result.stderr and "CREMI score" in result.stderr
    assert len(result.stdout.strip().splitlines()) == 1  # stdout: the JSON line alone
    line = json.loads(result.stdout.strip().splitlines()[-1])
    expected = score(SPLIT, TRUTH, min_overlap=1).as_dict()
    for key in ("arand", "voi_split", "voi_merge", "cremi_score", "rand_split", "rand_merge"):
        assert line[key] == pytest.approx(expected[key])
    assert (line["splits"], line["merges"], line["voxels"]) == (1, 0, 24)
    assert line["truth"].endswith("t.zarr/labels") and line["mode"] == "segmentation"
    assert set(line) >= {f.name for f in dataclasses.fields(score(SPLIT, TRUTH))}


def test_cli_defaults_match_the_library():
    result = runner.invoke(app, ["evaluate", "--help"])
    assert f"default: {MIN_OVERLAP};" in result.output


def test_cli_binary_and_mask(tmp_path):
    pred = _write(tmp_path, "pred", np.array([[[0.9, 0.1, 0.8, 0.6, 0.2, 0.5]]], np.float32))
    truth = _write(tmp_path, "truth", np.array([[[0, 0, 1, 1, 1, 0]]], np.uint8))
    mask = _write(tmp_path, "mask", np.array([[[0, 1, 1, 1, 0, 1]]], np.uint8))
    result = runner.invoke(app, ["evaluate", pred, truth, "--binary", "--json"])
    assert result.exit_code == 0, result.output
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert (line["tp"], line["fp"], line["fn"], line["iou"]) == (2, 1, 1, 0.5)
    result = runner.invoke(app, ["evaluate", pred, truth, "--binary", "--mask", mask, "--json"])
    assert json.loads(result.stdout.strip().splitlines()[-1])["iou"] == 1.0
    # inference writes a single-channel task as (1, z, y, x): scored as (z, y, x)
    channel = _write(tmp_path, "channel", np.array([[[[0.9, 0.1, 0.8, 0.6, 0.2, 0.5]]]],
                                                   np.float32))
    result = runner.invoke(app, ["evaluate", channel, truth, "--binary", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["iou"] == 0.5


@pytest.mark.parametrize(("extra", "message"), [
    (["--threshold", "0.3"], "error: --threshold is for foreground predictions: add --binary"),
    (["--binary", "--min-overlap", "5"], "error: --min-overlap is for segmentations"),
    (["--binary", "--connected-truth"], "error: --connected-truth is for segmentations"),
])
def test_cli_refuses_an_option_of_the_other_scoring_mode(tmp_path, extra, message):
    """Given, an option the chosen mode does not use would be ignored without a word."""
    seg = _write(tmp_path, "seg", np.ones((1, 2, 3), np.uint32))
    truth = _write(tmp_path, "truth", np.ones((1, 2, 3), np.uint32))
    result = runner.invoke(app, ["evaluate", seg, truth, *extra])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1
    assert result.stdout == ""


def test_cli_binary_threshold_is_used(tmp_path):
    pred = _write(tmp_path, "pred", np.array([[[0.9, 0.4, 0.2]]], np.float32))
    truth = _write(tmp_path, "truth", np.array([[[1, 1, 0]]], np.uint8))
    ious = [json.loads(runner.invoke(app, ["evaluate", pred, truth, "--binary", "--json",
                                           *given]).stdout.splitlines()[-1])["iou"]
            for given in ([], ["--threshold", "0.3"])]
    assert ious == [0.5, 1.0]  # default 0.5: the 0.4 voxel is background; at 0.3 foreground


@pytest.mark.parametrize(("seg", "truth", "mask", "message"), [
    (np.zeros((2, 3, 4), np.uint32), np.ones((2, 3, 5), np.uint32), None, "has shape [2, 3, 5]"),
    (np.zeros((2, 3, 4), np.float32), np.ones((2, 3, 4), np.uint32), None, "has dtype float32"),
    (np.zeros((2, 2, 3, 4), np.uint32), np.ones((2, 2, 3, 4), np.uint32), None, "4 axes"),
    (np.zeros((2, 3, 4), np.uint32), np.zeros((2, 3, 4), np.uint32), None, "no labelled voxel"),
    (np.zeros((2, 3, 4), np.uint32), np.ones((2, 3, 4), np.uint32), np.zeros((2, 3, 4), bool),
     "inside the mask"),
    (np.zeros((2, 3, 4), np.uint32), np.ones((2, 3, 4), np.uint32), np.ones((3, 4), bool),
     "mask has shape [3, 4]"),
])
def test_cli_bad_inputs_exit_2_without_traceback(tmp_path, seg, truth, mask, message):
    args = ["evaluate", _write(tmp_path, "seg", seg), _write(tmp_path, "truth", truth)]
    if mask is not None:
        args += ["--mask", _write(tmp_path, "mask", mask)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output and len(result.stderr.splitlines()) == 1


def test_cli_missing_volume_and_binary_mask_exit_2(tmp_path):
    truth = _write(tmp_path, "truth", np.ones((2, 3, 4), np.uint8))
    result = runner.invoke(app, ["evaluate", str(tmp_path / "nope.zarr/seg"), truth])
    assert result.exit_code == 2 and "nope.zarr" in result.stderr
    pred = _write(tmp_path, "pred", np.ones((2, 3, 4), np.float32))
    mask = _write(tmp_path, "mask", np.zeros((2, 3, 4), np.uint8))
    result = runner.invoke(app, ["evaluate", pred, truth, "--binary", "--mask", mask])
    assert result.exit_code == 2 and "mask is 0 everywhere" in result.stderr


def test_a_truth_of_a_sub_box_scores_the_part_of_the_segmentation_it_covers(tmp_path):
    """Ground truth for a sub-box of the segmented volume, placed by its offset, was
    refused as lying apart ("neither box holds the other"); the segmentation (and a mask
    of its size) are read where the truth lies, streamed and in blocks alike."""
    rng = np.random.default_rng(12)
    seg = blobs(rng, (8, 12, 12), 6)
    truth = blobs(rng, (8, 12, 12), 5)[2:6]
    mask = np.ones((8, 12, 12), np.uint8)
    mask[:, :, :3] = 0
    write_volume(tmp_path / "s.zarr", "seg", seg, voxel_size=(30, 6, 6))
    write_volume(tmp_path / "s.zarr", "mask", mask, voxel_size=(30, 6, 6))
    write_volume(tmp_path / "t.zarr", "crop", truth, voxel_size=(30, 6, 6), offset=(2, 0, 0))
    want = score(seg[2:6], truth, mask[2:6]).arand
    for extra in ([], ["--workers", "1", "--block", "2", "12", "12"]):
        result = runner.invoke(app, ["evaluate", str(tmp_path / "s.zarr/seg"),
                                     str(tmp_path / "t.zarr/crop"), "--mask",
                                     str(tmp_path / "s.zarr/mask"), "--json", *extra])
        assert result.exit_code == 0, result.output
        line = json.loads(result.stdout.strip().splitlines()[-1])
        assert line["arand"] == pytest.approx(want)
        assert line["seg"].endswith("[2-5, 0-11, 0-11]")
        assert line["voxels"] == np.count_nonzero((truth != 0) & (mask[2:6] != 0))


def test_a_larger_truth_is_read_where_the_segmentation_sits(tmp_path):
    rng = np.random.default_rng(11)
    truth = blobs(rng, (8, 12, 12), 6)
    seg = blobs(rng, (3, 12, 12), 6)
    write_volume(tmp_path / "t.zarr", "labels", truth, voxel_size=(30, 6, 6))
    write_volume(tmp_path / "s.zarr", "seg", seg, voxel_size=(30, 6, 6), offset=(4, 0, 0))
    result = runner.invoke(app, ["evaluate", str(tmp_path / "s.zarr/seg"),
                                 str(tmp_path / "t.zarr/labels"), "--json"])
    assert result.exit_code == 0, result.output
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["arand"] == pytest.approx(score(seg, truth[4:7]).arand)
    assert line["truth"].endswith("[4-6, 0-11, 0-11]")
    write_volume(tmp_path / "s.zarr", "late", seg, voxel_size=(30, 6, 6), offset=(6, 0, 0))
    outside = runner.invoke(app, ["evaluate", str(tmp_path / "s.zarr/late"),
                                  str(tmp_path / "t.zarr/labels")])
    assert outside.exit_code == 2
    assert outside.stderr.strip().endswith(
        "t.zarr/labels: truth has shape [8, 12, 12] but "
        f"{tmp_path}/s.zarr/late has shape [3, 12, 12], at offset [0, 0, 0] against [6, 0, 0] "
        "(voxels): neither box holds the other; crop both to a common box"), outside.stderr
    np.save(tmp_path / "seg.npy", seg)  # no offset metadata: nothing could place it
    unplaced = runner.invoke(app, ["evaluate", str(tmp_path / "seg.npy"),
                                   str(tmp_path / "t.zarr/labels")])
    assert unplaced.exit_code == 2
    assert unplaced.stderr.strip().endswith(
        f"has shape [3, 12, 12]; {tmp_path}/seg.npy states no offset that places one inside "
        "the other: crop both to the same box, or give them offset metadata"), unplaced.stderr
    write_volume(tmp_path / "s.zarr", "fine", seg, voxel_size=(30, 3, 3), offset=(4, 0, 0))
    other_grid = runner.invoke(app, ["evaluate", str(tmp_path / "s.zarr/fine"),
                                     str(tmp_path / "t.zarr/labels")])
    assert other_grid.exit_code == 2  # another voxel size: not placed, refused


def test_a_truth_placed_elsewhere_is_refused_not_scored_against_the_wrong_voxels(tmp_path):
    rng = np.random.default_rng(3)
    labels = blobs(rng, (4, 32, 24), 12)
    write_volume(tmp_path / "v.zarr", "seg", labels.astype(np.uint64), offset=(0, 0, 0))
    # the same shape, shifted by 8 rows: it covers only part of the segmentation's box
    write_volume(tmp_path / "v.zarr", "truth", labels, offset=(0, 8, 0))
    result = runner.invoke(app, ["evaluate", str(tmp_path / "v.zarr/seg"),
                                 str(tmp_path / "v.zarr/truth")])
    assert result.exit_code == 2, result.output
    assert "does not cover the same box" in result.stderr and "[0, 8, 0]" in result.stderr
    # a larger truth that holds the segmentation's box is cropped to it and scored
    write_volume(tmp_path / "v.zarr", "big", np.pad(labels, ((0, 0), (8, 0), (0, 0))),
                 offset=(0, -8, 0))
    result = runner.invoke(app, ["evaluate", str(tmp_path / "v.zarr/seg"),
                                 str(tmp_path / "v.zarr/big")])
    assert result.exit_code == 0, result.output
    assert "adapted Rand error  0.0000" in result.stdout


def test_negative_truth_ids_are_scored_as_objects_with_a_warning(tmp_path):
    """-1 as "unlabelled" (a common convention) was scored as an object without a word."""
    truth = np.random.default_rng(1).integers(-2, 3, (9, 16, 17)).astype(np.int64)
    write_volume(tmp_path / "v.zarr", "truth", truth, label=True)
    write_volume(tmp_path / "v.zarr", "seg", np.abs(truth), label=True)
    args = ["evaluate", str(tmp_path / "v.zarr/seg")]
    said = runner.invoke(app, [*args, str(tmp_path / "v.zarr/truth")])
    assert said.exit_code == 0 and "holds negative ids: each is scored as an object" in said.stderr
    write_volume(tmp_path / "v.zarr", "plain", np.abs(truth), label=True)
    quiet = runner.invoke(app, [*args, str(tmp_path / "v.zarr/plain")])
    assert quiet.exit_code == 0 and "warning" not in quiet.stderr
