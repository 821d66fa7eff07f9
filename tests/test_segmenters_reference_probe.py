"""The in-memory and block-by-block segmenters (cc, mws, waterz) and the sweep, each against
a tiny reference written here from the documented rules, with no emrun or library code in
the reference: cc as a Python union-find over the thresholded nearest-neighbour edges (and
as scipy.ndimage.label of a foreground), mws as a brute-force mutex watershed over the
sorted signed edge list (weights ``p - 0.5`` nearest, ``p - bias`` long-range, the edge of
channel c at v joining v and v + offsets[c]), blockwise as the in-memory result (compared
as partitions), and a sweep as separate runs per value."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import ndimage

from emrun.evaluate import score
from emrun.recipe.run import ConnectedComponents, MutexWatershed, Waterz
from emrun.registry import segmenters
from emrun.segment import segment_array, segment_into, segment_values, sweep

NEAREST = ((-1, 0, 0), (0, -1, 0), (0, 0, -1))
# both directions along z, a positive y, long-range straight and diagonal ones
MIXED = ((-1, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, -1), (0, -2, 0), (-2, 0, 0), (0, -1, -1),
         (0, 3, -1))


# ------------------------------------------------------------------ references


def edges_of(shape, offset):
    """(v, v + offset) for every voxel v whose partner lies inside ``shape``, as tuples."""
    for v in itertools.product(*map(range, shape)):
        w = tuple(a + d for a, d in zip(v, offset, strict=True))
        if all(0 <= a < n for a, n in zip(w, shape, strict=True)):
            yield v, w


class UnionFind:
    def __init__(self) -> None:
        self.parent: dict = {}

    def find(self, a):
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            a = self.parent[a]
        return a

    def join(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
        return ra


def partition(shape, find, inside=None) -> np.ndarray:
    """An integer label per voxel from a representative function; 0 outside ``inside``."""
    ids: dict = {}
    out = np.zeros(shape, np.int64)
    for v in itertools.product(*map(range, shape)):
        if inside is not None and not inside[v]:
            continue
        out[v] = ids.setdefault(find(v), len(ids) + 1)
    return out


def cc_reference(p, offsets, threshold, mask=None) -> np.ndarray:
    """Two voxels join when a nearest-neighbour affinity between them (any channel) is
    above the threshold and both lie inside the mask; long-range channels play no part."""
    shape = p.shape[1:]
    uf = UnionFind()
    for c, o in enumerate(offsets):
        if sum(map(abs, o)) != 1:
            continue
        for v, w in edges_of(shape, o):
            if p[(c, *v)] > threshold and (mask is None or (mask[v] and mask[w])):
                uf.join(v, w)
    return partition(shape, uf.find, mask)


def mws_reference(p, offsets, bias, mask=None) -> np.ndarray:
    """Mutex watershed by brute force: signed weights p - b_c (b_c = 0.5 nearest, ``bias``
    long-range, at float32), 0 on edges touching the mask (never used); edges in decreasing
    |weight|; an attractive one joins two clusters unless a mutex separates them, a
    repulsive one puts a mutex between them. Then each cluster's 6-connected pieces."""
    shape = p.shape[1:]
    entries = []
    for c, o in enumerate(offsets):
        b = float(np.float32(0.5 if sum(map(abs, o)) == 1 else bias))
        for v, w in edges_of(shape, o):
            if mask is not None and not (mask[v] and mask[w]):
                continue
            weight = float(p[(c, *v)]) - b
            if weight != 0:
                entries.append((abs(weight), weight > 0, v, w))
    entries.sort(key=lambda e: -e[0])
    uf = UnionFind()
    mutex: dict = {}
    for _, attractive, v, w in entries:
        ra, rb = uf.find(v), uf.find(w)
        if ra == rb:
            continue
        if attractive:
            if rb in mutex.get(ra, set()):
                continue
            uf.parent[rb] = ra
            joined = mutex.pop(ra, set()) | mutex.pop(rb, set())
            for other in joined:
                mutex[other] = (mutex[other] - {ra, rb}) | {ra}
            mutex[ra] = joined
        else:
            mutex.setdefault(ra, set()).add(rb)
            mutex.setdefault(rb, set()).add(ra)
    clusters = partition(shape, uf.find, mask)
    return pieces(clusters)


