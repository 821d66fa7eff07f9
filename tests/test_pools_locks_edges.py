"""Edges of the worker pools, daisy's workers, signals and lock files.

(1) A daisy worker's user error (an unreadable chunk) crashed the worker: daisy restarted it
up to ten times and the run ended with daisy's words or the --launch command's exit code
(evaluate: exit 1, 'a bug in emrun'); the worker now leaves its message for the scheduler,
which hands out no more blocks and ends with that message (exit 2).
(2) A pool worker killed outright left numcodecs' Blosc lock, a named semaphore, with the
run's resource tracker, which said 'leaked semaphore objects' when the command ended.
(3) Without file locks, a lock file named its holder by pid and host name alone: a live
holder in another container of the same host name (pid 1 in each) was judged dead, and a
dead one whose pid another process has now was judged alive.
(4) A SIGTERM in `stop_signals`' setup or cleanup could meet a no-op handler and be lost.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from emrun import devices, locks, subprocesses
from emrun.errors import UserError

HERE = socket.gethostname()

# --- (1) a daisy worker's user error ends the run with its message --------------------------


def test_a_user_error_left_by_a_worker_is_raised_by_the_scheduler_once(tmp_path: Path) -> None:
    """The worker ends cleanly (daisy does not restart it); the scheduler raises the
    worker's own message, and no file is left for the next run."""
    (tmp_path / devices.WORKER_ERROR).write_text("a killed run's error")  # a leftover
    with pytest.raises(devices.WorkerFailed) as caught, \
            devices.launched_workers(None, tmp_path):
        assert not devices.worker_failed(tmp_path)  # the leftover is not this run's
        with devices.leaving_user_errors(tmp_path):
            raise UserError("in.zarr/image: reading [0:4, 0:16, 0:16] failed: corrupt")
        assert devices.worker_failed(tmp_path)  # no block is handed out any more
    assert str(caught.value) == "in.zarr/image: reading [0:4, 0:16, 0:16] failed: corrupt"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_left_user_error_wins_over_daisy_giving_up_and_the_launch_command(
        tmp_path: Path) -> None:
    """daisy gave up (RuntimeError) after a worker left its error: the worker's message,
    not 'the workers started through --launch ... failed'."""
    with pytest.raises(devices.WorkerFailed, match=r"^bad chunk$"), \
            devices.launched_workers("env", tmp_path):
        with devices.leaving_user_errors(tmp_path):
            raise UserError("bad chunk")
        raise RuntimeError("task emrun-evaluate abandoned: worker restart cap reached")


def test_a_worker_that_cannot_leave_its_error_raises_it(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="bad chunk"), \
            devices.leaving_user_errors(tmp_path / "gone"):
        raise UserError("bad chunk")


def test_an_evaluation_work_folder_with_a_worker_s_error_is_still_evaluate_s(
        tmp_path: Path) -> None:
    from emrun.evaluate.schedule import _only_ours

    (tmp_path / "block-0.npz").write_bytes(b"")
    (tmp_path / devices.WORKER_ERROR).write_text("x")
    (tmp_path / f".{devices.WORKER_ERROR}.{'0a' * 16}.part").write_text("x")
    assert _only_ours(tmp_path)


def _corrupt_volumes(tmp_path: Path) -> list[Any]:
    from emrun.io import open_volume, write_volume

    truth = np.random.default_rng(0).integers(0, 5, (8, 32, 32)).astype(np.uint32)
    write_volume(tmp_path / "v.zarr", "truth", truth, chunks=(4, 16, 16))
    write_volume(tmp_path / "v.zarr", "seg", truth.astype(np.uint64), chunks=(4, 16, 16))
    volumes = [open_volume(str(tmp_path / "v.zarr" / name)) for name in ("seg", "truth")]
    chunk = next(p for p in sorted((tmp_path / "v.zarr").rglob("c/0/0/0"))
                 if "seg" in p.parts)
    chunk.write_bytes(b"not blosc")  # block 0 of the segmentation is unreadable
    return volumes


