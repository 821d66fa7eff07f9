"""Devices named by the user (`--device`): parsed and checked once, for every command.
torch is imported only by what needs it: CPU-only workers (segmentation) ask for cores and
memory here without paying for torch's import."""

from __future__ import annotations

import contextlib
import os
import resource
import shlex
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError
from .memory import limit_malloc_arenas
from .subprocesses import catching_signals, stop_between_blocks, stop_signals

if TYPE_CHECKING:
    import torch


def parse_device(name: str) -> torch.device:
    """``name`` as a torch device; a typo, or a kind emrun does not run on (mps, xpu, meta:
    a crash midway otherwise), is the user's to fix (exit 2)."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:  # torch's message lists twenty kinds, most of which emrun refuses
        raise UserError(f"--device {name}: not a device; emrun runs on cpu, cuda or cuda:N "
                        "(the GPU of that index)") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: emrun runs on cpu or cuda (cuda:N), not "
                        f"{device.type}")
    return device


def require_visible(device: torch.device, name: str) -> None:
    """Refuse a CUDA device this process cannot see (no GPU, or an index past the last)."""
    import torch

    if device.type == "cuda" and (not torch.cuda.is_available() or (
            device.index is not None and device.index >= torch.cuda.device_count())):
        raise UserError(f"--device {name}: no such CUDA device is visible "
                        f"({torch.cuda.device_count()} visible to torch {torch.__version__})")


def cpu_cores() -> int:
    """The CPU cores this process may use (a SLURM or taskset allocation, not the machine's)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def gpu_memory(device: torch.device) -> int:
    """Bytes of memory of a CUDA device (its index, else the first)."""
    import torch

    return int(torch.cuda.get_device_properties(device.index or 0).total_memory)


def available_memory() -> int:
    """Bytes this process can still allocate: the machine's available memory (Linux
    MemAvailable; else the free physical pages), or less where a container's memory limit
    (cgroup v2 ``memory.max``, v1 ``memory.limit_in_bytes``, less what it uses) or an
    address-space limit (``ulimit -v``, some batch systems, less what the process maps)
    leaves less."""
    room = _machine_memory()
    for limit, used in CGROUP_MEMORY:
        cap = _read_int(limit)
        if cap is not None:
            room = min(room, max(0, cap - (_read_int(used) or 0)))
            break
    address_space = resource.getrlimit(resource.RLIMIT_AS)[0]
    if address_space != resource.RLIM_INFINITY:
        room = min(room, max(0, address_space - _mapped()))
    return room


CGROUP_MEMORY = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                 ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                  "/sys/fs/cgroup/memory/memory.usage_in_bytes"))
"""(limit, usage) files of the process's memory cgroup, v2 then v1, as a container sees them."""


def _machine_memory() -> int:
    available = _proc_bytes("/proc/meminfo", "MemAvailable:")
    if available is not None:
        return available
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def _mapped() -> int:
    """Bytes of address space this process maps now (Linux; 0 where unknown)."""
    return _proc_bytes("/proc/self/status", "VmSize:") or 0


def _proc_bytes(path: str, key: str) -> int | None:
    """The ``key: N kB`` line of a /proc file, in bytes; None where it is missing."""
    try:
        with open(path, encoding="ascii") as lines:
            for line in lines:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_int(path: str) -> int | None:
    """The whole number in a one-line file (a cgroup's limit or usage); None when the file
    is missing or says 'max'."""
    try:
        with open(path, encoding="ascii") as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return None


def daisy_package() -> Any:
    """The daisy package, which `--scheduler daisy` hands blocks to (inference, scaled
    segmentation, scoring): an optional extra, so its absence is the user's to fix."""
    try:
        import daisy
    except ImportError:
        raise UserError("--scheduler daisy needs daisy >= 2: pip install 'emrun[daisy]'") from None
    return daisy


LAUNCH_FAILED = "emrun: the --launch command"  # how a launched worker's failure is said


