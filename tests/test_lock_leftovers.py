"""What the one-writer locks (`emrun.locks`) leave behind, and what a later command makes of
it: another user's lock file in a shared folder, a benchmark's --out after it ends, an
output that is a symbolic link to a folder not made yet. "Another emrun" is a child process
holding the folder's lock, as in test_concurrent_writers."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from test_concurrent_writers import another_emrun, in_use
from test_infer import make_inputs

from emrun import locks
from emrun.errors import UserError
from emrun.io import open_volume
from emrun.io.write import write_volume


@pytest.fixture
def as_another_user(monkeypatch):
    """A lock file without write permission is one another user left (0644, their own): it
    cannot be opened for writing. Root may open it all the same, so the kernel's refusal is
    reproduced here for it too."""
    real_open = os.open

    def refusing_open(path, flags, mode=0o777, **kwargs):
        if Path(path).name == locks.LOCK_NAME and flags & (os.O_WRONLY | os.O_RDWR):
            try:
                writable = os.stat(path).st_mode & stat.S_IWUSR
            except FileNotFoundError:
                writable = True
            if not writable:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, mode, **kwargs)

    monkeypatch.setattr(locks.os, "open", refusing_open)


def foreign(folder: Path) -> None:
    """Make ``folder``'s lock file another user's (as `as_another_user` sees it)."""
    os.chmod(folder / locks.LOCK_NAME, 0o444)


def test_a_lock_file_another_user_left_blocks_nothing(tmp_path, as_another_user):
    """A shared folder (a lab's /shared/pred.zarr): a colleague's run killed outright leaves
    its `.emrun-lock`, which nobody else may write. The next user's command into the folder
    was refused with 'cannot write a store there (Permission denied)' though the folder is
    theirs to write, and `train --resume` so too; the README promises that a run killed
    outright leaves nothing that blocks the next."""
    store = tmp_path / "pred.zarr"
    data = np.arange(4 * 8 * 8, dtype=np.uint8).reshape(4, 8, 8)
    write_volume(store, "first", data)
    with another_emrun(store):
        pass  # killed -9: its lock file stays
    foreign(store)
    write_volume(store, "image", data)
    np.testing.assert_array_equal(open_volume(store / "image").read(), data)
    assert sorted(p.name for p in store.iterdir()) == ["first", "image", "zarr.json"]

    run = tmp_path / "run"  # a run directory (train's, demo's and bench's --out alike)
    with another_emrun(run):
        pass
    foreign(run)
    locks.hold(run, "give another --run-dir")
    try:
        assert locks.held(run)
        assert "pid" in (run / locks.LOCK_NAME).read_text()  # its holder, for a refusal
    finally:
        locks.release(run)
    assert not (run / locks.LOCK_NAME).exists()


def test_another_users_live_lock_is_refused_as_in_use(tmp_path, as_another_user):
    """While the colleague's command still runs, the refusal names it (pid and host), not a
    permission the user does have; nothing is written."""
    store = tmp_path / "pred.zarr"
    data = np.zeros((4, 8, 8), np.uint8)
    write_volume(store, "first", data)
    with another_emrun(store) as pid:
        foreign(store)
        with pytest.raises(UserError, match=in_use(pid, "give another output store")):
            write_volume(store, "image", data)
        with pytest.raises(UserError, match=in_use(pid, "x")):
            locks.hold(store, "x")
    assert sorted(p.name for p in store.iterdir()) == [locks.LOCK_NAME, "first", "zarr.json"]


def _snemi3d_files(tmp_path: Path) -> Path:
    from emrun.bench.snemi3d import FILES

    data = tmp_path / "snemi3d"
    data.mkdir()
    for name in FILES.values():
        (data / name).write_bytes(b"")  # found: never read before the refusals below
    return data


def test_a_benchmark_lets_its_out_go_when_it_ends(tmp_path):
    """`bench snemi3d` held its --out until its process ended and never removed the lock
    file: each run, finished or refused, left `OUT/.emrun-lock` behind, and a program that
    ran the benchmark (a notebook, a test) kept the folder from every other emrun."""
    from emrun.bench.snemi3d import run_snemi3d
    from emrun.bench.snemi3d_final import PACKAGE, run_final

    data = _snemi3d_files(tmp_path)
    out = tmp_path / "bench"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({
        "segmenter": "mws", "parameter": "bias", "chosen": 0.5, "iterations": 1,
        "overrides": []}))
    with pytest.raises(UserError, match="finished benchmark"):
        run_snemi3d(data, out, iterations=1)
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]
    with another_emrun(out):  # free for another process
        pass
    (out / locks.LOCK_NAME).unlink()
    (out / PACKAGE).write_bytes(b"a final model")
    with pytest.raises(UserError, match="final model of this benchmark is written"):
        run_final(data, out, lambda *args: [])
    assert sorted(p.name for p in out.iterdir()) == sorted([PACKAGE, "results.json"])
    with another_emrun(out):
        pass


def test_infer_writes_through_a_link_to_a_folder_not_made_yet(tmp_path):
    """`--output pred.zarr`, a symbolic link to scratch space not made yet: inference made
    the folder it points to until the output was held before it was made; then it said
    'cannot write a store there (File exists)'. A file above the output is named as it was."""
    from emrun.infer.run import run_inference

    recipe, _, _, tmp = make_inputs(tmp_path)
    link = tmp / "pred.zarr"
    link.symlink_to(tmp / "scratch" / "pred.zarr")

    def infer(output: Path):
        return run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), output,
                             block=(4, 16, 16), device="cpu")

    done = infer(link)
    assert done.done == done.total
    assert link.is_symlink() and (tmp / "scratch" / "pred.zarr" / "zarr.json").is_file()
    assert locks.LOCK_NAME not in os.listdir(link)
    (tmp / "notes.txt").write_text("not a folder")
    with pytest.raises(UserError, match=r"notes\.txt is a file, not a folder"):
        infer(tmp / "notes.txt" / "pred.zarr")
