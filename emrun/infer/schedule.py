"""Running an inference job: in this process, in local worker processes, or under daisy.

``local`` (the default) starts one worker process per device (each GPU; on a CPU, ``workers``
processes sharing the cores) that loads the model once and pulls blocks from a queue; with a
single worker it runs in this process. ``daisy`` hands the same worker to daisy's blockwise
scheduler (see ``daisy_scheduler``). All of them skip blocks with a done-marker and write one
after each finished block, so any of them can resume a job another started.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import multiprocessing as mp
import os
import queue
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..devices import available_memory, cpu_cores, parse_device, require_visible
from ..errors import UserError
from ..recipe import Recipe
from .job import Job, prepare_job
from .plan import Tiling, Zyx, choose_tiling, units
from .worker import BlockDone, BlockWorker

Scheduler = Literal["local", "daisy"]


@dataclass
class Progress:
    """Counts for the progress display and the final summary."""

    done: int = 0
    skipped: int = 0
    total: int = 0
    voxels: int = 0
    patches: int = 0  # forward-passed; the lattice's count when no patch is predicted twice
    seconds: float = 0.0

    def add(self, block: BlockDone, started: float) -> None:
        self.done += 1
        self.voxels += block.voxels
        self.patches += block.patches
        self.seconds = time.perf_counter() - started


def run_inference(recipe: Recipe, checkpoint: Path, input_path: str, output: Path, *,
                  block: Zyx | None = None, device: str | None = None, tta: int | None = None,
                  resume: bool = False, mask_path: str | None = None,
                  workers: int | None = None, scheduler: Scheduler = "local",
                  launch: str | None = None, roi: tuple[Zyx, Zyx] | None = None,
                  on_block: Callable[[Progress], None] | None = None) -> Progress:
    """Predict ``input_path`` (or its ``roi``: offset, shape) into ``output`` (one array
    per task); returns the counts."""
    if launch is not None and scheduler != "daisy":
        raise UserError("--launch is for --scheduler daisy (workers started by a command)")
    # Devices are checked before any output exists; daisy workers resolve theirs where they
    # run (the scheduler's own machine, a login node say, may have no GPU at all).
    slots = worker_slots(device, workers) if scheduler == "local" else []
    _check_device(device, workers)
    job = prepare_job(recipe, checkpoint, input_path, output, block=block, tta=tta,
                      resume=resume, mask_path=mask_path, roi=roi)
    if scheduler == "daisy":
        from .daisy_scheduler import run_daisy

        return run_daisy(job, device or "auto", workers or 1, launch=launch,
                         on_block=on_block)
    return run_local(job, slots, on_block=on_block)


def _check_device(device: str | None, workers: int | None) -> torch.device:
    """The device named (default: a GPU when there is one), and a sane worker count."""
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be at least 1 (got {workers})")
    return parse_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def worker_slots(device: str | None, workers: int | None) -> list[tuple[str, int]]:
    """(device, CPU threads) for each worker: one per GPU by default, one on a CPU."""
    dev = _check_device(device, workers)
    name = str(dev)
    cores = cpu_cores()
    if dev.type == "cuda":
        require_visible(dev, name)
        gpus = [dev.index] if dev.index is not None else list(range(torch.cuda.device_count()))
        count = workers or len(gpus)
        threads = max(1, cores // count)
        return [(f"cuda:{gpus[i % len(gpus)]}", threads) for i in range(count)]
    count = workers or 1
    return [(str(dev), max(1, cores // count))] * count


ModelFactory = Callable[[Recipe], torch.nn.Module]
"""Builds the network a worker uses instead of the checkpoint's (a module-level function,
so that spawned workers can receive it); ``emrun bench infer --no-model`` passes a stand-in."""


def run_local(job: Job, slots: list[tuple[str, int]],
              on_block: Callable[[Progress], None] | None = None,
              model: ModelFactory | None = None) -> Progress:
    """Predict the job's pending blocks with ``slots`` workers pulling from one queue."""
    pending = job.pending()
    progress = Progress(total=len(job.layout.block_grid()))
    progress.skipped = progress.total - len(pending)
    started = time.perf_counter()

    def done(block: BlockDone) -> None:
        progress.add(block, started)
        if on_block is not None:
            on_block(progress)

    groups = job_units(job, pending, len(slots), slots[0][0])
    if len(slots) == 1 and pending:
        device = torch.device(slots[0][0])
        _worker(job, device, model).run_units(groups, done)
    elif pending:
        _run_processes(job, slots, groups, done, model)
    return progress


