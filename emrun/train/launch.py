"""`emrun train --gpus N`: start the ranks under torchrun and report how they ended.

torchrun (run here in-process) answered any rank's failure with its own traceback and exit
code 1, after every rank had printed the same user error: a recipe mistake found in the ranks
(a validation source with nothing to score, a run stopped by non-finite losses) came back as
the same message N times, a Python traceback and "internal error" code 1. The ranks now leave
a user error in a folder instead of printing it; the launcher says each distinct message once
and exits 2. Any other failure is one line naming the rank and how it ended, with its code.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import UserError

LAUNCHED = "EMRUN_LAUNCHED"
"""Set in the ranks `launch_ranks` starts: the launcher has checked and warned."""

RANK_ERRORS = "EMRUN_RANK_ERRORS"
"""Set in the ranks: the folder where a rank leaves its user error for the launcher."""


def said_to_launcher(message: str) -> bool:
    """Whether ``message`` (a user error) is said already, so this process only exits 2.

    In a rank `launch_ranks` started: left for the launcher, which says it once for all
    ranks. In a rank of a torchrun the user started himself (``torchrun ... -m emrun train``):
    True when another rank of this machine has said the same message, False for the first,
    which says it (every rank printed it, N times). False outside any rank: say it yourself.
    """
    folder, rank = os.environ.get(RANK_ERRORS), os.environ.get("RANK")
    if not folder or rank is None or not Path(folder).is_dir():
        return said_by_another_rank(message)
    part = Path(folder) / f"rank-{rank}.part"
    part.write_text(message)
    part.replace(part.with_suffix(".txt"))  # whole, or not there
    return True


def left_for_launcher(line: str) -> bool:
    """Whether a rank's closing line (an interruption, an internal or other error: not a
    user error, see `said_to_launcher`) is left for the launcher, in a rank `launch_ranks`
    started. When one rank dies, torchrun stops the others and each said its own ending
    first: "stopped by SIGTERM", or a collective's lost connection as a bug in emrun, before
    the launcher's line naming the rank that died. The launcher says the line of the rank
    whose end ended the run, or, stopped itself, each distinct line once."""
    folder, rank = os.environ.get(RANK_ERRORS), os.environ.get("RANK")
    if not folder or rank is None or not Path(folder).is_dir():
        return False
    part = Path(folder) / f"{LINE_PREFIX}{rank}.part"
    part.write_text(line)
    part.replace(part.with_suffix(".txt"))
    return True


LINE_PREFIX = "line-rank-"
"""The file name before the rank of a closing line a rank left for the launcher."""


def said_by_another_rank(message: str) -> bool:
    """In a rank of a hand-started torchrun: claim ``message`` with a marker file in the
    folder torchrun made for this attempt of the run (shared by the ranks of this machine,
    made anew for each launch and restart); True when another rank claimed it first."""
    folder = _torchrun_attempt_folder()
    if folder is None:
        return False
    digest = hashlib.sha256(message.encode("utf-8", "replace")).hexdigest()[:16]
    try:
        os.close(os.open(folder / f"emrun-said-{digest}", os.O_CREAT | os.O_EXCL | os.O_WRONLY,
                         0o644))
    except FileExistsError:
        # torchrun stops the other ranks once one has exited: leave the one that claimed
        # the message (it prints it at once) the moment it needs to say it
        time.sleep(_GRACE_S)
        return True
    except OSError:  # the folder cannot be written: better twice than not at all
        return False
    return False


_GRACE_S = 0.5


def _torchrun_attempt_folder() -> Path | None:
    """``<log dir>/<run id>/attempt_<n>`` of the torchrun agent that started this process
    (its per-rank error file, TORCHELASTIC_ERROR_FILE, lies in ``<local rank>/`` below it);
    None outside a rank of several, or when torchrun keeps no such folder."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return None
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if size <= 1 or not error_file or os.environ.get("RANK") is None:
        return None
    folder = Path(error_file).parent.parent
    return folder if folder.name.startswith("attempt_") and folder.is_dir() else None


