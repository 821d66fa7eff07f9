"""Two block-size traps: `emrun evaluate --block` thinner than the storage chunks decoded
every chunk once per block it holds, and the engine's weight sum was computed again for
every block when the block size is not a multiple of the lattice stride. Both now do the
work once, with the same results as before (scores; weights bit for bit)."""

from __future__ import annotations

import itertools
import pickle
from collections import Counter

import numpy as np
import pytest
import torch
from test_infer_speed_same import Exact, make_recipe

from emrun.evaluate import Parallel, binary_scores_volumes, blockwise, score_volumes
from emrun.evaluate.blockwise import prepare
from emrun.geometry import Roi, zyx
from emrun.infer.engine import Engine, overlap
from emrun.infer.plan import Layout
from emrun.io import open_volume, write_volume
from emrun.io.zarr_volume import ZarrVolume

SHAPE = (8, 32, 32)
CHUNKS = (4, 16, 16)  # 8 chunks per volume
THIN = (2, 8, 8)  # 64 blocks, 8 in each chunk


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A blocky truth whose objects cross every block face, a segmentation that splits and
    merges them, a mask and a foreground probability, in chunks of CHUNKS."""
    rng = np.random.default_rng(4)
    truth = rng.integers(0, 6, (4, 8, 8)).repeat(2, 0).repeat(4, 1).repeat(4, 2)
    truth = truth.astype(np.uint32)
    seg = ((truth.astype(np.uint64) * 3 + (rng.random(SHAPE) < 0.2)) % 7).astype(np.uint64)
    arrays = {"truth": truth, "seg": seg, "mask": (rng.random(SHAPE) < 0.9).astype(np.uint8),
              "pred": rng.integers(0, 256, SHAPE).astype(np.uint8)}
    folder = tmp_path_factory.mktemp("traps")
    for name, array in arrays.items():
        write_volume(folder / "v.zarr", name, array, chunks=CHUNKS)
    return {name: str(folder / "v.zarr" / name) for name in arrays}


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> Counter[tuple[str, tuple[int, ...]]]:
    """Every chunk each zarr read decodes (zarr decodes a chunk whole for any part of it),
    counted per (dataset, chunk index)."""
    counts: Counter[tuple[str, tuple[int, ...]]] = Counter()
    real = ZarrVolume._read

    def counting(self: ZarrVolume, roi: Roi) -> np.ndarray:
        ranges = [range(b // c, -(-e // c)) for b, e, c in zip(roi.begin, roi.end, CHUNKS,
                                                                 strict=True)]
        counts.update((str(self.dataset), index) for index in itertools.product(*ranges))
        return real(self, roi)

    monkeypatch.setattr(ZarrVolume, "_read", counting)
    return counts


def _opened(paths: dict[str, str], *names: str) -> list[ZarrVolume]:
    return [open_volume(paths[name]) for name in names]  # type: ignore[misc]


@pytest.mark.parametrize("connected_truth", [False, True])
def test_blocks_thinner_than_the_chunks_decode_each_chunk_once(volumes, decodes,
                                                                connected_truth):
    """64 blocks of 2 x 8 x 8 in chunks of 4 x 16 x 16, one worker: each chunk of each
    volume is decoded once (it was 8 times, once per block in it: 30x slower on
    64 x 512 x 512 in chunks of 64 x 256 x 256), and the scores are the streamed ones.
    With connected truth the planes beyond the blocks' faces read the next regions of the
    truth, of which the last few are kept: a region beyond in z is read again when its
    own blocks come (at most twice)."""
    opened = _opened(volumes, "seg", "truth", "mask")
    streamed = score_volumes(*opened, connected_truth=connected_truth)
    decodes.clear()
    blocks = score_volumes(*opened, connected_truth=connected_truth,
                           parallel=Parallel(workers=1, block=THIN))
    assert blocks == streamed
    assert len(decodes) == 3 * 8
    for (name, chunk), times in decodes.items():
        assert times == 1 or (name == "truth" and connected_truth and times == 2), \
            (name, chunk, times)


def test_binary_scores_in_thin_blocks_decode_each_chunk_once(volumes, decodes):
    opened = _opened(volumes, "pred", "truth", "mask")
    streamed = binary_scores_volumes(*opened, threshold=0.4)
    decodes.clear()
    assert binary_scores_volumes(*opened, threshold=0.4,
                                 parallel=Parallel(workers=1, block=THIN)) == streamed
    assert set(decodes.values()) == {1} and len(decodes) == 3 * 8


def test_worker_processes_score_thin_blocks_like_one_process(volumes, tmp_path, monkeypatch):
    """Blocks handed to two worker processes in region order, each worker keeping its own
    regions: the scores of one process."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    opened = _opened(volumes, "seg", "truth")
    assert score_volumes(*opened, connected_truth=True, parallel=Parallel(
        workers=2, block=(2, 16, 8))) == score_volumes(*opened, connected_truth=True)


