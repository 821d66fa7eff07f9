"""`emrun segment --scheduler local` beyond the fragments (emrun/segment/scale/: the region
graph, `--agglomeration global` and `blockwise`, min_size, the mask, the relabelling) against
small references written here from the README's "At scale" section: the region graph by a
loop over every nearest-neighbour voxel pair of the fragments emrun wrote (the affinity read
at the pair's first voxel), the agglomeration as a loop that re-scores every pair of touching
regions from the original voxel pairs (1 - mean affinity, or 1 - the 85th percentile read
from a 32-bin histogram) and merges the lowest while it scores below the threshold, the
blockwise variant block by block from its documented neighbourhood, and the min-size merge
as Kruskal's algorithm with a size condition. Affinities are random floats (no ties), on
volumes of a few hundred voxels made in code."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from emrun.cli import app
from emrun.io import write_volume

NEAREST = ((-1, 0, 0), (0, -1, 0), (0, 0, -1))
SHAPE = (4, 12, 12)
BINS = 32
THRESHOLDS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
TIE = 1e-9

runner = CliRunner()


# --- data ---------------------------------------------------------------------------------

def objects(shape=SHAPE) -> np.ndarray:
    """Four boxes side by side in y and x, the full depth."""
    _, y, x = np.indices(shape)
    return 1 + (y >= shape[1] // 2) * 2 + (x >= shape[2] // 2)


def noisy_affinities(seed: int, shape=SHAPE, offsets=NEAREST) -> np.ndarray:
    """Float affinities, random in [0.3, 1) inside an object and [0, 0.5) across a boundary
    (channel c links v and v + NEAREST[c]): noisy enough for a few dozen fragments."""
    rng = np.random.default_rng(seed)
    truth = objects(shape)
    affs = np.zeros((len(offsets), *shape), np.float32)
    for c, offset in enumerate(offsets):
        here = tuple(slice(max(-d, 0), n - max(d, 0)) for d, n in zip(offset, shape,
                                                                      strict=True))
        there = tuple(slice(max(d, 0), n - max(-d, 0) if d < 0 else n) for d, n in
                      zip(offset, shape, strict=True))
        same = np.zeros(shape, bool)
        same[here] = truth[here] == truth[there]
        inside = rng.uniform(0.3, 1.0, shape)
        across = rng.uniform(0.0, 0.5, shape)
        affs[c] = np.where(same, inside, across)
    return affs


def write_affinities(folder: Path, affs: np.ndarray, recipe: dict | None = None,
                     offsets=NEAREST) -> str:
    write_volume(folder / "in.zarr", "affinity", affs, channel_axis=True,
                 attrs={"offsets": [list(o) for o in offsets]})
    if recipe is not None:
        zarr.open_group(str(folder / "in.zarr"), mode="r+").attrs["emrun"] = {
            "recipe": {"name": "probe", "segment": recipe}}
    return str(folder / "in.zarr/affinity")


def run(affs_path: str, out: Path, *extra: str, thresholds=THRESHOLDS) -> None:
    result = runner.invoke(app, [
        "segment", affs_path, str(out), "--scheduler", "local", "--levels", "1",
        "--threshold", ",".join(f"{t:g}" for t in thresholds), *extra])
    assert result.exit_code == 0, result.output


def level0(out: Path, name: str) -> np.ndarray:
    return zarr.open_array(str(out / "labels" / name / "0"), mode="r")[...]


def segmentations(out: Path, thresholds=THRESHOLDS) -> dict[float, np.ndarray]:
    if len(thresholds) == 1:
        return {thresholds[0]: level0(out, "segmentation")}
    return {t: level0(out, f"segmentation_{t:g}") for t in thresholds}


# --- the references -----------------------------------------------------------------------

def reference_rag(fragments: np.ndarray, affs: np.ndarray, offsets=NEAREST
                  ) -> tuple[dict, dict]:
    """Node sizes {id: voxels} and edges {(a, b): [affinities]} (a < b): every voxel v and
    nearest-neighbour channel c whose partner w = v + offset is in the volume, fragments
    differing, neither 0, adds affs[c][v] to the pair (long-range channels take no part)."""
    sizes: dict[int, int] = {}
    for value in fragments.ravel().tolist():
        if value:
            sizes[value] = sizes.get(value, 0) + 1
    edges: dict[tuple[int, int], list[float]] = {}
    for c, offset in enumerate(offsets):
        if sum(abs(d) for d in offset) != 1:
            continue
        for v in np.ndindex(fragments.shape):
            w = tuple(a + d for a, d in zip(v, offset, strict=True))
            if min(w) < 0 or any(a >= n for a, n in zip(w, fragments.shape, strict=True)):
                continue
            a, b = int(fragments[v]), int(fragments[w])
            if a == b or not a or not b:
                continue
            edges.setdefault((min(a, b), max(a, b)), []).append(float(affs[c][v]))
    return sizes, edges


def histogram_quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile read from a BINS-bin histogram of ``values`` over [0, 1] (value p
    in bin min(floor(p * BINS), BINS - 1)), linear inside the bin that reaches q * count."""
    hist = [0] * BINS
    for p in values:
        hist[min(int(p * BINS), BINS - 1)] += 1
    target = q * len(values)
    below = 0
    for k, n in enumerate(hist):
        if below + n >= target and n > 0:
            return (k + (target - below) / n) / BINS
        below += n
    raise AssertionError("unreachable")


