"""Each patch predicted once: ownership, hand-over within a unit, exact recomputation."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch
import yaml
from test_infer import make_inputs, read, reference

from emrun.infer.job import prepare_job
from emrun.infer.plan import Layout, Tiling, choose_tiling, units
from emrun.infer.run import run_inference
from emrun.infer.schedule import job_units
from emrun.infer.worker import BlockWorker
from emrun.io.write import write_volume

BLOCK = (4, 16, 16)
LAYOUTS = [
    Layout((11, 37, 45), (4, 16, 16), (2, 12, 12), (4, 16, 16), (4, 16, 16)),
    Layout((48, 384, 384), (12, 64, 64), (9, 48, 48), (36, 64, 64), (36, 192, 192)),
    Layout((7, 50, 9), (5, 20, 20), (5, 10, 20), (1, 10, 3), (3, 10, 3)),  # blocks < patch
    Layout((3, 5, 7), (4, 16, 16), (3, 12, 12), (3, 5, 7), (3, 5, 7)),  # one block
]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_patch_has_one_owner_and_reaches_only_later_blocks(layout):
    lattice = set(itertools.product(*(layout.starts(a) for a in range(3))))
    owned = [p for b in layout.block_grid() for p in layout.owned_patches(b)]
    assert len(owned) == len(set(owned)) == len(lattice) == layout.patch_count()
    assert set(owned) == lattice
    for block in layout.block_grid():
        batches = layout.batches(block, 3)
        assert sorted(p for b in batches for p in b) == layout.owned_patches(block)
        assert all(len(b) == 3 for b in batches[:-1])
        owners = layout.owners(block)
        assert owners == sorted(owners) and all(
            all(o <= b for o, b in zip(owner, block, strict=True)) for owner in owners)
        for patch in layout.owned_patches(block):
            assert layout.owner(patch) == block
            assert all(r >= b for r, b in zip(layout.reach(patch), block, strict=True))
        for later in layout.reached(block):
            assert block in layout.owners(later)


def test_units_tile_the_grid_and_fit_the_budget():
    layout = LAYOUTS[1]
    grid = layout.block_grid()
    assert choose_tiling(layout, 6, 1, 1 << 40).unit == layout.grid()  # room: one unit
    for workers in (2, 3, 4, 8):
        tiling = choose_tiling(layout, 6, workers, 1 << 40)
        groups = units(layout, grid, tiling)
        assert len(groups) >= workers
        assert sorted(b for g in groups for b in g) == sorted(grid)
        for group in groups:  # every block after the blocks that own patches reaching it
            for i, block in enumerate(group):
                assert all(o in group[:i + 1] for o in layout.owners(block) if o in group)
    tight = choose_tiling(layout, 6, 1, 1)  # no room for partial sums: a block per unit
    assert tight.unit == (1, 1, 1)


def test_the_order_keeps_the_plane_with_the_fewest_blocks_waiting():
    """A unit is predicted plane by plane across its slowest axis: partial sums for the next
    plane wait longest, so the axis with the most blocks goes slowest."""
    layout = Layout((120, 4096, 512), (20, 256, 256), (15, 192, 192), (30, 256, 256),
                    (60, 768, 512))
    tiling = choose_tiling(layout, 12, 1, 1 << 40)
    assert tiling.unit == (2, 6, 1) and tiling.order[0] == 1  # y: 6 blocks, the most
    blocks = units(layout, layout.block_grid(), tiling)[0]
    assert blocks[:2] == [(0, 0, 0), (1, 0, 0)]  # z before y
    assert units(layout, layout.block_grid(), Tiling((2, 6, 1)))[0][:2] == [(0, 0, 0), (0, 1, 0)]


@pytest.fixture
def inputs(tmp_path):
    recipe, model, volume, tmp = make_inputs(tmp_path, shape=(12, 40, 48))
    return recipe, model, volume, tmp


def worker_for(recipe, tmp, name, **job):
    job = prepare_job(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), tmp / name,
                      block=BLOCK, **job)
    return BlockWorker(job, torch.device("cpu")), job


def test_one_worker_predicts_every_patch_once(inputs):
    recipe, model, volume, tmp = inputs
    worker, job = worker_for(recipe, tmp, "once.zarr")
    assert len(job.layout.block_grid()) == 27
    worker.run(job.pending())
    assert worker.engine.predicted_patches == job.layout.patch_count()
    np.testing.assert_allclose(read(tmp / "once.zarr"), reference(recipe, model, volume),
                               atol=1e-5, rtol=0)


def test_recomputed_contributions_equal_handed_over_ones_to_the_last_bit(inputs):
    """A block per unit hands nothing over: every other owner's share is recomputed from that
    owner's own batches, and the output is the same bit for bit (not just close)."""
    recipe, _, _, tmp = inputs
    handed, job = worker_for(recipe, tmp, "handed.zarr")
    handed.run(job.pending())
    alone, job = worker_for(recipe, tmp, "alone.zarr")
    alone.run_units([[b] for b in job.pending()])
    assert alone.engine.predicted_patches > handed.engine.predicted_patches
    for task in recipe.tasks:
        np.testing.assert_array_equal(read(tmp / "alone.zarr", task),
                                      read(tmp / "handed.zarr", task))


