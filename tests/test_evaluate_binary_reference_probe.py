"""Binary scores (precision, recall, F1, IoU), the CREMI score and VOI, and what `emrun
evaluate --json` and its text lines report, against tiny references written voxel by voxel
(pure Python loops and exact fractions, nothing shared with emrun's counting)."""

from __future__ import annotations

import json
import math
import re
from fractions import Fraction
from itertools import product

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from emrun.cli import app
from emrun.evaluate import (
    EvaluationError,
    Parallel,
    binary_scores,
    binary_scores_volumes,
    score,
    score_volumes,
)
from emrun.io import open_volume, write_volume

runner = CliRunner()

BINARY_KEYS = {"precision", "recall", "f1", "iou", "tp", "fp", "fn", "tn", "voxels",
               "threshold", "seg", "truth", "mask", "mode"}
SEGMENTATION_KEYS = {"arand", "rand_split", "rand_merge", "voi_split", "voi_merge", "voi",
                     "cremi_score", "splits", "merges", "min_overlap", "voxels",
                     "truth_objects", "segments", "seg", "truth", "mask", "mode",
                     "connected_truth"}


# --------------------------------------------------------------------------- references


def _nan(value: object) -> bool:
    return isinstance(value, float) and math.isnan(value)


def ref_predicted(value: object, dtype: np.dtype, threshold: float) -> bool:
    """The documented rule for one voxel: bool as is; uint8 above threshold x 255, the
    threshold taken as the decimal it is written as (0.6 x 255 is 153, not a hair below);
    float above the threshold at the prediction's precision (a float32 0.3 is not above
    0.3), NaN background; other integers non-zero. Compared in exact fractions."""
    if dtype == np.bool_:
        return bool(value)
    if dtype == np.uint8:
        return Fraction(int(value)) > Fraction(repr(threshold)) * 255
    if dtype.kind == "f":
        cut = Fraction(float(dtype.type(threshold)))
        return not _nan(float(value)) and Fraction(float(value)) > cut
    return int(value) != 0


def ref_nonzero(value: object) -> bool:
    """Truth foreground and inside the mask: non-zero and not NaN."""
    return not _nan(float(value)) and float(value) != 0


def ref_counts(pred, truth, mask=None, threshold=0.5) -> tuple[int, int, int, int]:
    """(tp, fp, fn, tn) by a loop over the voxels."""
    tp = fp = fn = tn = 0
    flat_mask = [1] * pred.size if mask is None else mask.ravel().tolist()
    for p, t, m in zip(pred.ravel().tolist(), truth.ravel().tolist(), flat_mask, strict=True):
        if not ref_nonzero(m):
            continue
        predicted, true = ref_predicted(p, pred.dtype, threshold), ref_nonzero(t)
        tp += predicted and true
        fp += predicted and not true
        fn += true and not predicted
        tn += not predicted and not true
    return tp, fp, fn, tn


def ref_ratios(tp: int, fp: int, fn: int) -> dict[str, float | None]:
    """The ratios as exact fractions rounded once; None for 0/0."""
    def ratio(a: int, b: int) -> float | None:
        return float(Fraction(a, b)) if b else None
    return {"precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn),
            "f1": ratio(2 * tp, 2 * tp + fp + fn), "iou": ratio(tp, tp + fp + fn)}