def score_of(values: list[float], scoring: str) -> float:
    if scoring == "mean":
        return 1.0 - math.fsum(values) / len(values)
    return 1.0 - histogram_quantile(values, 0.85)


def values_between(region: dict, edges: dict) -> dict[tuple, list[float]]:
    """The voxel pairs' values between each two touching regions (``region``: node ->
    frozenset of nodes), keyed by the pair, the region of the smaller node first."""
    pairs: dict[tuple, list[float]] = {}
    for (a, b), values in edges.items():
        ra, rb = region[a], region[b]
        if ra != rb:
            key = (ra, rb) if min(ra) < min(rb) else (rb, ra)
            pairs.setdefault(key, []).extend(values)
    return pairs


def reference_merges(nodes, edges: dict, top: float, scoring: str = "mean"
                     ) -> list[tuple[float, frozenset, frozenset]]:
    """Hierarchical agglomeration by the definition: at each step every pair of touching
    regions is scored from all the voxel pairs between them, and the lowest merges unless it
    scores ``top`` or more. Returns the merges (score, region, region). Asserts that no two
    candidates tie (the data are random floats), so the order is the only one."""
    region = {i: frozenset([i]) for i in nodes}
    merges = []
    while True:
        pairs = values_between(region, edges)
        scored = sorted((score_of(vals, scoring), min(k[0]), k) for k, vals in pairs.items())
        if not scored or scored[0][0] >= top:
            return merges
        if len(scored) > 1:
            assert scored[1][0] - scored[0][0] > TIE, "a tie: choose other data"
        s, _, (ra, rb) = scored[0]
        merges.append((s, ra, rb))
        joined = ra | rb
        for i in joined:
            region[i] = joined


def reference_partitions(nodes, edges: dict, threshold: float, scoring: str) -> set:
    """Every partition the definition can end at when scores tie (p85 scores read from
    histograms of a few values tie often): every order the ties allow is followed."""
    ends: set = set()
    seen: set = set()
    todo = [frozenset(frozenset([i]) for i in nodes)]
    while todo:
        state = todo.pop()
        if state in seen:
            continue
        seen.add(state)
        region = {i: r for r in state for i in r}
        pairs = values_between(region, edges)
        scores = {k: score_of(vals, scoring) for k, vals in pairs.items()}
        best = min(scores.values(), default=math.inf)
        if best >= threshold:
            ends.add(state)
            continue
        todo.extend(state - {ra, rb} | {ra | rb} for (ra, rb), s in scores.items()
                    if s <= best + TIE)
    return ends