def test_recomputed_sums_handed_on_within_a_unit_are_the_same_bits(inputs):
    """Units of one z plane each: a block recomputes the plane before's owners and hands
    those sums on to the later blocks of its plane they reach (fewer forward passes than
    recomputing them in each), and the output is the same bits as with nothing handed on
    and as one unit; a block's first owner outside its unit (its first in the order) is
    the one that recomputes."""
    recipe, _, _, tmp = inputs
    whole, job = worker_for(recipe, tmp, "whole.zarr")
    whole.run(job.pending())
    counts = {}
    for budget in (0, 1 << 30):
        worker, job = worker_for(recipe, tmp, f"planes-{budget}.zarr")
        planes = [[b for b in job.pending() if b[0] == z] for z in range(job.layout.grid()[0])]
        worker.run_units(planes, budget=budget)
        counts[budget] = worker.engine.predicted_patches
        for task in recipe.tasks:
            np.testing.assert_array_equal(read(tmp / f"planes-{budget}.zarr", task),
                                          read(tmp / "whole.zarr", task))
    assert whole.engine.predicted_patches < counts[1 << 30] < counts[0]


def test_sums_handed_on_give_way_to_the_units_own_within_the_budget(inputs, monkeypatch):
    """With a budget between what a unit's own sums take and what handing on everything
    would, the worker never holds more than the budget (handed-on sums are refused or
    dropped, the one needed last first, when its own need the room), the blocks recompute
    what was not handed on, and the output is the same bits."""
    from emrun.infer import worker as worker_module

    recipe, _, _, tmp = inputs
    peaks: dict[int, list[tuple[int, int]]] = {}
    keep = worker_module.Carries.keep

    def spy(self, step, own, handed, reserve=0):
        keep(self, step, own, handed, reserve)
        mine = sum(t.numel() * 4 for k, t in self.sums.items() if k not in self.counts)
        peaks.setdefault(self.budget, []).append((mine, self.held))

    monkeypatch.setattr(worker_module.Carries, "keep", spy)
    passes = {}

    def run(budget: int) -> None:
        worker, job = worker_for(recipe, tmp, f"b{budget}.zarr")
        planes = [[b for b in job.pending() if b[1] == y] for y in range(job.layout.grid()[1])]
        worker.run_units(planes, budget=budget)
        passes[budget] = worker.engine.predicted_patches

    run(0)
    run(1 << 40)
    own = max(mine for mine, _ in peaks[1 << 40])
    every = max(held for _, held in peaks[1 << 40])
    assert every > own
    middle = own  # handed-on sums fit only while its own are below their peak
    run(middle)
    assert max(held for _, held in peaks[middle]) <= middle
    assert passes[1 << 40] < passes[middle] < passes[0]
    for task in recipe.tasks:
        for budget in (middle, 1 << 40):
            np.testing.assert_array_equal(read(tmp / f"b{budget}.zarr", task),
                                          read(tmp / "b0.zarr", task))


def test_a_units_own_sums_push_out_the_handed_on_one_needed_last():
    """`Carries`: handed-on sums are let in only where they fit the budget, and when a
    block's own sums need the room, the handed-on sum whose block comes last goes first;
    its count goes with it (that block recomputes both)."""
    from emrun.infer.worker import Carries, Step

    def sum_of(values: int) -> torch.Tensor:
        return torch.zeros(values)  # 4 bytes a value

    unit = {(0, 0, i): i for i in range(6)}
    carries = Carries(budget=400)
    count = torch.tensor(1)
    carries.keep(Step((0, 0, 0), unit, 0), {(0, 0, 1): sum_of(20)},
                 {((0, 0, 3), (9, 9, 9)): (sum_of(20), count),
                  ((0, 0, 5), (9, 9, 9)): (sum_of(20), count),
                  ((0, 0, 4), (9, 9, 9)): (sum_of(20), count),
                  ((0, 0, 2), (9, 9, 9)): (sum_of(30), count)})  # 400 bytes: no room left
    assert carries.held == 320 and ((0, 0, 2), (9, 9, 9)) not in carries.sums
    carries.keep(Step((0, 0, 1), unit, 1), {(0, 0, 3): sum_of(30)}, {})  # 120 more: 440
    assert carries.held == 360 <= 400
    assert ((0, 0, 5), (9, 9, 9)) not in carries.sums | carries.counts  # needed last
    assert {((0, 0, 3), (9, 9, 9)), ((0, 0, 4), (9, 9, 9))} <= set(carries.counts)
    sums, counts = carries.take((0, 0, 3), [(9, 9, 9), (0, 0, 1)])
    assert set(sums) == {(9, 9, 9), (0, 0, 1)} and set(counts) == {(9, 9, 9)}
    assert carries.held == 360 - 80 - 120


