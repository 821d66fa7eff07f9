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
"""

from __future__ import annotations

import functools
import itertools
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..devices import cpu_cores, daisy_package, launch_failure, launched_workers, run_launched
from ..errors import UserError
from ..geometry import Zyx, zyx
from .job import Job
from .plan import best_order
from .schedule import Progress, job_tiling
from .worker import BlockWorker


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
    tiling = job_tiling(job, workers, device)
    unit_voxels = tuple(u * b for u, b in zip(tiling.unit, job.layout.block, strict=True))
    # Local workers share this machine's cores; launched ones use what their node gives them.
    threads = 0 if launch else max(1, cpu_cores() // workers)
    worker = functools.partial(_start_worker, str(job_file), device, threads, launch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # daisy frowns on check_function
        task = daisy.Task(
            "emrun-infer", total_roi=daisy.Roi((0, 0, 0), job.layout.shape),
            read_roi=daisy.Roi((0, 0, 0), unit_voxels),
            write_roi=daisy.Roi((0, 0, 0), unit_voxels),
            process_function=worker,
            check_function=functools.partial(_block_is_done, str(job_file)),
            read_write_conflict=False, fit="shrink", max_workers=workers, max_retries=2)
    started = time.perf_counter()
    with launched_workers(launch):
        states = daisy.run_blockwise([task], progress=on_block is None, block_tracking=False,
                                     return_states=True, summary=False)
    progress = Progress(total=len(grid), skipped=len(before))
    for block in grid:
        if block not in before and job.is_done(block):
            progress.done += 1
            progress.voxels += job.layout.write_box(block).size
    progress.seconds = time.perf_counter() - started
    if on_block is not None:
        on_block(progress)
    missing = len(grid) - progress.done - progress.skipped
    if missing:
        state = states.get("emrun-infer")
        error = getattr(state, "last_worker_error", None) or "no error reported"
        if launch:
            raise UserError(launch_failure(launch, error))
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


def _block_is_done(job_file: str, block: Any) -> bool:
    job = _job(job_file)
    return all(job.is_done(b) for b in unit_blocks(job, block.write_roi))


def _start_worker(job_file: str, device: str, threads: int, launch: str | None) -> None:
    """daisy's worker function: serve blocks here, or start a server through ``launch``."""
    if launch:
        run_launched(launch, "emrun.infer.daisy_scheduler", job_file, device, str(threads))
        return
    serve(job_file, device, threads)


def serve(job_file: str, device: str, threads: int) -> None:
    """Build the model once, then predict the blocks daisy hands out until none are left."""
    daisy = daisy_package()
    torch.set_num_threads(threads or cpu_cores())
    job = _job(job_file)
    worker_id = int(daisy.Context.from_env().get("worker_id", 0))
    worker = BlockWorker(job, worker_device(device, worker_id))
    client = daisy.Client()
    while True:
        with client.acquire_block() as block:
            if block is None:
                return
            worker.run([b for b in unit_blocks(job, block.write_roi) if not job.is_done(b)])


def worker_device(device: str, worker_id: int) -> torch.device:
    """The device of daisy worker ``worker_id`` on the machine it runs on: "auto" is a GPU
    when there is one; "cuda" spreads workers over the visible GPUs; an index is kept."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and torch.cuda.is_available():
        return torch.device(f"cuda:{worker_id % torch.cuda.device_count()}")
    return torch.device(device)


if __name__ == "__main__":  # a worker started through --launch
    serve(sys.argv[1], sys.argv[2], int(sys.argv[3]))
