"""Reference probe of `emrun.locks`: a matrix over the commands that hold a folder (train,
infer, segment, data synth / convert, demo, bench snemi3d) and the ways a holder can be
(alive, killed with SIGKILL, on a file system without flock, of another boot or host).

The references are plain: "another emrun" is a child process that calls `locks.hold` and
sleeps; a command into its folder must exit 2 with one error line naming that child's pid,
leave the folder's listing exactly as it was, and run once the child is killed -9 (leaving
no lock file behind when it ends). Without flock (ENOLCK), who may take a lock file over is
judged by a table written out by hand from the module docstring; a race of several processes
on one stale file is counted (exactly one winner)."""

from __future__ import annotations

import errno
import multiprocessing
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from emrun import locks
from emrun.cli import app
from emrun.errors import UserError

HERE = socket.gethostname()
runner = CliRunner()

RECIPE = """\
name: tiny
data:
  sources:
    a: {type: synthetic, shape: [16, 64, 64], seed: 1}
model: {type: rsunet, widths: [4, 8]}
tasks:
  affinity:
    target: {type: affinity}
train:
  patch: [8, 32, 32]
  iterations: 1
  workers: 0
"""

# Another emrun: holds the folder (made if missing) with or without flock, says "holding",
# sleeps; "exit" as a second argument ends it normally at once without `release` (for the
# no-flock lock file's clean-up at exit); "fork" forks a child that exits normally first.
HOLDER = textwrap.dedent("""\
    import errno, os, sys, time
    from pathlib import Path
    from emrun import locks
    folder, mode, then = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    if mode == "nolock":
        def refuse(fd, operation):
            raise OSError(errno.ENOLCK, "no locks")
        locks.fcntl.flock = refuse
        locks._told_no_locks = True
    folder.mkdir(parents=True, exist_ok=True)
    locks.hold(folder, "x")
    if then == "fork":
        child = os.fork()
        if child == 0:
            sys.exit(0)  # a normal exit: atexit handlers run in the child
        os.waitpid(child, 0)
    print("holding", flush=True)
    if then == "exit":
        sys.exit(0)
    time.sleep(60)
    """)


@contextmanager
def another_emrun(folder: Path, mode: str = "flock", then: str = "sleep") -> Iterator[int]:
    """A process holding ``folder`` for the block, then killed with SIGKILL; its pid."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), mode, then],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        line = holder.stdout.readline()
        assert line == "holding\n", holder.communicate(timeout=30)
        yield holder.pid
    finally:
        holder.kill()
        holder.wait(timeout=30)


def without_flock(monkeypatch) -> None:
    """flock says ENOLCK in this process, as on an NFS mount without its lock service."""
    def refuse(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(locks.fcntl, "flock", refuse)
    monkeypatch.setattr(locks, "_told_no_locks", True)


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True, timeout=30)
    return int(done.stdout)


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def refused(result, pid: int, advice: str, unlocked: Path | None = None) -> None:
    """The reference refusal: exit 2, no traceback, one error line naming the holder's pid
    and ending with the command's advice (without flock: and the lock file to remove)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "internal error" not in result.output
    errors = error_lines(result)
    assert len(errors) == 1, result.stderr
    assert f"is in use by another emrun (pid {pid} on {HERE} " in errors[0], errors[0]
    if unlocked is None:
        assert errors[0].endswith(f"wait for it to end, or {advice}"), errors[0]
    else:
        assert f"or {advice} (this file system cannot lock files" in errors[0], errors[0]
        assert errors[0].endswith(f"remove {unlocked / locks.LOCK_NAME})"), errors[0]


