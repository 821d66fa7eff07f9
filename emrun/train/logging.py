"""What a training run reports: events.jsonl, TensorBoard, and a live terminal display.

`RunLogger` is the trainer's only reporting channel. Per log step it appends one JSON object
to ``run_dir/events.jsonl`` (flushed per line, so a killed run keeps what it logged; a
resumed run first cuts the file back to the iteration it resumes from, see `keep_history`),
writes TensorBoard scalars under ``run_dir/tensorboard`` and updates the console: a rich
progress bar on a terminal, one plain line per step otherwise (CI logs).
Only rank 0 should report: ``enabled=False`` turns every method into a no-op and creates no
files.

This module never imports the standard library's ``logging``; its name only mirrors the
package layout (``emrun.train.logging``).
"""

from __future__ import annotations

import io
import json
import math
import threading
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

from ..atomic import atomic_output
from ..errors import UserError

EVENTS_FILE = "events.jsonl"
TENSORBOARD_DIR = "tensorboard"

_RATE_WINDOW = 20  # step() calls the it/s estimate (and so the ETA) averages over
_RESERVED = ("iteration", "time", "validation")


# --------------------------------------------------------------------------- formatting


def _number(value: Any) -> int | float:
    """A metric (python/numpy number, 0-d array or one-element tensor) as int or float."""
    if isinstance(value, bool | int | np.integer):
        return int(value)
    return float(value)


def _json_safe(values: Mapping[str, int | float]) -> dict[str, int | float | None]:
    """NaN and inf become null: events.jsonl stays strict JSON (jq, pandas, JavaScript)."""
    return {k: v if isinstance(v, int) or math.isfinite(v) else None for k, v in values.items()}


def _fmt(value: float | None) -> str:
    """Compact, stable number text for the console: 0.4123, 1.234e-05, nan."""
    if value is None or math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == 0:
        return "0"
    if 1e-3 <= abs(value) < 1e5:
        return f"{value:.4f}"
    return f"{value:.3e}"


def _fmt_rate(rate: float | None) -> str:
    if rate is None or not math.isfinite(rate):
        return "? it/s"
    if rate >= 1000:
        return f"{rate:.0f} it/s"
    return f"{rate:.3g} it/s"


def _fmt_duration(seconds: float | None) -> str:
    """9m54s, 45s, 1h02m, 2d03h; '?' when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _fmt_losses(metrics: Mapping[str, float]) -> str:
    """'loss 0.4123 (affinity 0.4123, mito 0.1000)' from 'loss/total' and 'loss/<task>'."""
    parts = {k[len("loss/"):]: v for k, v in metrics.items() if k.startswith("loss/")}
    has_total = "total" in parts or "loss" in metrics
    total = parts.pop("total") if "total" in parts else metrics.get("loss")
    inner = ", ".join(f"{name} {_fmt(v)}" for name, v in parts.items())
    if has_total:
        return f"loss {_fmt(total)}" + (f" ({inner})" if inner else "")
    return f"loss ({inner})" if inner else ""


# --------------------------------------------------------------------------- TensorBoard


class _TensorBoard:
    """torch's asynchronous event-file writer; all scalars of one call go in one event.

    One multi-value summary per step (as TensorBoard has always read them) instead of one
    event per scalar: the writer thread computes a pure-Python CRC per event, so fewer, larger
    events cost the training loop several times less.
    """

    def __init__(self, log_dir: Path, purge_step: int | None) -> None:
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.compat.proto.summary_pb2 import Summary
        from torch.utils.tensorboard.writer import FileWriter

        self._summary = Summary
        # A roomy queue so a burst of events never waits on the writer thread.
        self._writer = FileWriter(str(log_dir), max_queue=1000, flush_secs=30)
        if purge_step is not None:
            # As SummaryWriter(purge_step=...) does: TensorBoard then hides the events an
            # earlier (crashed) run wrote at steps >= purge_step.
            self._writer.add_event(Event(step=purge_step, file_version="brain.Event:2"))
            self._writer.add_event(Event(step=purge_step,
                                         session_log=SessionLog(status=SessionLog.START)))

    def scalars(self, values: Mapping[str, float], step: int, walltime: float) -> None:
        value = self._summary.Value
        summary = self._summary(value=[value(tag=tag, simple_value=v) for tag, v in values.items()])
        self._writer.add_summary(summary, step, walltime)

    def image(self, tag: str, image: np.ndarray, step: int, walltime: float) -> None:
        height, width = image.shape[:2]
        channels = 1 if image.ndim == 2 else image.shape[2]  # colorspace: 1 grey, 3 RGB, 4 RGBA
        encoded = self._summary.Image(height=height, width=width, colorspace=channels,
                                      encoded_image_string=_png(image))
        summary = self._summary(value=[self._summary.Value(tag=tag, image=encoded)])
        self._writer.add_summary(summary, step, walltime)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class _ScalarOnlyTensorBoard:
    """Fallback over ``tensorboard.summary.Writer`` (scalars only) when torch's writer fails."""

    def __init__(self, log_dir: Path) -> None:
        from tensorboard.summary import Writer

        self._writer = Writer(str(log_dir))

    def scalars(self, values: Mapping[str, float], step: int, walltime: float) -> None:
        for tag, v in values.items():
            self._writer.add_scalar(tag, v, step, wall_time=walltime)

    def image(self, *args: Any, **kwargs: Any) -> None:  # this API writes no images
        return None

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _quiet_writer_failures(args: Any) -> None:
    """`threading.excepthook` that leaves out TensorBoard's writer thread failing to write (a
    full disk, a folder made read-only): that thread printed its traceback, then the trainer
    got the same error at its next write or close and reported it in one line (exit 2)."""
    if isinstance(args.exc_value, OSError) and \
            type(args.thread).__module__.startswith("tensorboard."):
        return
    _PREVIOUS_EXCEPTHOOK(args)


