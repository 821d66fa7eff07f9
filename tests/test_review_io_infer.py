"""Review of IO, locks, inference, view and export: each test fails on the code before its fix."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from emrun import locks
from emrun.errors import UserError


@pytest.fixture
def no_locks(monkeypatch: pytest.MonkeyPatch) -> None:
    """flock fails as on an NFS mount without its lock service."""

    def refuse(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(locks.fcntl, "flock", refuse)
    monkeypatch.setattr(locks, "_told_no_locks", True)


def test_a_stale_empty_lock_file_taken_over_by_another_first_is_not_removed(
        tmp_path: Path, no_locks: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes judge one stale empty lock file (an older emrun's, or a holder killed
    before it wrote its line); the first replaces it with its own, still empty while it
    writes its line. The second compared the file's text only ('' both), so it removed the
    first's lock and took the folder too: both wrote it."""
    folder = tmp_path / "out.zarr"
    folder.mkdir()
    path = folder / locks.LOCK_NAME
    path.touch()
    old = time.time() - 10 * locks.STARTING_S
    os.utime(path, (old, old))
    judge = locks._stale
    raced: list[bool] = []

    def first_takes_it_meanwhile(where: Path, holder: str) -> bool:
        verdict = judge(where, holder)
        if not raced:  # the other process: its set-aside, then its O_EXCL file, unwritten
            raced.append(True)
            where.unlink()
            os.close(os.open(where, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644))
        return verdict

    monkeypatch.setattr(locks, "_stale", first_takes_it_meanwhile)
    with pytest.raises(UserError, match="in use by another emrun"):
        locks.hold(folder, "x")
    assert path.exists() and path.read_text() == ""  # the first's lock file stays
    assert not locks.held(folder)


def test_an_older_output_resumes_with_the_block_it_was_started_with(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An output an older emrun started with `--block 37 9 11` over a 37-voxel z axis (its
    chunks then: 1 voxel thick) was refused on `--resume --block 37 9 11` as 'another block
    layout': today's default chunks of that block differ (thick ones, the block rounded up to
    them), and only a resumption naming no block finished in the recorded layout."""
    import numpy as np
    from test_infer_probe import checkpoint, make_network, probe_recipe, read

    from emrun.infer import job as job_module
    from emrun.infer import schedule
    from emrun.io.write import write_volume

    recipe = probe_recipe((16, 8, 8), stride=(12, 6, 5))
    image = np.random.default_rng(5).random((37, 9, 11)).astype(np.float32)
    write_volume(tmp_path / "in.zarr", "image", image)
    source = str(tmp_path / "in.zarr/image")
    out, weights = tmp_path / "out.zarr", checkpoint(recipe, tmp_path)

    def run(**options: object) -> schedule.Progress:
        job = job_module.prepare_job(recipe, weights, source, out, **options)
        try:
            return schedule.run_local(job, [("cpu", 1)], model=make_network)
        finally:
            job_module.release_job(job)

    with monkeypatch.context() as older:  # the older emrun's default chunks of that block
        older.setattr(job_module, "choose_chunks_and_block",
                      lambda *args: ((1, 9, 11), (37, 9, 11)))
        run(block=(37, 9, 11))
    first = read(out, "aff")
    progress = run(block=(37, 9, 11), resume=True)
    assert (progress.done, progress.skipped) == (0, 1)
    np.testing.assert_array_equal(read(out, "aff"), first)


def test_a_lock_file_that_is_a_link_to_nothing_is_refused_not_spun_on(tmp_path: Path) -> None:
    """A dangling `.emrun-lock` link exists for O_CREAT | O_EXCL but not for a plain open:
    the lock's open went round that pair forever at full CPU (it was a traceback before)."""
    import subprocess
    import sys

    folder = tmp_path / "out.zarr"
    folder.mkdir()
    (folder / locks.LOCK_NAME).symlink_to(tmp_path / "gone" / "lock")
    code = ("import sys; from pathlib import Path; from emrun import locks\n"
            "try:\n    locks.hold(Path(sys.argv[1]), 'x')\n"
            "except Exception as exc:\n    print(type(exc).__name__, exc)\n")
    try:
        done = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True,
                              text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("hold() spun on a dangling lock link")
    assert done.stdout.startswith("UserError ") and "remove the link" in done.stdout, done
