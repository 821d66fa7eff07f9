"""Known gaps of blockwise inference, closed: daisy's closing line and empty blocks, the
default chunks of a prime-sized axis, non-finite outputs of skipped blocks' patches, and the
non-finite count of in-memory prediction."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from test_infer import make_inputs
from test_infer_probe import (
    Lopsided,
    checkpoint,
    make_network,
    probe_recipe,
    read,
    run_job,
    sliding_window,
    window_of,
)
from typer.testing import CliRunner

from emrun.cli import app
from emrun.infer import schedule
from emrun.infer.array import predict_array
from emrun.infer.daisy_scheduler import marked_progress
from emrun.infer.engine import Engine
from emrun.infer.job import Job, prepare_job, release_job
from emrun.infer.plan import Layout, choose_chunks_and_block
from emrun.io.write import write_volume

# --- 1. daisy's closing line counts the empty blocks -----------------------------------------


def test_done_markers_say_which_blocks_were_skipped(tmp_path):
    """daisy's workers tell the scheduler nothing but their markers: a skipped block's says
    so, and reads as no non-finite count; the counts are those of this run's blocks."""
    recipe = probe_recipe()
    image = np.random.default_rng(0).random((4, 12, 20)).astype(np.float32)
    write_volume(tmp_path / "in.zarr", "image", image)
    job = prepare_job(recipe, checkpoint(recipe, tmp_path), str(tmp_path / "in.zarr/image"),
                      tmp_path / "o.zarr", block=(4, 6, 10))
    try:
        first, skipped, spiky, plain = job.layout.block_grid()
        job.mark_done(first)
        before = {first}
        job.mark_done(skipped, empty=True)
        job.mark_done(spiky, nonfinite=7)
        job.mark_done(plain)
        assert job.is_empty(skipped) and not job.is_empty(spiky) and not job.is_empty(plain)
        assert job.nonfinite(skipped) == 0 and job.nonfinite(spiky) == 7
        progress = marked_progress(job, before)
    finally:
        release_job(job)
    assert (progress.done, progress.skipped, progress.empty) == (3, 1, 1)
    assert (progress.nonfinite, progress.nonfinite_blocks) == (7, 1)


def _closing(result) -> str:
    """infer's closing line without its rate."""
    line = next(x for x in result.stdout.splitlines() if x.startswith("wrote "))
    return re.sub(r"[\d.]+ Mvoxel/s", "RATE", line)


def test_daisy_says_how_many_blocks_were_empty_as_the_local_scheduler_does(tmp_path):
    """Half the blocks lie outside the mask: the local scheduler said '4 of them empty',
    daisy said nothing (it knew only of a job with no chunk written at all)."""
    pytest.importorskip("daisy")
    recipe, _, _, tmp = make_inputs(tmp_path, shape=(8, 32, 32))
    mask = np.zeros((8, 32, 32), np.uint8)
    mask[:, :, 16:] = 1
    write_volume(tmp / "in.zarr", "mask", mask)
    (tmp / "r.yaml").write_text(yaml.safe_dump(recipe.resolved()))
    args = ["infer", "--recipe", str(tmp / "r.yaml"), "--checkpoint", str(tmp / "c.pt"),
            "--input", str(tmp / "in.zarr/image"), "--block", "4", "16", "16", "--device",
            "cpu", "--mask", str(tmp / "in.zarr/mask")]
    lines = []
    for scheduler in ("local", "daisy"):
        out = tmp / f"{scheduler}.zarr"
        result = CliRunner().invoke(app, [*args, "--output", str(out), "--scheduler",
                                          scheduler, "--workers", "1"])
        assert result.exit_code == 0, result.output
        lines.append(_closing(result).replace(str(out), "OUT"))
    assert lines[0] == lines[1]
    assert "8 blocks predicted (4 of them empty: outside the mask" in lines[1]


# --- 2. default chunks of an axis whose size is a prime above 32 -----------------------------


