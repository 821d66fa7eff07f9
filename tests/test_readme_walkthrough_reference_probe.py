"""The README as a stranger reads it (reference probe): each concrete sentence of README.md
(a command's output, a flag's default, a recipe key's meaning, a file it writes, an exit
code) run on tiny synthetic inputs and checked against plain references written here
(loops, brute force, closed forms). Each test names the README sentence it pins; a claim
found false is a strict xfail naming whether the README or the code is wrong."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from conftest import ROOT
from typer.testing import CliRunner

from emrun.cli import app
from emrun.io import open_volume, write_volume

runner = CliRunner()
README = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
OFFSETS3 = [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]


def said(text: str) -> None:
    """The README (whitespace collapsed) says ``text``: the claim pinned is still there."""
    assert " ".join(text.split()) in README, text


def invoke(*args: Any) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def levels_of(path: Path) -> list[dict[str, Any]]:
    """(path, shape, dtype, scale, translation) of each level of an OME-Zarr image group."""
    group = zarr.open_group(str(path), mode="r")
    found = []
    for dataset in group.attrs["ome"]["multiscales"][0]["datasets"]:
        transforms = {t["type"]: t[t["type"]] for t in dataset["coordinateTransformations"]}
        array = group[dataset["path"]]
        found.append({"path": dataset["path"], "shape": array.shape, "dtype": array.dtype,
                      "scale": transforms["scale"],
                      "translation": transforms.get("translation", [0.0] * len(array.shape))})
    return found


# --- Output stores: pyramids ---------------------------------------------------------------

@pytest.mark.parametrize(("yx", "expected"), [(64, 1), (256, 1), (257, 2), (600, 3), (1030, 4)])
def test_default_level_count(tmp_path, yx, expected):
    """"the default adds levels until y and x are at most 256 voxels (at most 8 levels)";
    "Each level halves y and x"."""
    said("the default adds levels until y and x are at most 256 voxels (at most 8 levels)")
    write_volume(tmp_path / "v.zarr", "image", np.zeros((2, yx, yx), np.uint8),
                 voxel_size=(30, 6, 6))
    levels = levels_of(tmp_path / "v.zarr" / "image")
    assert len(levels) == expected
    y = yx
    for level in levels:
        assert level["shape"][1:] == (y, y)
        y = -(-y // 2)
    assert max(levels[-1]["shape"][1:]) <= 256


def _reference_z_halving(voxel: tuple[float, float, float] | None, levels: int
                         ) -> list[tuple[float, float, float]]:
    """The README's rule: each level halves y and x; z is halved only where its voxel size
    is at most half of y's at the new level; unknown voxel size keeps z."""
    sizes = [tuple(voxel or (1.0, 1.0, 1.0))]
    for _ in range(levels - 1):
        z, y, x = sizes[-1]
        y, x = 2 * y, 2 * x
        if voxel is not None and z <= y / 2:
            z *= 2
        sizes.append((z, y, x))
    return sizes


@pytest.mark.parametrize("voxel", [(30.0, 6.0, 6.0), (8.0, 8.0, 8.0), (12.0, 4.0, 4.0), None])
def test_pyramid_halves_z_only_by_the_readmes_rule(tmp_path, voxel):
    """"z is halved only where its voxel size is at most half of y's at the new level
    (30 x 6 x 6 nm keeps its sections through level 3, isotropic data halves all axes;
    unknown voxel size keeps z)"."""
    said("30 x 6 x 6 nm keeps its sections through level 3, isotropic data halves all axes; "
         "unknown voxel size keeps z")
    array = np.random.default_rng(0).integers(0, 255, (32, 64, 64), dtype=np.uint8)
    write_volume(tmp_path / "v.zarr", "image", array, voxel_size=voxel, levels=5)
    levels = levels_of(tmp_path / "v.zarr" / "image")
    expected = _reference_z_halving(voxel, 5)
    z_depth = 32
    for level, sizes in zip(levels, expected, strict=True):
        if voxel is not None:
            assert level["scale"] == pytest.approx(list(sizes))
        z_factor = sizes[0] / (voxel or (1.0,))[0]
        assert level["shape"][0] == -(-z_depth // round(z_factor))
    if voxel == (30.0, 6.0, 6.0):
        assert [lv["shape"][0] for lv in levels] == [32, 32, 32, 32, 16]


def test_pyramid_images_average_and_labels_take_the_most_frequent_id(tmp_path):
    """"Images and predictions are averaged (integers rounded, uint8 stays uint8);
    segmentations take the most frequent id of each 2 x 2 (x 2) window, which invents no
    id"; "Metadata: ... each level's scale and translation (the centre of the window it
    averages)"."""
    said("Images and predictions are averaged (integers rounded, uint8 stays uint8); "
         "segmentations take the most frequent id of each 2 x 2 (x 2) window, which invents "
         "no id")
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (2, 8, 8), dtype=np.uint8)
    write_volume(tmp_path / "v.zarr", "image", image, voxel_size=(30, 6, 6), levels=2)
    level1 = levels_of(tmp_path / "v.zarr" / "image")[1]
    assert level1["dtype"] == np.uint8
    assert level1["translation"] == pytest.approx([0.0, 3.0, 3.0])  # centre of a 2x2 window
    got = zarr.open_array(str(tmp_path / "v.zarr" / "image" / "1"), mode="r")[:]
    for z in range(2):
        for y in range(4):
            for x in range(4):
                window = image[z, 2 * y:2 * y + 2, 2 * x:2 * x + 2].astype(float)
                assert abs(float(got[z, y, x]) - window.mean()) <= 0.5 + 1e-9

    labels = rng.choice(np.array([5, 9, 2**40 + 1], np.uint64), size=(4, 8, 8))
    write_volume(tmp_path / "l.zarr", "labels", labels, voxel_size=(8, 8, 8), levels=2)
    got = zarr.open_array(str(tmp_path / "l.zarr" / "labels" / "labels" / "1"), mode="r")[:]
    assert got.shape == (2, 4, 4)
    for z in range(2):
        for y in range(4):
            for x in range(4):
                window = labels[2 * z:2 * z + 2, 2 * y:2 * y + 2, 2 * x:2 * x + 2].ravel()
                counts = Counter(window.tolist())
                best = max(counts.values())
                assert counts[int(got[z, y, x])] == best  # a most frequent id of the window


@pytest.mark.parametrize("levels", ["0", "9"])
def test_levels_zero_or_too_many_is_one_line_exit_2_before_any_work(tmp_path, levels):
    """"`--levels 0`, or more levels than y and x allow, is one line and exit 2, before any
    work"."""
    said("`--levels 0`, or more levels than y and x allow, is one line and exit 2, before any "
         "work")
    result = invoke("data", "synth", tmp_path / "s.zarr", "--shape", 4, 32, 32,
                    "--levels", levels)
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output
    assert not (tmp_path / "s.zarr").exists()


# --- Output stores: layout ------------------------------------------------------------------