def test_thin_blocks_are_taken_a_region_at_a_time(volumes):
    """The order blocks are scored in keeps each chunk's blocks together (raster order
    visited a chunk's 8 blocks among 56 others: one kept region could not serve them)."""
    work = prepare(_opened(volumes, "seg", "truth"), THIN)
    order = work.order()
    assert sorted(order) == list(range(len(work.grid))) == list(range(64))
    counts = tuple(work.grid.counts)
    regions = [tuple(int(i) * b // c for i, b, c in zip(np.unravel_index(n, counts), THIN,
                                                         CHUNKS, strict=True))
               for n in order]
    runs = [key for key, _ in itertools.groupby(regions)]
    assert len(runs) == len(set(runs)) == 8  # each chunk's blocks in one run


def test_a_worker_process_decodes_each_region_once_over_its_tasks(volumes, decodes,
                                                                   tmp_path):
    """A local worker process loads the saved work once (`load_work`), so the region its
    first block decoded serves the next blocks of that region, task after task; loaded per
    task, every block would decode its whole region (8 blocks of a chunk: 8 decodes)."""
    from emrun.evaluate import schedule
    from emrun.evaluate.blockwise import save_work

    work = prepare(_opened(volumes, "seg", "truth"), THIN)
    save_work(tmp_path, work)
    blockwise.load_work.cache_clear()
    run = work.runs()[0]
    for index in run:  # one task per block, as when there are fewer regions than workers
        schedule._score_here(str(tmp_path), [index])
    blockwise.load_work.cache_clear()
    assert len(run) == 8
    assert sorted(decodes.values()) == [1, 1]  # one chunk of each volume, once


def test_workers_are_handed_a_region_s_blocks_together(volumes):
    """Blocks handed out one by one went to every worker in turn, so each worker decoded
    every region; `Work.runs` are the tasks: each region's blocks, in order, once."""
    work = prepare(_opened(volumes, "seg", "truth"), THIN)
    runs = work.runs()
    assert [i for run in runs for i in run] == work.order()
    assert len(runs) == 8 and {len(run) for run in runs} == {8}
    counts = tuple(work.grid.counts)
    for run in runs:
        regions = {tuple(int(i) * b // c for i, b, c in zip(
            np.unravel_index(n, counts), THIN, CHUNKS, strict=True)) for n in run}
        assert len(regions) == 1
    whole = prepare(_opened(volumes, "seg", "truth"), CHUNKS)
    assert whole.runs() == [[i] for i in range(len(whole.grid))]  # no shared regions


def test_blocks_of_whole_chunks_read_the_volumes_as_they_are(volumes):
    """Blocks as thick as the chunks (or thicker) read straight from the volumes, in raster
    order: no region is kept (nor its memory)."""
    for block in (CHUNKS, (8, 16, 32), None):
        work = prepare(_opened(volumes, "seg", "truth"), block)
        assert not any(isinstance(v, blockwise.Regions) for v in work.volumes)
        assert work.order() == list(range(len(work.grid)))


def test_a_region_read_is_the_callers_to_change_and_is_not_pickled(volumes):
    """A block read from a kept region is a copy (scoring may change its arrays in place);
    the work pickled for the workers carries no region."""
    work = prepare(_opened(volumes, "seg", "truth"), THIN)
    seg = work.volumes[0]
    roi = Roi((2, 8, 0), THIN)
    first = seg.read(roi)
    want = first.copy()
    first[...] = 99
    np.testing.assert_array_equal(seg.read(roi), want)
    np.testing.assert_array_equal(seg.read(roi), open_volume(volumes["seg"]).read(roi))
    again = pickle.loads(pickle.dumps(work))
    assert "_kept" in seg.__dict__ and "_kept" not in again.volumes[0].__dict__


# --------------------------------------------------------------------- the weight sums


