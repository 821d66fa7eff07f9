"""Handing a step's blocks to workers: ``local`` worker processes on this machine, or daisy
workers (extra ``emrun[daisy]``) started here or through ``--launch`` (e.g. ``srun -c 2``)
on other machines that share the output folder and the database.

Both skip blocks whose done-marker exists and leave one after each finished block, so a job
started by one scheduler can be finished by the other. Steps run one after another: a
block's graph reads its neighbours' fragments, so every fragment is written first.

SIGTERM (a cluster's time limit, `scancel`, `timeout`) or SIGINT during a step stops it
between blocks, as infer's schedulers do: the blocks in flight are finished and marked, no
new one starts, and `Interrupted` says to run the same command with --resume (exit 143 or
130). It used to end the run on the spot without a word, and daisy's workers went on
writing blocks after the scheduler had exited and released the output. Outside the steps
(`MainStops`: between them, the agglomeration in this process, the pyramids) the same
signals stop the command at the next point where all it wrote is whole.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ...devices import (
    BlockStops,
    WorkerFailed,
    daisy_package,
    daisy_stops,
    launch_failure,
    launched_main,
    launched_workers,
    leaving_user_errors,
    run_through,
    worker_failed,
)
from ...errors import Interrupted, UserError
from ...geometry import Zyx, zyx
from ...subprocesses import (
    catching_signals,
    die_with_parent,
    kill_workers,
    killed_by,
    leave_signals_to,
    signals_held,
    stop_signals,
)
from .job import ScaleJob, listed_markers, marker_name
from .steps import _store, run_block
from .steps import forget_caches as forget_block_caches

__all__ = ["DoneCheck", "MainStops", "forget_caches", "local_pool", "main_stops", "run_step"]

Report = Callable[[str, int, int], None]


@contextmanager
def local_pool(scheduler: str, workers: int, blocks: int) -> Iterator[ProcessPoolExecutor | None]:
    """The worker processes every step of a local job of ``blocks`` blocks shares (started
    once: each imports emrun), no more than the blocks (the pool was sized by --workers
    alone; CPython starts spawned workers as tasks come, but that is its choice, not
    this bound); None where blocks run in this process (one worker, or a job of one
    block, which started a worker to import emrun for it) or on daisy's workers."""
    workers = min(workers, blocks)
    if scheduler != "local" or workers <= 1:
        yield None
        return
    context = multiprocessing.get_context("spawn")  # no fork of zarr's or torch's threads
    # The workers leave SIGTERM and SIGINT to this process (a signal to the process group
    # killed them mid-block: a 'worker died' error instead of a stop between blocks), and
    # die with it (no orphans after a kill -9). They start on demand, in `_submit`.
    with ProcessPoolExecutor(workers, mp_context=context, initializer=leave_signals_to,
                             initargs=(os.getpid(),)) as pool:
        try:
            yield pool
        except BaseException:  # a worker killed, a stop, a user's error: none left behind
            kill_workers(pool)
            raise


def run_step(job: ScaleJob, step: str, blocks: Sequence[Zyx], *, scheduler: str,
             workers: int, launch: str | None, pool: ProcessPoolExecutor | None,
             on_block: Report | None) -> Counter[str]:
    """Run ``step`` on ``blocks`` (the pending ones) in ``pool`` (`local_pool`), here, or on
    daisy; returns seconds summed by part (daisy workers keep theirs)."""
    job_file = str(job.job_file)
    if scheduler == "daisy":
        if blocks:  # none to do (a resume): no daisy run that asks each block if it is done
            _run_daisy(job, step, min(workers, len(blocks)), launch)  # no more than blocks
        if on_block is not None:
            on_block(step, len(blocks), len(blocks))
        return Counter()
    seconds: Counter[str] = Counter()
    with stop_signals() as caught:
        try:
            done = _run_local(job_file, step, blocks, pool, workers, seconds, caught, on_block)
        except UserError as exc:  # a block's (values, a chunk): the job stays, as daisy's
            if "--resume" in str(exc):
                raise
            raise UserError(f"{exc}; the {step} blocks finished are kept in {job.output}: "
                            "once that is fixed, run again with --resume (or, where the "
                            f"input was rewritten, remove {job.output} to start over)"
                            ) from None
    if caught:  # the blocks in flight were finished and marked
        raise _stopped(caught[0], step, f"{done} of the {len(blocks)} blocks it had to do "
                      "are done and kept")
    return seconds


