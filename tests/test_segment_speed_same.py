"""Pinned results of segmentation and scoring: the digests of what each method gives on small
synthetic cases (in memory, block by block, at scale with one local worker) and the exact
scores, taken before the speed work on these modules. Faster code must give the same ids,
bit for bit, and the same scores, so these digests must never change.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from test_segment import affinities, blockwise, cells, noisy
from typer.testing import CliRunner

from emrun.cli import app
from emrun.evaluate import score, score_volumes
from emrun.io import open_volume, write_volume
from emrun.recipe.run import ConnectedComponents, MutexWatershed, Waterz
from emrun.registry import segmenters
from emrun.segment import compiled as compiled_loops
from emrun.segment import graph, segment_array
from emrun.segment.base import Segmenter
from emrun.segment.graph import Edges, compact, merge_small

runner = CliRunner()
OFFSETS = ((-1, 0, 0), (0, -1, 0), (0, 0, -1), (-2, 0, 0), (0, -3, 0), (0, 0, -3),
           (0, -7, 0), (0, 0, -7))
NEAREST = OFFSETS[:3]
SHAPE = (12, 48, 48)


def digest(array: np.ndarray) -> str:
    """dtype, shape and bytes of ``array``, hashed (first 16 hex digits)."""
    array = np.ascontiguousarray(array)
    h = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    h.update(array.tobytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="module")
def case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noisy float32 affinities of 25 cells, the cells, and a mask with a hole."""
    truth = cells(SHAPE, n=25, seed=11)
    affs = noisy(affinities(truth, OFFSETS), 0.3, seed=4)
    mask = np.ones(SHAPE, bool)
    mask[3:7, 10:30, 5:20] = False
    return affs, truth, mask


@pytest.fixture(params=["numpy", "compiled"])
def loops(request, monkeypatch) -> str:
    """Each case twice: with the graph loops as small graphs take them (numpy, Python) and
    with the compiled ones that large graphs take (`emrun.segment.compiled`)."""
    if request.param == "compiled":
        monkeypatch.setattr(graph, "COMPILED_FROM", 0)
    return request.param


def _segmenter(kind: str, min_size: int) -> Segmenter:
    spec = {"mws": MutexWatershed(bias=0.5, min_size=min_size),
            "cc": ConnectedComponents(threshold=0.85, min_size=min_size),
            "waterz": Waterz(thresholds=[0.3], min_size=min_size)}[kind]
    return segmenters.build(spec)


IN_MEMORY = {
    ("mws", 1, False): "0cf2d664007dccff",
    ("mws", 30, False): "ea44ccef09746eef",
    ("mws", 30, True): "35ddf46558f8d0d1",
    ("cc", 1, False): "2a397bb36b05773d",
    ("cc", 30, True): "de13429f0157daa6",
    ("waterz", 30, False): "25c8cde428cf8d5c",
    ("waterz", 30, True): "1060ccc470a4ef3f",
}


@pytest.mark.parametrize(("kind", "min_size", "masked"), list(IN_MEMORY))
def test_in_memory_segmentations_are_the_pinned_ones(case, loops, kind, min_size, masked):
    if kind == "waterz":
        pytest.importorskip("waterz")
    affs, _, mask = case
    seg = segment_array(affs, OFFSETS, _segmenter(kind, min_size), mask if masked else None)
    assert digest(seg) == IN_MEMORY[(kind, min_size, masked)]


BLOCKWISE = {
    ("mws", 30, False): "330b8fb23b4c6f0e",
    ("mws", 30, True): "09187e2cb2f00a9a",
    ("cc", 30, False): "adc9e14aafac61fe",
    ("cc", 1, True): "8d8b6b863bdd3de5",
}


@pytest.mark.parametrize(("kind", "min_size", "masked"), list(BLOCKWISE))
def test_blockwise_segmentations_are_the_pinned_ones(case, loops, kind, min_size, masked):
    affs, _, mask = case
    seg = blockwise(affs, OFFSETS, _segmenter(kind, min_size), block=(6, 20, 28),
                    mask=mask if masked else None)
    assert digest(seg) == BLOCKWISE[(kind, min_size, masked)]


