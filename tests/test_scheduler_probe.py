"""The multi-worker schedulers under abuse: workers that die on one block, --launch commands
that do no work, two runs on one output, resumes with other settings, more workers than
blocks. (kill -9 of the whole command at random moments is tests/test_crash_probe.py's.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml
from test_infer import make_inputs, make_recipe
from typer.testing import CliRunner

from emrun.errors import UserError
from emrun.infer import schedule
from emrun.infer.run import run_inference

BLOCK = (4, 16, 16)

POISON = """\
import os, time
if os.environ.get("POISON_BLOCK"):
    from emrun.infer import worker as _worker
    _real = _worker.BlockWorker._write_block
    _target = tuple(int(b) for b in os.environ["POISON_BLOCK"].split(","))

    def _write_block(self, block, values, patches):
        if tuple(block) == _target:
            os.kill(os.getpid(), 9)  # this block kills its worker, every time
        time.sleep(float(os.environ.get("POISON_SLOW", "0")))
        return _real(self, block, values, patches)

    _worker.BlockWorker._write_block = _write_block
"""


def poison(tmp: Path, monkeypatch: pytest.MonkeyPatch, block: str, slow: float = 0.0) -> None:
    """Worker processes started from now on die on ``block`` (a sitecustomize module on
    their PYTHONPATH) and take ``slow`` seconds more for every other block."""
    folder = tmp / "poison"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(textwrap.dedent(POISON))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(folder), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("POISON_BLOCK", block)
    monkeypatch.setenv("POISON_SLOW", str(slow))


def markers(out: Path) -> int:
    return sum(len(list(d.glob("*_*_*"))) for d in (out / ".emrun-done").iterdir())


def test_a_worker_dying_stops_the_others_between_blocks(tmp_path, monkeypatch):
    """A worker killed on a block (the out-of-memory killer's way): the others were 'stopped'
    by SIGTERM, which they ignore, so the run went on through every unit left before it
    said a word (and hung for good once the unread results filled their pipe)."""
    recipe, _, _, tmp = make_inputs(tmp_path, shape=(12, 40, 48))
    monkeypatch.setattr(schedule, "handover_budget", lambda *a, **k: 1)  # a unit per block
    poison(tmp, monkeypatch, "0,0,0", slow=0.3)
    out = tmp / "o.zarr"
    with pytest.raises(UserError, match=r"worker was killed.*--resume"):
        run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), out, block=BLOCK,
                      workers=2, device="cpu")
    assert markers(out) < 12, "the surviving worker must stop after its blocks in flight"


def _infer_command(tmp: Path, out: Path, *extra: str) -> list[str]:
    recipe = tmp / "r.yaml"
    if not recipe.exists():
        recipe.write_text(yaml.safe_dump(make_recipe().resolved()))
    return [sys.executable, "-m", "emrun", "infer", "--recipe", str(recipe), "--checkpoint",
            str(tmp / "c.pt"), "--input", str(tmp / "in.zarr/image"), "--output", str(out),
            "--block", *map(str, BLOCK), "--device", "cpu", *extra]


@pytest.mark.slow
def test_sigterm_stops_daisy_workers_between_blocks_and_says_so(tmp_path, monkeypatch):
    """SIGTERM (a time limit, scancel) ended the daisy scheduler on the spot, without a word
    (exit 143), while its workers went on writing the output, lock released, until their
    unit was done: a --resume started meanwhile wrote beside them."""
    pytest.importorskip("daisy")
    _, _, _, tmp = make_inputs(tmp_path, shape=(12, 40, 48))
    poison(tmp, monkeypatch, "99,9,9", slow=1.0)  # no block dies; each takes a second more
    out = tmp / "o.zarr"
    process = subprocess.Popen(_infer_command(tmp, out, "--scheduler", "daisy", "--workers",
                                              "2"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None and \
            not ((out / ".emrun-done").is_dir() and markers(out) >= 2):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "stopped by SIGTERM" in stderr and "--resume" in stderr
    left = markers(out)
    assert left < 27, "the workers must stop between blocks, not finish their units"
    time.sleep(3)
    assert markers(out) == left, "nothing may be written after the scheduler has exited"


def test_daisy_gives_a_unit_as_long_as_it_takes(tmp_path, monkeypatch):
    """A daisy block is a whole unit (hours on a large volume); daisy's default limit of
    600 s per block killed every slower unit, three times, and failed the job."""
    daisy = pytest.importorskip("daisy")
    recipe, _, _, tmp = make_inputs(tmp_path, shape=(12, 40, 48))
    made: dict = {}

    class Seen(Exception):
        pass

    def task(*args, **kwargs):
        made.update(kwargs)
        raise Seen

    monkeypatch.setattr(daisy, "Task", task)
    with pytest.raises(Seen):
        run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), tmp / "o.zarr",
                      block=BLOCK, scheduler="daisy", workers=2, device="cpu")
    assert made.get("timeout", 600) >= 7 * 24 * 3600


def test_a_resume_with_another_tta_is_refused(tmp_path):
    recipe, _, _, tmp = make_inputs(tmp_path, shape=(12, 40, 48))

    class Stop(Exception):
        pass

    def stop_after_three(progress):
        if progress.done == 3:
            raise Stop

    args = (recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), tmp / "o.zarr")
    with pytest.raises(Stop):
        run_inference(*args, block=BLOCK, on_block=stop_after_three)
    with pytest.raises(UserError, match="--tta"):
        run_inference(*args, block=BLOCK, tta=4, resume=True)


def test_infer_without_daisy_says_so_before_making_the_output(tmp_path, monkeypatch):
    recipe, _, _, tmp = make_inputs(tmp_path, shape=(4, 16, 16))
    monkeypatch.setitem(sys.modules, "daisy", None)  # import daisy fails
    with pytest.raises(UserError, match="pip install"):
        run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), tmp / "o.zarr",
                      scheduler="daisy", device="cpu")
    assert not (tmp / "o.zarr").exists()


def test_segment_without_daisy_says_so_before_making_the_output(tmp_path, monkeypatch):
    """It made the output (fragments, segmentation, the job) and then said daisy was
    missing: once installed, the same command was refused ('holds an unfinished ...')."""
    from test_segment import affinities, cells

    from emrun.cli import app
    from emrun.io import write_volume

    nearest = ((-1, 0, 0), (0, -1, 0), (0, 0, -1))
    affs = affinities(cells((8, 32, 32), n=4, seed=3), nearest)
    write_volume(tmp_path / "in.zarr", "affinity", (affs * 255).astype("uint8"),
                 channel_axis=True, attrs={"offsets": [list(o) for o in nearest]})
    monkeypatch.setitem(sys.modules, "daisy", None)  # import daisy fails
    out = tmp_path / "out.zarr"
    result = CliRunner().invoke(app, ["segment", str(tmp_path / "in.zarr/affinity"), str(out),
                                      "--scheduler", "daisy"])
    assert result.exit_code == 2, result.output
    assert "pip install" in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_a_launch_command_that_never_runs_the_worker_is_named(tmp_path):
    """`--launch true` (or a fire-and-forget submit) ended at once, exit 0, without running
    the worker: daisy restarted it ten times and emrun then passed on daisy's advice to
    raise Task(max_worker_restarts). Now the worker's daisy process leaves what happened
    as the run's user error (one line, exit 2), in `launch_failure`'s words."""
    from emrun.devices import WORKER_ERROR, run_through

    run_through("true", "emrun.evaluate.schedule", [str(tmp_path)], tmp_path)
    said = (tmp_path / WORKER_ERROR).read_text()
    assert said.startswith("the workers started through --launch 'true' failed (the --launch "
                           "command 'true' ended (exit code 0) without running the worker "
                           "command given to it")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["launched", WORKER_ERROR]
    assert list((tmp_path / "launched").iterdir()) == []


def test_a_launch_command_that_runs_the_worker_passes(tmp_path, monkeypatch):
    """The worker's __main__ (`launched_main`) leaves the file and gets its arguments."""
    from emrun.devices import run_through

    (tmp_path / "probe_worker.py").write_text(textwrap.dedent("""
        from pathlib import Path
        from emrun.devices import launched_main

        launched_main(lambda a, b: Path(a).write_text(b))
    """))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), str(Path.cwd())]))
    run_through("env EMRUN_LAUNCHED=1", "probe_worker", [str(tmp_path / "got"), "x y"],
                tmp_path)
    assert (tmp_path / "got").read_text() == "x y"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["got", "launched", "probe_worker.py"]
    assert list((tmp_path / "launched").iterdir()) == []  # its start file, removed