@pytest.mark.parametrize("block,units_by,masked", [
    ((2, 12, 12), 0, [(1, 0, 0), (2, 1, 1)]),  # thinner than a patch; planes across z
    ((4, 16, 16), 2, [(1, 1, 0)]),  # planes across x
    ((4, 24, 24), 0, [(1, 0, 0)]),  # the first of a plane masked out; some of the patches
    # of the block before reach only one of the two blocks beside it
    ((2, 12, 20), None, [(0, 0, 0), (3, 1, 0)]),  # three workers' units
])
def test_handing_on_gives_the_bits_of_recomputing_in_every_block(inputs, block, units_by,
                                                                 masked):
    """Whatever the units, the block size (blocks thinner than a patch too) and the blocks
    the mask skips (the one nearest an owner among them, so a later block recomputes and
    hands on to those at or after it only), the output is the same bits as with every block
    its own unit, with fewer forward passes."""
    recipe, _, volume, tmp = inputs
    mask = np.ones(volume.shape, np.uint8)
    for index in masked:
        mask[tuple(slice(i * b, (i + 1) * b) for i, b in zip(index, block, strict=True))] = 0
    write_volume(tmp / "in.zarr", "mask", mask)
    passes = {}
    for budget in (0, 1 << 30):
        job = prepare_job(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"),
                          tmp / f"{budget}.zarr", block=block, mask_path=str(tmp / "in.zarr/mask"))
        worker = BlockWorker(job, torch.device("cpu"))
        blocks = job.pending()
        if budget == 0:
            groups = [[b] for b in blocks]
        elif units_by is None:
            groups = job_units(job, blocks, 3)
        else:
            groups = [[b for b in blocks if b[units_by] == i]
                      for i in range(job.layout.grid()[units_by])]
        assert len(groups) > 1
        worker.run_units(groups, budget=budget)
        passes[budget] = worker.engine.predicted_patches
    assert passes[1 << 30] < passes[0]
    for task in recipe.tasks:
        np.testing.assert_array_equal(read(tmp / f"{1 << 30}.zarr", task),
                                      read(tmp / "0.zarr", task))


def test_workers_split_the_volume_into_units_and_write_the_same_output(inputs):
    recipe, _, _, tmp = inputs
    one = tmp / "one.zarr"
    run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), one, block=BLOCK)
    job = prepare_job(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), tmp / "j.zarr",
                      block=BLOCK)
    assert len(job_units(job, job.pending(), 3)) >= 3
    three = tmp / "three.zarr"
    run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), three, block=BLOCK,
                  workers=3, device="cpu")
    for task in recipe.tasks:  # to the thread count's rounding: oneDNN sums by threads
        np.testing.assert_array_equal(read(three, task), read(one, task))


def test_a_masked_owner_still_contributes_to_the_blocks_it_reaches(inputs):
    """The block before a predicted one is masked out: it writes zeros and predicts nothing,
    so its patches' share of the next block is computed there, the same to the bit. That
    block (0, 0, 1) hands the sum on only to blocks at or after it on every axis: (0, 1, 0)
    needs patches of (0, 0, 0) that do not reach (0, 0, 1), and recomputes it itself."""
    recipe, _, volume, tmp = inputs
    full = tmp / "full.zarr"
    run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), full, block=BLOCK)
    mask = np.ones(volume.shape, np.uint8)
    mask[:4, :16, :16] = 0  # block (0, 0, 0), which owns patches reaching (0, 0, 1) and on
    write_volume(tmp / "in.zarr", "mask", mask)
    masked = tmp / "masked.zarr"
    run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), masked, block=BLOCK,
                  mask_path=str(tmp / "in.zarr/mask"))
    got, want = read(masked), read(full)
    assert not got[:, :4, :16, :16].any()
    got[:, :4, :16, :16] = want[:, :4, :16, :16]
    np.testing.assert_array_equal(got, want)


def test_a_fixed_batch_shape_changes_nothing_but_the_padding(inputs):
    """GPUs (and compiled models) predict short batches padded to the full size."""
    recipe, model, volume, tmp = inputs
    worker, job = worker_for(recipe, tmp, "padded.zarr")
    worker.engine.pad_batches = True
    worker.run(job.pending())
    assert worker.engine.predicted_patches == job.layout.patch_count()
    np.testing.assert_allclose(read(tmp / "padded.zarr"), reference(recipe, model, volume),
                               atol=1e-5, rtol=0)