# ---------------------------------------------------------------- inputs, made once


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A one-iteration run (its checkpoint), a small EM volume, a .npy, affinities."""
    from test_segment import affinities, cells, write_prediction

    from emrun.io import write_volume

    tmp = tmp_path_factory.mktemp("lockmatrix")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(RECIPE, encoding="utf-8")
    trained = runner.invoke(app, ["train", str(recipe), "--run-dir", str(tmp / "run"),
                                  "--device", "cpu"])
    assert trained.exit_code == 0, trained.output
    image = (np.random.default_rng(0).random((8, 40, 40)) * 255).astype(np.uint8)
    write_volume(tmp / "in.zarr", "image", image, voxel_size=(30, 6, 6))
    np.save(tmp / "a.npy", np.arange(4 * 16 * 16, dtype=np.uint8).reshape(4, 16, 16))
    truth = cells((8, 32, 32), n=6)
    affs = write_prediction(tmp, affinities(truth))
    snemi = tmp / "snemi"
    snemi.mkdir()
    for name in ("train-input.tif", "train-labels.tif"):
        (snemi / name).write_bytes(b"")  # found, never read before the lock
    return {"tmp": tmp, "recipe": recipe, "run": tmp / "run", "affs": Path(affs),
            "snemi": snemi}


def command(name: str, inputs: dict[str, Path], folder: Path, monkeypatch
            ) -> tuple[list[str], str, Callable[[object], None]]:
    """``name``'s command line into ``folder``, the advice its refusal ends with, and the
    check of its run once the folder is free (it ran, and left no lock file)."""
    def ran(result) -> None:
        assert result.exit_code == 0, result.output
        assert not (folder / locks.LOCK_NAME).exists()

    if name in ("train", "train --gpus 2"):
        extra = ["--gpus", "2"] if name == "train --gpus 2" else []
        return (["train", str(inputs["recipe"]), "--run-dir", str(folder), "--device", "cpu",
                 *extra], "give another --run-dir", ran)
    if name in ("infer", "infer --resume"):
        extra = ["--resume"] if name == "infer --resume" else []
        return (["infer", "--input", f"{inputs['tmp']}/in.zarr/image", "--output", str(folder),
                 "--checkpoint", str(inputs["run"]), "--device", "cpu", *extra],
                "give another --output", ran)
    if name == "segment":
        return (["segment", str(inputs["affs"]), str(folder), "--method", "cc"],
                "give another output store", ran)
    if name == "segment --scheduler local":
        return (["segment", str(inputs["affs"]), str(folder), "--method", "waterz",
                 "--scheduler", "local", "--workers", "1"], "give another output store", ran)
    if name == "data synth":
        return (["data", "synth", str(folder), "--shape", "4", "16", "16"],
                "give another output store", ran)
    if name == "data convert":
        return (["data", "convert", str(inputs["tmp"] / "a.npy"), str(folder)],
                "give another output store", ran)
    if name == "demo":
        import emrun.demo

        def trainer(*args, **kwargs):
            raise UserError("probe: past the lock")

        monkeypatch.setattr(emrun.demo, "Trainer", trainer)

        def demo_ran(result) -> None:  # it got past the lock, and let it go on its way out
            assert result.exit_code == 2, result.output
            assert error_lines(result) == ["error: probe: past the lock"], result.stderr
            assert not (folder / locks.LOCK_NAME).exists()

        return ["demo", "--out", str(folder)], "give another --out", demo_ran
    if name == "bench snemi3d":
        def bench_ran(result) -> None:  # held, then refused by what it found inside
            assert result.exit_code == 2, result.output
            assert "holds a finished benchmark" in result.stderr, result.stderr
            assert not (folder / locks.LOCK_NAME).exists()

        return (["bench", "snemi3d", "--data", str(inputs["snemi"]), "--out", str(folder),
                 "--device", "cpu"], "give another --out", bench_ran)
    raise AssertionError(name)


def folder_for(name: str, tmp_path: Path) -> Path:
    store = name.startswith(("infer", "segment", "data"))
    return tmp_path / ("out.zarr" if store else "out")


MATRIX = ["train", "train --gpus 2", "infer", "infer --resume", "segment",
          "segment --scheduler local", "data synth", "data convert", "demo", "bench snemi3d"]


def _after_kill(name: str, folder: Path) -> None:
    if name == "bench snemi3d":
        (folder / "results.json").write_text("{}\n")  # the user's finished benchmark


@pytest.mark.parametrize("name", MATRIX)
def test_each_command_refuses_a_held_folder_then_runs_once_its_holder_is_killed(
        name: str, inputs, tmp_path: Path, monkeypatch) -> None:
    folder = folder_for(name, tmp_path)
    args, advice, ran = command(name, inputs, folder, monkeypatch)
    with another_emrun(folder) as pid:
        before = listing(folder)
        assert before == [locks.LOCK_NAME]
        refused(runner.invoke(app, args), pid, advice)
        assert listing(folder) == before  # nothing written into the folder
        assert not locks.held(folder)
    if name in ("train --gpus 2", "infer --resume"):
        return  # a launcher's check, a resume of nothing: the plain command runs below
    _after_kill(name, folder)
    ran(runner.invoke(app, args))


@pytest.mark.parametrize("name", ["train", "infer", "segment", "data synth", "data convert",
                                  "demo", "bench snemi3d"])
def test_without_flock_a_live_holder_is_refused_and_a_killed_one_taken_over(
        name: str, inputs, tmp_path: Path, monkeypatch) -> None:
    """ENOLCK: the lock file alone. A live holder of this boot and namespace is refused (the
    refusal names the file to remove); once it is killed -9 its file is taken over, and the
    command leaves no lock file when it ends."""
    without_flock(monkeypatch)
    monkeypatch.setattr(locks, "_told_no_locks", False)
    folder = folder_for(name, tmp_path)
    args, advice, ran = command(name, inputs, folder, monkeypatch)
    with another_emrun(folder, "nolock") as pid:
        line = (folder / locks.LOCK_NAME).read_text()
        assert line.startswith(f"pid {pid} on {HERE} since ") and locks.PROCESS.search(line)
        result = runner.invoke(app, args)
        refused(result, pid, advice, unlocked=folder)
        assert result.stderr.count("this file system cannot lock files (ENOLCK)") <= 1
        assert listing(folder) == [locks.LOCK_NAME]
        assert (folder / locks.LOCK_NAME).read_text() == line
    _after_kill(name, folder)
    ran(runner.invoke(app, args))


@pytest.mark.parametrize("other", ["another boot", "another host", "another container"])
@pytest.mark.parametrize("name", ["train", "infer", "segment", "data synth"])
def test_without_flock_a_holder_that_cannot_be_judged_is_never_taken_over(
        name: str, other: str, inputs, tmp_path: Path, monkeypatch) -> None:
    """A dead pid's line, but of another boot, host or pid namespace: refused, in one error
    line that names the file to remove; the file and the folder are left as they were."""
    without_flock(monkeypatch)
    boot, namespace, _ = locks._process_of(os.getpid()) or pytest.skip("no /proc")
    pid = dead_pid()
    host = "elsewhere" if other == "another host" else HERE
    boot = "0" * 8 + boot[8:] if other == "another boot" else boot
    namespace = namespace + 1 if other == "another container" else namespace
    line = (f"pid {pid} on {host} since 2026-01-01 00:00:00 (boot {boot}, pid namespace "
            f"{namespace}, started 5)\n")
    folder = folder_for(name, tmp_path)
    folder.mkdir()
    (folder / locks.LOCK_NAME).write_text(line)
    args, advice, _ = command(name, inputs, folder, monkeypatch)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    errors = error_lines(result)
    assert len(errors) == 1 and f"(pid {pid} on {host} " in errors[0], result.stderr
    assert f"or {advice} (this file system cannot lock files" in errors[0], errors[0]
    assert errors[0].endswith(f"remove {folder / locks.LOCK_NAME})"), errors[0]
    assert listing(folder) == [locks.LOCK_NAME]
    assert (folder / locks.LOCK_NAME).read_text() == line


# ---------------------------------------------------------------- who the message names


@pytest.mark.parametrize("mode", ["flock", "nolock"])
def test_the_refusal_names_the_live_holder_not_the_killed_one_before_it(
        tmp_path: Path, mode: str, monkeypatch) -> None:
    """A held, killed; B takes the folder over (A's file stays where flock works); a third is
    refused naming B, whose line the file now holds."""
    if mode == "nolock":
        without_flock(monkeypatch)
    folder = tmp_path / "out.zarr"
    with another_emrun(folder, mode) as first:
        pass
    assert (folder / locks.LOCK_NAME).read_text().startswith(f"pid {first} ")
    with another_emrun(folder, mode) as second:
        assert (folder / locks.LOCK_NAME).read_text().startswith(f"pid {second} ")
        with pytest.raises(UserError) as caught:
            locks.check_free(folder, "x")
        assert f"(pid {second} on {HERE} " in str(caught.value)
        assert f"pid {first} " not in str(caught.value)


# ---------------------------------------------------------------- no flock: at exit


def test_without_flock_a_normal_exit_removes_the_lock_file_and_a_forked_child_does_not(
        tmp_path: Path, monkeypatch) -> None:
    """No kernel lets the lock file go: the holder's own exit does (`_release_at_exit`); a
    forked child that exits normally leaves its parent's file alone."""
    without_flock(monkeypatch)
    exited = tmp_path / "exited.zarr"
    holder = subprocess.run([sys.executable, "-c", HOLDER, str(exited), "nolock", "exit"],
                            capture_output=True, text=True, timeout=60)
    assert holder.stdout == "holding\n", holder.stderr
    assert listing(exited) == []
    forked = tmp_path / "forked.zarr"
    with another_emrun(forked, "nolock", "fork") as pid:  # its child has exited by now
        assert (forked / locks.LOCK_NAME).read_text().startswith(f"pid {pid} ")
        with pytest.raises(UserError, match=rf"\(pid {pid} "):
            locks.check_free(forked, "x")


# ---------------------------------------------------------------- no flock: the judge table


def _parent_line() -> str:
    boot, namespace, started = locks._process_of(os.getppid()) or pytest.skip("no /proc")
    return (f"pid {os.getppid()} on {HERE} since x (boot {boot}, pid namespace {namespace}, "
            f"started {started})\n")


def _line(pid: int, started: int = 5, host: str = HERE) -> str:
    boot, namespace, _ = locks._process_of(os.getpid()) or pytest.skip("no /proc")
    return (f"pid {pid} on {host} since x (boot {boot}, pid namespace {namespace}, "
            f"started {started})\n")


JUDGED = {  # the docstring's rule, written out: True = taken over
    "a dead pid of this boot and namespace": (lambda: _line(dead_pid()), True),
    "a live process of this namespace": (_parent_line, False),
    "a live pid whose start differs (pid reused)": (
        lambda: _line(os.getppid(), started=1), True),
    "an older emrun's line, dead pid": (lambda: f"pid {dead_pid()} on {HERE} since x\n", True),
    "an older emrun's line, live pid": (lambda: f"pid {os.getppid()} on {HERE} since x\n",
                                        False),
    "a dead pid on another host": (lambda: _line(dead_pid(), host="elsewhere"), False),
    "a line emrun did not write": (lambda: "hello\n", False),
}


@pytest.mark.parametrize("case", list(JUDGED))
def test_without_flock_who_is_taken_over_follows_the_docstring_s_table(
        case: str, tmp_path: Path, monkeypatch) -> None:
    without_flock(monkeypatch)
    make, taken = JUDGED[case]
    line = make()
    folder = tmp_path / "out.zarr"
    folder.mkdir()
    (folder / locks.LOCK_NAME).write_text(line)
    if not taken:
        with pytest.raises(UserError) as caught:
            locks.hold(folder, "x")
        assert str(caught.value).endswith(f"remove {folder / locks.LOCK_NAME})")
        with pytest.raises(UserError):
            locks.check_free(folder, "x")
        assert (folder / locks.LOCK_NAME).read_text() == line
        assert listing(folder) == [locks.LOCK_NAME]  # no claim, no clock probe left
        return
    locks.check_free(folder, "x")  # judged free, and left as it was
    assert (folder / locks.LOCK_NAME).read_text() == line
    locks.hold(folder, "x")
    try:
        assert (folder / locks.LOCK_NAME).read_text().startswith(f"pid {os.getpid()} on ")
        assert listing(folder) == [locks.LOCK_NAME]
    finally:
        locks.release(folder)
    assert listing(folder) == []


# ---------------------------------------------------------------- races: one winner


def _racer(folder: str, nolock: bool, start, done, results) -> None:
    """One racer (forked): waits for the start, tries to hold, reports, keeps what it won
    until every racer has reported, then lets it go."""
    if nolock:
        def refuse(fd: int, operation: int) -> None:
            raise OSError(errno.ENOLCK, "no locks")
        locks.fcntl.flock = refuse
        locks._told_no_locks = True
        locks.SETTLE_S = 0.05
        locks.STARTING_S = 0.3
    locks._held.clear()
    locks._without_locks.clear()
    start.wait(30)
    try:
        locks.hold(Path(folder), "x")
    except UserError as exc:
        results.put(("refused", os.getpid(), "in use" in str(exc)))
        return
    except Exception as exc:  # a traceback is no refusal
        results.put((repr(exc), os.getpid(), False))
        return
    results.put(("held", os.getpid(), True))
    done.wait(30)
    locks.release(Path(folder))


def _race(folder: Path, nolock: bool, racers: int = 6) -> list[tuple[str, int, bool]]:
    context = multiprocessing.get_context("fork")
    start, done, results = context.Event(), context.Event(), context.Queue()
    processes = [context.Process(target=_racer, args=(str(folder), nolock, start, done,
                                                      results)) for _ in range(racers)]
    for process in processes:
        process.start()
    start.set()
    said = [results.get(timeout=60) for _ in processes]
    winners = [pid for what, pid, _ in said if what == "held"]
    if len(winners) == 1:
        assert (folder / locks.LOCK_NAME).read_text().startswith(f"pid {winners[0]} ")
    done.set()
    for process in processes:
        process.join(timeout=60)
        if process.is_alive():
            process.kill()
    return said


@pytest.mark.parametrize("left", ["nothing", "a killed holder's file", "an old empty file"])
@pytest.mark.parametrize("nolock", [False, True], ids=["flock", "nolock"])
def test_of_six_processes_racing_for_one_folder_exactly_one_holds_it(
        tmp_path: Path, left: str, nolock: bool) -> None:
    folder = tmp_path / "out.zarr"
    folder.mkdir()
    path = folder / locks.LOCK_NAME
    if left == "a killed holder's file":
        path.write_text(_line(dead_pid()))
    elif left == "an old empty file":
        path.write_text("")
        old = time.time() - 3600
        os.utime(path, (old, old))
    said = _race(folder, nolock)
    assert sorted(what for what, _, _ in said) == ["held"] + ["refused"] * 5, said
    assert all(ok for _, _, ok in said), said  # each refusal says "in use"
    assert listing(folder) == []  # the winner released; no claim or clock probe left


# ---------------------------------------------------------------- check_free, release, contents


def test_check_free_refuses_while_held_and_never_takes_or_makes_the_lock(
        tmp_path: Path) -> None:
    free = tmp_path / "free.zarr"
    free.mkdir()
    locks.check_free(free, "x")
    assert listing(free) == []  # no lock file made for a check
    folder = tmp_path / "out.zarr"
    with another_emrun(folder) as pid:
        with pytest.raises(UserError, match=rf"\(pid {pid} on .*or give another --out$"):
            locks.check_free(folder, "give another --out")
        assert listing(folder) == [locks.LOCK_NAME]
    locks.check_free(folder, "x")  # its killed holder's file: free
    assert not locks.held(folder)
    with another_emrun(folder) as pid:  # the check kept no lock: another holds it at once
        assert (folder / locks.LOCK_NAME).read_text().startswith(f"pid {pid} ")


def test_check_free_of_a_folder_this_process_holds_passes_and_keeps_it(tmp_path: Path) -> None:
    folder = tmp_path / "out.zarr"
    folder.mkdir()
    with locks.holding(folder, "x"):
        locks.check_free(folder, "x")
        assert locks.held(folder)
        probe = subprocess.run(
            [sys.executable, "-c", HOLDER, str(folder), "flock", "exit"],
            capture_output=True, text=True, timeout=60)
        assert "in use by another emrun" in probe.stderr
    assert listing(folder) == []


def test_check_free_of_a_lock_released_during_the_check_is_free(
        tmp_path: Path, monkeypatch) -> None:
    """The holder ends (`release` removes its file) just after check_free saw the file:
    the folder is free; `hold` and `_open` handle the same moment ("its holder released it
    between our two opens"), check_free ended in a traceback."""
    folder = tmp_path / "out.zarr"
    folder.mkdir()
    lock = folder / locks.LOCK_NAME
    lock.write_text(_line(dead_pid()))
    real = pathlib.Path.is_file

    def released_meanwhile(self: Path) -> bool:
        found = real(self)
        if found and self == lock:
            os.unlink(self)  # the holder's `release`, right after the check looked
        return found

    monkeypatch.setattr(pathlib.Path, "is_file", released_meanwhile)
    locks.check_free(folder, "x")


def test_release_contents_and_is_lock_file_against_a_plain_listing(tmp_path: Path) -> None:
    folder = tmp_path / "out.zarr"
    folder.mkdir()
    names = [locks.LOCK_NAME, f"{locks.LOCK_NAME}.claim.1-2.0",
             f"{locks.LOCK_NAME}.clock.{HERE}.7", "emrun-lock", "image", ".zattrs"]
    locks.hold(folder, "x")
    for name in names[1:]:
        (folder / name).write_text("")
    reference = sorted(n for n in os.listdir(folder) if not n.startswith(".emrun-lock"))
    assert sorted(p.name for p in locks.contents(folder)) == reference
    assert reference == [".zattrs", "emrun-lock", "image"]
    assert [locks.is_lock_file(n) for n in names] == [True, True, True, False, False, False]
    locks.release(folder)
    assert not (folder / locks.LOCK_NAME).exists()
    assert sorted(os.listdir(folder)) == sorted(names[1:])  # release removes its file alone
    locks.release(folder)  # twice: nothing held, nothing removed
    assert sorted(os.listdir(folder)) == sorted(names[1:])


def test_a_command_that_fails_after_taking_the_store_lets_it_go(tmp_path: Path) -> None:
    """`data convert` of a name that is taken: refused inside the held store, which keeps
    no lock file and is free for the next command in this very process."""
    store = tmp_path / "out.zarr"
    np.save(tmp_path / "a.npy", np.zeros((4, 16, 16), np.uint8))
    args = ["data", "convert", str(tmp_path / "a.npy"), str(store)]
    assert runner.invoke(app, args).exit_code == 0
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "Traceback" not in again.output
    assert not (store / locks.LOCK_NAME).exists() and not locks.held(store)
    with another_emrun(store) as pid:
        refused(runner.invoke(app, [*args, "--overwrite"]), pid, "give another output store")


def test_sigkill_of_a_holder_mid_command_frees_the_folder(tmp_path: Path) -> None:
    """The kernel lets go of a killed holder's lock however it dies: a holder stopped with
    SIGSTOP still holds it; SIGKILL frees it for the next at once."""
    folder = tmp_path / "out.zarr"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), "flock", "sleep"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
        os.kill(holder.pid, signal.SIGSTOP)
        with pytest.raises(UserError, match=rf"\(pid {holder.pid} "):
            locks.check_free(folder, "x")
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=30)
    locks.hold(folder, "x")
    try:
        assert re.match(rf"pid {os.getpid()} on ", (folder / locks.LOCK_NAME).read_text())
    finally:
        locks.release(folder)
    assert listing(folder) == []