RESUME = "run the same command with --resume to go on"
STARTING = ("the job stopped while starting, before it wrote anything of its own: run the "
            "same command again")


class MainStops:
    """SIGTERM or SIGINT while this process works outside the block steps: noted, and the
    command stops at the next `check` (where all it wrote is whole), or at once inside
    `cut_short` (work that writes only atomically, at its end: the agglomeration; or that a
    resume redoes whole: the pyramids), `at_once` (waiting for the database) and `starting`
    (the start-up's reads and checks, before anything of the job is written). Calls that do
    not return to Python until done (the compiled agglomeration, a driver's connect) run in
    `abandonable`, so that the stop is at once there too. Without it the command ended
    there on the spot, exit -15 or a traceback, saying nothing; a stop during a pyramid
    waited for it."""

    def __init__(self) -> None:
        self.caught: list[str] = []
        self._now: str | None = None  # the stop's message, while work may be cut short

    def on_signal(self, signal_name: str) -> None:
        """Each signal's, once noted in `caught`: the stop, where work may be cut short."""
        if self._now is not None:
            message, self._now = self._now, None
            raise Interrupted(self.caught[0], message)

    def check(self, after: str) -> None:
        """Stop here if a signal came: the job stopped after ``after``, all of it kept."""
        if self.caught:
            raise Interrupted(self.caught[0], f"the job stopped after {after}, before its "
                              f"next step; all done so far is kept: {RESUME}")

    @contextmanager
    def cut_short(self, kept: str) -> Iterator[None]:
        """Inside this, a signal stops the command at once (``kept``: what stays); one that
        came before waits for the next `check`, so `check` first."""
        with self._at_once(f"{kept}: {RESUME}"):
            yield

    @contextmanager
    def at_once(self, message: str) -> Iterator[None]:
        """Inside this, a signal stops the command at once, saying ``message`` as it is (work
        that changes nothing until it is done: the database's tables created in one
        transaction), as does one that came before (a new job is not saved yet: `check`'s
        '--resume' would be refused)."""
        if self.caught:
            raise Interrupted(self.caught[0], message)
        with self._at_once(message):
            yield

    @contextmanager
    def starting(self) -> Iterator[None]:
        """Inside this (reads and checks only: nothing of the job written yet), a signal
        stops the command at once, as does one that came before."""
        if self.caught:
            raise Interrupted(self.caught[0], STARTING)
        with self._at_once(STARTING):
            yield
        if self.caught:  # taken by code that swallowed the stop
            raise Interrupted(self.caught[0], STARTING)

    @contextmanager
    def _at_once(self, message: str) -> Iterator[None]:
        self._now = message
        try:
            yield
        finally:
            self._now = None


@contextmanager
def main_stops() -> Iterator[MainStops]:
    """`MainStops` for SIGTERM and SIGINT while inside (the steps' `stop_signals` take them
    during a step, and give them back); outside the main thread none are installed."""
    stops = MainStops()
    with catching_signals(stops.on_signal) as caught:
        stops.caught = caught  # what a signal before this line noted is in it too
        yield stops


def _stopped(signal_name: str, step: str, kept: str) -> Interrupted:
    """The stop a SIGTERM or SIGINT during ``step`` ends the command with: what was kept
    and how to go on (the command line reads 'stopped by SIGTERM: ...', exit 143)."""
    return Interrupted(signal_name, f"the {step} step stopped between blocks; {kept}: "
                       f"{RESUME}")