def test_every_chunk_is_written_once_whatever_the_units(inputs, monkeypatch):
    """Units split the blocks among workers; each block, a whole number of chunks, is
    written once, so no chunk is written twice (no locks, no lost updates)."""
    from emrun.infer import worker as worker_module

    recipe, _, _, tmp = inputs
    writes = []
    opened = worker_module.open_output_arrays

    class Recording:
        def __init__(self, name, array):
            self.name, self.array, self.shape = name, array, array.shape

        def __setitem__(self, key, value):
            writes.append((self.name, tuple((k.start, k.stop) for k in key[1:])))
            self.array[key] = value

    monkeypatch.setattr(worker_module, "open_output_arrays",
                        lambda job: {n: Recording(n, a) for n, a in opened(job).items()})
    worker, job = worker_for(recipe, tmp, "chunks.zarr")
    worker.run_units(job_units(job, job.pending(), 4))
    assert sorted(w for w in writes if w[0] == "mito") == sorted(
        ("mito", r) for n, r in writes if n == "aff")
    regions = [r for n, r in writes if n == "aff"]
    assert len(regions) == len(set(regions)) == 27
    chunks = job.layout.chunks
    assert all(a % c == 0 for region in regions for (a, _), c in zip(region, chunks,
                                                                      strict=True))
    covered = np.zeros(job.layout.shape, np.int32)
    for region in regions:
        covered[tuple(slice(a, b) for a, b in region)] += 1
    assert (covered == 1).all()


def test_partial_sums_held_for_hand_over_stay_within_the_budget(tmp_path, monkeypatch):
    """A unit is as large as the hand-over budget allows, and recomputed sums are handed on
    only in the room its own sums leave: however large the volume, the partial sums a
    worker keeps for later blocks never pass it (here 200 kB, on a volume whose whole grid
    as one unit would hold more)."""
    from emrun.infer import schedule
    from emrun.infer import worker as worker_module

    recipe, _, _, tmp = make_inputs(tmp_path, shape=(16, 64, 64))  # 64 blocks, 4 units
    monkeypatch.setattr(schedule, "HANDOVER_BYTES", 200_000)
    monkeypatch.setattr(schedule, "available_memory", lambda: 0)  # the floor decides
    held, handed = [], []
    predict = worker_module.BlockWorker._predict

    def spy(self, step, raw, carries):
        out = predict(self, step, raw, carries)
        held.append(sum(t.numel() * t.element_size() for t in carries.sums.values()))
        handed.append(len(carries.counts))
        return out

    monkeypatch.setattr(worker_module.BlockWorker, "_predict", spy)
    job = prepare_job(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), tmp / "b.zarr",
                      block=(4, 16, 16))
    bounded = schedule.job_units(job, job.pending(), 1)
    assert len(bounded) > 1  # the budget split the grid
    assert schedule.handover_budget(job) == 200_000
    BlockWorker(job, torch.device("cpu")).run_units(bounded, budget=200_000)
    assert 0 < max(held) <= 200_000 and max(handed) > 0
    held.clear()
    job = prepare_job(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), tmp / "u.zarr",
                      block=(4, 16, 16))
    BlockWorker(job, torch.device("cpu")).run(job.pending())  # the whole grid as one unit
    assert max(held) > 200_000


def test_the_sums_alive_while_a_block_runs_stay_within_the_budget(tmp_path, monkeypatch):
    """Beside the sums held, a block has the ones it took, its own new ones and the
    recomputed ones it hands on alive until it is done: handed-on sums that filled the
    budget between blocks took the total past it while the next one ran (here 105,600 bytes
    in a budget of 100,000); they now leave room for what the next block makes."""
    from emrun.infer import schedule
    from emrun.infer import worker as worker_module

    recipe, _, _, tmp = make_inputs(tmp_path, shape=(16, 64, 64))
    budget = 100_000
    monkeypatch.setattr(schedule, "HANDOVER_BYTES", budget)
    monkeypatch.setattr(schedule, "available_memory", lambda: 0)  # the floor decides
    alive, handed = [], []
    keep = worker_module.Carries.keep

    def spy(self, step, own, sums, reserve=0):
        size = worker_module._bytes
        alive.append(self.held + self.taken + sum(map(size, own.values())) +
                     sum(size(s) for s, _ in sums.values()))
        handed.append(len(self.counts))
        return keep(self, step, own, sums, reserve)

    monkeypatch.setattr(worker_module.Carries, "keep", spy)
    job = prepare_job(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), tmp / "b.zarr",
                      block=(4, 16, 16))
    units = schedule.job_units(job, job.pending(), 1)
    assert len(units) > 1
    BlockWorker(job, torch.device("cpu")).run_units(units, budget=budget)
    assert max(handed) > 0  # sums were handed on
    assert 0 < max(alive) <= budget


