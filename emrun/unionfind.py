"""Union-find for the compiled (numba) loops that need one (Kruskal's algorithm in MALIS; the
fragments' seeded watershed keeps its own, with seed ids at the roots). Arrays only, so
numba compiles it into its callers. Their on-disk cache (``cache=True``) is checked against
their own file alone: after an edit here, delete the ``*.nbi``/``*.nbc`` files in the callers'
``__pycache__`` folders (or touch the callers), or they keep the old code."""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["find"]


@numba.njit(cache=True, nogil=True, inline="always")
def find(parent: np.ndarray, v: int) -> int:  # pragma: no cover - compiled
    """The root of ``v``'s tree, halving the path on the way (each node visited points to
    its grandparent afterwards), so later finds are short."""
    while parent[v] != v:
        parent[v] = parent[parent[v]]
        v = parent[v]
    return v
