"""Reference probe of the segmentation scores (`emrun.evaluate`): adapted Rand error, Rand
split/merge, VOI split/merge in bits, CREMI score, split/merge counts, in memory, streamed in
slabs and in blocks by worker processes, against references written here from the
definitions (the README's "Evaluation" and "Scoring a crop"): plain loops over ordered voxel
pairs (self-pairs included, as SNEMI3D), Fractions, conditional entropies in bits, and the
truth's 6-connected pieces from scipy.ndimage.label per id."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from emrun.cli import app
from emrun.evaluate import Parallel, score, score_volumes
from emrun.evaluate.checks import EvaluationError
from emrun.io import open_volume, write_volume

runner = CliRunner()
SHAPE = (3, 5, 6)
FIELDS = ("arand", "rand_split", "rand_merge", "voi_split", "voi_merge", "voi", "cremi_score")


# ---------------------------------------------------------------- references


def _scored(seg, truth, mask=None):
    """(seg id, truth id) of every scored voxel, in raster order: truth not 0, mask not 0
    and not NaN; predicted 0 is an ordinary id."""
    seg, truth = np.asarray(seg).ravel().tolist(), np.asarray(truth).ravel().tolist()
    if mask is None:
        inside = [True] * len(seg)
    else:
        inside = [not (isinstance(m, float) and math.isnan(m)) and m != 0
                  for m in np.asarray(mask).ravel().tolist()]
    return [(s, t) for s, t, m in zip(seg, truth, inside, strict=True) if t != 0 and m]


def reference(seg, truth, mask=None, min_overlap=1):
    """Every score from its definition: Rand terms by counting ordered voxel pairs in
    Fractions, VOI as conditional entropies in bits by a loop over voxels."""
    voxels = _scored(seg, truth, mask)
    n = len(voxels)
    same_t = same_s = both = 0
    for (s1, t1), (s2, t2) in itertools.product(voxels, repeat=2):  # ordered, self included
        same_t += t1 == t2
        same_s += s1 == s2
        both += (t1 == t2) and (s1 == s2)
    rand_split = Fraction(both, same_t)
    rand_merge = Fraction(both, same_s)
    arand = 1 - 2 * rand_split * rand_merge / (rand_split + rand_merge)  # 1 - F-score
    pairs = Counter(voxels)
    t_size = Counter(t for _, t in voxels)
    s_size = Counter(s for s, _ in voxels)
    # H(S|T) = -sum_v (1/N) log2 p(s_v | t_v), summed voxel by voxel
    voi_split = -math.fsum(math.log2(pairs[v] / t_size[v[1]]) for v in voxels) / n
    voi_merge = -math.fsum(math.log2(pairs[v] / s_size[v[0]]) for v in voxels) / n
    splits = sum(1 for t in t_size
                 if sum(1 for (_, tt), c in pairs.items() if tt == t and c >= min_overlap) > 1)
    merges = sum(1 for s in s_size
                 if sum(1 for (ss, _), c in pairs.items() if ss == s and c >= min_overlap) > 1)
    return {
        "arand": float(arand), "rand_split": float(rand_split),
        "rand_merge": float(rand_merge), "voi_split": voi_split, "voi_merge": voi_merge,
        "voi": voi_split + voi_merge,
        "cremi_score": math.sqrt(float(arand) * (voi_split + voi_merge)),
        "splits": splits, "merges": merges, "voxels": n, "truth_objects": len(t_size),
        "segments": len(s_size), "min_overlap": min_overlap,
    }


def reference_pieces(truth):
    """Each non-zero truth id's 6-connected pieces (scipy.ndimage.label, face neighbours),
    as ids 1..K (any order: the scores do not depend on it)."""
    out = np.zeros(truth.shape, np.int64)
    structure = ndimage.generate_binary_structure(truth.ndim, 1)
    count = 0
    for value in np.unique(truth):
        if value == 0:
            continue
        labels, k = ndimage.label(truth == value, structure=structure)
        out[labels > 0] = labels[labels > 0] + count
        count += k
    return out


def assert_scores(got, expected, tol=1e-12):
    got = got.as_dict() if hasattr(got, "as_dict") else got
    for key, value in expected.items():
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, abs=tol, rel=0), key
        else:
            assert got[key] == value, key


def _volume(seed, shape=SHAPE, ids=4, zero=0.2):
    rng = np.random.default_rng(seed)
    truth = rng.integers(1, ids + 1, shape)
    truth[rng.random(shape) < zero] = 0
    seg = np.where(rng.random(shape) < 0.7, truth, rng.integers(0, ids + 2, shape))
    return seg.astype(np.uint32), truth.astype(np.uint32)


def _blocky(seed, shape=(6, 10, 12)):
    """Truth of blocky objects, some ids in several pieces, 0s between; a segmentation
    that splits some and merges others, with some predicted 0."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 5, tuple(-(-n // 2) for n in shape))
    truth = coarse.repeat(2, 0).repeat(2, 1).repeat(2, 2)[: shape[0], : shape[1], : shape[2]]
    flip = rng.random(shape) < 0.1
    truth[flip] = rng.integers(0, 5, int(flip.sum()))
    seg = (truth * 3 + (rng.random(shape) < 0.25)) % 7
    seg[:, 3:5, :] = 2
    return seg.astype(np.uint64), truth.astype(np.uint32)