@pytest.mark.parametrize(("shape", "block", "chunks", "chosen"), [
    ((37, 100, 100), None, (19, 100, 20), (38, 100, 20)),  # z spans 37: two chunks, not 37
    ((37, 263, 100), (37, 263, 20), (19, 132, 20), (38, 264, 20)),  # a given whole axis too
    ((100, 100, 100), (37, 20, 20), (37, 20, 20), (37, 20, 20)),  # a given block stays put
    ((12, 40, 48), None, (12, 40, 20), (12, 40, 20)),  # good divisors: as before
])
def test_default_chunks_of_a_prime_sized_block_are_not_one_voxel(shape, block, chunks, chosen):
    got = choose_chunks_and_block(shape, (16, 80, 8), (12, 70, 5), None, block)
    assert got == (chunks, chosen)
    Layout(shape, (16, 80, 8), (12, 70, 5), *got)  # whole chunks per block


def test_a_37_deep_volume_is_written_in_thick_chunks_and_as_any_block_writes_it(tmp_path):
    """A 37-voxel z (under four strides: one block deep) was written in 37 one-voxel
    z-chunks; now two, the last cut short, and the output is the reference's, as with a
    block that splits z."""
    patch, stride = (16, 8, 8), (12, 6, 5)
    recipe = probe_recipe(patch, stride=stride)
    image = np.random.default_rng(4).random((37, 9, 11)).astype(np.float32)
    write_volume(tmp_path / "in.zarr", "image", image)
    source = str(tmp_path / "in.zarr/image")
    run_job(recipe, tmp_path, source, tmp_path / "default.zarr")
    run_job(recipe, tmp_path, source, tmp_path / "split.zarr", block=(12, 9, 11))
    assert zarr.open_array(str(tmp_path / "default.zarr/aff/0"), mode="r").chunks[1] == 19
    want = sliding_window(image, Lopsided(), patch, stride, window_of(recipe))
    for task in ("aff", "dist"):
        got = read(tmp_path / "default.zarr", task)
        np.testing.assert_allclose(got, want[task], atol=2e-6, rtol=0)
        np.testing.assert_allclose(got, read(tmp_path / "split.zarr", task), atol=2e-6, rtol=0)


# --- 3. non-finite outputs of patches whose owner was skipped ---------------------------------

PATCH, STRIDE, BLOCK = (4, 8, 8), (3, 6, 5), (4, 6, 10)


class Tripwire(Lopsided):
    """Lopsided, but NaN over a whole patch whose first voxel's input is exactly 0.5."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().forward(x)
        hit = (x[:, :, 0, 0, 0] == 0.5).view(-1, 1, 1, 1, 1)
        return {n: torch.where(hit, torch.full_like(t, float("nan")), t) for n, t in out.items()}


class BlankTripwire(Lopsided):
    """Lopsided, but NaN over a whole patch whose input is all 0."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().forward(x)
        hit = (x.flatten(1).amax(1) == 0).view(-1, 1, 1, 1, 1)
        return {n: torch.where(hit, torch.full_like(t, float("nan")), t) for n, t in out.items()}


def make_tripwire(recipe) -> torch.nn.Module:
    return Tripwire()


def make_blank_tripwire(recipe) -> torch.nn.Module:
    return BlankTripwire()


def _run_both_ways(recipe, tmp, source, name, monkeypatch, **options):
    """The job with partial sums handed over (one unit) and recomputed (a unit per block)."""
    one = run_job(recipe, tmp, source, tmp / f"{name}-one.zarr", **options)
    with monkeypatch.context() as patched:
        patched.setattr(schedule, "handover_budget", lambda *args, **kwargs: 0)
        many = run_job(recipe, tmp, source, tmp / f"{name}-many.zarr", **options)
    return one, many


def write_tripwire_inputs(folder) -> None:
    """An image whose voxel (0, 5, 9) trips `Tripwire`, in the masked-out x < 10, and the
    mask, in folder/in.zarr."""
    image = np.random.default_rng(3).random((7, 19, 23)).astype(np.float32)
    image[0, 5, 9] = 0.5
    write_volume(folder / "in.zarr", "image", image)
    mask = np.zeros(image.shape, np.uint8)
    mask[:, :, 10:] = 1
    write_volume(folder / "in.zarr", "mask", mask)