def check_launch(launch: str | None) -> None:
    """Refuse a ``--launch`` command that cannot start a worker, before any work: bad
    quoting, nothing in it, or a program that is not on this machine's PATH."""
    if launch is None:
        return
    try:
        words = shlex.split(launch)
    except ValueError as exc:
        raise UserError(f"--launch {launch!r}: {exc}") from None
    if not words:
        raise UserError("--launch is empty; give the command that starts a worker, e.g. "
                        "'srun -c 4'")
    if shutil.which(words[0]) is None:
        raise UserError(f"--launch {launch!r}: no command {words[0]!r} on this machine's PATH")


def run_launched(launch: str, module: str, *args: str) -> tuple[int, str | None]:
    """In a daisy worker: serve blocks through ``launch`` (``srun ... python -m module
    args``); its exit code, and what to say of a failure (None: it exited 0)."""
    command = [*shlex.split(launch), sys.executable, "-m", module, *args]
    try:
        code = subprocess.run(command).returncode
    except OSError as exc:
        return 127, f"{LAUNCH_FAILED} {launch!r} could not start: {exc}"
    return code, f"{LAUNCH_FAILED} {launch!r} exited with code {code}" if code else None


LAUNCHED = "launched"
"""The folder, inside the one given to `run_through`, where a launched worker leaves its start
file: apart, so that `LaunchWatch` lists a handful of files, not a job's million done-markers."""


def run_through(launch: str, module: str, args: list[str], folder: Path) -> None:
    """In a daisy worker: serve blocks through the ``--launch`` command (`run_launched`),
    which must run ``python -m module args`` and wait for it; the worker leaves a file in
    ``folder`` (shared with this node) as it starts. A command that failed or ended before
    the worker started (a typo, a fire-and-forget submit, a command that ignores its
    arguments) is the user's to fix: it is left for the scheduler as a worker's user error
    (`leaving_user_errors`: one line, exit 2, no more workers started), where daisy
    restarted it ten times, printing a traceback each. One that failed after the worker
    started (a node lost, memory) exits with its code, and daisy starts another. Nothing
    is said where the run was stopped (signals noted while it ran: the launched worker
    died of the stop, still starting, say)."""
    if worker_failed(folder):  # another worker's launch failed: the run is ending
        _take_no_block()
        return
    with _waiting_for_launched() as signalled:
        tokens = Path(folder) / LAUNCHED
        tokens.mkdir(exist_ok=True)
        token = tokens / uuid.uuid4().hex
        code, failure = run_launched(launch, module, *args, str(token))
    started = token.exists()
    token.unlink(missing_ok=True)
    if signalled:
        return
    if not started:
        with leaving_user_errors(folder):
            raise UserError(launch_failure(launch, failure or (
                f"{LAUNCH_FAILED} {launch!r} ended (exit code 0) without running the worker "
                "command given to it; it must run that command and wait for it, as srun "
                "does")))
        _take_no_block()
        return
    if failure is not None:
        print(failure, file=sys.stderr)
        sys.exit(code)


def _take_no_block() -> None:
    """Connect to daisy as a worker and end: the scheduler's check function says every block
    is done once a worker's user error is left (`worker_failed`), so daisy finishes. A
    daisy worker that ended without a worker connecting was started again, ten times, each
    with a warning."""
    if "DAISY_CONTEXT" not in os.environ:  # not started by daisy (a test, say)
        return
    client = daisy_package().Client()
    while True:
        with client.acquire_block() as block:
            if block is None:
                return


def _waiting_for_launched() -> contextlib.AbstractContextManager[list[str]]:
    """A group's SIGTERM or SIGINT (Ctrl-C) is the launched worker's to take (srun passes
    it on): the daisy worker only waiting for it died of SIGINT with a KeyboardInterrupt
    traceback that daisy printed. Inside this they are noted (yielded) and it waits on;
    the old handlers are back after."""
    return catching_signals()


def launched_main(serve: Callable[..., None]) -> None:
    """A worker's ``__main__`` under `run_through`: say it started (the last argument is
    the file to make), then ``serve(*the other arguments)``, leaving a user error for the
    scheduler (`leaving_user_errors`) in the folder given to `run_through`. It caps malloc's
    arenas first, as the `emrun` command does (`emrun.memory`): started by srun on another
    node, the cap it inherited counted the launching machine's cores."""
    limit_malloc_arenas()
    token = Path(sys.argv[-1])
    token.touch()
    with leaving_user_errors(token.parent.parent):  # <folder>/LAUNCHED/<token>
        serve(*sys.argv[1:-1])


