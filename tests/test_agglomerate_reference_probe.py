"""Blockwise region graph and agglomeration (emrun/segment/scale/) against a tiny reference
written here by its definition: the region adjacency graph by a Python loop over every
nearest-neighbour voxel pair (the affinity read at the pair's first voxel v, the partner
at v + offset), and agglomeration by threshold as a loop that re-scores every pair of
touching regions from the original edges (summed affinities over summed counts) and merges
the lowest while it scores below the threshold. Where scores tie, the reference follows
every order the ties allow and emrun's answer must be one of them. Volumes of a few hundred
voxels made in code; the graph also goes through the SQLite database and back."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from emrun.cli import app
from emrun.geometry import Roi, slices
from emrun.io import write_volume
from emrun.segment.graph import Edges
from emrun.segment.scale.agglomerate import (
    agglomerate,
    join_levels,
    merge_sequence,
    segments_from_levels,
)
from emrun.segment.scale.graphdb import GraphData, GraphStore, default_url
from emrun.segment.scale.rag import BINS, block_graph
from emrun.segment.scale.steps import graph_region

NEAREST = ((-1, 0, 0), (0, -1, 0), (0, 0, -1))
AFTER = ((1, 0, 0), (0, 1, 0), (0, 0, 1))  # pointing up: the margin lies above a block
MIXED = ((-1, 0, 0), (0, 1, 0), (0, 0, -1), (-2, 0, 0))  # and a long-range channel
THRESHOLDS = (0.0, 0.25, 0.5, 0.6, 0.75, 0.9, 1.0)

Partition = frozenset  # of frozensets of fragment ids


# --- the reference ------------------------------------------------------------------------

def reference_rag(labels: np.ndarray, affs: np.ndarray, offsets) -> tuple[dict, dict]:
    """Node sizes {id: voxels} and edges {(u, v): [total, count, hist]} (u < v) of the whole
    volume: every voxel v and nearest-neighbour channel c whose partner w = v + offset lies
    in the volume, fragments differing and neither 0, adds affs[c][v] to the pair's edge."""
    sizes: dict[int, int] = {}
    for value in labels.ravel().tolist():
        if value:
            sizes[value] = sizes.get(value, 0) + 1
    edges: dict[tuple[int, int], list] = {}
    for c, offset in enumerate(offsets):
        if sum(abs(d) for d in offset) != 1:
            continue
        for v in np.ndindex(labels.shape):
            w = tuple(a + d for a, d in zip(v, offset, strict=True))
            if not all(0 <= a < n for a, n in zip(w, labels.shape, strict=True)):
                continue
            a, b = int(labels[v]), int(labels[w])
            if a == b or not a or not b:
                continue
            entry = edges.setdefault((min(a, b), max(a, b)), [0.0, 0, np.zeros(BINS, int)])
            p = float(affs[c][v])
            entry[0] += p
            entry[1] += 1
            entry[2][min(int(p * BINS), BINS - 1)] += 1
    return sizes, edges


def reference_partitions(ids, edges: dict, threshold: float) -> set[Partition]:
    """Every partition the definition can end at: regions as sets of ids; at each step every
    pair of touching regions is scored 1 - (summed affinity / summed count) over all the
    original edges between them, and the lowest merges unless it scores ``threshold`` or
    more. Ties (within 1e-9) are followed in every order."""
    ends: set[Partition] = set()
    seen: set[Partition] = set()
    todo = [frozenset(frozenset([i]) for i in ids)]
    while todo:
        state = todo.pop()
        if state in seen:
            continue
        seen.add(state)
        region = {i: r for r in state for i in r}
        pairs: dict[tuple, list] = {}
        for (a, b), (total, count, _) in edges.items():
            ra, rb = region[a], region[b]
            if ra != rb:
                key = tuple(sorted((ra, rb), key=min))
                entry = pairs.setdefault(key, [0.0, 0])
                entry[0] += total
                entry[1] += count
        scores = {k: 1.0 - t / n for k, (t, n) in pairs.items()}
        best = min(scores.values(), default=np.inf)
        if best >= threshold:
            ends.add(state)
            continue
        for (ra, rb), s in scores.items():
            if s <= best + 1e-9:
                todo.append(state - {ra, rb} | {ra | rb})
    return ends


