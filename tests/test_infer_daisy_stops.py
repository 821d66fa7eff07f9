"""`emrun infer --scheduler daisy` stopped by Ctrl-C (SIGINT to the process group), with
its workers started here or through ``--launch``: one line, exit 130, the finished blocks
kept for --resume; and a daisy worker whose server closed after a stop ends quietly."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_infer import make_inputs

from emrun.devices import WORKER_ERROR, BlockStops, daisy_stops, run_through

BLOCK = (4, 16, 16)


def _infer_process(tmp: Path, *extra: str) -> tuple[subprocess.Popen[str], Path]:
    recipe, _, _, tmp = make_inputs(tmp, shape=(20, 80, 80))
    (tmp / "r.yaml").write_text(yaml.safe_dump(recipe.resolved()))
    out = tmp / "out.zarr"
    command = [sys.executable, "-m", "emrun", "infer", "--recipe", str(tmp / "r.yaml"),
               "--checkpoint", str(tmp / "c.pt"), "--input", str(tmp / "in.zarr/image"),
               "--output", str(out), "--block", *map(str, BLOCK), "--device", "cpu",
               "--scheduler", "daisy", *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    return process, out


def test_ctrl_c_stops_daisy_inference_in_one_line(tmp_path):
    """Ctrl-C to `emrun infer --scheduler daisy`: daisy takes SIGINT itself and raised
    KeyboardInterrupt (the generic 'stopped by SIGINT (Ctrl-C)' line), and a worker waiting
    on --launch died of it with a traceback daisy printed. Now it says what SIGTERM says.
    With --launch, the case with most processes (without it: the fakes below)."""
    launch = ["--launch", "env EMRUN_LAUNCHED=1"]
    pytest.importorskip("daisy")
    process, out = _infer_process(tmp_path, "--workers", "1", *launch)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None and \
            len(list(out.glob(".emrun-done/*/*_*_*"))) < 3:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGINT: ") and "of 125 blocks are done and marked; " \
        "continue with --resume" in last, stderr
    marked = int(last.removeprefix("stopped by SIGINT: ").split()[0])
    assert 3 <= marked == len(list(out.glob(".emrun-done/*/*_*_*"))) < 125


# ------------------------------------------------------------ the shared pieces, with fakes


@pytest.fixture
def handlers_kept() -> Iterator[None]:
    """A daisy worker installs its own SIGTERM and SIGINT handlers: not this one's."""
    previous = {n: signal.getsignal(n) for n in (signal.SIGTERM, signal.SIGINT)}
    yield
    for number, old in previous.items():
        signal.signal(number, old)


class GoneServer:
    """daisy's client once its server closed at once on SIGINT."""

    def acquire_block(self) -> Any:
        raise RuntimeError("Broken pipe (os error 32)")


class Server:
    """daisy's client handing out ``count`` blocks, then None."""

    def __init__(self, count: int) -> None:
        self.blocks = list(range(count))

    @contextlib.contextmanager
    def acquire_block(self) -> Iterator[int | None]:
        yield self.blocks.pop(0) if self.blocks else None


@pytest.mark.usefixtures("handlers_kept")
@pytest.mark.parametrize("stop", ["none", "file", "signal"])
def test_a_daisy_server_gone_after_a_stop_ends_a_worker_quietly(tmp_path, stop):
    """Daisy closes its server at once on SIGINT: a worker asking for its next block got
    'Broken pipe', printed a traceback and exited 1. After a stop (the run's stop file, or
    a signal to this worker) it ends quietly; without one the error is still raised."""
    stops = BlockStops(tmp_path / "stop", tmp_path)
    if stop == "file":
        (tmp_path / "stop").touch()
    elif stop == "signal":
        os.kill(os.getpid(), signal.SIGINT)  # noted, not raised
    if stop == "none":
        with pytest.raises(RuntimeError, match="Broken pipe"):
            stops.serve(GoneServer(), lambda block: None)
    else:
        stops.serve(GoneServer(), lambda block: None)


@pytest.mark.usefixtures("handlers_kept")
def test_a_signalled_worker_stops_between_blocks_and_leaves_the_signal_s_name(tmp_path):
    """A worker noting SIGINT stops before its next block and leaves the name in the stop
    file, where the scheduler reads it when daisy swallowed the signal."""
    stops = BlockStops(tmp_path / "stop", tmp_path)
    done: list[int] = []

    def process(block: int) -> None:
        done.append(block)
        if block == 1:
            os.kill(os.getpid(), signal.SIGINT)

    stops.serve(Server(5), process)
    assert done == [0, 1]
    assert (tmp_path / "stop").read_text() == "SIGINT"


@pytest.mark.usefixtures("handlers_kept")
def test_a_worker_serves_every_block_without_a_stop(tmp_path):
    done: list[int] = []
    BlockStops(tmp_path / "stop", tmp_path).serve(Server(3), done.append)
    assert done == [0, 1, 2] and not (tmp_path / "stop").exists()


def test_daisy_s_keyboard_interrupt_is_sigint_s_stop(tmp_path):
    """daisy ends its run on SIGINT with KeyboardInterrupt: that is the stop (the stop file
    made for workers on other nodes), not an error."""
    with daisy_stops(tmp_path / "stop") as caught:
        raise KeyboardInterrupt("run aborted by SIGINT")
    assert caught == ["SIGINT"]
    assert (tmp_path / "stop").exists()


@pytest.mark.parametrize("left, expected", [("SIGINT", ["SIGINT"]), ("", []), (None, []),
                                            ("junk", [])])
