"""`emrun segment --scheduler local`: a SIGTERM or Ctrl-C while this process sits in a call
that does not return to Python (the compiled agglomeration of the whole graph; a database
that does not answer) stops the command at once, in one line, and the job resumes. In this
process (one worker), on 8 blocks of 4 x 24 x 24; the signal comes from another thread once
the call is under way, as a signal from outside does."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numba
import numpy as np
import pytest
import test_workflows_scale_probe as probe
from test_segment_scale_edges import _labels, _segment, no_default_signals  # noqa: F401

from emrun.segment.scale import agglomerate, graphdb
from emrun.segment.scale.abandon import THREAD_PREFIX, abandonable

cells_store = probe.cells_store  # a fixture: noisy affinities of 12 cells, 8 blocks

RELEASE_SECONDS = 30.0
"""A stuck call is let go after this long at most (before the fix, the command waited for
it); a prompt stop returns long before. Not shorter: with test files run side by side a
busy machine took 8 s to reach the stuck call, and the lock was gone before the stop."""


@numba.njit(nogil=True)
def _spin(release: np.ndarray, scratch: np.ndarray) -> int:  # pragma: no cover - compiled
    """Compiled work that does not return to Python until ``release[0]`` is set."""
    k = 0
    while release[0] == 0:
        scratch[k & 7] += 1
        k += 1
    return k


class Stuck:
    """A call stuck in compiled code until released: by a timer after `RELEASE_SECONDS`
    (``by_timer`` then says so), or by `release`."""

    def __init__(self) -> None:
        self.flag = np.ones(1, np.int64)
        self.scratch = np.zeros(8, np.int64)
        _spin(self.flag, self.scratch)  # compiled now, not inside the call
        self.flag[0] = 0
        self.by_timer: list[str] = []
        self._timer = threading.Timer(RELEASE_SECONDS, self._timed_out)
        self._timer.daemon = True

    def _timed_out(self) -> None:
        self.by_timer.append("released by the timer")
        self.flag[0] = 1

    def wait(self) -> None:
        """Stuck here (the release timer starts with the first call)."""
        if not self._timer.is_alive() and not self.by_timer:
            self._timer.start()
        _spin(self.flag, self.scratch)

    def release(self) -> None:
        self._timer.cancel()
        self.flag[0] = 1


def _signal_soon(number: int = signal.SIGTERM, after: float = 0.3) -> None:
    """``number`` to this process from another thread once the caller is stuck."""
    timer = threading.Timer(after, os.kill, (os.getpid(), number))
    timer.daemon = True
    timer.start()


def _join_abandoned() -> None:
    """Wait for calls a stop left behind (they end once released)."""
    for thread in threading.enumerate():
        if thread.name.startswith(THREAD_PREFIX):
            thread.join(30)
            assert not thread.is_alive(), thread.name


@pytest.fixture
def stuck() -> Iterator[Stuck]:
    call = Stuck()
    try:
        yield call
    finally:
        call.release()
        _join_abandoned()


# ------------------------------------------------------ 1. the global agglomeration

@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT], ids=["term", "int"])
def test_a_stop_during_the_compiled_agglomeration_is_prompt_and_the_job_resumes(
        cells_store, tmp_path, monkeypatch, no_default_signals, stuck, number):  # noqa: F811
    """The whole graph's merge loop (compiled) held a SIGTERM or Ctrl-C until it returned:
    minutes on a large graph."""
    real = agglomerate._merge_loop

    def slow(*args: Any) -> Any:
        _signal_soon(number)
        stuck.wait()
        return real(*args)

    monkeypatch.setattr(agglomerate, "_merge_loop", slow)
    affs, out = cells_store / "in.zarr/affinity", tmp_path / "agglo.zarr"
    result = _segment(affs, out, "--threshold", "0.5")
    assert stuck.by_timer == [], "the stop waited for the compiled agglomeration"
    assert result.exit_code == (130 if number == signal.SIGINT else 143), result.output
    said = " ".join(result.output.split())
    assert "the agglomeration was cut short" in said and "--resume" in said, said
    assert not list((out / ".emrun-segment" / "lut").glob("*.npy"))  # no table half-made
    stuck.release()
    _join_abandoned()
    monkeypatch.undo()
    assert _segment(affs, out, "--resume").exit_code == 0
    straight = tmp_path / "straight.zarr"
    assert _segment(affs, straight, "--threshold", "0.5").exit_code == 0
    assert np.array_equal(_labels(out, "segmentation"), _labels(straight, "segmentation"))


def test_the_merge_loop_left_by_a_stop_ends_early():
    """A stop that leaves the loop also ends it: it went on merging the whole graph in a
    process that lives on (a library caller, a test run), one core busy for minutes."""
    rng = np.random.default_rng(0)
    n = 20_000
    u = rng.integers(0, n - 1, 100_000)
    v = u + rng.integers(1, 50, u.size)
    v = np.minimum(v, n - 1)
    key = np.unique(u * n + v)
    u, v = key // n, key % n
    count = rng.integers(1, 9, u.size)
    graph = graphdb.GraphData(np.arange(1, n + 1, dtype=np.uint64), np.ones(n, np.int64),
                              u, v, count * rng.random(u.size), count,
                              np.zeros((0, 0), np.int64))
    full = agglomerate.merge_sequence(graph, 1.0, "mean")
    stop = np.ones(1, np.int64)  # set before it starts: it stops at its first look
    hist = np.zeros((0, agglomerate.BINS), np.int64)
    early = agglomerate.Merges(*agglomerate._merge_loop(
        n, u, v, graph.total.copy(), count.copy(), hist, 1.0, False, stop))
    assert len(full) > 2 * agglomerate.STOP_EVERY
    assert 0 < len(early) < agglomerate.STOP_EVERY
    assert np.array_equal(early.gone, full.gone[:len(early)])  # the same merges, cut short


class Stopped(Exception):
    pass


def test_abandonable_gives_the_result_the_error_and_leaves_a_stuck_call(stuck):
    assert abandonable(divmod, 7, 2) == (3, 1)
    with pytest.raises(ZeroDivisionError):
        abandonable(divmod, 1, 0)
    asked: list[str] = []

    def raise_stop(number: int, frame: Any) -> None:
        raise Stopped

    previous = signal.signal(signal.SIGUSR1, raise_stop)
    try:
        _signal_soon(signal.SIGUSR1)
        with pytest.raises(Stopped):
            abandonable(stuck.wait, on_abandon=lambda: asked.append("asked to end"))
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert stuck.by_timer == [] and asked == ["asked to end"]


# ------------------------------------------------------ 2. a database that does not answer

@pytest.fixture
def silent_server() -> Iterator[tuple[int, threading.Event]]:
    """A TCP port that takes connections and never answers (a PostgreSQL server hung, or
    behind a firewall that lets the handshake through); the event: one came."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    came = threading.Event()
    held: list[socket.socket] = []

    def take() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            held.append(conn)
            came.set()

    threading.Thread(target=take, daemon=True).start()
    try:
        yield server.getsockname()[1], came
    finally:
        server.close()
        for conn in held:
            conn.close()
        _join_abandoned()


