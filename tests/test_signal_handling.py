"""`catching_signals`, the one way emrun's engines take SIGTERM and SIGINT: what it notes,
when it calls back, that every old handler is back after (even where a signal comes while
they are put back, or while they go in), and that outside the main thread it touches
nothing. Then the places built on it keep what they did."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from emrun import subprocesses
from emrun.subprocesses import STOPPING, catching_signals


class Stop(Exception):
    """The stop a callback raises in these tests."""


def _raise_stop(name: str) -> None:
    raise Stop(name)


class Old:
    """Recording handlers for SIGTERM and SIGINT (what a command's own were before)."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.handlers = {number: self.record for number in STOPPING}

    def record(self, number: int, frame: Any) -> None:
        self.seen.append(signal.Signals(number).name)


@pytest.fixture
def old_handlers() -> Iterator[Old]:
    """`Old` handlers in place for the test, the real ones back after it."""
    old = Old()
    before = {number: signal.signal(number, old.record) for number in STOPPING}
    try:
        yield old
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)


def _installed() -> dict[int, Any]:
    return {number: signal.getsignal(number) for number in STOPPING}


def _signal_at(monkeypatch: pytest.MonkeyPatch, armed: list[bool], number: int,
               at: int = 0) -> None:
    """Once ``armed``, raise ``number`` just before the ``at``-th call of signal.signal (a
    signal pending when the call checks for them: its handler runs, and raises, before the
    new one is set)."""
    real = signal.signal
    calls: list[int] = []

    def wrapped(signum: int, handler: Any) -> Any:
        if armed and armed[0]:
            calls.append(signum)
            if len(calls) - 1 == at:
                signal.raise_signal(number)
        return real(signum, handler)

    monkeypatch.setattr(subprocesses.signal, "signal", wrapped)


# --- the building block ---------------------------------------------------------------------


def test_each_signal_is_noted_and_called_back_and_the_old_handlers_come_back(
        old_handlers: Old) -> None:
    before = _installed()
    called: list[str] = []
    with catching_signals(called.append) as caught:
        assert _installed() != before
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGINT)
    assert caught == ["SIGTERM", "SIGINT"] and called == ["SIGTERM", "SIGINT"]
    assert _installed() == before and old_handlers.seen == []


def test_a_second_signal_is_noted_not_called_back_with_first_only(
        old_handlers: Old) -> None:
    """The first raises the stop; one while it unwinds must not raise again (the cleanup
    runs to its end)."""
    cleaned = False
    with pytest.raises(Stop, match="SIGINT") as stop, \
            catching_signals(_raise_stop, first_only=True) as caught:
        try:
            signal.raise_signal(signal.SIGINT)
        finally:
            signal.raise_signal(signal.SIGTERM)  # during the cleanup: noted only
            cleaned = True
    assert cleaned and caught == ["SIGINT", "SIGTERM"]
    assert stop.value.__context__ is None  # no second stop raised over the first


def test_only_the_signals_asked_for_are_taken(old_handlers: Old) -> None:
    with catching_signals(signals=(signal.SIGTERM,)) as caught:
        assert signal.getsignal(signal.SIGINT) == old_handlers.record
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGTERM)
    assert caught == ["SIGTERM"] and old_handlers.seen == ["SIGINT"]


@pytest.mark.parametrize(("at", "name"), [(0, "SIGTERM"), (1, "SIGINT")])
def test_every_old_handler_is_back_when_the_stop_is_raised_while_they_are_put_back(
        old_handlers: Old, monkeypatch: pytest.MonkeyPatch, at: int, name: str) -> None:
    """The first signal, pending as the ``at``-th handler is put back (SIGTERM's, then
    SIGINT's), runs the callback, which raises before that handler is set: it is set all
    the same, and so is the other; the stop comes once all are back."""
    before = _installed()
    armed = [False]
    _signal_at(monkeypatch, armed, signal.Signals[name], at)
    with pytest.raises(Stop, match=name), \
            catching_signals(_raise_stop, first_only=True) as caught:
        armed[0] = True
    monkeypatch.undo()
    assert caught == [name] and _installed() == before and old_handlers.seen == []


def test_an_old_handler_that_raises_while_the_others_are_put_back_leaves_none_out(
        old_handlers: Old, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGINT's old handler (Python's: KeyboardInterrupt) is back first; a SIGINT while
    SIGTERM's is put back raises from it: SIGTERM's is set all the same, and the interrupt
    comes after (the infer and evaluate restores caught their own stop only)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    before = _installed()
    armed = [False]
    _signal_at(monkeypatch, armed, signal.SIGINT, at=1)
    with pytest.raises(KeyboardInterrupt), \
            catching_signals(signals=(signal.SIGINT, signal.SIGTERM)) as caught:
        armed[0] = True
    monkeypatch.undo()
    assert caught == [] and _installed() == before