@pytest.mark.parametrize("launch", [None, "env"], ids=["daisy-workers", "launched"])
def test_evaluate_daisy_worker_s_user_error_ends_the_run_with_its_message(
        tmp_path: Path, capfd: pytest.CaptureFixture[str], launch: str | None) -> None:
    """Before: --launch ended with 'the workers started through --launch failed ... fix the
    command', without it with 'a bug in emrun' (exit 1), each after a traceback per failed
    try and worker restart."""
    pytest.importorskip("daisy")
    from emrun.evaluate.blockwise import prepare
    from emrun.evaluate.schedule import Parallel, score_blocks

    work = prepare(_corrupt_volumes(tmp_path), (4, 16, 16))
    with pytest.raises(UserError) as caught:
        score_blocks(work, Parallel(scheduler="daisy", workers=2, launch=launch,
                                    work_dir=str(tmp_path / "w")))
    message = str(caught.value)
    assert "seg: reading [0:4, 0:16, 0:16] failed" in message and "--launch" not in message
    err = capfd.readouterr().err
    assert "Traceback" not in err and "exited with error" not in err, err
    assert list((tmp_path / "w").iterdir()) == []


def test_infer_daisy_hands_out_no_unit_once_a_worker_met_a_user_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """infer's check before daisy hands a unit out (its workers ask the same between
    blocks): a worker's user error stops the run as the stop file does."""
    from types import SimpleNamespace

    from emrun.infer import daisy_scheduler

    job = SimpleNamespace(done_dir=tmp_path, is_done=lambda block: False)
    monkeypatch.setattr(daisy_scheduler, "_job", lambda job_file: job)
    monkeypatch.setattr(daisy_scheduler, "unit_blocks", lambda job, roi: [(0, 0, 0)])
    block = SimpleNamespace(write_roi=None)
    assert not daisy_scheduler._block_is_done("job.json", block)
    with devices.leaving_user_errors(tmp_path):
        raise UserError("mask: reading failed")
    assert daisy_scheduler._block_is_done("job.json", block)


# --- (2) no 'leaked semaphore' after a pool worker is killed --------------------------------

KILLED_POOL = textwrap.dedent("""\
    import concurrent.futures, multiprocessing as mp, os, signal, time
    from emrun.subprocesses import kill_workers, leave_signals_to

    def decode_then_die(i):
        from numcodecs import Blosc
        codec = Blosc()
        codec.decode(codec.encode(bytes(1000)))  # as reading a zarr chunk does
        if i == 0:
            os.kill(os.getpid(), signal.SIGKILL)  # the out-of-memory killer
        time.sleep(0.5)

    if __name__ == "__main__":
        pool = concurrent.futures.ProcessPoolExecutor(
            2, mp_context=mp.get_context("spawn"), initializer=leave_signals_to,
            initargs=(os.getpid(),))
        try:
            for future in [pool.submit(decode_then_die, i) for i in range(2)]:
                future.result()
        except concurrent.futures.process.BrokenProcessPool:
            kill_workers(pool)
            print("broken", flush=True)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    """)


def test_a_killed_pool_worker_leaves_no_leaked_semaphore_warning(tmp_path: Path) -> None:
    script = tmp_path / "killed_pool.py"
    script.write_text(KILLED_POOL)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0 and done.stdout.strip() == "broken", done.stderr
    assert "leaked" not in done.stderr, done.stderr


# --- (3) lock holders judged by boot, pid namespace and start time ------------------------


