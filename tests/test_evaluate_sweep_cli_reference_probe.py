"""Reference probe of `emrun evaluate` and `emrun segment --sweep` through the command line.

Every score is compared with a brute-force reference written here: a contingency table built
voxel by voxel in a plain dict, adapted Rand error and Rand split/merge as exact Fractions
(SNEMI3D's definition, self-pairs included, truth 0 dropped, predicted 0 an ordinary segment,
only voxels inside the mask), VOI split/merge in bits from the same dict, split/merge counts
with the minimum overlap, and truth pieces found by a breadth-first search over 6-neighbours
(pieces of the whole volume, as the README says: "pieces inside the volume"). Volumes are
tiny (at most 6 x 12 x 12) and made in code.
"""

from __future__ import annotations

import json
import math
from collections import deque
from fractions import Fraction

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from emrun.cli import app
from emrun.io import open_volume, write_volume

runner = CliRunner()

SHAPE = (5, 12, 12)
NEAREST = [(-1, 0, 0), (0, -1, 0), (0, 0, -1)]
LONG = [*NEAREST, (-2, 0, 0), (0, -3, 0), (0, 0, -3)]


# --------------------------------------------------------------------------- references


def _inside(value) -> bool:
    value = float(value)
    return value != 0 and not math.isnan(value)


def ref_table(seg, truth, mask=None) -> dict[tuple[int, int], int]:
    """(seg id, truth id) -> voxels, over voxels with truth != 0 inside the mask."""
    table: dict[tuple[int, int], int] = {}
    for idx in np.ndindex(truth.shape):
        t = int(truth[idx])
        if t == 0 or (mask is not None and not _inside(mask[idx])):
            continue
        key = (int(seg[idx]), t)
        table[key] = table.get(key, 0) + 1
    return table


def ref_scores(seg, truth, mask=None, min_overlap=100) -> dict:
    table = ref_table(seg, truth, mask)
    assert table, "reference: nothing scored"
    sizes_t: dict[int, int] = {}
    sizes_s: dict[int, int] = {}
    for (s, t), n in table.items():
        sizes_t[t] = sizes_t.get(t, 0) + n
        sizes_s[s] = sizes_s.get(s, 0) + n
    total = sum(table.values())
    n2 = sum(n * n for n in table.values())
    t2 = sum(n * n for n in sizes_t.values())
    s2 = sum(n * n for n in sizes_s.values())
    arand = 1 - Fraction(2 * n2, t2 + s2)
    voi_split = -sum(n / total * math.log2(n / sizes_t[t]) for (s, t), n in table.items())
    voi_merge = -sum(n / total * math.log2(n / sizes_s[s]) for (s, t), n in table.items())
    split_of: dict[int, int] = {}
    merge_of: dict[int, int] = {}
    for (s, t), n in table.items():
        if n >= min_overlap:
            split_of[t] = split_of.get(t, 0) + 1
            merge_of[s] = merge_of.get(s, 0) + 1
    voi_split, voi_merge = max(0.0, voi_split), max(0.0, voi_merge)
    return {
        "arand": float(arand), "rand_split": float(Fraction(n2, t2)),
        "rand_merge": float(Fraction(n2, s2)), "voi_split": voi_split, "voi_merge": voi_merge,
        "voi": voi_split + voi_merge,
        "cremi_score": math.sqrt(float(arand) * (voi_split + voi_merge)),
        "splits": sum(1 for c in split_of.values() if c > 1),
        "merges": sum(1 for c in merge_of.values() if c > 1),
        "min_overlap": min_overlap, "voxels": total, "truth_objects": len(sizes_t),
        "segments": len(sizes_s),
    }


def ref_pieces(truth) -> np.ndarray:
    """6-connected pieces of equal non-zero ids over the whole array, by breadth-first search."""
    out = np.zeros(truth.shape, np.int64)
    count = 0
    for start in np.ndindex(truth.shape):
        if truth[start] == 0 or out[start]:
            continue
        count += 1
        out[start] = count
        queue = deque([start])
        while queue:
            here = queue.popleft()
            for axis in range(3):
                for step in (-1, 1):
                    there = list(here)
                    there[axis] += step
                    there = tuple(there)
                    if not 0 <= there[axis] < truth.shape[axis]:
                        continue
                    if out[there] == 0 and truth[there] == truth[here]:
                        out[there] = count
                        queue.append(there)
    return out


