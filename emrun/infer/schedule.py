"""Running an inference job's blocks on this machine, and what every scheduler shares.

`run_local` starts one worker process per device (each GPU; on a CPU, ``workers`` processes
sharing the cores) that loads the model once and pulls blocks from a queue; with a single
worker it runs in this process. The progress counts and the grouping of blocks into units
are shared with ``daisy_scheduler``, which hands the same worker to daisy; ``run`` chooses
between the two. Every scheduler skips blocks with a done-marker and writes one after each
finished block, so any of them can resume a job another started.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing as mp
import os
import queue
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..capacity import size_text
from ..devices import (
    available_memory,
    cpu_cores,
    gpu_memory,
    parse_device,
    require_visible,
)
from ..errors import Interrupted, UserError
from ..geometry import Zyx
from ..recipe import Recipe
from ..subprocesses import catching_signals, leave_signals_to, signals_held
from .job import Job
from .plan import Tiling, choose_tiling, repeated, units
from .worker import BlockDone, BlockWorker


@dataclass
class Progress:
    """Counts for the progress display and the final summary."""

    done: int = 0
    skipped: int = 0
    total: int = 0
    voxels: int = 0
    patches: int = 0  # forward-passed (local workers only: daisy's report through markers)
    empty: int = 0  # of those done, blocks outside the mask or of blank input (no chunk)
    nonfinite: int = 0  # NaN or infinite network outputs, blended as 0 (this run's blocks)
    nonfinite_blocks: int = 0  # blocks with any
    seconds: float = 0.0
    unit: Zyx | None = None  # blocks per unit, per axis (None: not planned yet)
    repeated: float = 0.0  # the share of the lattice the units predict again
    handover: int = 0  # the hand-over budget the units were chosen for, bytes per worker
    handover_host: int = 0  # and the host memory beside it (`Carries`)
    workers: int = 1
    alone: float = 0.0  # `repeated` for the units one worker would get in that budget

    def plan(self, job: Job, workers: int, device: str | None) -> Tiling:
        """The units ``workers`` workers group the blocks in (`job_tiling`), recorded with
        their hand-over budget, what they cost, and what one worker's would."""
        tiling = job_tiling(job, workers, device)
        self.unit, self.workers = tiling.unit, workers
        self.handover = handover_budget(job, device, workers)
        self.handover_host = job.handover_host
        self.repeated = repeated(job.layout, tiling.unit)
        self.alone = self.repeated if workers == 1 else repeated(
            job.layout, job_tiling(job, 1, device).unit)
        return tiling

    def add(self, block: BlockDone, started: float) -> None:
        self.done += 1
        self.voxels += block.voxels
        self.patches += block.patches
        self.empty += block.empty
        self.nonfinite += block.nonfinite
        self.nonfinite_blocks += block.nonfinite > 0
        self.seconds = time.perf_counter() - started

    def nonfinite_warning(self) -> str | None:
        """What to say when the network gave NaN or infinite values: they were written as 0
        (in an affinity, a boundary the segmentation splits at), which nothing else shows."""
        if not self.nonfinite:
            return None
        blocks = self.nonfinite_blocks
        return (f"the network output {self.nonfinite} NaN or infinite values in {blocks} "
                f"block{'s' if blocks != 1 else ''}, written as 0 (in affinities: boundaries "
                "the segmentation splits at); an fp16 overflow? Predict again with -o "
                "infer.precision=fp32 (or bf16), or check the checkpoint")


def check_device(device: str | None, workers: int | None) -> torch.device:
    """The device named (default: a GPU when there is one), and a sane worker count."""
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be at least 1 (got {workers})")
    return parse_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def worker_slots(device: str | None, workers: int | None) -> list[tuple[str, int]]:
    """(device, CPU threads) for each worker: one per GPU by default, one on a CPU."""
    dev = check_device(device, workers)
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