def as_partition(ids, segments) -> Partition:
    groups: dict[int, set] = {}
    for i, s in zip(np.asarray(ids).tolist(), np.asarray(segments).tolist(), strict=True):
        groups.setdefault(s, set()).add(i)
    return frozenset(frozenset(g) for g in groups.values())


def shown(partition: Partition) -> list[list[int]]:
    return sorted(sorted(r) for r in partition)


# --- emrun's side: the blocks' graphs, in memory and through SQLite -----------------------

def blocks_of(shape, block):
    counts = [-(-s // b) for s, b in zip(shape, block, strict=True)]
    for index in itertools.product(*(range(n) for n in counts)):
        begin = [i * b for i, b in zip(index, block, strict=True)]
        size = [min(b, s - o) for b, s, o in zip(block, shape, begin, strict=True)]
        yield Roi(begin, size)


def block_graphs(labels, affs, offsets, block):
    """Each block's graph, as the graph step makes it (its margin from `graph_region`)."""
    out = []
    for core in blocks_of(labels.shape, block):
        region = graph_region(core, offsets, labels.shape)
        out.append(block_graph(labels[slices(region)], region, core,
                               affs[(slice(None), *slices(core))], offsets))
    return out


def in_memory(graphs) -> tuple[dict, dict]:
    """The blocks' graphs summed here (node sizes and edge statistics per id)."""
    sizes: dict[int, int] = {}
    for g in graphs:
        for i, s in zip(g.ids.tolist(), g.sizes.tolist(), strict=True):
            sizes[i] = sizes.get(i, 0) + s
    u = np.concatenate([g.u for g in graphs]).astype(np.int64)
    v = np.concatenate([g.v for g in graphs]).astype(np.int64)
    total = np.concatenate([g.total for g in graphs])
    count = np.concatenate([g.count for g in graphs])
    merged = Edges.aggregate(u, v, total, count)
    return sizes, {(a, b): (t, n) for a, b, t, n in zip(
        merged.u.tolist(), merged.v.tolist(), merged.total.tolist(), merged.count.tolist(),
        strict=True)}


def through_sqlite(tmp_path: Path, graphs) -> tuple[GraphStore, list[bool]]:
    store = GraphStore(default_url(tmp_path))
    store.create("probe-digest")
    written = [store.write_block(k, g) for k, g in enumerate(graphs)]
    return store, written


def graph_dicts(graph: GraphData) -> tuple[dict, dict]:
    ids = graph.ids.tolist()
    sizes = dict(zip(ids, graph.sizes.tolist(), strict=True))
    edges = {(ids[a], ids[b]): (t, n) for a, b, t, n in zip(
        graph.u.tolist(), graph.v.tolist(), graph.total.tolist(), graph.count.tolist(),
        strict=True)}
    return sizes, edges


def assert_same_graph(got: tuple[dict, dict], sizes: dict, edges: dict) -> None:
    got_sizes, got_edges = got
    assert got_sizes == sizes
    assert sorted(got_edges) == sorted(edges)
    for pair, (total, count, _) in edges.items():
        assert got_edges[pair][1] == count, pair
        assert abs(got_edges[pair][0] - total) < 1e-9, pair


def per_block_ids(labels: np.ndarray, block) -> np.ndarray:
    """``labels`` renumbered as the fragments step numbers them: each block's pieces get
    ids of their own (block k: k * voxels + 1 ...), so an object spanning several blocks is
    one fragment per block, joined across the faces."""
    out = np.zeros(labels.shape, np.uint64)
    voxels = int(np.prod(block))
    for k, core in enumerate(blocks_of(labels.shape, block)):
        piece = labels[slices(core)]
        values = np.unique(piece[piece != 0])
        renumbered = np.zeros(piece.shape, np.uint64)
        for j, value in enumerate(values.tolist()):
            renumbered[piece == value] = k * voxels + 1 + j
        out[slices(core)] = renumbered
    return out


def dyadic_affinities(rng, channels: int, shape) -> np.ndarray:
    """Affinities in eighths: sums and means of a few are exact, so ties are real ties."""
    return (rng.integers(0, 9, (channels, *shape)) / 8).astype(np.float32)


# --- the region graph ---------------------------------------------------------------------

CASES = {
    # name: (shape, block, offsets, labels maker)
    "random-before": ((4, 6, 6), (2, 3, 3), NEAREST),
    "random-after": ((4, 6, 6), (2, 3, 3), AFTER),
    "random-mixed-odd-blocks": ((5, 5, 7), (2, 3, 4), MIXED),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_blocks_summed_in_memory_and_through_sqlite_give_the_volumes_graph(tmp_path, case):
    """Random fragments (0 among them) on a grid of blocks, ragged at the volume's end;
    offsets pointing down, up, or mixed with a long-range channel (which takes no part):
    the blocks' graphs summed here and read back from SQLite are the whole volume's graph
    by the voxel loop, sizes, sums and counts."""
    shape, block, offsets = CASES[case]
    rng = np.random.default_rng(sorted(CASES).index(case))
    raw = rng.choice(np.array([0, 1, 2, 3], np.uint64), shape, p=[0.2, 0.3, 0.3, 0.2])
    labels = per_block_ids(raw, block)
    affs = dyadic_affinities(rng, len(offsets), shape)
    sizes, edges = reference_rag(labels, affs, offsets)
    graphs = block_graphs(labels, affs, offsets, block)
    assert_same_graph(in_memory(graphs), sizes, edges)
    store, written = through_sqlite(tmp_path, graphs)
    assert all(written)
    for histograms in (False, True):
        graph = store.read(histograms=histograms)
        assert_same_graph(graph_dicts(graph), sizes, edges)
    ids = graph.ids.tolist()
    for a, b, row in zip(graph.u.tolist(), graph.v.tolist(), graph.hist, strict=True):
        assert row.tolist() == edges[(ids[a], ids[b])][2].tolist()
    assert store.read_nodes()[0].tolist() == sorted(sizes)
    assert store.read_nodes()[1].tolist() == [sizes[i] for i in sorted(sizes)]
    store.dispose()


@pytest.mark.parametrize("offsets", [NEAREST, AFTER], ids=["before", "after"])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_fragments_touching_only_across_a_block_face_are_joined_once(tmp_path, offsets, axis):
    """Two fragments, one in each of two blocks, meeting only at the face between them:
    one edge, counted once per face voxel pair, with the affinity of the voxel the pair's
    offset starts from (the upper one for offsets pointing down, the lower one else)."""
    shape = [3, 3, 3]
    shape[axis] = 4
    block = [3, 3, 3]
    block[axis] = 2
    labels = np.zeros(shape, np.uint64)
    low = [slice(None)] * 3
    high = [slice(None)] * 3
    low[axis], high[axis] = slice(0, 2), slice(2, 4)
    labels[tuple(low)] = 1
    labels[tuple(high)] = 100
    affs = np.zeros((3, *shape), np.float32)
    face_below = [slice(None)] * 3
    face_above = [slice(None)] * 3
    face_below[axis], face_above[axis] = 1, 2
    affs[(axis, *face_below)] = 0.25  # read by offsets pointing up (from the lower voxel)
    affs[(axis, *face_above)] = 0.75  # read by offsets pointing down
    graphs = block_graphs(labels, affs, offsets, tuple(block))
    sizes, edges = reference_rag(labels, affs, offsets)
    assert list(edges) == [(1, 100)] and edges[(1, 100)][1] == 9
    assert_same_graph(in_memory(graphs), sizes, edges)
    store, _ = through_sqlite(tmp_path, graphs)
    got = graph_dicts(store.read(histograms=False))
    assert_same_graph(got, sizes, edges)
    mean = got[1][(1, 100)][0] / 9
    assert mean == (0.75 if offsets == NEAREST else 0.25)
    store.dispose()


def test_a_fragment_spanning_every_block_sums_its_size_and_edges_in_memory():
    """`block_graph` on fragments whose ids recur in several blocks (the sum the docstring
    promises: every voxel pair belongs to exactly one block): the blocks' node sizes and
    edge statistics add up to the volume's."""
    rng = np.random.default_rng(7)
    shape, block = (4, 6, 6), (2, 3, 3)
    labels = np.full(shape, 5, np.uint64)  # one fragment through all 8 blocks
    labels[:, :, 4:] = 9  # a second one through half of them
    labels[rng.random(shape) < 0.15] = 0
    affs = dyadic_affinities(rng, 3, shape)
    sizes, edges = reference_rag(labels, affs, NEAREST)
    assert_same_graph(in_memory(block_graphs(labels, affs, NEAREST, block)), sizes, edges)


def test_a_node_id_another_block_wrote_is_an_error_not_a_finished_block(tmp_path):
    """Not reachable from emrun's own fragments (ids are numbered per block), but a key
    broken by a block's rows was taken for 'another worker finished this block' and the
    block dropped without a word: now the first block is written, the next (sharing ids
    with it) is an error naming it, and it is not marked done."""
    rng = np.random.default_rng(7)
    shape, block = (4, 6, 6), (2, 3, 3)
    labels = rng.choice(np.array([0, 1, 2, 3, 4], np.uint64), shape)
    affs = dyadic_affinities(rng, 3, shape)
    graphs = block_graphs(labels, affs, NEAREST, block)
    store = GraphStore(default_url(tmp_path))
    store.create("probe-digest")
    assert store.write_block(0, graphs[0])
    with pytest.raises(RuntimeError, match="broke a key of the graph database"):
        store.write_block(1, graphs[1])
    assert store.write_block(0, graphs[0]) is False  # finished: still told apart
    assert 1 not in set(store.done_blocks())
    store.dispose()


def one_fragment(rng, shape) -> np.ndarray:
    labels = np.zeros(shape, np.uint64)
    labels[:2, :2, :3] = np.where(rng.random((2, 2, 3)) < 0.7, 42, 0)  # block 0's box
    return labels


def test_background_only_and_one_fragment_only_give_empty_graphs_and_one_segment(tmp_path):
    """All 0: no node, no edge, no segment at any threshold. One fragment (0 around it,
    in one block: ids are per block): one node of its size, no edge, segment 1 at every
    threshold; through SQLite too."""
    shape, block = (3, 4, 5), (2, 2, 3)
    rng = np.random.default_rng(1)
    affs = dyadic_affinities(rng, 3, shape)
    for k, labels in enumerate([np.zeros(shape, np.uint64),
                                one_fragment(rng, shape)]):
        graphs = block_graphs(labels, affs, NEAREST, block)
        sizes, edges = reference_rag(labels, affs, NEAREST)
        assert_same_graph(in_memory(graphs), sizes, edges)
        folder = tmp_path / str(k)
        folder.mkdir()
        store, written = through_sqlite(folder, graphs)
        assert all(written)
        graph = store.read(histograms=True)
        store.dispose()
        assert_same_graph(graph_dicts(graph), sizes, edges)
        segments = agglomerate(graph, list(THRESHOLDS), "mean")
        assert [s.tolist() for s in segments] == [[1] * len(sizes)] * len(THRESHOLDS)
        merges = merge_sequence(graph, 1.0, "mean")
        level = join_levels(graph.ids.size, merges, graph.u, graph.v)
        assert len(merges) == 0 and level.size == 0


# --- agglomeration ------------------------------------------------------------------------

def check_agglomeration(graph: GraphData, sizes: dict, edges: dict) -> None:
    """emrun's global agglomeration and the one-block join levels, at every threshold,
    end at one of the partitions the reference can end at; segments are numbered 1..K."""
    assert_same_graph(graph_dicts(graph), sizes, edges)
    ids = graph.ids.tolist()
    merges = merge_sequence(graph, 1.0, "mean")
    level = join_levels(graph.ids.size, merges, graph.u, graph.v)
    global_ = agglomerate(graph, list(THRESHOLDS), "mean")
    levels = segments_from_levels(graph, graph.u, graph.v, level, list(THRESHOLDS))
    for threshold, a, b in zip(THRESHOLDS, global_, levels, strict=True):
        allowed = reference_partitions(ids, edges, threshold)
        for segments in (a, b):
            assert sorted(set(segments.tolist())) == list(range(1, segments.max() + 1))
            got = as_partition(ids, segments)
            assert got in allowed, (threshold, shown(got), [shown(p) for p in allowed])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_agglomeration_of_the_blocks_graph_is_the_reference_at_every_threshold(tmp_path,
                                                                               seed):
    """Random fragments in eighths-affinities (many ties) over 8 blocks, read back from
    SQLite: thresholds 0 (nothing merges) to 1 (everything with a non-zero mean merges)."""
    rng = np.random.default_rng(100 + seed)
    shape, block = (4, 6, 6), (2, 3, 3)
    raw = rng.choice(np.array([0, 1, 2], np.uint64), shape, p=[0.1, 0.45, 0.45])
    labels = per_block_ids(raw, block)
    affs = dyadic_affinities(rng, 3, shape)
    if seed == 3:
        affs[:, 2:] = 0  # edges of mean 0 in the upper half: score 1, never merged
    sizes, edges = reference_rag(labels, affs, NEAREST)
    assert 8 <= len(sizes) <= 24
    store, _ = through_sqlite(tmp_path, block_graphs(labels, affs, NEAREST, block))
    graph = store.read(histograms=False)
    store.dispose()
    check_agglomeration(graph, sizes, edges)


def test_equal_affinities_everywhere_merge_all_or_nothing(tmp_path):
    """Every edge scores 0.5 and every merged edge again 0.5: below 0.5 and at it nothing
    merges; above it, each connected group of fragments becomes one segment."""
    shape, block = (4, 6, 6), (2, 3, 3)
    labels = np.ones(shape, np.uint64)
    labels[:, 3, :] = 0  # two objects, apart
    labels = per_block_ids(labels, block)
    affs = np.full((3, *shape), 0.5, np.float32)
    sizes, edges = reference_rag(labels, affs, NEAREST)
    store, _ = through_sqlite(tmp_path, block_graphs(labels, affs, NEAREST, block))
    graph = store.read(histograms=False)
    store.dispose()
    check_agglomeration(graph, sizes, edges)
    at, above = agglomerate(graph, [0.5, 0.50001], "mean")
    assert at.tolist() == list(range(1, len(sizes) + 1))
    assert np.unique(above).size == 2


def tie_graph() -> GraphData:
    """Nodes 0..3; 0-1 scores 1/8 and merges first; 0-2 (mean 1/4) and 1-2 (3/4), summed
    into edge 0-2 (index 1), score 1/2, tying with the untouched 2-3 (index 4, mean 1/2);
    0-3 has mean 0. Whichever of the tied two merges first, the other then scores 6/7 or
    11/12 and stays apart at threshold 3/4: {0,1,2},{3} if 0-2 goes first, {0,1},{2,3} if
    2-3 does."""
    u, v = np.array([0, 0, 0, 1, 2]), np.array([1, 2, 3, 2, 3])
    total = np.array([1.75, 0.5, 0.0, 1.5, 1.0])
    count = np.array([2, 2, 10, 2, 2])
    return GraphData(np.arange(1, 5, dtype=np.uint64), np.full(4, 10), u, v, total, count,
                     np.zeros((5, BINS), np.int64))


def test_a_tie_between_a_merged_edge_and_an_untouched_one_ends_at_a_reference_partition():
    graph = tie_graph()
    ids = graph.ids.tolist()
    edges = {(ids[a], ids[b]): (t, n, None) for a, b, t, n in zip(
        graph.u.tolist(), graph.v.tolist(), graph.total.tolist(), graph.count.tolist(),
        strict=True)}
    allowed = reference_partitions(ids, edges, 0.75)
    assert sorted(shown(p) for p in allowed) == [[[1, 2], [3, 4]], [[1, 2, 3], [4]]]
    (got,) = agglomerate(graph, [0.75], "mean")
    assert as_partition(ids, got) in allowed


def test_ties_break_by_edge_order_as_the_module_says():
    graph = tie_graph()
    (got,) = agglomerate(graph, [0.75], "mean")
    assert shown(as_partition(graph.ids.tolist(), got)) == [[1, 2, 3], [4]]


# --- the command, end to end: lookup tables and segmentations -----------------------------

@pytest.mark.parametrize("agglomeration", ["global", "blockwise"])
def test_the_commands_segmentations_are_the_reference_on_its_own_fragments(tmp_path,
                                                                           agglomeration):
    """`emrun segment --scheduler local` on float affinities in eighths (8 blocks): its
    graph database holds the reference graph of the fragments it made, and each threshold's
    segmentation (the lookup tables applied) is a reference partition of them. Blockwise
    agglomeration is exact here as long as every edge scores the same (0.5 everywhere but
    for a few edges of 0, which never merge): checked with constant affinities."""
    shape = (4, 12, 12)
    rng = np.random.default_rng(11)
    if agglomeration == "global":
        affs = dyadic_affinities(rng, 3, shape)
        affs[:, :, 5:7] = np.minimum(affs[:, :, 5:7], 0.125)  # a weak wall: a few fragments
    else:
        affs = np.full((3, *shape), 0.5, np.float32)
        affs[:, :, 6] = 0.0  # edges of mean 0 across the wall
    write_volume(tmp_path / "in.zarr", "affinity", affs, channel_axis=True,
                 attrs={"offsets": [list(o) for o in NEAREST]})
    out = tmp_path / "out.zarr"
    thresholds = "0,0.25,0.5,0.75,1"
    result = CliRunner().invoke(app, [
        "segment", str(tmp_path / "in.zarr/affinity"), str(out), "--scheduler", "local",
        "--workers", "1", "--block", "2", "6", "6", "--levels", "1", "--threshold",
        thresholds, "--agglomeration", agglomeration])
    assert result.exit_code == 0, result.output
    fragments = zarr.open_array(str(out / "labels/fragments/0"), mode="r")[...]
    sizes, edges = reference_rag(fragments, affs, NEAREST)
    assert len(sizes) >= 4
    store = GraphStore(default_url(out / ".emrun-segment"))
    graph = store.read(histograms=False)
    store.dispose()
    assert_same_graph(graph_dicts(graph), sizes, edges)
    for threshold in thresholds.split(","):
        seg = zarr.open_array(str(out / f"labels/segmentation_{threshold}/0"), mode="r")[...]
        assert np.array_equal(seg == 0, fragments == 0)
        ids = sorted(sizes)
        per_fragment = {}
        for f, s in zip(fragments.ravel().tolist(), seg.ravel().tolist(), strict=True):
            if f:
                assert per_fragment.setdefault(f, s) == s  # a fragment is in one segment
        got = as_partition(ids, [per_fragment[i] for i in ids])
        allowed = reference_partitions(ids, edges, float(threshold))
        assert got in allowed, (threshold, shown(got), [shown(p) for p in allowed])
