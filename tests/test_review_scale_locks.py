"""Review of the segment-at-scale, lock takeover and augmentation-check changes: the bugs
found, each as a strict xfail naming the file whose fix it waits for."""

from __future__ import annotations

import numpy as np
import pytest

import emrun.recipe.recipe  # noqa: F401  (defines the combinators' step union)
from emrun.data.augment import Pipeline
from emrun.recipe.augment import Misalign, Warp, augment_problems

# ------------------------------------------------------------ the augmentation check

SHEARED_TWIST = Warp(rot_max=0, shear_max=1.0, scale=(1, 1), stretch_max=0, twist_max=90)
"""Sections turned by up to 45 degrees either way, sheared by up to 1: a single section at
45 degrees with shear -1 reads 48 px in y for a 64 x 64 patch, but the read holds every
section, and the middle one (odd counts: exactly the drawn angle, here 0) reads 66."""


def smallest_planned_side(spec: Warp, patch: tuple[int, int, int], draws: int) -> int:
    """The least y or x the pipeline plans to read for ``patch`` over ``draws`` samples."""
    rng = np.random.default_rng(0)
    pipeline = Pipeline([spec])
    return min(min(pipeline.prepare(rng, patch)[1][1:]) for _ in range(draws))


@pytest.mark.parametrize("patch", [(3, 64, 64), (8, 64, 64)])
def test_a_misalignment_before_a_twisted_warp_is_judged_by_the_reads_it_gets(patch):
    """A misalignment of up to 50 px before the warp: every read the warp plans is at least
    66 px on each side (so the misalignment always fits, as without the twist), yet the
    check refused the recipe, saying the misalignment must produce 48 x 137."""
    recipe = [Misalign(displacement=(3, 50)), SHEARED_TWIST]
    assert smallest_planned_side(SHEARED_TWIST, patch, draws=400) > 50
    assert augment_problems([Misalign(displacement=(3, 50)),
                             SHEARED_TWIST.model_copy(update={"twist_max": 0})], patch) == []
    assert augment_problems(recipe, patch) == []


def test_a_claim_left_by_a_killed_claimer_is_no_content_of_a_store_or_work_folder(tmp_path):
    """A takeover's claim file (`.emrun-lock.claim.*`), left by a claimer killed outright,
    kept a failed first write's empty store and a killed evaluation's work folder: both
    took it for something a user put there."""
    from emrun import locks
    from emrun.evaluate.schedule import _only_ours
    from emrun.io.write import _remove_if_bare

    claim = f"{locks.LOCK_NAME}.claim.123.456"
    store = tmp_path / "out.zarr"
    store.mkdir()
    (store / "zarr.json").write_text("{}")
    (store / claim).write_text("")
    _remove_if_bare(store)
    assert not store.exists()
    work = tmp_path / "emrun-evaluate-x"
    work.mkdir()
    (work / "work.pickle").write_bytes(b"")
    (work / claim).write_text("")
    assert _only_ours(work)
    (work / "notes.txt").write_text("a user's")
    assert not _only_ours(work)


def test_bench_segment_stopped_in_the_pipeline_says_no_resume_and_leaves_nothing(
        tmp_path, monkeypatch):
    """A signal in the segmentation pipeline now stops it with "run the same command with
    --resume", which bench segment passed on, though it has no --resume and removes its
    volumes."""
    from emrun.bench.segment import bench_segment
    from emrun.errors import Interrupted
    from emrun.segment import job

    def stopped(request):
        raise Interrupted("SIGTERM", "run the same command with --resume to go on")

    monkeypatch.setattr(job, "run_segment", stopped)
    with pytest.raises(Interrupted) as caught:
        bench_segment((8, 32, 32), (8, 32, 32), [1], folder=tmp_path / "b")
    assert caught.value.exit_code == 143
    assert "--resume" not in str(caught.value) and "run it again" in str(caught.value)
    assert not list((tmp_path / "b").glob("emrun-bench-segment-*"))
