"""Keep the memory a process frees for its next sample (glibc), instead of handing it back.

A training sample is made of a few dozen arrays of 1 to 30 MB (crop, warp, targets, packed
copies), freed when the sample is done. glibc serves such sizes by ``mmap`` and returns them
at ``free``, or trims them off the heap's top, so the next sample's arrays are fresh pages
again: the kernel zeroes each 4 KB page on its first touch, which cost about as much as the
computing itself (12 affinity channels of a 20x256x256 patch: 2.5 ms to compute, 12 ms with
their 31 MB of fresh pages). A process that only makes samples (a loader worker) asks glibc
once to serve arrays of up to ``MMAP_THRESHOLD`` from its heap and to keep up to
``TRIM_THRESHOLD`` freed there; the values computed are the same either way. The trainer
making its own samples (``workers: 0``) does not: its heap also holds the network's tensors,
and the setting kept its memory 60 to 150 MB higher between steps (patch 20x128x128 on a
CPU) for a gain lost in the step's time. Elsewhere (not glibc) nothing is changed.
"""

from __future__ import annotations

import functools

from ..memory import glibc_mallopt

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter numbers (malloc.h)."""

MMAP_THRESHOLD = 32 * 2**20
"""The largest that glibc allows (``DEFAULT_MMAP_THRESHOLD_MAX`` on 64-bit): larger arrays
(a batch of several samples' targets) are still mapped and returned."""

TRIM_THRESHOLD = 256 * 2**20
"""Freed heap memory a sample-making process keeps at most: one sample of the largest shipped
recipes (about 200 MB at its peak), not more, as each loader worker keeps its own."""


@functools.cache
def keep_freed_memory() -> bool:
    """Ask glibc, once per process, to keep freed sample-sized arrays for reuse; whether it
    took the setting (False off glibc)."""
    mallopt = glibc_mallopt()
    if mallopt is None:
        return False
    # mmap threshold first: setting it stops glibc moving both thresholds itself
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
