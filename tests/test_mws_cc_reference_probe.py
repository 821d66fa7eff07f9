"""Mutex watershed, connected components and the id-graph helpers behind them, each against a
small reference written here in plain Python (breadth-first search, dict sums, a Kruskal
loop, a brute-force mutex watershed with per-cluster mutex sets), on synthetic data made in
code. Goes beyond test_segmenters_(reference_)probe: offsets that reach past the volume and
repeated channels, the stitch's mutex watershed on ids, min_size with nearest-neighbour
channels in both directions, the float32 threshold boundary on every entry point, cc3d
numbering for 6/18/26 connectivity and any id, the compiled loops against the numpy ones,
memory layout and determinism, and `emrun segment` on a tiny float store."""

from __future__ import annotations

import itertools
from collections import deque

import numpy as np
import pytest
from scipy import ndimage

from emrun.components import components
from emrun.recipe.run import ConnectedComponents, MutexWatershed
from emrun.registry import segmenters
from emrun.segment import graph, segment_array, segment_into, segment_values, sweep
from emrun.segment.graph import Edges, compact, merge_small, union
from emrun.segment.mws import MutexSegmenter

NEAREST = ((-1, 0, 0), (0, -1, 0), (0, 0, -1))
# long-range offsets that reach past small volumes (dropped channels), a repeated channel,
# both directions along x, a positive diagonal
REACHING = ((-1, 0, 0), (0, -1, 0), (0, 0, -1), (0, 0, 1), (-3, 0, 0), (0, -4, 0),
            (0, 0, -5), (2, -2, 1), (0, -1, -1), (0, 0, -2), (0, 0, -2))
# nearest-neighbour channels in both directions along z and y, plus long-range ones
BOTH = ((-1, 0, 0), (1, 0, 0), (0, -1, 0), (0, 1, 0), (0, 0, -1), (0, -2, 0), (-2, 0, 1))


# ------------------------------------------------------------------ references


def is_nearest(o) -> bool:
    return sum(map(abs, o)) == 1


def edges_of(shape, offset):
    """(v, v + offset) for every voxel v whose partner lies inside ``shape``."""
    for v in itertools.product(*map(range, shape)):
        w = tuple(a + d for a, d in zip(v, offset, strict=True))
        if all(0 <= a < n for a, n in zip(w, shape, strict=True)):
            yield v, w


def mutex_watershed(entries, nodes):
    """Brute-force mutex watershed: ``entries`` (signed weight, a, b), taken in decreasing
    |weight| (0 never); an attractive one joins two clusters unless a mutex lies between
    them, a repulsive one puts a mutex between them. Returns node -> root."""
    parent = {n: n for n in nodes}
    mutex = {n: set() for n in nodes}

    def find(a):
        while parent[a] != a:
            a = parent[a]
        return a

    for weight, a, b in sorted(entries, key=lambda e: -abs(e[0])):
        ra, rb = find(a), find(b)
        if weight == 0 or ra == rb:
            continue
        if weight > 0:
            if rb in mutex[ra]:
                continue
            parent[rb] = ra
            for other in mutex[rb]:
                mutex[other].discard(rb)
                mutex[other].add(ra)
            mutex[ra] |= mutex.pop(rb)
            mutex[rb] = set()
        else:
            mutex[ra].add(rb)
            mutex[rb].add(ra)
    return {n: find(n) for n in nodes}


def mws_reference(p, offsets, bias, mask=None) -> np.ndarray:
    """Signed weight p - 0.5 (nearest) or p - bias (long-range), biases at float32; edges
    touching the mask unused; then each cluster's 6-connected pieces; 0 outside the mask,
    and every voxel left alone its own id."""
    shape = p.shape[1:]
    entries = []
    for c, o in enumerate(offsets):
        b = float(np.float32(0.5 if is_nearest(o) else bias))
        for v, w in edges_of(shape, o):
            if mask is None or (mask[v] and mask[w]):
                entries.append((float(p[(c, *v)]) - b, v, w))
    root = mutex_watershed(entries, list(itertools.product(*map(range, shape))))
    clusters = np.zeros(shape, np.int64)
    ids: dict = {}
    for v, r in root.items():
        if mask is None or mask[v]:
            clusters[v] = ids.setdefault(r, len(ids) + 1)
    out, top = np.zeros(shape, np.int64), 0
    for i in range(1, int(clusters.max(initial=0)) + 1):
        found, n = ndimage.label(clusters == i)
        out[found > 0] = found[found > 0] + top
        top += n
    return out