def test_store_layout_root_names_the_first_image_and_labels_sit_under_labels(tmp_path):
    """"Images and predictions live at `OUT.zarr/NAME`; segmentations and labels (...
    `data synth`'s labels, mito and synapse ...) at `OUT.zarr/labels/NAME` ... emrun's short
    paths still open them"; "The root's metadata names the arrays of one image group by path
    (`image/0`, ...: the image it already names, else the first image by name, or the first
    segmentation in a store of segmentations only ...)"."""
    said("The root's metadata names the arrays of one image group by path (`image/0`, ...: "
         "the image it already names, else the first image by name, or the first "
         "segmentation in a store of segmentations only")
    result = invoke("data", "synth", tmp_path / "s.zarr", "--shape", 4, 32, 32, "--levels", 2)
    assert result.exit_code == 0, result.output
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    paths = [d["path"] for d in root.attrs["ome"]["multiscales"][0]["datasets"]]
    assert paths == ["image/0", "image/1"]
    labels_group = zarr.open_group(str(tmp_path / "s.zarr" / "labels"), mode="r")
    assert set(labels_group.attrs["ome"]["labels"]) == {"labels", "mito", "synapse"}
    for name in ("labels", "mito", "synapse"):
        assert (tmp_path / "s.zarr" / "labels" / name / "0").is_dir()
        short = open_volume(tmp_path / "s.zarr" / name)
        full = open_volume(tmp_path / "s.zarr" / "labels" / name)
        assert np.array_equal(short.read(), full.read())
        image_label = zarr.open_group(str(tmp_path / "s.zarr" / "labels" / name),
                                      mode="r").attrs["ome"]
        assert "image-label" in image_label

    segs = tmp_path / "segs.zarr"
    write_volume(segs, "only", np.ones((2, 8, 8), np.uint64), levels=1, label=True)
    root = zarr.open_group(str(segs), mode="r")
    assert [d["path"] for d in root.attrs["ome"]["multiscales"][0]["datasets"]] == [
        "labels/only/0"]
    assert "image-label" in root.attrs["ome"]


def test_the_root_keeps_the_image_it_names_and_else_takes_the_first_by_name(tmp_path):
    """"the image it already names, else the first image by name": an image written later
    whose name sorts first does not take the root, also when both are written by one call
    (the first written is named from then on)."""
    said("the image it already names, else the first image by name")
    write_volume(tmp_path / "ims.zarr", "zeta", np.zeros((2, 8, 8), np.uint8), levels=1)
    write_volume(tmp_path / "ims.zarr", "alpha", np.zeros((2, 8, 8), np.uint8), levels=1)
    root = zarr.open_group(str(tmp_path / "ims.zarr"), mode="r")
    assert [d["path"] for d in root.attrs["ome"]["multiscales"][0]["datasets"]] == ["zeta/0"]
    from emrun.io.write import write_volumes

    write_volumes(tmp_path / "two.zarr", {"zeta": (np.zeros((2, 8, 8), np.uint8), False),
                                          "alpha": (np.zeros((2, 8, 8), np.uint8), False)},
                  levels=1)
    root = zarr.open_group(str(tmp_path / "two.zarr"), mode="r")
    assert [d["path"] for d in root.attrs["ome"]["multiscales"][0]["datasets"]] == ["zeta/0"]


# --- Evaluation -----------------------------------------------------------------------------

def _brute_scores(seg: np.ndarray, truth: np.ndarray, scored: np.ndarray,
                  min_overlap: int) -> dict[str, float]:
    """The README's formulas from a contingency table counted voxel by voxel."""
    table: Counter[tuple[int, int]] = Counter()
    for s, t, keep in zip(seg.ravel().tolist(), truth.ravel().tolist(), scored.ravel().tolist(),
                          strict=True):
        if keep and t != 0:
            table[(s, t)] += 1
    n = sum(table.values())
    sizes_t: Counter[int] = Counter()
    sizes_s: Counter[int] = Counter()
    for (s, t), c in table.items():
        sizes_t[t] += c
        sizes_s[s] += c
    sum_n2 = sum(c * c for c in table.values())
    sum_t2 = sum(c * c for c in sizes_t.values())
    sum_s2 = sum(c * c for c in sizes_s.values())
    h_seg_given_truth = -sum(c / n * math.log2(c / sizes_t[t]) for (s, t), c in table.items())
    h_truth_given_seg = -sum(c / n * math.log2(c / sizes_s[s]) for (s, t), c in table.items())
    arand = 1 - 2 * sum_n2 / (sum_t2 + sum_s2)
    over_t: Counter[int] = Counter(t for (s, t), c in table.items() if c >= min_overlap)
    over_s: Counter[int] = Counter(s for (s, t), c in table.items() if c >= min_overlap)
    return {"rand_split": sum_n2 / sum_t2, "rand_merge": sum_n2 / sum_s2, "arand": arand,
            "voi_split": h_seg_given_truth, "voi_merge": h_truth_given_seg,
            "cremi_score": math.sqrt(arand * (h_seg_given_truth + h_truth_given_seg)),
            "splits": sum(1 for v in over_t.values() if v >= 2),
            "merges": sum(1 for v in over_s.values() if v >= 2),
            "truth_objects": len(sizes_t), "segments": len(sizes_s)}