def _run_local(job_file: str, step: str, blocks: Sequence[Zyx],
               pool: ProcessPoolExecutor | None, workers: int, seconds: Counter[str],
               caught: list[str], on_block: Report | None) -> int:
    """Run ``blocks`` here or in ``pool``, adding their timings to ``seconds``, until done
    or a signal is ``caught``; returns how many were done."""
    total = len(blocks)
    if pool is None:
        for i, index in enumerate(blocks):
            if caught:
                return i
            seconds.update(run_block(job_file, step, index))
            if on_block is not None:
                on_block(step, i + 1, total)
        return total
    # No more blocks in the pool than workers: once stopped, only those in flight finish
    # (blocks queued in the pool could not all be taken back).
    todo = iter(blocks)
    running: set[Future[Counter[str]]] = set()
    done = 0
    try:
        while True:
            while not caught and len(running) < workers and \
                    (index := next(todo, None)) is not None:
                running.add(_submit(pool, job_file, step, index))
            if not running:
                return done
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                seconds.update(future.result())
                done += 1
                if on_block is not None:
                    on_block(step, done, total)
    except BrokenProcessPool:  # a worker killed (kill -9, the out-of-memory killer): the
        # machine's or the user's doing, not a bug (it was exit 1, 'This is a bug in emrun')
        raise UserError(f"a {step} worker died (killed, or out of memory: use fewer "
                        "--workers or a smaller --block); finished blocks are kept: run "
                        "again with --resume") from None
    finally:
        for future in running:
            future.cancel()


def _submit(pool: ProcessPoolExecutor, job_file: str, step: str,
            index: Zyx) -> Future[Counter[str]]:
    """``pool.submit`` starts a worker process when it has fewer than it may: it starts
    with SIGTERM and SIGINT held until it ignores them (`leave_signals_to`), so a signal to
    the group while it imports emrun cannot kill it."""
    with signals_held():
        return pool.submit(run_block, job_file, step, index)


def _run_daisy(job: ScaleJob, step: str, workers: int, launch: str | None) -> None:
    daisy = daisy_package()
    from daisy.logging import set_log_basedir

    set_log_basedir(job.folder / "daisy-logs")
    job_file = str(job.job_file)
    stop_file = _stop_file(job)
    stop_file.unlink(missing_ok=True)  # a stopped run's, not this one's
    block = daisy.Roi((0, 0, 0), job.block)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # daisy frowns on check_function
        task = daisy.Task(
            f"emrun-segment-{step}", total_roi=daisy.Roi((0, 0, 0), job.shape),
            read_roi=block, write_roi=block,
            process_function=functools.partial(_start_worker, job_file, step, launch),
            check_function=DoneCheck(job, step),
            read_write_conflict=False, fit="shrink", max_workers=workers, max_retries=2)
    try:
        with launched_workers(launch, Path(job_file).parent), \
                daisy_stops(stop_file) as caught:
            states = daisy.run_blockwise([task], progress=False, block_tracking=False,
                                         return_states=True, summary=False)
    except WorkerFailed as exc:  # a worker's user error (an unreadable block), said once
        raise UserError(f"{exc}; the {step} blocks finished are kept: once that is fixed, "
                        "run again with --resume") from None
    if caught:  # the blocks finished are marked; the stop file stays for launched workers
        raise _stopped(caught[0], step, "the blocks finished are kept")
    stop_file.unlink(missing_ok=True)
    state = states.get(task.task_id)
    failed = getattr(state, "failed_count", 0) + getattr(state, "orphaned_count", 0)
    if failed:
        error = getattr(state, "last_worker_error", None) or "no error reported"
        if launch:
            raise UserError(launch_failure(launch, str(error)))
        if (number := killed_by(str(error))) is not None:
            raise UserError(f"a {step} worker was killed (signal {number}: the out-of-memory "
                            "killer, or kill; use fewer --workers or a smaller --block if "
                            "memory ran out); finished blocks are kept: run again with "
                            "--resume")
        raise RuntimeError(f"daisy finished the {step} step with {failed} blocks failed "
                           f"({str(error).strip().splitlines()[-1]}); finished blocks are "
                           "kept: run again with --resume")