# ---------------------------------------------------------------- the reference itself


def test_reference_by_hand():
    """The reference on a case worked out by hand: truth one object of 4 voxels split
    2 + 2 by the segmentation. Pairs: sum T^2 = 16, sum S^2 = 8, sum n^2 = 8: split 1/2,
    merge 1, arand 1 - 16/24 = 1/3; VOI split 1 bit, merge 0; CREMI sqrt(1/3)."""
    truth = np.array([[[5, 5, 5, 5]]])
    seg = np.array([[[1, 1, 2, 2]]])
    ref = reference(seg, truth)
    assert (ref["rand_split"], ref["rand_merge"]) == (0.5, 1.0)
    assert ref["arand"] == pytest.approx(1 / 3, abs=1e-15)
    assert (ref["voi_split"], ref["voi_merge"]) == (1.0, 0.0)
    assert ref["cremi_score"] == pytest.approx(math.sqrt(1 / 3), abs=1e-15)
    assert_scores(score(seg, truth, min_overlap=1), ref)


# ---------------------------------------------------------------- in memory


@pytest.mark.parametrize("seed", range(6))
def test_in_memory_scores_equal_the_pair_count_reference(seed):
    seg, truth = _volume(seed)
    for min_overlap in (1, 3):
        assert_scores(score(seg, truth, min_overlap=min_overlap),
                      reference(seg, truth, min_overlap=min_overlap))


def test_perfect_and_fully_merged_segmentations():
    _, truth = _volume(11)
    got = score(truth, truth, min_overlap=1)
    assert (got.arand, got.voi_split, got.voi_merge, got.cremi_score) == (0, 0, 0, 0)
    assert (got.splits, got.merges) == (0, 0)
    one = np.ones_like(truth)  # everything merged into one segment
    assert_scores(score(one, truth, min_overlap=1), reference(one, truth))
    assert score(one, truth).voi_split == 0 and score(one, truth).rand_split == 1


def test_truth_zero_is_not_scored_and_predicted_zero_is_a_segment():
    seg, truth = _volume(3)
    seg = seg + 1  # no 0 yet
    base = score(seg, truth, min_overlap=1)
    # what the segmentation says where truth is 0 changes nothing
    other = seg.copy()
    other[truth == 0] = 99
    assert score(other, truth, min_overlap=1) == base
    # predicted 0 inside the truth is one ordinary segment: same as any unused id
    zeroed = seg.copy()
    zeroed[seg == 3] = 0
    moved = seg.copy()
    moved[seg == 3] = 77
    assert (zeroed[truth != 0] == 0).any()
    assert_scores(score(zeroed, truth, min_overlap=1), reference(moved, truth))
    assert_scores(score(zeroed, truth, min_overlap=1), reference(zeroed, truth))


