"""`emrun bench data`: how fast the training data pipeline delivers samples.

Two measurements in one run: per-stage cost (sampling/reading, each augmentation, targets)
in this process on one core, and end-to-end throughput with the requested worker count.

The worker count is checked first (`check_workers`: at most ``WORKERS_PER_CORE`` per core and
what the memory holds), and the loader's worker processes are stopped however the run ends:
a loader that fails to start (e.g. "can't start new thread") or an interrupt would otherwise
leave workers that ignore SIGTERM (they leave signals to this process) and that the
interpreter waits for at exit, for ever.
"""

from __future__ import annotations

import contextlib
import errno
import multiprocessing
import os
import platform
import statistics
import time
import warnings
from collections.abc import Iterator
from typing import Any

from threadpoolctl import threadpool_limits

from ..capacity import size_text
from ..data.loader import train_batches, unpack
from ..data.samples import SampleMaker, batch_rng
from ..data.synthetic import with_synthetic_sources
from ..devices import available_memory, cpu_cores
from ..errors import Interrupted, UserError
from ..geometry import Roi
from ..recipe import Recipe
from .workdir import stop_zarr_io

WORKERS_PER_CORE = 4
"""More loader workers than this per CPU core only contend for the cores (and each is a
process with its own memory): a typo, refused."""
WORKER_MEMORY = 256 * 2**20
"""Memory a loader worker process takes of its own (its sample maker, volume caches and
prefetched batches; about 200 MB with small recipes), rounded up."""


def stage_costs(recipe: Recipe, samples: int, *, keep_memory: bool = True
                ) -> tuple[dict[str, float], list[float]]:
    """Mean ms per sample of each stage, and each sample's total ms, in this process on one
    core (as a loader worker runs; ``keep_memory``: as a worker keeps freed sample memory,
    which is process-wide for good, so not before timing the trainer's own loader)."""
    with threadpool_limits(1):
        return _stage_costs(recipe, samples, keep_memory)


def _stage_costs(recipe: Recipe, samples: int, keep_memory: bool
                 ) -> tuple[dict[str, float], list[float]]:
    maker = SampleMaker(recipe, keep_memory=keep_memory)
    _warm_sources(maker)
    maker.sample(batch_rng(recipe.seed, 1 << 20, 0))  # warm-up (another rank's stream)
    maker.timings = {}
    totals = []
    for index in range(samples):
        rng = batch_rng(recipe.seed, 0, index)
        start = time.perf_counter()
        maker.sample(rng)
        totals.append((time.perf_counter() - start) * 1e3)
    per_stage = {name: seconds * 1e3 / samples for name, seconds in maker.timings.items()}
    return per_stage, totals


def _warm_sources(maker: SampleMaker) -> None:
    """Read one voxel of every volume of every source: a synthetic source is generated on
    its first read (seconds, once per process) and a file opened; one warm-up sample draws
    from one source only, so another's first read would be timed as a sample's read (the
    demo's two sources: 'read 1314 ms' per sample where the median sample took 2 ms)."""
    for source in maker.sources:
        one = Roi(source.box.offset, (1, 1, 1))
        for volume in (source.image, source.labels, source.mask, *source.semantic.values()):
            if volume is not None:
                volume.read(one)


def check_workers(workers: int) -> None:
    """Refuse, in one line, more loader workers than ``WORKERS_PER_CORE`` per CPU core this
    process may use, or than the machine's available memory holds (``WORKER_MEMORY`` each).
    A limit on this process's address space is not one on its workers' (each is a process
    of its own); what it costs here (a thread per worker) is reported if starting fails."""
    cores = cpu_cores()
    most = WORKERS_PER_CORE * cores
    if workers > most:
        raise UserError(f"{workers} loader workers (--workers or train.workers) are more than "
                        f"{WORKERS_PER_CORE} per CPU core this process may use ({cores}): "
                        f"give at most {most}")
    # the machine's memory, not this process's address space: each worker is a process
    need, room = workers * WORKER_MEMORY, available_memory()
    if need > room:
        raise UserError(f"{workers} loader workers (--workers or train.workers) would need "
                        f"about {size_text(need)} of memory ({size_text(WORKER_MEMORY)} "
                        f"each); {size_text(room)} is free: give at most "
                        f"{max(0, room // WORKER_MEMORY)}")