def test_nan_of_a_masked_blocks_patch_written_beside_it_is_counted(tmp_path, monkeypatch):
    """The patch at (0, 5, 9) belongs to block x 0-9, which the mask leaves out; it reaches
    x 10-16 of the blocks beside it, where its NaN are blended as 0 and written. They were
    not counted (the owner predicted nothing), and infer said nothing. Counted once, within
    the blocks written: 4 channels x 4 x 8 x 7 voxels in 3 blocks, whatever the units."""
    write_tripwire_inputs(tmp_path)
    recipe = probe_recipe(PATCH, stride=STRIDE)
    source = str(tmp_path / "in.zarr/image")
    masked = {"block": BLOCK, "factory": make_tripwire,
              "mask_path": str(tmp_path / "in.zarr/mask")}
    for progress in _run_both_ways(recipe, tmp_path, source, "masked", monkeypatch, **masked):
        assert progress.empty == 2 * 4  # the blocks at x 0-9 (z 0-3 and 4-6)
        assert (progress.nonfinite, progress.nonfinite_blocks) == (4 * 4 * 8 * 7, 3)
    (saved,) = (tmp_path / "masked-many.zarr").glob(".emrun-done/*/job.json")
    job = Job.from_json(saved.read_text())  # what daisy's scheduler reads: the markers
    assert sum(job.nonfinite(b) for b in job.layout.block_grid()) == 4 * 4 * 8 * 7
    assert sum(job.is_empty(b) for b in job.layout.block_grid()) == 2 * 4
    # predicted, the owner counts its whole patch, once
    whole = run_job(recipe, tmp_path, source, tmp_path / "whole.zarr", block=BLOCK,
                    factory=make_tripwire)
    assert (whole.nonfinite, whole.nonfinite_blocks) == (4 * 4 * 8 * 8, 1)


def test_nan_of_a_blank_blocks_patches_written_beside_it_is_counted(tmp_path, monkeypatch):
    """x 0-16 is black: the blocks at x 0-9 are blank (skipped) and their patches, all
    black, give NaN; those starting at x -1, 4 and 9 reach x 10-16, which the blocks
    beside them predict and write. Only that part is counted."""
    image = np.random.default_rng(5).random((7, 19, 23)).astype(np.float32)
    image[:, :, :17] = 0
    write_volume(tmp_path / "in.zarr", "image", image)
    recipe = probe_recipe(PATCH, stride=STRIDE)
    layout = Layout(image.shape, PATCH, STRIDE, BLOCK, BLOCK)
    want = 0
    for z in layout.starts(0):
        for y in layout.starts(1):
            for x in (s for s in layout.starts(2) if s + PATCH[2] - 1 <= 16):
                depth = min(z + PATCH[0], 7) - max(z, 0)
                rows = min(y + PATCH[1], 19) - max(y, 0)
                want += 4 * depth * rows * max(0, x + PATCH[2] - 10)
    assert want > 0
    for progress in _run_both_ways(recipe, tmp_path, str(tmp_path / "in.zarr/image"),
                                   "blank", monkeypatch, block=BLOCK,
                                   factory=make_blank_tripwire):
        assert progress.empty == 2 * 4  # blocks x 0-9 (z 0-3 and 4-6)
        assert progress.nonfinite == want and progress.nonfinite_blocks == 2 * 4


def test_infer_warns_of_nan_written_beside_a_masked_block(tmp_path, monkeypatch):
    from emrun.infer import worker

    write_tripwire_inputs(tmp_path)
    recipe = probe_recipe(PATCH, stride=STRIDE)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe.resolved()))
    monkeypatch.setattr(worker, "load_model", lambda *args: Tripwire())
    result = CliRunner().invoke(app, [
        "infer", "--recipe", str(tmp_path / "r.yaml"), "--checkpoint",
        str(checkpoint(recipe, tmp_path)), "--input", str(tmp_path / "in.zarr/image"),
        "--mask", str(tmp_path / "in.zarr/mask"), "--device", "cpu", "--block",
        *map(str, BLOCK), "--output", str(tmp_path / "o.zarr")])
    assert result.exit_code == 0, result.output
    assert "output 896 NaN or infinite values in 3 blocks" in result.stderr


# --- 4. predict_array says how many outputs were not finite ---------------------------------