def partition_at(nodes, merges, threshold: float) -> frozenset:
    """The regions after the merges before the first scoring ``threshold`` or more."""
    region = {i: frozenset([i]) for i in nodes}
    for s, ra, rb in merges:
        if s >= threshold:
            break
        joined = region[min(ra)] | region[min(rb)]
        for i in joined:
            region[i] = joined
    return frozenset(region.values())


def components(nodes, pairs) -> frozenset:
    parent = {i: i for i in nodes}

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, set] = {}
    for i in nodes:
        groups.setdefault(find(i), set()).add(i)
    return frozenset(frozenset(g) for g in groups.values())


def merge_small(partition: frozenset, sizes: dict, edges: dict, min_size: int) -> frozenset:
    """README: a segment smaller than min_size merges into the neighbour with which it has
    the highest mean affinity: segment pairs by decreasing mean affinity (summed over the
    voxel pairs between them), joined while either side is still small."""
    seg_of = {i: s for s in partition for i in s}
    between = values_between(seg_of, edges)
    order = sorted(between.items(), key=lambda kv: -math.fsum(kv[1]) / len(kv[1]))
    means = [math.fsum(v) / len(v) for _, v in order]
    assert all(x - y > TIE for x, y in itertools.pairwise(means)), "a tie"
    parent = {s: s for s in partition}
    size = {s: sum(sizes[i] for i in s) for s in partition}

    def find(s):
        while parent[s] != s:
            s = parent[s]
        return s

    for (sa, sb), _ in order:
        ra, rb = find(sa), find(sb)
        if ra == rb or (size[ra] >= min_size and size[rb] >= min_size):
            continue
        if size[ra] < size[rb]:
            ra, rb = rb, ra
        parent[rb] = ra
        size[ra] += size[rb]
    groups: dict = {}
    for s in partition:
        groups.setdefault(find(s), set()).update(s)
    return frozenset(frozenset(g) for g in groups.values())


