"""What a command killed outright (kill -9, the out-of-memory killer) leaves, and what the next
command makes of it. The README promises that outputs are complete or absent under their
final names and that such a kill leaves nothing that blocks the next run; each test here
leaves the state a kill left at one moment (by killing a child process there, or by writing
the same files) and checks the rerun."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr
from test_infer import make_inputs, make_recipe

from emrun import locks
from emrun.errors import UserError
from emrun.io import open_volume
from emrun.io.write import create_volume, write_volume

TESTS = Path(__file__).resolve().parent
ZARR_TEMPORARY = "zarr.0123456789abcdef0123456789abcdef.partial"
"""What zarr leaves when killed while writing a zarr.json: it writes NAME.<uuid>.partial and
renames it."""


def killed_first_write(store: Path) -> None:
    """The folder a new store's first write leaves when killed before zarr wrote anything:
    the store holding only its (no longer held) lock file."""
    store.mkdir()
    (store / locks.LOCK_NAME).write_text("pid 1 on elsewhere since 2024-01-01 00:00:00\n")


def run_killed(script: str, *args: str) -> None:
    """Run ``script`` in a child Python that kills itself with SIGKILL where it says so."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(TESTS)})
    assert done.returncode == -signal.SIGKILL, done.stderr


def test_a_store_holding_only_a_killed_writers_lock_is_as_good_as_absent(tmp_path):
    """The next write into it is that of a new store: one that fails takes the folder away
    again, as it does for a store it made. It left an empty OUT.zarr folder behind (and,
    had it failed after its first volume's metadata, a bare zarr group)."""
    store = tmp_path / "out.zarr"
    killed_first_write(store)
    data = np.zeros((4, 8, 8), np.uint8)
    with pytest.raises(UserError, match="levels"):
        write_volume(store, "image", data, levels=0)
    assert not store.exists()

    killed_first_write(store)
    write_volume(store, "image", data)
    assert sorted(p.name for p in store.iterdir()) == ["image", "zarr.json"]
    np.testing.assert_array_equal(open_volume(store / "image").read(), data)


def test_zarrs_temporary_from_a_killed_first_write_blocks_nothing(tmp_path):
    """Killed while zarr wrote the new store's root metadata: the folder holds the lock and
    `zarr.<uuid>.partial`. Every later write into it was refused ('exists and is not a zarr
    store'), also inference's, with and without --resume."""
    store = tmp_path / "out.zarr"
    killed_first_write(store)
    (store / ZARR_TEMPORARY).write_text('{"zarr_format": 3, "node_ty')
    data = np.arange(4 * 8 * 8, dtype=np.uint8).reshape(4, 8, 8)
    write_volume(store, "image", data)
    assert sorted(p.name for p in store.iterdir()) == ["image", "zarr.json"]
    np.testing.assert_array_equal(open_volume(store / "image").read(), data)


def test_zarrs_temporaries_in_a_store_go_with_the_next_write(tmp_path):
    """Temporaries a killed write left beside the metadata of a store's root, labels group,
    volumes and levels stayed there for good."""
    store = tmp_path / "out.zarr"
    write_volume(store, "labels", np.ones((4, 8, 8), np.uint32), levels=1)
    volume = store / "labels" / "labels"
    places = [store, store / "labels", volume, volume / "0"]
    for place in places:
        (place / ZARR_TEMPORARY).write_text("{")
    write_volume(store, "image", np.zeros((4, 8, 8), np.uint8), levels=1)
    assert not [p for p in store.rglob("*.partial")]
    np.testing.assert_array_equal(open_volume(store / "labels").read(), 1)


CREATE_KILLED = """
import os, signal, sys
import numpy as np
import zarr
from emrun.io.write import create_volume

real = zarr.Group.create_array
def killed(self, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
zarr.Group.create_array = killed  # killed once the image group exists, before its array
create_volume(sys.argv[1], "fragments", (4, 8, 8), np.uint64, label=True)
"""


def test_a_volume_killed_while_being_created_is_not_under_its_final_name(tmp_path):
    """`create_volume` (inference's outputs, the scaled segmentation's fragments and
    segmentations) killed between the image group and its level-0 array left the group under
    the final name: `segment --scheduler local` then failed on every rerun, with --resume or
    without, with 'FileNotFoundError: .../labels/fragments/0 does not exist' (exit 1)."""
    store = tmp_path / "seg.zarr"
    run_killed(CREATE_KILLED, str(store))
    assert not (store / "labels" / "fragments").exists()
    array = create_volume(store, "fragments", (4, 8, 8), np.uint64, label=True)
    array[...] = 7
    assert sorted(p.name for p in (store / "labels").iterdir()) == ["fragments", "zarr.json"]
    np.testing.assert_array_equal(open_volume(store / "fragments").read(), 7)