def test_mask_removes_exactly_its_voxels():
    seg, truth = _volume(4)
    rng = np.random.default_rng(4)
    mask = (rng.random(SHAPE) < 0.6).astype(np.uint8)
    cut = np.where(mask != 0, truth, 0)
    expected = reference(seg, truth, mask)
    assert expected["voxels"] == int(((truth != 0) & (mask != 0)).sum())
    assert_scores(score(seg, truth, mask, min_overlap=1), expected)
    assert score(seg, truth, mask, min_overlap=1) == score(seg, cut, min_overlap=1)
    # a float mask: NaN is outside, any other non-zero value inside (negative too)
    fmask = np.where(mask != 0, -0.5, 0.0)
    fmask[(mask != 0) & (rng.random(SHAPE) < 0.3)] = np.nan
    assert_scores(score(seg, truth, fmask, min_overlap=1), reference(seg, truth, fmask))
    # a signed integer mask: -1 is non-zero, so inside
    imask = mask.astype(np.int16) * -1
    assert score(seg, truth, imask, min_overlap=1) == score(seg, truth, mask, min_overlap=1)


def test_an_all_zero_mask_or_truth_is_refused():
    seg, truth = _volume(5)
    with pytest.raises(EvaluationError, match="mask"):
        score(seg, truth, np.zeros(SHAPE, np.uint8))
    with pytest.raises(EvaluationError, match="nothing to score"):
        score(seg, np.zeros(SHAPE, np.uint32))


def _relabelled(seed):
    """A volume pair and its relabellings: permutations of the ids, huge uint64 ids, signed
    ids (negatives), narrower dtypes; truth 0 kept 0 in the truth's relabellings."""
    seg, truth = _volume(seed, ids=5)
    rng = np.random.default_rng(seed + 100)
    seg_ids, truth_ids = np.unique(seg), np.unique(truth)
    out = []
    perm = rng.permutation(seg_ids.size) + 1
    seg_perm = perm[np.searchsorted(seg_ids, seg)]  # 0 moved too: it is a segment like any
    truth_perm = np.zeros_like(truth, np.int64)
    tperm = rng.permutation(truth_ids.size - 1) + 1
    truth_perm[truth != 0] = tperm[np.searchsorted(truth_ids[1:], truth[truth != 0])]
    out.append((seg_perm.astype(np.uint16), truth_perm.astype(np.uint8)))
    huge = np.uint64(2**64 - 1) - np.arange(seg_ids.size, dtype=np.uint64) * np.uint64(2**40)
    thuge = (np.uint64(2**63) + np.arange(truth_ids.size, dtype=np.uint64)
             * np.uint64(0xFFFF_FFFF))
    thuge[0] = 0
    out.append((huge[np.searchsorted(seg_ids, seg)], thuge[np.searchsorted(truth_ids, truth)]))
    signed_seg = -(seg.astype(np.int64)) - 1  # every id negative, 0 too
    signed_truth = np.where(truth != 0, -(truth.astype(np.int32)), 0).astype(np.int32)
    out.append((signed_seg, signed_truth))
    small = np.where(truth != 0, truth.astype(np.int8) * np.int8(-30), 0).astype(np.int8)
    out.append((seg.astype(np.int8), small))
    return seg, truth, out


@pytest.mark.parametrize("seed", range(3))
def test_relabelling_ids_changes_nothing(seed):
    seg, truth, variants = _relabelled(seed)
    expected = reference(seg, truth, min_overlap=2)
    for new_seg, new_truth in variants:
        warnings: list[str] = []
        got = score(new_seg, new_truth, min_overlap=2, warn=warnings.append)
        assert_scores(got, expected)
        negative = (new_seg.dtype.kind == "i" and (new_seg < 0).any(),
                    new_truth.dtype.kind == "i" and (new_truth < 0).any())
        assert len(warnings) == sum(negative)


def test_two_dimensional_volumes():
    seg, truth = _volume(7, shape=(7, 9))
    assert_scores(score(seg, truth, min_overlap=2), reference(seg, truth, min_overlap=2))
    assert_scores(score(seg[None], truth[None], min_overlap=2),
                  reference(seg, truth, min_overlap=2))


# ---------------------------------------------------------------- connected truth


@pytest.mark.parametrize("seed", range(4))
def test_connected_truth_equals_scoring_against_scipy_pieces(seed):
    seg, truth = _blocky(seed)
    pieces = reference_pieces(truth)
    assert len(np.unique(pieces)) > len(np.unique(truth))  # some id is in several pieces
    rng = np.random.default_rng(seed)
    mask = (rng.random(truth.shape) < 0.8).astype(np.uint8)
    for m in (None, mask):
        expected = reference(seg, pieces, m, min_overlap=3)
        assert_scores(score(seg, truth, m, min_overlap=3, connected_truth=True), expected)


