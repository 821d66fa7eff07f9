"""Probe of the one-machine segmenters (mws, cc, waterz), the ``min_size`` merge, masks and
the block-by-block stitching of `emrun segment --block`, each against a reference written
here from the documented rules: cc as components of the thresholded nearest-neighbour
edge graph (scipy.sparse.csgraph), mws as mwatershed called directly with the documented
weights, waterz as waterz called directly, and the small-segment merge on voxels."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from test_infer_segment_crosscheck import NEAREST
from test_infer_segment_crosscheck import connected_pieces as pieces
from test_segment import affinities, cells, noisy, same_partition

from emrun.recipe.run import ConnectedComponents, MutexWatershed, Waterz
from emrun.registry import segmenters
from emrun.segment import segment_array, segment_into
from emrun.segment.mws import MutexSegmenter

LONG = ((-1, 0, 0), (0, -1, 0), (0, 0, -1), (0, 0, 1), (0, -3, 0), (-2, 0, 0), (0, -1, -1))


def blocked(affs: np.ndarray, offsets, spec, block, mask=None) -> np.ndarray:
    out = np.zeros(affs.shape[1:], np.uint64)
    segment_into(out, affs, offsets, segmenters.build(spec), mask=mask, block=tuple(block))
    return out


def pairs(shape, offset):
    """Flat indices (v, v + offset) over the voxels v whose partner lies inside ``shape``,
    and the index of v in the (z, y, x) grid (for reading the channel at v)."""
    grid = np.indices(shape).reshape(3, -1)
    partner = grid + np.array(offset)[:, None]
    inside = np.all((partner >= 0) & (partner < np.array(shape)[:, None]), axis=0)
    v = np.ravel_multi_index(tuple(grid[:, inside]), shape)
    w = np.ravel_multi_index(tuple(partner[:, inside]), shape)
    return v, w


def cc_reference(affs, offsets, threshold, mask=None) -> np.ndarray:
    """Components of the graph whose edges are the nearest-neighbour pairs (v, v + o) with
    affinity at v above the threshold and both ends inside the mask; 0 outside it."""
    shape = affs.shape[1:]
    n = int(np.prod(shape))
    us, vs = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    flat_mask = None if mask is None else mask.ravel()
    for c, o in enumerate(offsets):
        if sum(map(abs, o)) != 1:
            continue
        v, w = pairs(shape, o)
        keep = affs[c].ravel()[v] > threshold
        if flat_mask is not None:
            keep &= flat_mask[v] & flat_mask[w]
        us.append(v[keep])
        vs.append(w[keep])
    u, v = np.concatenate(us), np.concatenate(vs)
    graph = coo_matrix((np.ones(u.size), (u, v)), shape=(n, n))
    labels = connected_components(graph, directed=False)[1].reshape(shape) + 1
    if mask is not None:
        labels[~mask] = 0
    return labels


def own_ids_for_zeros(labels: np.ndarray, mask=None) -> np.ndarray:
    """Voxels left at 0 inside the mask get an id each (the driver's rule)."""
    labels = labels.astype(np.int64)
    zero = labels == 0 if mask is None else (labels == 0) & mask
    labels[zero] = labels.max() + 1 + np.arange(int(zero.sum()))
    return labels


def mws_reference(affs, offsets, bias, mask=None) -> np.ndarray:
    """mwatershed on the documented weights: p - 0.5 (nearest), p - bias (long-range), 0 on
    edges touching the mask; then 6-connected pieces, a unique id per unassigned voxel."""
    import mwatershed

    shape = affs.shape[1:]
    weights = affs.astype(np.float64)
    kept = []
    for c, o in enumerate(offsets):
        weights[c] -= 0.5 if sum(map(abs, o)) == 1 else bias
        if mask is not None:
            v, w = pairs(shape, o)
            flat = weights[c].reshape(-1)
            outside = ~(mask.ravel()[v] & mask.ravel()[w])
            flat[v[outside]] = 0.0
        if all(abs(d) < n for d, n in zip(o, shape, strict=True)):
            kept.append(c)
    labels = mwatershed.agglom(np.ascontiguousarray(weights[kept]),
                               [list(offsets[c]) for c in kept]).astype(np.int64)
    if mask is not None:
        labels[~mask] = 0
    return own_ids_for_zeros(pieces(labels), mask)


def merge_reference(labels: np.ndarray, affs, offsets, min_size: int) -> np.ndarray:
    """The documented merge on voxels: region pairs by decreasing mean nearest-neighbour
    affinity (ties: lower first voxel first), joined while either side is below
    ``min_size``."""
    shape = labels.shape
    flat = labels.ravel()
    total: dict[tuple[int, int], list[float]] = {}
    for c, o in enumerate(offsets):
        if sum(map(abs, o)) != 1:
            continue
        v, w = pairs(shape, o)
        for a, b, p in zip(flat[v].tolist(), flat[w].tolist(), affs[c].ravel()[v].tolist(),
                           strict=True):
            if a and b and a != b:
                entry = total.setdefault((min(a, b), max(a, b)), [0.0, 0])
                entry[0] += p
                entry[1] += 1
    ids, first, size = np.unique(flat, return_index=True, return_counts=True)
    first_of = dict(zip(ids.tolist(), first.tolist(), strict=True))
    size_of = dict(zip(ids.tolist(), size.tolist(), strict=True))
    order = sorted(total, key=lambda e: (-total[e][0] / total[e][1],
                                         min(first_of[e[0]], first_of[e[1]]),
                                         max(first_of[e[0]], first_of[e[1]])))
    root = {i: i for i in ids.tolist()}

    def find(i):
        while root[i] != i:
            i = root[i]
        return i

    for a, b in order:
        ra, rb = find(a), find(b)
        if ra != rb and min(size_of[ra], size_of[rb]) < min_size:
            root[rb] = ra
            size_of[ra] += size_of[rb]
    return np.vectorize(find)(labels)


def is_contract(seg: np.ndarray, mask=None) -> bool:
    """uint64, 0 exactly outside the mask, ids 1..K."""
    inside = np.ones(seg.shape, bool) if mask is None else mask
    ids = np.unique(seg[inside])
    return (seg.dtype == np.uint64 and not (seg[~inside] != 0).any()
            and ids.tolist() == list(range(1, ids.size + 1)))


def connected(seg: np.ndarray) -> bool:
    """Every id one 6-connected piece."""
    return all(ndimage.label(seg == i)[1] == 1 for i in np.unique(seg[seg != 0]))


def shapes(rng, n, low=1, high=7):
    return [tuple(int(v) for v in rng.integers(low, high, 3)) for _ in range(n)]


# ------------------------------------------------------------------ bugs found (fixed)


def test_blockwise_mws_splits_fragments_joined_only_through_the_halo():
    """Rows y=0 and y=2 of the left block join only through x=2, which is the right
    block's (the left one sees it as halo). Kept as one id when cropped, the two rows
    stayed one fragment, and the stitching joined through it what the whole volume keeps
    apart; split into pieces, the blocks stitch to the in-memory result."""
    affs = np.full((3, 1, 3, 4), 0.01, np.float32)
    across = {(0, 0): .98, (0, 1): .97, (0, 2): .96, (2, 0): .95, (2, 1): .94,
              (2, 2): .93, (1, 0): .92}  # (y, x): affinity of (y, x) - (y, x + 1)
    for (y, x), p in across.items():
        affs[2, 0, y, x + 1] = p
    for (y, x), p in {(0, 2): .6, (1, 2): .62, (0, 3): .99}.items():  # (y, x) - (y + 1, x)
        affs[1, 0, y + 1, x] = p
    whole = segment_array(affs, NEAREST, segmenters.build(MutexWatershed()))
    assert whole[0].tolist() == [[1, 1, 1, 1], [2, 2, 3, 1], [3, 3, 3, 3]]
    out = blocked(affs, NEAREST, MutexWatershed(), (1, 3, 2))
    assert same_partition(out, whole)


def test_blockwise_mws_segments_are_each_one_connected_piece():
    """The mws docs: segments that do not touch are never joined. Random affinities with
    long-range offsets, random blocks: before, about one case in ten had a segment in two
    pieces (a fragment cropped from its halo)."""
    rng = np.random.default_rng(0)
    offsets = ((-1, 0, 0), (0, -1, 0), (0, 0, -1), (0, -2, 0), (0, 0, -3), (-1, -1, 0))
    for case in range(40):
        shape = tuple(int(v) for v in rng.integers([1, 2, 2], [5, 9, 9]))
        affs = rng.random((len(offsets), *shape)).astype(np.float32)
        affs[:3] = affs[:3] * 0.6 + 0.3
        mask = rng.random(shape) > 0.2 if case % 3 == 0 else None
        spec = MutexWatershed(bias=float(rng.choice([0.3, 0.5, 0.9])),
                              min_size=int(rng.choice([0, 3])))
        block = tuple(int(rng.integers(1, n + 1)) for n in shape)
        out = blocked(affs, offsets, spec, block, mask)
        assert is_contract(out, mask) and connected(out), (case, shape, block)


@pytest.mark.parametrize("shape", [(1, 5, 4), (3, 1, 4), (3, 4, 1)])
def test_waterz_with_a_mask_on_a_volume_one_voxel_thick(shape):
    """The mask of a one-voxel-thick axis has no edge along it: before, waterz's affinity
    layout failed to broadcast an empty edge mask ((0, 0, 0)) onto that channel."""
    pytest.importorskip("waterz")
    rng = np.random.default_rng(1)
    affs = rng.random((3, *shape)).astype(np.float32)
    mask = np.ones(shape, bool)
    mask.reshape(-1)[::3] = False
    seg = segment_array(affs, NEAREST, segmenters.build(Waterz(thresholds=[0.6])),
                        mask=mask)
    assert is_contract(seg, mask)
    assert same_partition(seg, waterz_reference(affs, NEAREST, 0.6, mask))


# ------------------------------------------------------------------ cc


def test_cc_equals_the_thresholded_edge_graph_in_memory_and_by_blocks():
    """Positive, negative and long-range offsets (long-range ignored), masks on half the
    cases, uint8 and float input, blocks that do not divide the volume."""
    rng = np.random.default_rng(2)
    for case, shape in enumerate(shapes(rng, 24)):
        affs = rng.random((len(LONG), *shape)).astype(np.float32)
        if case % 4 == 1:
            affs = np.round(affs * 255).astype(np.uint8)
        mask = rng.random(shape) > 0.25 if case % 2 else None
        threshold = float(rng.choice([0.2, 0.5, 0.8]))
        p = affs / 255 if affs.dtype == np.uint8 else affs
        want = cc_reference(p.astype(np.float32), LONG, threshold, mask)
        spec = ConnectedComponents(threshold=threshold)
        got = segment_array(affs, LONG, segmenters.build(spec), mask=mask)
        assert is_contract(got, mask) and same_partition(got, want), case
        block = tuple(int(rng.integers(1, n + 1)) for n in shape)
        out = blocked(affs, LONG, spec, block, mask)
        assert is_contract(out, mask) and same_partition(out, want), (case, block)


def test_cc_all_zero_and_all_one_affinities_and_one_section():
    for shape in [(1, 4, 5), (3, 1, 1), (1, 1, 1)]:
        for block in [(1, 1, 1), shape]:
            zero = blocked(np.zeros((3, *shape), np.float32), NEAREST,
                           ConnectedComponents(), block)
            one = blocked(np.ones((3, *shape), np.uint8) * 255, NEAREST,
                          ConnectedComponents(), block)
            assert np.unique(zero).tolist() == list(range(1, int(np.prod(shape)) + 1))
            assert (one == 1).all()


# ------------------------------------------------------------------ mws


def test_mws_equals_mwatershed_called_directly():
    """Documented weights, long-range channels (one longer than thin volumes), masks, a
    one-voxel-thick axis; uint8 input gives what its float values give."""
    rng = np.random.default_rng(3)
    for case, shape in enumerate(shapes(rng, 20, 1, 7)):
        affs = rng.random((len(LONG), *shape)).astype(np.float32)
        bias = float(rng.choice([0.2, 0.5, 0.8]))
        mask = rng.random(shape) > 0.3 if case % 3 == 0 else None
        segmenter = segmenters.build(MutexWatershed(bias=bias))
        got = segment_array(affs, LONG, segmenter, mask=mask)
        assert is_contract(got, mask), case
        assert same_partition(got, mws_reference(affs, LONG, bias, mask)), case
        as_uint8 = np.round(affs * 255).astype(np.uint8)
        assert np.array_equal(segment_array(as_uint8, LONG, segmenter, mask=mask),
                              segment_array(as_uint8.astype(np.float32) / np.float32(255),
                                            LONG, segmenter, mask=mask))


def test_mws_all_zero_and_all_one_affinities():
    shape = (2, 3, 4)
    for bias in (0.0, 0.5, 1.0):
        spec = MutexWatershed(bias=bias)
        zero = segment_array(np.zeros((len(LONG), *shape), np.float32), LONG,
                             segmenters.build(spec))
        one = segment_array(np.ones((len(LONG), *shape), np.float32), LONG,
                            segmenters.build(spec))
        assert np.unique(zero).size == zero.size and (one == 1).all(), bias
        assert same_partition(blocked(np.ones((len(LONG), *shape), np.float32), LONG, spec,
                                      (1, 2, 1)), one)


def test_blockwise_mws_of_perfect_affinities_equals_in_memory():
    """Cells with perfect affinities, long-range offsets longer than a block, a mask that
    cuts every cell, odd blocks (one voxel along an axis too)."""
    rng = np.random.default_rng(4)
    offsets = ((-1, 0, 0), (0, -1, 0), (0, 0, -1), (0, -6, 0), (0, 0, -7), (-2, 0, 0))
    for case in range(8):
        shape = (int(rng.integers(2, 7)), int(rng.integers(8, 18)), int(rng.integers(8, 18)))
        truth = cells(shape, n=int(rng.integers(2, 7)), seed=case)
        affs = affinities(truth, offsets)
        mask = None
        if case % 2:
            mask = np.ones(shape, bool)
            mask[:, :, shape[2] // 2] = False
        block = (1, 5, 3) if case == 0 else tuple(int(rng.integers(1, n + 1)) for n in shape)
        spec = MutexWatershed(bias=float(rng.choice([0.5, 0.9])))
        want = segment_array(affs, offsets, segmenters.build(spec), mask=mask)
        assert same_partition(want, pieces(np.where(mask if mask is not None else True,
                                                    truth, 0)))
        out = blocked(affs, offsets, spec, block, mask)
        assert is_contract(out, mask) and same_partition(out, want), (case, block)


# ------------------------------------------------------------------ waterz


def waterz_reference(affs, offsets, threshold, mask=None, scoring="mean") -> np.ndarray:
    """waterz.agglomerate on the nearest-neighbour channels in its layout (channel a at v:
    v and v - 1 along a; a (+1) channel shifted there), 0 on edges touching the mask."""
    import waterz

    from emrun.segment.waterz import SCORING

    shape = affs.shape[1:]
    layout = np.zeros((3, *shape), np.float32)
    for c, o in enumerate(offsets):
        if sum(map(abs, o)) != 1:
            continue
        axis = int(np.flatnonzero(o)[0])
        for v in itertools.product(*map(range, shape)):
            w = list(v)
            w[axis] += o[axis]
            if not 0 <= w[axis] < shape[axis]:
                continue
            later = max(v, tuple(w))  # waterz's value sits at the later voxel
            if mask is not None and not (mask[v] and mask[tuple(w)]):
                continue
            if o[axis] < 0 or not any(offsets[k][axis] < 0 for k in range(len(offsets))
                                      if sum(map(abs, offsets[k])) == 1):
                layout[(axis, *later)] = affs[(c, *v)]
    labels = np.array(next(iter(waterz.agglomerate(layout, [threshold],
                                                   scoring_function=SCORING[scoring]))),
                      dtype=np.int64)
    if mask is not None:
        labels[~mask] = 0
    return own_ids_for_zeros(labels, mask)


def test_waterz_equals_waterz_called_directly():
    """Negative and positive nearest channels, both scorings, masks, flat volumes."""
    pytest.importorskip("waterz")
    rng = np.random.default_rng(5)
    positive = ((1, 0, 0), (0, 1, 0), (0, 0, 1), (0, -3, 0))
    for case, shape in enumerate(shapes(rng, 12, 1, 7)):
        offsets = positive if case % 2 else NEAREST
        truth = cells(shape, n=3, seed=case)
        affs = np.clip(affinities(truth, offsets) * 0.6 + 0.2
                       + rng.normal(0, 0.2, (len(offsets), *shape)), 0, 1).astype(np.float32)
        mask = rng.random(shape) > 0.3 if case % 3 == 0 else None
        threshold = float(rng.choice([0.3, 0.6, 0.9]))
        scoring = "p85" if case % 4 == 3 else "mean"
        spec = Waterz(thresholds=[threshold], scoring=scoring)
        got = segment_array(affs, offsets, segmenters.build(spec), mask=mask)
        assert is_contract(got, mask), case
        assert same_partition(got, waterz_reference(affs, offsets, threshold, mask,
                                                    scoring)), case


# ------------------------------------------------------------------ min_size


@pytest.mark.parametrize("spec", [ConnectedComponents(threshold=0.6),
                                  MutexWatershed(bias=0.6)], ids=["cc", "mws"])
def test_min_size_merges_into_the_best_neighbour_as_documented(spec):
    """The merge of segments below min_size equals the documented rule applied on voxels to
    the segmentation without it; inside a mask nothing joins across it."""
    rng = np.random.default_rng(6)
    for case in range(10):
        shape = tuple(int(v) for v in rng.integers([1, 3, 3], [4, 9, 9]))
        affs = rng.random((3, *shape)).astype(np.float32)
        mask = rng.random(shape) > 0.3 if case % 2 else None
        min_size = int(rng.integers(2, 7))
        loose = segment_array(affs, NEAREST, segmenters.build(spec), mask=mask)
        want = merge_reference(loose.astype(np.int64), affs, NEAREST, min_size)
        sized = spec.model_copy(update={"min_size": min_size})
        got = segment_array(affs, NEAREST, segmenters.build(sized), mask=mask)
        assert is_contract(got, mask) and same_partition(got, want), case
        assert connected(got), case
        if spec.type == "cc":  # exact stitching: blocks merge alike
            block = tuple(int(rng.integers(1, n + 1)) for n in shape)
            assert same_partition(blocked(affs, NEAREST, sized, block, mask), want), case


def test_min_size_ties_go_to_the_pair_whose_first_voxels_come_first():
    """A row A A S B B (uint8): S (one voxel) meets A and B with the same affinity; the
    documented tie rule (pairs by their segments' first voxels) joins it to A, in memory
    and for every block size along x."""
    affs = np.zeros((3, 1, 1, 5), np.uint8)
    affs[2, 0, 0] = [0, 255, 77, 77, 255]  # (0, 0, -1) at x: x - 1 and x
    spec = ConnectedComponents(threshold=0.5, min_size=2)
    want = [1, 1, 1, 2, 2]
    assert segment_array(affs, NEAREST, segmenters.build(spec))[0, 0].tolist() == want
    for x in range(1, 6):
        assert blocked(affs, NEAREST, spec, (1, 1, x))[0, 0].tolist() == want, x


def test_small_segments_remain_only_without_a_neighbour():
    """After the merge, a segment below min_size touches no other segment (in memory and
    block by block, mws too)."""
    truth = cells((6, 20, 20), 6, seed=7)
    affs = noisy(affinities(truth), 0.3, seed=7)
    mask = np.ones(truth.shape, bool)
    mask[:, 9, :] = False
    mask[:, 0:2, 0:2] = True
    offsets = ((-1, 0, 0), (0, -1, 0), (0, 0, -1), (-2, 0, 0), (0, -3, 0), (0, 0, -3),
               (0, -9, 0), (0, 0, -9))
    for spec in (MutexWatershed(min_size=25), ConnectedComponents(min_size=25)):
        for seg in (segment_array(affs, offsets, segmenters.build(spec), mask=mask),
                    blocked(affs, offsets, spec, (4, 7, 9), mask)):
            assert is_contract(seg, mask) and connected(seg)
            sizes = np.bincount(seg.ravel().astype(np.int64))
            for small in np.flatnonzero((sizes > 0) & (sizes < 25)):
                if small == 0:
                    continue
                grown = ndimage.binary_dilation(seg == small)
                assert set(np.unique(seg[grown]).tolist()) <= {0, int(small)}, spec.type


# ------------------------------------------------------------------ masks


@pytest.mark.parametrize("spec", [MutexWatershed(min_size=3), ConnectedComponents(min_size=3),
                                  Waterz(thresholds=[0.6], min_size=3)],
                         ids=["mws", "cc", "waterz"])
def test_masks_of_any_dtype_and_with_a_channel_axis_segment_as_their_bools(spec):
    """0/1 uint8, float with NaN outside, and (1, z, y, x) masks: in memory they failed (a
    uint8 mask was read as indices, ~1 = 254; a float one broke a bitwise and) though
    block by block took them; now both give what the bool mask gives."""
    if spec.type == "waterz":
        pytest.importorskip("waterz")
    rng = np.random.default_rng(8)
    shape = (3, 6, 7)
    affs = rng.random((len(LONG), *shape)).astype(np.float32)
    bools = rng.random(shape) > 0.3
    segmenter = segmenters.build(spec)
    want = segment_array(affs, LONG, segmenter, mask=bools)
    assert is_contract(want, bools)
    masks = [bools.astype(np.uint8), np.where(bools, 1.0, np.nan).astype(np.float32),
             bools[None].astype(np.uint8), np.where(bools, 0.5, 0.0)[None]]
    for mask in masks:
        assert np.array_equal(segment_array(affs, LONG, segmenter, mask=mask), want)
        from emrun.segment import segment_values
        got = next(segment_values(affs, LONG, segmenter, [segmenter.value], mask))
        assert np.array_equal(got, want)
        if spec.type != "waterz":
            single = blocked(affs, LONG, spec, shape, mask)  # one block: the in-memory path
            assert np.array_equal(single, want)
            assert is_contract(blocked(affs, LONG, spec, (2, 4, 3), mask), bools)


def test_a_mask_of_another_shape_is_a_user_error():
    from emrun.errors import UserError

    affs = np.ones((3, 2, 4, 4), np.float32)
    for mask in (np.ones((2, 4, 5), bool), np.ones((2, 2, 4, 4), bool)):
        with pytest.raises(UserError, match="mask has shape"):
            segment_array(affs, NEAREST, segmenters.build(ConnectedComponents()), mask=mask)
        with pytest.raises(UserError, match="mask has shape"):
            blocked(affs, NEAREST, ConnectedComponents(), (1, 2, 2), mask)


@pytest.mark.parametrize("bias", [0.2, 0.4, 0.6, 0.8])
def test_mws_long_range_affinity_equal_to_the_bias_weighs_nothing(bias):
    """Nearest neighbours at 0.5 and long-range affinities at the bias: every weight is 0
    (the docs: never used), so every voxel is its own segment. Against the float64 bias,
    float32 0.2 weighed +3e-9 and the (0, 0, -2) and (0, 0, -3) edges joined the row."""
    offsets = (*NEAREST, (0, 0, -2), (0, 0, -3))
    affs = np.full((5, 1, 2, 6), 0.5, np.float32)
    affs[3:] = bias
    seg = segment_array(affs, offsets, segmenters.build(MutexWatershed(bias=bias)))
    assert np.unique(seg).size == seg.size
    stored = np.full((1, 2, 6), round(bias * 255), np.uint8)  # the stored level of the bias
    weights = MutexSegmenter(MutexWatershed(bias=bias)).weights(
        stored.astype(np.float32) / np.float32(255), (0, 0, -2))
    assert (weights == 0).all()


# ------------------------------------------------------------------ not this probe's files


@pytest.mark.parametrize("method", ["mws", "watershed"])
def test_at_scale_block_fragments_are_each_one_connected_piece(method):
    """block_fragments cropped fragments made with a context to the block without splitting
    them: a fragment joined only through the context was two pieces under one id (the graph
    then treated them as one node)."""
    from emrun.segment.scale.fragments import block_fragments

    offsets = (*NEAREST, (0, -2, 0), (0, 0, -3))
    rng = np.random.default_rng(0)
    for case in range(8):
        affs = rng.random((len(offsets), 3, 12, 12)).astype(np.float32)
        if method == "mws":
            affs[:3] = affs[:3] * 0.6 + 0.3
        core = (slice(1, 2), slice(3, 9), slice(3, 9))
        labels, _ = block_fragments(affs, offsets, None, method, 0, core)
        assert connected(labels), case


# ------------------------------------------------------------------ the command


def test_cli_block_by_block_equals_in_memory_for_cc_and_keeps_mws_contract(tmp_path):
    """`emrun segment --block` with a float (1, z, y, x) mask holding NaN outside and 0,
    blocks that do not divide the volume (one voxel along x too), --min-size: cc equals the
    in-memory run and the thresholded edge graph merged as documented; mws keeps the output
    contract with every segment one piece."""
    from test_segment import OFFSETS, invoke, write_prediction

    from emrun.io import open_volume, write_volume

    shape = (5, 23, 19)
    truth = cells(shape, 6, seed=1)
    affs = noisy(affinities(truth), 0.25, seed=2)
    stored = write_prediction(tmp_path, affs)
    mask = np.ones(shape, np.float32)
    mask[:, :, 9] = np.nan
    mask[1] = 0
    write_volume(tmp_path / "m.zarr", "m", mask[None], channel_axis=True)
    inside = mask == 1
    p = np.round(affs * 255).astype(np.uint8).astype(np.float32) / np.float32(255)
    loose = cc_reference(p, OFFSETS, 0.6, inside)
    want = merge_reference(loose, p, OFFSETS, 4)
    for method, extra in (("cc", ["--threshold", "0.6"]), ("mws", [])):
        for i, block in enumerate((None, (2, 7, 4), (5, 23, 1))):
            name = f"{method}{i}"
            args = [stored, tmp_path / "o.zarr", "--method", method, "--mask",
                    f"{tmp_path}/m.zarr/m", "--min-size", 4, "--name", name, *extra]
            result = invoke(*args, *(["--block", *block] if block else []))
            assert result.exit_code == 0, result.output
            seg = open_volume(tmp_path / "o.zarr" / name).read()
            assert is_contract(seg, inside) and connected(seg), name
            if method == "cc":
                assert same_partition(seg, want), name
