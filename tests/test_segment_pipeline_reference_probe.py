"""`emrun segment` (the command, and emrun.segment's pipeline, sweep and blockwise drivers)
against tiny references written here: connected components as a Python union-find over the
thresholded nearest-neighbour edges (uint8 read as k / 255, compared exactly with
Fractions), adapted Rand error by brute-force pair counting over the labelled voxels, the
sweep's choice as the first value of lowest error, and what the command writes as the
registered segmenter called directly on the same affinities in memory. Volumes are a few
hundred voxels, made in code."""

from __future__ import annotations

import itertools
import json
from fractions import Fraction

import numpy as np
import pytest
import zarr
from scipy import ndimage
from test_segmenters_reference_probe import UnionFind
from test_segmenters_reference_probe import edges_of as edges
from typer.testing import CliRunner

from emrun.cli import app
from emrun.io import open_volume, write_volume
from emrun.recipe.run import ConnectedComponents, MutexWatershed
from emrun.registry import segmenters
from emrun.segment import segment_array, segment_into, sweep

runner = CliRunner()

SHAPE = (5, 12, 12)
NEAREST = ((-1, 0, 0), (0, -1, 0), (0, 0, -1))
LONG = (*NEAREST, (0, -3, 0), (0, 0, -3), (-2, 0, 0))


# ------------------------------------------------------------------ data made here


def cells(shape=SHAPE, n=7, seed=0) -> np.ndarray:
    """Space-filling cells: Voronoi regions of n random seeds, ids 1..n."""
    rng = np.random.default_rng(seed)
    seeds = np.zeros(shape, np.int32)
    points = set()
    while len(points) < n:
        points.add(tuple(int(rng.integers(0, s)) for s in shape))
    for i, p in enumerate(sorted(points)):
        seeds[p] = i + 1
    _, nearest = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    return seeds[tuple(nearest)]


def true_affinities(truth: np.ndarray, offsets) -> np.ndarray:
    """Channel c at v: 1 where v and v + offsets[c] lie in one object, 0 otherwise (and
    where v + offset leaves the volume)."""
    out = np.zeros((len(offsets), *truth.shape), np.float64)
    for c, o in enumerate(offsets):
        for v in itertools.product(*map(range, truth.shape)):
            w = tuple(a + d for a, d in zip(v, o, strict=True))
            if all(0 <= a < n for a, n in zip(w, truth.shape, strict=True)):
                out[c][v] = float(truth[v] == truth[w])
    return out


