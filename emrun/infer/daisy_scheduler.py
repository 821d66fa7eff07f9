"""The daisy scheduler (extra ``emrun[daisy]``): the same block worker, many machines.

emrun's layout becomes one daisy task over the volume in voxels: daisy's write ROI is one
emrun *unit* (a box of blocks one worker predicts in order, handing partial sums from block
to block; ``plan.units``), its read ROI the same (a worker reads its own context, and units
never share a chunk, so there are no read/write conflicts). daisy asks ``_block_is_done``
before handing a unit out, which reads emrun's own per-block done-markers, and daisy's own
tracking is off: so a job started with ``--scheduler local`` can be finished by daisy
workers, and back.

Each daisy worker is a process that builds the model once and serves blocks until daisy has
none left. With ``launch`` (e.g. ``srun --gres=gpu:1 -c 8``) each worker is started through
that command instead, on whatever node it lands, and connects back to this scheduler through
the ``DAISY_CONTEXT`` environment variable daisy sets (the nodes must share the filesystem
and the Python environment).

SIGTERM or SIGINT (Ctrl-C) stops the run between blocks, in one line (`Stopped`): the
scheduler makes a stop file that every worker checks before a block, each worker notes
the group's signal itself, a worker waiting on ``--launch`` leaves it to the launched one,
and daisy's own way with SIGINT (its run ended at once) is taken as the same stop
(`emrun.devices.daisy_stops`, `emrun.devices.BlockStops`).
"""

from __future__ import annotations