def test_a_stop_a_worker_noted_is_the_run_s(tmp_path, left, expected):
    """daisy may swallow SIGINT and end as if done (its workers gone): the signal a worker
    left in the stop file says the run was stopped, not failed."""
    if left is not None:
        (tmp_path / "stop").write_text(left)
    with daisy_stops(tmp_path / "stop") as caught:
        pass
    assert caught == expected


@pytest.mark.usefixtures("handlers_kept")
def test_a_launch_waiter_leaves_the_signal_to_its_worker(tmp_path, capsys):
    """The daisy worker waiting on --launch notes the group's SIGINT and waits on (it died
    of it with a KeyboardInterrupt traceback); a launched worker that then fails is part of
    the stop, said by the scheduler, not a launch failure."""
    run_through("sh -c 'kill -INT $PPID; sleep 0.2; exit 3' --", "unused", [], tmp_path)
    assert capsys.readouterr().err == ""


def test_a_launched_worker_failing_without_a_stop_still_fails(tmp_path, capsys):
    """Once started, a worker that fails is daisy's to start again (a node lost, say): its
    exit code, and one line."""
    started = "sh -c 'for a; do t=$a; done; touch \"$t\"; exit 3' --"  # the token: last
    with pytest.raises(SystemExit) as exited:
        run_through(started, "unused", [], tmp_path)
    assert exited.value.code == 3
    assert "exited with code 3" in capsys.readouterr().err
    assert not (tmp_path / WORKER_ERROR).exists()


def test_a_launch_that_fails_before_its_worker_starts_is_left_as_the_users_error(tmp_path,
                                                                              capsys):
    """A command that fails before the worker starts (a typo, a refused submit) is the
    user's: left for the scheduler in one line (no more workers, exit 2), where daisy
    restarted it ten times, printing a traceback each."""
    run_through("sh -c 'exit 3' --", "unused", [], tmp_path)
    assert capsys.readouterr().err == ""
    said = (tmp_path / WORKER_ERROR).read_text()
    assert said == ("the workers started through --launch \"sh -c 'exit 3' --\" failed (the "
                    "--launch command \"sh -c 'exit 3' --\" exited with code 3); finished "
                    "blocks are kept: fix the command and run again (with --resume where it "
                    "has one)")
    run_through("sh -c 'touch launched-again' --", "unused", [], tmp_path)  # another worker
    assert not (tmp_path / "launched-again").exists()  # is not launched once one failed


def _gone_daisy() -> Any:
    from types import SimpleNamespace

    context = SimpleNamespace(from_env=lambda: {"worker_id": "0"})
    return SimpleNamespace(Client=GoneServer, Context=context)


@pytest.mark.usefixtures("handlers_kept")
@pytest.mark.parametrize("stopped", [False, True])
def test_infer_s_daisy_worker_ends_quietly_on_a_server_gone_after_a_stop(
        tmp_path, monkeypatch, stopped):
    """`emrun infer`'s daisy worker met 'Broken pipe' from a server daisy closed on
    SIGINT: a traceback and exit 1 after the stop. Without a stop it is still an error."""
    from types import SimpleNamespace

    from emrun.infer import daisy_scheduler

    job = SimpleNamespace(done_dir=tmp_path)
    monkeypatch.setattr(daisy_scheduler, "daisy_package", _gone_daisy)
    monkeypatch.setattr(daisy_scheduler, "_job", lambda job_file: job)
    monkeypatch.setattr(daisy_scheduler, "BlockWorker", lambda job, device: None)
    job_file = str(tmp_path / "job.json")
    if not stopped:
        with pytest.raises(RuntimeError, match="Broken pipe"):
            daisy_scheduler.serve(job_file, "cpu", 1)
        return
    (tmp_path / daisy_scheduler.STOP).touch()
    daisy_scheduler.serve(job_file, "cpu", 1)


@pytest.mark.usefixtures("handlers_kept")
@pytest.mark.parametrize("stopped", [False, True])
def test_segment_s_daisy_worker_ends_quietly_on_a_server_gone_after_a_stop(
        tmp_path, monkeypatch, stopped):
    """The same race in `emrun segment`'s daisy `serve`."""
    from types import SimpleNamespace

    from emrun.segment.scale import schedulers

    job = SimpleNamespace(folder=tmp_path, block=(4, 4, 4))
    monkeypatch.setattr(schedulers.ScaleJob, "load", lambda job_file: job)
    monkeypatch.setattr(schedulers, "daisy_package", _gone_daisy)
    job_file = str(tmp_path / "job.json")
    if not stopped:
        with pytest.raises(RuntimeError, match="Broken pipe"):
            schedulers.serve(job_file, "fragments")
        return
    (tmp_path / "stop").touch()  # the run was stopped
    schedulers.serve(job_file, "fragments")


def test_segment_s_daisy_run_takes_daisy_s_keyboard_interrupt_as_the_stop(tmp_path,
                                                                           monkeypatch):
    from types import SimpleNamespace

    daisy = pytest.importorskip("daisy")
    from emrun.errors import Interrupted
    from emrun.segment.scale import schedulers

    def aborted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt("run aborted by SIGINT")

    monkeypatch.setattr(daisy, "run_blockwise", aborted)
    job = SimpleNamespace(folder=tmp_path, job_file=tmp_path / "job.json", block=(4, 4, 4),
                          shape=(8, 8, 8))
    try:
        with pytest.raises(Interrupted, match="kept"):
            schedulers._run_daisy(job, "fragments", 1, None)
    except KeyboardInterrupt:  # the bug: would end pytest itself
        pytest.fail("daisy's KeyboardInterrupt escaped segment's daisy run")