@pytest.mark.parametrize("mode", ["flock", "nolock"])
def test_a_folder_held_under_one_spelling_is_refused_under_another(
        tmp_path: Path, monkeypatch, mode: str) -> None:
    """A link to the held store, and a relative spelling of it: one folder, one lock."""
    if mode == "nolock":
        without_flock(monkeypatch)
    store = tmp_path / "real.zarr"
    link = tmp_path / "link.zarr"
    link.symlink_to(store, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    with another_emrun(store, mode) as pid:
        for spelling in (str(link), "real.zarr", "./link.zarr/../real.zarr"):
            result = runner.invoke(app, ["data", "synth", spelling, "--shape", "4", "16", "16"])
            refused(result, pid, "give another output store",
                    unlocked=Path(spelling) if mode == "nolock" else None)
        assert listing(store) == [locks.LOCK_NAME]
    done = runner.invoke(app, ["data", "synth", str(link), "--shape", "4", "16", "16"])
    assert done.exit_code == 0, done.output
    assert (store / "image").is_dir() and not (store / locks.LOCK_NAME).exists()


def test_a_refused_resume_leaves_the_run_directory_as_it_found_it(inputs, tmp_path) -> None:
    run = tmp_path / "run"
    args = ["train", str(inputs["recipe"]), "--run-dir", str(run), "--device", "cpu"]
    assert runner.invoke(app, args).exit_code == 0
    before = listing(run)
    assert locks.LOCK_NAME not in before
    again = runner.invoke(app, [*args, "--resume", "-o", "model.widths=[4,4]"])
    assert again.exit_code == 2 and "the recipe's model changed" in again.stderr
    assert not locks.held(run)
    assert listing(run) == before


def test_a_folder_where_the_lock_file_goes_is_one_clear_refusal(inputs, tmp_path) -> None:
    run = tmp_path / "run"
    (run / locks.LOCK_NAME).mkdir(parents=True)
    args = ["train", str(inputs["recipe"]), "--run-dir", str(run), "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output  # was an internal error (IsADirectoryError)
    assert f"{run / locks.LOCK_NAME} is a folder" in result.stderr
    assert "remove that folder" in result.stderr