class _Killed:
    """daisy's state of a task whose worker died of kill -9 on one block every time."""

    failed_count, orphaned_count = 1, 0
    last_worker_error = "_WorkerExitError: daisy worker subprocess exited with code -9"


def test_a_daisy_worker_killed_on_a_block_is_the_machines_doing(tmp_path, monkeypatch):
    """The local schedulers say a killed worker (the out-of-memory killer) is the machine's
    or the user's: one line, exit 2, --resume. Under daisy the same death was 'This is a
    bug in emrun', exit 1."""
    daisy = pytest.importorskip("daisy")
    recipe, _, _, tmp = make_inputs(tmp_path, shape=(4, 16, 32))
    monkeypatch.setattr(daisy, "run_blockwise",
                        lambda tasks, **kw: {tasks[0].task_id: _Killed()})
    with pytest.raises(UserError, match=r"worker was killed \(signal 9.*--resume"):
        run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), tmp / "o.zarr",
                      block=BLOCK, scheduler="daisy", workers=2, device="cpu")


def test_an_evaluation_daisy_worker_killed_is_the_machines_doing(tmp_path, monkeypatch):
    daisy = pytest.importorskip("daisy")
    import numpy as np

    from emrun.evaluate.blockwise import Work
    from emrun.evaluate.schedule import Parallel, score_blocks
    from emrun.io import open_volume, write_volume

    labels = np.arange(4 * 8 * 8, dtype=np.uint64).reshape(4, 8, 8) // 16
    write_volume(tmp_path / "v.zarr", "seg", labels)
    volumes = [open_volume(str(tmp_path / "v.zarr/seg"))] * 2
    monkeypatch.setattr(daisy, "run_blockwise",
                        lambda tasks, **kw: {tasks[0].task_id: _Killed()})
    with pytest.raises(UserError, match=r"evaluation worker was killed \(signal 9"):
        score_blocks(Work(volumes, (2, 8, 8), False, False, 0.5),
                     Parallel(scheduler="daisy", workers=2, work_dir=str(tmp_path)))