def test_predict_array_counts_non_finite_outputs():
    recipe = probe_recipe(PATCH, stride=STRIDE)
    image = np.random.default_rng(6).random((7, 19, 23)).astype(np.float32)
    clean = predict_array(Engine(recipe, Lopsided(), torch.device("cpu")), image, (0.0, 1.0))
    assert clean.nonfinite == 0 and set(clean) == {"aff", "dist"}
    image[0, 5, 9] = 0.5  # one patch starts there: all its 4 x 4 x 8 x 8 outputs NaN
    got = predict_array(Engine(recipe, Tripwire(), torch.device("cpu")), image, (0.0, 1.0))
    assert got.nonfinite == 4 * 4 * 8 * 8
    assert np.isfinite(got["aff"]).all()  # blended as 0
    blank = predict_array(Engine(recipe, BlankTripwire(), torch.device("cpu")),
                          np.zeros((7, 19, 23), np.float32), (0.0, 1.0))
    assert blank.nonfinite == 0 and not blank["aff"].any()  # not predicted: nothing written


def test_a_resumption_without_a_block_finishes_in_the_layout_the_output_was_started_with(
        tmp_path):
    """An output started with a block other than today's default (by an older emrun whose
    default differed, or with --block) was refused on --resume without --block as 'another
    block layout'; it now finishes in the recorded layout. Another box still starts anew."""
    patch, stride = (16, 8, 8), (12, 6, 5)
    recipe = probe_recipe(patch, stride=stride)
    image = np.random.default_rng(5).random((37, 9, 11)).astype(np.float32)
    write_volume(tmp_path / "in.zarr", "image", image)
    source = str(tmp_path / "in.zarr/image")
    out, weights = tmp_path / "out.zarr", checkpoint(recipe, tmp_path)

    def run(**options):
        job = prepare_job(recipe, weights, source, out, **options)
        try:
            return schedule.run_local(job, [("cpu", 1)], model=make_network)
        finally:
            release_job(job)

    run(block=(12, 9, 11))
    first = read(out, "aff")
    progress = run(resume=True)
    assert (progress.done, progress.skipped) == (0, 4)
    np.testing.assert_array_equal(read(out, "aff"), first)


# --- an output started and stopped before its first block, on data since rewritten ----------


def test_an_output_with_no_finished_block_says_removing_it_starts_again(tmp_path):
    """A NaN in the input stops the run before its first block, leaving the output (it is
    resumable); once the data is fixed, a rerun was refused ('already exists') and a resume
    too ('started from other data'), with no word that removing it is all it takes."""
    from emrun.errors import UserError
    from emrun.infer.run import run_inference
    from emrun.io import open_volume

    recipe, _, _, tmp = make_inputs(tmp_path, shape=(8, 32, 32))
    out = tmp / "out.zarr"
    release_job(prepare_job(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), out,
                            block=(4, 16, 16)))  # started: nothing predicted yet
    image = open_volume(str(tmp / "in.zarr/image")).read()
    write_volume(tmp / "in.zarr", "image", 255 - image, voxel_size=(30, 6, 6), overwrite=True)
    with pytest.raises(UserError, match=re.escape(
            f"(it holds no finished block: removing {out} starts it again there)")):
        run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), out,
                      block=(4, 16, 16), resume=True)


# --- a plain --resume keeps the pyramid a run was started with -----------------------------


def test_a_plain_resume_keeps_the_levels_the_output_was_started_with(tmp_path):
    """A finished output built with --levels, resumed without it, was rebuilt with the
    default count: its extra levels were deleted without a word."""
    from emrun.infer.run import run_inference

    recipe, _, _, tmp = make_inputs(tmp_path, shape=(8, 128, 128))
    out = tmp / "out.zarr"

    def levels() -> list[str]:
        return sorted(p.name for p in (out / "aff").iterdir() if p.name.isdigit())

    run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), out, block=(8, 64, 64),
                  levels=4)
    assert levels() == ["0", "1", "2", "3"]
    default = run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), tmp / "d.zarr",
                            block=(8, 64, 64))
    assert default.done and len(list((tmp / "d.zarr/aff").glob("[0-9]"))) < 4
    run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), out, block=(8, 64, 64),
                  resume=True)
    assert levels() == ["0", "1", "2", "3"]
    run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), out, block=(8, 64, 64),
                  resume=True, levels=2)  # asked for: built as asked
    assert levels() == ["0", "1"]


# --- a plan for an output this user cannot write ------------------------------------------


