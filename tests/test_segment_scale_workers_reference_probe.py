"""Reference probe of `emrun segment --scheduler` (segmentation at scale) across worker counts,
schedulers, block sizes and interruptions, on tiny synthetic affinities made in code from a
known label volume (Voronoi cells, seeded noise; float32, so no ties in the agglomeration).

What the README's "At scale" section promises, checked against plain references written here:
- 1 worker, 2 local workers and 2 daisy workers give the same volumes, ids included (runs are
  deterministic: fragment ids are made from the block, segments numbered by their smallest
  fragment);
- a run stopped after some blocks of any step, resumed (with another worker count), is bit
  for bit the uninterrupted run;
- fragment ids are unique across blocks (each fragment lies in one block, inside the block's
  id range, and is one 6-connected piece), segments are unions of fragments, each one
  6-connected piece (merges follow nearest-neighbour edges), numbered 1..K;
- the global agglomeration is a brute-force greedy agglomeration (lowest 1 - mean affinity
  first, edges summed) of the region graph computed here by a loop over every voxel pair;
- on clean affinities, the result is the truth's connected pieces whatever the block;
- the volumes carry the affinities' shape, voxel size and offset, and 0 exactly outside a
  mask.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np
import pytest
import zarr
from test_segment import affinities, cells, noisy
from typer.testing import CliRunner

from emrun.cli import app
from emrun.io import open_volume, write_volume
from emrun.recipe.run import Waterz
from emrun.segment.job import run_segment
from emrun.segment.request import SegmentRequest

runner = CliRunner()
NEAREST = ((-1, 0, 0), (0, -1, 0), (0, 0, -1))
SHAPE = (10, 40, 36)  # 3 x 3 x 3 blocks of 4 x 16 x 16, the last of each axis cut short
BLOCK = (4, 16, 16)
VOXEL_SIZE = (40.0, 8.0, 8.0)
OFFSET = (80, 16, 24)
THRESHOLDS = (0.3, 0.5)
NAMES = ("segmentation_0.3", "segmentation_0.5")


# ------------------------------------------------------------------------------ the data

@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Noisy float32 affinities of 14 cells (placed: voxel size and offset), clean ones of the
    same cells, the truth, and a cache of finished outputs shared by the tests."""
    tmp = tmp_path_factory.mktemp("scale-workers")
    truth = cells(SHAPE, n=14, seed=7)
    clean = affinities(truth, NEAREST)
    affs = noisy(clean, 0.12, seed=2)
    attrs = {"offsets": [list(o) for o in NEAREST]}
    for name, values in (("affinity", affs), ("clean", clean)):
        write_volume(tmp / "in.zarr", name, values, channel_axis=True, voxel_size=VOXEL_SIZE,
                     offset=OFFSET, attrs=attrs)
    return {"tmp": tmp, "truth": truth, "affs": affs, "clean": clean, "outs": {}}


def _args(data: dict, out: Path, *extra: str, workers: int = 1, block=BLOCK,
          source: str = "affinity") -> list[str]:
    return ["segment", str(data["tmp"] / "in.zarr" / source), str(out), "--scheduler",
            "local", "--workers", str(workers), "--block", *map(str, block), "--threshold",
            ",".join(map(str, THRESHOLDS)), *extra]