def test_host_copies_on_a_cpu_are_plain_arrays():
    """On a GPU the copy back runs asynchronously into pinned memory (the writer waits for
    it); on a CPU both helpers hand the data through untouched."""
    from emrun.infer.transfer import pinned, to_host

    values = torch.arange(12, dtype=torch.uint8).reshape(3, 4)
    host = to_host(values)
    assert host.ready is None and np.array_equal(host.numpy(), values.numpy())
    array = np.ones((2, 3), np.uint8)
    assert pinned(array, torch.device("cpu")) is array


def test_a_users_hand_over_budget_decides_the_units_never_the_output(inputs):
    """`--handover-memory`: with none, every block is its own unit and the patches at every
    block border are predicted again; with the default, each patch once. The output is the
    same bits, and a run resumed with another budget finishes it."""
    recipe, _, _, tmp = inputs
    default = run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), tmp / "d.zarr",
                            block=BLOCK, device="cpu")
    assert default.patches == prepare_job(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"),
                                          tmp / "x.zarr", block=BLOCK).layout.patch_count()
    none = run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), tmp / "n.zarr",
                         block=BLOCK, device="cpu", handover=0)
    assert none.patches > 1.5 * default.patches
    np.testing.assert_array_equal(read(tmp / "n.zarr"), read(tmp / "d.zarr"))
    job = prepare_job(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), tmp / "r.zarr",
                      block=BLOCK, handover=0)
    assert type(job).from_json(job.to_json()).handover == 0  # workers elsewhere see it
    from emrun.infer.job import release_job

    BlockWorker(job, torch.device("cpu")).run(job.pending()[:5])
    release_job(job)
    resumed = run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), tmp / "r.zarr",
                            block=BLOCK, device="cpu", resume=True, handover=1 << 30)
    assert resumed.skipped == 5 and resumed.done == 22
    np.testing.assert_array_equal(read(tmp / "r.zarr"), read(tmp / "d.zarr"))


def test_sums_beyond_the_devices_share_wait_in_host_memory_and_each_patch_runs_once(
        inputs, monkeypatch):
    """`--handover-host-memory`: with no room on the device and host memory beside it, the
    whole grid is one unit again and each patch is predicted once (without it: every block
    its own unit); every sum made waits in host memory (the device's share stays empty
    between blocks) and comes back for its block, to the same bits. A job carries the
    setting to workers elsewhere."""
    from emrun.infer import worker as worker_module

    recipe, _, _, tmp = inputs
    held, away = [], []
    keep = worker_module.Carries.keep

    def spy(self, step, own, handed, reserve=0):
        keep(self, step, own, handed, reserve)
        held.append(self.held)
        away.append(self.held_away)

    monkeypatch.setattr(worker_module.Carries, "keep", spy)
    lattice = prepare_job(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), tmp / "x.zarr",
                          block=BLOCK).layout.patch_count()
    device = run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), tmp / "d.zarr",
                           block=BLOCK, device="cpu", handover=1 << 30)
    host = run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), tmp / "h.zarr",
                         block=BLOCK, device="cpu", handover=0, handover_host=1 << 30)
    none = run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), tmp / "n.zarr",
                         block=BLOCK, device="cpu", handover=0)
    assert host.unit == device.unit == (3, 3, 3) and none.unit == (1, 1, 1)
    assert host.patches == device.patches == lattice < none.patches
    assert host.handover == 0 and host.handover_host == 1 << 30
    runs = len(held) // 3  # the spy saw the three runs' blocks in turn
    assert max(held[runs:2 * runs]) == 0 and max(away[runs:2 * runs]) > 0
    for task in recipe.tasks:
        np.testing.assert_array_equal(read(tmp / "h.zarr", task), read(tmp / "d.zarr", task))
        np.testing.assert_array_equal(read(tmp / "n.zarr", task), read(tmp / "d.zarr", task))
    job = prepare_job(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), tmp / "j.zarr",
                      block=BLOCK, handover=0, handover_host=5)
    assert type(job).from_json(job.to_json()).handover_host == 5


