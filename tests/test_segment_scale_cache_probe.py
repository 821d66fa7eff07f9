"""Probe of what `emrun segment --scheduler local` keeps between blocks and between runs:
the per-process caches of emrun/segment/scale/steps.py (opened volumes and arrays, database
stores, mapped lookup tables, finished-volume answers), daisy's `DoneCheck`, and the
done-markers that stand for work already written. Every run here is in this process on one
worker (blocks run here, so the caches are this process's), and each result is compared
bit for bit with a fresh process's run. Synthetic cells made in code."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import zarr
from test_segment import affinities, cells, noisy
from typer.testing import CliRunner

from emrun.cli import app
from emrun.errors import UserError
from emrun.io import write_volume
from emrun.segment.scale import schedulers, steps
from emrun.segment.scale.job import FOLDER, ScaleJob

runner = CliRunner()
NEAREST = ((-1, 0, 0), (0, -1, 0), (0, 0, -1))
SHAPE = (8, 48, 48)
BLOCK = ("--block", "4", "24", "24")  # 2 x 2 x 2 blocks


def _write_affinities(store: Path, seed: int) -> Path:
    """Noisy uint8 affinities of 12 cells at ``store``/affinity (replacing any there)."""
    shutil.rmtree(store, ignore_errors=True)
    truth = cells(SHAPE, n=12, seed=seed)
    affs = noisy(affinities(truth, NEAREST), 0.15, seed=seed)
    write_volume(store, "affinity", np.round(affs * 255).astype(np.uint8), channel_axis=True,
                 attrs={"offsets": [list(o) for o in NEAREST]})
    return store / "affinity"


def _write_mask(store: Path, corner: tuple[int, int, int]) -> str:
    """A mask at ``store``/mask (replacing any there): 1 but for a block-sized hole at
    ``corner``."""
    shutil.rmtree(store, ignore_errors=True)
    mask = np.ones(SHAPE, np.uint8)
    z, y, x = corner
    mask[z:z + 4, y:y + 24, x:x + 24] = 0
    write_volume(store, "mask", mask)
    return str(store / "mask")


def _args(affs: Path, out: Path, *extra: str) -> list[str]:
    return ["segment", str(affs), str(out), "--scheduler", "local", "--workers", "1", *BLOCK,
            "--levels", "1", *extra]


def _here(affs: Path, out: Path, *extra: str) -> Any:
    """The job run in this process (one worker: its blocks run here)."""
    return runner.invoke(app, _args(affs, out, *extra))


@contextlib.contextmanager
def _failing_after(monkeypatch: pytest.MonkeyPatch, step: str, blocks: int,
                   message: str) -> Iterator[None]:
    """The step function ``step`` of `steps` raising a user's error (``message``) after
    ``blocks`` blocks, as a block that cannot be read or written does; put back after."""
    real, calls = getattr(steps, step), []

    def failing(job: ScaleJob, index: Any) -> dict[str, float]:
        calls.append(index)
        if len(calls) > blocks:
            raise UserError(message)
        return real(job, index)

    monkeypatch.setattr(steps, step, failing)
    try:
        yield
    finally:
        monkeypatch.setattr(steps, step, real)


def _ok(result: Any) -> None:
    assert result.exit_code == 0, result.output


def _fresh(affs: Path, out: Path, *extra: str) -> None:
    """The same job in a fresh process: nothing kept from this one's runs."""
    done = subprocess.run([sys.executable, "-m", "emrun", *_args(affs, out, *extra)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def _labels(out: Path, name: str) -> np.ndarray:
    return zarr.open_array(str(out / "labels" / name / "0"), mode="r")[...]


def _volumes(out: Path) -> list[str]:
    folder = out / "labels"
    return sorted(d.name for d in folder.iterdir() if d.is_dir())


def _same_volumes(out: Path, reference: Path) -> None:
    """Every volume ``reference`` holds is in ``out``, bit for bit."""
    for name in _volumes(reference):
        assert np.array_equal(_labels(out, name), _labels(reference, name)), name


@pytest.fixture(scope="module")
def affs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_affinities(tmp_path_factory.mktemp("cache") / "in.zarr", seed=3)


# ----------------------------------------------------------- two jobs in one process


def test_a_new_job_on_affinities_rewritten_at_the_same_paths_is_a_fresh_processs(tmp_path):
    """Job one fills this process's caches (affinities, arrays, database, mapped tables,
    finished answers); its output is deleted, the affinities rewritten at the same path with
    other cells, and job two made at the same output: it is what a fresh process makes."""
    store, out = tmp_path / "in.zarr", tmp_path / "out.zarr"
    affs = _write_affinities(store, seed=3)
    _ok(_here(affs, out, "--threshold", "0.5"))
    first = _labels(out, "segmentation")
    shutil.rmtree(out)
    _write_affinities(store, seed=7)
    _ok(_here(affs, out, "--threshold", "0.5"))
    _fresh(affs, tmp_path / "fresh.zarr", "--threshold", "0.5")
    _same_volumes(out, tmp_path / "fresh.zarr")
    assert not np.array_equal(first, _labels(out, "segmentation"))  # other cells indeed


def test_a_mask_rewritten_at_its_path_between_two_jobs_is_read_anew(affs, tmp_path):
    """The mask's opened volume is kept by path (`_mask_volume`): a second job in this
    process, on the mask rewritten there, masks with the new one, as a fresh process does."""
    mask = _write_mask(tmp_path / "mask.zarr", (0, 0, 0))
    _ok(_here(affs, tmp_path / "one.zarr", "--threshold", "0.5", "--mask", mask))
    _write_mask(tmp_path / "mask.zarr", (4, 24, 24))
    _ok(_here(affs, tmp_path / "two.zarr", "--threshold", "0.5", "--mask", mask))
    _fresh(affs, tmp_path / "fresh.zarr", "--threshold", "0.5", "--mask", mask)
    _same_volumes(tmp_path / "two.zarr", tmp_path / "fresh.zarr")
    assert not np.array_equal(_labels(tmp_path / "one.zarr", "fragments"),
                              _labels(tmp_path / "two.zarr", "fragments"))
    assert not _labels(tmp_path / "two.zarr", "fragments")[4:, 24:, 24:].any()


# --------------------------------------------- a resume with other settings, same process

RESUMES = {
    "shared-and-new-thresholds": ("--threshold", "0.5,0.2,0.8"),
    "blockwise": ("--threshold", "0.3", "--name", "bw", "--agglomeration", "blockwise"),
    "min-size": ("--threshold", "0.5", "--min-size", "50", "--name", "ms"),
}


@pytest.mark.parametrize("extra", RESUMES.values(), ids=RESUMES.keys())
def test_a_resume_with_other_settings_after_a_run_here_is_a_fresh_processs(affs, tmp_path,
                                                                             extra):
    """The job at 0.2 and 0.5 run here (its tables mapped, its volumes' finished state
    read), then resumed here at other thresholds, agglomeration or min size: every volume,
    shared (left finished) or new (new tables under another key, the same ids file), is
    the fresh process's, bit for bit."""
    out = tmp_path / "out.zarr"
    _ok(_here(affs, out, "--threshold", "0.2,0.5"))
    before = {name: _labels(out, name) for name in _volumes(out)}
    _ok(_here(affs, out, *extra, "--resume"))
    fresh = tmp_path / "fresh.zarr"
    _fresh(affs, fresh, *extra)
    _same_volumes(out, fresh)
    for name, labels in before.items():  # the first run's volumes are left as they were
        assert np.array_equal(_labels(out, name), labels), name


def test_a_run_failed_midway_here_then_resumed_here_is_a_fresh_processs(affs, tmp_path,
                                                                        monkeypatch):
    """A run whose relabel step fails after three blocks (a user's error in a block: the
    blocks' caches stay filled), resumed in this process at other thresholds: the fresh
    process's volumes."""
    out = tmp_path / "out.zarr"
    with _failing_after(monkeypatch, "_relabel", 3, "segmentation: writing failed (test)"):
        result = _here(affs, out, "--threshold", "0.2,0.5")
    assert result.exit_code == 2, result.output
    _ok(_here(affs, out, "--threshold", "0.2,0.5", "--resume"))
    _ok(_here(affs, out, "--threshold", "0.5,0.7", "--resume"))
    fresh = tmp_path / "fresh.zarr"
    _fresh(affs, fresh, "--threshold", "0.2,0.5,0.7")
    for name in ("fragments", "segmentation_0.2", "segmentation_0.5", "segmentation_0.7"):
        assert np.array_equal(_labels(out, name), _labels(fresh, name)), name


# -------------------------------------------------------- the caches themselves, directly


def test_a_table_replaced_on_disk_is_mapped_anew_after_forget_caches(tmp_path):
    """`_mapped` keeps a table's mapping by path: after `forget_caches` (what each run does
    first) a table replaced at that path (atomically, as `agglomerate_graph` writes) reads
    as the new one."""
    path = tmp_path / "lut.npy"
    np.save(path, np.arange(10, dtype=np.uint64))
    assert steps._mapped(str(path))[3] == 3
    np.save(tmp_path / "tmp.npy", np.arange(10, 30, dtype=np.uint64))
    os.replace(tmp_path / "tmp.npy", path)
    schedulers.forget_caches()
    assert steps._mapped(str(path)).tolist() == list(range(10, 30))
    schedulers.forget_caches()


def test_an_array_made_again_at_its_path_is_opened_anew_after_forget_caches(tmp_path):
    """`_array` keeps a level-0 array (its metadata) by path and mode: after `forget_caches`
    an array made again there with another shape and chunks is written as the new one."""
    path = str(tmp_path / "a.zarr")
    zarr.create_array(path, shape=(4, 8, 8), chunks=(2, 4, 4), dtype="uint64")
    steps._array(path, "r+")[...] = 1
    shutil.rmtree(path)
    zarr.create_array(path, shape=(6, 6, 6), chunks=(3, 3, 3), dtype="uint64")
    schedulers.forget_caches()
    steps._array(path, "r+")[...] = 2
    assert (zarr.open_array(path, mode="r")[...] == 2).all()
    assert zarr.open_array(path, mode="r").shape == (6, 6, 6)
    schedulers.forget_caches()


def _block(index: tuple[int, int, int]) -> SimpleNamespace:
    offset = tuple(i * b for i, b in zip(index, (4, 24, 24), strict=True))
    return SimpleNamespace(write_roi=SimpleNamespace(offset=offset))


def test_daisys_relabel_check_is_keyed_by_the_tables_and_sees_markers_removed(affs,
                                                                            tmp_path):
    """daisy's relabel check: a job at the same thresholds in another order finds every
    block done (the key takes them as a set); one at other thresholds finds none done (the
    first job's markers are another key's); a check made after a marker was removed finds
    that block undone, while a check that read the markers before keeps its reading (one
    read per step run, by design)."""
    out = tmp_path / "out.zarr"
    _ok(_here(affs, out, "--threshold", "0.2,0.5"))
    job = ScaleJob.load(out / FOLDER / "job.json")
    blocks = [(z, y, x) for z in range(2) for y in range(2) for x in range(2)]
    reordered = schedulers.DoneCheck(replace(job, thresholds=(0.5, 0.2)), "relabel")
    assert all(reordered(_block(b)) for b in blocks)
    other = schedulers.DoneCheck(replace(job, thresholds=(0.2, 0.7)), "relabel")
    assert not any(other(_block(b)) for b in blocks)
    early = schedulers.DoneCheck(job, "relabel")
    assert early(_block((0, 0, 0)))
    job.marker(f"relabel-{steps.lut_key(job)}", (1, 1, 0)).unlink()
    assert early(_block((1, 1, 0)))  # read before the removal
    later = schedulers.DoneCheck(job, "relabel")
    assert [b for b in blocks if not later(_block(b))] == [(1, 1, 0)]


# ---------------------------------------- done-markers outliving the volumes they describe


def test_a_segmentation_deleted_then_resumed_is_made_again(affs, tmp_path):
    """A finished job's segmentation deleted by hand, then --resume (here, or in any
    process): the volume must come back as it was, or the resume be refused. The relabel
    step's markers still say every block is done, so the new empty volume is left all
    zeros, marked finished, and reported with the table's segment count."""
    out = tmp_path / "out.zarr"
    _ok(_here(affs, out, "--threshold", "0.5"))
    made = _labels(out, "segmentation")
    shutil.rmtree(out / "labels" / "segmentation")
    _ok(_here(affs, out, "--threshold", "0.5", "--resume"))  # its blocks relabelled again
    assert np.array_equal(_labels(out, "segmentation"), made)


def test_the_fragments_deleted_then_resumed_are_made_again(affs, tmp_path):
    """As above for the fragments volume: its markers say every block is done, so the
    resume leaves the new volume all zeros, finished."""
    out = tmp_path / "out.zarr"
    _ok(_here(affs, out, "--threshold", "0.5"))
    made = _labels(out, "fragments")
    shutil.rmtree(out / "labels" / "fragments")
    segmentation = _labels(out, "segmentation")
    _ok(_here(affs, out, "--threshold", "0.5", "--resume"))  # its blocks made again
    assert np.array_equal(_labels(out, "fragments"), made)
    assert np.array_equal(_labels(out, "segmentation"), segmentation)


def test_a_mask_rewritten_before_a_resume_is_refused_as_rewritten_affinities_are(
        affs, tmp_path, monkeypatch):
    """The fragments step stops after four of eight blocks (a user's error); the mask is
    rewritten at its path; the resume is taken as the same job (the digest has the mask's
    path only), and its fragments are half of one mask and half of the other: neither a
    fresh run's on the old mask nor on the new. Rewritten affinities are refused
    ('holds other data than when ... was started'); the mask should be too."""
    mask = _write_mask(tmp_path / "mask.zarr", (0, 0, 0))
    out = tmp_path / "out.zarr"
    with _failing_after(monkeypatch, "_fragments", 4, "affinities: reading failed (test)"):
        assert _here(affs, out, "--threshold", "0.5", "--mask", mask).exit_code == 2
    _write_mask(tmp_path / "mask.zarr", (4, 24, 24))
    result = _here(affs, out, "--threshold", "0.5", "--resume")
    if result.exit_code == 0:
        _fresh(affs, tmp_path / "fresh.zarr", "--threshold", "0.5", "--mask", mask)
        assert np.array_equal(_labels(out, "fragments"),
                              _labels(tmp_path / "fresh.zarr", "fragments"))
    else:
        assert result.exit_code == 2 and "mask" in result.output, result.output


def test_fragments_removed_and_affinities_rewritten_are_refused_on_resume(tmp_path):
    """With the fragments gone, their record of the affinities went with them; the
    segmentations' record still tells that the affinities were rewritten: the fragments
    made again would not be the graph's."""
    affs = _write_affinities(tmp_path / "a.zarr", seed=3)
    out = tmp_path / "out.zarr"
    _ok(_here(affs, out, "--threshold", "0.5"))
    shutil.rmtree(out / "labels" / "fragments")
    _write_affinities(tmp_path / "a.zarr", seed=4)
    result = _here(affs, out, "--threshold", "0.5", "--resume")
    assert result.exit_code == 2
    assert "holds other data than when" in result.output