def test_connected_truth_pieces_are_face_connected_only():
    """Two voxels of one id that touch at an edge or a corner only are two pieces; a U
    joined at its far end is one."""
    truth = np.zeros((2, 3, 4), np.uint32)
    truth[0, 0, 0] = truth[0, 1, 1] = truth[1, 2, 0] = 4  # edge and corner neighbours
    truth[:, 0, 3] = 6
    truth[1, 0:3, 3] = 6
    seg = np.ones_like(truth)
    got = score(seg, truth, min_overlap=1, connected_truth=True)
    assert got.truth_objects == 4
    assert_scores(got, reference(seg, reference_pieces(truth), min_overlap=1))


# ---------------------------------------------------------------- on disk: slabs and blocks


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    folder = tmp_path_factory.mktemp("probe")
    seg, truth = _blocky(21, shape=(8, 12, 14))
    rng = np.random.default_rng(21)
    seg[rng.random(seg.shape) < 0.02] = 2**63 + 5  # a huge id here and there
    mask = (rng.random(seg.shape) < 0.85).astype(np.uint8)
    arrays = {"seg": seg, "truth": truth, "mask": mask}
    paths = {}
    for name, array in arrays.items():
        write_volume(folder / "v.zarr", name, array, chunks=(4, 6, 7))
        paths[name] = str(folder / "v.zarr" / name)
    return arrays, paths


def _open(paths, *names):
    return [open_volume(paths[n]) for n in names]


@pytest.mark.parametrize("connected", [False, True])
def test_streamed_slabs_equal_the_reference(stored, connected):
    arrays, paths = stored
    truth = reference_pieces(arrays["truth"]) if connected else arrays["truth"]
    for names, mask in ((("seg", "truth"), None), (("seg", "truth", "mask"), arrays["mask"])):
        expected = reference(arrays["seg"], truth, mask, min_overlap=4)
        for slab_voxels in (1, 50, 10_000):
            got = score_volumes(*_open(paths, *names), min_overlap=4, slab_voxels=slab_voxels,
                                connected_truth=connected)
            assert_scores(got, expected)


@pytest.mark.parametrize("block", [(1, 12, 14), (3, 5, 4), (8, 1, 3), (2, 7, 14)])
def test_blocks_in_this_process_equal_in_memory(stored, block):
    arrays, paths = stored
    for connected in (False, True):
        expected = score(arrays["seg"], arrays["truth"], arrays["mask"], min_overlap=4,
                         connected_truth=connected)
        got = score_volumes(*_open(paths, "seg", "truth", "mask"), min_overlap=4,
                            connected_truth=connected,
                            parallel=Parallel(workers=1, block=block))
        assert got == expected


def _json(result):
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    return json.loads(lines[0])


def test_cli_two_workers_small_blocks_equal_the_reference(stored):
    arrays, paths = stored
    base = ["evaluate", paths["seg"], paths["truth"], "--mask", paths["mask"],
            "--min-overlap", "4", "--json"]
    for connected in (False, True):
        extra = ["--connected-truth"] if connected else []
        truth = reference_pieces(arrays["truth"]) if connected else arrays["truth"]
        expected = reference(arrays["seg"], truth, arrays["mask"], min_overlap=4)
        parallel = _json(runner.invoke(app, [*base, *extra, "--workers", "2", "--block",
                                             "3", "5", "4"]))
        assert_scores(parallel, expected)
        assert parallel["connected_truth"] is connected
        assert parallel == _json(runner.invoke(app, [*base, *extra]))