def blockwise_reference(fragments: np.ndarray, sizes: dict, edges: dict, block,
                        thresholds) -> dict[float, frozenset]:
    """README, step 3, blockwise: each block takes its own fragments, those whose centre
    lies within half a block of its faces, and every fragment touching its own; agglomerates
    that graph to the end (while the lowest score is below 1); stores, for each edge it owns
    (the lower id is its own), the largest merge score up to the merge that joined its ends.
    A threshold's segments: the components of the edges whose level is below it."""
    coords: dict[int, list] = {}
    for v in np.ndindex(fragments.shape):
        if fragments[v]:
            coords.setdefault(int(fragments[v]), []).append(v)
    centre = {i: np.mean(np.array(c, float), axis=0) for i, c in coords.items()}
    home = {i: tuple(c[0][a] // block[a] for a in range(3)) for i, c in coords.items()}
    for i, c in coords.items():  # a fragment lies in one block (ids are per block)
        assert {tuple(p[a] // block[a] for a in range(3)) for p in c} == {home[i]}
    half = [math.ceil(b / 2) for b in block]
    touching: dict[int, set] = {i: set() for i in sizes}
    for a, b in edges:
        touching[a].add(b)
        touching[b].add(a)
    levels: dict[tuple[int, int], float] = {}
    for index in sorted(set(home.values())):
        own = {i for i in sizes if home[i] == index}
        low = [index[a] * block[a] - half[a] for a in range(3)]
        high = [(index[a] + 1) * block[a] + half[a] for a in range(3)]
        near = {i for i in sizes if all(low[a] <= centre[i][a] < high[a] for a in range(3))}
        taken = own | near | {j for i in own for j in touching[i]}
        sub = {k: vals for k, vals in edges.items() if k[0] in taken and k[1] in taken}
        merges = reference_merges(sorted(taken), sub, 1.0)
        region = {i: frozenset([i]) for i in taken}
        running = -math.inf
        for s, ra, rb in merges:
            running = max(running, s)
            a_side, b_side = region[min(ra)], region[min(rb)]
            for a, b in sub:
                if a in own and ((a in a_side and b in b_side) or (a in b_side and b in a_side)):
                    levels[(a, b)] = running
            joined = a_side | b_side
            for i in joined:
                region[i] = joined
    return {t: components(sorted(sizes), [k for k, lv in levels.items() if lv < t])
            for t in thresholds}


# --- emrun's side, read back --------------------------------------------------------------

def partition_of(fragments: np.ndarray, seg: np.ndarray) -> frozenset:
    """The fragments grouped by segment; each fragment lies in exactly one segment."""
    assert np.array_equal(seg == 0, fragments == 0)
    segment_of: dict[int, int] = {}
    for f, s in zip(fragments.ravel().tolist(), seg.ravel().tolist(), strict=True):
        if f:
            assert segment_of.setdefault(f, s) == s, f"fragment {f} in two segments"
    groups: dict[int, set] = {}
    for f, s in segment_of.items():
        groups.setdefault(s, set()).add(f)
    return frozenset(frozenset(g) for g in groups.values())


def shown(partition: frozenset) -> list[list[int]]:
    return sorted(sorted(r) for r in partition)


def assert_numbered(seg: np.ndarray) -> None:
    """README: ids are numbered 1..K."""
    found = np.unique(seg[seg != 0])
    assert found.tolist() == list(range(1, found.size + 1))


# --- tests --------------------------------------------------------------------------------

@pytest.mark.parametrize("block", [(2, 6, 6), (3, 5, 7), (4, 12, 12)],
                         ids=["2x6x6", "3x5x7", "one-block"])
def test_global_agglomeration_is_the_reference_on_its_own_fragments(tmp_path, block):
    """Global (the default) at five thresholds, on a grid of blocks (ragged too): each
    segmentation_T is, fragment for fragment, the reference agglomeration of the reference
    graph of the fragments emrun wrote, numbered 1..K; the partitions coarsen as T grows."""
    affs = noisy_affinities(1)
    out = tmp_path / "out.zarr"
    run(write_affinities(tmp_path, affs), out, "--workers", "1", "--block", *map(str, block))
    fragments = level0(out, "fragments")
    sizes, edges = reference_rag(fragments, affs)
    assert len(sizes) >= 15
    merges = reference_merges(sorted(sizes), edges, max(THRESHOLDS))
    previous = None
    for t, seg in segmentations(out).items():
        assert_numbered(seg)
        got = partition_of(fragments, seg)
        want = partition_at(sorted(sizes), merges, t)
        assert got == want, (t, shown(got), shown(want))
        if previous is not None:  # every earlier segment lies in one of these
            assert all(any(r <= g for g in got) for r in previous)
        previous = got
    # the four boxes (mean affinity about 0.65 inside, 0.25 across their faces) at 0.7
    seg = segmentations(out)[0.7]
    truth = objects()
    assert np.unique(seg).size == 4
    assert all(np.unique(seg[truth == k]).size == 1 for k in range(1, 5))


def test_one_and_two_workers_write_the_same_volumes(tmp_path):
    """The worker count decides who does a block, not what it holds: fragments and every
    segmentation bit for bit the same with 1 and 2 workers (global; blockwise is checked
    against its reference with 1 worker, the spawned workers costing seconds each)."""
    affs_path = write_affinities(tmp_path, noisy_affinities(2))
    got = {}
    for workers in ("1", "2"):
        out = tmp_path / f"{workers}.zarr"
        run(affs_path, out, "--workers", workers, "--block", "2", "6", "6")
        got[workers] = [level0(out, "fragments"), *segmentations(out).values()]
    for a, b in zip(got["1"], got["2"], strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("block", [(2, 6, 6), (2, 4, 4), (3, 5, 5)],
                         ids=["2x6x6", "2x4x4", "3x5x5"])
def test_blockwise_is_the_documented_per_block_agglomeration(tmp_path, block):
    """Blockwise on a grid of blocks: each segmentation_T is the components of the edges
    whose join level (from each owning block's own agglomeration of its documented
    neighbourhood) is below T, worked out here by the definition. "Half a block" is
    ceil(block / 2) voxels (odd blocks: half a voxel more than half), centres taken in
    [first voxel - that, last voxel + 1 + that)."""
    affs = noisy_affinities(3)
    out = tmp_path / "out.zarr"
    run(write_affinities(tmp_path, affs), out, "--workers", "1", "--block", *map(str, block),
        "--agglomeration", "blockwise")
    fragments = level0(out, "fragments")
    sizes, edges = reference_rag(fragments, affs)
    want = blockwise_reference(fragments, sizes, edges, block, THRESHOLDS)
    for t, seg in segmentations(out).items():
        assert_numbered(seg)
        got = partition_of(fragments, seg)
        assert got == want[t], (t, shown(got), shown(want[t]))


def test_blockwise_with_one_block_is_the_global_result(tmp_path):
    """README: with one block holding the whole graph, blockwise is exactly global."""
    affs_path = write_affinities(tmp_path, noisy_affinities(4))
    results = {}
    for how in ("global", "blockwise"):
        out = tmp_path / f"{how}.zarr"
        run(affs_path, out, "--workers", "1", "--block", "4", "12", "12",
            "--agglomeration", how)
        results[how] = segmentations(out)
    fragments = level0(tmp_path / "global.zarr", "fragments")
    assert np.array_equal(fragments, level0(tmp_path / "blockwise.zarr", "fragments"))
    for t in THRESHOLDS:  # the same partition (numbered apart: global by merge roots)
        a = partition_of(fragments, results["global"][t])
        assert a == partition_of(fragments, results["blockwise"][t]), t


@pytest.mark.parametrize("how", ["global", "blockwise"])
def test_min_size_merges_small_segments_into_their_best_neighbour(tmp_path, how):
    """--min-size 40: each threshold's partition (global: the reference agglomeration;
    blockwise: the reference join levels) then the small ones merged by decreasing mean
    affinity; and no segment below 40 voxels keeps a neighbour (README)."""
    affs = noisy_affinities(5)
    out = tmp_path / "out.zarr"
    block = (2, 6, 6)
    run(write_affinities(tmp_path, affs), out, "--workers", "1", "--block", *map(str, block),
        "--agglomeration", how, "--min-size", "40")
    fragments = level0(out, "fragments")
    sizes, edges = reference_rag(fragments, affs)
    if how == "global":
        merges = reference_merges(sorted(sizes), edges, max(THRESHOLDS))
        before = {t: partition_at(sorted(sizes), merges, t) for t in THRESHOLDS}
    else:
        before = blockwise_reference(fragments, sizes, edges, block, THRESHOLDS)
    small = 0
    for t, seg in segmentations(out).items():
        assert_numbered(seg)
        got = partition_of(fragments, seg)
        want = merge_small(before[t], sizes, edges, 40)
        assert got == want, (t, shown(got), shown(want))
        for s in got:
            if sum(sizes[i] for i in s) < 40:
                assert not any((a in s) != (b in s) for a, b in edges), (t, sorted(s))
        small += sum(sum(sizes[i] for i in s) < 40 for s in before[t])
    assert small  # the merge had work to do


@pytest.mark.parametrize("how", ["global", "blockwise"])
def test_a_mask_leaves_0_exactly_outside_and_the_graph_stays_inside(tmp_path, how):
    """A mask cutting out a slab in x and a corner: fragments and every segmentation are 0
    exactly outside it and non-zero inside; the agglomeration is still the reference's on
    the masked fragments (no edge reaches a masked voxel)."""
    affs = noisy_affinities(6)
    mask = np.ones(SHAPE, np.uint8)
    mask[:, :, 5] = 0
    mask[:2, :3, 8:] = 0
    write_volume(tmp_path / "m.zarr", "mask", mask)
    out = tmp_path / "out.zarr"
    block = (2, 6, 6)
    run(write_affinities(tmp_path, affs), out, "--workers", "1", "--block", *map(str, block),
        "--agglomeration", how, "--mask", str(tmp_path / "m.zarr/mask"))
    fragments = level0(out, "fragments")
    assert np.array_equal(fragments != 0, mask != 0)
    sizes, edges = reference_rag(fragments, affs)
    if how == "global":
        merges = reference_merges(sorted(sizes), edges, max(THRESHOLDS))
        want = {t: partition_at(sorted(sizes), merges, t) for t in THRESHOLDS}
    else:
        want = blockwise_reference(fragments, sizes, edges, block, THRESHOLDS)
    for t, seg in segmentations(out).items():
        assert np.array_equal(seg != 0, mask != 0), t
        assert_numbered(seg)
        got = partition_of(fragments, seg)
        assert got == want[t], (t, shown(got), shown(want[t]))


def test_p85_scoring_from_a_recorded_recipe_is_the_histogram_reference(tmp_path):
    """A recorded waterz recipe with `scoring: p85` (README: 1 - the 85th percentile, read
    from the edge's 32-bin histogram, histograms summed when edges merge): each
    segmentation_T is the reference agglomeration by that score."""
    affs = noisy_affinities(7)
    recipe = {"type": "waterz", "scoring": "p85", "thresholds": [0.5], "min_size": 0}
    out = tmp_path / "out.zarr"
    run(write_affinities(tmp_path, affs, recipe), out, "--workers", "1", "--block", "2", "6",
        "6")
    fragments = level0(out, "fragments")
    sizes, edges = reference_rag(fragments, affs)
    mean_merges = reference_merges(sorted(sizes), edges, max(THRESHOLDS), "mean")
    differs = False
    for t, seg in segmentations(out).items():
        got = partition_of(fragments, seg)
        allowed = reference_partitions(sorted(sizes), edges, t, "p85")
        assert got in allowed, (t, shown(got), [shown(p) for p in allowed])
        differs |= partition_at(sorted(sizes), mean_merges, t) not in allowed
    assert differs  # the data tell the two scorings apart


def test_one_threshold_writes_segmentation_and_several_name_each(tmp_path):
    """One --threshold: OUT.zarr/labels/segmentation; several: segmentation_T for each
    (README: `segmentation_0.3`, ...), and the single one equals its namesake among many."""
    affs_path = write_affinities(tmp_path, noisy_affinities(8))
    one, many = tmp_path / "one.zarr", tmp_path / "many.zarr"
    run(affs_path, one, "--workers", "1", "--block", "2", "6", "6", thresholds=(0.3,))
    run(affs_path, many, "--workers", "1", "--block", "2", "6", "6",
        thresholds=(0.7, 0.3))
    names = sorted(p.name for p in (many / "labels").iterdir() if p.is_dir())
    assert names == ["fragments", "segmentation_0.3", "segmentation_0.7"]
    assert np.array_equal(level0(one, "segmentation"), level0(many, "segmentation_0.3"))


OTHER_OFFSETS = {
    "pointing-up": ((1, 0, 0), (0, 1, 0), (0, 0, 1)),
    "x-y-z-order": ((0, 0, -1), (0, -1, 0), (-1, 0, 0)),
    "with-long-range": ((-1, 0, 0), (0, -1, 0), (0, 0, -1), (-2, 0, 0), (0, -3, 0),
                        (0, 0, 4)),
}


@pytest.mark.parametrize("name", sorted(OTHER_OFFSETS))
def test_other_offsets_give_the_reference_graph_and_agglomeration(tmp_path, name):
    """Offsets pointing up (the margin on the upper faces), channels in another order, and
    long-range channels beside the nearest ones (their values here are noise: they must
    take no part in the graph): each segmentation_T is the reference agglomeration of the
    reference graph (affinity at the pair's first voxel v, partner v + offset)."""
    offsets = OTHER_OFFSETS[name]
    affs = noisy_affinities(9, offsets=offsets)
    if len(offsets) > 3:
        affs[3:] = np.random.default_rng(0).random(affs[3:].shape)
    out = tmp_path / "out.zarr"
    run(write_affinities(tmp_path, affs, offsets=offsets), out, "--workers", "1",
        "--block", "2", "6", "6")
    fragments = level0(out, "fragments")
    sizes, edges = reference_rag(fragments, affs, offsets)
    merges = reference_merges(sorted(sizes), edges, max(THRESHOLDS))
    for t, seg in segmentations(out).items():
        got = partition_of(fragments, seg)
        want = partition_at(sorted(sizes), merges, t)
        assert got == want, (t, shown(got), shown(want))


def test_uint8_affinities_are_read_as_k_over_255(tmp_path):
    """uint8 affinities (inference output): the graph's affinities are k / 255; with only
    256 values scores tie, so emrun's partition must be one the reference can end at."""
    affs8 = np.round(noisy_affinities(10) * 255).astype(np.uint8)
    affs = affs8.astype(np.float32) / np.float32(255)
    out = tmp_path / "out.zarr"
    run(write_affinities(tmp_path, affs8), out, "--workers", "1", "--block", "2", "6", "6",
        thresholds=(0.3, 0.5, 0.7))
    fragments = level0(out, "fragments")
    sizes, edges = reference_rag(fragments, affs)
    for t, seg in segmentations(out, (0.3, 0.5, 0.7)).items():
        got = partition_of(fragments, seg)
        allowed = reference_partitions(sorted(sizes), edges, t, "mean")
        assert got in allowed, (t, shown(got), [shown(p) for p in allowed])


def test_one_section_without_a_z_channel(tmp_path):
    """README: affinities of one section (z = 1) may leave out the z channel; blocks of
    1 x 6 x 6: the reference graph and agglomeration on the fragments emrun wrote."""
    offsets = ((0, -1, 0), (0, 0, -1))
    shape = (1, 12, 12)
    affs = noisy_affinities(11, shape=shape, offsets=offsets)
    affs_path = write_affinities(tmp_path, affs, offsets=offsets)
    for how in ("global", "blockwise"):
        out = tmp_path / f"{how}.zarr"
        run(affs_path, out, "--workers", "1",
            "--block", "1", "6", "6", "--agglomeration", how)
        fragments = level0(out, "fragments")
        assert fragments.shape == shape and fragments.all()
        sizes, edges = reference_rag(fragments, affs, offsets)
        if how == "global":
            merges = reference_merges(sorted(sizes), edges, max(THRESHOLDS))
            want = {t: partition_at(sorted(sizes), merges, t) for t in THRESHOLDS}
        else:
            want = blockwise_reference(fragments, sizes, edges, (1, 6, 6), THRESHOLDS)
        for t, seg in segmentations(out).items():
            got = partition_of(fragments, seg)
            assert got == want[t], (how, t, shown(got), shown(want[t]))


@pytest.mark.parametrize("how", ["global", "blockwise"])
def test_a_resume_at_another_threshold_agglomerates_the_same_graph(tmp_path, how):
    """README: `--resume --threshold 0.9 --name seg_0.9` agglomerates the graph again at
    another threshold: the new volume is the reference at that threshold, the first run's
    volumes are untouched."""
    affs = noisy_affinities(12)
    affs_path = write_affinities(tmp_path, affs)
    out = tmp_path / "out.zarr"
    block = (2, 6, 6)
    run(affs_path, out, "--workers", "1", "--block", *map(str, block), "--agglomeration", how,
        thresholds=(0.3, 0.5))
    before = segmentations(out, (0.3, 0.5))
    run(affs_path, out, "--workers", "1", "--resume", "--name", "again",
        thresholds=(0.45, 0.7))
    fragments = level0(out, "fragments")
    sizes, edges = reference_rag(fragments, affs)
    if how == "global":
        merges = reference_merges(sorted(sizes), edges, 1.0)
        want = {t: partition_at(sorted(sizes), merges, t) for t in (0.3, 0.45, 0.5, 0.7)}
    else:
        want = blockwise_reference(fragments, sizes, edges, block, (0.3, 0.45, 0.5, 0.7))
    for t in (0.45, 0.7):
        got = partition_of(fragments, level0(out, f"again_{t:g}"))
        assert got == want[t], (t, shown(got), shown(want[t]))
    for t, seg in before.items():
        assert np.array_equal(seg, level0(out, f"segmentation_{t:g}"))
        assert partition_of(fragments, seg) == want[t]


@pytest.mark.parametrize("how", ["global", "blockwise"])
def test_a_min_size_above_every_segment_leaves_one_segment_per_connected_piece(tmp_path,
                                                                              how):
    """README: small segments merge into a neighbour; only one with no neighbour at all
    (one enclosed by the mask) can stay smaller. A mask slab cuts the volume in two, and
    a min size larger than the volume: two segments at every threshold, the two pieces."""
    affs = noisy_affinities(13)
    mask = np.ones(SHAPE, np.uint8)
    mask[:, :, 4] = 0
    write_volume(tmp_path / "m.zarr", "mask", mask)
    out = tmp_path / "out.zarr"
    run(write_affinities(tmp_path, affs), out, "--workers", "1", "--block", "2", "6", "6",
        "--agglomeration", how, "--mask", str(tmp_path / "m.zarr/mask"),
        "--min-size", "100000")
    for t, seg in segmentations(out).items():
        assert np.unique(seg[:, :, :4]).size == 1 and np.unique(seg[:, :, 5:]).size == 1, t
        assert sorted({int(seg[0, 0, 0]), int(seg[0, 0, 5])}) == [1, 2], t
        assert not seg[:, :, 4].any()


def test_min_size_on_tied_means_is_the_same_global_and_blockwise_in_one_block():
    """README: with one block holding the whole graph, blockwise is exactly the global result;
    and min_size merges small segments as for every method (ties of mean affinity, common in
    uint8, broken by a rank that does not depend on how ids were numbered). Nodes A, C, B,
    S, D (positions 0..4): A-B merges (score 0.1; B, with more neighbours, is the kept node),
    the small S ties between {A, B} and C (mean 0.3 each); the global path and the blockwise
    one (join levels of the same merges, as one block gives them) must put S alike."""
    from emrun.segment.scale.agglomerate import (
        agglomerate,
        join_levels,
        merge_sequence,
        segments_from_levels,
    )
    from emrun.segment.scale.graphdb import GraphData

    u, v = np.array([0, 1, 2, 2]), np.array([2, 3, 3, 4])
    count = np.array([10, 4, 4, 10])
    total = np.array([0.9, 0.3, 0.3, 0.2]) * count
    graph = GraphData(np.arange(1, 6, dtype=np.uint64), np.array([100, 100, 100, 1, 100]),
                      u, v, total, count, np.zeros((4, BINS), np.int64))
    (global_,) = agglomerate(graph, [0.5], "mean", 10)
    level = join_levels(5, merge_sequence(graph, 1.0, "mean"), graph.u, graph.v)
    (blockwise,) = segments_from_levels(graph, graph.u, graph.v, level, [0.5], 10)
    ids = graph.ids.tolist()
    assert partition_of(np.array(ids), global_) == partition_of(np.array(ids), blockwise)