def _engine(overlap_: list[float]) -> Engine:
    recipe = make_recipe(overlap=overlap_)
    return Engine(recipe, Exact(recipe.head_channels()).eval(), torch.device("cpu"))


def _lattice_sum(engine: Engine, layout: Layout, block: tuple[int, int, int]) -> torch.Tensor:
    """The weight as defined: every covering patch's window added in lattice order."""
    begin, end = layout.write_bounds(block)
    shape = tuple(e - b for b, e in zip(begin, end, strict=True))
    weight = torch.zeros(shape)
    starts = [[s - b for s in layout.covering(a, b, e)]
              for a, (b, e) in enumerate(zip(begin, end, strict=True))]
    for start in itertools.product(*starts):
        place = overlap(zyx(start), engine.patch, (0, 0, 0), zyx(shape))
        assert place is not None
        weight[place[0]] += engine.window[place[1]]
    return weight


def test_blocks_off_the_stride_share_their_weight_sum():
    """Sixteen blocks along x, 25 voxels wide on a stride of 12 (twelve phases, more than
    the sums kept): the weight is summed twice, for the first block (the lattice's first
    start cuts it) and once for all the others, whatever their phase (the lattice goes on
    past the last), not for each block (one add per covering patch each time), and every
    block's weight is the lattice sum to the last bit."""
    engine = _engine([0.25, 0.25, 0.25])
    assert engine.patch == (4, 16, 16) and engine.stride == (3, 12, 12)
    layout = Layout((9, 16, 400), engine.patch, engine.stride, (9, 16, 25), (9, 16, 25))
    weights = [engine._weight(layout, block) for block in layout.block_grid()]
    assert len(weights) == 16
    sums = {w.untyped_storage().data_ptr() for w in weights}  # all alive: distinct if new
    assert len(sums) == 2
    for block, weight in zip(layout.block_grid(), weights, strict=True):
        assert torch.equal(weight, _lattice_sum(engine, layout, block)), block


@pytest.mark.parametrize("overlap_", [[0.25, 0.25, 0.25], [0.5, 0.5, 0.5], [0.4, 0.3, 0.6]])
def test_weights_are_the_lattice_sums_bit_for_bit_for_any_block(overlap_):
    """Random volume and block sizes (multiples of the stride or not, thinner than a patch,
    cut by the volume's end): each block's weight equals its lattice sum exactly, whether
    cut from a shared sum or summed for it (blocks placed alike must share the bits)."""
    rng = np.random.default_rng(sum(int(o * 10) for o in overlap_))
    engine = _engine(overlap_)
    for _ in range(4):
        block = zyx(int(rng.integers(1, 3 * p + 1)) for p in engine.patch)
        shape = zyx(int(rng.integers(1, 4 * b + 1)) for b in block)
        layout = Layout(shape, engine.patch, engine.stride, block, block)
        for index in layout.block_grid():
            assert torch.equal(engine._weight(layout, index),
                               _lattice_sum(engine, layout, index)), (layout, index)


def _predicted(engine: Engine, image: np.ndarray, block: tuple[int, int, int]
               ) -> list[dict[str, np.ndarray]]:
    """Each block's blended prediction of ``image`` (every other owner recomputed)."""
    from emrun.infer.array import ArrayVolume

    volume = ArrayVolume.of(image)
    layout = Layout(zyx(image.shape), engine.patch, engine.stride, block, block)
    found = []
    for index in layout.block_grid():
        raw = engine.read_input(volume, layout, index)
        assert raw is not None
        values = engine.predict(raw, layout, index, (0.0, 255.0)).values
        found.append({name: tensor.numpy().copy() for name, tensor in values.items()})
    return found


def test_predictions_divided_by_a_shared_sum_are_the_same_bits(monkeypatch):
    """A volume predicted in blocks off the stride: the same bits with weights cut from
    shared sums as with each block's own lattice sum (the divide takes the cut view)."""
    image = (np.random.default_rng(2).random((9, 40, 100)) * 255).astype(np.uint8)
    shared = _predicted(_engine([0.25, 0.25, 0.25]), image, (9, 20, 20))
    monkeypatch.setattr(Engine, "_weight", _lattice_sum)
    alone = _predicted(_engine([0.25, 0.25, 0.25]), image, (9, 20, 20))
    assert len(shared) == len(alone) == 10
    for mine, theirs in zip(shared, alone, strict=True):
        for name in mine:
            assert np.array_equal(mine[name], theirs[name]), name
