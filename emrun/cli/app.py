"""The typer apps, the consoles, the options shared by commands, and the guard that turns
failures into one line and an exit code (a user's mistake 2, emrun's own 1)."""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from .. import __version__
from ..errors import (
    Interrupted,
    NotImplementedYet,
    UserError,
    UserWarned,
    disk_full,
    host_out_of_memory,
    not_a_folder,
    not_allowed,
)
from ..memory import limit_malloc_arenas
from ..subprocesses import catching_signals

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="emrun",
    help="Recipe-driven training and chunked inference for 3D EM segmentation.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
data_app = typer.Typer(help="Data tools: convert volumes, make synthetic EM, preview samples.",
                       no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks: data loading, model, trainer, inference, "
                        "segmentation, SNEMI3D.",
                        no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")

READER_GONE = 141
"""The exit code when stdout's (or stderr's) reader closed it (`emrun recipes | head -1`):
as a shell reports a process ended by SIGPIPE; not an error of ours or the user's."""


def _closed(stream: Any) -> bool:
    """Whether ``stream`` is a pipe whose reader has gone (polling it reports an error)."""
    import select

    try:
        poller = select.poll()
        poller.register(stream.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # not a real file (a test's capture)
        return False


def reader_gone() -> int | None:
    """READER_GONE when stdout or stderr lost its reader, after pointing them at /dev/null
    (Python's last flush would fail again and print noise); None otherwise."""
    gone = [stream for stream in (sys.stdout, sys.stderr) if _closed(stream)]
    for stream in gone:
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
    return READER_GONE if gone else None


def write_whole(text: str) -> None:
    """Write ``text`` to stdout to its last byte, or fail: a write larger than a pipe holds
    came back short when the reader left part-way (`emrun schema --output - | head`), and
    Python's text stream dropped the rest without a word (exit 0); the next write of what is
    left raises BrokenPipeError, ended as READER_GONE."""
    sys.stdout.flush()
    left = memoryview(text.encode(sys.stdout.encoding or "utf-8"))
    while left:
        written = sys.stdout.buffer.write(left)
        if not written:  # nothing taken (a non-blocking stdout would come back at once)
            raise BrokenPipeError(errno.EPIPE, "stdout took none of the output")
        left = left[written:]
    sys.stdout.buffer.flush()


class _Console(Console):
    """A console that ends a command whose reader went away with READER_GONE: rich's own
    ending is a silent exit 1, which reads as emrun's internal error."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise typer.Exit(reader_gone() or READER_GONE)


# emoji=False: rich would turn ":x:" in a user's text (--device cuda:x:) into an emoji
out = _Console(highlight=False, soft_wrap=True, emoji=False)
err = _Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)

Overrides = Annotated[
    list[str] | None,
    typer.Option("--override", "-o", metavar="KEY.PATH=VALUE",
                 help="Override a recipe value (VALUE is YAML); repeatable."),
]
RecipeFile = Annotated[Path, typer.Argument(metavar="RECIPE", help="Recipe YAML file.")]
Device = Annotated[str | None, typer.Option(
    metavar="cpu|cuda|cuda:N", help="Device (default: cuda when there is one, else cpu).")]
JsonLine = Annotated[bool, typer.Option(
    "--json", help="Print the figures as one JSON line on stdout (the text for people goes to "
    "stderr, so `... --json | jq` works).")]
ANY_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}
Levels = Annotated[int | None, typer.Option(
    metavar="N", help="Multiscale levels written, each halving y and x (z where anisotropy "
    "allows); 1 = full resolution only (default: until y and x are at most 256, at most 8).")]
Nm = Annotated[tuple[float, float, float] | None, typer.Option(metavar="Z Y X",
                                                                help="Voxel size in nm.")]
LevelChoice = Annotated[str | None, typer.Option(
    "--level", metavar="NAME|Z,Y,X", help="The input's level of a multiscale image (OME-Zarr, "
    "precomputed, N5 pyramid): its name (1 in emrun's stores, s1 in some others') or its "
    "voxel size in nm, z,y,x (40,8,8).")]


def at_level(path: str, level: str | None) -> str:
    """The path naming `level` of the multiscale image at `path` (itself without --level)."""
    if level is None:
        return path
    from ..io import choose_level

    return choose_level(path, level)



class _Terminated(BaseException):
    """SIGTERM in a command that has no stop of its own, raised in its main thread as Ctrl-C's
    KeyboardInterrupt is, so that the command's clean-up runs."""


STOPPED_TEXT = ("nothing half-written stands under a final name; run the command again "
                "(with --resume where it has one)")


@contextlib.contextmanager
def _sigterm_as_stop() -> Iterator[None]:
    """SIGTERM (a cluster's time limit, `timeout`, `kill`) ends a command that takes no stop
    of its own (`data convert`, `data synth`, `segment` in memory, `export`, ...) as Ctrl-C
    does: its clean-up runs and one line says so, exit 143. It ended them on the spot without
    a word, leaving their partial volumes for the next run to clear. Commands with their own
    stop (train, infer, ...) put their handler in place of this one while they run; a forked
    helper that inherits it dies of the signal as before."""
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield  # an embedding program's own handling stays
        return
    owner = os.getpid()

    def stop(_name: str) -> None:
        if os.getpid() != owner:  # a forked helper: killed as it would have been
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise _Terminated

    with catching_signals(stop, signals=(signal.SIGTERM,)):
        yield


def guarded(fn: F) -> F:
    """Map failures to exit codes: the user's mistakes 2 (message only), ours 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with _sigterm_as_stop(), _text_to_stderr(bool(kwargs.get("json_"))), \
                    _user_warnings_as_lines():
                return fn(*args, **kwargs)
        except UserError as exc:
            from ..train.launch import said_to_launcher

            if said_to_launcher(str(exc)):  # a rank of `train --gpus`: said once, for all
                raise typer.Exit(2) from None
            for line in str(exc).splitlines():
                err.print(f"[red]error:[/] {escape(line)}", markup=True)
            raise typer.Exit(2) from None
        except NotImplementedYet as exc:
            _closing(f"{exc}")
            raise typer.Exit(1) from None
        except Interrupted as exc:
            _closing(f"stopped by {exc.signal_name}: {exc}")
            raise typer.Exit(exc.exit_code) from None
        except (KeyboardInterrupt, _Terminated) as exc:  # in a command without its own stop
            logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # zarr's IO cut short
            sigterm = isinstance(exc, _Terminated)
            _closing(f"stopped by {'SIGTERM' if sigterm else 'SIGINT (Ctrl-C)'}: "
                     f"{STOPPED_TEXT}")
            raise typer.Exit(143 if sigterm else 130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:
            if isinstance(exc, BrokenPipeError) and (code := reader_gone()) is not None:
                raise typer.Exit(code) from None  # `emrun ... --json | head -c 0`
            if (full := disk_full(exc)) is not None:
                _report_disk_full(full)
                raise typer.Exit(2) from None
            if (file := not_a_folder(exc)) is not None:
                _closing(f"error: {file.filename}: is a file, not a folder, so nothing can be "
                         "written under it; give another path")
                raise typer.Exit(2) from None
            if (denied := not_allowed(exc)) is not None:
                where = f" {denied.filename}" if denied.filename else ""
                _closing(f"error: cannot write or read{where} ({denied.strerror}): choose a "
                         "place this user may write, or fix its permissions")
                raise typer.Exit(2) from None
            if type(exc).__name__ == "OutOfMemoryError":  # torch's, without importing torch
                _report_out_of_memory(exc)
                raise typer.Exit(2) from None
            if (short := host_out_of_memory(exc)) is not None:
                _closing(f"error: this machine ran out of memory ({short}): lower "
                         "train.batch_size or train.patch (training), infer.batch_size or "
                         "infer.patch (inference), --block or --shape, or free memory")
                raise typer.Exit(2) from None
            if os.environ.get("EMRUN_DEBUG"):
                traceback.print_exc()
            _closing(f"internal error: {type(exc).__name__}: {exc}\n"
                     "This is a bug in emrun; rerun with EMRUN_DEBUG=1 for a traceback "
                     "and report it.")
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _closing(text: str) -> None:
    """A command's closing line on stderr ("error:" in red); in a rank of `train --gpus`,
    left for the launcher, which says the one that matters (`left_for_launcher`)."""
    from ..train.launch import left_for_launcher

    if left_for_launcher(text):
        return
    if text.startswith("error: "):
        err.print(f"[red]error:[/] {escape(text[len('error: '):])}", markup=True)
    else:
        err.print(text, markup=False)


@contextlib.contextmanager
def _user_warnings_as_lines() -> Iterator[None]:
    """Warnings meant for the user (`UserWarned`) as `warning:` lines, each shown (Python's
    default form names a source line of emrun, and a filter could hide them)."""
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: Any = None, line: str | None = None) -> None:
            if issubclass(category, UserWarned):
                warn([str(message)])
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        warnings.simplefilter("always", UserWarned)
        yield


def _report_disk_full(exc: OSError) -> None:
    """A full disk is the user's to fix: one line, and no noise from zarr's IO tasks that the
    error cut short (asyncio logs them as it shuts down)."""
    where = f" writing {exc.filename}" if exc.filename else ""
    _closing(f"error: the disk is full ({exc.strerror or 'no space left'}){where}: free space "
             "and run the command again (with --resume where it has one); nothing "
             "half-written stands under a final name")
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


def _report_out_of_memory(exc: Exception) -> None:
    """The device's memory is too small for the batch and patch asked for: the user's to
    change (torch's message says what was asked for and what was free)."""
    detail = " ".join(str(exc).split("Including non-PyTorch memory")[0].split())
    _closing(f"error: the device ran out of memory: {detail} Lower train.batch_size or "
             "train.patch (training), or infer.batch_size (inference); bf16 precision halves "
             "activations")


@contextlib.contextmanager
def _text_to_stderr(json_mode: bool) -> Iterator[None]:
    """With --json, stdout carries the JSON line alone: text for people goes to stderr."""
    if not json_mode:
        yield
        return
    saved = out._file  # None: whatever sys.stdout is at the time
    out.file = err.file
    try:
        yield
    finally:
        out._file = saved


def _version(value: bool) -> None:
    if value:
        out.print(f"emrun {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """emrun: declarative experiments for 3D electron-microscopy segmentation."""


def warn(lines: list[str]) -> None:
    """Warnings on stderr, one line each (stdout stays for results)."""
    for line in lines:
        err.print(f"[yellow]warning:[/] {escape(line)}", markup=True)


def main() -> None:
    """Console-script entry point: a usage mistake (unknown option or command, a missing
    argument) is one line and exit 2, like every other mistake."""
    limit_malloc_arenas()  # before any thread starts: see emrun.memory
    try:
        code = app(standalone_mode=False)
    except Exception as exc:
        name = type(exc).__name__
        if name == "Abort":  # Ctrl-C outside a command (while parsing its arguments)
            err.print("stopped by SIGINT (Ctrl-C) before the command started: nothing was "
                      "done", markup=False)
            sys.exit(130)
        if getattr(exc, "exit_code", None) != 2 or not hasattr(exc, "format_message"):
            raise
        if name == "NoArgsIsHelpError":  # `emrun` (or a group) alone: the help
            print(exc.format_message())
            sys.exit(0)
        context = getattr(exc, "ctx", None)
        where = f" (see {context.command_path} --help)" if context is not None else ""
        err.print(f"error: {exc.format_message()}{where}", markup=False)
        sys.exit(2)
    try:
        sys.stdout.flush()  # the last line may still be buffered: its reader may have gone
    except BrokenPipeError:
        sys.exit(reader_gone() or READER_GONE)
    sys.exit(code or 0)