class WorkerFailed(UserError):
    """A user error a daisy worker met and left for the scheduler (`leaving_user_errors`),
    raised there with the worker's own message (`launched_workers`)."""


WORKER_ERROR = "worker-error"
"""The file, in the folder given to `run_through` and `launched_workers`, where a daisy
worker leaves the user error it met (`leaving_user_errors`)."""


@contextlib.contextmanager
def leaving_user_errors(folder: Path) -> Iterator[None]:
    """Around a daisy worker's loop (started here or through ``--launch``): a UserError (an
    unreadable block, say) is left in ``folder``'s `WORKER_ERROR` file, and the worker ends
    cleanly. It crashed instead: daisy restarted it (up to ten times, each failing alike,
    and slowly) and the run ended with daisy's words or the launch command's exit code, not
    the worker's message. The scheduler hands out no more blocks once the file is there
    (`worker_failed`), and `launched_workers` raises its message. Where the file cannot be
    written (the run's folder is gone) the error is raised as before."""
    try:
        yield
    except UserError as exc:
        try:
            part = Path(folder) / f".{WORKER_ERROR}.{uuid.uuid4().hex}.part"
            part.write_text(str(exc), encoding="utf-8")
            part.replace(Path(folder) / WORKER_ERROR)  # whole, or not there
        except OSError:
            raise exc from None


def worker_failed(folder: Path | str) -> bool:
    """Whether a daisy worker left a user error in ``folder`` (`leaving_user_errors`): the
    scheduler's check function says every block is done then, so no other is handed out."""
    return (Path(folder) / WORKER_ERROR).exists()


def _left_error(folder: Path | None) -> str | None:
    """The user error a daisy worker left in ``folder``, if any."""
    if folder is None:
        return None
    try:
        return (Path(folder) / WORKER_ERROR).read_text(encoding="utf-8").strip()
    except OSError:
        return None


@contextlib.contextmanager
def launched_workers(launch: str | None, folder: Path | None = None) -> Iterator[None]:
    """Around ``daisy.run_blockwise``. With ``folder`` (the one given to `run_through`), a
    user error a worker left there (`leaving_user_errors`) is raised once daisy is done, as
    the worker said it (exit 2); a leftover of a killed run is removed first. With a
    ``--launch`` command, a failure of the workers it starts is the user's (one line, exit
    2, after daisy's own warning per restart, each with the worker's one line), and while
    no worker has started a note says so now and then; without one, nothing else changes."""
    if folder is not None:
        (Path(folder) / WORKER_ERROR).unlink(missing_ok=True)
    watch = LaunchWatch(launch, folder) if launch is not None and folder is not None else None
    try:
        try:
            yield
        except RuntimeError as exc:  # daisy gave up restarting the workers
            if (said := _left_error(folder)) is not None:
                raise WorkerFailed(said) from None
            if launch is None:
                raise
            raise UserError(launch_failure(launch, str(exc))) from None
        finally:
            if watch is not None:
                watch.stop()
        if (said := _left_error(folder)) is not None:
            raise WorkerFailed(said)
    finally:
        if folder is not None:
            (Path(folder) / WORKER_ERROR).unlink(missing_ok=True)