def _ok(args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output


def _labels(out: Path, name: str, level: int = 0) -> np.ndarray:
    return zarr.open_array(str(out / "labels" / name / str(level)), mode="r")[...]


def _levels(out: Path, name: str) -> list[str]:
    folder = out / "labels" / name
    return sorted(p.name for p in folder.iterdir() if p.name.isdigit())


def _straight(data: dict, agglomeration: str = "global", workers: int = 1) -> Path:
    """The uninterrupted run (made once per settings)."""
    key = (agglomeration, workers)
    if key not in data["outs"]:
        out = data["tmp"] / f"straight-{agglomeration}-{workers}.zarr"
        _ok(_args(data, out, "--agglomeration", agglomeration, workers=workers))
        data["outs"][key] = out
    return data["outs"][key]


def _same_volumes(a: Path, b: Path, names=("fragments", *NAMES)) -> None:
    """Bit for bit, every pyramid level."""
    for name in names:
        levels = _levels(a, name)
        assert levels == _levels(b, name), name
        for level in levels:
            assert np.array_equal(_labels(a, name, int(level)), _labels(b, name, int(level))), \
                (name, level)


# ------------------------------------------------------------------------ the references

def _components(labels: np.ndarray) -> np.ndarray:
    """6-connected pieces of equal nonzero labels, numbered 1.. in raster order of their
    first voxel (a plain breadth-first search)."""
    out = np.zeros(labels.shape, np.int64)
    shape = labels.shape
    count = 0
    for start in np.ndindex(shape):
        if labels[start] == 0 or out[start]:
            continue
        count += 1
        out[start] = count
        queue = deque([start])
        while queue:
            z, y, x = queue.popleft()
            for dz, dy, dx in ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1),
                               (0, 0, -1)):
                w = (z + dz, y + dy, x + dx)
                if all(0 <= a < n for a, n in zip(w, shape, strict=True)) and \
                        not out[w] and labels[w] == labels[start]:
                    out[w] = count
                    queue.append(w)
    return out


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return pairs.shape[1] == np.unique(a).size == np.unique(b).size


def _region_graph(fragments: np.ndarray, affs: np.ndarray, offsets=NEAREST
                  ) -> dict[tuple[int, int], list]:
    """Every pair of different nonzero fragments joined by a nearest-neighbour edge (channel
    c at voxel v: the edge v - (v + offsets[c])): the sum and count of the affinities of the
    voxel pairs between them (a loop over the edges)."""
    graph: dict[tuple[int, int], list] = {}
    for c, offset in enumerate(offsets):
        for v in np.ndindex(SHAPE):
            w = tuple(a + d for a, d in zip(v, offset, strict=True))
            if not all(0 <= a < n for a, n in zip(w, SHAPE, strict=True)):
                continue
            a, b = int(fragments[v]), int(fragments[w])
            if a == b or not a or not b:
                continue
            entry = graph.setdefault((min(a, b), max(a, b)), [0.0, 0])
            entry[0] += float(affs[c][v])
            entry[1] += 1
    return graph


def _greedy(nodes: list[int], graph: dict[tuple[int, int], list], threshold: float
            ) -> dict[int, int]:
    """waterz's agglomeration by its definition: while the pair of touching regions whose
    summed edges score lowest (1 - total / count) scores below the threshold, merge it."""
    region = {n: n for n in nodes}
    edges = {pair: list(stats) for pair, stats in graph.items()}
    while edges:
        pair, (total, count) = min(edges.items(), key=lambda item: 1 - item[1][0] / item[1][1])
        if 1 - total / count >= threshold:
            break
        keep, gone = pair
        for n, r in region.items():
            if r == gone:
                region[n] = keep
        merged: dict[tuple[int, int], list] = {}
        for (a, b), (t, k) in edges.items():
            a, b = (keep if a == gone else a), (keep if b == gone else b)
            if a == b:
                continue
            entry = merged.setdefault((min(a, b), max(a, b)), [0.0, 0])
            entry[0] += t
            entry[1] += k
        edges = merged
    return region


# --------------------------------------------------------------- workers and schedulers

@pytest.mark.parametrize("agglomeration", ["global", "blockwise"])
def test_one_and_two_local_workers_give_the_same_volumes_bit_for_bit(data, agglomeration):
    one = _straight(data, agglomeration, 1)
    two = _straight(data, agglomeration, 2)
    _same_volumes(one, two)
    assert np.unique(_labels(one, "segmentation_0.5")).size > 1  # not trivially equal


def test_two_workers_give_one_workers_volumes_where_affinities_tie(data, tmp_path):
    """Affinities in 16 steps of uint8 (many equal means and histograms) agglomerated
    blockwise with --min-size: each worker reads its blocks' neighbourhoods through its own
    cache of rows, in another order than one worker does; ties must still break alike."""
    q = (np.round(noisy(affinities(data["truth"], NEAREST), 0.25, seed=1) * 15) * 17)
    write_volume(tmp_path / "in.zarr", "affinity", q.astype(np.uint8), channel_axis=True,
                 attrs={"offsets": [list(o) for o in NEAREST]})
    outs = []
    for workers in (1, 2):
        outs.append(tmp_path / f"ties-{workers}.zarr")
        _ok(["segment", str(tmp_path / "in.zarr/affinity"), str(outs[-1]), "--scheduler",
             "local", "--workers", str(workers), "--block", *map(str, BLOCK), "--threshold",
             "0.3,0.5", "--agglomeration", "blockwise", "--min-size", "20"])
    _same_volumes(*outs)