def _pair(tmp_path: Path, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = np.zeros((4, 24, 24), np.uint32)
    truth[:, :12, :12], truth[:, :12, 12:], truth[:, 12:, :] = 1, 2, 3
    truth[:, 20:, 20:] = 0  # unlabelled: not scored
    seg = truth.astype(np.uint64).copy()
    seg[:, 12:, :12] = 7  # object 3 split in two
    seg[:, :12, 10:14] = 0  # predicted 0: an ordinary segment across objects 1 and 2
    seg[rng.random(seg.shape) < 0.05] = 9
    write_volume(tmp_path / "seg.zarr", "segmentation", seg, levels=1)
    write_volume(tmp_path / "vol.zarr", "labels", truth, levels=1, label=True)
    return seg, truth


@pytest.mark.parametrize("min_overlap", [None, 20])
def test_evaluate_figures_are_the_readmes_formulas(tmp_path, min_overlap):
    """`arand` = 1 - 2 sum n^2 / (sum T^2 + sum S^2) (self-pairs included), `rand_split` =
    sum n^2 / sum T^2, `rand_merge` = sum n^2 / sum S^2, VOI in bits, `cremi_score` =
    sqrt(arand x (voi_split + voi_merge)); "truth 0 not scored"; "predicted 0 is an
    ordinary segment"; `splits`/`merges` at `--min-overlap` voxels (default 100);
    `truth_objects` and `segments` met in the scored voxels."""
    said("`rand_split` = sum n^2 / sum T^2 (falls when objects are split), `rand_merge` = sum "
         "n^2 / sum S^2")
    said("predicted 0 is an ordinary segment")
    said("overlapping two or more segments by at least `--min-overlap` voxels (default 100)")
    seg, truth = _pair(tmp_path)
    extra = [] if min_overlap is None else ["--min-overlap", min_overlap]
    result = invoke("evaluate", tmp_path / "seg.zarr" / "segmentation",
                    tmp_path / "vol.zarr" / "labels", "--json", *extra)
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    expected = _brute_scores(seg, truth, np.ones(seg.shape, bool), min_overlap or 100)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


def test_evaluate_mask_limits_the_scored_voxels_and_nan_is_outside(tmp_path):
    """"`emrun evaluate --mask` ... let in the voxels where they are non-zero; NaN in a float
    mask ... is outside"."""
    said("let in the voxels where they are non-zero; NaN in a float mask (what resampling or "
         "registration leaves where it has no value) is outside")
    seg, truth = _pair(tmp_path, seed=1)
    mask = np.ones(seg.shape, np.float32)
    mask[:, :, :6] = 0
    mask[:, 16:, :] = np.nan
    mask[0] = 0.25  # non-zero: in
    write_volume(tmp_path / "m.zarr", "mask", mask, levels=1)
    result = invoke("evaluate", tmp_path / "seg.zarr" / "segmentation",
                    tmp_path / "vol.zarr" / "labels", "--mask", tmp_path / "m.zarr" / "mask",
                    "--json", "--min-overlap", 1)
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    scored = (mask != 0) & ~np.isnan(mask)
    expected = _brute_scores(seg, truth, scored, 1)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


def test_negative_truth_ids_are_objects_with_a_warning(tmp_path):
    """"Negative truth ids are objects too (a warning says so: map them to 0 if they mean
    unlabelled)"."""
    said("Negative truth ids are objects too (a warning says so")
    truth = np.ones((2, 8, 8), np.int32)
    truth[:, :, 4:] = -1
    seg = np.ones((2, 8, 8), np.uint64)
    write_volume(tmp_path / "seg.zarr", "segmentation", seg, levels=1)
    write_volume(tmp_path / "vol.zarr", "labels", truth, levels=1, label=True)
    result = invoke("evaluate", tmp_path / "seg.zarr" / "segmentation",
                    tmp_path / "vol.zarr" / "labels", "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["truth_objects"] == 2
    assert got["arand"] == pytest.approx(1 - 2 * (2 * 64**2) / (2 * 64**2 + 128**2))
    assert "negative" in result.stderr.lower()


def _binary_reference(pred: np.ndarray, truth: np.ndarray, threshold: float
                      ) -> dict[str, float | None]:
    if pred.dtype == np.uint8:
        p = pred > threshold * 255
    elif pred.dtype.kind == "f":
        p = np.nan_to_num(pred, nan=0.0) > threshold
    else:
        p = pred != 0
    t = (np.nan_to_num(truth, nan=0.0) != 0) if truth.dtype.kind == "f" else truth != 0
    tp, fp, fn = int((p & t).sum()), int((p & ~t).sum()), int((~p & t).sum())

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    return {"precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn),
            "f1": ratio(2 * tp, 2 * tp + fp + fn), "iou": ratio(tp, tp + fp + fn)}


@pytest.mark.parametrize(("kind", "threshold"), [
    ("uint8", None), ("uint8", 0.3), ("float32", None), ("float32", 0.3), ("uint16", None),
    ("channel", None), ("channel", 0.3)])
def test_binary_scores_are_the_readmes_rule(tmp_path, kind, threshold):
    """"`--binary`: precision, recall, F1 and IoU of a foreground prediction (uint8
    probabilities above threshold x 255, floats above the threshold, other integers
    non-zero; ... NaN is background in both volumes) ... A single-channel inference output
    `(1, z, y, x)` is read as `(z, y, x)`"."""
    said("uint8 probabilities above threshold x 255, floats above the threshold, other "
         "integers non-zero")
    rng = np.random.default_rng(5)
    truth = (rng.random((3, 16, 16)) < 0.4).astype(np.uint8)
    prob = np.clip(truth * 0.6 + rng.random(truth.shape) * 0.5, 0, 1)
    if kind == "uint8" or kind == "channel":
        pred = np.round(prob * 255).astype(np.uint8)
        pred.ravel()[:5] = [76, 77, 127, 128, 0]  # at and around 0.3 x 255 and 0.5 x 255
    elif kind == "float32":
        pred = prob.astype(np.float32)
        pred.ravel()[:4] = [0.5, 0.3, np.nan, 0.5000001]
    else:
        pred = (prob > 0.5).astype(np.uint16) * 3
    if kind == "channel":
        write_volume(tmp_path / "p.zarr", "mito", pred[None], channel_axis=True, levels=1)
    else:
        write_volume(tmp_path / "p.zarr", "mito", pred, levels=1)
    write_volume(tmp_path / "t.zarr", "mito", truth, levels=1, label=False)
    args = [] if threshold is None else ["--threshold", threshold]
    result = invoke("evaluate", tmp_path / "p.zarr" / "mito", tmp_path / "t.zarr" / "mito",
                    "--binary", "--json", *args)
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    expected = _binary_reference(pred, truth, 0.5 if threshold is None else threshold)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def test_binary_undefined_ratios_are_null_and_logits_refused(tmp_path):
    """"A ratio whose denominator is 0 is undefined: `null` in `--json`, `n/a` in the text,
    with a line saying which side has no foreground"; "floats outside [0, 1] are logits and
    refused"."""
    said("A ratio whose denominator is 0 is undefined: `null` in `--json`, `n/a` in the text")
    truth = np.zeros((2, 8, 8), np.uint8)
    truth[0, :4] = 1
    write_volume(tmp_path / "t.zarr", "mito", truth, levels=1, label=False)
    write_volume(tmp_path / "p.zarr", "none", np.zeros((2, 8, 8), np.float32), levels=1)
    result = invoke("evaluate", tmp_path / "p.zarr" / "none", tmp_path / "t.zarr" / "mito",
                    "--binary", "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["precision"] is None and got["recall"] == 0.0 and got["f1"] == 0.0
    assert "precision" in result.stderr
    text = invoke("evaluate", tmp_path / "p.zarr" / "none", tmp_path / "t.zarr" / "mito",
                  "--binary")
    assert text.exit_code == 0 and "n/a" in text.output
    write_volume(tmp_path / "p.zarr", "logits", np.full((2, 8, 8), 3.0, np.float32), levels=1)
    result = invoke("evaluate", tmp_path / "p.zarr" / "logits", tmp_path / "t.zarr" / "mito",
                    "--binary")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


# --- Segmentation ---------------------------------------------------------------------------

def _cc_reference(affs: np.ndarray, offsets: list[list[int]], threshold: float) -> np.ndarray:
    """Connected components of the nearest-neighbour edges above the threshold, by a plain
    union-find: channel c at p compares p with p + offset_c (README, Conventions)."""
    shape = affs.shape[1:]
    parent = list(range(int(np.prod(shape))))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    probability = affs / 255.0 if affs.dtype == np.uint8 else affs
    for c, offset in enumerate(offsets):
        if sum(abs(o) for o in offset) != 1:
            continue
        for p in np.ndindex(*shape):
            q = tuple(a + o for a, o in zip(p, offset, strict=True))
            if all(0 <= a < s for a, s in zip(q, shape, strict=True)) and \
                    probability[(c, *p)] > threshold:
                parent[find(np.ravel_multi_index(p, shape))] = find(np.ravel_multi_index(q,
                                                                                          shape))
    return np.array([find(i) for i in range(len(parent))]).reshape(shape)


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = set(zip(a.ravel().tolist(), b.ravel().tolist(), strict=True))
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


def _write_affs(path: Path, affs: np.ndarray, offsets: list[list[int]] = OFFSETS3) -> None:
    write_volume(path.parent, path.name, affs, channel_axis=True, levels=1,
                 attrs={"offsets": offsets})


def test_cc_is_connected_components_of_edges_above_the_threshold(tmp_path):
    """"**cc** (`threshold` 0.5): connected components of the graph whose edges are the
    nearest-neighbour affinities above the threshold. Edges, not a foreground map, decide
    connectivity"; "Ids are numbered 1..K, deterministically"."""
    said("connected components of the graph whose edges are the nearest-neighbour "
         "affinities above the threshold")
    rng = np.random.default_rng(2)
    affs = (rng.random((3, 3, 10, 10)) ** 0.5 * 255).astype(np.uint8)
    affs[:, :, :, 0] = 127  # exactly at 0.5 x 255 rounds below 0.5: not an edge
    affs[:, :, :, 1] = 128
    _write_affs(tmp_path / "pred.zarr" / "affinity", affs)
    for threshold in ("0.5", "0.7"):
        result = invoke("segment", tmp_path / "pred.zarr" / "affinity", tmp_path / "s.zarr",
                        "--method", "cc", "--threshold", threshold, "--name", f"t{threshold}",
                        "--json")
        assert result.exit_code == 0, result.output
        seg = open_volume(tmp_path / "s.zarr" / f"t{threshold}").read()
        reference = _cc_reference(affs, OFFSETS3, float(threshold))
        assert _same_partition(seg, reference)
        assert sorted(np.unique(seg).tolist()) == list(range(1, len(np.unique(reference)) + 1))
        assert json.loads(result.stdout)["outputs"][0]["segments"] == len(np.unique(reference))


def _three_columns(left_middle: int, middle_right: int) -> np.ndarray:
    """1 x 4 x 12 uint8 affinities without the z channel (y, x): A (x 0-4), B (x 5, 4
    voxels), C (x 6-11); 255 inside each, the given values across A|B and B|C, 0 elsewhere
    across nothing."""
    affs = np.full((2, 1, 4, 12), 255, np.uint8)
    affs[1, :, :, 5] = left_middle   # x channel at x=5 compares x=5 with x=4
    affs[1, :, :, 6] = middle_right
    return affs


@pytest.mark.parametrize(("ab", "bc", "joins"), [(100, 50, "left"), (50, 100, "right")])
def test_min_size_merges_into_the_neighbour_of_highest_mean_affinity(tmp_path, ab, bc, joins):
    """"A segment smaller than `--min-size` is merged into the neighbour with which it has
    the highest mean affinity"; "affinities of one section (z = 1) may leave out the z
    channel"."""
    said("A segment smaller than `--min-size` is merged into the neighbour with which it has "
         "the highest mean affinity")
    said("so affinities of one section (z = 1) may leave out the z channel")
    affs = _three_columns(ab, bc)
    _write_affs(tmp_path / "pred.zarr" / "affinity", affs, [[0, -1, 0], [0, 0, -1]])
    result = invoke("segment", tmp_path / "pred.zarr" / "affinity", tmp_path / "s.zarr",
                    "--method", "cc", "--threshold", "0.5", "--min-size", 5)
    assert result.exit_code == 0, result.output
    seg = open_volume(tmp_path / "s.zarr" / "segmentation").read()[0]
    assert len(np.unique(seg)) == 2
    neighbour = seg[0, 0] if joins == "left" else seg[0, 11]
    assert (seg[:, 5] == neighbour).all()
    assert seg[0, 0] != seg[0, 11]


def test_segment_mask_gives_zero_outside_and_ids_inside(tmp_path):
    """"Every voxel inside `--mask` (everywhere, without one) gets a non-zero id, and masked
    voxels get 0 (a mask of zeros only is warned of)"."""
    said("Every voxel inside `--mask` (everywhere, without one) gets a non-zero id, and "
         "masked voxels get 0 (a mask of zeros only is warned of)")
    rng = np.random.default_rng(4)
    affs = (rng.random((3, 3, 12, 12)) * 255).astype(np.uint8)
    _write_affs(tmp_path / "pred.zarr" / "affinity", affs)
    mask = np.ones((3, 12, 12), np.uint8)
    mask[:, :5, :] = 0
    write_volume(tmp_path / "m.zarr", "mask", mask, levels=1, label=False)
    write_volume(tmp_path / "m.zarr", "zeros", np.zeros_like(mask), levels=1, label=False)
    for method in ("mws", "cc"):
        result = invoke("segment", tmp_path / "pred.zarr" / "affinity", tmp_path / "s.zarr",
                        "--method", method, "--mask", tmp_path / "m.zarr" / "mask", "--name",
                        method)
        assert result.exit_code == 0, result.output
        seg = open_volume(tmp_path / "s.zarr" / method).read()
        assert (seg[mask == 0] == 0).all() and (seg[mask != 0] != 0).all()
        assert sorted(np.unique(seg[mask != 0]).tolist()) == list(
            range(1, len(np.unique(seg[mask != 0])) + 1))
    result = invoke("segment", tmp_path / "pred.zarr" / "affinity", tmp_path / "s.zarr",
                    "--mask", tmp_path / "m.zarr" / "zeros", "--name", "zeros")
    assert result.exit_code == 0, result.output
    assert "warning" in result.stderr.lower()
    assert (open_volume(tmp_path / "s.zarr" / "zeros").read() == 0).all()
    seg = invoke("segment", tmp_path / "pred.zarr" / "affinity", tmp_path / "s.zarr",
                 "--name", "whole")
    assert seg.exit_code == 0 and (open_volume(tmp_path / "s.zarr" / "whole").read() != 0).all()


def test_segment_never_overwrites_and_reads_the_inference_folder(tmp_path):
    """"an existing volume is never overwritten"; "AFFS may also be the inference output
    folder itself (`pred.zarr`) when exactly one volume in it has an `offsets` attribute";
    default "mws ... `bias` 0.5, `min_size` 0"."""
    said("an existing volume is never overwritten")
    said("AFFS may also be the inference output folder itself (`pred.zarr`) when exactly one "
         "volume in it has an `offsets` attribute")
    rng = np.random.default_rng(6)
    affs = (rng.random((3, 2, 8, 8)) * 255).astype(np.uint8)
    _write_affs(tmp_path / "pred.zarr" / "affinity", affs)
    write_volume(tmp_path / "pred.zarr", "image", affs[0], levels=1)
    result = invoke("segment", tmp_path / "pred.zarr", tmp_path / "s.zarr", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["parameters"] == {"type": "mws", "bias": 0.5, "min_size": 0}
    before = open_volume(tmp_path / "s.zarr" / "segmentation").read()
    again = invoke("segment", tmp_path / "pred.zarr", tmp_path / "s.zarr", "--method", "cc")
    assert again.exit_code == 2 and "Traceback" not in again.output
    assert np.array_equal(open_volume(tmp_path / "s.zarr" / "segmentation").read(), before)
    _write_affs(tmp_path / "pred.zarr" / "other", affs)
    two = invoke("segment", tmp_path / "pred.zarr", tmp_path / "s2.zarr")
    assert two.exit_code == 2 and "Traceback" not in two.output


def test_sweep_writes_the_best_value_and_says_when_it_is_at_the_edge(tmp_path):
    """"With `--sweep --truth T`, every value is scored ..., the one with the lowest adapted
    Rand error is written, and the whole table goes into the output's attributes and the
    `--json` line; when the best value is the lowest or highest one tried, a note on stderr
    says that a wider range may do better (`at_edge` in the table"."""
    said("the one with the lowest adapted Rand error is written, and the whole table goes "
         "into the output's attributes and the `--json` line")
    truth = np.zeros((2, 8, 12), np.uint32)
    truth[:, :, :6], truth[:, :, 6:] = 1, 2
    affs = np.full((3, 2, 8, 12), 230, np.uint8)
    affs[2, :, :, 6] = 100  # the boundary: 0.39
    affs[:, 1, 3, 3] = 150  # a weak spot inside object 1: 0.59
    write_volume(tmp_path / "t.zarr", "labels", truth, levels=1, label=True)
    _write_affs(tmp_path / "pred.zarr" / "affinity", affs)
    values = {"0.2,0.5,0.95": (0.5, False), "0.5,0.95": (0.5, True)}
    for i, (given, (best, edge)) in enumerate(values.items()):
        result = invoke("segment", tmp_path / "pred.zarr" / "affinity", tmp_path / "s.zarr",
                        "--method", "cc", "--threshold", given, "--sweep", "--truth",
                        tmp_path / "t.zarr" / "labels", "--json", "--name", f"s{i}")
        assert result.exit_code == 0, result.output
        sweep = json.loads(result.stdout)["sweep"]
        assert sweep["chosen"] == best and sweep["at_edge"] is edge
        assert [row["threshold"] for row in sweep["table"]] == [float(v)
                                                                for v in given.split(",")]
        assert min(row["arand"] for row in sweep["table"]) == sweep["best"]["arand"]
        seg = open_volume(tmp_path / "s.zarr" / f"s{i}").read()
        assert _same_partition(seg, truth)
        assert ("edge" in result.stderr) is edge
        attrs = json.dumps(dict(zarr.open_group(str(tmp_path / "s.zarr" / "labels" / f"s{i}"),
                                                mode="r").attrs))
        assert '"table"' in attrs


# --- The recipe: extends, -o, --print, warnings ---------------------------------------------

BASE = """\
name: tiny
data:
  sources:
    a: {type: synthetic, shape: [32, 128, 128], seed: 1, weight: 2.0}
model: {type: rsunet, widths: [4, 8], kernel: [3, 3, 3]}
tasks:
  affinity:
    target: {type: affinity, offsets: [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]}
train:
  patch: [16, 64, 64]
  iterations: 10
"""


def _resolved(path: Path, *args: str) -> dict[str, Any]:
    import yaml

    result = invoke("validate", path, "--no-data", "--print", *args)
    assert result.exit_code == 0, result.output
    return yaml.safe_load(result.stdout)


def test_extends_deep_merges_and_a_changed_type_replaces_the_mapping(write):
    """"mappings merge key by key, lists and scalars replace, and a mapping whose `type:`
    the child changes replaces the base's whole (a base's synthetic source made a volume
    source keeps none of its `shape` or `seed`)"."""
    said("mappings merge key by key, lists and scalars replace, and a mapping whose `type:` "
         "the child changes replaces the base's whole")
    write(BASE, "base.yaml")
    np.save(write("", "x.npy"), np.zeros((16, 64, 64), np.uint8))
    np.save(write("", "y.npy"), np.ones((16, 64, 64), np.uint32))
    child = write("""\
        extends: base.yaml
        data:
          sources:
            a: {type: volume, image: x.npy, labels: y.npy}
        model: {widths: [6, 12]}
        tasks:
          affinity:
            target: {offsets: [[0, -1, 0], [0, 0, -1], [0, 0, -3]]}
        """, "child.yaml")
    recipe = _resolved(child)
    source = recipe["data"]["sources"]["a"]
    assert source["type"] == "volume" and "shape" not in source and "seed" not in source
    assert source["weight"] is None  # the base's weight went with its mapping
    assert recipe["model"]["widths"] == [6, 12] and recipe["model"]["kernel"] == [3, 3, 3]
    assert recipe["tasks"]["affinity"]["target"]["offsets"] == [[0, -1, 0], [0, 0, -1],
                                                                 [0, 0, -3]]
    assert recipe["name"] == "tiny"


@pytest.mark.parametrize("none", ["null", "[]"])
def test_extends_null_or_empty_means_none_and_cycles_are_reported(write, none):
    """"Bases may extend further bases; cycles are reported; `extends: null` or `[]` means
    none"; "Errors point into the file the value came from"."""
    said("cycles are reported; `extends: null` or `[]` means none")
    plain = write(f"extends: {none}\n{BASE}", "plain.yaml")
    assert _resolved(plain)["name"] == "tiny"
    write("extends: b.yaml\nname: a\n", "a.yaml")
    write("extends: [a.yaml]\n", "b.yaml")
    result = invoke("validate", plain.parent / "a.yaml", "--no-data")
    assert result.exit_code == 2 and "cycle" in result.stderr
    write(BASE.replace("iterations: 10", "iterations: -1"), "bad_base.yaml")
    child = write("extends: bad_base.yaml\nseed: 3\n", "bad_child.yaml")
    result = invoke("validate", child, "--no-data")
    assert result.exit_code == 2
    assert re.search(r"bad_base\.yaml:11:\d+: train\.iterations", result.stderr), result.stderr


def test_overrides_index_a_presets_list_and_refuse_a_yaml_bool_for_a_number(write):
    """"`-o augment.2.p=0.3` indexes lists, also a preset's: `deepem` becomes its list"; "A
    YAML `true`/`false` where a number belongs (`infer.tta: yes`) is refused rather than read
    as 1/0"; the deepem preset's grayscale at 70 %."""
    said("`-o augment.2.p=0.3` indexes lists, also a preset's: `deepem` becomes its list")
    said("mixed 2D/3D grayscale (contrast 0.5, brightness 0.5, 70 %)")
    path = write(BASE)
    plain = _resolved(path, "-o", "augment=deepem")["augment"]
    assert [step["type"] for step in plain] == ["one_of", "warp", "grayscale", "blurry_section",
                                                "box", "flip_rotate"]
    assert plain[2]["p"] == 0.7 and plain[2]["contrast"] == 0.5 and plain[1]["rot_max"] == 45
    changed = _resolved(path, "-o", "augment=deepem", "-o", "augment.2.p=0.3")["augment"]
    assert changed[2]["p"] == 0.3
    assert [dict(s, p=None) for s in changed] == [dict(s, p=None) for s in plain]
    result = invoke("validate", path, "--no-data", "-o", "infer.tta=yes")
    assert result.exit_code == 2 and "infer.tta" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_print_shows_defaults_with_infer_patch_and_overlap_null(write):
    """"`emrun validate RECIPE --print` shows every default filled in, except `infer.patch`
    and `infer.overlap`, printed as null when not set"; annotated defaults: batch_size 1,
    validate_every 1000, tta 1, dtype uint8, segment mws bias 0.5."""
    said("except `infer.patch` and `infer.overlap`, printed as null when not set")
    recipe = _resolved(write(BASE))
    assert recipe["infer"]["patch"] is None and recipe["infer"]["overlap"] is None
    expected = {("train", "batch_size"): 1, ("train", "validate_every"): 1000,
                ("train", "checkpoint_every"): 1000, ("train", "keep_checkpoints"): 3,
                ("train", "log_every"): 50, ("train", "image_every"): 1000,
                ("train", "workers"): 2, ("train", "precision"): "fp32",
                ("train", "channels_last"): True, ("train", "accumulate"): 1,
                ("infer", "tta"): 1, ("infer", "batch_size"): 4, ("infer", "precision"): "bf16",
                ("infer", "dtype"): "uint8", ("infer", "compile_mode"): "default",
                ("model", "activation"): "elu", ("model", "upsample"): "interp",
                ("model", "norm"): "batch", ("model", "input_kernel"): [1, 5, 5],
                ("segment", "type"): "mws", ("segment", "bias"): 0.5,
                ("segment", "min_size"): 0, ("seed",): 0}
    for keys, value in expected.items():
        found: Any = recipe
        for key in keys:
            found = found[key]
        assert found == value, keys
    assert recipe["train"]["optimizer"]["betas"] == [0.9, 0.999]
    assert recipe["augment"] == []


def test_validation_tiles_count_each_voxel_once(write):
    """"`validation_batches` tiles the validation sources deterministically (padding masked
    out; where the last tile on an axis is moved back to end at the box's end, the voxels it
    shares with the tile before are masked out in it, so the validation loss counts each
    voxel once)": summed over the tiles, placed where each was read, every voxel of the
    validation box is counted exactly once, and nothing outside it."""
    said("the voxels it shares with the tile before are masked out in it, so the validation "
         "loss counts each voxel once")
    from emrun.data.loader import tile_corners, unpack, validation_batches
    from emrun.geometry import Roi
    from emrun.recipe import load_recipe

    shape = (20, 80, 96)
    np.save(write("", "x.npy"), np.random.default_rng(0).integers(0, 255, shape, np.uint8))
    np.save(write("", "y.npy"), np.ones(shape, np.uint32))
    boxes = {"v1": ((3, 5, 7), (11, 45, 70)), "v2": ((0, 0, 0), (5, 40, 32))}
    sources = "\n".join(
        f"    {name}: {{image: x.npy, labels: y.npy, roi: {{offset: {list(o)}, shape: "
        f"{list(s)}}}}}" for name, (o, s) in boxes.items())
    text = BASE.replace("patch: [16, 64, 64]", "patch: [8, 32, 32]").replace(
        "model:", f"  validation:\n{sources}\nmodel:")
    text = text.replace("affinity:\n    target: {type: affinity, offsets: [[-1, 0, 0], "
                        "[0, -1, 0], [0, 0, -1]]}", "boundary:\n    target: {type: boundary}")
    path = write(text, "r.yaml")
    assert "boundary" in text
    cwd = os.getcwd()
    os.chdir(path.parent)
    try:
        recipe = load_recipe(path).recipe
        batches = list(validation_batches(recipe))
    finally:
        os.chdir(cwd)
    patch = recipe.train.patch
    corners = [(name, c) for name, (o, s) in boxes.items()
               for c in tile_corners(Roi(o, s), patch)]
    assert len(batches) == len(corners)
    for name, (offset, size) in boxes.items():
        counted = np.zeros(shape, np.int64)
        for batch, (source, corner) in zip(batches, corners, strict=True):
            if source != name:
                continue
            mask = unpack(batch, "cpu")["mask"]["boundary"].numpy()
            placed = np.zeros(tuple(max(s, c + p) for s, c, p in zip(shape, corner, patch,
                                                                      strict=True)), np.int64)
            region = tuple(slice(c, c + p) for c, p in zip(corner, patch, strict=True))
            placed[region] = mask[0].sum(axis=0) > 0
            assert placed[tuple(slice(s, None) for s in shape)].sum() == 0
            counted += placed[tuple(slice(0, s) for s in shape)]
        box = tuple(slice(o, o + s) for o, s in zip(offset, size, strict=True))
        inside = np.zeros(shape, bool)
        inside[box] = True
        assert (counted[inside] == 1).all(), name
        assert (counted[~inside] == 0).all(), name


def test_validate_warns_of_settings_that_waste_a_run(write):
    """"`validate` and `train` warn (located) when the warm-up lasts the whole run, when
    `validate_every` is above `iterations` (no validation, no `best.pt`) and when a step
    milestone is not before `iterations`"."""
    said("warn (located) when the warm-up lasts the whole run, when `validate_every` is above "
         "`iterations` (no validation, no `best.pt`) and when a step milestone is not before "
         "`iterations`")
    np.save(write("", "x.npy"), np.zeros((16, 64, 64), np.uint8))
    np.save(write("", "y.npy"), np.ones((16, 64, 64), np.uint32))
    text = BASE.replace("model:", "  validation:\n    v: {image: x.npy, labels: y.npy}\nmodel:")
    text += "  validate_every: 20\n  schedule: {type: cosine, warmup: 10}\n"
    path = write(text)
    result = invoke("validate", path, "--no-data")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning")]
    assert any(re.search(r"\.yaml:\d+:\d+: train\.validate_every", w) for w in warnings), warnings
    assert any(re.search(r"\.yaml:\d+:\d+: train\.schedule\.warmup", w) for w in warnings)
    step = write(BASE + "  schedule: {type: step, milestones: [5, 10]}\n", "step.yaml")
    result = invoke("validate", step, "--no-data")
    assert result.exit_code == 0, result.output
    assert re.search(r"warning: .*step\.yaml:\d+:\d+: train\.schedule\.milestones",
                     result.stderr), result.stderr


def test_convert_places_by_voxels_and_makes_wide_integers_labels(tmp_path):
    """"the volume's place stays in voxels (a source at voxel offset (10, 2, 3) converted
    with `--voxel-size 40 8 8` lies at 400, 16, 24 nm)"; "integers wider than 8 bits become
    OME labels unless `--image`"."""
    said("a source at voxel offset (10, 2, 3) converted with `--voxel-size 40 8 8` lies at "
         "400, 16, 24 nm")
    said("integers wider than 8 bits become OME labels unless `--image`")
    array = np.arange(4 * 8 * 8, dtype=np.uint16).reshape(4, 8, 8)
    write_volume(tmp_path / "src.zarr", "ids", array, offset=(10, 2, 3), voxel_size=(30, 6, 6),
                 levels=1, label=False)
    result = invoke("data", "convert", tmp_path / "src.zarr" / "ids", tmp_path / "a.zarr",
                    "--name", "ids", "--voxel-size", 40, 8, 8, "--levels", 1)
    assert result.exit_code == 0, result.output
    level = levels_of(tmp_path / "a.zarr" / "labels" / "ids")[0]
    assert level["scale"] == [40.0, 8.0, 8.0]
    assert level["translation"] == [400.0, 16.0, 24.0]
    assert np.array_equal(open_volume(tmp_path / "a.zarr" / "ids").read(), array)
    result = invoke("data", "convert", tmp_path / "src.zarr" / "ids", tmp_path / "b.zarr",
                    "--name", "ids", "--image", "--levels", 1)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "b.zarr" / "ids" / "0").is_dir()
    assert not (tmp_path / "b.zarr" / "labels").exists()
    write_volume(tmp_path / "src.zarr", "bytes", array.astype(np.uint8), levels=1, label=False)
    result = invoke("data", "convert", tmp_path / "src.zarr" / "bytes", tmp_path / "c.zarr",
                    "--name", "bytes", "--levels", 1)
    assert result.exit_code == 0 and (tmp_path / "c.zarr" / "bytes" / "0").is_dir()


# --- Training, inference, export on a two-iteration run --------------------------------------

TINY_RUN = """\
name: tiny
data:
  sources:
    a: {type: synthetic, shape: [16, 64, 64], seed: 1}
model: {type: rsunet, widths: [2, 4]}
tasks:
  affinity:
    target: {type: affinity}
train:
  patch: [4, 16, 16]
  iterations: 2
  workers: 0
  validate_every: 0
  checkpoint_every: 2
infer: {precision: fp32}
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A two-iteration CPU run: runs/tiny with its checkpoints."""
    folder = tmp_path_factory.mktemp("run")
    (folder / "t.yaml").write_text(TINY_RUN, encoding="utf-8")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        result = invoke("train", "t.yaml", "--device", "cpu")
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    return folder / "runs" / "tiny"


def test_a_run_directory_holds_what_the_readme_lists(run_dir):
    """"**Run directory**: `recipe.yaml` (fully resolved), `provenance.json` (...),
    `checkpoints/iter_0000100.pt` (...), `checkpoints/last.pt`, ... `tensorboard/` ...,
    `events.jsonl` (one JSON object per log step"; checkpoints "load with
    `torch.load(..., weights_only=True)`" and hold `train_seconds` and `devices`."""
    import torch

    said("`checkpoints/iter_0000100.pt` (the last `keep_checkpoints`), `checkpoints/last.pt`")
    for name in ("recipe.yaml", "provenance.json", "checkpoints/iter_0000002.pt",
                 "checkpoints/last.pt", "tensorboard", "events.jsonl"):
        assert (run_dir / name).exists(), name
    for line in (run_dir / "events.jsonl").read_text().splitlines():
        assert isinstance(json.loads(line), dict)
    provenance = json.loads((run_dir / "provenance.json").read_text())
    assert {"emrun", "torch", "host", "command", "sessions"} <= set(provenance)
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["train_seconds"] > 0 and state["devices"]


def _image(tmp_path: Path) -> np.ndarray:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (8, 40, 40), dtype=np.uint8)
    write_volume(tmp_path / "in.zarr", "image", image, voxel_size=(30, 6, 6), offset=(2, 4, 6),
                 levels=1)
    return image


def test_infer_roi_output_lies_where_the_box_does(run_dir, tmp_path):
    """"`--roi 60,0,0/10,1024,1024` predicts only that box (offset/shape, voxels); the output
    has the box's shape and lies where the box does (its OME-Zarr translation is the input's
    offset plus the box's)"; uint8 by default; "affinity arrays carry their `offsets`"."""
    said("its OME-Zarr translation is the input's offset plus the box's")
    _image(tmp_path)
    result = invoke("infer", "--checkpoint", run_dir, "--input", tmp_path / "in.zarr" / "image",
                    "--output", tmp_path / "p.zarr", "--roi", "1,2,3/4,20,24", "--device", "cpu")
    assert result.exit_code == 0, result.output
    level = levels_of(tmp_path / "p.zarr" / "affinity")[0]
    assert level["shape"] == (3, 4, 20, 24) and level["dtype"] == np.uint8
    assert level["translation"][1:] == [(2 + 1) * 30.0, (4 + 2) * 6.0, (6 + 3) * 6.0]
    group = zarr.open_group(str(tmp_path / "p.zarr" / "affinity"), mode="r")
    assert group.attrs["offsets"] == OFFSETS3


def test_infer_refusals_the_readme_states(run_dir, tmp_path):
    """"`--resume` with no output there is refused (drop it to start one)"; "a float input
    must hold values in [0, 1]"; "NaN or infinite input voxels are refused (one line naming
    how many and where ...), except outside `--mask`, where they read as black"."""
    said("`--resume` with no output there is refused (drop it to start one)")
    said("NaN or infinite input voxels are refused (one line naming how many and where")
    image = _image(tmp_path)
    common = ["--checkpoint", run_dir, "--device", "cpu"]
    result = invoke("infer", *common, "--input", tmp_path / "in.zarr" / "image", "--output",
                    tmp_path / "r.zarr", "--resume")
    assert result.exit_code == 2 and not (tmp_path / "r.zarr").exists()
    loud = (image / 255.0).astype(np.float32)
    loud[5, 30, 30] = 1.5
    write_volume(tmp_path / "in.zarr", "loud", loud, levels=1)
    result = invoke("infer", *common, "--input", tmp_path / "in.zarr" / "loud", "--output",
                    tmp_path / "l.zarr")
    assert result.exit_code == 2 and "[0, 1]" in result.stderr
    nan = (image / 255.0).astype(np.float32)
    nan[1, 3, 3] = np.nan
    write_volume(tmp_path / "in.zarr", "nan", nan, levels=1)
    result = invoke("infer", *common, "--input", tmp_path / "in.zarr" / "nan", "--output",
                    tmp_path / "n.zarr")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert result.exit_code == 2 and len(errors) == 1 and "1 NaN" in errors[0]
    mask = np.ones(nan.shape, np.uint8)
    mask[:4, :20, :20] = 0
    write_volume(tmp_path / "in.zarr", "mask", mask, levels=1, label=False)
    result = invoke("infer", *common, "--input", tmp_path / "in.zarr" / "nan", "--output",
                    tmp_path / "masked.zarr", "--mask", tmp_path / "in.zarr" / "mask", "--block",
                    4, 20, 20)
    assert result.exit_code == 0, result.output
    out = open_volume(tmp_path / "masked.zarr" / "affinity").read()
    assert (out[:, :4, :20, :20] == 0).all()
    assert out[:, 4:].any() and out[:, :4, 20:, 20:].any()


def test_masked_blocks_store_no_chunk_and_an_all_empty_run_warns(run_dir, tmp_path):
    """"blocks where the mask is zero are not predicted and store no chunk (they read as
    zeros, the arrays' fill value) ... The closing line counts these empty blocks, and warns
    when every block was empty"."""
    said("blocks where the mask is zero are not predicted and store no chunk")
    _image(tmp_path)
    write_volume(tmp_path / "in.zarr", "zeros", np.zeros((8, 40, 40), np.uint8), levels=1,
                 label=False, voxel_size=(30, 6, 6), offset=(2, 4, 6))
    result = invoke("infer", "--checkpoint", run_dir, "--device", "cpu", "--input",
                    tmp_path / "in.zarr" / "image", "--output", tmp_path / "z.zarr", "--mask",
                    tmp_path / "in.zarr" / "zeros", "--block", 4, 20, 20)
    assert result.exit_code == 0, result.output
    assert "empty" in result.output and "warning" in result.output.lower()
    level0 = tmp_path / "z.zarr" / "affinity" / "0"
    assert [p for p in level0.rglob("*") if p.is_file() and p.name != "zarr.json"] == []
    assert (open_volume(tmp_path / "z.zarr" / "affinity").read() == 0).all()


def test_export_package_members_checksums_and_refusals(run_dir, tmp_path):
    """"one zip file, `NAME.emrun`, members stored: `manifest.json`, `recipe.yaml` ...,
    `weights.pt`"; the manifest's "SHA-256 of every member"; "an existing file is never
    replaced (exit 2 ...)"; "a suffix of another format is refused"; "`--format` names it
    for another suffix"; "A package predicts exactly what its checkpoint predicts"; "a
    changed byte ... is one line naming it, exit 2"."""
    said("an existing file is never replaced (exit 2: remove it or choose another name)")
    said("`--format` names it for another suffix, and a suffix of another format is refused")
    package = tmp_path / "m.emrun"
    result = invoke("export", run_dir, package)
    assert result.exit_code == 0, result.output
    with zipfile.ZipFile(package) as archive:
        infos = {info.filename: info for info in archive.infolist()}
        assert set(infos) == {"manifest.json", "recipe.yaml", "weights.pt"}
        assert all(info.compress_type == zipfile.ZIP_STORED for info in infos.values())
        manifest = json.loads(archive.read("manifest.json"))
        for name, digest in manifest["members"].items():
            assert hashlib.sha256(archive.read(name)).hexdigest() == digest
        members = {name: archive.read(name) for name in infos}
    assert manifest["format"] == "emrun-model" and manifest["format_version"] == 1
    assert manifest["input"]["voxel_size"] == [30.0, 6.0, 6.0]
    assert manifest["input"]["intensity"]["low"] == 0 and manifest["input"]["intensity"][
        "high"] == 255
    before = package.read_bytes()
    assert invoke("export", run_dir, package).exit_code == 2
    assert package.read_bytes() == before
    assert invoke("export", run_dir, tmp_path / "m.zip", "--format", "emrun").exit_code == 2
    assert not (tmp_path / "m.zip").exists()
    assert invoke("export", run_dir, tmp_path / "m.bin", "--format", "emrun").exit_code == 0
    _image(tmp_path)
    outputs = {}
    for key, source in (("--checkpoint", run_dir), ("--model", package)):
        out = tmp_path / f"{key.strip('-')}.zarr"
        result = invoke("infer", key, source, "--input", tmp_path / "in.zarr" / "image",
                        "--output", out, "--device", "cpu")
        assert result.exit_code == 0, result.output
        outputs[key] = open_volume(out / "affinity").read()
    assert np.array_equal(outputs["--checkpoint"], outputs["--model"])
    weights = bytearray(members["weights.pt"])
    weights[len(weights) // 2] ^= 0xFF
    damaged = tmp_path / "d.emrun"
    with zipfile.ZipFile(damaged, "w", zipfile.ZIP_STORED) as archive:
        for name in ("manifest.json", "recipe.yaml"):
            archive.writestr(name, members[name])
        archive.writestr("weights.pt", bytes(weights))
    result = invoke("infer", "--model", damaged, "--input", tmp_path / "in.zarr" / "image",
                    "--output", tmp_path / "d.zarr", "--device", "cpu")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert result.exit_code == 2 and len(errors) == 1 and "weights.pt" in errors[0]


# --- Exit codes and the schema ---------------------------------------------------------------

def _schema_after_reading(count: int) -> int:
    """`python -m emrun schema --output -` (about 200 kB, more than a pipe holds) whose reader
    reads ``count`` bytes and goes away; emrun's exit code."""
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-m", "emrun", "schema", "--output", "-"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert process.stdout is not None
    if count:
        os.read(process.stdout.fileno(), count)
    process.stdout.close()
    return process.wait(timeout=60)


def test_a_reader_gone_before_any_output_is_exit_141():
    """"output whose reader goes away (`emrun ... | head`) ends the command quietly with exit
    141, as a shell reports SIGPIPE": the reader closed before emrun writes."""
    said("output whose reader goes away (`emrun ... | head`) ends the command quietly with "
         "exit 141")
    assert _schema_after_reading(0) == 141


def test_a_reader_gone_part_way_is_exit_141():
    """`emrun schema --output - | head -c 10`: the reader takes a few bytes, then goes."""
    assert _schema_after_reading(10) == 141


def test_schema_lets_an_extending_recipe_be_partial_and_booleans_be_strict(write):
    """"a recipe that `extends` a base may leave any section or key to it"; "yes/no settings
    take YAML booleans only, as the schema says": the schema and `emrun validate` agree."""
    import jsonschema
    import yaml

    said("a recipe that `extends` a base may leave any section or key to it")
    said("yes/no settings take YAML booleans only, as the schema says")
    schema = json.loads(invoke("schema", "--output", "-").stdout)
    write(BASE, "base.yaml")
    partial = write("extends: base.yaml\ntrain: {iterations: 4}\n", "partial.yaml")
    jsonschema.validate(yaml.safe_load(partial.read_text()), schema)
    assert invoke("validate", partial, "--no-data").exit_code == 0
    for value, ok in (("true", True), ("false", True), ("1", False), ("'yes'", False)):
        text = BASE + f"  compile: {value}\n"
        checker = jsonschema.validators.validator_for(schema)(schema)
        errors = list(checker.iter_errors(yaml.safe_load(text)))
        assert (not errors) is ok, value
        result = invoke("validate", write(text, "b.yaml"), "--no-data")
        assert (result.exit_code == 0) is ok, (value, result.output)
