"""Helper processes and signals: a SIGTERM to the process group while a helper is still
starting must not kill it (the parent decides when helpers stop)."""

from __future__ import annotations

import multiprocessing as mp
import signal

from emrun.subprocesses import leave_signals_to, signals_held


def _report_mask(queue, parent):  # type: ignore[no-untyped-def]
    held = sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))
    leave_signals_to(parent)
    after = sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))
    queue.put((held, after, signal.getsignal(signal.SIGTERM) == signal.SIG_IGN))


def test_helpers_start_with_stop_signals_held_then_ignore_them():
    import os

    context = mp.get_context("spawn")
    queue = context.Queue()
    with signals_held():
        process = context.Process(target=_report_mask, args=(queue, os.getpid()))
        process.start()
        assert {signal.SIGTERM, signal.SIGINT} <= signal.pthread_sigmask(signal.SIG_BLOCK, [])
    held, after, ignored = queue.get(timeout=60)
    process.join(timeout=60)
    assert {int(signal.SIGTERM), int(signal.SIGINT)} <= set(held)  # from its first instruction
    assert int(signal.SIGTERM) not in after and ignored  # then ignored, no longer held
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # parent: back