def as_uint8(affs: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    """Affinities pulled towards 0.5 (0.15 / 0.85), plus noise, as inference stores them."""
    rng = np.random.default_rng(seed)
    p = np.clip(affs * 0.7 + 0.15 + rng.normal(0, sigma, affs.shape), 0, 1)
    return np.round(p * 255).astype(np.uint8)


def reference_cc(u8: np.ndarray, offsets, threshold, mask=None) -> np.ndarray:
    """Components of the graph of nearest-neighbour edges with k / 255 > threshold (exact),
    both ends inside ``mask``; ids 1..K by first voxel; 0 outside the mask."""
    shape = u8.shape[1:]
    t = Fraction(str(threshold))
    uf = UnionFind()
    for c, o in enumerate(offsets):
        if sum(map(abs, o)) != 1:
            continue
        for v, w in edges(shape, o):
            if mask is not None and not (mask[v] and mask[w]):
                continue
            if Fraction(int(u8[c][v]), 255) > t:
                uf.join(v, w)
    out = np.zeros(shape, np.int64)
    ids: dict = {}
    for v in itertools.product(*map(range, shape)):
        if mask is not None and not mask[v]:
            continue
        out[v] = ids.setdefault(uf.find(v), len(ids) + 1)
    return out


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to a bijection of ids (0 included as an id)."""
    pairs = {(int(x), int(y)) for x, y in zip(a.ravel(), b.ravel(), strict=True)}
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


def brute_arand(seg: np.ndarray, truth: np.ndarray, mask=None) -> float:
    """Adapted Rand error over the voxels with truth != 0 (inside the mask), from ordered
    voxel pairs (self-pairs included) counted one by one: 1 - 2 * together_both /
    (together_in_seg + together_in_truth)."""
    keep = truth != 0 if mask is None else (truth != 0) & (mask != 0)
    s, t = seg[keep].tolist(), truth[keep].tolist()
    both = in_seg = in_truth = 0
    for i in range(len(s)):
        for j in range(len(s)):
            a, b = s[i] == s[j], t[i] == t[j]
            both += a and b
            in_seg += a
            in_truth += b
    return float(1 - Fraction(2 * both, in_seg + in_truth))


def ids_are_one_to_k(seg: np.ndarray) -> bool:
    ids = np.unique(seg[seg != 0])
    return ids.size == 0 or (ids[0] == 1 and ids[-1] == ids.size)


def write_affs(folder, data, offsets, *, name="affinity", voxel_size=(40, 8, 8),
               offset=None, group_offsets=True):
    extra = {"offsets": [list(o) for o in offsets]} if group_offsets else None
    write_volume(folder / "pred.zarr", name, data, voxel_size=voxel_size, offset=offset,
                 channel_axis=True, attrs=extra)
    return f"{folder / 'pred.zarr'}/{name}"


def invoke(*args):
    return runner.invoke(app, ["segment", *map(str, args)])


def last_json(result) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


def build(spec):
    return segmenters.build(spec)


@pytest.fixture(scope="module")
def scene():
    truth = cells()
    u8 = as_uint8(true_affinities(truth, LONG), 0.12)
    return truth, u8


# ------------------------------------------------------------------ references themselves


def test_references_on_known_answers():
    truth = cells()
    u8 = np.round(true_affinities(truth, NEAREST) * 255).astype(np.uint8)
    assert same_partition(reference_cc(u8, NEAREST, 0.5), truth)
    assert brute_arand(truth, truth) == 0.0
    two = np.array([[[1, 1, 2, 2]]])
    one = np.array([[[1, 1, 1, 1]]])
    # pairs together in truth: 4 + 4 = 8, in seg: 16, both: 8 -> 1 - 16/24
    assert brute_arand(one, two) == pytest.approx(1 / 3)


# ------------------------------------------------------------------ command = segmenter


@pytest.mark.parametrize("args,spec", [
    (["--method", "cc", "--threshold", "0.5"], ConnectedComponents(threshold=0.5)),
    (["--method", "cc", "--threshold", "0.5", "--min-size", "6"],
     ConnectedComponents(threshold=0.5, min_size=6)),
    ([], MutexWatershed()),
    (["--method", "mws", "--bias", "0.7", "--min-size", "4"],
     MutexWatershed(bias=0.7, min_size=4)),
], ids=["cc", "cc-min-size", "mws-default", "mws-bias-min-size"])
def test_command_writes_what_the_segmenter_gives_in_memory(tmp_path, scene, args, spec):
    _truth, u8 = scene
    path = write_affs(tmp_path, u8, LONG, voxel_size=(40, 8, 8), offset=(3, 2, 1))
    out = tmp_path / "seg.zarr"
    result = invoke(path, out, *args, "--json")
    assert result.exit_code == 0, result.output
    report = last_json(result)
    assert report["mode"] == "memory"
    volume = open_volume(out / "segmentation")
    seg = volume.read()
    expected = segment_array(u8, LONG, build(spec))
    assert np.array_equal(seg, expected)  # ids too: both number 1..K the same way
    assert seg.dtype == np.uint64 and ids_are_one_to_k(seg) and (seg != 0).all()
    assert volume.voxel_size == (40.0, 8.0, 8.0)
    assert tuple(volume.offset) == (3, 2, 1)
    assert report["outputs"][0]["segments"] == int(seg.max())


def test_cc_command_equals_the_union_find_reference_on_uint8(tmp_path, scene):
    _truth, u8 = scene
    path = write_affs(tmp_path, u8, LONG)
    for t in (0.3, 0.5, 0.7):
        out = tmp_path / f"seg{t}.zarr"
        result = invoke(path, out, "--method", "cc", "--threshold", t)
        assert result.exit_code == 0, result.output
        seg = open_volume(out / "segmentation").read()
        assert same_partition(seg, reference_cc(u8, LONG, t))


def test_uint8_levels_are_value_over_255_at_the_threshold(tmp_path):
    """Stored 51 is exactly 0.2 (not above a threshold of 0.2), 52 is above it; 128 is above
    0.5 and 127 is not."""
    shape = (1, 1, 6)
    offsets = ((-1, 0, 0), (0, -1, 0), (0, 0, -1))
    u8 = np.zeros((3, *shape), np.uint8)
    u8[2, 0, 0, 1:] = [51, 52, 127, 128, 51]
    path = write_affs(tmp_path, u8, offsets)
    for t, expected in ((0.2, [1, 2, 2, 2, 2, 3]), (0.5, [1, 2, 3, 4, 4, 5])):
        out = tmp_path / f"s{t}.zarr"
        result = invoke(path, out, "--method", "cc", "--threshold", t)
        assert result.exit_code == 0, result.output
        seg = open_volume(out / "segmentation").read()
        assert same_partition(seg[0, 0], np.array(expected))
        assert same_partition(seg, reference_cc(u8, offsets, t))
        # the same as float affinities k / 255 given directly
        floats = (u8 / 255).astype(np.float32)
        assert same_partition(seg, segment_array(floats, offsets,
                                                 build(ConnectedComponents(threshold=t))))


def test_float_affinities_on_disk_segment_as_given(tmp_path, scene):
    _truth, u8 = scene
    floats = (u8.astype(np.float64) / 255)
    path = write_affs(tmp_path, floats, LONG)
    out = tmp_path / "seg.zarr"
    result = invoke(path, out, "--method", "mws", "--bias", "0.6")
    assert result.exit_code == 0, result.output
    seg = open_volume(out / "segmentation").read()
    assert np.array_equal(seg, segment_array(u8, LONG, build(MutexWatershed(bias=0.6))))


def test_offsets_come_from_the_stored_attribute_in_its_channel_order(tmp_path, scene):
    truth, _ = scene
    offsets = ((0, 0, -1), (0, 2, 0), (1, 0, 0), (0, -1, 0))  # x first, positive z
    u8 = as_uint8(true_affinities(truth, offsets), 0.1, seed=4)
    path = write_affs(tmp_path, u8, offsets)
    out = tmp_path / "seg.zarr"
    result = invoke(path, out, "--method", "cc", "--threshold", "0.5")
    assert result.exit_code == 0, result.output
    seg = open_volume(out / "segmentation").read()
    assert same_partition(seg, reference_cc(u8, offsets, 0.5))
    result = invoke(path, out, "--method", "mws", "--name", "m")
    assert result.exit_code == 0, result.output
    assert np.array_equal(open_volume(out / "m").read(),
                          segment_array(u8, offsets, build(MutexWatershed())))


def test_several_values_write_one_volume_each_as_the_segmenter_gives(tmp_path, scene):
    _truth, u8 = scene
    path = write_affs(tmp_path, u8, LONG)
    out = tmp_path / "seg.zarr"
    result = invoke(path, out, "--bias", "0.3,0.8", "--name", "b", "--json")
    assert result.exit_code == 0, result.output
    assert [o["name"] for o in last_json(result)["outputs"]] == ["b_0.3", "b_0.8"]
    for b in (0.3, 0.8):
        seg = open_volume(out / f"b_{b:g}").read()
        assert np.array_equal(seg, segment_array(u8, LONG, build(MutexWatershed(bias=b))))


def test_recorded_recipe_segmenter_is_used_without_method(tmp_path, scene):
    _truth, u8 = scene
    path = write_affs(tmp_path, u8, LONG)
    root = zarr.open_group(str(tmp_path / "pred.zarr"), mode="r+")
    root.attrs["emrun"] = {"recipe": {"name": "probe", "segment": {
        "type": "cc", "threshold": 0.6, "min_size": 3}}}
    out = tmp_path / "seg.zarr"
    result = invoke(path, out, "--json")
    assert result.exit_code == 0, result.output
    assert last_json(result)["method"] == "cc"
    seg = open_volume(out / "segmentation").read()
    assert np.array_equal(seg, segment_array(u8, LONG, build(
        ConnectedComponents(threshold=0.6, min_size=3))))


# ------------------------------------------------------------------ mask


def wall_mask(shape=SHAPE):
    """Inside everywhere but a full y = 6 wall and a small hole."""
    mask = np.ones(shape, np.uint8)
    mask[:, 6, :] = 0
    mask[1:3, 2:4, 9:11] = 0
    return mask


@pytest.mark.parametrize("args", [["--method", "cc", "--threshold", "0.4"],
                                  ["--method", "cc", "--threshold", "0.4", "--min-size", "8"],
                                  ["--method", "mws", "--bias", "0.2", "--min-size", "8"],
                                  ["--method", "mws", "--bias", "0.2", "--block", "3", "5", "7"]],
                         ids=["cc", "cc-min-size", "mws-min-size", "mws-blockwise"])
def test_mask_zero_exactly_outside_and_nothing_joins_across_the_wall(tmp_path, scene, args):
    _truth, u8 = scene
    # every edge attracts: only the mask keeps the two sides apart
    u8 = np.full_like(u8, 250)
    path = write_affs(tmp_path, u8, LONG)
    mask = wall_mask()
    write_volume(tmp_path / "mask.zarr", "mask", mask)
    out = tmp_path / "seg.zarr"
    result = invoke(path, out, *args, "--mask", f"{tmp_path}/mask.zarr/mask")
    assert result.exit_code == 0, result.output
    seg = open_volume(out / "segmentation").read()
    assert ((seg == 0) == (mask == 0)).all()
    assert ids_are_one_to_k(seg)
    below, above = set(np.unique(seg[:, :6][mask[:, :6] != 0])), set(np.unique(seg[:, 7:]))
    assert not (below & above)
    assert len(below) == 1 and len(above) == 1  # each side one object (all affinities high)


def test_mask_cc_equals_the_reference_with_noise(tmp_path, scene):
    _truth, u8 = scene
    path = write_affs(tmp_path, u8, LONG)
    mask = wall_mask()
    write_volume(tmp_path / "mask.zarr", "mask", mask)
    for extra, name in (([], "mem"), (["--block", "2", "5", "5"], "blk")):
        result = invoke(path, tmp_path / "seg.zarr", "--method", "cc", "--threshold", "0.5",
                        "--mask", f"{tmp_path}/mask.zarr/mask", "--name", name, *extra)
        assert result.exit_code == 0, result.output
        seg = open_volume(tmp_path / f"seg.zarr/{name}").read()
        assert same_partition(seg, reference_cc(u8, LONG, 0.5, mask))


def test_small_segment_enclosed_by_the_mask_stays(tmp_path):
    """A 2-voxel island cut off by masked voxels has no neighbour: it stays below min_size."""
    shape = (3, 8, 8)
    u8 = np.full((3, *shape), 250, np.uint8)
    mask = np.ones(shape, np.uint8)
    mask[:, 2:6, 2:6] = 0
    mask[1, 3, 3:5] = 1  # the island
    path = write_affs(tmp_path, u8, NEAREST)
    write_volume(tmp_path / "mask.zarr", "mask", mask)
    for extra, name in (([], "mem"), (["--block", "2", "4", "4"], "blk")):
        result = invoke(path, tmp_path / "seg.zarr", "--method", "cc", "--min-size", "10",
                        "--mask", f"{tmp_path}/mask.zarr/mask", "--name", name, *extra)
        assert result.exit_code == 0, result.output
        seg = open_volume(tmp_path / f"seg.zarr/{name}").read()
        assert ((seg == 0) == (mask == 0)).all()
        island = seg[1, 3, 3]
        assert seg[1, 3, 4] == island and (seg == island).sum() == 2
        assert np.unique(seg[seg != 0]).size == 2


# ------------------------------------------------------------------ blockwise


@pytest.mark.parametrize("min_size", [0, 5, 12])
@pytest.mark.parametrize("block", [(2, 5, 5), (5, 4, 7), (1, 12, 3)])
def test_blockwise_cc_equals_in_memory_with_min_size(tmp_path, scene, min_size, block):
    _truth, u8 = scene
    spec = ConnectedComponents(threshold=0.5, min_size=min_size)
    whole = segment_array(u8, LONG, build(spec))
    out = np.zeros(SHAPE, np.uint64)
    segment_into(out, u8, LONG, build(spec), block=block)
    assert same_partition(out, whole)
    assert ids_are_one_to_k(out) and (out != 0).all()
    if min_size == 0:
        assert same_partition(out, reference_cc(u8, LONG, 0.5))


def test_blockwise_command_equals_in_memory_as_a_partition(tmp_path, scene):
    """--block with cc (exact stitching): the command's blockwise output is the in-memory
    result as a partition, with ids 1..K."""
    _truth, u8 = scene
    path = write_affs(tmp_path, u8, LONG, offset=(1, 1, 1))
    out = tmp_path / "seg.zarr"
    result = invoke(path, out, "--method", "cc", "--threshold", "0.5", "--min-size", "6",
                    "--block", "2", "5", "5", "--json")
    assert result.exit_code == 0, result.output
    report = last_json(result)
    assert report["mode"] == "blockwise"
    volume = open_volume(out / "segmentation")
    seg = volume.read()
    assert volume.dtype == np.uint64 and tuple(volume.offset) == (1, 1, 1)
    assert volume.voxel_size == (40.0, 8.0, 8.0)
    whole = segment_array(u8, LONG, build(ConnectedComponents(threshold=0.5, min_size=6)))
    assert same_partition(seg, whole) and ids_are_one_to_k(seg)
    assert report["outputs"][0]["segments"] == int(seg.max())


def test_blockwise_mws_of_clean_affinities_is_the_truth(tmp_path, scene):
    truth, _ = scene
    u8 = np.round(true_affinities(truth, LONG) * 255).astype(np.uint8)
    path = write_affs(tmp_path, u8, LONG)
    out = tmp_path / "seg.zarr"
    result = invoke(path, out, "--block", "2", "5", "5")
    assert result.exit_code == 0, result.output
    seg = open_volume(out / "segmentation").read()
    assert same_partition(seg, truth) and ids_are_one_to_k(seg)
    assert same_partition(seg, segment_array(u8, LONG, build(MutexWatershed())))


# ------------------------------------------------------------------ sweep


def test_sweep_picks_the_lowest_brute_force_arand(tmp_path, scene):
    truth, u8 = scene
    labels = truth.astype(np.uint32)
    labels[:, :, :2] = 0  # unlabelled: not scored
    path = write_affs(tmp_path, u8, LONG)
    write_volume(tmp_path / "truth.zarr", "labels", labels)
    values = [0.9, 0.2, 0.5, 0.7, 0.35]
    out = tmp_path / "seg.zarr"
    result = invoke(path, out, "--method", "cc", "--sweep", "--truth",
                    f"{tmp_path}/truth.zarr/labels", "--threshold", ",".join(map(str, values)),
                    "--json")
    assert result.exit_code == 0, result.output
    report = last_json(result)["sweep"]
    mine = [brute_arand(reference_cc(u8, LONG, t), labels) for t in values]
    table = report["table"]
    assert [row["threshold"] for row in table] == values
    assert [row["arand"] for row in table] == pytest.approx(mine, abs=1e-12)
    best = min(range(len(values)), key=lambda i: (mine[i], i))
    assert report["chosen"] == values[best]
    seg = open_volume(out / "segmentation").read()
    assert np.array_equal(seg, segment_array(u8, LONG, build(
        ConnectedComponents(threshold=values[best]))))


def test_sweep_ties_go_to_the_first_value_tried(tmp_path):
    """Perfect affinities: every threshold in (0, 1) scores 0; the first one given wins,
    and it is not called an edge."""
    truth = cells(n=4)
    u8 = np.round(true_affinities(truth, NEAREST) * 255).astype(np.uint8)
    path = write_affs(tmp_path, u8, NEAREST)
    write_volume(tmp_path / "truth.zarr", "labels", truth.astype(np.uint32))
    result = invoke(path, tmp_path / "seg.zarr", "--method", "cc", "--sweep", "--truth",
                    f"{tmp_path}/truth.zarr/labels", "--threshold", "0.6,0.3,0.9", "--json")
    assert result.exit_code == 0, result.output
    report = last_json(result)["sweep"]
    assert [row["arand"] for row in report["table"]] == [0.0, 0.0, 0.0]
    assert report["chosen"] == 0.6 and report["at_edge"] is False


def test_sweep_with_a_mask_scores_inside_it_and_writes_zero_outside(tmp_path, scene):
    truth, u8 = scene
    mask = wall_mask()
    path = write_affs(tmp_path, u8, LONG)
    write_volume(tmp_path / "truth.zarr", "labels", truth.astype(np.uint32))
    write_volume(tmp_path / "mask.zarr", "mask", mask)
    values = [0.3, 0.5, 0.8]
    out = tmp_path / "seg.zarr"
    result = invoke(path, out, "--method", "cc", "--sweep", "--truth",
                    f"{tmp_path}/truth.zarr/labels", "--mask", f"{tmp_path}/mask.zarr/mask",
                    "--threshold", "0.3,0.5,0.8", "--json")
    assert result.exit_code == 0, result.output
    report = last_json(result)["sweep"]
    mine = [brute_arand(reference_cc(u8, LONG, t, mask), truth, mask) for t in values]
    assert [row["arand"] for row in report["table"]] == pytest.approx(mine, abs=1e-12)
    best = min(range(3), key=lambda i: (mine[i], i))
    assert report["chosen"] == values[best]
    seg = open_volume(out / "segmentation").read()
    assert ((seg == 0) == (mask == 0)).all()
    assert same_partition(seg, reference_cc(u8, LONG, values[best], mask))


def test_sweep_function_mws_matches_brute_force_and_segment_array(scene):
    truth, u8 = scene
    values = (0.1, 0.5, 0.9)
    found = sweep(u8, LONG, MutexWatershed(min_size=3), values, truth.astype(np.uint32),
                  workers=1)
    segs = [segment_array(u8, LONG, build(MutexWatershed(bias=b, min_size=3)))
            for b in values]
    mine = [brute_arand(s, truth) for s in segs]
    assert [s["arand"] for s in found.scores] == pytest.approx(mine, abs=1e-12)
    best = min(range(3), key=lambda i: (mine[i], i))
    assert found.best == best and np.array_equal(found.segmentation, segs[best])


def test_sweep_against_connected_truth_pieces(tmp_path, scene):
    """One truth id on two cells that do not touch: with --connected-truth each piece is
    its own object in the brute-force score."""
    truth, u8 = scene
    near = ndimage.binary_dilation(truth == 1)
    far = next(i for i in range(2, 8) if not (near & (truth == i)).any())
    labels = np.where(truth == far, 1, truth).astype(np.uint32)
    pieces, _ = ndimage.label(labels == 1)
    connected = np.where(labels == 1, 100 + pieces, labels)
    path = write_affs(tmp_path, u8, LONG)
    write_volume(tmp_path / "truth.zarr", "labels", labels)
    result = invoke(path, tmp_path / "seg.zarr", "--method", "cc", "--sweep", "--truth",
                    f"{tmp_path}/truth.zarr/labels", "--threshold", "0.5,0.7",
                    "--connected-truth", "--json")
    assert result.exit_code == 0, result.output
    report = last_json(result)["sweep"]
    mine = [brute_arand(reference_cc(u8, LONG, t), connected) for t in (0.5, 0.7)]
    assert [row["arand"] for row in report["table"]] == pytest.approx(mine, abs=1e-12)


def test_parallel_sweep_equals_brute_force_and_the_sequential_sweep(scene):
    truth, u8 = scene
    mask = wall_mask()
    values = (0.2, 0.5, 0.8)
    spec = MutexWatershed(min_size=4)
    two = sweep(u8, LONG, spec, values, truth.astype(np.uint32), mask=mask, workers=2)
    one = sweep(u8, LONG, spec, values, truth.astype(np.uint32), mask=mask, workers=1)
    assert two.scores == one.scores and two.best == one.best
    assert np.array_equal(two.segmentation, one.segmentation)
    segs = [segment_array(u8, LONG, build(MutexWatershed(bias=b, min_size=4)), mask)
            for b in values]
    mine = [brute_arand(s, truth, mask) for s in segs]
    assert [s["arand"] for s in two.scores] == pytest.approx(mine, abs=1e-12)
    assert two.best == min(range(3), key=lambda i: (mine[i], i))
    assert np.array_equal(two.segmentation, segs[two.best])


def test_waterz_sweep_in_any_order_matches_brute_force_and_single_runs(tmp_path, scene):
    pytest.importorskip("waterz")
    from emrun.recipe.run import Waterz

    truth, _ = scene
    u8 = as_uint8(true_affinities(truth, LONG), 0.2)
    path = write_affs(tmp_path, u8, LONG)
    write_volume(tmp_path / "truth.zarr", "labels", truth.astype(np.uint32))
    values = [0.9, 0.3, 0.6, 0.1]
    segs = [segment_array(u8, LONG, build(Waterz(thresholds=[v], min_size=3))) for v in values]
    mine = [brute_arand(s, truth) for s in segs]
    result = invoke(path, tmp_path / "seg.zarr", "--method", "waterz", "--sweep", "--truth",
                    f"{tmp_path}/truth.zarr/labels", "--threshold", "0.9,0.3,0.6,0.1",
                    "--min-size", "3", "--json")
    assert result.exit_code == 0, result.output
    report = last_json(result)["sweep"]
    assert [row["threshold"] for row in report["table"]] == values
    assert [row["arand"] for row in report["table"]] == pytest.approx(mine, abs=1e-12)
    best = min(range(4), key=lambda i: (mine[i], i))
    assert report["chosen"] == values[best]
    assert np.array_equal(open_volume(tmp_path / "seg.zarr/segmentation").read(), segs[best])
    result = invoke(path, tmp_path / "seg.zarr", "--method", "waterz", "--threshold",
                    "0.9,0.3,0.6,0.1", "--min-size", "3", "--name", "w")
    assert result.exit_code == 0, result.output
    for v, seg in zip(values, segs, strict=True):
        assert np.array_equal(open_volume(tmp_path / f"seg.zarr/w_{v:g}").read(), seg)


# ------------------------------------------------------------------ min_size by hand


def reference_min_size(labels: np.ndarray, u8: np.ndarray, offsets, min_size: int):
    """The README's rule by hand: pairs of adjacent segments (nearest-neighbour edges, both
    directions of every nearest channel) by decreasing exact mean affinity k / 255, ties by
    the pair's first voxels (lower first); join a pair while either side is still small."""
    shape = labels.shape
    first: dict = {}
    for v in itertools.product(*map(range, shape)):
        if labels[v]:
            first.setdefault(int(labels[v]), int(np.ravel_multi_index(v, shape)))
    sums: dict = {}
    for c, o in enumerate(offsets):
        if sum(map(abs, o)) != 1:
            continue
        for v, w in edges(shape, o):
            a, b = int(labels[v]), int(labels[w])
            if a and b and a != b:
                key = (min(a, b), max(a, b))
                total, n = sums.get(key, (Fraction(0), 0))
                sums[key] = (total + Fraction(int(u8[c][v]), 255), n + 1)

    def order(key):
        ranks = sorted((first[key[0]], first[key[1]]))
        return (-sums[key][0] / sums[key][1], *ranks)

    parent = {i: i for i in first}
    size = {i: int((labels == i).sum()) for i in first}

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for a, b in sorted(sums, key=order):
        ra, rb = find(a), find(b)
        if ra != rb and (size[ra] < min_size or size[rb] < min_size):
            parent[rb] = ra
            size[ra] += size[rb]
    out = np.zeros(shape, np.int64)
    for v in itertools.product(*map(range, shape)):
        if labels[v]:
            out[v] = find(int(labels[v]))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_min_size_merging_equals_the_documented_rule_in_memory_and_by_blocks(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(x) for x in rng.integers(3, 7, 3))
    offsets = (LONG, ((1, 0, 0), (0, 1, 0), (0, 0, -1), (0, -2, 0)))[seed % 2]
    if seed % 3 == 0:  # few levels: many ties of mean affinity
        u8 = np.array([0, 100, 160, 200, 255], np.uint8)[
            rng.integers(0, 5, (len(offsets), *shape))]
    else:
        u8 = rng.integers(0, 256, (len(offsets), *shape)).astype(np.uint8)
    mask = (rng.random(shape) > 0.2).astype(np.uint8) if seed % 2 else None
    min_size = int(rng.integers(3, 10))
    spec = ConnectedComponents(threshold=0.7, min_size=min_size)
    expected = reference_min_size(reference_cc(u8, offsets, 0.7, mask), u8, offsets, min_size)
    assert same_partition(segment_array(u8, offsets, build(spec), mask), expected)
    out = np.zeros(shape, np.uint64)
    segment_into(out, u8, offsets, build(spec), mask=mask, block=(2, 2, 3))
    assert same_partition(out, expected) and ids_are_one_to_k(out)