def test_a_larger_truth_and_float_mask_are_read_where_the_segmentation_sits(tmp_path):
    """Truth and a float mask (NaN outside) larger than the segmentation, placed by its
    offset; pieces are those inside the segmentation's box; blocks off the chunk grid."""
    seg_big, truth_big = _blocky(5, shape=(10, 16, 18))
    rng = np.random.default_rng(1)
    mask_big = np.where(rng.random(truth_big.shape) < 0.8, 1.0, 0.0).astype(np.float32)
    mask_big[rng.random(truth_big.shape) < 0.1] = np.nan
    offset, shape = (3, 5, 2), (5, 8, 9)
    box = tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))
    seg = seg_big[box]
    write_volume(tmp_path / "t.zarr", "truth", truth_big, chunks=(4, 4, 4))
    write_volume(tmp_path / "t.zarr", "mask", mask_big, chunks=(3, 5, 7))
    write_volume(tmp_path / "s.zarr", "seg", seg, chunks=(2, 3, 4), offset=offset)
    volumes = [open_volume(tmp_path / "s.zarr/seg"), open_volume(tmp_path / "t.zarr/truth"),
               open_volume(tmp_path / "t.zarr/mask")]
    for connected in (False, True):
        truth = reference_pieces(truth_big[box]) if connected else truth_big[box]
        expected = reference(seg, truth, mask_big[box], min_overlap=2)
        for parallel in (None, Parallel(workers=1, block=(1, 2, 3)),
                         Parallel(workers=1, block=(3, 8, 2))):
            assert_scores(score_volumes(*volumes, min_overlap=2, connected_truth=connected,
                                        parallel=parallel, slab_voxels=37), expected)


def test_signed_ids_on_disk_score_and_warn_alike_in_every_mode(tmp_path):
    seg, truth = _blocky(8)
    signed_truth = np.where(truth != 0, -truth.astype(np.int64) * 2**40, 0)
    signed_seg = seg.astype(np.int64) - 3
    write_volume(tmp_path / "w.zarr", "s", signed_seg, chunks=(2, 3, 4))
    write_volume(tmp_path / "w.zarr", "t", signed_truth, chunks=(2, 3, 4))
    volumes = [open_volume(tmp_path / "w.zarr/s"), open_volume(tmp_path / "w.zarr/t")]
    negative = (int(((signed_seg < 0) & (truth != 0)).sum()), int((truth != 0).sum()))
    for connected in (False, True):
        expected = reference(seg, reference_pieces(truth) if connected else truth,
                             min_overlap=2)
        for parallel in (None, Parallel(workers=1, block=(2, 3, 5))):
            said: list[str] = []
            got = score_volumes(*volumes, min_overlap=2, connected_truth=connected,
                                parallel=parallel, slab_voxels=20, warn=said.append)
            assert_scores(got, expected)
            assert [f"({n:,} scored voxels)" in line for n, line in zip(negative, said,
                                                                         strict=True)] \
                == [True, True]


def test_cli_two_dimensional_signed_volumes_with_a_nan_mask(tmp_path):
    seg, truth = _blocky(9, shape=(1, 14, 15))
    seg, truth = seg[0].astype(np.int64) - 2, np.where(truth[0] != 0, -truth[0].astype(
        np.int32), 0)
    rng = np.random.default_rng(2)
    mask = np.where(rng.random(seg.shape) < 0.8, 2.5, 0).astype(np.float32)
    mask[rng.random(seg.shape) < 0.1] = np.nan
    for name, array in (("s", seg), ("t", truth), ("m", mask)):
        np.save(tmp_path / f"{name}.npy", array)
    base = ["evaluate", str(tmp_path / "s.npy"), str(tmp_path / "t.npy"), "--mask",
            str(tmp_path / "m.npy"), "--json", "--min-overlap", "2", "--connected-truth"]
    expected = reference(seg, reference_pieces(truth), mask, min_overlap=2)
    for extra in ([], ["--workers", "2", "--block", "1", "4", "3"],
                  ["--block", "1", "14", "1"]):
        result = runner.invoke(app, [*base, *extra])
        assert_scores(_json(result), expected)
        assert result.stderr.count("holds negative ids") == 2


def test_in_memory_message_when_the_mask_leaves_out_every_labelled_voxel():
    seg = np.ones((2, 3, 4), np.uint8)
    truth = np.zeros((2, 3, 4), np.uint8)
    truth[0] = 1
    mask = (truth == 0).astype(np.uint8)
    with pytest.raises(EvaluationError) as caught:
        score(seg, truth, mask)
    assert "all 0" not in str(caught.value) and "mask" in str(caught.value)