def test_a_resume_with_another_roi_names_the_roi(tmp_path):
    from emrun.geometry import Roi

    recipe, _, _, tmp = make_inputs(tmp_path, shape=(4, 16, 32))
    args = (recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), tmp / "o.zarr")
    run_inference(*args, block=BLOCK, device="cpu")
    with pytest.raises(UserError, match="--roi"):
        run_inference(*args, block=BLOCK, device="cpu", resume=True,
                      roi=Roi((0, 0, 0), (4, 16, 16)))


# -- a --launch command that waits or hangs ------------------------------------------------------


def test_a_launch_that_has_started_no_worker_is_noted_now_and_then(tmp_path):
    """`--launch "sbatch --wait ..."` queued for an hour, or a command that hung: the
    scheduler said nothing for as long as it lasted. The notes come at fixed points of the
    wait (each once), and none once a worker has left its file in the folder."""
    from emrun.devices import LaunchWatch

    watch = LaunchWatch("srun -p gpu", tmp_path)
    watch.stop()  # only its decisions are asked here, for elapsed times given
    assert watch.note(119.0, begun=False) is None
    said = watch.note(125.0, begun=False)
    assert said is not None and "no worker has started through --launch 'srun -p gpu' " \
        "after 2 min" in said
    assert watch.note(130.0, begun=False) is None  # once per point
    assert "after 62 min" in watch.note(3700.0, begun=False)  # the points passed: one note
    assert watch.note(99_999.0, begun=False) is None  # all said
    fresh = LaunchWatch("srun", tmp_path)
    fresh.stop()
    assert fresh.note(700.0, begun=True) is None


def test_the_launch_watch_notes_on_stderr_until_a_worker_begins(tmp_path, monkeypatch, capsys):
    from emrun.devices import LaunchWatch, launched_workers

    monkeypatch.setattr(LaunchWatch, "NOTES_AT_S", (0.0,))
    monkeypatch.setattr(LaunchWatch, "POLL_S", 0.01)
    with launched_workers("srun", tmp_path) as _:
        deadline = 2000
        while "no worker has started" not in capsys.readouterr().err and deadline:
            threading.Event().wait(0.01)
            deadline -= 1
    assert deadline, "the note never came"
    (tmp_path / "launched").mkdir()
    (tmp_path / "launched" / "0123").touch()  # a worker has begun: nothing is said
    with launched_workers("srun", tmp_path):
        threading.Event().wait(0.1)
    assert capsys.readouterr().err == ""
