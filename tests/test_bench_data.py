"""`emrun bench data`: the loader's worker count is bounded, and its worker processes are
stopped however the run ends (a failed start, an interrupt): they ignore SIGTERM, so one
left behind would keep the interpreter waiting at exit for ever."""

from __future__ import annotations

import gc
import multiprocessing
import os
import sys
import warnings
from multiprocessing import queues

import pytest
import torch
from conftest import MINIMAL
from typer.testing import CliRunner

from emrun.bench import data as bench
from emrun.cli import app
from emrun.data import loader

runner = CliRunner()
FAST = ["--samples", "2", "-o", "augment=none"]


@pytest.fixture
def children():
    """The child processes started during the test (killed at its end, whatever it found,
    so that a regression cannot hang the test session)."""
    before = set(multiprocessing.active_children())
    new: list = []

    def started() -> list:
        new[:] = [c for c in multiprocessing.active_children() if c not in before]
        return list(new)

    yield started
    for child in set(multiprocessing.active_children()) - before:
        child.kill()
        child.join(timeout=5)


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_more_workers_than_four_per_core_are_refused_before_anything_runs(write, monkeypatch):
    monkeypatch.setattr(bench, "cpu_cores", lambda: 2)
    monkeypatch.setattr(bench, "stage_costs", lambda *a, **k: pytest.fail("ran"))
    line = _one_error_line(runner.invoke(app, ["bench", "data", str(write(MINIMAL)),
                                               "--workers", "9", *FAST]))
    assert "9 loader workers" in line and "give at most 8" in line


def test_more_workers_than_the_memory_holds_are_refused(write, monkeypatch):
    monkeypatch.setattr(bench, "cpu_cores", lambda: 64)
    monkeypatch.setattr(bench, "available_memory", lambda: 3 * bench.WORKER_MEMORY)
    monkeypatch.setattr(bench, "stage_costs", lambda *a, **k: pytest.fail("ran"))
    line = _one_error_line(runner.invoke(app, ["bench", "data", str(write(MINIMAL)),
                                               "--workers", "4", *FAST]))
    assert "of memory" in line and "give at most 3" in line
    monkeypatch.setattr(bench, "throughput", lambda *a: (1.0, 0.0))
    monkeypatch.setattr(bench, "stage_costs", lambda *a, **k: ({}, [1.0]))
    result = runner.invoke(app, ["bench", "data", str(write(MINIMAL)), "--workers", "3", *FAST])
    assert result.exit_code == 0, result.output


def test_a_loader_that_cannot_start_its_threads_is_one_line_and_leaves_no_worker(
        write, monkeypatch, children):
    """As under `ulimit -v`: the workers start, then the queue's feeder thread cannot."""
    def no_thread(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(queues.Queue, "_start_thread", no_thread)
    unraisable: list = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    line = _one_error_line(runner.invoke(app, ["bench", "data", str(write(MINIMAL)),
                                               "--workers", "2", *FAST]))
    assert "2 loader workers ran out of threads" in line and "can't start new thread" in line
    assert children() == []
    gc.collect()  # the half-made loader iterator: its __del__ must not try again
    assert unraisable == []


def test_an_interrupt_stops_the_workers_in_one_line(write, monkeypatch, children):
    real = loader.to_tensors
    calls = []

    def interrupted(batch):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(batch)

    monkeypatch.setattr(loader, "to_tensors", interrupted)
    result = runner.invoke(app, ["bench", "data", str(write(MINIMAL)), "--workers", "2",
                                 *FAST])
    assert result.exit_code == 130, result.output
    assert result.stderr.startswith("stopped by SIGINT: bench data stopped")
    assert len(result.stderr.strip().splitlines()) == 1
    assert children() == []


def test_torch_s_warning_about_many_workers_is_not_shown(write, monkeypatch, children):
    # torch suggests as many workers as the cores os.sched_getaffinity gives (directly up to
    # torch 2.11, through torch._utils.cpu_count later): one core, so 2 workers are too many
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    with pytest.warns(UserWarning, match="This DataLoader will create"):  # torch would warn
        torch.utils.data.DataLoader([0], num_workers=2).check_worker_number_rationality()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = runner.invoke(app, ["bench", "data", str(write(MINIMAL)), "--workers", "2",
                                     *FAST])
    assert result.exit_code == 0, result.output
    assert not [w for w in seen if "This DataLoader will create" in str(w.message)]
    assert "This DataLoader" not in result.output
    assert children() == []