def test_the_device_share_sends_the_sum_needed_last_to_host_memory_and_drops_when_full():
    """`Carries` with host memory: over the device's share, the sum whose block comes last
    goes to host memory where it fits; a handed-on sum fits the host's room when the
    device has none; with both full, handed-on sums are dropped, needed last first, and an
    own sum stays (the unit's shape keeps that from happening). Taken sums come back whole,
    from wherever they waited."""
    from emrun.infer.worker import Carries, Step

    def sum_of(values: int, fill: float = 0.0) -> torch.Tensor:
        return torch.full((values,), float(fill))  # 4 bytes a value

    unit = {(0, 0, i): i for i in range(8)}
    other = (9, 9, 9)
    count = torch.tensor(1)
    carries = Carries(budget=200, host_budget=200)
    carries.keep(Step((0, 0, 0), unit, 0),
                 {(0, 0, 1): sum_of(10, 1), (0, 0, 3): sum_of(40, 3), (0, 0, 2): sum_of(10, 2)},
                 {})  # 240 bytes on a share of 200: the one for block 3 (160) goes
    assert set(carries.sums) == {((0, 0, 1), (0, 0, 0)), ((0, 0, 2), (0, 0, 0))}
    assert set(carries.away) == {((0, 0, 3), (0, 0, 0))}
    assert (carries.held, carries.held_away) == (80, 160)
    carries.keep(Step((0, 0, 1), unit, 1), {},
                 {((0, 0, 5), other): (sum_of(20, 5), count),  # 80 on the device: 160
                  ((0, 0, 4), other): (sum_of(10, 4), count),  # 40 on the device: 200
                  ((0, 0, 6), other): (sum_of(10, 6), count)})  # no room: host, 200
    assert {((0, 0, 5), other), ((0, 0, 4), other)} <= set(carries.sums)
    assert ((0, 0, 6), other) in carries.away
    assert (carries.held, carries.held_away) == (200, 200)
    carries.keep(Step((0, 0, 2), unit, 2), {(0, 0, 7): sum_of(20, 7)}, {}, reserve=40)
    # 280 + 40 on a share of 200, the host full: handed-on sums needed last are dropped
    assert carries.held + 40 <= 200 and carries.held_away <= 200
    assert ((0, 0, 7), (0, 0, 2)) in carries.sums  # own sums stay
    assert not {((0, 0, 5), other), ((0, 0, 6), other)} & (
        set(carries.sums) | set(carries.away) | set(carries.counts) | set(carries.needed))
    assert ((0, 0, 4), other) in carries.away  # moved into the room its drop made
    sums, counts = carries.take((0, 0, 3), [(0, 0, 0), other])
    assert set(sums) == {(0, 0, 0)} and not counts
    assert torch.equal(sums[(0, 0, 0)], sum_of(40, 3)) and carries.taken == 160
    assert ((0, 0, 3), (0, 0, 0)) not in carries.away


def test_host_memory_counts_the_pinned_buffers_as_torch_rounds_them():
    """From a GPU a sum waits in pinned memory that torch's cache rounds up to a power of
    two: the host budget counts that (the sums, at up to twice their size, would pass it)."""
    from emrun.infer.worker import _away_bytes

    cuda = torch.device("cuda")
    assert _away_bytes(torch.zeros(5 << 18), cuda) == 8 << 20  # 5 MiB of float32: 8 MiB
    assert _away_bytes(torch.zeros(1 << 18), cuda) == 1 << 20  # a power of two: itself
    assert _away_bytes(torch.zeros(5 << 18)) == 5 << 20  # on a CPU: no copy, its size


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_sums_waiting_in_pinned_memory_come_back_to_the_same_bits(inputs):
    """The GPU path of the host tier: copies to pinned memory and back run beside the
    device's work; the sums taken, and the whole output, are the same bits."""
    from emrun.infer.worker import Carries, Step

    unit = {(0, 0, i): i for i in range(3)}
    made = {(0, 0, i): torch.randn(1000, device="cuda") for i in (1, 2)}
    carries = Carries(budget=0, host_budget=1 << 20)
    carries.keep(Step((0, 0, 0), unit, 0), dict(made), {})
    assert carries.held == 0 and carries.held_away == 8000
    for i in (1, 2):
        sums, _ = carries.take((0, 0, i), [(0, 0, 0)])
        assert sums[(0, 0, 0)].device.type == "cuda"
        assert torch.equal(sums[(0, 0, 0)], made[(0, 0, i)])
    recipe, _, _, tmp = inputs
    for name, budgets in (("d", {"handover": 1 << 30}),
                          ("h", {"handover": 0, "handover_host": 1 << 30})):
        run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), tmp / f"{name}.zarr",
                      block=BLOCK, device="cuda", **budgets)
    for task in recipe.tasks:
        np.testing.assert_array_equal(read(tmp / "h.zarr", task), read(tmp / "d.zarr", task))


@pytest.mark.parametrize(("text", "size"), [
    ("20GiB", 20 << 30), ("500 MB", 500_000_000), ("1.5tb", 1_500_000_000_000), ("2e9", 2e9),
    ("0", 0), ("64KiB", 65536), (" 3 gb ", 3_000_000_000), ("1.1 PB", 1_100_000_000_000_000),
    ("1PiB", 2**50)])  # PB: the unit size_text writes sizes in, read back