def test_the_plan_refuses_an_output_where_nothing_can_be_written(tmp_path, monkeypatch):
    """`--plan` said all was well for an output in a read-only folder; the run then stopped
    at once ('cannot write a store there'). The check asks the file system for this user
    (root is allowed everything, so the folder's answer is stood in for here)."""
    from emrun.errors import UserError
    from emrun.infer.run import plan_inference

    recipe, _, _, tmp = make_inputs(tmp_path, shape=(8, 32, 32))
    locked = tmp / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **k: False if Path(path) == locked
                        else real(path, mode, **k))
    with pytest.raises(UserError, match=re.escape(f"{locked / 'new' / 'o.zarr'}: cannot write a "
                                                  f"store there ({locked} is not writable")):
        plan_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"),
                       locked / "new" / "o.zarr", block=(4, 16, 16))
    plan = plan_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), tmp / "o.zarr",
                          block=(4, 16, 16))
    assert plan.pending == 8


# --- a signal during a long block is said at once; a second stops now --------------------


class SignalsTwice(Lopsided):
    """Lopsided, sending this process SIGINT at its ``first``th and ``second``th call (as a
    user's Ctrl-C, twice, during a block)."""

    def __init__(self, first: int, second: int) -> None:
        super().__init__()
        self.calls, self.at = 0, (first, second)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.calls in self.at:
            import signal

            signal.raise_signal(signal.SIGINT)
        return super().forward(x)


def test_a_second_signal_stops_in_the_block_and_the_resume_is_the_straight_run(tmp_path,
                                                                               capsys):
    """SIGINT in a block of minutes said nothing until the block ended, and a second was
    ignored (only kill -9 stopped a block of hours). The first is said at once, the second
    stops in the block; --resume then gives the uninterrupted output bit for bit."""
    patch = (4, 8, 8)
    recipe = probe_recipe(patch, stride=(3, 6, 6))
    image = np.random.default_rng(7).random((12, 24, 24)).astype(np.float32)
    write_volume(tmp_path / "in.zarr", "image", image)
    source, weights = str(tmp_path / "in.zarr/image"), checkpoint(recipe, tmp_path)
    straight = tmp_path / "straight.zarr"
    run_job(recipe, tmp_path, source, straight, block=(6, 12, 12))
    out = tmp_path / "out.zarr"
    job = prepare_job(recipe, weights, source, out, block=(6, 12, 12))
    try:
        with pytest.raises(schedule.Stopped) as stopped:
            schedule.run_local(job, [("cpu", 1)], model=lambda r: SignalsTwice(3, 5))
    finally:
        release_job(job)
    said = capsys.readouterr().err
    assert "SIGINT: stopping after the blocks in flight (0 of 8 done); send it again to " \
           "stop at once" in said
    assert stopped.value.progress.done == 0  # cut short inside the first block
    job = prepare_job(recipe, weights, source, out, block=(6, 12, 12), resume=True)
    try:
        schedule.run_local(job, [("cpu", 1)], model=make_network)
    finally:
        release_job(job)
    for task in recipe.tasks:
        np.testing.assert_array_equal(read(out, task), read(straight, task))


# --- a full disk while the pyramid is built --------------------------------------------------


def test_a_full_disk_in_the_pyramid_names_the_output_and_the_resume(tmp_path, monkeypatch):
    """The generic disk-full line named no output and said nothing half-written stands under
    a final name, where a level in progress does (unlisted, the volume unfinished)."""
    import errno

    from emrun.errors import UserError
    from emrun.infer import job as job_module
    from emrun.infer.run import run_inference

    recipe, _, _, tmp = make_inputs(tmp_path, shape=(8, 64, 64))
    out = tmp / "out.zarr"
    real = job_module.build_pyramid

    def full(path, levels=None, **options):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(job_module, "build_pyramid", full)
    with pytest.raises(UserError, match=re.escape(
            f"{out / 'aff'}: the disk is full (No space left on device) while building its "
            "pyramid; every block is done and kept")):
        run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), out, block=(8, 32, 32),
                      levels=2)
    monkeypatch.setattr(job_module, "build_pyramid", real)
    resumed = run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), out,
                            block=(8, 32, 32), levels=2, resume=True)
    assert resumed.done == 0 and (out / "aff" / "1").is_dir()