# ------------------------------------------------------------------ inputs and grids


def test_blockwise_several_values_each_equal_the_reference(tmp_path, scene):
    _truth, u8 = scene
    mask = wall_mask()
    path = write_affs(tmp_path, u8, LONG)
    write_volume(tmp_path / "mask.zarr", "mask", mask)
    result = invoke(path, tmp_path / "seg.zarr", "--method", "cc", "--threshold", "0.3,0.7",
                    "--block", "2", "5", "5", "--name", "c", "--json",
                    "--mask", f"{tmp_path}/mask.zarr/mask")
    assert result.exit_code == 0, result.output
    report = last_json(result)
    assert report["mode"] == "blockwise"
    for t, item in zip((0.3, 0.7), report["outputs"], strict=True):
        seg = open_volume(tmp_path / f"seg.zarr/c_{t:g}").read()
        assert same_partition(seg, reference_cc(u8, LONG, t, mask))
        assert item == {"name": f"c_{t:g}", "threshold": t, "segments": int(seg.max())}
        meta = dict(zarr.open_group(str(tmp_path / f"seg.zarr/labels/c_{t:g}"),
                                    mode="r").attrs)["emrun"]["segment"]
        assert meta["segmenter"]["threshold"] == t and meta["segments"] == int(seg.max())