def test_sizes_are_read_in_decimal_and_binary_units(text, size):
    from emrun.capacity import parse_size

    assert parse_size(text, "--x") == size


@pytest.mark.parametrize("text", ["-1GB", "lots", "5 GiBs", "1e999", "GB", ""])
def test_a_size_that_is_no_size_is_the_flags_mistake(text):
    from emrun.capacity import parse_size
    from emrun.errors import UserError

    with pytest.raises(UserError, match=r"^--x "):
        parse_size(text, "--x")


def test_infer_says_how_many_patches_its_units_predict_again_with_the_knob(inputs):
    """One unit for the whole grid repeats nothing and says nothing; no hand-over room
    makes every block a unit, which infer says at the start, with its share."""
    from typer.testing import CliRunner

    from emrun.cli import app
    from emrun.infer.plan import repeated

    recipe, _, _, tmp = inputs
    (tmp / "r.yaml").write_text(yaml.safe_dump(recipe.resolved()))
    said = {}
    for name, extra in [("quiet", []), ("noted", ["--handover-memory", "0"])]:
        result = CliRunner().invoke(app, [
            "infer", "--recipe", str(tmp / "r.yaml"), "--checkpoint", str(tmp / "c.pt"),
            "--input", str(tmp / "in.zarr/image"), "--output", str(tmp / f"{name}.zarr"),
            "--device", "cpu", "--block", *map(str, BLOCK), *extra])
        assert result.exit_code == 0, result.output
        said[name] = [line for line in result.output.splitlines() if "again" in line]
    assert said["quiet"] == []
    job = prepare_job(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), tmp / "x.zarr",
                      block=BLOCK)
    share = 100 * repeated(job.layout, (1, 1, 1))
    assert said["noted"] == [
        f"infer: {share:.1f} % of the patches are predicted again, at the borders of units of "
        "1 x 1 x 1 blocks, the most a hand-over budget of 0 bytes per worker holds "
        "(--handover-memory or --handover-host-memory gives more room)"]


def test_the_plan_says_when_the_workers_not_the_budget_cut_the_units():
    from emrun.cli.commands import plan_note
    from emrun.infer.schedule import Progress

    progress = Progress(unit=(3, 1, 3), repeated=0.25, handover=1 << 30, workers=2, alone=0.0)
    assert plan_note(progress) == (
        "infer: 25.0 % of the patches are predicted again, at the borders of units of "
        "3 x 1 x 3 blocks, one or more for each of 2 workers (one worker: none)")
    progress.alone = 0.005
    assert plan_note(progress).endswith("(one worker: 0.5 %)")
    progress.alone = 0.1
    assert plan_note(progress).endswith(
        "the most a hand-over budget of 1.1 GB per worker holds (--handover-memory or "
        "--handover-host-memory gives more room)")
    progress.handover_host = 8 << 30
    assert plan_note(progress).endswith(
        "the most a hand-over budget of 1.1 GB per worker and 8.6 GB of host memory holds "
        "(--handover-memory or --handover-host-memory gives more room)")


def test_infer_refuses_a_hand_over_budget_beyond_memory_before_any_output(inputs):
    from typer.testing import CliRunner

    from emrun.cli import app

    recipe, _, _, tmp = inputs
    (tmp / "r.yaml").write_text(yaml.safe_dump(recipe.resolved()))
    for flag, size, said in [("--handover-memory", "1000TiB", "of memory available"),
                             ("--handover-memory", "plenty", "expected a size"),
                             ("--handover-host-memory", "1000TiB", "of memory available"),
                             ("--handover-host-memory", "-3GB", "--handover-host-memory")]:
        result = CliRunner().invoke(app, [
            "infer", "--recipe", str(tmp / "r.yaml"), "--checkpoint", str(tmp / "c.pt"),
            "--input", str(tmp / "in.zarr/image"),
            "--output", str(tmp / "big.zarr"), "--device", "cpu", flag, size])
        assert result.exit_code == 2, result.output
        assert flag in result.output and said in result.output
        assert "Traceback" not in result.output and not (tmp / "big.zarr").exists()