def job_units(job: Job, blocks: list[Zyx], workers: int, device: str | None = None
              ) -> list[list[Zyx]]:
    """``blocks`` in units for ``workers`` workers on ``device``."""
    return units(job.layout, blocks, job_tiling(job, workers, device))


def job_tiling(job: Job, workers: int, device: str | None = None) -> Tiling:
    """Units as large as the hand-over budget allows, at least one per worker."""
    channels = sum(job.recipe.head_channels().values())
    return choose_tiling(job.layout, channels, workers,
                         handover_budget(job, device, workers))


HANDOVER_BYTES = 1 << 30
"""Partial sums a worker may hold for hand-over at least (see ``handover_budget``)."""


def handover_budget(job: Job, device: str | None = None, workers: int = 1) -> int:
    """Bytes of partial sums a worker may keep for later blocks of its unit: an eighth of
    its GPU's memory, or on a CPU an eighth of the available memory shared by ``workers``;
    at least ``HANDOVER_BYTES`` and one block's float32 accumulator (held anyway). Units
    below the volume's size cost duplicates at their borders, so the budget is generous."""
    channels = sum(job.recipe.head_channels().values())
    budget = max(HANDOVER_BYTES, 4 * channels * math.prod(job.layout.block))
    dev = torch.device(device) if device and device != "auto" else None
    if dev is not None and dev.type == "cuda":
        if torch.cuda.is_available():
            memory = torch.cuda.get_device_properties(dev.index or 0).total_memory
            budget = max(budget, memory // 8)
    else:
        budget = max(budget, available_memory() // (8 * max(1, workers)))
    return budget


def _worker(job: Job, device: torch.device, model: ModelFactory | None) -> BlockWorker:
    if model is None:
        return BlockWorker(job, device)
    return BlockWorker(job, device, model=model(job.recipe).to(device).eval())


def _run_processes(job: Job, slots: list[tuple[str, int]], groups: list[list[Zyx]],
                   done: Callable[[BlockDone], None], model: ModelFactory | None) -> None:
    """Spawned workers pull units from a queue and report each finished block."""
    context = mp.get_context("spawn")
    tasks = context.Queue()
    results = context.Queue()
    for group in groups:
        tasks.put(group)
    for _ in slots:
        tasks.put(None)
    processes = [context.Process(target=_worker_main, daemon=True,
                                 args=(job.to_json(), device, threads, tasks, results, model,
                                       os.getpid()))
                 for device, threads in slots]
    for process in processes:
        process.start()
    finished = 0
    try:
        while finished < len(processes):
            try:
                kind, payload = results.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in processes if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(
                        f"an inference worker died (exit code {dead[0].exitcode}); finished "
                        "blocks are kept: run again with --resume") from None
                continue
            if kind == "done":
                done(payload)
            elif kind == "exit":
                finished += 1
            elif kind == "user":
                raise UserError(payload)
            else:
                raise RuntimeError(f"an inference worker failed:\n{payload}")
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join()


PR_SET_PDEATHSIG = 1  # prctl(2)


def die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when the process that started it dies (Linux), so
    that a killed `emrun infer` leaves no worker writing behind it for a resume to race."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the request took effect
        os._exit(1)


def _worker_main(job_json: str, device: str, threads: int, tasks: mp.Queue,
                 results: mp.Queue, model: ModelFactory | None, parent: int) -> None:
    """A worker process: build the model once, then take units until the queue says stop."""
    die_with_parent(parent)
    torch.set_num_threads(threads)

    def groups():  # type: ignore[no-untyped-def]
        while (group := tasks.get()) is not None:
            yield [tuple(block) for block in group]

    try:
        worker = _worker(Job.from_json(job_json), torch.device(device), model)
        worker.run_units(groups(), lambda block: results.put(("done", block)))
        results.put(("exit", None))
    except UserError as exc:
        results.put(("user", str(exc)))
    except BaseException:
        results.put(("internal", traceback.format_exc()))