@pytest.fixture
def no_locks(monkeypatch: pytest.MonkeyPatch) -> None:
    """flock fails as on an NFS mount without its lock service."""

    def refuse(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(locks.fcntl, "flock", refuse)
    monkeypatch.setattr(locks, "_told_no_locks", True)
    monkeypatch.setattr(locks, "SETTLE_S", 0.05)


def _here() -> tuple[str, int, int]:
    process = locks._process_of(os.getpid())
    if process is None:
        pytest.skip("no /proc: lock lines name pid and host alone")
    return process


def _parent() -> tuple[str, int, int]:
    """This process's parent, a live process of this namespace that is not this one."""
    process = locks._process_of(os.getppid())
    if process is None:
        pytest.skip("the parent process is not seen in /proc")
    return process


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


def _line(pid: int, boot: str, namespace: int, started: int) -> str:
    return (f"pid {pid} on {HERE} since 2026-01-01 00:00:00 (boot {boot}, pid namespace "
            f"{namespace}, started {started})\n")


def _folder_with(tmp_path: Path, line: str) -> Path:
    folder = tmp_path / "out.zarr"
    folder.mkdir(parents=True)
    (folder / locks.LOCK_NAME).write_text(line)
    return folder


def _takes_over(folder: Path) -> bool:
    """Whether this process holds ``folder`` (its line in the lock file), released after."""
    locks.hold(folder, "give another output")
    try:
        return (folder / locks.LOCK_NAME).read_text().startswith(f"pid {os.getpid()} ")
    finally:
        locks.release(folder)


@pytest.mark.parametrize("where", ["another container", "an earlier boot"])
def test_a_holder_in_another_container_or_boot_is_never_taken_over(
        tmp_path: Path, no_locks: None, where: str) -> None:
    """Same host name, a pid not running here (or this very process's pid): before, judged
    dead and taken over while it may still run; now refused, saying which file to remove."""
    boot, namespace, _ = _here()
    for pid in (_dead_pid(), os.getpid()):
        line = (_line(pid, boot, namespace + 1, 5) if where == "another container"
                else _line(pid, "0" * 8 + boot[8:], namespace, 5))
        folder = _folder_with(tmp_path / str(pid), line)
        with pytest.raises(UserError) as caught:
            locks.hold(folder, "give another output")
        message = str(caught.value)
        assert f"remove {folder / locks.LOCK_NAME}" in message
        assert ("another container" if where == "another container" else "restarted") in message
        assert (folder / locks.LOCK_NAME).read_text() == line
        with pytest.raises(UserError):
            locks.check_free(folder, "x")


def test_a_dead_holder_whose_pid_runs_another_process_now_is_taken_over(
        tmp_path: Path, no_locks: None) -> None:
    """Before: judged by its pid alone, alive (the pid runs another process now), and the
    folder refused for good."""
    boot, namespace, _ = _here()
    other = _parent()
    folder = _folder_with(tmp_path, _line(os.getppid(), boot, namespace, other[2] + 1))
    assert _takes_over(folder)


def test_a_live_holder_of_this_namespace_is_refused_and_a_dead_one_taken_over(
        tmp_path: Path, no_locks: None) -> None:
    boot, namespace, _ = _here()
    other = _parent()
    live = _folder_with(tmp_path / "live", _line(os.getppid(), boot, namespace, other[2]))
    with pytest.raises(UserError, match=rf"in use by another emrun \(pid {os.getppid()} "):
        locks.hold(live, "x")
    dead = _folder_with(tmp_path / "dead", _line(_dead_pid(), boot, namespace, 5))
    assert _takes_over(dead)


def test_an_older_emrun_s_line_with_this_process_s_pid_is_not_taken_over(
        tmp_path: Path, no_locks: None) -> None:
    """pid and host alone, this process's pid: another container's pid 1 as likely as an
    earlier process of this one's; before, taken over at once."""
    folder = _folder_with(tmp_path, f"pid {os.getpid()} on {HERE} since x\n")
    with pytest.raises(UserError, match=f"remove {folder / locks.LOCK_NAME}"):
        locks.hold(folder, "x")


HOLD_AND_WAIT = textwrap.dedent("""\
    import errno, sys, time
    from pathlib import Path
    from emrun import locks
    def refuse(fd, operation):
        raise OSError(errno.ENOLCK, "no locks")
    locks.fcntl.flock = refuse
    locks._told_no_locks = True
    locks.hold(Path(sys.argv[1]), "x")
    print("held", flush=True)
    time.sleep(60)
    """)


def test_a_line_emrun_writes_names_its_process_and_its_kill_frees_the_folder(
        tmp_path: Path, no_locks: None) -> None:
    _here()
    folder = tmp_path / "out.zarr"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_AND_WAIT, str(folder)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        line = (folder / locks.LOCK_NAME).read_text()
        assert locks.PROCESS.search(line) and line.startswith(f"pid {holder.pid} on {HERE} ")
        with pytest.raises(UserError, match=rf"\(pid {holder.pid} "):
            locks.hold(folder, "x")
    finally:
        holder.kill()
        holder.wait()
    assert _takes_over(folder)


# --- (4) a signal in stop_signals' setup or cleanup still takes effect ----------------------


def _signal_after_call(monkeypatch: pytest.MonkeyPatch, target: int) -> bool | None:
    """Run an empty `stop_signals` with SIGTERM raised right after its ``target``-th call of
    signal.signal or signal.set_wakeup_fd; whether the SIGTERM took effect (caught by it, or
    by the handler in place before), None when it makes fewer calls."""
    before: list[int] = []
    old = signal.signal(signal.SIGTERM, lambda number, frame: before.append(number))
    calls: list[str] = []
    real_signal, real_wakeup = signal.signal, signal.set_wakeup_fd

    def after(name: str, result: Any) -> Any:
        calls.append(name)
        if len(calls) - 1 == target:
            signal.raise_signal(signal.SIGTERM)
        return result

    monkeypatch.setattr(subprocesses.signal, "signal",
                        lambda *a, **k: after("signal", real_signal(*a, **k)))
    monkeypatch.setattr(subprocesses.signal, "set_wakeup_fd",
                        lambda *a, **k: after("set_wakeup_fd", real_wakeup(*a, **k)))
    try:
        with subprocesses.stop_signals() as caught:
            pass
    finally:
        monkeypatch.undo()
        signal.signal(signal.SIGTERM, old)
    if len(calls) <= target:
        return None
    return "SIGTERM" in caught or bool(before)


def test_a_sigterm_at_any_step_of_stop_signals_is_not_lost(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: one between the wakeup fd's restore and the old handler's (or between the
    new handler and the wakeup fd at the start) met the no-op handler alone."""
    lost = []
    target = 0
    while (took := _signal_after_call(monkeypatch, target)) is not None:
        if not took:
            lost.append(target)
        target += 1
    assert target >= 5 and lost == [], f"lost after calls {lost} of {target}"


# --- (1) the same for segment's daisy workers: left to emrun/segment/scale/schedulers.py ---


def _fake_scale_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    from types import SimpleNamespace

    from emrun.segment.scale import schedulers

    job = SimpleNamespace(folder=tmp_path, block=(4, 4, 4),
                          is_done=lambda step, index: False)
    monkeypatch.setattr(schedulers.ScaleJob, "load", lambda job_file: job)
    return str(tmp_path / "job.json")


def test_segment_daisy_hands_out_no_block_once_a_worker_met_a_user_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from emrun.segment.scale import schedulers

    job_file = _fake_scale_job(tmp_path, monkeypatch)
    block = SimpleNamespace(write_roi=SimpleNamespace(offset=(0, 0, 0)))
    check = schedulers.DoneCheck(schedulers.ScaleJob.load(job_file), "fragments")  # daisy's
    assert not check(block)
    with devices.leaving_user_errors(tmp_path):
        raise UserError("affinities: reading failed")
    assert check(block)  # the same check, its done blocks already read


def test_segment_daisy_worker_leaves_its_user_error_for_the_scheduler(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from emrun.segment.scale import schedulers

    job_file = _fake_scale_job(tmp_path, monkeypatch)

    def unreadable(job_file: str, step: str) -> None:
        raise UserError("affinities: reading failed")

    monkeypatch.setattr(schedulers, "serve", unreadable)
    monkeypatch.setattr(schedulers, "die_with_parent", lambda parent: None)
    schedulers._start_worker(job_file, "fragments", None)
    assert devices.worker_failed(tmp_path)
