"""Process-wide memory settings made once when the `emrun` command starts.

glibc's malloc gives each thread that allocates while another holds the lock an arena of its
own, up to 8 per core, and memory freed into an arena stays mapped there. emrun's threaded
stages (the pyramid's block writers, zarr's codec threads, infer's readers and writers)
allocate and free block-sized buffers from many threads, so peak RSS grew with the number of
threads that ever touched a buffer. Two arenas, measured on a 2-core VM (medians of 3):
`emrun data convert` of a 128 x 1024 x 1024 uint32 segmentation with its pyramid 491 -> 362
MB, of the uint8 image 296 -> 245 MB, `emrun evaluate` streamed on it 239 -> 180 MB, with
no measurable change in time (convert, evaluate, `bench infer --no-model`, `bench model`).
On a larger machine the cap is one arena per core (`default_arenas`): threads beyond the
cores cannot allocate at once anyway, and a many-core GPU host keeps its allocation
throughput while shedding glibc's 8 per core.

The worker processes emrun spawns (evaluate and segment pools, infer's local workers, the
training loader, background validation) never pass through the command's start: the cap
reaches them through the environment, which glibc reads before Python starts
(`limit_malloc_arenas` sets `MALLOC_ARENA_MAX`, and `EMRUN_MALLOC_ARENA_MAX` to say the value
is emrun's own, so that an emrun started from it elsewhere, by srun on a larger node, counts
its own cores instead of keeping the count of the machine that launched it).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Mapping, MutableMapping

M_ARENA_MAX = -8
"""glibc's mallopt parameter for the most arenas (malloc.h)."""

MIN_ARENAS = 2
"""The fewest arenas allowed: 2 measured as low as 1 and clearly lower than 4 (2 cores)."""

ENV = "MALLOC_ARENA_MAX"
OURS = "EMRUN_MALLOC_ARENA_MAX"
"""Set with `ENV` to the same value when emrun set it (for its child processes)."""
TUNABLE = "glibc.malloc.arena_max"


def user_chose_arenas(environ: Mapping[str, str]) -> bool:
    """Whether the user set the arena limit (`MALLOC_ARENA_MAX` or the GLIBC_TUNABLES
    entry): theirs stands, also as the way to undo ours (MALLOC_ARENA_MAX=8 per core). A
    `MALLOC_ARENA_MAX` that an emrun set for its children (`OURS` alike) is not theirs."""
    if ENV in environ and environ.get(OURS) != environ[ENV]:
        return True
    return TUNABLE in environ.get("GLIBC_TUNABLES", "")


def glibc_mallopt() -> Callable[[int, int], int] | None:
    """glibc's `mallopt`, or None on any other C library (musl, macOS, Windows), which has
    no arenas to limit or another meaning for parameter -8."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, ValueError, TypeError):
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt  # type: ignore[no-any-return]


def default_arenas() -> int:
    """One arena per core this process may use (a SLURM or taskset allocation), at least
    `MIN_ARENAS`."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(MIN_ARENAS, cores)


def limit_malloc_arenas(arenas: int | None = None,
                        environ: MutableMapping[str, str] | None = None,
                        mallopt: Callable[[int, int], int] | None = None) -> bool:
    """Cap glibc's malloc arenas at `arenas` (default: `default_arenas`) for this process,
    and through ``environ`` (default: this process's) for the processes it starts; returns
    whether it did. Call it before threads start: glibc fixes its limit when a thread first
    needs an arena of its own. Nothing is done where the user set a limit or the C library
    is not glibc, and it never fails: a missed limit costs memory, not correctness."""
    environ = os.environ if environ is None else environ
    if user_chose_arenas(environ):
        return False
    mallopt = mallopt or glibc_mallopt()
    if mallopt is None:
        return False
    count = arenas or default_arenas()
    try:
        done = bool(mallopt(M_ARENA_MAX, count))
    except (OSError, ValueError, TypeError, ctypes.ArgumentError):
        return False
    if done:
        environ[ENV] = environ[OURS] = str(count)
    return done