@pytest.mark.parametrize("extra", [[], ["--block", "2", "5", "5"]], ids=["memory", "blocks"])
def test_a_larger_mask_is_read_where_the_affinities_lie(tmp_path, scene, extra):
    _truth, u8 = scene
    path = write_affs(tmp_path, u8, LONG, offset=(2, 0, 0))
    big = np.ones((9, 12, 12), np.float32)
    big[:, 6, :] = 0
    big[3, 2:5, 2:5] = np.nan  # NaN is outside
    big[5:, 9, :] = 0
    big[big == 1] = 0.25  # any non-zero is inside
    write_volume(tmp_path / "mask.zarr", "mask", big)
    result = invoke(path, tmp_path / "seg.zarr", "--method", "cc",
                    "--mask", f"{tmp_path}/mask.zarr/mask", *extra)
    assert result.exit_code == 0, result.output
    seg = open_volume(tmp_path / "seg.zarr/segmentation").read()
    here = np.nan_to_num(big[2:7]) != 0
    assert ((seg != 0) == here).all()
    assert same_partition(seg, reference_cc(u8, LONG, 0.5, here))


def test_a_coarser_level_segments_on_its_own_grid(tmp_path):
    truth = cells((4, 24, 24), n=6)
    u8 = as_uint8(true_affinities(truth, LONG), 0.05)
    write_volume(tmp_path / "pred.zarr", "affinity", u8, voxel_size=(40, 8, 8),
                 offset=(1, 2, 2), channel_axis=True,
                 attrs={"offsets": [list(o) for o in LONG]}, levels=2)
    level = open_volume(f"{tmp_path}/pred.zarr/affinity/1")
    for extra, name in (([], "mem"), (["--block", "2", "5", "5"], "blk")):
        result = invoke(f"{tmp_path}/pred.zarr/affinity", tmp_path / "seg.zarr", "--level", "1",
                        "--method", "cc", "--threshold", "0.3", "--name", name, *extra)
        assert result.exit_code == 0, result.output
        volume = open_volume(tmp_path / f"seg.zarr/{name}")
        assert volume.shape == level.shape[1:] and volume.voxel_size == level.voxel_size
        assert volume.offset == level.offset and volume.shift_nm == level.shift_nm
        assert same_partition(volume.read(), reference_cc(level.read(), LONG, 0.3))


