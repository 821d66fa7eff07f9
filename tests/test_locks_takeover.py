"""Taking over a stale lock file where the file system cannot lock (`emrun.locks`).

Two gaps the last review left: (1) of three processes that found one stale lock file, two
could both end up holding the folder (one removed the stale file and made its own, the
next removed that fresh one, believing it still the stale one); (2) an empty lock file was
judged by its time (the NFS server's clock) against this machine's clock, which on a
cluster may differ by minutes: a starting holder's lock was taken over, or a dead one's
waited on for as long as the clocks differ."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from emrun import locks
from emrun.errors import UserError

HERE = socket.gethostname()


@pytest.fixture
def no_locks(monkeypatch: pytest.MonkeyPatch) -> None:
    """flock fails as on an NFS mount without its lock service; the waits are short."""

    def refuse(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(locks.fcntl, "flock", refuse)
    monkeypatch.setattr(locks, "_told_no_locks", True)
    monkeypatch.setattr(locks, "STARTING_S", 0.3)
    monkeypatch.setattr(locks, "SETTLE_S", 0.05, raising=False)


# Another emrun process, without locks: it waits for a line on stdin, tries to hold the
# folder and says "held" or "refused"; a holder then waits for another line and says
# whether the lock file is still its own ("mine") or was removed from under it ("lost").
OTHER = textwrap.dedent("""\
    import errno, os, random, sys
    from pathlib import Path
    from emrun import locks
    def refuse(fd, operation):
        raise OSError(errno.ENOLCK, "no locks")
    locks.fcntl.flock = refuse
    locks._told_no_locks = True
    locks.SETTLE_S = 0.05
    if len(sys.argv) > 2:  # widen the windows between the steps of a takeover
        locks._step = lambda name: __import__("time").sleep(random.uniform(0, 0.02))
    folder = Path(sys.argv[1])
    sys.stdin.readline()
    try:
        locks.hold(folder, "x")
    except Exception as exc:
        print("refused" if "in use" in str(exc) else repr(exc), flush=True)
        sys.exit(0)
    print("held", flush=True)
    sys.stdin.readline()
    fd = locks._held[os.path.realpath(folder)]
    print("mine" if locks._is_file_at(fd, folder / locks.LOCK_NAME) else "lost", flush=True)
    sys.stdin.readline()
    """)


class Other:
    """One other emrun process (`OTHER`), driven line by line."""

    def __init__(self, folder: Path, jitter: bool = False) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", OTHER, str(folder), *(["jitter"] if jitter else [])],
            text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def go(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("\n")
        self.process.stdin.flush()

    def says(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if not line:
            self.process.wait(timeout=60)
            assert self.process.stderr is not None
            raise AssertionError(self.process.stderr.read())
        return line

    def end(self) -> None:
        with open(os.devnull, "w"):
            self.process.communicate("\n\n\n", timeout=60)


@pytest.fixture
def others() -> Iterator[list[Other]]:
    started: list[Other] = []
    yield started
    for other in started:
        if other.process.poll() is None:
            other.end()


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


def _stale_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "out.zarr"
    folder.mkdir()
    (folder / locks.LOCK_NAME).write_text(f"pid {_dead_pid()} on {HERE} since x\n")
    return folder


def _at_step(monkeypatch: pytest.MonkeyPatch, step: str, action: Callable[[], None]) -> None:
    """Run ``action`` once, when this process's takeover reaches ``step``."""
    done: list[bool] = []

    def pause(name: str) -> None:
        if name == step and not done:
            done.append(True)
            action()

    monkeypatch.setattr(locks, "_step", pause, raising=False)


def _mine(folder: Path) -> bool:
    return locks._is_file_at(locks._held[os.path.realpath(folder)], folder / locks.LOCK_NAME)


# --- (1) one winner among any number of processes ------------------------------------------