class Stopped(Interrupted):
    """SIGTERM or SIGINT arrived: the blocks in flight were finished and marked, no new one
    was started. ``progress`` says how far the job got; the message, what was kept and
    what --resume does next. An `Interrupted`: a command that predicts as one of its steps
    (`demo`) and says nothing of its own stops in one line too, not as an internal error."""

    def __init__(self, signal_name: str, progress: Progress) -> None:
        super().__init__(signal_name, stopped_text(progress.done + progress.skipped,
                                                   progress.total))
        self.progress = progress


def stopped_text(done: int, total: int) -> str:
    """What an interrupted inference kept (``done`` of ``total`` blocks) and what --resume
    does next: with every block done (the signal came after the last one) it only finishes
    the output, and "48 of 48 blocks are done; continue with --resume" read as if blocks
    remained."""
    if done < total:
        return (f"{done} of {total} blocks are done and marked; continue with --resume to "
                "predict the rest")
    every = "the one block is" if total == 1 else f"all {total} blocks are"
    return (f"{every} done and marked, but the output is not "
            "finished (its pyramid and completion mark); --resume predicts nothing again, "
            "only finishes it")


def stop_at_once(progress: Progress) -> contextlib.AbstractContextManager[list[str]]:
    """After the last block (the pyramid build, the completion mark): SIGTERM or SIGINT
    raises `Stopped` at once with ``progress``, as a stop between blocks says it (a Ctrl-C
    there was the generic 'stopped by SIGINT', a SIGTERM ended the process without a word).
    Nothing is lost: --resume goes on with the pyramid's unfinished blocks. Outside the
    main thread nothing is installed."""

    def stop(signal_name: str) -> None:
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # zarr's IO cut short
        raise Stopped(signal_name, progress)

    return catching_signals(stop, first_only=True)