def test_over_the_memory_limit_the_default_blocks_give_the_same_partition(
        tmp_path, scene, monkeypatch):
    import emrun.segment.job as job

    _truth, u8 = scene
    path = write_affs(tmp_path, u8, LONG)
    monkeypatch.setattr(job, "MEMORY_BYTES", 20_000)
    result = invoke(path, tmp_path / "seg.zarr", "--method", "cc", "--min-size", "5", "--json")
    assert result.exit_code == 0, result.output
    report = last_json(result)
    assert report["mode"] == "blockwise"
    assert all(b <= n for b, n in zip(report["block"], SHAPE, strict=True))
    seg = open_volume(tmp_path / "seg.zarr/segmentation").read()
    assert same_partition(seg, segment_array(u8, LONG, build(
        ConnectedComponents(min_size=5))))


# ------------------------------------------------------------------ at scale (--scheduler)


def thin_middle_object():
    """Three objects in one section: rows 0-4, a 2-row slab 5-6, rows 7-11; every voxel of
    the slab touches another object, so none of it lies 'inside' (all its edges > 0.5)."""
    truth = np.ones((1, 12, 12), np.int32)
    truth[:, 5:7] = 2
    truth[:, 7:] = 3
    offsets = ((0, -1, 0), (0, 0, -1))
    return truth, offsets, np.round(true_affinities(truth, offsets) * 255).astype(np.uint8)


