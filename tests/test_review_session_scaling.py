"""Review of the session's scaling changes: torch's thread count under overlapping users in
threads of one process (a thread's count is its own once it has used torch; a new thread's
first use takes the last count set anywhere)."""

from __future__ import annotations

import itertools
import math
import random
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from emrun.infer.engine import _one_thread, _pass_pool, _pass_threads
from emrun.infer.plan import Layout

WANTED = 2


@contextmanager
def threads_set(count: int) -> Iterator[None]:
    """The calling thread (and the count new threads start from) at ``count``, put back."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_both(first: Callable[[], None], second: Callable[[], None]) -> None:
    """Run two callables in two threads and wait for both (failing on a hang)."""
    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert not any(thread.is_alive() for thread in threads)


def test_a_thread_that_used_torch_before_runs_on_one_thread_inside():
    """B used torch before A entered (its count is its own, 2): entering while A is inside,
    B must still run on one thread (its single-batch forward passes rounded by 2 threads,
    and its elementwise work was split over them)."""
    ready, a_in, b_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, int] = {}

    def use_a() -> None:
        ready.wait(5)
        with _one_thread(True):
            a_in.set()
            b_out.wait(5)

    def use_b() -> None:
        seen["b before"] = torch.get_num_threads()  # B's own count from here on
        ready.set()
        a_in.wait(5)
        with _one_thread(True):
            seen["b inside"] = torch.get_num_threads()
            seen["b passes"] = _pass_threads()
        seen["b after"] = torch.get_num_threads()
        b_out.set()

    with threads_set(WANTED):
        run_both(use_a, use_b)
    assert seen == {"b before": WANTED, "b inside": 1, "b passes": WANTED, "b after": WANTED}


def test_the_first_to_enter_gets_its_count_back_when_it_leaves_first():
    """A enters, B enters, A leaves, B leaves: A's own count must be back (it stayed at one
    thread for good: only the last to leave restored, and in its own thread)."""
    a_in, b_in, a_out, b_out = (threading.Event() for _ in range(4))
    seen: dict[str, int] = {}

    def use_a() -> None:
        with _one_thread(True):
            a_in.set()
            b_in.wait(5)
        a_out.set()
        b_out.wait(5)
        seen["a after"] = torch.get_num_threads()

    def use_b() -> None:
        a_in.wait(5)
        with _one_thread(True):
            b_in.set()
            a_out.wait(5)
            seen["b passes"] = _pass_threads()
        seen["b after"] = torch.get_num_threads()
        b_out.set()

    with threads_set(WANTED):
        run_both(use_a, use_b)
    assert seen == {"a after": WANTED, "b passes": WANTED, "b after": WANTED}


def test_forward_pass_threads_run_on_one_thread_whatever_was_set_last():
    """The threads that run forward passes side by side are at one thread each even when
    the count new threads start from is not 1 (another user left `_one_thread` meanwhile and
    put its own count back): a pass split over threads rounds differently."""
    with threads_set(WANTED), _pass_pool(2) as pool:
        counts = {pool.submit(torch.get_num_threads).result() for _ in range(4)}
    assert counts == {1}


@pytest.mark.parametrize("nested", [1, 3])
def test_nested_users_in_one_thread_restore_once(nested: int):
    """Nested `_one_thread` in one thread (the worker's host_threads around the engine's):
    one thread inside, the passes' count from before, the count back after the outermost."""
    inner: list[tuple[int, int]] = []
    with threads_set(WANTED):

        def enter(depth: int) -> None:
            if depth == 0:
                inner.append((torch.get_num_threads(), _pass_threads()))
                return
            with _one_thread(True):
                enter(depth - 1)

        enter(nested)
        after = torch.get_num_threads()
    assert inner == [(1, WANTED)] and after == WANTED


# --- Layout.starts_within: the lattice starts in [low, high), by arithmetic -----------------


def filtered(layout: Layout, axis: int, low: float, high: float) -> list[int]:
    """The starts the slow way: the whole axis filtered."""
    return [s for s in layout.starts(axis) if low <= s < high]


@pytest.mark.parametrize(("low", "high"), [(2.5, 13.5), (-1.5, 6), (-2.5, 2.0), (13.0, 13.5),
                                           (0.1, 0.9), (-math.inf, 3.5), (33.5, math.inf)])
def test_starts_within_takes_bounds_between_whole_numbers(low: float, high: float):
    """The bounds are floats: a start below a fractional ``low`` is outside (``int(2.5)``
    was 2, so start 2 was counted in [2.5, 13.5))."""
    layout = Layout((40, 40, 40), (8, 8, 8), (4, 4, 4), (4, 4, 4), (8, 8, 8))
    assert list(layout.starts_within(0, low, high)) == filtered(layout, 0, low, high)


