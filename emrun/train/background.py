"""Scoring validations in a helper process while the device keeps training.

Validation by segmentation has two halves: predicting the validation boxes (seconds on the
device) and segmenting and scoring them at several parameter values (minutes of CPU for
SNEMI3D-sized boxes). The trainer does the first itself and hands the second to a helper
process, then goes on training; each iteration it collects whatever has finished. At most one
scoring is in flight: a validation that comes while the previous one is still being scored
waits for it, so memory holds one pending result and the scores arrive in order.

Each scoring runs in a process of its own (started from scratch: validations are minutes
apart, and a fresh process cannot inherit a broken state). It leaves SIGINT/SIGTERM to the
trainer and dies with it (``emrun.subprocesses``): a stopped or killed run leaves no scorer
behind. A helper that dies (killed for memory, say) is reported, never waited for forever. A
pending score is lost when the run stops by a signal (training itself resumes exactly: scores
never feed back into training).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from ..errors import UserError
from ..subprocesses import leave_signals_to, signals_held

Scores = dict[str, float] | None


def _score(sender: Connection, parent: int, fn: Callable[..., Scores], args: tuple) -> None:
    """The helper's whole life: score, send the outcome, exit."""
    leave_signals_to(parent)
    try:
        outcome: tuple[str, Any] = ("scores", fn(*args))
    except MemoryError as exc:  # the machine's, not a bug: said as the trainer says it
        outcome = ("memory", f"MemoryError: {exc}")
    except BaseException as exc:
        outcome = ("error", f"{type(exc).__name__}: {exc}")
    sender.send(outcome)
    sender.close()


class Scoring:
    """One scoring running in its own helper process."""

    def __init__(self, fn: Callable[..., Scores], args: tuple) -> None:
        context = mp.get_context("spawn")
        self._receiver, sender = context.Pipe(duplex=False)
        with signals_held():
            # not a daemon: a daemonic process may not start the sweep's pool (boxes of
            # 1 M voxels and more), which stopped the run at its first validation; it
            # still dies with the trainer, and `BackgroundScorer.close` kills it
            self._process = context.Process(target=_score, daemon=False,
                                            args=(sender, os.getpid(), fn, args))
            self._process.start()
        sender.close()
        self._outcome: tuple[str, Any] | None = None

    def ready(self) -> bool:
        """True once the scores (or the helper's end) are in; never waits."""
        return self._outcome is not None or self._receiver.poll() or \
            not self._process.is_alive()

    def get(self) -> Scores:
        """The scores (waits for them). The helper running out of memory is a MemoryError
        and its being killed outright (SIGKILL: the out-of-memory killer, as a rule) a
        UserError, as they would be in the trainer; its other errors and deaths are a
        RuntimeError."""
        if self._outcome is None:
            try:
                self._outcome = self._receiver.recv()
            except EOFError:  # it ended without a word: killed
                self._process.join()
                code = self._process.exitcode
                self._outcome = ("killed" if code == -signal.SIGKILL else "error",
                                 f"the process scoring the validation died (exit code {code})")
            self._process.join()
            self._receiver.close()
        kind, value = self._outcome
        if kind == "memory":
            raise MemoryError(f"validation scoring: {value}")
        if kind == "killed":
            raise UserError(f"{value}, killed outright: the out-of-memory killer, as a rule; "
                            "free memory, set train.validate_segmentation to false, or give "
                            "data.validation a smaller box")
        if kind == "error":
            raise RuntimeError(f"validation scoring failed: {value}")
        return value

    def kill(self) -> None:
        self._process.kill()
        self._process.join()
        self._receiver.close()


@dataclass
class Pending:
    """A validation and its figures: the losses measured in the trainer, the training state
    to save as best.pt if it wins, and its scoring (None: scored in the trainer already)."""

    iteration: int
    metrics: dict[str, float]
    state: dict[str, Any] | None
    scoring: Scoring | None

    def result(self) -> dict[str, float]:
        """The losses and the scores (waits for them)."""
        scores = self.scoring.get() if self.scoring is not None else None
        return {**self.metrics, **(scores or {})}


class BackgroundScorer:
    """Validations scored one at a time in helper processes, collected in order."""

    def __init__(self) -> None:
        self._pending: Pending | None = None

    def submit(self, iteration: int, metrics: dict[str, float], state: dict[str, Any] | None,
               fn: Callable[..., Scores], *args: Any) -> list[Pending]:
        """Start scoring ``fn(*args)``; returns the previous validation (waited for) if there
        was one still in flight."""
        done = self.drain()
        self._pending = Pending(iteration, metrics, state, Scoring(fn, args))
        return done

    def finished(self) -> list[Pending]:
        """The validation scored since the last call, without waiting ([] when none)."""
        pending = self._pending
        if pending is None or (pending.scoring is not None and not pending.scoring.ready()):
            return []
        return self.drain()

    def drain(self) -> list[Pending]:
        """The validation in flight, if any, once its scores are in (waits for them)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return []
        if pending.scoring is not None:
            with contextlib.suppress(RuntimeError, MemoryError, UserError):  # result() raises
                pending.scoring.get()  # them where the trainer records the validation
        return [pending]

    @property
    def busy(self) -> Pending | None:
        """The validation being scored now."""
        return self._pending

    def close(self) -> None:
        """Stop at once; a validation still in flight is abandoned."""
        pending, self._pending = self._pending, None
        if pending is not None and pending.scoring is not None:
            pending.scoring.kill()
