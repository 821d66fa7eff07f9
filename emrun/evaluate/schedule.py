"""Who scores the blocks of `emrun.evaluate.blockwise`: worker processes on this machine, or
daisy's blockwise scheduler (extra ``emrun[daisy]``) on many.

A run saves its `Work` in a private temporary folder (``tempfile``, inside ``work_dir``,
else ``TMPDIR`` or the system's), the workers write one file per block there, this process
merges them and removes the folder. Workers started through ``launch`` (e.g. ``srun -c 4``)
on other machines must see that folder and the volumes: give a ``work_dir`` on a filesystem
the nodes share.

``local`` runs the blocks in this process with one worker, else in spawned worker
processes that leave signals to this one (`emrun.subprocesses`). ``daisy`` hands them to
one daisy task over the volume, a run of blocks (`Work.runs`: those that read one region
of chunks, or a single block) per daisy block; each daisy worker reads the work once and
scores the runs daisy hands it until none are left. daisy's own tracking is off
(a rerun scores everything again: scoring keeps nothing on disk).

SIGTERM or SIGINT (`emrun.evaluate.stops`): local workers are killed at once, as nothing
they would finish is kept; daisy's are told through a stop file in the work folder and
stop between blocks (and no block is handed out after it); either way the work folder goes.
"""

from __future__ import annotations

import concurrent.futures
import functools
import multiprocessing as mp
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emrun import locks
from emrun.capacity import check_work_folder, work_folder
from emrun.devices import (
    BlockStops,
    check_launch,
    cpu_cores,
    daisy_package,
    daisy_stops,
    launch_failure,
    launched_main,
    launched_workers,
    leaving_user_errors,
    run_through,
    worker_failed,
)
from emrun.errors import UserError, disk_full
from emrun.evaluate.binary import BinaryCounts
from emrun.evaluate.blockwise import (
    Work,
    load_work,
    merge_blocks,
    missing_blocks,
    save_work,
    write_block,
)
from emrun.evaluate.contingency import ContingencyTable
from emrun.evaluate.stops import stopped
from emrun.subprocesses import (
    die_with_parent,
    kill_workers,
    killed_by,
    leave_signals_to,
    signals_held,
)

__all__ = ["Parallel", "score_blocks"]

OnBlock = Callable[[int, int], None]
"""Called with (blocks done, blocks in all) as blocks finish."""


@dataclass(frozen=True)
class Parallel:
    """How to score in blocks: ``scheduler`` local or daisy, ``workers`` (default: this
    machine's cores for local, 1 for daisy), ``launch`` (daisy only: the command that starts
    each worker), ``block`` (z, y, x voxels; default: whole chunks, `default_block`) and
    ``work_dir`` (where the run's temporary folder goes; made if missing)."""

    scheduler: str = "local"
    workers: int | None = None
    launch: str | None = None
    block: tuple[int, int, int] | None = None
    work_dir: str | None = None

    def check(self) -> None:
        """Raise a UserError (one line) for options that cannot run; daisy is imported."""
        if self.scheduler not in ("local", "daisy"):
            raise UserError(f"--scheduler must be local or daisy (got {self.scheduler!r})")
        if self.workers is not None and self.workers < 1:
            raise UserError(f"--workers must be at least 1 (got {self.workers})")
        if self.block is not None and any(b < 1 for b in self.block):
            raise UserError("--block takes three sizes of at least 1 voxel, z y x (got "
                            f"{' '.join(str(b) for b in self.block)})")
        if self.launch is not None and self.scheduler != "daisy":
            raise UserError("--launch is for --scheduler daisy (workers started by a command)")
        check_launch(self.launch)
        if self.scheduler == "daisy":
            daisy_package()
        check_work_folder(self.work_dir, "--work-dir")  # made only when blocks are scored

    @property
    def worker_count(self) -> int:
        if self.workers is not None:
            return self.workers
        return cpu_cores() if self.scheduler == "local" else 1