def test_starts_within_and_covering_match_the_filter_at_edges_and_with_padding():
    """Odd shapes, strides, blocks thinner than a patch, patches reaching past both ends:
    the arithmetic equals filtering the whole axis, for every block's write box."""
    rng = random.Random(7)
    for _ in range(60):
        patch = tuple(rng.randint(1, 9) for _ in range(3))
        stride = tuple(rng.randint(1, p) for p in patch)
        chunks = tuple(rng.randint(1, 4) for _ in range(3))
        block = tuple(c * rng.randint(1, 3) for c in chunks)
        shape = tuple(rng.randint(1, 30) for _ in range(3))
        layout = Layout(shape, patch, stride, chunks, block)
        for low, high in itertools.product(range(-10, 35, 3), range(-10, 35, 4)):
            assert list(layout.starts_within(0, low, high)) == filtered(layout, 0, low, high)
        for index in layout.block_grid():
            box = layout.write_box(index)
            for a in range(3):
                b, e = box.begin[a], box.end[a]
                assert list(layout.covering(a, b, e)) == [
                    s for s in layout.starts(a) if s < e and s + patch[a] > b]


# --- segment at scale: the workers a step says are those that can be busy -------------------

NEAREST = ((-1, 0, 0), (0, -1, 0), (0, 0, -1))


def test_a_step_says_the_workers_it_can_use_not_the_ones_asked_for(tmp_path):
    """One block with --workers 4: done in this process (no pool: `local_pool`), so the
    steps must not say 'local, 4 workers' (nor '1 of 1 blocks')."""
    from test_segment import affinities, cells, noisy
    from typer.testing import CliRunner

    from emrun.cli import app
    from emrun.io import write_volume

    truth = cells((4, 32, 32), n=6, seed=3)
    affs = noisy(affinities(truth, NEAREST), 0.05, seed=1)
    write_volume(tmp_path / "in.zarr", "affinity", np.round(affs * 255).astype(np.uint8),
                 channel_axis=True, attrs={"offsets": [list(o) for o in NEAREST]})
    result = CliRunner().invoke(app, [
        "segment", str(tmp_path / "in.zarr/affinity"), str(tmp_path / "seg.zarr"),
        "--scheduler", "local", "--workers", "4", "--block", "4", "32", "32",
        "--threshold", "0.5"])
    assert result.exit_code == 0, result.output
    assert "fragments: 1 of 1 block to do (local, 1 worker)" in result.output
    assert "4 workers" not in result.output


@pytest.mark.parametrize(("pending", "blocks", "workers", "kind", "said"), [
    (3, 8, 2, "local", "3 of 8 blocks to do (local, 2 workers)"),
    (1, 8, 4, "daisy", "1 of 8 blocks to do (daisy, 1 worker)"),
    (0, 8, 4, "local", "0 of 8 blocks to do (local, 4 workers)"),
    (0, 2, 4, "local", "0 of 2 blocks to do (local, 2 workers)"),
])
def test_to_do_counts_the_workers_that_can_be_busy(pending, blocks, workers, kind, said):
    from emrun.segment.scale.command import _to_do

    assert _to_do(pending, blocks, workers, kind) == said


# --- bench data --workers 0: measured as the trainer makes its own samples -----------------


def test_bench_data_in_process_times_the_loader_without_kept_memory(monkeypatch):
    """The trainer making its own samples (workers: 0) does not keep freed memory (f89e288):
    fresh pages cost about 12 ms a sample against 2.5 ms. `bench data --workers 0` times the
    in-process loader after its stage costs switched the setting on in this process, so it
    reports a rate the trainer does not get."""
    from test_infer_probe import probe_recipe

    from emrun.bench import data as bench
    from emrun.data import samples

    asked: list[str] = []
    at_throughput: list[int] = []
    monkeypatch.setattr(samples, "keep_freed_memory", lambda: asked.append("kept") or True)
    monkeypatch.setattr(samples, "open_sources", lambda sources: [])  # no volume read
    monkeypatch.setattr(samples, "mixture_weights", lambda sources: [])
    monkeypatch.setattr(samples, "PatchSampler", lambda sources, weights: None)
    monkeypatch.setattr(samples.SampleMaker, "sample", lambda self, rng: None)

    def timed(recipe, workers, count):  # type: ignore[no-untyped-def]
        at_throughput.append(len(asked))
        return 1.0, 0.0

    monkeypatch.setattr(bench, "throughput", timed)
    bench.bench_data(probe_recipe(), synthetic=False, workers=0, samples=1)
    assert at_throughput == [0]