def loader_batches(recipe: Recipe, samples: int) -> int:
    """The batches `throughput` times for about ``samples`` samples (at least one)."""
    return max(1, samples // recipe.train.batch_size)


def throughput(recipe: Recipe, workers: int, samples: int) -> tuple[float, float]:
    """Samples per second through the real loader (after every worker has made its first
    batch), and the ms per sample to unpack targets to float on this CPU (on a GPU the
    trainer does that on the device; `unpack_ms`)."""
    try:
        with _loader(recipe, workers) as batches:
            for _ in range(max(workers, 1)):  # warm-up: worker start, volume generation
                next(batches)  # or opening
            count = loader_batches(recipe, samples)
            received = []
            start = time.perf_counter()
            for _ in range(count):
                received.append(next(batches))
                if len(received) > 2:
                    received.pop(0)
            elapsed = time.perf_counter() - start
    except (RuntimeError, OSError, MemoryError) as exc:
        if not workers or not _out_of_resources(exc):
            raise
        raise UserError(f"{workers} loader workers ran out of threads, processes or memory "
                        f"({exc}): this machine or its limits (ulimit -u, -v) allow fewer; "
                        "give fewer --workers") from None
    return count * recipe.train.batch_size / elapsed, unpack_ms(received[-1], recipe)


def unpack_ms(batch: dict[str, Any], recipe: Recipe, repeats: int = 5) -> float:
    """Median ms per sample to unpack a batch, after one untimed call: the first pays
    torch's one-off set-up (40 ms per sample against 0.3 ms after, for the demo's)."""
    unpack(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        unpack(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3 / recipe.train.batch_size


@contextlib.contextmanager
def _loader(recipe: Recipe, workers: int) -> Iterator[Iterator[dict[str, Any]]]:
    """The training stream with ``workers`` processes; on leaving, however (an error while
    the workers start, an interrupt), the stream is closed and any worker process it started
    that is still there is killed (they ignore SIGTERM). torch's warning about more workers
    than cores is not shown: `check_workers` has bounded the count."""
    before = set(multiprocessing.active_children())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="This DataLoader will create",
                                category=UserWarning)
        batches = train_batches(recipe, workers=workers, pin_memory=False)
        try:
            yield batches
        except BaseException as exc:
            _disown_unstarted(exc)
            raise
        finally:
            try:
                batches.close()  # shuts the workers down, when they all started
            finally:
                _kill_new_children(before)


def _disown_unstarted(exc: BaseException) -> None:
    """A loader iterator whose start ``exc`` cut short (found in its traceback) has started
    workers that only it knows of: take them off torch's watch (its SIGCHLD handler would
    report their killing as an error) and mark it shut down (its ``__del__`` would try again
    what failed, printing a traceback); `_kill_new_children` stops the workers."""
    from torch.utils.data import dataloader
    from torch.utils.data._utils import signal_handling

    tb = exc.__traceback__
    while tb is not None:
        it = tb.tb_frame.f_locals.get("self")
        if isinstance(it, dataloader._MultiProcessingDataLoaderIter):
            with contextlib.suppress(Exception):
                if getattr(it, "_worker_pids_set", False):
                    signal_handling._remove_worker_pids(id(it))
                    it._worker_pids_set = False
                it._shutdown = True
            return
        tb = tb.tb_next


def _kill_new_children(before: set[Any]) -> None:
    """Kill and reap the child processes started since ``before`` was taken."""
    for child in set(multiprocessing.active_children()) - before:
        child.kill()
    for child in set(multiprocessing.active_children()) - before:
        child.join(timeout=5)


def _out_of_resources(exc: BaseException) -> bool:
    """Whether ``exc`` says the machine ran out of threads, processes or memory."""
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, OSError):
        return exc.errno in (errno.EAGAIN, errno.ENOMEM)
    return "can't start new thread" in str(exc)


def _names(specs: Any) -> list[str]:
    """Every augmentation type in a stack, combinators' members included."""
    names = []
    for spec in specs:
        names.append(spec.type)
        names += _names(getattr(spec, "of", []))
    return names


def bench_data(recipe: Recipe, *, synthetic: bool, workers: int, samples: int) -> dict[str, Any]:
    """The figures `emrun bench data` reports."""
    check_workers(workers)
    if synthetic:
        recipe = with_synthetic_sources(recipe)
    try:
        # workers 0: the trainer makes its samples without kept memory (`SampleMaker`)
        per_stage, totals = stage_costs(recipe, samples, keep_memory=workers > 0)
        rate, unpack_cost = throughput(recipe, workers, samples)
    except KeyboardInterrupt:
        stop_zarr_io()  # a read cut short goes on in zarr's thread, and is logged at exit
        raise Interrupted("SIGINT", "bench data stopped before its figures were complete; "
                          "its loader workers were stopped") from None
    augment_names = set(_names(recipe.augment))
    per_aug = {k: round(v, 3) for k, v in per_stage.items() if k in augment_names}
    return {
        "recipe": recipe.name,
        "patch": list(recipe.train.patch),
        "channels": {name: task.channels() for name, task in recipe.tasks.items()},
        "synthetic": synthetic,
        "workers": workers,
        "samples": samples,  # the stage costs'; the loader's rate is timed over whole batches
        "loader_samples": loader_batches(recipe, samples) * recipe.train.batch_size,
        "samples_per_s": round(rate, 3),
        "ms_per_sample": round(1e3 / rate, 3),
        "median_ms_per_sample_one_core": round(statistics.median(totals), 3),
        "read_ms": round(per_stage.get("sample", 0.0), 3),
        "targets_ms": round(per_stage.get("targets", 0.0), 3),
        "per_target_ms": {name: round(per_stage.get(f"target:{name}", 0.0), 3)
                          for name in recipe.tasks},
        "cpu_unpack_ms": round(unpack_cost, 3),
        "per_augmentation_ms": per_aug,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
    }