def cc_reference(p, offsets, threshold, mask=None) -> np.ndarray:
    """Breadth-first search over the nearest-neighbour edges whose affinity (float32) is
    above the threshold (compared at float32); 0 outside the mask."""
    shape = p.shape[1:]
    t = np.float32(threshold)
    adjacent: dict = {v: [] for v in itertools.product(*map(range, shape))}
    for c, o in enumerate(offsets):
        if not is_nearest(o):
            continue
        for v, w in edges_of(shape, o):
            if np.float32(p[(c, *v)]) > t and (mask is None or (mask[v] and mask[w])):
                adjacent[v].append(w)
                adjacent[w].append(v)
    out, n = np.zeros(shape, np.int64), 0
    for v in adjacent:
        if out[v] or (mask is not None and not mask[v]):
            continue
        n += 1
        out[v] = n
        queue = deque([v])
        while queue:
            a = queue.popleft()
            for b in adjacent[a]:
                if not out[b]:
                    out[b] = n
                    queue.append(b)
    return out


def merge_reference(loose, p, offsets, min_size) -> np.ndarray:
    """The documented small-segment merge on voxels: per pair of adjacent segments the mean
    of every nearest-neighbour channel's affinity between them (any direction), pairs with
    a small side in decreasing mean (ties: the lower, then higher first voxel), a pair
    joining while either of its current clusters is below min_size."""
    shape = loose.shape
    sums: dict = {}
    for c, o in enumerate(offsets):
        if not is_nearest(o):
            continue
        for v, w in edges_of(shape, o):
            a, b = int(loose[v]), int(loose[w])
            if a and b and a != b:
                entry = sums.setdefault((min(a, b), max(a, b)), [0.0, 0])
                entry[0] += float(p[(c, *v)])
                entry[1] += 1
    flat = loose.ravel()
    first = {int(i): int(np.flatnonzero(flat == i)[0]) for i in np.unique(flat) if i}
    size = {i: int((flat == i).sum()) for i in first}
    order = sorted((-(s / k), min(first[a], first[b]), max(first[a], first[b]), a, b)
                   for (a, b), (s, k) in sums.items() if min(size[a], size[b]) < min_size)
    parent = {i: i for i in first}

    def find(a):
        while parent[a] != a:
            a = parent[a]
        return a

    grown = dict(size)
    for *_, a, b in order:
        ra, rb = find(a), find(b)
        if ra == rb or min(grown[ra], grown[rb]) >= min_size:
            continue
        parent[rb] = ra
        grown[ra] += grown[rb]
    out = np.zeros(shape, np.int64)
    for v in itertools.product(*map(range, shape)):
        if loose[v]:
            out[v] = find(int(loose[v]))
    return out


def neighbours(connectivity: int):
    steps = [d for d in itertools.product((-1, 0, 1), repeat=3) if any(d)]
    most = {6: 1, 18: 2, 26: 3}[connectivity]
    return [d for d in steps if sum(map(abs, d)) <= most]