def run_local(job: Job, slots: list[tuple[str, int]],
              on_block: Callable[[Progress], None] | None = None,
              model: ModelFactory | None = None) -> Progress:
    """Predict the job's pending blocks with ``slots`` workers pulling from one queue; a
    SIGTERM or SIGINT stops it between blocks (raises Stopped)."""
    pending = job.pending()
    progress = Progress(total=len(job.layout.block_grid()))
    progress.skipped = progress.total - len(pending)
    started = time.perf_counter()

    def done(block: BlockDone) -> None:
        progress.add(block, started)
        if on_block is not None:
            on_block(progress)

    groups = job_units(job, pending, len(slots), slots[0][0])
    progress.plan(job, len(slots), slots[0][0])
    budget = progress.handover
    if on_block is not None:
        on_block(progress)
    if 0 < len(groups) < len(slots):  # no more workers than units of work to give them
        slots = [(device, max(1, cpu_cores() // len(groups)))
                 for device, _ in slots[:len(groups)]]
    # SIGTERM (a cluster's time limit, `scancel`, `timeout`) and SIGINT are noted, for the
    # workers to see between blocks, instead of killing the process mid-way; the first is
    # said at once (a block of minutes said nothing, and looked ignored), a second stops now.
    in_process = len(slots) == 1

    def on_signal(name: str) -> None:
        if len(caught) == 1:
            print(f"{name}: stopping after the blocks in flight "
                  f"({progress.done + progress.skipped} of {progress.total} done); send it "
                  "again to stop at once (a block cut short is predicted again on --resume)",
                  file=sys.stderr, flush=True)
        elif in_process:  # the block in the main thread is cut short; it has no done-marker
            logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # zarr's IO cut short
            raise Stopped(caught[0], progress)

    with catching_signals(on_signal) as caught:
        def stopping() -> bool:
            return bool(caught)

        try:
            if in_process and pending:
                device = torch.device(slots[0][0])
                _worker(job, device, model).run_units(groups, done, stop=stopping, budget=budget)
            elif pending:
                _run_processes(job, slots, groups, done, model, stopping, budget,
                               at_once=lambda: len(caught) > 1)
        except UserError as exc:  # a bad input chunk, say, found midway
            if "--resume" in str(exc):
                raise
            kept = progress.done + progress.skipped
            raise UserError(f"{exc}; {kept} of {progress.total} blocks are done and kept: "
                            "once that is fixed, continue with --resume") from None
    if caught:
        raise Stopped(caught[0], progress)
    return progress


def job_units(job: Job, blocks: list[Zyx], workers: int, device: str | None = None
              ) -> list[list[Zyx]]:
    """``blocks`` in units for ``workers`` workers on ``device``."""
    return units(job.layout, blocks, job_tiling(job, workers, device))


def job_tiling(job: Job, workers: int, device: str | None = None) -> Tiling:
    """Units whose partial sums fit the hand-over budget (the device's and the host memory
    beside it: `Carries`), at least one per worker, that predict the fewest patches again
    (`choose_tiling`)."""
    channels = sum(job.recipe.head_channels().values())
    return choose_tiling(job.layout, channels, workers,
                         handover_budget(job, device, workers) + job.handover_host)


HANDOVER_BYTES = 1 << 30
"""Partial sums a worker may hold for hand-over at least (see ``handover_budget``)."""


def handover_budget(job: Job, device: str | None = None, workers: int = 1) -> int:
    """Bytes of partial sums a worker may keep for later blocks of its unit: the job's
    (`emrun infer --handover-memory`), else an eighth of its GPU's memory, or on a CPU an
    eighth of the available memory shared by ``workers``; at least ``HANDOVER_BYTES`` and
    one block's float32 accumulator (held anyway). Units below the volume's size cost
    duplicates at their borders, so the budget is generous. No device, or "auto": a GPU
    where this machine has one (daisy workers launched elsewhere: say --handover-memory);
    "auto" read as a CPU gave a GPU job the host's budget."""
    if job.handover is not None:
        return job.handover
    channels = sum(job.recipe.head_channels().values())
    budget = max(HANDOVER_BYTES, 4 * channels * math.prod(job.layout.block))
    if device in (None, "auto"):  # as the workers resolve it (daisy's run where this runs)
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if torch.cuda.is_available():
            budget = max(budget, gpu_memory(dev) // 8)
    else:
        budget = max(budget, available_memory() // (8 * max(1, workers)))
    return budget


def check_handover(handover: int | None, device: str | None, workers: int, host: int = 0
                   ) -> None:
    """Refuse, before any output exists, a hand-over budget the machine cannot hold: on a
    GPU, ``handover`` beyond its memory or ``workers`` times ``host`` beyond the host's
    available memory; on a CPU, where both are host memory, ``workers`` times their sum."""
    if handover is None and not host:
        return
    dev = check_device(device, workers)
    each = f" for each of {workers} workers" if workers > 1 else ""
    if dev.type == "cuda":
        if handover is not None and torch.cuda.is_available() and \
                handover > (memory := gpu_memory(dev)):
            raise UserError(f"--handover-memory {size_text(handover)}: more than "
                            f"{dev}'s {size_text(memory)} of memory")
        if host * workers > (memory := available_memory()):
            raise UserError(f"--handover-host-memory {size_text(host)}{each}: more than the "
                            f"{size_text(memory)} of memory available")
        return
    wanted = (handover or 0) + host
    if wanted * workers > (memory := available_memory()):
        given = " and ".join(f"{flag} {size_text(size)}" for flag, size in (
            ("--handover-memory", handover or 0), ("--handover-host-memory", host)) if size)
        raise UserError(f"{given}{each}: more than the {size_text(memory)} of memory "
                        "available")


def _worker(job: Job, device: torch.device, model: ModelFactory | None) -> BlockWorker:
    if model is None:
        return BlockWorker(job, device)
    return BlockWorker(job, device, model=model(job.recipe).to(device).eval())


def _run_processes(job: Job, slots: list[tuple[str, int]], groups: list[list[Zyx]],
                   done: Callable[[BlockDone], None], model: ModelFactory | None,
                   stopping: Callable[[], bool] = lambda: False, budget: int = 0,
                   at_once: Callable[[], bool] = lambda: False) -> None:
    """Spawned workers pull units from a queue and report each finished block; when
    ``stopping`` turns true they are told to finish their blocks in flight and exit, and
    when ``at_once`` does they are killed (their blocks in flight have no done-marker)."""
    context = mp.get_context("spawn")
    tasks = context.Queue()
    results = context.Queue()
    stop = context.Event()
    for group in groups:
        tasks.put(group)
    for _ in slots:
        tasks.put(None)
    processes = [context.Process(target=_worker_main, daemon=True,
                                 args=(job.to_json(), device, threads, tasks, results, model,
                                       os.getpid(), stop, budget))
                 for device, threads in slots]
    with signals_held():  # a worker still importing must not die of a group's SIGTERM
        for process in processes:
            process.start()
    finished = 0
    try:
        while finished < len(processes):
            if at_once():
                break  # `_wind_down` kills them: no time to finish
            if stopping():
                stop.set()  # the workers ignore the signal itself: they finish and exit
            try:
                kind, payload = results.get(timeout=0.2)
            except queue.Empty:
                dead = [p for p in processes if p.exitcode not in (None, 0)]
                if dead:
                    raise worker_died(dead[0].exitcode) from None
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
        _wind_down(processes, results, stop, 0.0 if at_once() else WIND_DOWN_S)


WIND_DOWN_S = 120.0
"""How long workers told to stop may take to finish their blocks in flight before they are
killed (a worker stuck in a block would otherwise keep the run from ever ending)."""


def _wind_down(processes: list[Any], results: Any, stop: Any,
               wait: float = WIND_DOWN_S) -> None:
    """Stop the workers: they finish their blocks in flight and exit. They ignore SIGTERM
    (signals are the parent's), so ``terminate`` never stopped one: after a worker died the
    others went on through every unit left before the run could report it, and a worker
    blocked on a full results queue that nobody read any more never exited at all. So they
    are told through ``stop``, their results are drained while they finish, and one still
    running after ``wait`` seconds is killed (its block has no done-marker: it is redone)."""
    stop.set()
    deadline = time.monotonic() + wait
    while any(p.is_alive() for p in processes) and time.monotonic() < deadline:
        with contextlib.suppress(queue.Empty, OSError, EOFError):
            results.get(timeout=0.1)
    for process in processes:
        if process.is_alive():
            process.kill()
        process.join()


def worker_died(exitcode: int | None) -> Exception:
    """What to say when a worker process ended without a word. One killed by a signal (the
    out-of-memory killer's kill -9, a user's) is the machine's or the user's doing: one
    line and exit 2, as for memory running out in the process itself (it was exit 1 with
    'This is a bug in emrun'). Any other silent exit is ours (exit 1)."""
    if exitcode is not None and exitcode < 0:
        return UserError(
            f"an inference worker was killed (signal {-exitcode}: the out-of-memory killer, "
            "or kill): finished blocks are kept; continue with --resume (with fewer --workers "
            "or a smaller --block if memory ran out)")
    return RuntimeError(f"an inference worker died (exit code {exitcode}); finished blocks "
                        "are kept: run again with --resume")


def _worker_main(job_json: str, device: str, threads: int, tasks: mp.Queue,
                 results: mp.Queue, model: ModelFactory | None, parent: int,
                 stop: Any, budget: int = 0) -> None:
    """A worker process: build the model once, then take units until the queue (or the
    parent's stop event: signals are the parent's to handle) says stop."""
    leave_signals_to(parent)
    torch.set_num_threads(threads)

    def groups():  # type: ignore[no-untyped-def]
        while not stop.is_set() and (group := tasks.get()) is not None:
            yield [tuple(block) for block in group]

    try:
        worker = _worker(Job.from_json(job_json), torch.device(device), model)
        worker.run_units(groups(), lambda block: results.put(("done", block)),
                         stop=stop.is_set, budget=budget)
        results.put(("exit", None))
    except UserError as exc:
        results.put(("user", str(exc)))
    except BaseException:
        results.put(("internal", traceback.format_exc()))