INFER_KILLED = """
import os, signal, sys
from pathlib import Path
import torch
from test_infer import make_recipe
import emrun.infer.job as job

real, made = job.create_volume, []
def create_then_die(*args, **kwargs):
    real(*args, **kwargs)
    made.append(args[1])
    if len(made) == int(sys.argv[2]):  # killed before the run's record is written
        os.kill(os.getpid(), signal.SIGKILL)
job.create_volume = create_then_die
from emrun.infer.run import run_inference
tmp = Path(sys.argv[1])
run_inference(make_recipe(), tmp / "c.pt", str(tmp / "in.zarr/image"), tmp / "pred.zarr",
              block=(4, 16, 16), device="cpu")
"""


@pytest.fixture(scope="module")
def killed_infers(tmp_path_factory) -> tuple[Path, dict[int, Path]]:
    """The uninterrupted output, and for each kill moment (after the first or the second
    task volume) the folder an `infer` killed there left: killed once each, the two --resume
    variants below each rerun a copy (a process killed costs its imports)."""
    from emrun.infer.run import run_inference

    recipe, _, _, base = make_inputs(tmp_path_factory.mktemp("inputs"))
    straight = base / "straight.zarr"
    run_inference(recipe, base / "c.pt", str(base / "in.zarr/image"), straight,
                  block=(4, 16, 16), device="cpu")
    killed = {}
    for created in (1, 2):
        folder = tmp_path_factory.mktemp(f"killed{created}") / "run"
        folder.mkdir()
        for name in ("c.pt", "in.zarr"):
            copy = shutil.copytree if (base / name).is_dir() else shutil.copy2
            copy(base / name, folder / name)
        run_killed(INFER_KILLED, str(folder), str(created))
        killed[created] = folder
    return straight, killed


@pytest.mark.parametrize("created", [1, 2])
@pytest.mark.parametrize("resume", [False, True])
def test_infer_killed_before_its_record_starts_over(killed_infers, tmp_path, created, resume):
    """`infer` killed after creating its task volumes, before writing the run's record:
    the rerun was refused with --resume ('holds no record ... remove it') and without ('not
    an emrun inference output') until the user removed the output. Nothing of it was
    predicted, so the rerun starts it over and gives the uninterrupted output."""
    from emrun.infer.run import run_inference

    straight, killed = killed_infers
    tmp = tmp_path / "run"
    shutil.copytree(killed[created], tmp)
    recipe = make_recipe()
    out = tmp / "pred.zarr"
    assert (out / "aff").is_dir() and "emrun" not in zarr.open_group(str(out)).attrs
    done = run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), out,
                         block=(4, 16, 16), device="cpu", resume=resume)
    assert done.done == done.total
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in straight.iterdir())
    for task in recipe.tasks:
        np.testing.assert_array_equal(open_volume(out / task).read(),
                                      open_volume(straight / task).read())


def test_infer_keeps_refusing_a_folder_that_is_no_inference_output(tmp_path):
    """What starts over is only emrun's own cut-short output: a store holding a user's
    volume is refused as before, and kept."""
    from emrun.infer.run import run_inference

    recipe, _, _, tmp = make_inputs(tmp_path)
    out = tmp / "mine.zarr"
    write_volume(out, "aff", np.zeros((4, 8, 8), np.uint8))
    for resume in (False, True):
        with pytest.raises(UserError):
            run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), out,
                          block=(4, 16, 16), device="cpu", resume=resume)
    np.testing.assert_array_equal(open_volume(out / "aff").read(), 0)


def test_an_inference_worker_killed_is_one_line_not_a_bug():
    """kill -9 of a local inference worker (the out-of-memory killer's way) ended the run
    with exit 1 and 'This is a bug in emrun'; it is the user's (or the machine's) doing:
    one line, exit 2, saying to continue with --resume."""
    from emrun.infer.schedule import worker_died

    killed = worker_died(-signal.SIGKILL)
    assert isinstance(killed, UserError)
    assert "--resume" in str(killed) and "signal 9" in str(killed)
    assert not isinstance(worker_died(1), UserError)  # a worker that exits silently: ours


def test_a_replacement_killed_between_its_renames_keeps_the_old_volume(tmp_path):
    """`data convert --overwrite` killed between setting the old volume aside and renaming
    the new one in: no volume under the name, the old one as `NAME.replaced.partial`,
    which nothing cleaned up or brought back. The next write into the store restores it."""
    store = tmp_path / "out.zarr"
    old = np.full((4, 8, 8), 3, np.uint8)
    write_volume(store, "image", old, levels=1)
    os.rename(store / "image", store / "image.replaced.partial")  # the kill's state
    write_volume(store, "note", np.zeros((4, 8, 8), np.uint8), levels=1)
    np.testing.assert_array_equal(open_volume(store / "image").read(), old)
    assert not (store / "image.replaced.partial").exists()
