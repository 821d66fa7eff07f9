"""Segmentation: affinities -> ids with mws, cc and waterz, in memory and block by block, the
output contract (no 0 inside the mask, no small segment with a neighbour), sweeps, and
`emrun segment` end to end. Synthetic cells made in code; affinities from the data
layer's own target code, so the offset convention is the one training uses."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import zarr
from scipy import ndimage
from typer.testing import CliRunner

from emrun.cli import app
from emrun.data.targets import Affinity, Patch
from emrun.errors import UserError
from emrun.geometry import Roi, box_of
from emrun.io import open_volume, write_volume
from emrun.recipe.run import ConnectedComponents, MutexWatershed, Waterz
from emrun.registry import segmenters
from emrun.segment import segment_array, segment_into
from emrun.segment.affinities import parse_offsets
from emrun.segment.boxes import crossing
from emrun.segment.graph import Edges, merge_small
from emrun.segment.mws import MutexSegmenter
from emrun.segment.sweep import sweep

runner = CliRunner()

OFFSETS = ((-1, 0, 0), (0, -1, 0), (0, 0, -1), (-2, 0, 0), (0, -3, 0), (0, 0, -3),
           (0, -9, 0), (0, 0, -9))
SHAPE = (16, 64, 64)


def blockwise(affs, offsets, segmenter, *, block, mask=None) -> np.ndarray:
    """Block by block in memory, with the stitching used for volumes on disk."""
    out = np.zeros(affs.shape[1:], np.uint64)
    segment_into(out, affs, offsets, segmenter, mask=mask, block=tuple(block))
    return out


def cells(shape=SHAPE, n=20, seed=0) -> np.ndarray:
    """Space-filling cells: the Voronoi regions of n random seeds (ids 1..n)."""
    rng = np.random.default_rng(seed)
    seeds = np.zeros(shape, np.int32)
    seeds[tuple(rng.integers(0, s, n) for s in shape)] = np.arange(1, n + 1)
    _, nearest = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    return seeds[tuple(nearest)]


def affinities(truth: np.ndarray, offsets=OFFSETS) -> np.ndarray:
    target, _ = Affinity(tuple(offsets), relabel=False)(Patch(labels=truth))
    return target.astype(np.float32)


def noisy(affs: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    """Affinities pulled towards 0.5 (0.2 / 0.8) plus Gaussian noise, clipped to [0, 1]."""
    rng = np.random.default_rng(seed)
    return np.clip(affs * 0.6 + 0.2 + rng.normal(0, sigma, affs.shape), 0, 1).astype(np.float32)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to relabelling (a bijection between the ids)."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return pairs.shape[1] == np.unique(a).size == np.unique(b).size


def arand(seg: np.ndarray, truth: np.ndarray) -> float:
    """1 - F-score of pair counts (every voxel scored): 0 when equal up to ids."""
    _, pair_counts = np.unique(np.stack([seg.ravel(), truth.ravel()]), axis=1,
                               return_counts=True)
    _, seg_counts = np.unique(seg, return_counts=True)
    _, truth_counts = np.unique(truth, return_counts=True)
    n2 = float((pair_counts.astype(float) ** 2).sum())
    return 1 - 2 * n2 / float((seg_counts.astype(float) ** 2).sum()
                              + (truth_counts.astype(float) ** 2).sum())


def build(spec):
    return segmenters.build(spec)


# --------------------------------------------------------------------------- methods


@pytest.mark.parametrize("spec", [MutexWatershed(), MutexWatershed(bias=1.0),
                                  ConnectedComponents(), MutexWatershed(min_size=50)],
                         ids=["mws", "mws-bias1", "cc", "mws-min-size"])
def test_perfect_affinities_give_the_truth(spec):
    truth = cells()
    seg = segment_array(affinities(truth), OFFSETS, build(spec))
    assert seg.dtype == np.uint64
    assert same_partition(seg, truth)
    assert set(np.unique(seg)) == set(range(1, 21))  # ids 1..K


def test_nearest_neighbour_channels_alone_suffice_for_mws():
    truth = cells()
    nearest = OFFSETS[:3]
    seg = segment_array(affinities(truth, nearest), nearest, build(MutexWatershed()))
    assert same_partition(seg, truth)


def test_uint8_affinities_as_inference_writes_them():
    truth = cells()
    affs = noisy(affinities(truth), 0.05)
    as_uint8 = np.round(affs * 255).astype(np.uint8)
    for spec in (MutexWatershed(), ConnectedComponents()):
        seg = segment_array(as_uint8, OFFSETS, build(spec))  # read as round(255 p)
        assert same_partition(seg, truth)
        assert same_partition(blockwise(as_uint8, OFFSETS, build(spec), block=(8, 32, 32)),
                              truth)


def test_cc_joins_by_edges_not_by_foreground():
    # Two columns of one "foreground": a low affinity between x=1 and x=2 separates them.
    affs = np.ones((3, 1, 2, 4), np.float32)
    affs[2, :, :, 2] = 0.1  # channel (0, 0, -1) at x=2 links x=2 with x=1
    seg = segment_array(affs, OFFSETS[:3], build(ConnectedComponents()))
    assert np.unique(seg[..., :2]).size == 1 and np.unique(seg[..., 2:]).size == 1
    assert seg[0, 0, 0] != seg[0, 0, 3]


def test_mws_higher_bias_splits_more():
    truth = cells()
    affs = noisy(affinities(truth), 0.2, seed=1)
    counts = [int(segment_array(affs, OFFSETS, build(MutexWatershed(bias=b))).max())
              for b in (0.5, 0.7, 0.9)]
    assert counts[0] < counts[1] < counts[2]


def test_every_voxel_gets_an_id_and_small_segments_merge():
    truth = cells()
    affs = noisy(affinities(truth), 0.3, seed=2)
    loose = segment_array(affs, OFFSETS, build(MutexWatershed()))
    assert (loose != 0).all()  # voxels mwatershed leaves alone get ids of their own
    sizes = np.bincount(loose.ravel().astype(np.int64))[1:]
    assert sizes.min() < 30  # there are small segments to merge
    merged = segment_array(affs, OFFSETS, build(MutexWatershed(min_size=30)))
    assert (merged != 0).all()
    assert np.bincount(merged.ravel().astype(np.int64))[1:].min() >= 30
    assert arand(merged, truth) < arand(loose, truth)


def test_mask_leaves_zero_outside_and_keeps_isolated_small_segments():
    truth = cells()
    affs = noisy(affinities(truth), 0.1)
    mask = np.zeros(SHAPE, bool)
    mask[:, 8:56, 8:56] = True
    mask[:, 0:2, 0:2] = True  # 64 voxels cut off from the rest: no neighbour to merge into
    for spec in (MutexWatershed(min_size=100), ConnectedComponents(min_size=100)):
        seg = segment_array(affs, OFFSETS, build(spec), mask=mask)
        assert (seg[~mask] == 0).all() and (seg[mask] != 0).all()
        island = np.unique(seg[:, 0:2, 0:2])
        assert island.size >= 1 and not np.isin(island, seg[:, 8:56, 8:56]).any()
        main = np.bincount(seg[:, 8:56, 8:56].ravel().astype(np.int64))
        assert main[main > 0].min() >= 100


def test_merge_small_joins_the_strongest_neighbour_until_large():
    sizes = np.array([0, 100, 100, 5, 3])
    # 3 touches 1 weakly and 2 strongly; 4 touches only 3
    edges = Edges.aggregate(np.array([3, 3, 4, 1]), np.array([1, 2, 3, 2]),
                            np.array([0.2, 0.9, 0.7, 0.1]))
    table = merge_small(sizes, edges, min_size=10)
    assert table[3] == table[2] == table[4] and table[1] != table[2]
    assert (merge_small(sizes, edges, min_size=0) == np.arange(5)).all()


# --------------------------------------------------------------------------- blockwise


@pytest.mark.parametrize("offset", [(-1, 0, 0), (0, 0, -9), (-2, -3, 0), (1, 0, -2)])
def test_crossing_boxes_cover_each_leaving_voxel_once(offset):
    shape = (6, 7, 12)
    box = Roi((2, 0, 3), (3, 4, 9))
    core = box.to_slices()
    count = np.zeros(shape, int)
    for piece in crossing(box, offset, box_of(shape)):
        count[piece.to_slices()] += 1
    expected = np.zeros(shape, int)
    for v in np.ndindex(*shape):
        inside = all(s.start <= c < s.stop for c, s in zip(v, core, strict=True))
        partner = [c + d for c, d in zip(v, offset, strict=True)]
        in_volume = all(0 <= p < n for p, n in zip(partner, shape, strict=True))
        in_core = all(s.start <= p < s.stop for p, s in zip(partner, core, strict=True))
        expected[v] = inside and in_volume and not in_core
    assert (count == expected).all()


@pytest.mark.parametrize("min_size", [0, 20])
def test_blockwise_cc_equals_whole_volume_cc(min_size):
    truth = cells(seed=3)
    affs = noisy(affinities(truth), 0.15, seed=3)
    segmenter = build(ConnectedComponents(threshold=0.7, min_size=min_size))
    whole = segment_array(affs, OFFSETS, segmenter)
    assert whole.max() > 10 and not same_partition(whole, truth)  # leaks: not trivial
    for block in [(8, 32, 32), (5, 17, 40)]:
        blocked = blockwise(affs, OFFSETS, segmenter, block=block)
        assert same_partition(blocked, whole), block


def test_blockwise_mws_stays_close_to_whole_volume_mws():
    truth = cells(shape=(24, 96, 96), n=40, seed=4)
    affs = noisy(affinities(truth), 0.2, seed=4)
    segmenter = build(MutexWatershed(min_size=20))
    whole = segment_array(affs, OFFSETS, segmenter)
    blocked = blockwise(affs, OFFSETS, segmenter, block=(12, 48, 48))
    assert (blocked != 0).all()
    assert np.bincount(blocked.ravel().astype(np.int64))[1:].min() >= 20
    # every segment is one connected piece: ids of different blocks never collide
    for seg_id in np.unique(blocked):
        _, pieces = ndimage.label(blocked == seg_id)
        assert pieces == 1
    assert arand(whole, truth) < 0.1
    assert arand(blocked, truth) < arand(whole, truth) + 0.05
    assert arand(blocked, whole) < 0.1


def test_blockwise_with_perfect_affinities_is_exact_for_mws():
    truth = cells(seed=5)
    seg = blockwise(affinities(truth), OFFSETS, build(MutexWatershed()), block=(8, 24, 40))
    assert same_partition(seg, truth)


# --------------------------------------------------------------------------- waterz


def test_waterz_gives_the_truth_per_threshold():
    pytest.importorskip("waterz")
    truth = cells()
    affs = noisy(affinities(truth), 0.05)
    for scoring in ("mean", "p85"):
        segmenter = build(Waterz(thresholds=[0.3], scoring=scoring))
        assert same_partition(segment_array(affs, OFFSETS, segmenter), truth)
    from emrun.segment import segment_values

    segmenter = build(Waterz())
    low, high = segment_values(affs, OFFSETS, segmenter, [0.3, 0.95])
    assert same_partition(low, truth)
    assert high.max() < 20  # a threshold near 1 merges across boundaries


def test_waterz_runs_in_memory_while_the_machine_has_room(tmp_path, monkeypatch):
    pytest.importorskip("waterz")
    from emrun.segment import job

    truth = cells()
    affs_path = write_prediction(tmp_path, affinities(truth))
    monkeypatch.setattr(job, "MEMORY_BYTES", 1024)  # beyond the blockwise switch
    monkeypatch.setattr(job, "available_memory", lambda: 2**34)
    result = invoke(affs_path, tmp_path / "seg.zarr", "--method", "waterz", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["mode"] == "memory"
    assert same_partition(open_volume(tmp_path / "seg.zarr/segmentation").read(), truth)
    monkeypatch.setattr(job, "available_memory", lambda: 2**20)
    full = invoke(affs_path, tmp_path / "other.zarr", "--method", "waterz")
    assert full.exit_code == 2 and "GiB this machine has free" in full.output
    blocks = invoke(affs_path, tmp_path / "other.zarr", "--method", "waterz", "--block",
                    "8", "32", "32")
    assert blocks.exit_code == 2 and "drop --block" in blocks.output


def test_waterz_without_the_package_is_a_clear_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "waterz", None)
    with pytest.raises(UserError, match=r"emrun\[waterz\]"):
        segment_array(affinities(cells()), OFFSETS, build(Waterz()))


# --------------------------------------------------------------------------- sweep


def known_answer():
    """Affinities 0.8 inside cells, 0.4 across boundaries: cc is right for thresholds in
    (0.4, 0.8), one segment below, all singletons above."""
    truth = cells()
    affs = (affinities(truth, OFFSETS[:3]) * 0.4 + 0.4).astype(np.float32)
    return truth, affs


def test_sweep_picks_the_value_with_the_lowest_adapted_rand():
    pytest.importorskip("emrun.evaluate")
    truth, affs = known_answer()
    found = sweep(affs, OFFSETS[:3], ConnectedComponents(), [0.2, 0.6, 0.9], truth)
    assert found.parameter == "threshold" and found.best_value == 0.6
    assert not found.at_edge and found.summary()["at_edge"] is False
    assert found.best_scores["arand"] == pytest.approx(0.0, abs=1e-9)
    edge = sweep(affs, OFFSETS[:3], ConnectedComponents(), [0.2, 0.3, 0.6], truth)
    assert edge.best_value == 0.6 and edge.at_edge  # a wider range might do better
    assert same_partition(found.segmentation, truth)
    table = found.table()
    assert [row["threshold"] for row in table] == [0.2, 0.6, 0.9]
    assert table[0]["arand"] > 0.5 and table[2]["arand"] > 0.5


def test_parallel_sweep_equals_the_sequential_sweep():
    """Values segmented side by side in worker processes (inputs in shared memory) give the
    same table, choice and segmentation as one after another, with and without a mask."""
    truth = cells(n=30, seed=3)
    affs = noisy(affinities(truth), 0.15, seed=3)
    mask = np.ones(SHAPE, bool)
    mask[:, :, :5] = False
    for m in (None, mask):
        spec = MutexWatershed(min_size=10)
        one = sweep(affs, OFFSETS, spec, [0.3, 0.5, 0.7], truth, m, workers=1)
        two = sweep(affs, OFFSETS, spec, [0.3, 0.5, 0.7], truth, m, workers=2)
        assert one.table() == two.table() and one.best == two.best
        assert np.array_equal(one.segmentation, two.segmentation)
    from multiprocessing import active_children
    assert not active_children()  # the pool is gone when the sweep returns


SCRIPT = """
from multiprocessing import shared_memory
import numpy as np
from emrun.recipe.run import MutexWatershed
from emrun.segment.sweep import sweep
made = []
real_init = shared_memory.SharedMemory.__init__
def recording(self, *args, **kwargs):
    real_init(self, *args, **kwargs)
    if kwargs.get("create") or (len(args) > 1 and args[1]):
        made.append(self.name)