def test_a_stop_while_postgresql_does_not_answer_is_prompt_and_says_so(
        cells_store, tmp_path, no_default_signals, silent_server):  # noqa: F811
    """The stop waited for the connect timeout, then ended as 'cannot create the graph
    tables' (exit 2), not as a stop."""
    pytest.importorskip("psycopg", reason="psycopg missing: pip install 'emrun[postgres]'")
    port, came = silent_server

    def signal_once_connected() -> None:
        if came.wait(30):
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=signal_once_connected, daemon=True).start()
    out = tmp_path / "pg.zarr"
    result = _segment(cells_store / "in.zarr/affinity", out, "--threshold", "0.5", "--db",
                      f"postgresql://emrun@127.0.0.1:{port}/postgres")
    assert result.exit_code == 143, result.output
    said = " ".join(result.output.split())
    assert "stopped by SIGTERM: the job stopped while waiting for its database" in said, said
    assert f"127.0.0.1:{port}" in said and "run the same command again" in said, said


@pytest.fixture
def locked_sqlite(tmp_path: Path) -> Iterator[tuple[Path, Callable[[], None]]]:
    """An SQLite file another process holds locked (the job's busy timeout: 300 s), and
    what lets it go."""
    path = tmp_path / "locked.sqlite"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    timer = threading.Timer(RELEASE_SECONDS, holder.rollback)
    timer.daemon = True
    timer.start()

    def release() -> None:
        timer.cancel()
        if holder.in_transaction:
            holder.rollback()

    try:
        yield path, release
    finally:
        release()
        holder.close()
        _join_abandoned()