_PREVIOUS_EXCEPTHOOK = threading.excepthook


def _quiet_tensorboard_threads() -> None:
    """Install `_quiet_writer_failures` once (other threads' failures print as before)."""
    global _PREVIOUS_EXCEPTHOOK
    if threading.excepthook is not _quiet_writer_failures:
        _PREVIOUS_EXCEPTHOOK = threading.excepthook
        threading.excepthook = _quiet_writer_failures


def _open_tensorboard(log_dir: Path, purge_step: int | None) -> tuple[Any, str | None]:
    """torch's TensorBoard writer, else a scalar-only fallback, else None; plus a warning."""
    _quiet_tensorboard_threads()
    try:
        return _TensorBoard(log_dir, purge_step), None
    except Exception as exc:  # torch's wrapper broken against this tensorboard/protobuf
        reason = f"{type(exc).__name__}: {exc}"
    try:
        return _ScalarOnlyTensorBoard(log_dir), (
            f"torch.utils.tensorboard unavailable ({reason}); TensorBoard gets scalars only")
    except Exception as exc:
        return None, (f"TensorBoard unavailable ({reason}; {type(exc).__name__}: {exc}); "
                      f"metrics go to {EVENTS_FILE} only")


def _image_for_tensorboard(tag: str, panel: Any) -> np.ndarray:
    """A panel in [0, 1] (NaN = excluded, shown mid-grey) as uint8, (H, W) or (H, W, 3|4)."""
    if hasattr(panel, "detach"):  # a torch tensor, possibly on the GPU
        panel = panel.detach().float().cpu().numpy()
    array = np.asarray(panel, dtype=np.float32)
    if array.ndim == 3 and array.shape[-1] == 1:  # HW1
        array = array[..., 0]
    elif array.ndim == 3 and array.shape[0] == 1:  # 1HW
        array = array[0]
    elif array.ndim == 3 and array.shape[-1] not in (3, 4) and array.shape[0] in (3, 4):
        array = np.moveaxis(array, 0, -1)  # CHW -> HWC
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ValueError(f"image panel {tag!r} must be 2D (H, W) or RGB(A) (H, W, 3|4), "
                         f"got shape {tuple(np.shape(panel))}")
    array = np.where(np.isnan(array), np.float32(0.5), array)  # +-inf are clipped below
    return (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _png(image: np.ndarray) -> bytes:
    """Grey panels stay one-channel PNGs (torch's add_image would triple them to RGB)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------- the logger


class RunLogger:
    """Everything a training run reports.

    events.jsonl (one JSON object per log step), TensorBoard scalars and image panels, and a
    live terminal display (rich) that falls back to plain lines when stdout is not a terminal
    (CI logs). Only rank 0 writes (``enabled=False`` makes every method a no-op).

    Iterations count completed iterations (the first logged one is 1): ``total`` is the one
    the run ends at, ``start`` the one it starts or resumes from (the checkpoint's). On resume
    events.jsonl keeps the records up to ``start`` only (`keep_history`), and TensorBoard is
    told to hide the crashed run's events after ``start``.
    ``live=None`` shows the progress bar exactly when ``console.is_terminal``.
    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, run_dir: Path, *, total: int, enabled: bool = True,
                 console: Console | None = None, start: int = 0,
                 live: bool | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.total = int(total)
        self.enabled = enabled
        self._closed = not enabled
        self._events: TextIO | None = None
        self._tb: Any = None
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self.console = console if console is not None else Console(highlight=False)
        self.live = bool(enabled and (self.console.is_terminal if live is None else live))
        if not enabled:
            return
        try:
            self._open(int(start))
        except BaseException:
            self.close()
            raise

    def _open(self, start: int) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        events_path = self.run_dir / EVENTS_FILE
        if events_path.exists() and not events_path.is_file():  # was an internal error
            raise UserError(f"{events_path}: is not a file, so not the run's event log "
                            f"({EVENTS_FILE}); move it out of the run folder and run again")
        keep_history(events_path, start)
        self._events = events_path.open("a", encoding="utf-8")
        # A resumed run logs from start + 1 on: TensorBoard hides what a crashed run wrote
        # there. A run stopped before its first checkpoint and resumed starts again from 0:
        # its abandoned curve was shown beside the new one.
        tensorboard = self.run_dir / TENSORBOARD_DIR
        earlier = start > 0 or (tensorboard.is_dir() and any(tensorboard.iterdir()))
        self._tb, warning = _open_tensorboard(tensorboard,
                                              purge_step=start + 1 if earlier else None)
        if warning:
            self.console.print(f"warning: {warning}", markup=False, highlight=False,
                               soft_wrap=True)
        if self.live:
            self._progress = Progress(
                TextColumn("iter"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TextColumn("ETA {task.fields[eta]}"),
                TextColumn("{task.fields[losses]}"),
                console=self.console, refresh_per_second=4, transient=False,
            )
            self._task = self._progress.add_task("train", total=self.total, completed=start,
                                                 rate="? it/s", eta="?", losses="")
            self._progress.start()
        # (iteration, monotonic seconds) of recent step() calls, for it/s and ETA
        self._marks: deque[tuple[int, float]] = deque([(start, time.perf_counter())],
                                                      maxlen=_RATE_WINDOW + 1)

    # ----------------------------------------------------------------- public API

    def step(self, iteration: int, metrics: Mapping[str, float]) -> None:
        """Record one log step: a JSON line, TensorBoard scalars, and the display."""
        if not self.enabled:
            return
        self._check_open()
        for key in _RESERVED:
            if key in metrics:
                raise ValueError(f"metric name {key!r} is reserved in {EVENTS_FILE}")
        now = time.time()
        values = {name: _number(value) for name, value in metrics.items()}
        self._write({"iteration": int(iteration), "time": now, **_json_safe(values)})
        if self._tb is not None and values:
            self._tb.scalars(values, iteration, now)

        self._marks.append((int(iteration), time.perf_counter()))
        rate, eta = self._rate_eta(int(iteration))
        losses = _fmt_losses(values)
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=iteration, rate=_fmt_rate(rate),
                                  eta=_fmt_duration(eta), losses=losses)
            return
        parts = [f"iter {iteration}/{self.total}"]
        if losses:
            parts.append(losses)
        if "lr" in values:
            parts.append(f"lr {values['lr']:.1e}")
        parts += [_fmt_rate(rate), f"ETA {_fmt_duration(eta)}"]
        self._line("  ".join(parts))

    def images(self, iteration: int, panels: Mapping[str, np.ndarray]) -> None:
        """2D panels in [0, 1] (NaN = excluded, drawn mid-grey) as TensorBoard images."""
        if not self.enabled:
            return
        self._check_open()
        if self._tb is None:
            return
        now = time.time()
        for tag, panel in panels.items():
            self._tb.image(tag, _image_for_tensorboard(tag, panel), iteration, now)

    def validation(self, iteration: int, metrics: Mapping[str, float]) -> None:
        """A validation record in events.jsonl, 'validation/<name>' scalars, one console line."""
        if not self.enabled:
            return
        self._check_open()
        now = time.time()
        values = {name: _number(value) for name, value in metrics.items()}
        self._write({"iteration": int(iteration), "time": now, "validation": _json_safe(values)})
        if self._tb is not None and values:
            self._tb.scalars({f"validation/{name}": value for name, value in values.items()},
                             iteration, now)
        parts = [f"validation iter {iteration}/{self.total}", _fmt_losses(values)]
        parts += [f"{name} {_fmt(value)}" for name, value in values.items()
                  if name != "loss" and not name.startswith("loss/")]
        self._line("  ".join(part for part in parts if part))

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` of non-training time (a validation, a checkpoint) out of the
        it/s estimate and the ETA: otherwise one pause skews them for a whole rate window."""
        if not self.enabled or seconds <= 0:
            return
        self._marks = deque(((it, t + seconds) for it, t in self._marks),
                            maxlen=self._marks.maxlen)

    def message(self, text: str) -> None:
        """One line on the console, printed above the live display when there is one."""
        if not self.enabled:
            return
        self._line(text)

    def close(self) -> None:
        """Stop the display, flush and close TensorBoard and events.jsonl. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._progress is not None:
                self._progress.stop()
        finally:
            try:
                if self._tb is not None:
                    self._tb.flush()
                    self._tb.close()
            finally:
                if self._events is not None:
                    self._events.close()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- internals

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("RunLogger is closed")

    def _write(self, record: dict[str, Any]) -> None:
        assert self._events is not None
        self._events.write(json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n")
        self._events.flush()  # a killed run keeps every line written so far

    def _line(self, text: str) -> None:
        # markup off (paths with [brackets] stay intact), no highlighting, never wrapped
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def _rate_eta(self, iteration: int) -> tuple[float | None, float | None]:
        (it0, t0), (it1, t1) = self._marks[0], self._marks[-1]
        if it1 <= it0 or t1 <= t0:
            return None, None
        rate = (it1 - it0) / (t1 - t0)
        return rate, max(0, self.total - iteration) / rate


def keep_history(path: Path, start: int) -> None:
    """Cut ``path`` (events.jsonl) back to the history a run at iteration ``start`` continues:
    the records of iterations after ``start`` (an abandoned attempt's, which the run writes
    again) and a line a kill left half-written go; ``start`` 0 leaves no record. Appended to
    as it was, the file held two curves for the same iterations and a line that is not
    JSON. Rewritten atomically (a kill leaves the old file or the new one), and only when
    something goes."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # a kill during an earlier cut
        stale.unlink(missing_ok=True)
    if not path.is_file():
        return
    with path.open("rb") as f:
        if all(_kept(line, start) for line in f):
            return
    with atomic_output(path) as temp, path.open("rb") as old, temp.open("wb") as new:
        new.writelines(line for line in old if _kept(line, start))


def _kept(line: bytes, start: int) -> bool:
    """Whether a line of events.jsonl belongs to the history up to ``start``: a whole record
    of that iteration or an earlier one (or a whole record without an iteration, not ours to
    drop)."""
    if not line.endswith(b"\n"):
        return False  # half a line: a killed run's last write
    try:
        record = json.loads(line)
    except ValueError:
        return False
    iteration = record.get("iteration") if isinstance(record, dict) else None
    if not isinstance(iteration, int) or isinstance(iteration, bool):
        return True
    return iteration <= start