def score_blocks(work: Work, parallel: Parallel, on_block: OnBlock | None = None
                 ) -> ContingencyTable | BinaryCounts:
    """Score every block of ``work`` with ``parallel``'s workers and merge their results."""
    parallel.check()
    work_folder(parallel.work_dir, "--work-dir")
    _remove_abandoned(Path(parallel.work_dir or tempfile.gettempdir()))
    with tempfile.TemporaryDirectory(prefix=PREFIX, dir=parallel.work_dir) as name, \
            locks.holding(Path(name), "it is another evaluation's work folder"):
        folder = Path(os.path.abspath(name))  # workers may start in another folder
        try:
            save_work(folder, work)
            if parallel.scheduler == "daisy":
                _run_daisy(folder, work, parallel.worker_count, parallel.launch, on_block)
            else:
                _run_local(folder, work, parallel.worker_count, on_block)
        except Exception as exc:
            if (full := disk_full(exc)) is None:
                raise
            raise UserError(f"the disk of the work folder {Path(name).parent} is full "
                            f"({full.strerror}) while blocks were scored: free space there, "
                            "or give --work-dir a folder on a disk with room (evaluate "
                            "writes nothing else)") from None
        missing = missing_blocks(folder, work)
        if missing:
            raise RuntimeError(f"{len(missing)} of {len(work.grid)} blocks were not scored "
                               f"(block {missing[0]} first)")
        return merge_blocks(folder, work)


PREFIX = "emrun-evaluate-"
STOP = "stop"
"""The file in the work folder that tells daisy's workers (here, or on nodes sharing the
folder) to stop between blocks: the run was stopped (SIGTERM, SIGINT)."""
ABANDONED_AFTER_S = 60.0
"""A work folder nobody holds is a killed run's once it is this old (a run just starting
makes its folder an instant before it holds it)."""


def _remove_abandoned(parent: Path) -> None:
    """Remove the work folders of evaluations killed outright (kill -9, the out-of-memory
    killer: no cleanup ran), which held every block's table until removed by hand: those
    in ``parent`` that no process holds (`emrun.locks`) and that are not brand new."""
    try:
        found = [p for p in parent.iterdir() if p.name.startswith(PREFIX) and p.is_dir()
                 and not p.is_symlink()]
    except OSError:
        return
    for folder in found:
        try:
            if time.time() - folder.stat().st_mtime < ABANDONED_AFTER_S:
                continue
            locks.check_free(folder, "")
            if not _only_ours(folder):
                continue  # a user's folder that happens to share the prefix
        except (OSError, UserError):
            continue  # gone meanwhile, not ours to read, or a running evaluation's
        shutil.rmtree(folder, ignore_errors=True)


OURS = re.compile(r"work\.pickle|block-\d+\.npz|\.block-\d+\.npz\.\d+\.tmp|daisy-logs|"
                  r"launched|worker-error|\.worker-error\.[0-9a-f]+\.part|stop")
"""What a work folder holds (`emrun.evaluate.blockwise`, daisy's logs, a ``--launch``ed
worker's start file (`emrun.devices.run_through`), a daisy worker's user error
(`emrun.devices.leaving_user_errors`), the stop file of a stopped daisy run), beside the
lock's own files."""


def _only_ours(folder: Path) -> bool:
    """Whether ``folder`` holds nothing but what an evaluation writes there: a folder of
    the same prefix with anything else in it is not removed (it may be a user's)."""
    return all(OURS.fullmatch(entry.name) or locks.is_lock_file(entry.name)
               for entry in folder.iterdir())


def _run_local(folder: Path, work: Work, workers: int, on_block: OnBlock | None) -> None:
    runs = work.runs()  # a region's blocks together: its chunks decoded by one worker once
    total = sum(len(run) for run in runs)
    workers = min(workers, total)
    if workers == 1:
        for done, index in enumerate((i for run in runs for i in run), 1):
            write_block(folder, work, index)
            if on_block is not None:
                on_block(done, total)
        return
    if len(runs) < workers:  # fewer regions than workers: blocks apart, every worker busy
        runs = [[index] for run in runs for index in run]
    pool = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=mp.get_context("spawn"), initializer=leave_signals_to,
        initargs=(os.getpid(),))
    try:
        with signals_held():  # a worker still importing must not die of a group's SIGTERM
            futures = {pool.submit(_score_here, str(folder), run): len(run) for run in runs}
        done = 0
        for future in concurrent.futures.as_completed(futures):
            future.result()  # a worker's UserError (an unreadable chunk, say) is raised here
            for _ in range(futures[future]):
                done += 1
                if on_block is not None:
                    on_block(done, total)
    except concurrent.futures.process.BrokenProcessPool:  # killed: not a bug in emrun
        kill_workers(pool)  # the others ignore the pool's SIGTERM: its shutdown waited
        raise UserError("an evaluation worker died (killed, or out of memory: use fewer "
                        "--workers or a smaller --block); run evaluate again") from None
    except BaseException:  # a stop (`emrun.evaluate.stops`), a worker's user error: the
        kill_workers(pool)  # blocks in flight are of no use now (shutdown waited for them)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _score_here(folder: str, run: list[int]) -> None:
    """Score ``run``'s blocks in turn (one region's: `Work.runs`)."""
    work = load_work(folder)
    for index in run:
        write_block(Path(folder), work, index)



