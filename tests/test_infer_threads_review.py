"""Review of the inference engine's threads: the forward-pass pool, the host thread's torch
count and what is left behind when a block ends early.

torch's intra-op count is a thread's own once it has used torch; a new thread's first use
takes the last count set anywhere (`torch.set_num_threads` in any thread stores it)."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch
from test_infer_speed_same import Exact, make_recipe
from test_review_session_scaling import WANTED, threads_set

from emrun.geometry import zyx
from emrun.infer.array import predict_array
from emrun.infer.engine import Engine, PatchSource, _pass_pool
from emrun.infer.plan import Layout


def fresh_thread_count() -> int:
    """The torch count a thread started now gets on its first use."""
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join(10)
    return seen[0]


def cpu_engine() -> Engine:
    recipe = make_recipe()
    return Engine(recipe, Exact(recipe.head_channels()).eval(), torch.device("cpu"))


def test_a_late_pass_thread_does_not_leave_new_threads_at_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A pass thread that started late (its start-up setting of one thread ran after the
    block was over, on a busy machine) set the count new threads start from to 1 after
    the engine had put it back: every thread started later ran torch on one thread."""
    real = torch.set_num_threads
    calls = [0]
    late = threading.Event()

    def slow_second_start(count: int) -> None:
        if count == 1 and threading.current_thread() is not threading.main_thread():
            calls[0] += 1
            if calls[0] == 2:  # the second pass thread gets the CPU only later
                time.sleep(0.4)
                real(count)
                late.set()
                return
        real(count)

    engine = cpu_engine()
    image = (np.random.default_rng(3).random((6, 20, 20)) * 255).astype(np.uint8)
    with threads_set(WANTED):
        monkeypatch.setattr(torch, "set_num_threads", slow_second_start)
        predict_array(engine, image, (0.0, 255.0))
        assert late.wait(5)
        monkeypatch.setattr(torch, "set_num_threads", real)
        after = torch.get_num_threads(), fresh_thread_count()
    assert after == (WANTED, WANTED)


def test_an_interrupt_while_a_pass_is_awaited_leaves_no_pass_running() -> None:
    """Ctrl-C (KeyboardInterrupt) while the host waits for a pass's result: the pass it
    was waiting for had already been taken off the list of those to wait for, so it ran
    on after the block was over (the others were waited for)."""
    engine = cpu_engine()
    layout = Layout((8, 32, 32), engine.patch, engine.stride, (8, 32, 32), (8, 32, 32))
    running, calls = [0], [0]
    forward = engine._forward

    def slow(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        running[0] += 1
        calls[0] += 1
        if calls[0] == 1:  # Ctrl-C while the host waits for this first pass
            signal.setitimer(signal.ITIMER_REAL, 0.1)
        try:
            time.sleep(0.6 if calls[0] == 1 else 0.05)  # the first outlasts the next
            return forward(batch)
        finally:
            running[0] -= 1

    def interrupt(*_: Any) -> None:
        raise KeyboardInterrupt

    engine._forward = slow  # type: ignore[method-assign]
    start = zyx(layout.read_box((0, 0, 0)).offset)
    source = PatchSource(torch.rand(12, 40, 40), start, engine.patch, None, lambda t: t)
    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        with threads_set(WANTED):
            passes = engine._forwards(source, layout.batches((0, 0, 0), 1))
            with pytest.raises(KeyboardInterrupt):
                next(passes)
            left = running[0]
            restored = torch.get_num_threads()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert left == 0
    assert restored == WANTED


def on_each_thread(pool: ThreadPoolExecutor, task: Callable[[], int]) -> list[int]:
    """``task`` run once on each of the pool's ``WANTED`` threads (they meet at a barrier:
    no thread can take two)."""
    met = threading.Barrier(WANTED, timeout=10)

    def run() -> int:
        met.wait()
        return task()

    return [f.result() for f in [pool.submit(run) for _ in range(WANTED)]]


def test_pass_threads_stay_at_one_when_another_user_puts_its_count_back() -> None:
    """A pass thread set itself to one thread at its start but had not used torch yet, so
    its first use (its first pass, maybe blocks later) took the count set last anywhere:
    after another user of the process had put its own count back (an engine in another
    thread leaving `_one_thread`), its passes ran split over threads, rounded otherwise."""
    with threads_set(WANTED), _pass_pool(WANTED) as pool:
        on_each_thread(pool, lambda: 0)  # every pass thread started, none has passed yet
        torch.set_num_threads(WANTED)  # another user leaves and puts its count back
        counts = on_each_thread(pool, torch.get_num_threads)
    assert counts == [1] * WANTED
