"""Reference probe of blockwise inference across schedulers.

One tiny synthetic volume (10 x 36 x 44, placed at a voxel offset, blocks of 4 x 16 x 16 that
divide no axis) and the tiniest checkpoint `test_infer.make_inputs` makes are predicted by
the local scheduler with one worker and with two, by daisy with two workers, and as one block
covering the volume; the outputs are compared with each other (the README: the same bits for
any worker count and scheduler; another block size only in float32 summation order) and with
a sliding window written here (plain loops over the lattice, numpy reflect padding, the bump
window built from its formula, sum(w p) / sum(w) in float64). Writes are counted voxel by
voxel; the output's place, voxel size, dtype and channels are read back; runs stopped midway
by one scheduler are finished by the other (a daisy run stopped by Ctrl-C as
`test_infer_daisy_stops` stops it) and compared bit for bit with an uninterrupted run.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from test_infer import make_inputs, make_recipe
from test_infer_plan_reference_probe import Recording

from emrun.infer import schedule
from emrun.infer import worker as worker_module
from emrun.infer.job import finish_job, prepare_job, release_job
from emrun.infer.run import run_inference
from emrun.infer.schedule import job_units
from emrun.infer.worker import BlockWorker
from emrun.io import open_volume
from emrun.io.write import write_volume
from emrun.registry import models

SHAPE = (10, 36, 44)
BLOCK = (4, 16, 16)  # 3 x 3 x 3 blocks, the last of each axis cut short
OFFSET = (3, 5, 7)
VOXEL = (30.0, 6.0, 6.0)
PATCH = (4, 16, 16)  # make_recipe's train.patch; infer.overlap 0.5, 0.25, 0.25
TASKS = {"aff": 4, "mito": 1}
GRID = 27

daisy_missing = importlib.util.find_spec("daisy") is None
needs_daisy = pytest.mark.skipif(daisy_missing, reason="needs the daisy extra")


# ---------------------------------------------------------------------------------------
# references


def ref_starts(n: int, p: int, s: int) -> list[int]:
    """Lattice starts along one axis: from -((p - s) // 2) by s until the axis is covered."""
    starts = [-((p - s) // 2)]
    while starts[-1] + p < n:
        starts.append(starts[-1] + s)
    return starts


def ref_window(patch) -> np.ndarray:
    """DeepEM's bump, exp(-1 / (x (1 - x))) at voxel centres, 1 at its peak, floored."""
    profiles = []
    for n in patch:
        x = (np.arange(n) + 0.5) / n
        f = np.exp(-1.0 / (x * (1.0 - x)))
        profiles.append(f / f.max())
    w = profiles[0][:, None, None] * profiles[1][None, :, None] * profiles[2][None, None, :]
    return np.maximum(w, 1e-30)


def load_network(recipe, checkpoint: Path) -> torch.nn.Module:
    model = models.build(recipe.model, head_channels=recipe.head_channels())
    model.load_state_dict(torch.load(checkpoint)["model"])
    return model.eval()


def reference_blend(recipe, network, volume: np.ndarray) -> dict[str, np.ndarray]:
    """sum(w p) / sum(w) over every lattice patch, one patch per forward pass, in float64."""
    stride = recipe.infer.resolved_stride(PATCH)
    starts = [ref_starts(n, p, s) for n, p, s in zip(volume.shape, PATCH, stride, strict=True)]
    low = [-a[0] for a in starts]
    high = [max(0, a[-1] + p - n) for a, p, n in zip(starts, PATCH, volume.shape, strict=True)]
    padded = np.pad(volume.astype(np.float64) / 255, list(zip(low, high, strict=True)),
                    mode="reflect")
    window = ref_window(PATCH)
    channels = sum(TASKS.values())
    acc = np.zeros((channels, *padded.shape))
    weight = np.zeros(padded.shape)
    boxes = [tuple(slice(a + lo, a + lo + p) for a, lo, p in zip(start, low, PATCH, strict=True))
             for start in itertools.product(*starts)]
    cuts = torch.from_numpy(np.stack([padded[box] for box in boxes]).astype(np.float32))
    with torch.no_grad():  # one pass: the network treats each patch alone
        out = network(cuts[:, None])
    preds = np.concatenate([torch.sigmoid(out[t]).double().numpy() for t in TASKS], axis=1)
    for box, pred in zip(boxes, preds, strict=True):
        acc[(slice(None), *box)] += pred * window
        weight[box] += window
    core = tuple(slice(lo, lo + n) for lo, n in zip(low, volume.shape, strict=True))
    blended = acc[(slice(None), *core)] / weight[core]
    return {"aff": blended[:4], "mito": blended[4:]}


def read(output: Path, task: str) -> np.ndarray:
    return zarr.open_array(str(output / task / "0"), mode="r")[...]


def same_bits(a: Path, b: Path) -> None:
    for task in TASKS:
        np.testing.assert_array_equal(read(a, task), read(b, task), err_msg=task)


def markers(output: Path) -> list[Path]:
    return list(output.glob(".emrun-done/*/*_*_*"))


# ---------------------------------------------------------------------------------------
# the runs, made once


class Runs:
    """Inputs, checkpoint and the outputs of every scheduler on them."""

    def __init__(self, folder: Path) -> None:
        recipe, _, volume, folder = make_inputs(folder, shape=SHAPE)
        self.recipe, self.volume, self.folder = recipe, volume, folder
        self.checkpoint = folder / "c.pt"
        write_volume(folder / "placed.zarr", "image", volume, voxel_size=VOXEL, offset=OFFSET)
        self.input = str(folder / "placed.zarr/image")
        self.writes: dict[str, list] = {}

    def local(self, name: str, **options) -> Path:
        """In-process (one worker, unless ``workers``): every array write recorded."""
        out = self.folder / f"{name}.zarr"
        writes: list = []
        with pytest.MonkeyPatch.context() as patch:
            opened = worker_module.open_output_arrays
            patch.setattr(worker_module, "open_output_arrays", lambda job: {
                n: Recording(n, a, writes) for n, a in opened(job).items()})
            self.progress = run_inference(self.recipe, self.checkpoint, self.input, out,
                                          device="cpu", **{"block": BLOCK, **options})
        self.writes[name] = writes
        return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    runs = Runs(tmp_path_factory.mktemp("schedulers"))
    runs.one = runs.local("one")
    runs.whole = runs.local("whole", block=SHAPE)
    runs.two = runs.folder / "two.zarr"
    runs.two_progress = run_inference(runs.recipe, runs.checkpoint, runs.input, runs.two,
                                      block=BLOCK, device="cpu", workers=2)
    runs.reference = reference_blend(runs.recipe, load_network(runs.recipe, runs.checkpoint),
                                     runs.volume)
    return runs


@pytest.fixture(scope="module")
def daisy_two(runs) -> Path:
    if daisy_missing:
        pytest.skip("needs the daisy extra")
    out = runs.folder / "daisy.zarr"
    runs.daisy_progress = run_inference(runs.recipe, runs.checkpoint, runs.input, out,
                                        block=BLOCK, device="cpu", workers=2,
                                        scheduler="daisy", on_block=lambda p: None)
    return out


# ---------------------------------------------------------------------------------------
# every scheduler, one answer


def test_local_with_two_workers_gives_the_one_worker_bits(runs):
    assert runs.two_progress.done == runs.two_progress.total == GRID
    same_bits(runs.two, runs.one)


@needs_daisy
def test_daisy_with_two_workers_gives_the_local_bits(runs, daisy_two):
    assert runs.daisy_progress.done == GRID and runs.daisy_progress.skipped == 0
    same_bits(daisy_two, runs.one)
    stored = zarr.open_array(str(daisy_two / "aff" / "0"), mode="r")
    assert stored.nchunks_initialized == stored.nchunks  # no block left unwritten
    for task in TASKS:  # sigmoids are never 0, the fill value: every voxel was written
        assert (read(daisy_two, task) > 0).all()


def test_one_block_over_the_volume_agrees_within_float32_summation(runs):
    """Another block size changes only the order of float32 sums (README: < 1e-5)."""
    gaps = [np.abs(read(runs.whole, t) - read(runs.one, t)).max() for t in TASKS]
    assert max(gaps) < 1e-5, gaps


@pytest.mark.parametrize("name", ["one", "whole"])
def test_outputs_match_a_loop_over_the_lattice(runs, name):
    """sum(w p) / sum(w) of the bump window over every lattice patch, reflect-padded."""
    output = getattr(runs, name)
    for task in TASKS:
        got = read(output, task)
        assert got.shape == runs.reference[task].shape
        np.testing.assert_allclose(got, runs.reference[task], atol=1e-5, rtol=0,
                                   err_msg=task)


def test_the_reference_is_not_vacuous(runs):
    """The blend differs from a single centred patch's view: windows and reflection count."""
    aff = runs.reference["aff"]
    assert np.isfinite(aff).all() and aff.std() > 1e-3
    assert aff.min() > 0 and aff.max() < 1


@pytest.mark.parametrize("name", ["one", "whole"])
def test_every_voxel_is_written_exactly_once(runs, name):
    """Counted from the array writes of the in-process runs: every voxel of both tasks once,
    whole chunks only, nothing outside the volume."""
    block = BLOCK if name == "one" else SHAPE
    count = {t: np.zeros(SHAPE, np.int32) for t in TASKS}
    for task, box in runs.writes[name]:
        assert all(a % b == 0 for (a, _), b in zip(box, block, strict=True)), box
        count[task][tuple(slice(a, e) for a, e in box)] += 1
    for task in TASKS:
        assert (count[task] == 1).all(), (task, np.unique(count[task]))
    expected = GRID if name == "one" else 1
    assert len(runs.writes[name]) == expected * len(TASKS)


def test_the_output_lies_where_its_input_lies_with_the_recipe_s_dtype_and_channels(runs):
    image = open_volume(runs.input)
    assert image.offset == OFFSET and image.voxel_size == VOXEL
    for output in (runs.one, runs.two, runs.whole):
        for task, channels in TASKS.items():
            written = open_volume(str(output / task))
            assert written.shape == (channels, *SHAPE)
            assert written.voxel_size == VOXEL
            assert tuple(written.offset) == OFFSET
            assert np.dtype(written.dtype) == np.dtype(runs.recipe.infer.dtype) == np.float32
        group = zarr.open_group(str(output / "aff"), mode="r")
        assert group.attrs["offsets"] == [list(o) for o in runs.recipe.tasks["aff"]
                                          .target.offsets]
        transforms = group.attrs["ome"]["multiscales"][0]["datasets"][0][
            "coordinateTransformations"]
        assert transforms[0]["scale"] == [1.0, *VOXEL]
        assert transforms[1]["translation"] == [0.0, *(o * v for o, v in
                                                       zip(OFFSET, VOXEL, strict=True))]
        facts = zarr.open_group(str(output), mode="r").attrs["emrun"]
        assert facts["output_shape"] == list(SHAPE)
        assert facts["recipe"]["infer"]["dtype"] == "float32"


# ---------------------------------------------------------------------------------------
# stopped by one scheduler, finished by the other


class Stop(Exception):
    pass


@needs_daisy
def test_a_local_run_stopped_midway_is_finished_by_daisy_with_units_of_one_block(
        runs, monkeypatch):
    """Units of one block (no hand-over at all: every other owner's share recomputed), two
    daisy workers, after a local run stopped at 5 blocks: the uninterrupted bits."""
    out = runs.folder / "local-then-daisy.zarr"

    def stop_after_five(progress):
        if progress.done == 5:
            raise Stop

    with pytest.raises(Stop):
        run_inference(runs.recipe, runs.checkpoint, runs.input, out, block=BLOCK,
                      device="cpu", on_block=stop_after_five)
    kept = len(markers(out))
    assert 5 <= kept < GRID
    monkeypatch.setattr(schedule, "handover_budget", lambda *args, **kwargs: 0)
    progress = run_inference(runs.recipe, runs.checkpoint, runs.input, out, block=BLOCK,
                             device="cpu", workers=2, scheduler="daisy", resume=True,
                             on_block=lambda p: None)
    assert progress.skipped == kept and progress.done == GRID - kept
    same_bits(out, runs.one)
    # and back: the daisy-finished output has nothing left for the local scheduler
    again = run_inference(runs.recipe, runs.checkpoint, runs.input, out, block=BLOCK,
                          device="cpu", resume=True)
    assert again.skipped == GRID and again.done == 0
    same_bits(out, runs.one)
    # nor for daisy, which then starts no worker (that took seconds for nothing)
    import daisy

    def no_workers(*args, **kwargs):
        raise AssertionError("daisy started for a finished run")

    monkeypatch.setattr(daisy, "run_blockwise", no_workers)
    again = run_inference(runs.recipe, runs.checkpoint, runs.input, out, block=BLOCK,
                          device="cpu", workers=2, scheduler="daisy", resume=True)
    assert again.skipped == GRID and again.done == 0
    same_bits(out, runs.one)


STOP_SHAPE = (20, 80, 80)  # 125 blocks: enough that Ctrl-C lands midway


@pytest.mark.slow
@needs_daisy
def test_a_daisy_run_stopped_by_ctrl_c_is_finished_by_the_local_scheduler(tmp_path):
    """`emrun infer --scheduler daisy` stopped by SIGINT to its group (as
    `test_infer_daisy_stops`), then `--resume` with the local scheduler: the blocks daisy
    marked are skipped, and the output is the uninterrupted run's, bit for bit."""
    recipe, _, _, folder = make_inputs(tmp_path, shape=STOP_SHAPE)
    (folder / "r.yaml").write_text(yaml.safe_dump(recipe.resolved()))
    straight = folder / "straight.zarr"
    run_inference(recipe, folder / "c.pt", str(folder / "in.zarr/image"), straight,
                  block=BLOCK, device="cpu")
    out = folder / "out.zarr"
    command = [sys.executable, "-m", "emrun", "infer", "--recipe", str(folder / "r.yaml"),
               "--checkpoint", str(folder / "c.pt"), "--input", str(folder / "in.zarr/image"),
               "--output", str(out), "--block", *map(str, BLOCK), "--device", "cpu",
               "--scheduler", "daisy", "--workers", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None and len(markers(out)) < 3:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    marked = len(markers(out))
    assert 3 <= marked < 125, "the run must be stopped midway"
    assert f"stopped by SIGINT: {marked} of 125 blocks" in stderr, stderr
    progress = run_inference(recipe, folder / "c.pt", str(folder / "in.zarr/image"), out,
                             block=BLOCK, device="cpu", resume=True)
    assert progress.skipped == marked and progress.done == 125 - marked
    for task in TASKS:
        np.testing.assert_array_equal(read(out, task), read(straight, task), err_msg=task)


# ---------------------------------------------------------------------------------------
# patches predicted twice at unit borders, and no more


def straddling(layout, units, per_unit: bool) -> tuple[int, int]:
    """(lattice patches, recomputations): each patch is predicted once by its owner and once
    more for every unit other than its owner's that it reaches (``per_unit``: what the first
    block there recomputes is handed on to the others), or for every block it reaches in
    such a unit (nothing handed on), by brute force over the lattice written here."""
    unit_of = {block: i for i, unit in enumerate(units) for block in unit}
    starts = [ref_starts(n, p, s)
              for n, p, s in zip(layout.shape, layout.patch, layout.stride, strict=True)]
    lattice = again = 0
    for start in itertools.product(*starts):
        lattice += 1
        owner = tuple(max(s, 0) // b for s, b in zip(start, layout.block, strict=True))
        spans = [range(max(s, 0) // b, (min(s + p, n) - 1) // b + 1) for s, p, n, b in zip(
            start, layout.patch, layout.shape, layout.block, strict=True)]
        others = [unit_of[b] for b in itertools.product(*spans) if unit_of[b] != unit_of[owner]]
        again += len(set(others)) if per_unit else len(others)
    return lattice, again


@pytest.mark.parametrize("budget", [0, 1 << 30])
def test_a_patch_straddling_a_unit_border_is_predicted_again_once_per_unit_it_reaches(
        runs, tmp_path, budget):
    """README: a patch that straddles a unit border is predicted once more for each other
    unit it reaches (the block there that recomputes it hands the sum on to the unit's later
    blocks); with no room for such sums, once more for each block it reaches there. Three
    units (three workers' tiling), batches of one patch (so no batch-mate is recomputed
    alongside), one in-process worker: forward passes = lattice + those recomputations,
    exactly, and the output is the lattice's blend either way."""
    recipe = make_recipe(batch_size=1)
    job = prepare_job(recipe, runs.checkpoint, runs.input, tmp_path / "o.zarr", block=BLOCK)
    try:
        groups = job_units(job, job.pending(), 3, "cpu")
        assert len(groups) >= 3
        worker = BlockWorker(job, torch.device("cpu"))
        worker.run_units(groups, budget=budget)
        finish_job(job)
    finally:
        release_job(job)
    lattice, again = straddling(job.layout, groups, per_unit=budget > 0)
    assert lattice == job.layout.patch_count() and again > 0
    assert worker.engine.predicted_patches == lattice + again, (
        worker.engine.predicted_patches, lattice, again)
    if budget:
        assert again < straddling(job.layout, groups, per_unit=False)[1]
    for task in TASKS:
        np.testing.assert_allclose(read(tmp_path / "o.zarr", task), runs.reference[task],
                                   atol=1e-5, rtol=0, err_msg=task)