shared_memory.SharedMemory.__init__ = recording
if __name__ == "__main__":
    truth = np.random.default_rng(0).integers(1, 4, (8, 32, 32))
    affs = np.random.default_rng(1).random((3, 8, 32, 32)).astype(np.float32)
    sweep(affs, [(-1, 0, 0), (0, -1, 0), (0, 0, -1)], MutexWatershed(), [0.3, 0.7], truth,
          workers=2)
    print("made", *made)
    print("done")
"""


def test_parallel_sweep_leaves_no_shared_memory_and_no_tracker_noise(tmp_path):
    """The parent's unlink is the one clean-up: no block is left in /dev/shm, and the
    resource tracker reports nothing (no 'leaked', no KeyError) when the program ends."""
    import subprocess
    from pathlib import Path

    script = tmp_path / "sweep_script.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "done" in done.stdout, done.stderr
    assert "KeyError" not in done.stderr and "leaked" not in done.stderr, done.stderr
    (line,) = [row for row in done.stdout.splitlines() if row.startswith("made")]
    made = line.split()[1:]
    assert made  # the sweep shared its input (else this test shows nothing)
    if Path("/dev/shm").is_dir():  # only its own blocks: other tests may hold some now
        assert not [name for name in made if (Path("/dev/shm") / name.lstrip("/")).exists()]


class DyingSegmenter(MutexSegmenter):
    """A segmenter whose worker process dies, as one killed for memory would."""

    def fragments(self, affs, offsets, mask):
        import os

        os._exit(3)


def test_a_dead_sweep_worker_is_reported_not_hung():
    truth = cells(shape=(4, 16, 16), n=3)
    with pytest.raises(RuntimeError, match=r"sweep worker died while segmenting bias 0\.3"):
        sweep(affinities(truth), OFFSETS, DyingSegmenter(MutexWatershed()), [0.3, 0.5], truth,
              workers=2)


def test_sweep_workers_follow_cores_memory_and_method():
    from emrun.segment.parallel import parallel_workers, shares_work
    from emrun.segment.waterz import WaterzSegmenter

    # one per value at most, one per core at most, as many as 80 % of the memory holds
    assert parallel_workers(5, 10**6, 1000, cores=16, memory=10**12) == 5
    assert parallel_workers(5, 10**6, 1000, cores=2, memory=10**12) == 2
    assert parallel_workers(5, 10**6, 1000, cores=16, memory=3 * 10**9) == 2
    assert parallel_workers(5, 10**6, 1000, cores=16, memory=10**8) == 1
    # waterz refines one agglomeration through the thresholds: its sweep stays in-process
    assert shares_work(WaterzSegmenter(Waterz()))
    assert not shares_work(MutexSegmenter(MutexWatershed()))
    with pytest.raises(UserError, match="workers"):
        sweep(np.zeros((3, 4, 4, 4), np.float32), OFFSETS[:3], ConnectedComponents(), [0.5],
              np.ones((4, 4, 4), np.int32), workers=0)


# --------------------------------------------------------------------------- command line


def write_prediction(folder, affs, offsets=OFFSETS, attrs=True, name="affinity"):
    """Affinities the way `emrun infer` writes them: uint8 OME-Zarr group with offsets."""
    data = np.round(affs * 255).astype(np.uint8)
    extra = {"offsets": [list(o) for o in offsets]} if attrs else None
    write_volume(folder / "pred.zarr", name, data, voxel_size=(30, 6, 6), channel_axis=True,
                 attrs=extra)
    return f"{folder / 'pred.zarr'}/{name}"


def invoke(*args):
    return runner.invoke(app, ["segment", *map(str, args)])


def test_cli_segments_an_inference_output(tmp_path):
    truth = cells()
    affs_path = write_prediction(tmp_path, noisy(affinities(truth), 0.05))
    out = tmp_path / "seg.zarr"
    result = invoke(affs_path, out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["method"] == "mws" and report["mode"] == "memory"
    assert report["outputs"] == [{"name": "segmentation", "bias": 0.5, "segments": 20}]
    volume = open_volume(out / "segmentation")
    assert volume.dtype == np.uint64 and volume.voxel_size == (30.0, 6.0, 6.0)
    assert same_partition(volume.read(), truth)
    attrs = dict(zarr.open_group(str(out / "labels/segmentation"), mode="r").attrs)["emrun"]
    assert attrs["segment"]["segmenter"] == {"type": "mws", "bias": 0.5, "min_size": 0}
    assert attrs["segment"]["offsets"][3] == [-2, 0, 0]


def test_cli_blockwise_cc_and_one_output_per_value(tmp_path):
    truth = cells()
    affs_path = write_prediction(tmp_path, noisy(affinities(truth), 0.05))
    out = tmp_path / "seg.zarr"
    # the output folder of `emrun infer` stands for its one affinity volume
    result = invoke(tmp_path / "pred.zarr", out, "--method", "cc", "--block", 8, 32, 32,
                    "--min-size", 5, "--name", "cc")
    assert result.exit_code == 0, result.output
    assert same_partition(open_volume(out / "cc").read(), truth)
    meta = dict(zarr.open_group(str(out / "labels/cc"), mode="r").attrs)["emrun"]["segment"]
    assert meta["blockwise"]["blocks"] == 8 and meta["segments"] == 20
    result = invoke(affs_path, out, "--method", "cc", "--threshold", "0.45,0.6",
                    "--threshold", "0.6", "--name", "t")  # each value once (0.6 twice failed)
    assert result.exit_code == 0, result.output
    for name in ("t_0.45", "t_0.6"):
        assert same_partition(open_volume(out / name).read(), truth)


def test_cli_offsets_option_for_affinities_without_attribute(tmp_path):
    truth = cells()
    affs_path = write_prediction(tmp_path, affinities(truth, OFFSETS[:3]), OFFSETS[:3],
                                 attrs=False)
    result = invoke(affs_path, tmp_path / "seg.zarr", "--offsets", "-1,0,0 0,-1,0 0,0,-1")
    assert result.exit_code == 0, result.output
    assert same_partition(open_volume(tmp_path / "seg.zarr/segmentation").read(), truth)


def test_run_segment_takes_a_recipe_spec_and_a_mask(tmp_path):
    from emrun.segment.job import run_segment
    from emrun.segment.request import SegmentRequest

    truth = cells()
    affs_path = write_prediction(tmp_path, noisy(affinities(truth), 0.05))
    mask = np.zeros(SHAPE, np.uint8)
    mask[2:14, 5:60, 5:60] = 1
    write_volume(tmp_path / "mask.zarr", "mask", mask)
    result = run_segment(SegmentRequest(affs_path, tmp_path / "seg.zarr",
                                        mask=f"{tmp_path}/mask.zarr/mask",
                                        spec=ConnectedComponents(threshold=0.5, min_size=5)))
    assert result.method == "cc" and result.parameters["min_size"] == 5
    seg = open_volume(tmp_path / "seg.zarr/segmentation").read()
    assert (seg[mask == 0] == 0).all() and (seg[mask == 1] != 0).all()
    assert same_partition(seg[mask == 1], truth[mask == 1])


def test_cli_sweep_writes_the_best_and_records_the_table(tmp_path):
    pytest.importorskip("emrun.evaluate")
    truth, affs = known_answer()
    affs_path = write_prediction(tmp_path, affs, OFFSETS[:3])
    write_volume(tmp_path / "truth.zarr", "labels", truth.astype(np.uint32))
    out = tmp_path / "seg.zarr"
    result = invoke(affs_path, out, "--method", "cc", "--sweep", "--truth",
                    tmp_path / "truth.zarr/labels", "--threshold", "0.2",
                    "--threshold", "0.6,0.9", "--workers", "2", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["sweep"]["chosen"] == 0.6 and "edge" not in result.stderr
    assert [row["threshold"] for row in report["sweep"]["table"]] == [0.2, 0.6, 0.9]
    # each value reported as it is scored (a sweep of a large volume takes minutes)
    assert "] threshold 0.9: adapted Rand error" in result.stderr and "(3 of 3)" in result.stderr
    group = zarr.open_group(str(out / "labels/segmentation"), mode="r")
    meta = dict(group.attrs)["emrun"]["segment"]
    assert meta["sweep"]["chosen"] == 0.6 and len(meta["sweep"]["table"]) == 3
    assert meta["segmenter"]["threshold"] == 0.6
    assert same_partition(open_volume(out / "segmentation").read(), truth)
    one = invoke(affs_path, out, "--method", "cc", "--sweep", "--truth",
                 tmp_path / "truth.zarr/labels", "--threshold", "0.9", "--name", "one", "--json")
    assert one.exit_code == 0, one.output  # one value given: a sweep of that value alone
    assert "edge" not in one.stderr
    edge = invoke(affs_path, out, "--method", "cc", "--sweep", "--truth",
                  tmp_path / "truth.zarr/labels", "--threshold", "0.2,0.6", "--name", "edge")
    assert edge.exit_code == 0 and "at the edge of the values tried (0.2 ... 0.6)" in edge.stderr
    assert [r["threshold"] for r in json.loads(one.stdout.strip().splitlines()[-1])["sweep"][
        "table"]] == [0.9]


def test_cli_sweep_against_the_truths_connected_pieces(tmp_path):
    truth, affs = known_answer()
    near = ndimage.binary_dilation(truth == 1)
    far = next(i for i in range(2, 21) if not (near & (truth == i)).any())
    labels = np.where(truth == far, 1, truth).astype(np.uint32)  # one id on two cells apart
    affs_path = write_prediction(tmp_path, affs, OFFSETS[:3])
    write_volume(tmp_path / "truth.zarr", "labels", labels)
    args = [affs_path, tmp_path / "seg.zarr", "--method", "cc", "--sweep", "--truth",
            tmp_path / "truth.zarr/labels", "--threshold", "0.6", "--json"]
    plain = invoke(*args, "--name", "plain")
    connected = invoke(*args, "--connected-truth")
    assert plain.exit_code == 0 and connected.exit_code == 0, connected.output
    plain_sweep = json.loads(plain.stdout.strip().splitlines()[-1])["sweep"]
    sweep_ = json.loads(connected.stdout.strip().splitlines()[-1])["sweep"]
    assert plain_sweep["best"]["arand"] > 0 and not plain_sweep["connected_truth"]
    assert sweep_["best"]["arand"] == 0 and sweep_["connected_truth"]
    alone = invoke(affs_path, tmp_path / "other.zarr", "--connected-truth")
    assert alone.exit_code == 2 and "--connected-truth is for --sweep" in alone.output


def test_sweep_reads_the_part_of_a_larger_truth_the_affinities_cover(tmp_path):
    truth, affs = known_answer()
    data = np.round(affs[:, 4:10] * 255).astype(np.uint8)  # predicted for z 4-9 only
    write_volume(tmp_path / "pred.zarr", "affinity", data, voxel_size=(30, 6, 6),
                 offset=(4, 0, 0), channel_axis=True,
                 attrs={"offsets": [list(o) for o in OFFSETS[:3]]})
    write_volume(tmp_path / "truth.zarr", "labels", truth.astype(np.uint32),
                 voxel_size=(30, 6, 6))
    result = invoke(f"{tmp_path}/pred.zarr/affinity", tmp_path / "seg.zarr", "--method", "cc",
                    "--sweep", "--truth", tmp_path / "truth.zarr/labels", "--threshold",
                    "0.2,0.6", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["sweep"]["chosen"] == 0.6 and report["sweep"]["best"]["arand"] == 0
    assert report["sweep"]["truth"].endswith("[4-9, 0-63, 0-63]")


@pytest.mark.parametrize("spec", [ConnectedComponents(), MutexWatershed()])
def test_in_memory_paths_read_only_the_channels_a_method_uses(tmp_path, spec):
    from emrun.segment.job import read_channels

    truth = cells()
    affs = noisy(affinities(truth), 0.05)
    volume = open_volume(write_prediction(tmp_path, affs))
    segmenter = build(spec)
    read, used = read_channels(volume, OFFSETS, segmenter)
    nearest = [c for c, o in enumerate(OFFSETS) if sum(map(abs, o)) == 1]
    expected = nearest if spec.type == "cc" else list(range(len(OFFSETS)))
    assert used == tuple(OFFSETS[c] for c in expected) and read.dtype == np.float32
    assert np.allclose(read, np.round(affs[expected] * 255) / 255, atol=1e-6)
    assert same_partition(segment_array(read, used, segmenter),
                          segment_array(affs, OFFSETS, segmenter))


def record_recipe(folder, segment: dict) -> None:
    """What `emrun infer` leaves on its output group: the resolved recipe."""
    group = zarr.open_group(str(folder / "pred.zarr"), mode="r+")
    group.attrs["emrun"] = {"recipe": {"name": "mine", "segment": segment}}


def test_cli_segments_with_the_recipe_the_affinities_record(tmp_path):
    truth, affs = known_answer()
    affs_path = write_prediction(tmp_path, affs, OFFSETS[:3])
    record_recipe(tmp_path, {"type": "cc", "threshold": 0.6, "min_size": 0})
    result = invoke(affs_path, tmp_path / "seg.zarr", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["method"] == "cc" and report["parameters"]["threshold"] == 0.6
    assert "the recipe 'mine' recorded in" in result.stderr
    assert same_partition(open_volume(tmp_path / "seg.zarr/segmentation").read(), truth)
    chosen = invoke(affs_path, tmp_path / "seg.zarr", "--method", "mws", "--name", "m",
                    "--json")  # the command's choice wins
    assert chosen.exit_code == 0 and "recorded" not in chosen.stderr
    assert json.loads(chosen.stdout.strip().splitlines()[-1])["method"] == "mws"
    record_recipe(tmp_path, {"type": "nope"})
    unknown = invoke(affs_path, tmp_path / "other.zarr")
    assert unknown.exit_code == 2 and "'nope'" in unknown.output and "--method" in unknown.output
    record_recipe(tmp_path, {"type": "mws", "bias": "x"})  # pydantic's text was four lines
    invalid = invoke(affs_path, tmp_path / "other.zarr")
    assert invalid.exit_code == 2 and len(invalid.stderr.splitlines()) == 1, invalid.stderr
    assert "(segmenter mws: bias: input should be a valid number" in invalid.stderr
    assert "errors.pydantic.dev" not in invalid.stderr


def bad_cases(tmp_path):
    """(arguments, expected message part) for each mistake a user can make."""
    truth = cells(shape=(4, 16, 16), n=3)
    good = write_prediction(tmp_path, affinities(truth))
    bare = write_prediction(tmp_path, affinities(truth), attrs=False, name="bare")
    write_volume(tmp_path / "pred.zarr", "labels", truth.astype(np.uint32))
    write_volume(tmp_path / "pred.zarr", "ints", affinities(truth).astype(np.int32),
                 channel_axis=True, attrs={"offsets": [list(o) for o in OFFSETS]})
    np.save(tmp_path / "complex.npy", affinities(truth).astype(np.complex64))
    write_volume(tmp_path / "small.zarr", "labels", np.ones((4, 16, 8), np.uint32))
    a_file = tmp_path / "file.zarr"
    a_file.write_text("not a folder")
    existing = tmp_path / "exists.zarr"
    write_volume(existing, "segmentation", truth.astype(np.uint64))
    out = tmp_path / "out.zarr"
    return [
        ([bare, out], "no 'offsets' attribute"),
        ([good, out, "--offsets", "[[-1,0,0],[0,-1,0],[0,0,-1]]"], "8 affinity channels but 3"),
        ([good, out, "--offsets", "[[-1,0]]"], "not three integers"),
        ([f"{tmp_path}/pred.zarr/labels", out], "is a 3D (z, y, x) volume"),
        ([f"{tmp_path}/pred.zarr/ints", out], "dtype int32"),
        ([tmp_path / "complex.npy", out, "--offsets", json.dumps(OFFSETS)], "complex64"),
        ([good, a_file], "is a file"),
        ([good, existing], "already exists"),
        ([good, out, "--sweep"], "give --truth"),
        ([good, out, "--workers", "2"], "--workers is for --sweep"),
        ([good, out, "--sweep", "--truth", tmp_path / "small.zarr/labels"], "shape"),
        ([good, out, "--method", "mwz"], "did you mean 'mws'"),
        ([good, out, "--method", "cc", "--bias", "0.3"], "takes --threshold"),
        ([good, out, "--method", "cc", "--threshold", "0.2,1.5"],
         "--threshold: segmenter cc: threshold: input should be less than 1 (got 1.5)"),
        ([good, out, "--method", "cc", "--threshold", "nan"],
         "threshold: must be a number, not nan"),  # pydantic said "less than 1"
        ([good, out, "--bias", "x"], "takes numbers"),
        ([good, out, "--method", "cc", "--threshold", "0.3,,0.5"], "separated by commas"),
        ([good, out, "--mask", tmp_path / "small.zarr/labels"], "mask"),
        ([tmp_path / "missing.zarr/affinity", out], "no such file"),
    ]


def test_cli_bad_input_exits_2_with_one_clear_line(tmp_path):
    for args, message in bad_cases(tmp_path):
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert "Traceback" not in result.output and "internal error" not in result.output
    assert not (tmp_path / "out.zarr" / "segmentation").exists()
    assert open_volume(tmp_path / "exists.zarr/segmentation").read().max() == 3  # untouched


@pytest.mark.parametrize("scheduler", [[], ["--scheduler", "local"]])
def test_a_taken_output_is_refused_before_segmenting(tmp_path, scheduler):
    """A segmentation already in the labels group, or a folder of the user's own that is no
    zarr store: refused before any work (it was refused only when writing, the work lost),
    and left as it was."""
    truth = cells(shape=(4, 16, 16), n=3)
    good = write_prediction(tmp_path, affinities(truth))
    taken = tmp_path / "taken.zarr"
    write_volume(taken, "segmentation", truth.astype(np.uint64), label=True)
    mine = tmp_path / "mine.zarr"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    for out, message in ((taken, "labels/segmentation: already exists"),
                         (mine, "is not a zarr store")):
        result = invoke(good, out, *scheduler)
        assert result.exit_code == 2 and message in result.output, result.output
        assert "segmenting" not in result.output and "fragments" not in result.output
    assert open_volume(taken / "labels/segmentation").read().max() == 3
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


# --------------------------------------------------------------------------- small parts


def test_offsets_are_read_from_json_or_triples():
    expected = ((-1, 0, 0), (0, -1, 0))
    assert parse_offsets("[[-1,0,0],[0,-1,0]]", "x") == expected
    assert parse_offsets("-1,0,0; 0,-1,0", "x") == expected
    assert parse_offsets([[-1, 0, 0], [0, -1, 0]], "x") == expected
    with pytest.raises(UserError, match="itself"):
        parse_offsets("0,0,0", "x")


def test_registry_builds_segmenters_from_recipe_specs():
    segmenter = segmenters.build(MutexWatershed(bias=0.3))
    assert isinstance(segmenter, MutexSegmenter) and segmenter.value == 0.3
    assert segmenter.with_value(0.7).spec.bias == 0.7
    with pytest.raises(UserError, match="bias"):
        segmenter.with_value(1.5)


def test_affinities_with_nan_are_a_user_error_not_a_panic(tmp_path):
    """mws used to panic in Rust (with a traceback) on NaN edge weights."""
    affs = np.full((3, 4, 16, 16), 0.9, np.float32)
    affs[0, 1, 2, 3] = np.nan
    affs[1, 2, 3, 4] = np.inf
    write_volume(tmp_path / "a.zarr", "affs", affs, channel_axis=True)
    result = runner.invoke(app, ["segment", str(tmp_path / "a.zarr/affs"),
                                 str(tmp_path / "s.zarr"), "--method", "mws", "--offsets",
                                 "-1,0,0;0,-1,0;0,0,-1"])
    assert result.exit_code == 2, result.output
    assert "2 NaN or infinite values" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "s.zarr" / "segmentation").exists()


@pytest.mark.parametrize(("low", "high"), [(-5.0, 5.0), (-1.0, 0.0), (0.2, 1.7)])
def test_affinities_outside_0_1_are_refused_as_logits(tmp_path, low, high):
    """Logits (or negated probabilities) segmented silently: one segment per voxel for the
    negatives. Probabilities a rounding error outside [0, 1] are still taken."""
    rng = np.random.default_rng(0)
    affs = rng.uniform(low, high, (3, 4, 16, 16)).astype(np.float32)
    write_volume(tmp_path / "a.zarr", "affs", affs, channel_axis=True)
    args = ["segment", str(tmp_path / "a.zarr/affs"), str(tmp_path / "s.zarr"), "--method",
            "mws", "--offsets", "-1,0,0;0,-1,0;0,0,-1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "outside [0, 1]; affinities are probabilities: apply a sigmoid" in result.stderr
    assert not (tmp_path / "s.zarr" / "segmentation").exists()
    edge = np.clip(rng.random((3, 4, 16, 16)), 0, 1).astype(np.float32)
    edge[0, 0, 0, 0], edge[1, 0, 0, 0] = -1e-6, 1 + 1e-6
    write_volume(tmp_path / "e.zarr", "affs", edge, channel_axis=True)
    args[1], args[2] = str(tmp_path / "e.zarr/affs"), str(tmp_path / "t.zarr")
    assert runner.invoke(app, args).exit_code == 0


def test_a_block_that_makes_millions_of_blocks_is_refused(tmp_path, monkeypatch):
    """`--block 1 1 1` made a block per voxel (and, on a real volume, billions of files)."""
    import emrun.capacity

    monkeypatch.setattr(emrun.capacity, "MAX_BLOCKS", 1000)
    affs = np.full((3, 4, 32, 32), 0.9, np.float32)
    write_volume(tmp_path / "a.zarr", "affs", affs, channel_axis=True)
    base = ["segment", str(tmp_path / "a.zarr/affs"), "--offsets", "-1,0,0;0,-1,0;0,0,-1",
            "--block", "1", "2", "2"]
    for extra in ([str(tmp_path / "s.zarr"), "--method", "mws"],
                  [str(tmp_path / "t.zarr"), "--method", "waterz", "--scheduler", "local"]):
        result = runner.invoke(app, [*base[:2], *extra, *base[2:]])
        assert result.exit_code == 2, result.output
        assert "--block 1 2 2: makes 1,024 blocks of the 4x32x32 volume" in result.stderr
    write_volume(tmp_path / "a.zarr", "ids", np.ones((4, 32, 32), np.uint32))
    scored = runner.invoke(app, ["evaluate", str(tmp_path / "a.zarr/ids"),
                                 str(tmp_path / "a.zarr/ids"), "--block", "1", "2", "2"])
    assert scored.exit_code == 2 and "makes" in scored.stderr, scored.output
