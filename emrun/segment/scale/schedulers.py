"""Handing a step's blocks to workers: ``local`` worker processes on this machine, or daisy
workers (extra ``emrun[daisy]``) started here or through ``--launch`` (e.g. ``srun -c 2``)
on other machines that share the output folder and the database.

Both skip blocks whose done-marker exists and leave one after each finished block, so a job
started by one scheduler can be finished by the other. Steps run one after another: a
block's graph reads its neighbours' fragments, so every fragment is written first.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ...devices import daisy_package, launch_failure, launched_main, launched_workers, run_through
from ...errors import UserError
from ...geometry import Zyx, zyx
from ...subprocesses import die_with_parent, killed_by
from .job import ScaleJob
from .steps import _store, run_block
from .steps import forget_caches as forget_block_caches

__all__ = ["forget_caches", "local_pool", "run_step"]

Report = Callable[[str, int, int], None]


@contextmanager
def local_pool(scheduler: str, workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """The worker processes every step of a local job shares (started once: each imports
    emrun); None where blocks run in this process (one worker) or on daisy's workers."""
    if scheduler != "local" or workers == 1:
        yield None
        return
    context = multiprocessing.get_context("spawn")  # no fork of zarr's or torch's threads
    with ProcessPoolExecutor(workers, mp_context=context, initializer=die_with_parent,
                             initargs=(os.getpid(),)) as pool:  # no orphans after a kill -9
        yield pool


def run_step(job: ScaleJob, step: str, blocks: Sequence[Zyx], *, scheduler: str,
             workers: int, launch: str | None, pool: ProcessPoolExecutor | None,
             on_block: Report | None) -> Counter[str]:
    """Run ``step`` on ``blocks`` (the pending ones) in ``pool`` (`local_pool`), here, or on
    daisy; returns seconds summed by part (daisy workers keep theirs)."""
    job_file = str(job.job_file)
    if scheduler == "daisy":
        _run_daisy(job, step, workers, launch)
        if on_block is not None:
            on_block(step, len(blocks), len(blocks))
        return Counter()
    return _run_local(job_file, step, blocks, pool, on_block)


def _run_local(job_file: str, step: str, blocks: Sequence[Zyx],
               pool: ProcessPoolExecutor | None, on_block: Report | None) -> Counter[str]:
    seconds: Counter[str] = Counter()
    total = len(blocks)
    if pool is None:
        for i, index in enumerate(blocks):
            seconds.update(run_block(job_file, step, index))
            if on_block is not None:
                on_block(step, i + 1, total)
        return seconds
    pending = {pool.submit(run_block, job_file, step, index) for index in blocks}
    done = 0
    try:
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
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
        for future in pending:
            future.cancel()
    return seconds



def _run_daisy(job: ScaleJob, step: str, workers: int, launch: str | None) -> None:
    daisy = daisy_package()
    from daisy.logging import set_log_basedir

    set_log_basedir(job.folder / "daisy-logs")
    job_file = str(job.job_file)
    block = daisy.Roi((0, 0, 0), job.block)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # daisy frowns on check_function
        task = daisy.Task(
            f"emrun-segment-{step}", total_roi=daisy.Roi((0, 0, 0), job.shape),
            read_roi=block, write_roi=block,
            process_function=functools.partial(_start_worker, job_file, step, launch),
            check_function=functools.partial(_block_is_done, job_file, step),
            read_write_conflict=False, fit="shrink", max_workers=workers, max_retries=2)
    with launched_workers(launch, Path(job_file).parent):
        states = daisy.run_blockwise([task], progress=False, block_tracking=False,
                                     return_states=True, summary=False)
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


@functools.cache
def _graph_done(job_file: str) -> frozenset[int]:
    job = ScaleJob.load(job_file)
    return frozenset(_store(job.db).done_blocks())


@functools.cache
def _agglomerated(db: str, key: str) -> frozenset[int]:
    return frozenset(_store(db).agglomerated_blocks(key))


def forget_caches() -> None:
    """Drop every cache this process keeps for a job's blocks (`steps.forget_caches`) and
    daisy's done-checks: a new run (or a resumed one) must see what is done now."""
    forget_block_caches()
    _graph_done.cache_clear()
    _agglomerated.cache_clear()


def _block_is_done(job_file: str, step: str, block: Any) -> bool:
    job = ScaleJob.load(job_file)
    index = _index(job, block.write_roi)
    if step == "graph":
        return job.block_id(index) in _graph_done(job_file)
    if step == "agglomerate":
        from .steps import levels_key

        return job.block_id(index) in _agglomerated(job.db, levels_key(job))
    if step == "relabel":
        from .steps import lut_key

        return job.is_done(f"relabel-{lut_key(job)}", index)
    return job.is_done(step, index)


def _start_worker(job_file: str, step: str, launch: str | None) -> None:
    """daisy's worker function: serve blocks here, or start a server through ``launch``."""
    if launch:
        run_through(launch, "emrun.segment.scale.schedulers", [job_file, step],
                    Path(job_file).parent)
        return
    serve(job_file, step)


def serve(job_file: str, step: str) -> None:
    """Take blocks from the daisy scheduler until none are left."""
    daisy = daisy_package()
    job = ScaleJob.load(job_file)
    client = daisy.Client()
    while True:
        with client.acquire_block() as block:
            if block is None:
                return
            run_block(job_file, step, _index(job, block.write_roi))


if __name__ == "__main__":  # a worker started through --launch
    launched_main(serve)