def pieces(labels: np.ndarray) -> np.ndarray:
    """Each id's 6-connected pieces as ids of their own (0 stays 0)."""
    out, top = np.zeros(labels.shape, np.int64), 0
    for i in np.unique(labels[labels != 0]):
        found, count = ndimage.label(labels == i)
        out[found > 0] = found[found > 0] + top
        top += count
    return out


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to a bijection between the ids (0 included: it must match 0's voxels)."""
    pairs = np.unique(np.stack([a.ravel().astype(np.int64), b.ravel().astype(np.int64)]),
                      axis=1)
    return pairs.shape[1] == np.unique(a).size == np.unique(b).size


def contract(seg: np.ndarray, mask=None) -> bool:
    """uint64, 0 exactly outside the mask, ids 1..K."""
    inside = np.ones(seg.shape, bool) if mask is None else mask
    ids = np.unique(seg[inside])
    return (seg.dtype == np.uint64 and not (seg[~inside] != 0).any() and not
            (seg[inside] == 0).any() and ids.tolist() == list(range(1, ids.size + 1)))


def blocked(affs, offsets, spec, block, mask=None) -> np.ndarray:
    out = np.zeros(affs.shape[1:], np.uint64)
    segment_into(out, affs, offsets, segmenters.build(spec), mask=mask, block=tuple(block))
    return out


def cells(shape, n, seed) -> np.ndarray:
    """Voronoi cells of n random seeds (ids 1..n)."""
    rng = np.random.default_rng(seed)
    seeds = np.zeros(shape, np.int32)
    seeds[tuple(rng.integers(0, s, n) for s in shape)] = np.arange(1, n + 1)
    _, nearest = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    return seeds[tuple(nearest)]


def perfect(truth: np.ndarray, offsets) -> np.ndarray:
    """Affinity 1 at v for offset o where v and v + o carry the same non-zero id."""
    out = np.zeros((len(offsets), *truth.shape), np.float32)
    for c, o in enumerate(offsets):
        for v, w in edges_of(truth.shape, o):
            out[(c, *v)] = float(truth[v] != 0 and truth[v] == truth[w])
    return out


def distinct_weights(p, offsets, bias) -> bool:
    """Whether no two edges have the same |weight| (the mutex watershed's order is then
    unique, whatever the implementation does on ties)."""
    seen = []
    for c, o in enumerate(offsets):
        b = float(np.float32(0.5 if sum(map(abs, o)) == 1 else bias))
        seen.append(np.abs(p[c].astype(np.float64) - b).ravel())
    values = np.concatenate(seen)
    return np.unique(values).size == values.size


# ------------------------------------------------------------------ cc


def test_cc_equals_a_union_find_over_the_thresholded_edges():
    """Both directions along an axis, positive offsets, long-range channels (ignored),
    masks, one-voxel-thick axes; unassigned voxels are singletons, 0 only outside."""
    rng = np.random.default_rng(10)
    for case in range(16):
        shape = tuple(int(v) for v in rng.integers(1, 6, 3))
        p = rng.random((len(MIXED), *shape)).astype(np.float32)
        mask = rng.random(shape) > 0.3 if case % 2 else None
        threshold = float(rng.choice([0.3, 0.5, 0.7]))
        got = segment_array(p, MIXED, segmenters.build(ConnectedComponents(
            threshold=threshold)), mask=mask)
        want = cc_reference(p, MIXED, threshold, mask)
        assert contract(got, mask), case
        assert same_partition(got, want), case


def test_cc_of_a_foreground_map_is_ndimage_label():
    """Affinity 1 where both voxels are foreground: foreground components are
    ndimage.label's (6-connected); every background voxel is its own segment."""
    rng = np.random.default_rng(11)
    shape = (4, 7, 9)
    fg = rng.random(shape) > 0.45
    p = perfect(fg.astype(np.int32), NEAREST)
    got = segment_array(p, NEAREST, segmenters.build(ConnectedComponents()))
    labels, n = ndimage.label(fg)
    background = int((~fg).sum())
    assert np.unique(got).size == n + background
    assert same_partition(got[fg], labels[fg])
    assert np.unique(got[~fg]).size == background


def test_cc_threshold_is_strict_for_uint8_affinities():
    """A stored 51 is 0.2: not above a threshold of 0.2, above one of 0.19."""
    affs = np.zeros((3, 1, 1, 2), np.uint8)
    affs[2, 0, 0, 1] = 51
    at = segment_array(affs, NEAREST, segmenters.build(ConnectedComponents(threshold=0.2)))
    below = segment_array(affs, NEAREST,
                          segmenters.build(ConnectedComponents(threshold=0.19)))
    assert at.ravel().tolist() == [1, 2] and below.ravel().tolist() == [1, 1]
    assert blocked(affs, NEAREST, ConnectedComponents(threshold=0.2),
                   (1, 1, 1)).ravel().tolist() == [1, 2]


# ------------------------------------------------------------------ mws


def test_mws_equals_a_brute_force_mutex_watershed():
    """Random affinities with distinct |weights| (so the order is unique), straight,
    diagonal and positive long-range offsets, biases 0 to 1, masks."""
    rng = np.random.default_rng(12)
    done = 0
    for case in range(40):
        shape = tuple(int(v) for v in rng.integers(1, 6, 3))
        p = rng.random((len(MIXED), *shape)).astype(np.float32)
        bias = float(rng.choice([0.0, 0.3, 0.5, 0.8, 1.0]))
        if not distinct_weights(p, MIXED, bias):
            continue
        mask = rng.random(shape) > 0.3 if case % 3 == 0 else None
        got = segment_array(p, MIXED, segmenters.build(MutexWatershed(bias=bias)),
                            mask=mask)
        want = mws_reference(p, MIXED, bias, mask)
        unassigned = (want == 0) if mask is None else (want == 0) & mask
        want[unassigned] = want.max() + 1 + np.arange(int(unassigned.sum()))
        assert contract(got, mask), case
        assert same_partition(got, want), (case, shape, bias)
        done += 1
    assert done >= 25


@pytest.mark.parametrize(("bias", "apart"), [(0.5, True), (0.9, True), (0.1, False),
                                             (0.0, False)])
def test_mws_long_range_repulsion_by_hand(bias, apart):
    """A row of three voxels: nearest affinities 0.9 and 0.8 (weights +0.4, +0.3) and a
    long-range one of 0.05 from x=2 to x=0: weight 0.05 - bias, repulsive and processed
    first when bias > 0.45 (the ends stay apart), attractive or too weak otherwise."""
    offsets = ((-1, 0, 0), (0, -1, 0), (0, 0, -1), (0, 0, -2))
    p = np.zeros((4, 1, 1, 3), np.float32)
    p[2, 0, 0, 1], p[2, 0, 0, 2] = 0.9, 0.8
    p[3, 0, 0, 2] = 0.05
    seg = segment_array(p, offsets, segmenters.build(MutexWatershed(bias=bias))).ravel()
    if apart:
        assert seg.tolist() == [1, 1, 2]  # 0-1 (+0.4) joined before 1-2 (+0.3) was refused
    else:
        assert seg.tolist() == [1, 1, 1]


# ------------------------------------------------------------------ blockwise


def corner_objects(shape) -> np.ndarray:
    """Objects that cross block faces and corners: a diagonal staircase, a 3-d cross whose
    arms meet at (2, 3, 4), a slab along y; background 0 elsewhere."""
    truth = np.zeros(shape, np.int32)
    for i in range(min(shape)):
        truth[i, i, i] = 1
        if i + 1 < shape[2]:
            truth[i, i, i + 1] = 1
        if i + 1 < shape[1]:
            truth[i, i + 1, i + 1 if i + 1 < shape[2] else i] = 1
    truth[:, 3, 4] = 2
    truth[2, :, 4] = 2
    truth[2, 3, :] = 2
    truth[-1, :, -2:] = 3
    return truth


BLOCKS = [(1, 2, 3), (2, 1, 4), (3, 4, 1), (2, 3, 3), (1, 1, 1), (4, 5, 6), (9, 9, 9)]


@pytest.mark.parametrize("block", BLOCKS)
def test_blockwise_cc_equals_in_memory_across_faces_and_corners(block):
    """Volume (5, 7, 8): no block size divides all of it; noisy affinities around the
    objects, a mask, uint8 input (many ties) and min_size (merges across block faces)."""
    shape = (5, 7, 8)
    rng = np.random.default_rng(sum(block))
    truth = corner_objects(shape)
    p = np.clip(perfect(truth, MIXED) * 0.7 + rng.random((len(MIXED), *shape)) * 0.4, 0, 1)
    affs = np.round(p * 255).astype(np.uint8)
    mask = rng.random(shape) > 0.15
    for spec in [ConnectedComponents(threshold=0.6), ConnectedComponents(threshold=0.5,
                                                                         min_size=4)]:
        for m in (None, mask):
            want = segment_array(affs, MIXED, segmenters.build(spec), mask=m)
            got = blocked(affs, MIXED, spec, block, m)
            assert contract(got, m)
            assert same_partition(got, want), (spec, m is None)
    plain = cc_reference(affs.astype(np.float32) / np.float32(255), MIXED, 0.6, mask)
    assert same_partition(blocked(affs, MIXED, ConnectedComponents(threshold=0.6), block,
                                  mask), plain)


@pytest.mark.parametrize("block", BLOCKS)
def test_blockwise_mws_of_perfect_affinities_across_corners(block):
    """mws stitching is exact where affinities are perfect (documented): the corner
    objects, long-range offsets past the block size, with and without a mask."""
    shape = (5, 7, 8)
    truth = corner_objects(shape)
    truth[truth == 0] = 4  # background as one more object
    p = perfect(truth, MIXED)
    mask = np.ones(shape, bool)
    mask[:, :, 6] = False
    for m in (None, mask):
        spec = MutexWatershed(bias=0.5)
        want = segment_array(p, MIXED, segmenters.build(spec), mask=m)
        assert same_partition(want, pieces(np.where(m if m is not None else True,
                                                    truth, 0)))
        got = blocked(p, MIXED, spec, block, m)
        assert contract(got, m) and same_partition(got, want), m is None


@pytest.mark.parametrize("spec", [MutexWatershed(bias=0.3, min_size=3),
                                  ConnectedComponents(threshold=0.4, min_size=3)])
def test_one_block_covering_the_volume_is_the_in_memory_result(spec):
    """With a block as large as the volume (or larger) there is nothing to stitch: the
    result equals the in-memory one id for id, noise and min_size included."""
    rng = np.random.default_rng(13)
    shape = (3, 6, 7)
    p = rng.random((len(MIXED), *shape)).astype(np.float32)
    mask = rng.random(shape) > 0.2
    want = segment_array(p, MIXED, segmenters.build(spec), mask=mask)
    for block in [shape, (10, 10, 10)]:
        assert np.array_equal(blocked(p, MIXED, spec, block, mask), want)


# ------------------------------------------------------------------ sweep


@pytest.mark.parametrize(("spec", "values"), [
    (ConnectedComponents(min_size=2), [0.7, 0.3, 0.5, 0.3]),
    (MutexWatershed(min_size=2), [0.9, 0.1, 0.5]),
])
def test_sweep_equals_separate_runs_per_value(spec, values):
    rng = np.random.default_rng(14)
    shape = (4, 8, 9)
    truth = cells(shape, 5, 3)
    p = np.clip(perfect(truth, MIXED) * 0.6 + 0.2 + rng.normal(0, 0.2, (len(MIXED), *shape)),
                0, 1).astype(np.float32)
    mask = rng.random(shape) > 0.1
    result = sweep(p, MIXED, spec, values, truth, mask=mask, workers=1)
    segmenter = segmenters.build(spec)
    separate = [segment_array(p, MIXED, segmenter.with_value(v), mask=mask) for v in values]
    for v, seg, scores in zip(values, separate, result.scores, strict=True):
        assert scores == score(seg, truth, mask).as_dict(), v
    arands = [s["arand"] for s in result.scores]
    best = arands.index(min(arands))
    assert result.best == best and np.array_equal(result.segmentation, separate[best])


def test_waterz_thresholds_in_one_pass_equal_separate_runs():
    """One agglomeration through several thresholds (unsorted, repeated) gives, for each,
    what a run with that threshold alone gives."""
    pytest.importorskip("waterz")
    rng = np.random.default_rng(15)
    shape = (4, 9, 10)
    truth = cells(shape, 6, 4)
    p = np.clip(perfect(truth, NEAREST) * 0.6 + 0.2 + rng.normal(0, 0.2, (3, *shape)),
                0, 1).astype(np.float32)
    mask = rng.random(shape) > 0.1
    values = [0.7, 0.2, 0.5, 0.2, 0.9]
    for scoring in ("mean", "p85"):
        spec = Waterz(thresholds=[0.5], scoring=scoring)
        together = list(segment_values(p, NEAREST, segmenters.build(spec), values, mask))
        for v, seg in zip(values, together, strict=True):
            alone = segment_array(p, NEAREST, segmenters.build(Waterz(thresholds=[v],
                                                                      scoring=scoring)),
                                  mask=mask)
            assert np.array_equal(seg, alone), (scoring, v)


@pytest.mark.parametrize("spec", [ConnectedComponents(threshold=0.5, min_size=3),
                                  MutexWatershed(bias=0.5, min_size=3)])
def test_blocks_entirely_outside_the_mask(spec):
    """Whole blocks masked out (and a one-voxel island between them): 0 there, the
    contract elsewhere; cc equals in memory."""
    rng = np.random.default_rng(16)
    shape = (4, 6, 7)
    p = rng.random((len(MIXED), *shape)).astype(np.float32)
    mask = np.ones(shape, bool)
    mask[:2, :3, :] = False
    mask[:, :, 4:] = False
    mask[0, 4, 5] = True  # an island: no neighbour inside, stays small
    want = segment_array(p, MIXED, segmenters.build(spec), mask=mask)
    for block in [(2, 3, 4), (1, 3, 1), (4, 6, 2)]:
        got = blocked(p, MIXED, spec, block, mask)
        assert contract(got, mask), block
        if spec.type == "cc":
            assert same_partition(got, want), block


# ------------------------------------------------------------------ bugs found


@pytest.mark.parametrize("offsets", [((-1, 0, 0), (0, -1, 0)),
                                     ((-1, 0, 0), (0, -1, 0), (0, 0, -1), (0, 0, -2))])
@pytest.mark.parametrize("spec", [MutexWatershed(), ConnectedComponents()])
def test_public_entry_points_refuse_offsets_that_do_not_match_the_channels(spec, offsets):
    from emrun.errors import UserError

    p = np.ones((3, 2, 3, 4), np.float32)
    segmenter = segmenters.build(spec)
    with pytest.raises(UserError, match="offset"):
        segment_array(p, offsets, segmenter)
    with pytest.raises(UserError, match="offset"):
        next(segment_values(p, offsets, segmenter, [spec.value()]))
    with pytest.raises(UserError, match="offset"):
        segment_into(np.zeros(p.shape[1:], np.uint64), p, offsets, segmenter,
                     block=(2, 3, 2))