def ref_segmentation(seg, truth, mask=None, min_overlap=1) -> dict[str, float | int]:
    """Rand by counting ordered voxel pairs (self-pairs included), VOI as a mean over the
    voxels of -log2 of the share of its truth object (segment) that its segment (object)
    shares, splits and merges by overlaps: O(N^2) loops over the scored voxels."""
    keep = [i for i, (t, m) in enumerate(zip(truth.ravel().tolist(),
                                             ([1] * truth.size if mask is None
                                              else mask.ravel().tolist()), strict=True))
            if t != 0 and ref_nonzero(m)]
    s = [seg.ravel().tolist()[i] for i in keep]
    t = [truth.ravel().tolist()[i] for i in keep]
    n = len(keep)
    same_t = same_s = same_both = 0
    split_bits = merge_bits = 0.0
    for i in range(n):
        in_t = sum(t[j] == t[i] for j in range(n))
        in_s = sum(s[j] == s[i] for j in range(n))
        in_both = sum(t[j] == t[i] and s[j] == s[i] for j in range(n))
        same_t, same_s, same_both = same_t + in_t, same_s + in_s, same_both + in_both
        split_bits -= math.log2(in_both / in_t)
        merge_bits -= math.log2(in_both / in_s)
    overlaps: dict[tuple[int, int], int] = {}
    for a, b in zip(s, t, strict=True):
        overlaps[a, b] = overlaps.get((a, b), 0) + 1
    big = [pair for pair, count in overlaps.items() if count >= min_overlap]
    splits = sum(sum(b == obj for _, b in big) > 1 for obj in set(t))
    merges = sum(sum(a == seg_id for a, _ in big) > 1 for seg_id in set(s))
    arand = 1 - 2 * same_both / (same_t + same_s)
    voi_split, voi_merge = split_bits / n, merge_bits / n
    return {"rand_split": same_both / same_t, "rand_merge": same_both / same_s,
            "arand": arand, "voi_split": voi_split, "voi_merge": voi_merge,
            "voi": voi_split + voi_merge,
            "cremi_score": math.sqrt(arand * (voi_split + voi_merge)),
            "splits": splits, "merges": merges, "voxels": n,
            "truth_objects": len(set(t)), "segments": len(set(s))}


# --------------------------------------------------------------------------- helpers