def assert_scores(line: dict, expected: dict) -> None:
    for key, value in expected.items():
        if isinstance(value, int):
            assert line[key] == value, (key, line[key], value)
        else:
            assert line[key] == pytest.approx(value, rel=1e-12, abs=1e-14), key


# --------------------------------------------------------------------------- data


def blocky(rng, shape, ids, cell=(2, 4, 4), noise=0.15, zero=True) -> np.ndarray:
    """Blocky labels (cells of ``cell`` voxels) with a fraction of voxels relabelled."""
    coarse = rng.integers(0 if zero else 1, ids, tuple(-(-n // c) for n, c in
                                                       zip(shape, cell, strict=True)))
    labels = coarse
    for axis, c in enumerate(cell):
        labels = labels.repeat(c, axis)
    labels = labels[: shape[0], : shape[1], : shape[2]].copy()
    flip = rng.random(shape) < noise
    labels[flip] = rng.integers(0 if zero else 1, ids, int(flip.sum()))
    return labels


def cells() -> np.ndarray:
    """Nine boxes of the volume, no background: 3 slabs in y, 3 in x, all of z."""
    truth = np.zeros(SHAPE, np.uint32)
    for i in range(3):
        for j in range(3):
            truth[:, 4 * i: 4 * i + 4, 4 * j: 4 * j + 4] = 1 + 3 * i + j
    return truth


def affinities(truth, offsets, rng=None, noise=0.0, lo=0.0, hi=1.0) -> np.ndarray:
    """``hi`` between voxels of the same non-zero id, else ``lo``; plus uniform noise in
    [-noise, noise], clipped to [0, 1]."""
    affs = np.zeros((len(offsets), *truth.shape), np.float32)
    for c, off in enumerate(offsets):
        pairs = list(zip(off, truth.shape, strict=True))
        at = tuple(slice(max(0, -d), n - max(0, d)) for d, n in pairs)  # voxels u
        other = tuple(slice(max(0, d), n - max(0, -d)) for d, n in pairs)  # u + offset
        affs[c][at] = (truth[at] == truth[other]) & (truth[at] != 0)
    affs = lo + (hi - lo) * affs
    if noise:
        affs = affs + rng.uniform(-noise, noise, affs.shape)
    return np.clip(affs, 0, 1).astype(np.float32)


def write_affs(folder, affs, offsets, name="affinity", offset=None) -> str:
    data = np.round(affs * 255).astype(np.uint8)
    write_volume(folder / "pred.zarr", name, data, voxel_size=(30, 6, 6), channel_axis=True,
                 offset=offset, attrs={"offsets": [list(o) for o in offsets]})
    return f"{folder / 'pred.zarr'}/{name}"


def put(folder, store, name, array, **kwargs) -> str:
    write_volume(folder / f"{store}.zarr", name, array, **kwargs)
    return f"{folder / store}.zarr/{name}"


def last_json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def evaluate(*args) -> dict:
    return last_json(runner.invoke(app, ["evaluate", *map(str, args), "--json"]))


def segment(*args):
    return runner.invoke(app, ["segment", *map(str, args)])


# --------------------------------------------------------------------------- evaluate


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evaluate_matches_the_brute_force_table_with_zeros_on_both_sides(tmp_path, seed):
    rng = np.random.default_rng(seed)
    truth = blocky(rng, (4, 10, 11), 6).astype(np.uint32)  # ids 0..5: 0 is unlabelled
    seg = blocky(rng, (4, 10, 11), 5, cell=(1, 3, 5)).astype(np.uint64)  # predicted 0s too
    assert (truth == 0).any() and (seg[truth != 0] == 0).any()
    s, t = put(tmp_path, "s", "seg", seg), put(tmp_path, "t", "truth", truth)
    for overlap in (1, 5, 100):
        line = evaluate(s, t, "--min-overlap", overlap)
        assert_scores(line, ref_scores(seg, truth, min_overlap=overlap))
        assert line["connected_truth"] is False and line["mask"] is None


def test_evaluate_perfect_and_relabelled_segmentations_score_exactly_zero(tmp_path):
    rng = np.random.default_rng(5)
    truth = blocky(rng, (3, 8, 9), 7, zero=False).astype(np.uint16)
    seg = (truth.astype(np.uint64) * 1000 + 7) ** 2  # any one-to-one relabelling
    line = evaluate(put(tmp_path, "s", "seg", seg), put(tmp_path, "t", "truth", truth))
    assert line["arand"] == 0.0 and line["voi_split"] == 0.0 and line["voi_merge"] == 0.0
    assert line["rand_split"] == 1.0 and line["rand_merge"] == 1.0


def test_evaluate_signed_ids_negative_objects(tmp_path):
    rng = np.random.default_rng(7)
    truth = blocky(rng, (3, 8, 8), 6).astype(np.int32) - 2  # -2, -1 objects; 0 unlabelled
    seg = blocky(rng, (3, 8, 8), 4, cell=(1, 2, 4)).astype(np.int64) - 1
    result = runner.invoke(app, ["evaluate", put(tmp_path, "s", "seg", seg),
                                 put(tmp_path, "t", "truth", truth), "--json",
                                 "--min-overlap", "3"])
    line = last_json(result)
    assert_scores(line, ref_scores(seg, truth, min_overlap=3))
    assert "negative" in result.stderr


@pytest.mark.parametrize("kind", ["uint8", "float_nan"])
def test_evaluate_mask_keeps_exactly_the_voxels_inside(tmp_path, kind):
    rng = np.random.default_rng(11)
    truth = blocky(rng, (4, 9, 12), 5).astype(np.uint32)
    seg = blocky(rng, (4, 9, 12), 4, cell=(2, 3, 3)).astype(np.uint32)
    if kind == "uint8":
        mask = (rng.random(truth.shape) < 0.6).astype(np.uint8) * 3
    else:
        mask = rng.choice(np.array([0.0, 0.5, np.nan, -2.0], np.float32), truth.shape)
    s, t = put(tmp_path, "s", "seg", seg), put(tmp_path, "t", "truth", truth)
    m = put(tmp_path, "m", "mask", mask)
    line = evaluate(s, t, "--mask", m, "--min-overlap", 2)
    assert_scores(line, ref_scores(seg, truth, mask, min_overlap=2))
    assert line["mask"] is not None


def _two_piece_truth() -> np.ndarray:
    """Object 1 is a U: two arms joined through z = 0 only; object 2 is two disjoint bars."""
    truth = np.zeros((4, 8, 10), np.uint32)
    truth[:, 1:3, 1:4] = 1
    truth[:, 1:3, 6:9] = 1
    truth[0, 1:3, 1:9] = 1  # the bridge
    truth[:, 5:7, 0:4] = 2
    truth[:, 5:7, 6:10] = 2
    truth[1:3, 3:5, 4:6] = 3
    return truth


def test_evaluate_connected_truth_scores_the_6_connected_pieces(tmp_path):
    truth = _two_piece_truth()
    rng = np.random.default_rng(2)
    seg = blocky(rng, truth.shape, 4, cell=(2, 2, 5), noise=0.05).astype(np.uint32)
    pieces = ref_pieces(truth)
    assert len(np.unique(pieces[pieces != 0])) == 4  # 1 (bridged), 2 (two bars), 3
    s, t = put(tmp_path, "s", "seg", seg), put(tmp_path, "t", "truth", truth)
    line = evaluate(s, t, "--connected-truth", "--min-overlap", 1)
    assert line["connected_truth"] is True
    assert_scores(line, ref_scores(seg, pieces, min_overlap=1))
    # the truth's own pieces are a perfect segmentation against it
    perfect = put(tmp_path, "s", "pieces", pieces.astype(np.uint64))
    assert evaluate(perfect, t, "--connected-truth")["arand"] == 0.0
    assert evaluate(perfect, t)["arand"] > 0.0


def test_evaluate_connected_truth_with_a_mask_keeps_whole_volume_pieces(tmp_path):
    """README: the pieces are those "inside the volume"; a mask only drops voxels from the
    scoring. A mask that cuts the bridge of object 1 must not cut object 1 in two."""
    truth = _two_piece_truth()
    rng = np.random.default_rng(4)
    seg = blocky(rng, truth.shape, 4, cell=(2, 2, 5), noise=0.05).astype(np.uint32)
    mask = np.ones(truth.shape, np.uint8)
    mask[0, :, 4:6] = 0  # the bridge's middle
    mask[3] = 0
    s, t = put(tmp_path, "s", "seg", seg), put(tmp_path, "t", "truth", truth)
    m = put(tmp_path, "m", "mask", mask)
    line = evaluate(s, t, "--connected-truth", "--mask", m, "--min-overlap", 1)
    assert_scores(line, ref_scores(seg, ref_pieces(truth), mask, min_overlap=1))
    assert line["truth_objects"] == 4


@pytest.mark.parametrize("connected", [False, True])
@pytest.mark.parametrize("block", [(1, 3, 4), (2, 5, 7), (6, 12, 12)])
def test_evaluate_blockwise_equals_the_reference(tmp_path, connected, block):
    rng = np.random.default_rng(sum(block) + connected)
    truth = blocky(rng, (6, 12, 12), 4, cell=(2, 3, 3), noise=0.1).astype(np.uint32)
    seg = blocky(rng, (6, 12, 12), 5, cell=(3, 4, 2), noise=0.05).astype(np.uint64)
    mask = (rng.random(truth.shape) < 0.8).astype(np.uint8)
    s = put(tmp_path, "s", "seg", seg, chunks=(2, 4, 4))
    t = put(tmp_path, "t", "truth", truth, chunks=(3, 6, 6))
    m = put(tmp_path, "m", "mask", mask, chunks=(2, 6, 4))
    flags = ["--connected-truth"] if connected else []
    reference = ref_pieces(truth) if connected else truth
    expected = ref_scores(seg, reference, mask, min_overlap=2)
    line = evaluate(s, t, "--mask", m, "--min-overlap", 2, "--block", *block, "--workers", 1,
                    *flags)
    assert_scores(line, expected)
    streamed = evaluate(s, t, "--mask", m, "--min-overlap", 2, *flags)
    assert_scores(streamed, expected)


@pytest.mark.parametrize("block", [None, (2, 5, 5)])
def test_evaluate_blockwise_two_workers(tmp_path, block):
    rng = np.random.default_rng(9)
    truth = blocky(rng, (6, 12, 12), 3, cell=(3, 6, 6), noise=0.02).astype(np.uint32)
    seg = blocky(rng, (6, 12, 12), 6, cell=(2, 4, 4), noise=0.02).astype(np.uint32)
    s = put(tmp_path, "s", "seg", seg, chunks=(3, 6, 4))
    t = put(tmp_path, "t", "truth", truth, chunks=(2, 4, 6))
    size = [] if block is None else ["--block", *block]
    line = evaluate(s, t, *size, "--workers", 2, "--scheduler", "local", "--connected-truth",
                    "--min-overlap", 3)
    assert_scores(line, ref_scores(seg, ref_pieces(truth), min_overlap=3))


def test_streamed_slabs_far_below_the_volume_equal_the_reference(tmp_path):
    """The streamed path with slabs far below the volume (the library call: the command's
    slab is 8 M voxels), connected truth joined across every slab face."""
    from emrun.evaluate import score_volumes

    rng = np.random.default_rng(21)
    truth = blocky(rng, (5, 9, 10), 3, cell=(2, 3, 5), noise=0.05).astype(np.uint32)
    seg = blocky(rng, (5, 9, 10), 4, cell=(1, 3, 2), noise=0.05).astype(np.uint32)
    s = open_volume(put(tmp_path, "s", "seg", seg, chunks=(1, 2, 10)))
    t = open_volume(put(tmp_path, "t", "truth", truth, chunks=(1, 2, 10)))
    for slab in (10, 20, 45, 90):
        got = score_volumes(s, t, slab_voxels=slab, connected_truth=True, min_overlap=1)
        assert_scores(got.as_dict(), ref_scores(seg, ref_pieces(truth), min_overlap=1))


def test_evaluate_larger_truth_and_mask_are_read_where_the_segmentation_sits(tmp_path):
    rng = np.random.default_rng(13)
    truth = blocky(rng, (6, 12, 12), 5).astype(np.uint32)
    mask = (rng.random((6, 12, 12)) < 0.7).astype(np.uint8)
    seg = blocky(rng, (3, 7, 12), 4, cell=(1, 2, 3)).astype(np.uint32)
    s = put(tmp_path, "s", "seg", seg, voxel_size=(30, 6, 6), offset=(2, 4, 0))
    t = put(tmp_path, "t", "truth", truth, voxel_size=(30, 6, 6))
    m = put(tmp_path, "m", "mask", mask, voxel_size=(30, 6, 6))
    box = (slice(2, 5), slice(4, 11), slice(0, 12))
    line = evaluate(s, t, "--mask", m, "--min-overlap", 1)
    assert_scores(line, ref_scores(seg, truth[box], mask[box], min_overlap=1))
    # with connected truth: the pieces inside the scored volume (the segmentation's box)
    line = evaluate(s, t, "--mask", m, "--min-overlap", 1, "--connected-truth")
    assert_scores(line, ref_scores(seg, ref_pieces(truth[box]), mask[box], min_overlap=1))
    blocks = evaluate(s, t, "--mask", m, "--min-overlap", 1, "--connected-truth", "--block",
                      1, 3, 5, "--workers", 1)
    assert_scores(blocks, ref_scores(seg, ref_pieces(truth[box]), mask[box], min_overlap=1))


def test_evaluate_refuses_volumes_on_other_grids_or_boxes(tmp_path):
    rng = np.random.default_rng(17)
    truth = blocky(rng, (3, 8, 8), 4).astype(np.uint32)
    seg = blocky(rng, (3, 8, 8), 4).astype(np.uint32)
    s = put(tmp_path, "s", "seg", seg, voxel_size=(30, 6, 6), offset=(1, 0, 0))
    cases = {
        "shifted": dict(voxel_size=(30, 6, 6), offset=(0, 0, 0)),
        "finer": dict(voxel_size=(30, 3, 3), offset=(1, 0, 0)),
    }
    for name, kwargs in cases.items():
        t = put(tmp_path, "t", name, truth, **kwargs)
        result = runner.invoke(app, ["evaluate", s, t, "--json"])
        assert result.exit_code == 2, (name, result.output)
        assert result.stdout == "" and "Traceback" not in result.output
        m = put(tmp_path, "m", name, np.ones_like(truth, np.uint8), **kwargs)
        good = put(tmp_path, "t", f"{name}_ok", truth, voxel_size=(30, 6, 6), offset=(1, 0, 0))
        result = runner.invoke(app, ["evaluate", s, good, "--mask", m, "--json"])
        assert result.exit_code == 2, (name, result.output)


# --------------------------------------------------------------------------- sweep


def _candidates(tmp_path, affs_path, method, parameter, values, mask=None):
    """Each value's segmentation, written by a plain (non-sweep) multi-value run."""
    extra = [] if mask is None else ["--mask", mask]
    out = tmp_path / f"each_{method}.zarr"
    flag = f"--{parameter}"
    if not out.exists():  # made once per test (a second sweep reuses them)
        result = segment(affs_path, out, "--method", method, flag, ",".join(map(str, values)),
                         "--name", "v", *extra)
        assert result.exit_code == 0, result.output
    return [open_volume(out / f"v_{v:g}").read() for v in values]


def _check_sweep(tmp_path, method, parameter, values, offsets, truth_for_scoring, truth_path,
                 affs_path, mask=None, mask_path=None, connected=False):
    extra = [] if mask_path is None else ["--mask", mask_path]
    if connected:
        extra.append("--connected-truth")
    out = tmp_path / f"sweep_{method}_{connected}.zarr"
    given = [] if values is None else [f"--{parameter}", ",".join(map(str, values))]
    result = segment(affs_path, out, "--method", method, "--sweep", "--truth", truth_path,
                     *given, *extra, "--json")
    report = last_json(result)
    sweep = report["sweep"]
    values = values or tuple(row[parameter] for row in sweep["table"])
    # the output's attributes hold the same table; the value written is the chosen one
    group = zarr.open_group(str(out / "labels/segmentation"), mode="r")
    meta = dict(group.attrs)["emrun"]["segment"]
    field, chosen = (("thresholds", [sweep["chosen"]]) if method == "waterz"
                     else (parameter, sweep["chosen"]))  # waterz's spec holds a list
    assert meta["sweep"] == sweep and meta["segmenter"][field] == chosen
    assert report["parameters"][field] == chosen
    assert ("edge of the values tried" in result.stderr) == sweep["at_edge"]
    segs = _candidates(tmp_path, affs_path, method, parameter, values, mask_path)
    expected = [ref_scores(seg, truth_for_scoring, mask) for seg in segs]
    assert [row[parameter] for row in sweep["table"]] == list(values)
    for row, ref in zip(sweep["table"], expected, strict=True):
        assert_scores(row, ref)
    arands = [e["arand"] for e in expected]
    best = min(range(len(values)), key=lambda i: (arands[i], i))  # first on ties
    assert sweep["chosen"] == values[best]
    assert_scores(sweep["best"], expected[best])
    written = open_volume(out / "segmentation").read()
    assert np.array_equal(written, segs[best])
    tied = {values[i] for i, a in enumerate(arands) if a == arands[best]}
    assert sweep["at_edge"] == (tied in ({min(values)}, {max(values)}))
    return sweep, arands


MIXED = (0.2, 0.35, 0.5, 0.65, 0.8)


@pytest.mark.parametrize("values", [MIXED, (0.65, 0.8, 0.2, 0.5, 0.35)])
@pytest.mark.parametrize("seed", [0, 2])
def test_sweep_mws_picks_the_reference_best_and_reports_reference_scores(tmp_path, values,
                                                                         seed):
    truth = cells()
    truth[:, :, 11] = 0  # unlabelled voxels in the truth
    rng = np.random.default_rng(seed)
    affs = affinities(cells(), LONG, rng, noise=0.3, lo=0.3, hi=0.7)
    affs_path = write_affs(tmp_path, affs, LONG)
    t = put(tmp_path, "t", "truth", truth)
    _, arands = _check_sweep(tmp_path, "mws", "bias", values, LONG, truth, t, affs_path)
    assert len(set(arands)) >= 3  # the values segment differently


@pytest.mark.parametrize("values", [MIXED, (0.65, 0.8, 0.2, 0.5, 0.35)])
@pytest.mark.parametrize("noise", [0.3, 0.4])
def test_sweep_waterz_picks_the_reference_best_and_reports_reference_scores(tmp_path, values,
                                                                            noise):
    pytest.importorskip("waterz")
    truth = cells()
    rng = np.random.default_rng(0)
    lo, hi = (0.3, 0.7) if noise == 0.3 else (0.25, 0.75)
    affs = affinities(truth, NEAREST, rng, noise=noise, lo=lo, hi=hi)
    affs_path = write_affs(tmp_path, affs, NEAREST)
    t = put(tmp_path, "t", "truth", truth)
    _, arands = _check_sweep(tmp_path, "waterz", "threshold", values, NEAREST, truth, t,
                             affs_path)
    assert len(set(arands)) >= 3


@pytest.mark.parametrize("method,parameter,offsets", [
    ("mws", "bias", LONG), ("waterz", "threshold", NEAREST), ("cc", "threshold", NEAREST)])
def test_sweep_ties_choose_the_first_value_given(tmp_path, method, parameter, offsets):
    if method == "waterz":
        pytest.importorskip("waterz")
    truth = cells()
    affs_path = write_affs(tmp_path, affinities(truth, offsets), offsets)
    t = put(tmp_path, "t", "truth", truth)
    values = (0.6, 0.3, 0.4)
    sweep, arands = _check_sweep(tmp_path, method, parameter, values, offsets, truth, t,
                                 affs_path)
    assert arands == [0.0, 0.0, 0.0]
    assert sweep["chosen"] == 0.6 and sweep["at_edge"] is False


@pytest.mark.parametrize("method,parameter,offsets,values", [
    ("mws", "bias", LONG, MIXED), ("waterz", "threshold", NEAREST, MIXED)])
def test_sweep_with_mask_and_connected_truth_matches_the_reference(tmp_path, method, parameter,
                                                                   offsets, values):
    if method == "waterz":
        pytest.importorskip("waterz")
    truth = cells()
    truth[:, 0:4, 0:4] = 0
    truth[2, 0:4, 4:8] = 0  # cuts object 2 in two pieces along z
    truth[0, 8:12, 0:4] = 0
    mask = np.ones(SHAPE, np.uint8)
    mask[:, :, 10:] = 0
    mask[3, 4:8, 4:8] = 0  # no piece is cut by the mask alone
    rng = np.random.default_rng(1)
    affs = affinities(cells(), offsets, rng, noise=0.3, lo=0.3, hi=0.7)
    affs_path = write_affs(tmp_path, affs, offsets)
    t = put(tmp_path, "t", "truth", truth)
    m = put(tmp_path, "m", "mask", mask)
    pieces = ref_pieces(truth)
    sweep, _ = _check_sweep(tmp_path, method, parameter, values, offsets, pieces, t, affs_path,
                            mask=mask, mask_path=m, connected=True)
    assert sweep["connected_truth"] is True
    # the sweep's best, scored by emrun evaluate, gives the sweep's own numbers
    out = tmp_path / f"sweep_{method}_True.zarr"
    line = evaluate(f"{out}/segmentation", t, "--mask", m, "--connected-truth")
    for key in ("arand", "voi_split", "voi_merge", "rand_split", "rand_merge", "segments"):
        assert line[key] == pytest.approx(sweep["best"][key], rel=1e-12, abs=1e-14)


# --------------------------------------------------------------------------- more edges


@pytest.mark.parametrize("block", [None, (10, 1, 20), (1, 12, 1)])
def test_evaluate_ids_beyond_32_and_63_bits(tmp_path, block):
    rng = np.random.default_rng(61)
    small_t = blocky(rng, (3, 8, 9), 5, cell=(1, 3, 3), noise=0.1)
    small_s = blocky(rng, (3, 8, 9), 5, cell=(2, 2, 3), noise=0.1)
    big = np.array([0, 2**32, 2**32 + 1, 2**63 + 5, 2**64 - 1], np.uint64)
    truth, seg = big[small_t], big[::-1][small_s]  # seg 0 where small_s == 4
    s, t = put(tmp_path, "s", "seg", seg), put(tmp_path, "t", "truth", truth)
    extra = [] if block is None else ["--block", *block, "--workers", 1]
    for connected in (False, True):
        flags = ["--connected-truth"] if connected else []
        line = evaluate(s, t, "--min-overlap", 2, *extra, *flags)
        reference = ref_pieces(truth) if connected else truth
        assert_scores(line, ref_scores(seg, reference, min_overlap=2))


def test_sweep_reads_a_larger_truth_and_mask_by_their_offsets(tmp_path):
    whole = np.zeros((8, 12, 12), np.uint32)
    whole[2:7] = cells()
    whole[:, :, 11] = 0
    mask = np.ones((8, 12, 12), np.float32)
    mask[:, 0:2, :] = np.nan
    rng = np.random.default_rng(0)
    affs = affinities(cells(), LONG, rng, noise=0.3, lo=0.3, hi=0.7)
    affs_path = write_affs(tmp_path, affs, LONG, offset=(2, 0, 0))
    t = put(tmp_path, "t", "truth", whole, voxel_size=(30, 6, 6))
    m = put(tmp_path, "m", "mask", mask, voxel_size=(30, 6, 6))
    box = slice(2, 7)
    _check_sweep(tmp_path, "mws", "bias", MIXED, LONG, whole[box], t, affs_path,
                 mask=mask[box], mask_path=m)
    written = open_volume(tmp_path / "sweep_mws_False.zarr/segmentation").read()
    assert (written[~(mask[box] == 1)] == 0).all() and (written[mask[box] == 1] != 0).all()
    # a truth on another grid is refused, not scored against other voxels
    put(tmp_path, "t", "fine", whole, voxel_size=(30, 3, 3))
    result = segment(affs_path, tmp_path / "other.zarr", "--method", "mws", "--sweep",
                     "--truth", f"{tmp_path / 't.zarr'}/fine", "--bias", "0.3,0.5")
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_sweep_scores_negative_truth_ids_as_objects(tmp_path):
    truth = cells().astype(np.int32) - 5  # ids -4..4 with 0 the unlabelled box
    rng = np.random.default_rng(2)
    affs = affinities(cells(), LONG, rng, noise=0.3, lo=0.3, hi=0.7)
    affs_path = write_affs(tmp_path, affs, LONG)
    t = put(tmp_path, "t", "truth", truth)
    _check_sweep(tmp_path, "mws", "bias", MIXED, LONG, truth, t, affs_path)
    _check_sweep(tmp_path, "mws", "bias", MIXED, LONG, ref_pieces(truth), t, affs_path,
                 connected=True)


def test_sweep_in_two_worker_processes_matches_the_reference(tmp_path):
    truth = cells()
    truth[1, 4:8, :] = 0  # object 4..6 each cut in two pieces
    mask = np.ones(SHAPE, np.uint8)
    mask[:, 10:, :] = 0
    rng = np.random.default_rng(1)
    affs = affinities(cells(), LONG, rng, noise=0.3, lo=0.3, hi=0.7)
    affs_path = write_affs(tmp_path, affs, LONG)
    t = put(tmp_path, "t", "truth", truth)
    m = put(tmp_path, "m", "mask", mask)
    out = tmp_path / "two.zarr"
    report = last_json(segment(affs_path, out, "--method", "mws", "--sweep", "--truth", t,
                               "--bias", "0.2,0.5,0.8", "--mask", m, "--connected-truth",
                               "--workers", 2, "--json"))
    segs = _candidates(tmp_path, affs_path, "mws", "bias", (0.2, 0.5, 0.8), m)
    pieces = ref_pieces(truth)
    expected = [ref_scores(seg, pieces, mask) for seg in segs]
    for row, ref in zip(report["sweep"]["table"], expected, strict=True):
        assert_scores(row, ref)
    best = min(range(3), key=lambda i: (expected[i]["arand"], i))
    assert report["sweep"]["chosen"] == (0.2, 0.5, 0.8)[best]
    assert np.array_equal(open_volume(out / "segmentation").read(), segs[best])


def test_sweep_default_values_are_the_documented_ones(tmp_path):
    """--help: "default 0.1 ... 0.9"; every one scored as the reference scores it."""
    truth = cells()
    rng = np.random.default_rng(0)
    affs = affinities(truth, LONG, rng, noise=0.3, lo=0.3, hi=0.7)
    affs_path = write_affs(tmp_path, affs, LONG)
    t = put(tmp_path, "t", "truth", truth)
    sweep, _ = _check_sweep(tmp_path, "mws", "bias", None, LONG, truth, t, affs_path)
    assert [row["bias"] for row in sweep["table"]] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7,
                                                       0.8, 0.9]