def test_thin_object_reference_is_what_the_in_memory_segmenters_give():
    from emrun.segment.scale.fragments import watershed_fragments

    truth, offsets, u8 = thin_middle_object()
    assert same_partition(reference_cc(u8, offsets, 0.5), truth)
    for spec in (MutexWatershed(), ConnectedComponents()):
        assert same_partition(segment_array(u8, offsets, build(spec)), truth)
    fragments = watershed_fragments((u8 / 255).astype(np.float32), offsets)
    assert fragments.min() >= 1  # every voxel gets a fragment (that part holds)


def test_at_scale_fragments_never_cross_a_zero_affinity_boundary():
    from emrun.segment.scale.fragments import watershed_fragments

    truth, offsets, u8 = thin_middle_object()
    fragments = watershed_fragments((u8 / 255).astype(np.float32), offsets)
    for f in np.unique(fragments):
        assert np.unique(truth[fragments == f]).size == 1


def test_at_scale_command_separates_a_thin_object_with_perfect_affinities(tmp_path):
    truth, offsets, u8 = thin_middle_object()
    path = write_affs(tmp_path, u8, offsets)
    result = invoke(path, tmp_path / "seg.zarr", "--scheduler", "local", "--workers", "2",
                    "--threshold", "0.5")
    assert result.exit_code == 0, result.output
    seg = open_volume(tmp_path / "seg.zarr/segmentation").read()
    assert ((seg != 0).all() and ids_are_one_to_k(seg))  # the contract that holds
    assert same_partition(seg, truth)


def test_at_scale_command_with_mws_fragments_separates_the_thin_object(tmp_path):
    truth, offsets, u8 = thin_middle_object()
    path = write_affs(tmp_path, u8, offsets, voxel_size=(40, 8, 8), offset=(0, 3, 3))
    result = invoke(path, tmp_path / "seg.zarr", "--scheduler", "local", "--workers", "2",
                    "--threshold", "0.5", "--fragments", "mws", "--block", "1", "5", "5")
    assert result.exit_code == 0, result.output
    volume = open_volume(tmp_path / "seg.zarr/segmentation")
    seg = volume.read()
    assert volume.dtype == np.uint64 and volume.offset == (0, 3, 3)
    assert volume.voxel_size == (40.0, 8.0, 8.0)
    assert same_partition(seg, truth) and ids_are_one_to_k(seg)