def _predictions(rng: np.random.Generator, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """One random map of probabilities in each dtype a prediction comes in."""
    p = rng.random(shape)
    p[rng.random(shape) < 0.15] = 0.0
    floats = p.astype(np.float32)
    floats[rng.random(shape) < 0.1] = np.nan
    return {"bool": p > 0.5, "uint8": np.round(p * 255).astype(np.uint8),
            "float32": floats, "float64": p, "float16": floats.astype(np.float16),
            "uint16": (p > 0.6).astype(np.uint16) * 3,
            "int32": np.where(p > 0.4, -2, 0).astype(np.int32)}


def _truths(rng: np.random.Generator, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    labels = rng.integers(0, 3, shape)
    floats = labels.astype(np.float32)
    floats[rng.random(shape) < 0.1] = np.nan
    return {"uint8": labels.astype(np.uint8), "bool": labels > 0, "float32": floats,
            "int64": -labels}


def _masks(rng: np.random.Generator, shape: tuple[int, ...]) -> dict[str, np.ndarray | None]:
    floats = rng.random(shape).astype(np.float32)
    floats[rng.random(shape) < 0.2] = np.nan
    floats[rng.random(shape) < 0.2] = 0
    return {"none": None, "bool": rng.random(shape) < 0.7,
            "uint16": rng.integers(0, 3, shape).astype(np.uint16), "float_nan": floats}


def _npy(tmp_path, name: str, array: np.ndarray) -> str:
    np.save(tmp_path / f"{name}.npy", array)
    return str(tmp_path / f"{name}.npy")


def _evaluate(*args: object):
    return runner.invoke(app, ["evaluate", *map(str, args)])


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout  # stdout: the JSON line alone
    return json.loads(lines[0], parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))


# --------------------------------------------------------------------------- binary counts


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.6, 0.9, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_counts_and_ratios_match_a_voxel_loop_for_every_dtype_truth_and_mask(seed, threshold):
    rng = np.random.default_rng(seed)
    shape = (3, 4, 5)
    preds, truths, masks = _predictions(rng, shape), _truths(rng, shape), _masks(rng, shape)
    for (pname, pred), (tname, truth), (mname, mask) in product(
            preds.items(), truths.items(), masks.items()):
        got = binary_scores(pred, truth, mask, threshold)
        tp, fp, fn, tn = ref_counts(pred, truth, mask, threshold)
        where = (pname, tname, mname)
        assert (got.tp, got.fp, got.fn, got.tn) == (tp, fp, fn, tn), where
        assert got.voxels == tp + fp + fn + tn, where
        assert {k: getattr(got, k) for k in ("precision", "recall", "f1", "iou")} == \
            ref_ratios(tp, fp, fn), where  # exactly: one correctly rounded division each
        assert got.threshold == threshold


def test_the_threshold_is_strict_a_value_at_it_is_background():
    """'above' is >: a probability equal to the threshold, and a uint8 value equal to
    threshold x 255, are background; the next value up is foreground."""
    truth = np.ones((1, 1, 3), np.uint8)
    for threshold in (0.25, 0.5, 0.75):
        floats = np.array([[[threshold - 2**-20, threshold, threshold + 2**-20]]])
        for dtype in (np.float32, np.float64, np.float16):
            at = floats.astype(dtype)
            if at[0, 0, 0] == at[0, 0, 1]:  # float16 cannot tell them apart: use its step
                step = float(np.spacing(dtype(threshold)))
                at = np.array([[[threshold - step, threshold, threshold + step]]], dtype)
            assert binary_scores(at, truth, threshold=threshold).tp == 1, (threshold, dtype)
    for threshold, at in ((0.2, 51), (0.6, 153), (1.0, 255), (0.0, 0)):
        assert threshold * 255 == at  # the cut lies on a uint8 value
        values = np.array([[[at - 1 if at else 0, at, min(at + 1, 255)]]], np.uint8)
        expected = sum(int(v) > at for v in values.ravel())
        assert binary_scores(values, truth, threshold=threshold).tp == expected, threshold


def test_a_uint8_prediction_of_round_255p_scores_as_its_probabilities_do():
    """What `emrun infer` writes (round(255 p)) scores as the float map it came from,
    away from the 1/510-wide band around the threshold that rounding can cross."""
    rng = np.random.default_rng(5)
    p = rng.random((4, 6, 7))
    truth = rng.random(p.shape) < 0.5
    for threshold in (0.1, 0.37, 0.5, 0.8):
        clear = np.abs(p - threshold) > 1 / 255
        mask = clear.astype(np.uint8)
        as_uint8 = binary_scores(np.round(p * 255).astype(np.uint8), truth, mask, threshold)
        assert as_uint8 == binary_scores(p, truth, mask, threshold)


def test_all_nan_or_empty_predictions_and_empty_truths_report_what_is_undefined():
    """0/0 ratios are None, the others are numbers; all-NaN is an empty prediction."""
    shape = (2, 2, 3)
    empty, full = np.zeros(shape, np.uint8), np.ones(shape, np.uint8)
    cases = [  # pred, truth: precision, recall, f1, iou
        (np.full(shape, np.nan, np.float32), full, (None, 0.0, 0.0, 0.0)),
        (np.full(shape, np.nan, np.float32), empty, (None, None, None, None)),
        (np.zeros(shape, bool), empty, (None, None, None, None)),
        (np.ones(shape, np.float32), empty, (0.0, None, 0.0, 0.0)),
        (np.full(shape, 255, np.uint8), full, (1.0, 1.0, 1.0, 1.0)),
        (np.zeros(shape, np.uint8), full, (None, 0.0, 0.0, 0.0)),
    ]
    for pred, truth, expected in cases:
        s = binary_scores(pred, truth)
        assert (s.precision, s.recall, s.f1, s.iou) == expected, (pred.dtype, truth.max())
        assert s.voxels == pred.size


# --------------------------------------------------------------------------- streamed, blocks


@pytest.mark.parametrize("two_d", [False, True], ids=["3d", "2d"])
def test_streamed_and_blocks_equal_one_whole_array_count(tmp_path, two_d):
    """NaN in the prediction and in a float mask, a negative-id truth, odd chunks, slabs of
    one voxel, and blocks cutting the chunks: every way gives the whole array's counts."""
    rng = np.random.default_rng(3)
    shape = (9, 13) if two_d else (5, 9, 7)
    pred = rng.random(shape).astype(np.float32)
    pred[rng.random(shape) < 0.2] = np.nan
    truth = rng.integers(-1, 2, shape).astype(np.int16)
    mask = rng.random(shape).astype(np.float32)
    mask[rng.random(shape) < 0.3] = np.nan
    mask[rng.random(shape) < 0.2] = 0
    chunks = (4, 5) if two_d else (2, 4, 3)
    for name, array in (("pred", pred), ("truth", truth), ("mask", mask)):
        if two_d:  # write_volume writes (z, y, x); a bare 2-d zarr array is read as (y, x)
            stored = zarr.create_array(str(tmp_path / f"{name}.zarr"), shape=shape,
                                       dtype=array.dtype, chunks=chunks)
            stored[...] = array
        else:
            write_volume(tmp_path / "v.zarr", name, array, chunks=chunks)
    volumes = [open_volume(tmp_path / f"{n}.zarr" if two_d else f"{tmp_path}/v.zarr/{n}")
               for n in ("pred", "truth", "mask")]
    tp, fp, fn, tn = ref_counts(pred, truth, mask, 0.35)
    whole = binary_scores(pred, truth, mask, 0.35)
    assert (whole.tp, whole.fp, whole.fn, whole.tn) == (tp, fp, fn, tn)
    for slab_voxels in (1, 17, 10**6):
        assert binary_scores_volumes(*volumes, threshold=0.35, slab_voxels=slab_voxels) == whole
    blocks = ((1, 3, 2), (1, 9, 13)) if two_d else ((2, 3, 5), (5, 9, 7))
    for block in blocks:
        assert binary_scores_volumes(*volumes, threshold=0.35,
                                     parallel=Parallel(workers=1, block=block)) == whole


# --------------------------------------------------------------------------- JSON and text


def _text_numbers(text: str) -> dict[str, str]:
    line = next(ln for ln in text.splitlines() if ln.lstrip().startswith("precision"))
    found = re.fullmatch(r"\s*precision (\S+)\s+recall (\S+)\s+F1 (\S+)\s+IoU (\S+)\s*", line)
    assert found, line
    return dict(zip(("precision", "recall", "f1", "iou"), found.groups(), strict=True))


@pytest.mark.parametrize("case", ["thirds", "sevenths", "empty_truth", "both_empty"])
def test_json_holds_every_key_exact_ratios_and_the_text_agrees(tmp_path, case):
    """Ratios like 2/3 and 3/7 come back from the JSON line as the correctly rounded
    doubles (no rounding to 4 places); the text shows each at 4 places or n/a, and the same
    counts."""
    truth = np.zeros((1, 2, 7), np.uint8)
    pred = np.zeros((1, 2, 7), np.float32)
    if case == "thirds":  # tp 2, fp 1, fn 1
        truth[0, 0, :3], pred[0, 0, 1:4] = 1, 0.9
    elif case == "sevenths":  # tp 3, fp 4, fn 1: precision 3/7, recall 3/4, iou 3/8
        truth[0, 0, :4], pred[0, 0, 1:] = 1, 0.8
    elif case == "empty_truth":
        pred[0, 1, :2] = 0.7
    result = _evaluate(_npy(tmp_path, "pred", pred), _npy(tmp_path, "truth", truth),
                       "--binary", "--json")
    line = _json(result)
    assert set(line) == BINARY_KEYS
    assert line["mode"] == "binary" and line["mask"] is None and line["threshold"] == 0.5
    tp, fp, fn, tn = ref_counts(pred, truth)
    assert (line["tp"], line["fp"], line["fn"], line["tn"], line["voxels"]) == \
        (tp, fp, fn, tn, pred.size)
    expected = ref_ratios(tp, fp, fn)
    assert {k: line[k] for k in expected} == expected
    shown = _text_numbers(result.stderr)
    assert shown == {k: "n/a" if v is None else f"{v:.4f}" for k, v in expected.items()}
    assert f"true positives {tp:,}, false positives {fp:,}, false negatives {fn:,}" in \
        result.stderr
    assert f"{pred.size:,} voxels scored, foreground above 0.5" in result.stderr
    if case == "both_empty":
        assert "n/a: the prediction and the truth have no foreground" in result.stderr
    elif case == "empty_truth":
        assert "n/a: the truth has no foreground" in result.stderr
    else:
        assert "n/a" not in result.stderr


def test_without_json_the_text_goes_to_stdout_and_says_the_same(tmp_path):
    pred = _npy(tmp_path, "pred", np.array([[[200, 10, 129, 127]]], np.uint8))
    truth = _npy(tmp_path, "truth", np.array([[[1, 1, 0, 0]]], np.uint8))
    text = _evaluate(pred, truth, "--binary")
    assert text.exit_code == 0, text.output
    assert "{" not in text.stdout
    line = _json(_evaluate(pred, truth, "--binary", "--json"))
    assert _text_numbers(text.stdout) == {k: f"{line[k]:.4f}"
                                          for k in ("precision", "recall", "f1", "iou")}
    assert (line["tp"], line["fp"], line["fn"], line["tn"]) == (1, 1, 1, 1)  # 129 > 127.5


# --------------------------------------------------------------------------- CREMI and VOI


def _segmentation_case(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (2, 4, 5)
    truth = rng.integers(0, 4, shape).astype(np.uint32)
    seg = truth.astype(np.int64) * 7 % 5  # merges some objects, keeps others
    noise = rng.random(shape) < 0.3
    seg[noise] = rng.integers(-1, 4, int(noise.sum()))
    mask = (rng.random(shape) < 0.8).astype(np.uint8)
    return seg, truth, mask


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_rand_voi_cremi_splits_and_merges_match_voxel_pair_counts(seed, masked):
    seg, truth, mask = _segmentation_case(seed)
    mask = mask if masked else None
    for min_overlap in (1, 2, 3):
        got = score(seg, truth, mask, min_overlap=min_overlap).as_dict()
        expected = ref_segmentation(seg, truth, mask, min_overlap)
        for key, value in expected.items():
            if isinstance(value, int):
                assert got[key] == value, (key, min_overlap)
            else:
                assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
        assert got["min_overlap"] == min_overlap


def test_a_perfect_relabelling_scores_exactly_zero_everywhere():
    _, truth, _ = _segmentation_case(7)
    relabelled = (truth.astype(np.uint64) * 1000 + 5) * (truth != 0)  # 0 stays 0
    got = score(relabelled, truth)
    assert (got.arand, got.voi_split, got.voi_merge, got.voi, got.cremi_score) == (0, 0, 0, 0, 0)
    assert (got.rand_split, got.rand_merge) == (1.0, 1.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_the_segmentation_json_line_and_text_match_the_reference(tmp_path, seed):
    seg, truth, mask = _segmentation_case(seed)
    for name, array in (("seg", seg), ("truth", truth), ("mask", mask)):
        write_volume(tmp_path / "v.zarr", name, array, chunks=(1, 3, 2))
    paths = [f"{tmp_path}/v.zarr/{n}" for n in ("seg", "truth", "mask")]
    result = _evaluate(paths[0], paths[1], "--mask", paths[2], "--min-overlap", "2", "--json")
    line = _json(result)
    assert set(line) == SEGMENTATION_KEYS
    expected = ref_segmentation(seg, truth, mask, 2)
    for key, value in expected.items():
        assert line[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    # JSON floats are the scores themselves, not rounded: the library's values exactly
    library = score_volumes(*(open_volume(p) for p in paths), min_overlap=2).as_dict()
    assert {k: line[k] for k in library} == library
    text = result.stderr
    assert f"adapted Rand error  {line['arand']:.4f}   (Rand split {line['rand_split']:.4f}, " \
        f"Rand merge {line['rand_merge']:.4f})" in text
    assert f"VOI                 {line['voi']:.4f} bits (split {line['voi_split']:.4f}, " \
        f"merge {line['voi_merge']:.4f})" in text
    assert f"CREMI score         {line['cremi_score']:.4f}" in text
    assert f"{line['splits']} split truth objects, {line['merges']} merging segments " \
        "(overlaps of at least 2 voxels)" in text
    assert f"{line['voxels']} voxels scored (truth != 0 inside" in text


# --------------------------------------------------------------------------- found wrong


def test_an_all_zero_mask_in_memory_is_refused_as_on_disk(tmp_path):
    pred = np.full((2, 3, 4), 0.9, np.float32)
    truth = np.ones((2, 3, 4), np.uint8)
    mask = np.zeros((2, 3, 4), bool)
    write_volume(tmp_path / "v.zarr", "pred", pred)
    write_volume(tmp_path / "v.zarr", "truth", truth)
    write_volume(tmp_path / "v.zarr", "mask", mask.astype(np.uint8))
    with pytest.raises(EvaluationError, match="mask is 0 everywhere"):
        binary_scores_volumes(*(open_volume(f"{tmp_path}/v.zarr/{n}")
                                for n in ("pred", "truth", "mask")))
    with pytest.raises(EvaluationError):
        score(truth.astype(np.uint32), truth, mask)
    with pytest.raises(EvaluationError):
        binary_scores(pred, truth, mask)


def test_in_memory_one_channel_prediction_is_scored_as_the_message_says():
    pred = np.array([[[[0.9, 0.1, 0.8]]]], np.float32)
    truth = np.array([[[1, 0, 1]]], np.uint8)
    assert binary_scores(pred, truth) == binary_scores(pred[0], truth)