def bfs_components(labels, connectivity) -> np.ndarray:
    """Components of equal non-zero ids, numbered 1..K in raster order of first voxels."""
    out, n = np.zeros(labels.shape, np.int64), 0
    steps = neighbours(connectivity)
    for v in itertools.product(*map(range, labels.shape)):
        if labels[v] == 0 or out[v]:
            continue
        n += 1
        out[v] = n
        queue = deque([v])
        while queue:
            a = queue.popleft()
            for d in steps:
                b = tuple(x + y for x, y in zip(a, d, strict=True))
                if all(0 <= x < s for x, s in zip(b, labels.shape, strict=True)) \
                        and not out[b] and labels[b] == labels[a]:
                    out[b] = n
                    queue.append(b)
    return out


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to a bijection between the ids (0 included)."""
    pairs = np.unique(np.stack([a.ravel().astype(np.int64), b.ravel().astype(np.int64)]),
                      axis=1)
    return pairs.shape[1] == np.unique(a).size == np.unique(b).size


def contract(seg: np.ndarray, mask=None) -> bool:
    """uint64, 0 exactly outside the mask, ids 1..K."""
    inside = np.ones(seg.shape, bool) if mask is None else mask
    ids = np.unique(seg[inside])
    return (seg.dtype == np.uint64 and not (seg[~inside] != 0).any()
            and not (seg[inside] == 0).any() and ids.tolist() == list(range(1, ids.size + 1)))


def singletons(want: np.ndarray, mask=None) -> np.ndarray:
    """Voxels a reference left at 0 inside the mask, each given its own id."""
    want = want.copy()
    alone = (want == 0) if mask is None else (want == 0) & mask
    want[alone] = want.max(initial=0) + 1 + np.arange(int(alone.sum()))
    return want


def blocked(affs, offsets, spec, block, mask=None) -> np.ndarray:
    out = np.zeros(affs.shape[1:], np.uint64)
    segment_into(out, affs, offsets, segmenters.build(spec), mask=mask, block=tuple(block))
    return out


def distinct(p, offsets, bias) -> bool:
    """No two edges share |weight| (the mutex watershed's order is unique)."""
    values = np.concatenate([np.abs(p[c].astype(np.float64) - float(np.float32(
        0.5 if is_nearest(o) else bias))).ravel() for c, o in enumerate(offsets)])
    return np.unique(values).size == values.size


# ------------------------------------------------------------------ mws


def test_mws_equals_brute_force_with_channels_past_the_volume_and_repeated():
    """Volumes as thin as one section and shorter than some offsets (those channels have no
    edge and are dropped), a channel given twice, both x directions, masks, biases 0..1."""
    rng = np.random.default_rng(5)
    done = 0
    for case in range(45):
        shape = (int(rng.integers(1, 4)), int(rng.integers(2, 6)), int(rng.integers(2, 7)))
        p = rng.random((len(REACHING), *shape)).astype(np.float32)
        bias = float(rng.choice([0.0, 0.2, 0.5, 0.7, 1.0]))
        if not distinct(p, REACHING, bias):
            continue
        mask = rng.random(shape) > 0.25 if case % 3 == 0 else None
        got = segment_array(p, REACHING, segmenters.build(MutexWatershed(bias=bias)),
                            mask=mask)
        want = singletons(mws_reference(p, REACHING, bias, mask), mask)
        assert contract(got, mask), case
        assert same_partition(got, want), (case, shape, bias)
        done += 1
    assert done >= 30


def test_mws_stitch_is_a_mutex_watershed_on_ids():
    """`stitch` on random id graphs: the crossing pairs' mean weights, plus each `apart` pair
    whose mean affinity is below 0.5 (weight mean - 0.5) where both ids touch a crossing
    edge; the table maps each id to the smallest id of its cluster, untouched ids to
    themselves."""
    rng = np.random.default_rng(3)
    segmenter = MutexSegmenter(MutexWatershed())
    done = 0
    for case in range(150):
        count, m = int(rng.integers(2, 15)), int(rng.integers(1, 30))
        edges = Edges.aggregate(rng.integers(1, count + 1, m), rng.integers(1, count + 1, m),
                                rng.random(m) * 2 - 1)
        if edges.u.size == 0:
            continue
        entries = list(zip(edges.mean.tolist(), edges.u.tolist(), edges.v.tolist(),
                           strict=True))
        apart = None
        if case % 2:
            k = int(rng.integers(1, 10))
            apart = Edges.aggregate(rng.integers(1, count + 1, k),
                                    rng.integers(1, count + 1, k),
                                    rng.random(k) * 2, rng.integers(1, 3, k))
            touching = set(edges.u.tolist()) | set(edges.v.tolist())
            entries += [(mean - 0.5, a, b) for a, b, mean in
                        zip(apart.u.tolist(), apart.v.tolist(), apart.mean.tolist(),
                            strict=True)
                        if a in touching and b in touching and mean < 0.5]
        magnitudes = [abs(e[0]) for e in entries]
        if len(set(magnitudes)) < len(magnitudes):
            continue
        root = mutex_watershed(entries, range(count + 1))
        smallest: dict = {}
        for i in range(count + 1):
            smallest.setdefault(root[i], i)
        want = [smallest[root[i]] for i in range(count + 1)]
        got = segmenter.stitch(edges, count, apart)
        assert got.tolist() == want, case
        done += 1
    assert done >= 100


@pytest.mark.parametrize("spec", [MutexWatershed(bias=0.4), ConnectedComponents(threshold=0.45)],
                         ids=["mws", "cc"])
def test_min_size_with_nearest_channels_in_both_directions(spec):
    """min_size merges by the mean of every nearest-neighbour channel between two segments,
    (-1, 0, 0) and (1, 0, 0) both counting, long-range channels not: equals the voxel
    reference applied to the result without min_size (float affinities: no ties)."""
    rng = np.random.default_rng(21)
    for case in range(8):
        shape = (int(rng.integers(2, 4)), int(rng.integers(3, 7)), int(rng.integers(3, 7)))
        p = rng.random((len(BOTH), *shape)).astype(np.float32)
        mask = rng.random(shape) > 0.25 if case % 2 else None
        min_size = int(rng.integers(2, 6))
        loose = segment_array(p, BOTH, segmenters.build(spec), mask=mask)
        want = merge_reference(loose.astype(np.int64), p, BOTH, min_size)
        sized = spec.model_copy(update={"min_size": min_size})
        got = segment_array(p, BOTH, segmenters.build(sized), mask=mask)
        assert contract(got, mask) and same_partition(got, want), case
        if spec.type == "cc":  # exact stitching: block by block alike
            block = tuple(int(rng.integers(1, n + 1)) for n in shape)
            assert same_partition(blocked(p, BOTH, sized, block, mask), want), (case, block)


@pytest.mark.parametrize("spec", [MutexWatershed(bias=0.7, min_size=10**6),
                                  ConnectedComponents(threshold=0.8, min_size=10**6)],
                         ids=["mws", "cc"])
def test_min_size_beyond_the_volume_leaves_one_segment_per_mask_region(spec):
    """Every segment is small and every pair of touching ones is a graph edge, so each
    6-connected region of the mask ends as one segment (ndimage.label), in memory and in
    blocks; an all-zero mask gives zeros."""
    rng = np.random.default_rng(31)
    for case in range(6):
        shape = (int(rng.integers(1, 4)), int(rng.integers(2, 7)), int(rng.integers(2, 7)))
        p = rng.random((len(BOTH), *shape)).astype(np.float32)
        mask = rng.random(shape) > 0.45
        want, _ = ndimage.label(mask)
        got = segment_array(p, BOTH, segmenters.build(spec), mask=mask)
        assert contract(got, mask) and same_partition(got, want), case
        block = tuple(int(rng.integers(1, n + 1)) for n in shape)
        assert same_partition(blocked(p, BOTH, spec, block, mask), want), (case, block)
    nothing = np.zeros(shape, bool)
    assert not segment_array(p, BOTH, segmenters.build(spec), mask=nothing).any()
    assert not blocked(p, BOTH, spec, (1, 2, 2), nothing).any()


# ------------------------------------------------------------------ cc


def test_cc_equals_breadth_first_search_with_repeated_and_reaching_channels():
    rng = np.random.default_rng(7)
    for case in range(20):
        shape = (int(rng.integers(1, 4)), int(rng.integers(1, 6)), int(rng.integers(2, 7)))
        p = rng.random((len(REACHING), *shape)).astype(np.float32)
        mask = rng.random(shape) > 0.3 if case % 2 else None
        threshold = float(rng.choice([0.2, 0.5, 0.8]))
        spec = ConnectedComponents(threshold=threshold)
        want = singletons(cc_reference(p, REACHING, threshold, mask), mask)
        got = segment_array(p, REACHING, segmenters.build(spec), mask=mask)
        assert contract(got, mask) and same_partition(got, want), case
        block = tuple(int(rng.integers(1, n + 1)) for n in shape)
        assert same_partition(blocked(p, REACHING, spec, block, mask), want), (case, block)


@pytest.mark.parametrize("threshold", [0.3, 0.1, 0.55, 0.7, 1 / 3])
def test_threshold_and_bias_compare_at_float32_on_every_entry_point(threshold):
    """An affinity equal to the threshold at float32 is not above it (cc: no join; mws: a
    long-range weight of 0, unused); one float32 step above it is. Same in memory, block by
    block, through segment_values and sweep, and for float64 input (read as float32)."""
    t = np.float32(threshold)
    p = np.zeros((3, 1, 1, 3), np.float32)
    p[2, 0, 0, 1] = t  # x=0 - x=1: equal
    p[2, 0, 0, 2] = np.nextafter(t, np.float32(1))  # x=1 - x=2: one step above
    want = [1, 2, 2]
    spec = ConnectedComponents(threshold=threshold)
    segmenter = segmenters.build(spec)
    assert segment_array(p, NEAREST, segmenter).ravel().tolist() == want
    assert segment_array(p.astype(np.float64), NEAREST, segmenter).ravel().tolist() == want
    assert blocked(p, NEAREST, spec, (1, 1, 1)).ravel().tolist() == want
    other = segmenters.build(ConnectedComponents(threshold=0.9))
    assert next(segment_values(p, NEAREST, other, [threshold])).ravel().tolist() == want
    result = sweep(p, NEAREST, ConnectedComponents(), [threshold], np.array([[[1, 2, 2]]]),
                   workers=1)
    assert result.segmentation.ravel().tolist() == want and result.scores[0]["arand"] == 0

    # mws: nearest affinities 0.5 (weight 0), a long-range (0, 0, -2) edge x=2 -> x=0 at the
    # bias: weight 0, unused, every voxel alone; a float32 step either side weighs +/-.
    offsets = (*NEAREST, (0, 0, -2))
    q = np.full((4, 1, 1, 3), 0.5, np.float32)
    q[3, 0, 0, 2] = t
    mws = segmenters.build(MutexWatershed(bias=threshold))
    assert segment_array(q, offsets, mws).ravel().tolist() == [1, 2, 3]
    steps = np.array([np.nextafter(t, np.float32(0)), t, np.nextafter(t, np.float32(1))])
    weights = MutexSegmenter(MutexWatershed(bias=threshold)).weights(steps, (0, 0, -2))
    assert weights[0] < 0 and weights[1] == 0 and weights[2] > 0


# ------------------------------------------------------------------ ids


def test_components_equal_bfs_for_6_18_26_in_first_voxel_order():
    """emrun.components: pieces of equal non-zero ids for every connectivity, numbered in
    raster order of first voxels, for ids of any integer dtype (uint64 at and above 2**63,
    thin volumes included)."""
    rng = np.random.default_rng(0)
    pool = np.array([0, 1, 2, 2**63, 2**64 - 1, 2**63 + 5], np.uint64)
    shapes = [(1, 1, 6), (6, 1, 1), (1, 5, 1), (2, 3, 4), (4, 4, 4), (3, 1, 5)]
    for case, shape in enumerate(shapes * 3):
        labels = pool[rng.integers(0, pool.size, shape)]
        for dtype in (np.uint64, np.int64, np.uint32, np.uint8):
            ids = labels if dtype == np.uint64 else (labels % np.uint64(200)).astype(dtype)
            for connectivity in (6, 18, 26):
                got = components(ids, connectivity)
                assert np.array_equal(got.astype(np.int64), bfs_components(ids, connectivity)
                                      ), (case, dtype, connectivity)


def test_compact_union_and_aggregate_against_plain_python():
    rng = np.random.default_rng(1)
    for case in range(16):  # compact: 1..K in increasing order of the old ids, uint64
        pool = (np.array([0, 3, 7, 2**40, 2**63 + 1, 2**64 - 2], np.uint64) if case % 2 else
                np.array([0, 1, 5, 9, 40], np.uint64))
        labels = pool[rng.integers(0, pool.size, (3, 4, 5))]
        got, k = compact(labels)
        present = sorted(set(labels.ravel().tolist()) - {0})
        want = [0 if x == 0 else present.index(x) + 1 for x in labels.ravel().tolist()]
        assert got.dtype == np.uint64 and k == len(present), case
        assert got.ravel().tolist() == want, case
    for case in range(16):  # union: each id -> the smallest id of its component
        count, m = int(rng.integers(1, 20)), int(rng.integers(0, 15))
        u, v = rng.integers(1, count + 1, m), rng.integers(1, count + 1, m)
        parent = list(range(count + 1))
        for a, b in zip(u.tolist(), v.tolist(), strict=True):
            ra, rb = parent[a], parent[b]
            parent = [min(ra, rb) if x in (ra, rb) else x for x in parent]
        assert union(count, u, v).tolist() == parent, case
    for case in range(16):  # aggregate: sums and counts per unordered pair, sorted, no loops
        n, top = int(rng.integers(1, 60)), int(rng.integers(1, 12))
        scale = 4_000_000_000 if case % 3 == 0 else 1  # the wide (rows) path
        u, v = rng.integers(0, top, n) * scale, rng.integers(0, top, n) * scale
        w, c = rng.random(n), rng.integers(1, 4, n)
        sums: dict = {}
        for a, b, x, k in zip(u.tolist(), v.tolist(), w.tolist(), c.tolist(), strict=True):
            if a != b:
                entry = sums.setdefault((min(a, b), max(a, b)), [0.0, 0])
                entry[0] += x
                entry[1] += k
        e = Edges.aggregate(u, v, w, c)
        keys = sorted(sums)
        assert list(zip(e.u.tolist(), e.v.tolist(), strict=True)) == keys, case
        assert np.allclose(e.total, [sums[k][0] for k in keys]), case
        assert e.count.tolist() == [sums[k][1] for k in keys], case


def test_compiled_loops_equal_the_numpy_and_python_ones(monkeypatch):
    """graph's compiled (numba) aggregate and merge give bit for bit what the numpy/Python
    loops give, and both equal a Kruskal reference of merge_small's documented rule (ties in
    mean by the pair's ranks, lower first)."""
    rng = np.random.default_rng(2)

    def both(call):
        monkeypatch.setattr(graph, "COMPILED_FROM", 10**12)
        plain = call()
        monkeypatch.setattr(graph, "COMPILED_FROM", 0)
        compiled = call()
        monkeypatch.setattr(graph, "COMPILED_FROM", 10**12)
        return plain, compiled

    for case in range(8):
        n, top = int(rng.integers(5, 300)), int(rng.integers(2, 40))
        u, v = rng.integers(0, top, n), rng.integers(0, top, n)
        w, c = rng.random(n), rng.integers(1, 4, n)
        a, b = both(lambda u=u, v=v, w=w, c=c: Edges.aggregate(u, v, w, c))
        for field in ("u", "v", "total", "count"):
            assert np.array_equal(getattr(a, field), getattr(b, field)), (case, field)
    for case in range(30):
        n, m = int(rng.integers(2, 30)), int(rng.integers(1, 80))
        sizes = rng.integers(1, 8, n)
        sizes[0] = 0
        edges = Edges.aggregate(rng.integers(1, n, m), rng.integers(1, n, m),
                                rng.integers(0, 4, m).astype(float))  # many tied means
        if edges.u.size == 0:
            continue
        min_size = int(rng.integers(2, 10))
        rank = rng.permutation(n) if case % 2 else np.arange(n)
        key = rank.tolist()
        order = sorted((-mean, min(key[a], key[b]), max(key[a], key[b]), i, a, b)
                       for i, (a, b, mean) in enumerate(zip(
                           edges.u.tolist(), edges.v.tolist(), edges.mean.tolist(),
                           strict=True)) if min(sizes[a], sizes[b]) < min_size)
        parent, size = list(range(n)), sizes.tolist()

        def find(a, parent=parent):
            while parent[a] != a:
                a = parent[a]
            return a

        for *_, a, b in order:
            ra, rb = find(a), find(b)
            if ra == rb or min(size[ra], size[rb]) >= min_size:
                continue
            if size[ra] < size[rb] or (size[ra] == size[rb] and rb < ra):
                ra, rb = rb, ra
            parent[rb] = ra
            size[ra] += size[rb]
        want = [find(i) for i in range(n)]
        plain, compiled = both(lambda s=sizes, e=edges, k=min_size, r=rank:
                               merge_small(s, e, k, rank=r))
        assert plain.tolist() == want and compiled.tolist() == want, case


@pytest.mark.parametrize("spec", [MutexWatershed(bias=0.4, min_size=3), MutexWatershed(),
                                  ConnectedComponents(threshold=0.5, min_size=2),
                                  ConnectedComponents()], ids=["mws3", "mws", "cc2", "cc"])
def test_ids_do_not_depend_on_memory_layout_or_the_run(spec):
    """Deterministic ids: the same values in Fortran order, as a strided view, as uint8
    twice, or block by block in one block give the very same array."""
    rng = np.random.default_rng(4)
    offsets = (*NEAREST, (0, 0, -3), (0, -2, 0))
    p = rng.random((len(offsets), 3, 5, 6)).astype(np.float32)
    mask = rng.random((3, 5, 6)) > 0.2
    segmenter = segmenters.build(spec)
    want = segment_array(p, offsets, segmenter, mask=mask)
    assert contract(want, mask)
    wide = np.zeros((len(offsets), 3, 10, 6), np.float32)
    wide[:, :, ::2] = p
    for affs, m in ((np.asfortranarray(p), np.asfortranarray(mask)), (wide[:, :, ::2], mask)):
        assert np.array_equal(segment_array(affs, offsets, segmenter, mask=m), want)
    assert np.array_equal(blocked(np.asfortranarray(p), offsets, spec, (3, 5, 6), mask), want)
    stored = np.round(p * 255).astype(np.uint8)
    first = segment_array(stored, offsets, segmenter, mask=mask)
    assert np.array_equal(segment_array(stored.copy(), offsets, segmenter, mask=mask), first)


@pytest.mark.parametrize(("shape", "offsets"), [
    ((1, 1, 1), NEAREST), ((1, 1, 1), ((0, 0, -2),)), ((1, 1, 2), ((0, 0, -1), (0, 0, -4))),
    ((2, 1, 1), ((1, 0, 0),)), ((1, 3, 1), ((0, 1, 0), (0, -1, 0))),
])
@pytest.mark.parametrize("spec", [MutexWatershed(), ConnectedComponents(),
                                  MutexWatershed(min_size=2)], ids=["mws", "cc", "mws2"])
def test_volumes_too_small_for_their_offsets(shape, offsets, spec):
    """Every channel (or every long-range one) past the volume: high affinities join what
    has an edge, a lone voxel is id 1; in memory and in blocks of one voxel."""
    p = np.full((len(offsets), *shape), 0.9, np.float32)
    want = np.ones(shape, np.uint64)
    assert np.array_equal(segment_array(p, offsets, segmenters.build(spec)), want)
    assert np.array_equal(blocked(p, offsets, spec, (1, 1, 1)), want)


# ------------------------------------------------------------------ the command


def test_cli_segment_of_a_float_store_equals_the_references(tmp_path):
    """`emrun segment` on a tiny float32 store with an offsets attribute (long-range,
    positive and diagonal ones): every --bias value equals the brute-force mutex
    watershed, --threshold the breadth-first search; uint64 ids 1..K."""
    from typer.testing import CliRunner

    from emrun.cli import app
    from emrun.io import open_volume, write_volume

    offsets = ((-1, 0, 0), (0, -1, 0), (0, 0, -1), (0, 0, 1), (-2, 0, 0), (0, -3, 0),
               (0, -1, -1))
    rng = np.random.default_rng(9)
    shape = (3, 5, 6)
    p = rng.random((len(offsets), *shape)).astype(np.float32)
    assert distinct(p, offsets, 0.3) and distinct(p, offsets, 0.8)
    write_volume(tmp_path / "a.zarr", "aff", p, channel_axis=True,
                 attrs={"offsets": [list(o) for o in offsets]})
    runner = CliRunner()
    source, out = f"{tmp_path}/a.zarr/aff", str(tmp_path / "o.zarr")
    result = runner.invoke(app, ["segment", source, out, "--bias", "0.3,0.8", "--levels", "1"])
    assert result.exit_code == 0, result.output
    for bias in (0.3, 0.8):
        seg = open_volume(tmp_path / "o.zarr" / f"segmentation_{bias}").read()
        assert contract(seg), bias
        assert same_partition(seg, singletons(mws_reference(p, offsets, bias))), bias
    result = runner.invoke(app, ["segment", source, out, "--method", "cc", "--threshold",
                                 "0.4", "--name", "cc", "--levels", "1", "--block", "2", "3",
                                 "4"])
    assert result.exit_code == 0, result.output
    seg = open_volume(tmp_path / "o.zarr" / "cc").read()
    assert contract(seg) and same_partition(seg, cc_reference(p, offsets, 0.4))