@pytest.fixture(scope="module")
def stored(tmp_path_factory) -> Path:
    """The case's nearest-neighbour affinities as uint8 in a zarr store."""
    tmp = tmp_path_factory.mktemp("speed_same")
    truth = cells(SHAPE, n=25, seed=11)
    affs = noisy(affinities(truth, NEAREST), 0.3, seed=2)
    write_volume(tmp / "in.zarr", "affinity", np.round(affs * 255).astype(np.uint8),
                 channel_axis=True, attrs={"offsets": [list(o) for o in NEAREST]})
    return tmp


def _labels(out: Path) -> dict[str, str]:
    """Digest of level 0 of every label volume in ``out``."""
    root = out / "labels"
    return {d.name: digest(zarr.open_array(str(d / "0"), mode="r")[...])
            for d in sorted(root.iterdir()) if (d / "0").exists()}


AT_SCALE = {  # watershed re-pinned when unseeded trees of strong edges got seeds of their own
    # (a thin object was flooded into its neighbour; one more fragment in this case), and
    # global's when segments were named by their smallest node before merge_small (as
    # blockwise names them: one block now gives global's ids, and here its 0.2 volume)
    ("watershed", "global"): {"fragments": "8e315643d686d787",
                              "segmentation_0.2": "69831b4e2d503776",
                              "segmentation_0.5": "f0ac316a7f57323a"},
    ("watershed", "blockwise"): {"fragments": "8e315643d686d787",
                                 "segmentation_0.2": "69831b4e2d503776",
                                 "segmentation_0.5": "9bdfff9ca147aa77"},
    ("mws", "global"): {"fragments": "f192abd25d77ae73",
                        "segmentation_0.2": "c8ada6e56fc8294e",
                        "segmentation_0.5": "7eb75f371af9e5a1"},
}


@pytest.mark.parametrize(("fragments", "agglomeration"), list(AT_SCALE))
def test_segmentations_at_scale_are_the_pinned_ones(stored, loops, fragments, agglomeration):
    out = stored / f"{fragments}-{agglomeration}-{loops}.zarr"
    result = runner.invoke(app, [
        "segment", str(stored / "in.zarr/affinity"), str(out), "--scheduler", "local",
        "--workers", "1", "--block", "6", "24", "24", "--threshold", "0.2,0.5",
        "--fragments", fragments, "--agglomeration", agglomeration, "--min-size", "20",
        "--levels", "1"])
    assert result.exit_code == 0, result.output
    assert _labels(out) == AT_SCALE[(fragments, agglomeration)]


SCORES = {
    False: {"arand": 0.31747785648195115, "rand_split": 0.5439528482698711,
            "rand_merge": 0.9158236963649907, "voi_split": 1.454713154119844,
            "voi_merge": 0.10579030720432489, "voi": 1.5605034613241688,
            "cremi_score": 0.7038645423189482, "splits": 20, "merges": 3, "min_overlap": 20,
            "voxels": 25932, "truth_objects": 24, "segments": 836},
    True: {"arand": 0.32440448763520346, "rand_split": 0.5660132131400164,
           "rand_merge": 0.837795984186095, "voi_split": 1.3600667949148992,
           "voi_merge": 0.25320689538361696, "voi": 1.613273690298516,
           "cremi_score": 0.7234315620130518, "splits": 21, "merges": 9, "min_overlap": 20,
           "voxels": 25932, "truth_objects": 32, "segments": 836},
}


@pytest.mark.parametrize("connected", [False, True])
def test_scores_are_the_pinned_ones(case, tmp_path, connected):
    """In memory and streamed in slabs (pieces joined across slab faces): equal, pinned."""
    affs, truth, mask = case
    seg = segment_array(affs, OFFSETS, _segmenter("mws", 1))
    cut = truth.copy()
    cut[:, 24, :] = 0  # a plane of unlabelled voxels: objects in two pieces
    cut[cut == 3] = 4  # one id for two separate objects
    expected = score(seg, cut, mask, min_overlap=20, connected_truth=connected).as_dict()
    assert expected == SCORES[connected]
    write_volume(tmp_path / "v.zarr", "seg", seg, chunks=(3, 16, 48))
    write_volume(tmp_path / "v.zarr", "truth", cut, chunks=(3, 16, 48))
    write_volume(tmp_path / "v.zarr", "mask", mask.astype(np.uint8), chunks=(3, 16, 48))
    volumes = [open_volume(tmp_path / f"v.zarr/{n}") for n in ("seg", "truth", "mask")]
    for slab_voxels in (1, 3000):
        streamed = score_volumes(*volumes, min_overlap=20, slab_voxels=slab_voxels,
                                 connected_truth=connected)
        assert streamed.as_dict() == expected