@pytest.mark.parametrize("step", ["judged", "removed"])
def test_another_that_takes_over_first_wins_and_keeps_its_file(
        tmp_path: Path, no_locks: None, monkeypatch: pytest.MonkeyPatch,
        others: list[Other], step: str) -> None:
    """This process judged the file stale; before it claims it ("judged") another process
    takes the folder over; or, once this one has removed the stale file ("removed"), a third
    finds none and makes its own. The other keeps the folder and its file; this one is
    refused (before, it removed the other's fresh file, believing it the stale one)."""
    folder = _stale_folder(tmp_path)
    other = Other(folder)
    others.append(other)

    def other_takes_it() -> None:
        other.go()
        assert other.says() == "held"

    _at_step(monkeypatch, step, other_takes_it)
    with pytest.raises(UserError, match=r"in use by another emrun \(pid \d+"):
        locks.hold(folder, "x")
    assert not locks.held(folder)
    other.go()
    assert other.says() == "mine"
    assert (folder / locks.LOCK_NAME).read_text().startswith(f"pid {other.process.pid} ")


def test_another_that_judges_while_this_one_holds_the_claim_is_refused(
        tmp_path: Path, no_locks: None, monkeypatch: pytest.MonkeyPatch,
        others: list[Other]) -> None:
    folder = _stale_folder(tmp_path)
    other = Other(folder)
    others.append(other)

    def other_tries() -> None:
        other.go()
        assert other.says() == "refused"

    _at_step(monkeypatch, "claimed", other_tries)
    locks.hold(folder, "x")
    try:
        assert _mine(folder)
        assert sorted(p.name for p in folder.iterdir()) == [locks.LOCK_NAME]  # no claim left
    finally:
        locks.release(folder)


@pytest.mark.parametrize("claimer", ["killed", "live"])
def test_a_claim_left_by_a_killed_claimer_gives_way_and_a_live_one_refuses(
        tmp_path: Path, no_locks: None, claimer: str) -> None:
    """A process killed while it held the claim on a stale file left it behind: the next
    one claims the file under the next name (and removes the leftover); a live claimer is
    taking the folder over, so this one is refused."""
    folder = _stale_folder(tmp_path)
    stat = os.stat(folder / locks.LOCK_NAME)
    claim = folder / f"{locks.LOCK_NAME}.claim.{stat.st_ino}-{stat.st_mtime_ns}.0"
    pid = _dead_pid() if claimer == "killed" else os.getppid()
    claim.write_text(f"pid {pid} on {HERE} since x\n")
    if claimer == "live":
        with pytest.raises(UserError, match=rf"in use by another emrun \(pid {pid} "):
            locks.hold(folder, "x")
        assert claim.exists()
        return
    locks.hold(folder, "x")
    try:
        assert _mine(folder)
        assert sorted(p.name for p in folder.iterdir()) == [locks.LOCK_NAME]
    finally:
        locks.release(folder)


@pytest.mark.parametrize("left", ["a killed holder's line", "an old empty file"])
def test_of_several_processes_racing_on_a_stale_lock_exactly_one_holds(
        tmp_path: Path, no_locks: None, others: list[Other], left: str) -> None:
    folder = _stale_folder(tmp_path)
    if left == "an old empty file":
        path = folder / locks.LOCK_NAME
        path.write_text("")
        old = time.time() - 3600
        os.utime(path, (old, old))
    racers = [Other(folder, jitter=True) for _ in range(6)]
    others.extend(racers)
    for racer in racers:
        racer.go()
    said = [racer.says() for racer in racers]
    assert sorted(said) == ["held"] + ["refused"] * 5, said
    winner = racers[said.index("held")]
    winner.go()
    assert winner.says() == "mine"
    assert (folder / locks.LOCK_NAME).read_text().startswith(f"pid {winner.process.pid} ")


# --- (2) an empty lock file, judged without comparing two machines' clocks ------------------


def _empty_lock(tmp_path: Path, shift_s: float) -> Path:
    folder = tmp_path / "run"
    folder.mkdir()
    path = folder / locks.LOCK_NAME
    path.write_text("")
    when = time.time() + shift_s
    os.utime(path, (when, when))
    return folder


YEARS = 10 * 365 * 86400.0