class _Observer:
    """daisy's progress, as calls of ``on_block`` for each block finished: daisy counts
    runs (`Work.runs`), told in blocks as the share of runs done (exact where runs are
    single blocks, and at the end)."""

    def __init__(self, on_block: OnBlock, blocks: int) -> None:
        self.on_block = on_block
        self.blocks = blocks
        self.done = 0

    def on_start(self, states: dict[str, Any]) -> None:
        pass

    def on_progress(self, states: dict[str, Any]) -> None:
        for state in states.values():
            runs = max(1, int(state.total_block_count))
            reached = self.blocks * int(state.completed_count) // runs
            while self.done < reached:
                self.done += 1
                self.on_block(self.done, self.blocks)

    on_finish = on_progress


def _run_daisy(folder: Path, work: Work, workers: int, launch: str | None,
               on_block: OnBlock | None) -> None:
    daisy = daisy_package()
    from daisy.logging import get_log_basedir, set_log_basedir

    previous = get_log_basedir()
    set_log_basedir(folder / "daisy-logs")  # not the user's working directory
    stop_file = folder / STOP
    try:
        box = daisy.Roi((0, 0, 0), work.shape)
        block = daisy.Roi((0, 0, 0), work.run_box)  # a run per daisy block
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            task = daisy.Task(
                "emrun-evaluate", total_roi=box, read_roi=block, write_roi=block,
                process_function=functools.partial(_start_worker, str(folder), launch),
                check_function=functools.partial(_stopped, str(folder)),
                read_write_conflict=False, fit="shrink",
                max_workers=min(workers, len(work.runs())),  # none idle: no more than runs
                max_retries=2)
        with launched_workers(launch, folder), daisy_stops(stop_file) as caught:
            states = daisy.run_blockwise(
                [task], progress=_Observer(on_block, len(work.grid)) if on_block else False,
                block_tracking=False, return_states=True, summary=False)
    finally:
        set_log_basedir(previous)
    if caught:  # daisy's workers stopped between blocks, and none was handed out after
        raise stopped(caught[0])
    missing = missing_blocks(folder, work)
    if missing:
        state = states.get("emrun-evaluate")
        error = getattr(state, "last_worker_error", None) or "no error reported"
        if launch:
            raise UserError(launch_failure(launch, error))
        if (number := killed_by(error)) is not None:
            raise UserError(f"an evaluation worker was killed (signal {number}: the "
                            "out-of-memory killer, or kill; use fewer --workers or a smaller "
                            "--block if memory ran out); run evaluate again")
        raise RuntimeError(f"daisy finished with {len(missing)} of {len(work.grid)} blocks "
                           f"not scored ({error.strip().splitlines()[-1]})")


def _stopped(folder: str, block: Any) -> bool:
    """daisy's check before it hands a block out: none is once a worker has met a user
    error (an unreadable chunk, say: the run ends with it, `launched_workers`) or once the
    run is stopped (SIGTERM, SIGINT: its stop file)."""
    return worker_failed(folder) or (Path(folder) / STOP).exists()


def _start_worker(folder: str, launch: str | None) -> None:
    """daisy's worker function: serve blocks here, or start a server through ``launch``
    (whose worker leaves a user error as this one does, `launched_main`)."""
    die_with_parent(os.getppid())  # none scores on after the scheduler was killed
    if launch:  # the group's SIGTERM or SIGINT is the launched worker's (`run_through`)
        run_through(launch, "emrun.evaluate.schedule", [folder], Path(folder))
        return
    with leaving_user_errors(Path(folder)):
        serve(folder)


def serve(folder: str) -> None:
    """Score the blocks daisy hands out until none are left, a worker met a user error
    (left for the scheduler inside the block: daisy logged a block that raised with its
    whole traceback), or the run is stopped: by its stop file, or by SIGTERM or SIGINT to
    this worker (a group's, or srun's), noted and taken between blocks."""
    daisy = daisy_package()
    from emrun.geometry import Roi

    stopping = BlockStops(Path(folder) / STOP, Path(folder))
    work = load_work(folder)

    def process(block: Any) -> None:
        roi = block.write_roi
        with leaving_user_errors(Path(folder)):
            for index in work.run_at(Roi(roi.offset, roi.shape)):
                if stopping():  # a stop within a run: the scheduler keeps nothing of it
                    return
                write_block(Path(folder), work, index)

    stopping.serve(daisy.Client(), process)


if __name__ == "__main__":  # a worker started through --launch
    launched_main(serve)