def test_merge_small_and_compact_are_the_pinned_ones(loops):
    """Random graphs with many ties: the tables merge_small gives, and compact's ids."""
    rng = np.random.default_rng(5)
    n, m = 400, 1500
    u, v = rng.integers(1, n, m), rng.integers(1, n, m)
    edges = Edges.aggregate(u, v, rng.integers(0, 4, m) / 4)
    sizes = rng.integers(1, 60, n)
    sizes[0] = 0
    rank = rng.permutation(n)
    table = merge_small(sizes, edges, 40, rank=rank)
    assert digest(table) == "08ddb313be270745"
    labels = rng.integers(0, 10**6, (7, 9, 11)) * (rng.random((7, 9, 11)) < 0.8)
    assert digest(compact(labels)[0]) == "cd48bf38421992db"  # by a lookup table
    assert digest(compact(labels * 2**40)[0]) == "cd48bf38421992db"  # by sorting


def _paths(monkeypatch: pytest.MonkeyPatch, compute: Callable[[], Any]) -> tuple[Any, Any]:
    """``compute()`` with the numpy/Python loops, then with the compiled ones."""
    monkeypatch.setattr(graph, "COMPILED_FROM", 10**12)
    plain = compute()
    monkeypatch.setattr(graph, "COMPILED_FROM", 0)
    return plain, compute()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compiled_sums_are_numpys_bit_for_bit(monkeypatch, seed):
    """Pairs in both orders, repeats, self-pairs, a hub with hundreds of partners (the
    long-bucket sort), float32 weights whose sums round: same pairs, order, sums, dtypes."""
    rng = np.random.default_rng(seed)
    m = 20_000
    u = rng.integers(0, 3000, m)
    v = np.where(rng.random(m) < 0.1, 7, np.abs(u + rng.integers(-4, 5, m)))  # 7: the hub
    weight = rng.random(m).astype(np.float32)
    count = rng.integers(1, 5, m) if seed else None
    calls = []
    kernel = compiled_loops.aggregate_pairs
    monkeypatch.setattr(compiled_loops, "aggregate_pairs",
                        lambda *args: calls.append(1) or kernel(*args))
    plain, compiled = _paths(monkeypatch, lambda: Edges.aggregate(u, v, weight, count))
    assert calls == [1]  # the compiled path was taken, once
    for field in ("u", "v", "total", "count"):
        a, b = getattr(plain, field), getattr(compiled, field)
        assert a.dtype == b.dtype and np.array_equal(a, b), field
    assert np.count_nonzero((plain.u == 7) | (plain.v == 7)) > 300


@pytest.mark.parametrize("seed", [0, 1])
def test_compiled_merges_are_pythons(monkeypatch, seed):
    """Many ties of mean affinity and of size: the same table from both loops, and the
    packed-rank ordering equals lexsort's even for ranks beyond a packed key (2^40)."""
    rng = np.random.default_rng(seed)
    n, m = 5000, 30_000
    u, v = rng.integers(1, n, m), rng.integers(1, n, m)
    edges = Edges.aggregate(u, v, rng.integers(0, 3, m) / 2)
    sizes = rng.integers(1, 30, n)
    for rank in (rng.permutation(n), rng.permutation(n) * 2**40, None):
        plain, compiled = _paths(monkeypatch, lambda rank=rank: merge_small(sizes, edges, 25,
                                                                            rank=rank))
        assert np.array_equal(plain, compiled)
        assert np.count_nonzero(plain != np.arange(n)) > n // 2
    mean, low = rng.integers(0, 4, m) / 4, rng.integers(0, 50, m)
    high = low + rng.integers(0, 3, m)
    for scale in (1, 2**40):
        assert np.array_equal(graph._by_mean_then_ranks(mean, low * scale, high * scale),
                              np.lexsort((high * scale, low * scale, -mean)))