import functools
import itertools
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..devices import (
    BlockStops,
    WorkerFailed,
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
from ..errors import UserError
from ..geometry import Zyx, zyx
from ..subprocesses import die_with_parent, killed_by
from .job import Job
from .plan import best_order
from .schedule import Progress, Stopped, worker_died
from .worker import BlockWorker

UNIT_TIMEOUT_S = 30 * 24 * 3600.0
"""daisy's limit on one daisy block, which is a whole emrun unit here: as many blocks as the
hand-over budget allows, hours of work on a large volume. daisy's default (600 s) killed
every unit slower than that, retried it twice and failed the job."""


def run_daisy(job: Job, device: str, workers: int, *, launch: str | None = None,
              on_block: Callable[[Progress], None] | None = None) -> Progress:
    """Run the job's pending blocks as a daisy blockwise task with ``workers`` workers;
    ``device`` ("auto", "cpu", "cuda", "cuda:1") is resolved by each worker."""
    daisy = daisy_package()
    from daisy.logging import set_log_basedir

    job_file = job.save()
    set_log_basedir(job.done_dir / "daisy-logs")  # not the user's working directory
    grid = job.layout.block_grid()
    before = {b for b in grid if job.is_done(b)}
    if len(before) == len(grid):  # a --resume of a finished run: no worker to start
        progress = Progress(total=len(grid), skipped=len(grid))
        if on_block is not None:
            on_block(progress)
        return progress
    planned = Progress(total=len(grid), skipped=len(before))
    tiling, budget = planned.plan(job, workers, device), planned.handover
    if on_block is not None:  # the plan, before any block
        on_block(planned)
    unit_voxels = tuple(u * b for u, b in zip(tiling.unit, job.layout.block, strict=True))
    # Local workers share this machine's cores; launched ones use what their node gives them.
    threads = 0 if launch else max(1, cpu_cores() // workers)
    worker = functools.partial(_start_worker, str(job_file), device, threads, budget, launch)
    stop_file = _stop_file(job)
    stop_file.unlink(missing_ok=True)  # a stopped run's, not this one's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # daisy frowns on check_function
        task = daisy.Task(
            "emrun-infer", total_roi=daisy.Roi((0, 0, 0), job.layout.shape),
            read_roi=daisy.Roi((0, 0, 0), unit_voxels),
            write_roi=daisy.Roi((0, 0, 0), unit_voxels),
            process_function=worker,
            check_function=functools.partial(_block_is_done, str(job_file)),
            read_write_conflict=False, fit="shrink", max_workers=workers, max_retries=2,
            timeout=UNIT_TIMEOUT_S)
    started = time.perf_counter()
    try:
        with launched_workers(launch, job_file.parent), daisy_stops(stop_file) as caught:
            states = daisy.run_blockwise([task], progress=on_block is None,
                                         block_tracking=False, return_states=True,
                                         summary=False)
    except WorkerFailed as exc:  # a bad input chunk, say: as the local scheduler says it
        if "--resume" in str(exc):
            raise
        progress = marked_progress(job, before)
        raise UserError(f"{exc}; {progress.done + progress.skipped} of {len(grid)} blocks "
                        "are done and kept: once that is fixed, continue with --resume"
                        ) from None
    progress = marked_progress(job, before)
    progress.seconds = time.perf_counter() - started
    progress.plan(job, workers, device)  # the same plan (the tiling is cached)
    if caught:  # the blocks finished are marked (daisy ends a Ctrl-C'd block unmarked);
        raise Stopped(caught[0], progress)  # the stop file stays for launched workers
    stop_file.unlink(missing_ok=True)
    if on_block is not None:
        on_block(progress)
    missing = len(grid) - progress.done - progress.skipped
    if missing:
        state = states.get("emrun-infer")
        error = getattr(state, "last_worker_error", None) or "no error reported"
        if launch:
            raise UserError(launch_failure(launch, error))
        if (number := killed_by(error)) is not None:
            raise worker_died(-number)
        raise RuntimeError(f"daisy finished with {missing} of {len(grid)} blocks not done "
                           f"({error.strip().splitlines()[-1]}); finished blocks are kept: run "
                           "again with --resume")
    return progress


def unit_blocks(job: Job, roi: Any) -> list[Zyx]:
    """emrun's blocks inside a daisy block's write ROI (one unit), in the unit's order."""
    start = [int(o) // b for o, b in zip(roi.offset, job.layout.block, strict=True)]
    stop = [-(-(int(o) + int(s)) // b) for o, s, b in zip(
        roi.offset, roi.shape, job.layout.block, strict=True)]
    order = best_order(job.layout, [e - a for a, e in zip(start, stop, strict=True)])
    blocks = itertools.product(*(range(a, e) for a, e in zip(start, stop, strict=True)))
    return sorted(map(zyx, blocks), key=lambda b: tuple(b[a] for a in order))


@functools.cache
def _job(job_file: str) -> Job:
    return Job.from_json(Path(job_file).read_text())


def marked_progress(job: Job, before: set[Zyx]) -> Progress:
    """The counts of the blocks done since ``before`` (those done already), read from their
    done-markers: daisy's workers tell the scheduler nothing else, so a skipped block (masked
    out or blank) and a block's count of non-finite outputs travel there (`Job.mark_done`),
    and the closing line says what the local scheduler's does."""
    grid = job.layout.block_grid()
    progress = Progress(total=len(grid), skipped=len(before))
    for block in grid:
        if block not in before and job.is_done(block):
            progress.done += 1
            progress.voxels += job.layout.write_box(block).size
            progress.empty += job.is_empty(block)
            nonfinite = job.nonfinite(block)
            progress.nonfinite += nonfinite
            progress.nonfinite_blocks += nonfinite > 0
    return progress


def _block_is_done(job_file: str, block: Any) -> bool:
    """Asked by daisy before it hands a unit out: done when all its blocks are, or (none
    is handed out once the run is stopped, or a worker met a user error) when the stop
    file or the worker's error exists."""
    job = _job(job_file)
    return _stop_file(job).exists() or worker_failed(job.done_dir) or all(
        job.is_done(b) for b in unit_blocks(job, block.write_roi))


STOP = "stop"


def _stop_file(job: Job) -> Path:
    """Made when the scheduler is stopped (SIGTERM, SIGINT): workers, here or on other
    nodes sharing the filesystem, stop between blocks instead of finishing their unit."""
    return job.done_dir / STOP


def _start_worker(job_file: str, device: str, threads: int, budget: int, launch: str | None
                  ) -> None:
    """daisy's worker function: serve blocks here, or start a server through ``launch``
    (``budget``: the hand-over budget the units were chosen for)."""
    if launch:
        run_through(launch, "emrun.infer.daisy_scheduler",
                    [job_file, device, str(threads), str(budget)],
                    Path(job_file).parent)
        return
    die_with_parent(os.getppid())  # they wrote on after a SIGTERM had killed the scheduler
    with leaving_user_errors(Path(job_file).parent):  # the scheduler says it, once
        serve(job_file, device, threads, budget)


def serve(job_file: str, device: str, threads: int, budget: int = 0) -> None:
    """Build the model once, then predict the blocks daisy hands out until none are left
    or the scheduler is stopped."""
    daisy = daisy_package()
    torch.set_num_threads(threads or cpu_cores())
    # Ctrl-C or SIGTERM to the group (srun passes them on), noted from here on: one while
    # the job was read or the model built ended the worker with a KeyboardInterrupt
    # traceback. The job file lies in its done-marker folder (`Job.save`).
    folder = Path(job_file).parent
    stopping = BlockStops(folder / STOP, folder)
    job = _job(job_file)
    worker_id = int(daisy.Context.from_env().get("worker_id", 0))
    worker = BlockWorker(job, worker_device(device, worker_id))

    def process(block: Any) -> None:
        blocks = [b for b in unit_blocks(job, block.write_roi) if not job.is_done(b)]
        with leaving_user_errors(job.done_dir):  # not as a failed unit (a traceback)
            worker.run_units([blocks], stop=stopping, budget=budget)

    stopping.serve(daisy.Client(), process)


def worker_device(device: str, worker_id: int) -> torch.device:
    """The device of daisy worker ``worker_id`` on the machine it runs on: "auto" is a GPU
    when there is one; "cuda" spreads workers over the visible GPUs; an index is kept."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and torch.cuda.is_available():
        return torch.device(f"cuda:{worker_id % torch.cuda.device_count()}")
    return torch.device(device)


if __name__ == "__main__":  # a worker started through --launch
    launched_main(lambda job_file, device, threads, budget: serve(
        job_file, device, int(threads), int(budget)))