def _index(job: ScaleJob, roi: Any) -> Zyx:
    return zyx(int(o) // b for o, b in zip(roi.offset, job.block, strict=True))


def forget_caches() -> None:
    """Drop every cache this process keeps for a job's blocks (`steps.forget_caches`): a new
    run (or a resumed one) must see what is done now. daisy's done-checks keep theirs in
    their `DoneCheck`, one per step run."""
    forget_block_caches()


def _stop_file(job: ScaleJob) -> Path:
    """Made when the scheduler is stopped (SIGTERM, SIGINT): daisy's workers, here or on
    other nodes sharing the output folder, stop between blocks, and none is handed out."""
    return job.folder / "stop"


class DoneCheck:
    """daisy's check function for one run of ``step``: asked before each block is handed out,
    a block is done when its marker (or its row in the database) says so, and every block
    is once the run is stopped (the stop file, or a worker's user error, exists).

    What was done is read once, when the first block is asked about (one listing of the
    markers, or one query), from the job it is made with: the check parsed the job file,
    and stat'ed a marker, for every block (daisy's scheduler asks one block at a time).
    Blocks this run finishes are never asked about again; a run after it makes its own
    check, so nothing read here outlives the step's run."""

    def __init__(self, job: ScaleJob, step: str) -> None:
        self.job, self.step = job, step
        self.folder, self.stop_file = job.folder, _stop_file(job)  # paths made once
        self._done: frozenset[int] | frozenset[str] | None = None

    def __call__(self, block: Any) -> bool:
        if self.stop_file.exists() or worker_failed(self.folder):
            return True
        index = _index(self.job, block.write_roi)
        if self.step in ("graph", "agglomerate"):
            return self.job.block_id(index) in self.done()
        return marker_name(index) in self.done()

    def done(self) -> frozenset[int] | frozenset[str]:
        """What was done when first asked: the ids of the blocks in the database (graph,
        agglomerate), or the names of the markers (the other steps)."""
        if self._done is None:
            self._done = self._read_done()
        return self._done

    def _read_done(self) -> frozenset[int] | frozenset[str]:
        job = self.job
        if self.step == "graph":
            return frozenset(_store(job.db).done_blocks())
        if self.step == "agglomerate":
            from .steps import levels_key

            return frozenset(_store(job.db).agglomerated_blocks(levels_key(job)))
        marker = self.step
        if self.step == "relabel":
            from .steps import lut_key

            marker = f"relabel-{lut_key(job)}"
        return listed_markers(job.folder / marker)


def _start_worker(job_file: str, step: str, launch: str | None) -> None:
    """daisy's worker function: serve blocks here, or start a server through ``launch``."""
    if launch:
        run_through(launch, "emrun.segment.scale.schedulers", [job_file, step],
                    Path(job_file).parent)
        return
    die_with_parent(os.getppid())  # they wrote on after a SIGTERM had killed the scheduler
    with leaving_user_errors(Path(job_file).parent):  # the scheduler says it, once
        serve(job_file, step)


def serve(job_file: str, step: str) -> None:
    """Take blocks from the daisy scheduler until none are left or it is stopped."""
    daisy = daisy_package()
    job = ScaleJob.load(job_file)
    # Ctrl-C or SIGTERM to the group (srun passes them on) is noted, taken between blocks
    stopping = BlockStops(_stop_file(job), Path(job_file).parent)
    stopping.serve(daisy.Client(),
                   lambda block: run_block(job_file, step, _index(job, block.write_roi)))


if __name__ == "__main__":  # a worker started through --launch
    launched_main(serve)