@pytest.mark.slow
def test_a_local_run_stopped_and_resumed_on_two_daisy_workers_is_the_local_run(data,
                                                                             monkeypatch):
    """One local worker stops after 9 of the 27 fragments blocks; the job is resumed on daisy
    with 2 workers for every block step (blockwise agglomeration), the blocks at the
    volume's ends cut short (daisy's 'shrink'): the volumes of the uninterrupted local run,
    bit for bit."""
    pytest.importorskip("daisy")
    local = _straight(data, "blockwise", 1)
    out = data["tmp"] / "daisy.zarr"

    def on_block(name: str, done: int, total: int) -> None:
        if name == "fragments" and done >= 9:
            raise _Stop(name)

    with pytest.raises(_Stop):
        run_segment(_request(data, out, "blockwise", 1), on_block=on_block)
    monkeypatch.chdir(data["tmp"])
    args = _args(data, out, "--agglomeration", "blockwise", "--resume", workers=2)
    args[args.index("local")] = "daisy"
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    for step, todo in (("fragments", 18), ("graph", 27), ("agglomerate", 27), ("relabel", 27)):
        assert f"{step}: {todo} of 27 blocks to do (daisy, 2 workers)" in result.output
    _same_volumes(out, local)


# --------------------------------------------------------------------------- the volumes