def test_plan_checks_everything_and_writes_nothing(inputs):
    """`infer --plan`: the layout, blocks left, units and their repeats as infer would run
    them, nothing written; a mistake is refused as infer refuses it; on a started output
    with --resume, the blocks left."""
    from typer.testing import CliRunner

    from emrun.cli import app
    from emrun.infer.plan import repeated

    recipe, _, _, tmp = inputs
    (tmp / "r.yaml").write_text(yaml.safe_dump(recipe.resolved()))
    base = ["infer", "--recipe", str(tmp / "r.yaml"), "--checkpoint", str(tmp / "c.pt"),
            "--input", str(tmp / "in.zarr/image"), "--device", "cpu", "--block",
            *map(str, BLOCK), "--plan"]
    result = CliRunner().invoke(app, [*base, "--output", str(tmp / "p.zarr"),
                                      "--handover-memory", "0"])
    assert result.exit_code == 0, result.output
    assert not (tmp / "p.zarr").exists()
    job = prepare_job(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), tmp / "x.zarr",
                      block=BLOCK, plan_only=True)
    assert not (tmp / "x.zarr").exists()
    layout = job.layout
    lattice = layout.patch_count()
    again = repeated(layout, (1, 1, 1))
    lines = result.output.splitlines()
    assert lines[0] == f"plan for {tmp / 'p.zarr'} (nothing was written or predicted):"
    assert f"  lattice: {lattice:,} patches of 4 x 16 x 16, stride 2 x 12 x 12" in lines
    assert "  blocks: 27 of 4 x 16 x 16 (3 x 3 x 3), chunks 4 x 16 x 16; 27 to predict" in lines
    assert "  units: 27 of 1 x 1 x 1 blocks for 1 worker on cpu, a hand-over budget of 0 " \
           "bytes per worker" in lines
    assert lines[-1] == (f"  patches predicted: about {round(lattice * (1 + again)):,}, "
                         f"{100 * again:.1f} % of them again at unit borders")
    started = run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), tmp / "s.zarr",
                            block=BLOCK, device="cpu")
    assert started.done == 27
    refused = CliRunner().invoke(app, [*base, "--output", str(tmp / "s.zarr")])
    assert refused.exit_code == 2 and "already exists; use --resume" in refused.output
    finished = CliRunner().invoke(app, [*base, "--output", str(tmp / "s.zarr"), "--resume"])
    assert finished.exit_code == 0, finished.output
    assert finished.output.splitlines()[-1] == "  patches predicted: none, every block is done"
    markers = sorted(tmp.glob("s.zarr/.emrun-done/*/0_*"))[:4]
    for marker in markers:
        marker.unlink()
    resumed = CliRunner().invoke(app, [*base, "--output", str(tmp / "s.zarr"), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "27 of 4 x 16 x 16 (3 x 3 x 3), chunks 4 x 16 x 16; 4 to predict" in resumed.output
    owned = sum(len(layout.owned_patches(tuple(map(int, m.name.split("_"))))) for m in markers)
    assert 0 < owned < lattice  # the blocks left's patches, not the lattice's
    unit = re.search(r"units: [\d,]+ of ([\d x]+) blocks", resumed.output).group(1)
    share = repeated(layout, tuple(map(int, unit.split(" x "))))
    assert resumed.output.splitlines()[-1] == (
        f"  patches predicted: about {round(owned * (1 + share)):,}, {100 * share:.1f} % of "
        "them again at unit borders")
    output_line = next(line for line in lines if line.startswith("  output: "))
    assert output_line.endswith(" free there") and "before compression, " in output_line
    assert f"  input {job.input_path}: 12 x 40 x 48 voxels" in lines  # no box: no more
    boxed = CliRunner().invoke(app, [*base, "--output", str(tmp / "p.zarr"),
                                     "--roi", "2,4,4/8,24,24"])
    assert boxed.exit_code == 0, boxed.output
    assert f"  input {job.input_path}: 12 x 40 x 48 voxels, the box of 8 x 24 x 24 at " \
           "2 x 4 x 4" in boxed.output.splitlines()  # it gave the box's shape as the input's
    hosted = CliRunner().invoke(app, [*base, "--output", str(tmp / "p.zarr"),
                                      "--handover-memory", "0", "--handover-host-memory", "1GiB"])
    assert hosted.exit_code == 0, hosted.output
    assert "  units: 1 of 3 x 3 x 3 blocks for 1 worker on cpu, a hand-over budget of 0 bytes " \
           "per worker and 1.1 GB of host memory" in hosted.output.splitlines()
    assert hosted.output.splitlines()[-1].endswith(", 0.0 % of them again at unit borders")
    # daisy with no --device: its workers resolve "auto" where they run; the plan says what
    # it means here, where the budget was sized
    daisy = CliRunner().invoke(app, [*[a for a in base if a not in ("--device", "cpu")],
                                     "--output", str(tmp / "d.zarr"), "--scheduler", "daisy",
                                     "--workers", "2"])
    assert daisy.exit_code == 0, daisy.output
    assert "for 2 workers on auto (cpu on this machine), a hand-over budget of" in daisy.output
    assert not (tmp / "d.zarr").exists()