def test_a_stop_while_the_handlers_go_in_puts_back_those_set(
        old_handlers: Old, monkeypatch: pytest.MonkeyPatch) -> None:
    """A signal right after the first handler is set stops before the block is entered;
    the handler already set does not stay."""
    before = _installed()
    armed = [True]
    _signal_at(monkeypatch, armed, signal.SIGTERM, at=1)
    with pytest.raises(Stop, match="SIGTERM"), catching_signals(_raise_stop):
        pytest.fail("entered despite the stop")
    monkeypatch.undo()
    assert _installed() == before


def test_a_handler_that_cannot_be_put_back_is_said_once_the_others_are_back(
        old_handlers: Old, monkeypatch: pytest.MonkeyPatch) -> None:
    """signal.signal refuses some handlers every time (None: one not set from Python): the
    tries that set a handler a pending signal kept out must not loop on it forever, and
    the handlers after it still go back."""
    real = signal.signal
    refused: list[int] = []

    def refusing(signum: int, handler: Any) -> Any:
        if signum == signal.SIGTERM and handler == old_handlers.record:
            refused.append(signum)
            raise TypeError("signal handler must be signal.SIG_IGN, signal.SIG_DFL, or a "
                            "callable object")
        return real(signum, handler)

    with pytest.raises(TypeError), catching_signals():  # SIGTERM's first, then SIGINT's
        monkeypatch.setattr(subprocesses.signal, "signal", refusing)
    monkeypatch.undo()
    assert refused and signal.getsignal(signal.SIGINT) == old_handlers.record


def _in_a_thread(body: Callable[[], Any]) -> Any:
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(body()))
    thread.start()
    thread.join(timeout=30)
    assert result, "the thread failed"
    return result[0]


def test_outside_the_main_thread_nothing_is_installed(
        old_handlers: Old) -> None:
    before = _installed()

    def body() -> tuple[list[str], dict[int, Any]]:
        with catching_signals(_raise_stop) as caught:
            return caught, _installed()

    caught, inside = _in_a_thread(body)
    assert caught == [] and inside == before and _installed() == before


# --- the places built on it ------------------------------------------------------------------


def test_bench_puts_sigterms_handler_back_when_a_sigterm_comes_while_it_does(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`terminated_as_interrupt` raises KeyboardInterrupt on each SIGTERM; one pending as
    the old handler went back raised before it was set, and SIGTERM raised
    KeyboardInterrupt for the rest of the process (a benchmark's caller could no longer be
    terminated)."""
    from emrun.bench.workdir import terminated_as_interrupt

    old = Old()
    before = signal.signal(signal.SIGTERM, old.record)
    armed = [False]
    _signal_at(monkeypatch, armed, signal.SIGTERM)
    try:
        with pytest.raises(KeyboardInterrupt), terminated_as_interrupt() as caught:
            armed[0] = True
        monkeypatch.undo()
        assert caught == ["SIGTERM"] and signal.getsignal(signal.SIGTERM) == old.record
    finally:
        monkeypatch.undo()
        signal.signal(signal.SIGTERM, before)


def test_infer_stop_at_once_raises_stopped_with_the_progress(
        old_handlers: Old) -> None:
    from emrun.infer.schedule import Progress, Stopped, stop_at_once

    progress = Progress(done=3, total=5)
    before = _installed()
    with pytest.raises(Stopped) as stopped, stop_at_once(progress):
        signal.raise_signal(signal.SIGTERM)
    assert stopped.value.signal_name == "SIGTERM" and stopped.value.progress is progress
    assert _installed() == before


def test_evaluate_stopping_raises_one_interrupted(old_handlers: Old) -> None:
    from emrun.errors import Interrupted
    from emrun.evaluate.stops import MESSAGE, stopping

    with pytest.raises(Interrupted, match="evaluate stopped") as stop, stopping() as caught:
        try:
            signal.raise_signal(signal.SIGINT)
        finally:
            signal.raise_signal(signal.SIGTERM)
    assert caught == ["SIGINT", "SIGTERM"] and MESSAGE in str(stop.value)
    assert stop.value.__context__ is None


def test_the_trainer_reports_the_last_signal_and_puts_the_handlers_back(
        old_handlers: Old) -> None:
    from emrun.train.trainer import _Signals

    before = _installed()
    with _Signals() as signals:
        assert signals.received is None
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGINT)
        assert signals.received == "SIGINT"
    assert _installed() == before


def test_the_trainer_outside_the_main_thread_installs_nothing(
        old_handlers: Old) -> None:
    """It raised ValueError ('signal only works in main thread') there."""
    from emrun.train.trainer import _Signals

    def body() -> str | None:
        with _Signals() as signals:
            return signals.received

    assert _in_a_thread(body) is None


def test_segment_main_stops_note_then_cut_short_with_the_first_name(
        old_handlers: Old) -> None:
    from emrun.errors import Interrupted
    from emrun.segment.scale.schedulers import main_stops

    before = _installed()
    with main_stops() as stops:
        signal.raise_signal(signal.SIGTERM)  # noted, not raised here
        with pytest.raises(Interrupted, match="agglomeration: run the same") as cut, \
                stops.cut_short("agglomeration"):
            signal.raise_signal(signal.SIGINT)
        assert stops.caught == ["SIGTERM", "SIGINT"] and cut.value.signal_name == "SIGTERM"
    assert _installed() == before