def test_sweep_connected_truth_cuts_pieces_joined_only_outside_the_affinities_box(tmp_path):
    whole = np.zeros((8, 16, 12), np.uint32)
    whole[2:7, :12] = cells()
    whole[2:7, 0:14, 0:2] = 20  # two arms of object 20, joined only at y 12-13 (outside)
    whole[2:7, 0:14, 6:8] = 20
    whole[2:7, 12:14, 0:8] = 20
    rng = np.random.default_rng(0)
    affs = affinities(whole[2:7, :12], LONG, rng, noise=0.3, lo=0.3, hi=0.7)
    affs_path = write_affs(tmp_path, affs, LONG, offset=(2, 0, 0))
    t = put(tmp_path, "t", "truth", whole, voxel_size=(30, 6, 6))
    pieces = ref_pieces(whole[2:7, :12])
    assert len(np.unique(pieces[(whole[2:7, :12] == 20)])) == 2
    sweep, _ = _check_sweep(tmp_path, "mws", "bias", (0.3, 0.5, 0.7), LONG, pieces, t,
                            affs_path, connected=True)
    seg = open_volume(tmp_path / "sweep_mws_True.zarr/segmentation")
    line = evaluate(f"{tmp_path}/sweep_mws_True.zarr/segmentation", t, "--connected-truth")
    assert line["arand"] == pytest.approx(sweep["best"]["arand"], rel=1e-12, abs=1e-15)
    assert line["truth_objects"] == sweep["best"]["truth_objects"] == int(pieces.max())
    assert seg.offset == (2, 0, 0)