def test_fragment_ids_are_unique_across_blocks_and_each_one_piece_in_one_block(data):
    out = _straight(data)
    fragments = _labels(out, "fragments")
    assert fragments.min() > 0  # no mask: every voxel has a fragment
    block_voxels = int(np.prod(BLOCK))
    counts = [-(-n // b) for n, b in zip(SHAPE, BLOCK, strict=True)]
    for z, y, x in np.ndindex(*counts):
        box = tuple(slice(i * b, (i + 1) * b) for i, b in zip((z, y, x), BLOCK, strict=True))
        ids = np.unique(fragments[box])
        block_id = (z * counts[1] + y) * counts[2] + x
        assert ids.min() > block_id * block_voxels, (z, y, x)
        assert ids.max() <= (block_id + 1) * block_voxels, (z, y, x)
        outside = np.ones(SHAPE, bool)
        outside[box] = False
        assert not np.isin(fragments[outside], ids).any(), (z, y, x)
    pieces = _components(fragments)
    assert np.unique(pieces).size == np.unique(fragments).size  # one piece per id
    assert np.unique(fragments).size > 2 * 14  # more fragments than cells


def test_segments_are_connected_unions_of_fragments_numbered_by_smallest_fragment(data):
    out = _straight(data)
    fragments = _labels(out, "fragments")
    for name in NAMES:
        seg = _labels(out, name)
        pairs = np.unique(np.stack([fragments.ravel(), seg.ravel()]), axis=1)
        assert np.unique(pairs[0]).size == pairs.shape[1], name  # a fragment: one segment
        ids = np.unique(seg)
        assert ids.tolist() == list(range(1, ids.size + 1)), name
        assert np.unique(_components(seg)).size == ids.size, name  # one piece per segment
        smallest = [int(fragments[seg == s].min()) for s in ids]
        assert smallest == sorted(smallest), name  # segments named by their smallest node


def test_global_agglomeration_is_the_greedy_one_on_the_graph_of_its_fragments(data):
    """The graph computed here from the fragments and the affinities, agglomerated by brute
    force: the segmentation at each threshold, up to ids; and the counts the database
    holds are the loop's."""
    from emrun.segment.scale.graphdb import GraphStore
    from emrun.segment.scale.job import ScaleJob

    out = _straight(data)
    fragments = _labels(out, "fragments")
    graph = _region_graph(fragments, data["affs"])
    job = ScaleJob.load(out / ".emrun-segment" / "job.json")
    stored = GraphStore(job.db).read(histograms=False)
    got = {(int(stored.ids[a]), int(stored.ids[b])): (t, k) for a, b, t, k in zip(
        stored.u, stored.v, stored.total, stored.count, strict=True)}
    assert set(got) == set(graph)
    for pair, (total, count) in graph.items():
        assert got[pair][1] == count and abs(got[pair][0] - total) < 1e-6, pair
    sizes = dict(zip(*np.unique(fragments, return_counts=True), strict=True))
    assert {int(i): int(s) for i, s in zip(stored.ids, stored.sizes, strict=True)} == \
        {int(i): int(s) for i, s in sizes.items()}
    nodes = sorted(int(i) for i in np.unique(fragments))
    for threshold, name in zip(THRESHOLDS, NAMES, strict=True):
        region = _greedy(nodes, graph, threshold)
        expected = np.vectorize(region.__getitem__, otypes=[np.int64])(fragments)
        seg = _labels(out, name)
        assert _same_partition(seg, expected), name
        assert np.unique(seg).size < len(nodes)


def test_affinities_pointing_forward_agglomerate_as_the_greedy_reference(data, tmp_path):
    """Offsets (1, 0, 0), (0, 1, 0), (0, 0, 1): the graph reaches the blocks' upper faces
    instead of the lower ones; the global agglomeration is still the greedy one on the graph
    of its fragments, and no segment is cut at a block face."""
    forward = ((1, 0, 0), (0, 1, 0), (0, 0, 1))
    truth = data["truth"]
    affs = noisy(affinities(truth, forward), 0.12, seed=5)
    write_volume(tmp_path / "in.zarr", "affinity", affs, channel_axis=True,
                 attrs={"offsets": [list(o) for o in forward]})
    out = tmp_path / "forward.zarr"
    _ok(["segment", str(tmp_path / "in.zarr/affinity"), str(out), "--scheduler", "local",
         "--block", *map(str, BLOCK), "--threshold", "0.5"])
    fragments = _labels(out, "fragments")
    graph = _region_graph(fragments, affs, forward)
    region = _greedy(sorted(int(i) for i in np.unique(fragments)), graph, 0.5)
    expected = np.vectorize(region.__getitem__, otypes=[np.int64])(fragments)
    seg = _labels(out, "segmentation")
    assert _same_partition(seg, expected)
    assert _same_partition(seg, _components(truth))  # mild noise: the cells


def test_min_size_only_merges_small_segments_into_neighbours(data):
    """--min-size 60 on the same job: each segment is one piece of at least 60 voxels, made
    of the segments without it, of which at most one had 60 or more."""
    plain = _straight(data)
    out = data["tmp"] / "min-size.zarr"
    _ok(_args(data, out, "--min-size", "60"))
    assert np.array_equal(_labels(out, "fragments"), _labels(plain, "fragments"))
    for name in NAMES:
        merged, before = _labels(out, name), _labels(plain, name)
        ids, sizes = np.unique(merged, return_counts=True)
        assert sizes.min() >= 60, name
        assert np.unique(_components(merged)).size == ids.size, name
        pairs = np.unique(np.stack([before.ravel(), merged.ravel()]), axis=1)
        assert np.unique(pairs[0]).size == pairs.shape[1], name  # a coarsening
        big = {int(i) for i, n in zip(*np.unique(before, return_counts=True), strict=True)
               if n >= 60}
        for segment in ids:
            inside = set(pairs[0][pairs[1] == segment].tolist())
            assert len(inside & big) <= 1, (name, segment)
        assert ids.size < np.unique(before).size or name == NAMES[1], name


@pytest.mark.parametrize(("block", "agglomeration"), [
    ((10, 40, 36), "global"), ((4, 16, 16), "global"), ((3, 11, 7), "global"),
    ((3, 11, 7), "blockwise")])
def test_clean_affinities_give_the_truths_pieces_whatever_the_block(data, block,
                                                                     agglomeration):
    """Affinities 1 inside a cell and 0 across its faces: every block layout gives the
    truth's 6-connected pieces, the faces between blocks included."""
    out = data["tmp"] / f"clean-{'_'.join(map(str, block))}-{agglomeration}.zarr"
    _ok(_args(data, out, "--agglomeration", agglomeration, block=block, source="clean"))
    expected = _components(data["truth"])
    for name in NAMES:
        assert _same_partition(_labels(out, name), expected), name


def test_the_volumes_carry_the_affinities_placement(data):
    out = _straight(data)
    affs = open_volume(str(data["tmp"] / "in.zarr/affinity"))
    for name in ("fragments", *NAMES):
        volume = open_volume(str(out / name))
        assert tuple(volume.shape) == SHAPE == tuple(affs.shape[1:]), name
        assert tuple(volume.voxel_size) == tuple(affs.voxel_size) == VOXEL_SIZE, name
        assert tuple(volume.offset) == tuple(affs.offset) == OFFSET, name
        assert volume.shift_nm == affs.shift_nm, name
        assert _labels(out, name).dtype == np.uint64, name
    for name in NAMES:  # the count the volume records is the count it holds
        segments = zarr.open_group(str(out / "labels" / name)).attrs["emrun"]["segment"]
        assert segments["segments"] == np.unique(_labels(out, name)).size, name
    assert _levels(out, "fragments") == _levels(out, NAMES[0])


def test_a_larger_mask_placed_by_its_offset_gives_0_exactly_outside_it(data):
    """A mask reaching 1 x 2 x 2 voxels beyond the affinities on each side (placed by its
    offset), with a hole across block faces: 0 exactly in the hole's part of the
    affinities, and a segment never spans the hole."""
    mask = np.ones((SHAPE[0] + 2, SHAPE[1] + 4, SHAPE[2] + 4), np.uint8)
    mask[3:8, 12:32, 14:22] = 0  # the affinities' [2:7, 10:30, 12:20]
    before = tuple(o - m for o, m in zip(OFFSET, (1, 2, 2), strict=True))  # voxels
    write_volume(data["tmp"] / "mask.zarr", "mask", mask, voxel_size=VOXEL_SIZE,
                 offset=before)
    out = data["tmp"] / "masked.zarr"
    _ok(_args(data, out, "--mask", str(data["tmp"] / "mask.zarr/mask")))
    inside = mask[1:-1, 2:-2, 2:-2] != 0
    for name in ("fragments", *NAMES):
        assert np.array_equal(_labels(out, name) != 0, inside), name
    seg = _labels(out, "segmentation_0.5")
    assert np.unique(_components(seg)[inside]).size == np.unique(seg[inside]).size


# ------------------------------------------------------------------- stopped, then resumed

def _request(data: dict, out: Path, agglomeration: str, workers: int,
             resume: bool = False) -> SegmentRequest:
    return SegmentRequest(affinities=str(data["tmp"] / "in.zarr/affinity"), output=out,
                          spec=Waterz(thresholds=list(THRESHOLDS)), scheduler="local",
                          block=BLOCK, workers=workers, agglomeration=agglomeration,
                          resume=resume, given=frozenset({"agglomeration"}))


class _Stop(Exception):
    pass


@pytest.mark.parametrize(("step", "agglomeration", "first", "then"), [
    ("graph", "global", 2, 1),
    ("agglomerate", "blockwise", 1, 2), ("relabel", "blockwise", 2, 1)])
def test_stopped_after_some_blocks_and_resumed_on_other_workers_is_the_straight_run(
        data, step, agglomeration, first, then):
    """The run is stopped once 9 blocks of ``step`` are done on ``first`` workers (the
    progress callback raises: the pool and its blocks in flight are killed), then resumed on
    ``then`` workers."""
    out = data["tmp"] / f"stopped-{step}-{first}.zarr"

    def on_block(name: str, done: int, total: int) -> None:
        if name == step and done >= 9:
            raise _Stop(step)

    with pytest.raises(_Stop):
        run_segment(_request(data, out, agglomeration, first), on_block=on_block)
    said: list[str] = []
    run_segment(_request(data, out, agglomeration, then, resume=True), on_stage=said.append)
    todo = next(line for line in said if line.startswith(f"{step}: "))
    assert 0 < int(todo.split()[1]) <= 27 - 9, todo  # the resume did only what was left
    _same_volumes(out, _straight(data, agglomeration))