class LaunchWatch:
    """Notes on stderr while no worker started through ``--launch`` has begun: a command that
    waited in a queue, or hung, kept the scheduler silent for as long as it lasted. A worker
    has begun once its file of `run_through` is in ``folder``'s `LAUNCHED` folder."""

    NOTES_AT_S = (120.0, 600.0, 1800.0, 3600.0)
    POLL_S = 5.0

    def __init__(self, launch: str, folder: Path) -> None:
        self.launch, self.folder = launch, Path(folder)
        self.started = time.monotonic()
        self.notes = list(self.NOTES_AT_S)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="emrun-launch-watch",
                                        daemon=True)
        self._thread.start()

    def note(self, elapsed: float, begun: bool) -> str | None:
        """The note due ``elapsed`` seconds in (each once), None when a worker has begun."""
        if begun or not self.notes or elapsed < self.notes[0]:
            return None
        while self.notes and elapsed >= self.notes[0]:
            self.notes.pop(0)
        return (f"note: no worker has started through --launch {self.launch!r} after "
                f"{elapsed / 60:.0f} min: still waiting in a queue, or the command does not run "
                "the command given to it (it must run it and wait for it, as srun does)")

    def _begun(self) -> bool:
        return any((self.folder / LAUNCHED).glob("*"))

    def _run(self) -> None:
        while not self._stop.wait(self.POLL_S):
            begun = self._begun()
            if (said := self.note(time.monotonic() - self.started, begun)) is not None:
                print(said, file=sys.stderr, flush=True)
            if begun or not self.notes:
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def launch_failure(launch: str, detail: str) -> str:
    """The message for workers started through ``launch`` that failed, from daisy's report."""
    said = [line.strip() for line in detail.splitlines() if LAUNCH_FAILED in line]
    lines = [line.strip() for line in detail.strip().splitlines() if line.strip()]
    reason = said[-1].removeprefix("emrun: ") if said else (lines[-1] if lines else
                                                           "no error reported")
    return (f"the workers started through --launch {launch!r} failed ({reason}); finished "
            "blocks are kept: fix the command and run again (with --resume where it has one)")


class BlockStops:
    """When a daisy worker (started here or through ``--launch``) stops taking blocks: daisy
    has none left, the run was stopped (its ``stop_file``, made by the scheduler or by a
    worker: `note`), a worker met a user error (`worker_failed` in ``folder``), or this
    worker was sent SIGTERM or SIGINT (a group's, or srun's), noted between blocks. Made
    first thing in the worker, so that a signal while it loads (a model, say) is noted."""

    def __init__(self, stop_file: Path, folder: Path) -> None:
        self.stop_file, self.folder = Path(stop_file), Path(folder)
        self.signalled = stop_between_blocks()

    def __call__(self) -> bool:
        if self.signalled:
            self.note()
            return True
        return self.stop_file.exists() or worker_failed(self.folder)

    def note(self) -> None:
        """Leave the signal's name in the stop file: daisy takes SIGINT itself and may end
        its run without a word of it (its workers gone), and the scheduler reads it there
        (`daisy_stops`); the other workers stop between blocks."""
        if not self.stop_file.exists():
            with contextlib.suppress(OSError):
                self.stop_file.write_text(self.signalled[0], encoding="ascii")

    def serve(self, client: Any, process: Callable[[Any], None]) -> None:
        """Hand ``process`` the blocks ``client`` (a ``daisy.Client``) acquires until this
        says stop. On SIGINT daisy closes its server at once, under a worker asking for a
        block ('Broken pipe': a traceback and exit 1, reported after the stop): once
        stopped, that is the stop; before, it is raised. A block's own failure is raised
        either way (swallowed after a stop, its traceback was lost and the worker ended 0)."""
        while True:
            processing = False
            try:
                with client.acquire_block() as block:
                    if block is None or self():
                        return
                    processing = True
                    process(block)
                    processing = False
            except Exception:
                if processing or not self():
                    raise
                return


@contextlib.contextmanager
def daisy_stops(stop_file: Path) -> Iterator[list[str]]:
    """Around ``daisy.run_blockwise``: yields the names of the stopping signals, the first
    the stop's. SIGTERM makes ``stop_file`` (`stop_signals`) and daisy waits for its
    workers. SIGINT daisy takes itself, unseen by `stop_signals`: it ends its run at once
    with a KeyboardInterrupt (taken here as SIGINT's stop: it was the generic 'stopped by
    SIGINT' line), or, where its workers ended first, as if finished, with blocks left
    (the stop then read from the stop file a signalled worker left, `BlockStops.note`).
    The caller reads nothing of daisy's run once one is caught."""
    with stop_signals(Path(stop_file).touch) as caught:
        try:
            yield caught
        except KeyboardInterrupt:
            caught.append("SIGINT")
            with contextlib.suppress(OSError):  # launched workers elsewhere stop too
                Path(stop_file).touch()
    if not caught and (noted := _noted_stop(Path(stop_file))) is not None:
        caught.append(noted)


def _noted_stop(stop_file: Path) -> str | None:
    """The signal a worker left in ``stop_file`` (`BlockStops.note`), if any."""
    try:
        name = stop_file.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if name in ("SIGTERM", "SIGINT") else None