@pytest.mark.parametrize("shift_s", [YEARS, -YEARS], ids=["future", "past"])
def test_an_empty_lock_file_at_any_time_is_taken_over_once_it_stays_empty(
        tmp_path: Path, no_locks: None, shift_s: float) -> None:
    """A maker killed before it wrote its line: the file is taken over whatever time it
    shows (one ten years ahead was waited on for ten years)."""
    folder = _empty_lock(tmp_path, shift_s)
    locks.hold(folder, "x")
    try:
        assert (folder / locks.LOCK_NAME).read_text().startswith(f"pid {os.getpid()} ")
    finally:
        locks.release(folder)


@pytest.mark.parametrize("shift_s", [YEARS, -YEARS], ids=["future", "past"])
def test_an_empty_lock_file_at_any_time_whose_maker_writes_its_line_is_not_taken_over(
        tmp_path: Path, no_locks: None, monkeypatch: pytest.MonkeyPatch,
        shift_s: float) -> None:
    """Its maker, live, writes its line while the file is watched: the folder is its
    maker's (one showing a time long past was taken over at once)."""
    folder = _empty_lock(tmp_path, shift_s)
    line = f"pid {os.getppid()} on {HERE} since x\n"  # a live process, not this one
    _at_step(monkeypatch, "watched", lambda: (folder / locks.LOCK_NAME).write_text(line))
    with pytest.raises(UserError, match=rf"in use by another emrun \(pid {os.getppid()} "):
        locks.hold(folder, "x")
    assert (folder / locks.LOCK_NAME).read_text() == line


@pytest.mark.parametrize("clock_s", [3600.0, -3600.0], ids=["ahead", "behind"])
def test_this_machine_s_clock_does_not_judge_an_empty_lock_file(
        tmp_path: Path, no_locks: None, monkeypatch: pytest.MonkeyPatch,
        clock_s: float) -> None:
    """This machine's clock an hour off the file server's: a file just made (its maker
    writing its line) is refused at once, not taken over; one made two minutes ago by the
    server's clock is taken over (it was waited on for the hour)."""
    folder = _empty_lock(tmp_path, 0.0)
    real = time.time
    monkeypatch.setattr(locks.time, "time", lambda: real() + clock_s)
    watched: list[str] = []
    monkeypatch.setattr(locks, "_step", watched.append, raising=False)
    monkeypatch.setattr(locks, "STARTING_S", 60.0)  # the real rule: two minutes is old
    with pytest.raises(UserError, match="its process is starting"):
        locks.hold(folder, "x")
    assert watched == []  # judged at once, by the server's time

    old = real() - 120
    os.utime(folder / locks.LOCK_NAME, (old, old))
    locks.hold(folder, "x")
    try:
        assert (folder / locks.LOCK_NAME).read_text().startswith(f"pid {os.getpid()} ")
    finally:
        locks.release(folder)


def test_a_folder_s_contents_leave_out_the_lock_s_own_files(tmp_path: Path) -> None:
    """A claim or clock file another process makes for a moment beside the lock file is
    not something a user or a command put in the folder."""
    (tmp_path / locks.LOCK_NAME).write_text("")
    (tmp_path / f"{locks.LOCK_NAME}.claim.1-2.0").write_text("")
    (tmp_path / f"{locks.LOCK_NAME}.clock.{HERE}.1").write_text("")
    (tmp_path / "image").mkdir()
    assert [p.name for p in locks.contents(tmp_path)] == ["image"]


def test_another_user_s_stale_lock_in_a_sticky_folder_is_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_locks: None) -> None:
    """In a sticky-bit folder (/tmp, a shared scratch) only a file's owner may remove it: the
    takeover of another user's stale lock file ended in an unhandled PermissionError."""
    folder = _stale_folder(tmp_path)
    lock = folder / locks.LOCK_NAME
    real_unlink = os.unlink

    def sticky(path: os.PathLike[str] | str, *args: object, **kwargs: object) -> None:
        if Path(path) == lock:
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(path))
        real_unlink(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(locks.os, "unlink", sticky)
    with pytest.raises(UserError, match="another user's") as caught:
        locks.hold(folder, "give another output store")
    assert str(caught.value).endswith("give another output store")
    assert lock.exists() and not [p for p in folder.iterdir() if ".claim." in p.name]