def launch_ranks(processes: int, args: list[str]) -> int:
    """Run ``emrun *args`` as ``processes`` ranks under torchrun on this machine; the exit
    code of the run (a user error found in the ranks: raised here, said once)."""
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    parsed = torchrun.parse_args(["--standalone", f"--nproc_per_node={processes}",
                                  "-m", "emrun", *args])
    with tempfile.TemporaryDirectory(prefix="emrun-ranks-") as folder, \
            _environment({LAUNCHED: "1", RANK_ERRORS: folder}), _quiet_torchrun():
        try:
            torchrun.run(parsed)
        except ChildFailedError as exc:
            if said := rank_errors(Path(folder)):
                raise UserError(said) from None
            rank, code = _ending_rank({r: f.exitcode for r, f in exc.failures.items()},
                                      exc.get_first_failure()[0])
            if code >= 0 and (line := rank_lines(Path(folder), only=rank)):
                print(line, flush=True, file=sys.stderr)
            return _failure_code(rank, code)
        except SignalException as exc:  # Ctrl-C or a kill: the ranks were given it too
            if lines := rank_lines(Path(folder)):
                print(lines, flush=True, file=sys.stderr)
            return 128 + int(exc.sigval)
    return 0


def _ending_rank(codes: dict[int, int], first: int) -> tuple[int, int]:
    """(rank, exit code) of the failure that ended a run: a rank killed by a signal torchrun
    does not send (SIGKILL: the kernel's out-of-memory killer, a user's kill -9), else the
    first failure. The others' failures follow from it (a lost peer fails their
    collectives; torchrun then stops them), whichever torchrun happened to see first."""
    stops = {-signal.SIGTERM, -signal.SIGINT}
    killed = [rank for rank, code in sorted(codes.items()) if code < 0 and code not in stops]
    rank = killed[0] if killed else first
    return rank, codes[rank]


def rank_lines(folder: Path, only: int | None = None) -> str:
    """The closing lines the ranks left (`left_for_launcher`), each distinct one once (only
    rank ``only``'s when given); "" when none did."""
    lines: list[str] = []
    for path in sorted(folder.glob(f"{LINE_PREFIX}*.txt"),
                       key=lambda p: int(p.stem[len(LINE_PREFIX):])):
        if (only is None or int(path.stem[len(LINE_PREFIX):]) == only) and \
                (line := path.read_text().rstrip("\n")) not in lines:
            lines.append(line)
    return "\n".join(lines)


def rank_errors(folder: Path) -> str:
    """The user errors the ranks left, each distinct message once (prefixed with its ranks
    when they differ); "" when none did."""
    by_message: dict[str, list[int]] = {}
    for path in sorted(folder.glob("rank-*.txt"), key=lambda p: int(p.stem[5:])):
        by_message.setdefault(path.read_text(), []).append(int(path.stem[5:]))
    if len(by_message) == 1:
        return next(iter(by_message))
    return "\n".join(f"rank {', '.join(map(str, ranks))}: {message}"
                     for message, ranks in by_message.items())


def _failure_code(rank: int, code: int) -> int:
    """The run's exit code for the first rank that failed. A rank that exited said why
    itself (a user error of its own kind, an internal error, an interruption); one killed
    by a signal is named here, in one line."""
    if code >= 0:
        return code
    name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
    hint = " (as the kernel does when memory runs out)" if name == "SIGKILL" else ""
    print(f"error: rank {rank} was killed by {name}{hint}; its checkpoints up to then are "
          "kept: continue with --resume", flush=True, file=sys.stderr)
    return 128 - code


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` in this process's environment (the ranks inherit it), then as before."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _quiet_torchrun() -> Iterator[None]:
    """torchrun's own log lines (its OMP_NUM_THREADS banner, "Sending process ... closing
    signal", "failed (exitcode: 2)") would come around the one line that says what happened."""
    names = [name for name in logging.root.manager.loggerDict
             if name.startswith("torch.distributed")]  # each sets its own level
    loggers = [logging.getLogger(name) for name in ["torch.distributed", *names]]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