def test_a_stop_while_the_database_is_locked_is_prompt_and_the_same_command_runs(
        cells_store, tmp_path, monkeypatch, no_default_signals, locked_sqlite):  # noqa: F811
    """The stop waited for the lock to go (up to the busy timeout, 300 s)."""
    path, release = locked_sqlite
    real = graphdb.GraphStore.create

    def create(*args: Any, **kwargs: Any) -> Any:
        _signal_soon(signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(graphdb.GraphStore, "create", create)
    affs, out = cells_store / "in.zarr/affinity", tmp_path / "locked.zarr"
    args = ("--threshold", "0.5", "--db", f"sqlite:///{path}")
    result = _segment(affs, out, *args)
    assert result.exit_code == 143, result.output
    assert "while waiting for its database" in " ".join(result.output.split())
    release()
    _join_abandoned()
    monkeypatch.undo()
    result = _segment(affs, out, *args)
    assert result.exit_code == 0, result.output
    assert _labels(out, "segmentation").max() > 0


def test_a_stop_just_before_the_database_is_asked_does_not_wait_for_it(
        cells_store, tmp_path, monkeypatch, no_default_signals, silent_server):  # noqa: F811
    """A signal that came as the job opened its database (before the wait) still waited
    for the server, then for the connect timeout."""
    pytest.importorskip("psycopg", reason="psycopg missing: pip install 'emrun[postgres]'")
    port, came = silent_server
    real = graphdb.GraphStore.__init__

    def signalled(self: graphdb.GraphStore, url: str) -> None:
        real(self, url)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(graphdb.GraphStore, "__init__", signalled)
    result = _segment(cells_store / "in.zarr/affinity", tmp_path / "early.zarr", "--threshold",
                      "0.5", "--db", f"postgresql://emrun@127.0.0.1:{port}/postgres")
    assert result.exit_code == 130, result.output
    assert "stopped by SIGINT: the job stopped while waiting for its database" in \
        " ".join(result.output.split())
    assert not came.is_set()  # it did not even connect


def test_a_stop_while_the_whole_graph_is_read_is_prompt(
        cells_store, tmp_path, monkeypatch, no_default_signals, stuck):  # noqa: F811
    """Reading the whole graph (the driver fills the arrays in one call: minutes on a large
    graph) held the stop as the agglomeration did."""
    real = graphdb.GraphStore.read

    def slow(*args: Any, **kwargs: Any) -> Any:
        _signal_soon()
        stuck.wait()
        return real(*args, **kwargs)

    monkeypatch.setattr(graphdb.GraphStore, "read", slow)
    result = _segment(cells_store / "in.zarr/affinity", tmp_path / "read.zarr", "--threshold",
                      "0.5")
    assert stuck.by_timer == [], "the stop waited for the graph to be read"
    assert result.exit_code == 143, result.output
    assert "the agglomeration was cut short" in " ".join(result.output.split())
