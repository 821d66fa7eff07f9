"""Where patches and blocks go: one global patch lattice, blocks of whole output chunks.

Patches start at ``origin + k * stride`` per axis, with ``origin = -(patch - stride) // 2``
so that the volume's first voxels sit well inside the first patch, and continue until the
volume's end is covered. Every voxel's prediction is the weighted mean of the patches of this
one lattice that cover it, whichever block computes it: so the output does not depend on the
block size, and any block can be recomputed or resumed alone. A block writes a whole number
of output chunks, so concurrent writers never share a chunk.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import asdict, dataclass

Zyx = tuple[int, int, int]


@dataclass(frozen=True)
class Layout:
    """The lattice and block grid of one inference job."""

    shape: Zyx  # the volume, z, y, x
    patch: Zyx
    stride: Zyx
    chunks: Zyx  # output chunk (spatial)
    block: Zyx  # write block (spatial), a multiple of chunks

    def __post_init__(self) -> None:
        if any(b % c for b, c in zip(self.block, self.chunks, strict=True)):
            raise ValueError(f"block {list(self.block)} is not a whole number of chunks "
                             f"{list(self.chunks)}")
        if any(s < 1 or s > p for s, p in zip(self.stride, self.patch, strict=True)):
            raise ValueError(f"stride {list(self.stride)} must be in 1..patch {list(self.patch)}")

    @property
    def origin(self) -> Zyx:
        return tuple(-((p - s) // 2) for p, s in zip(self.patch, self.stride, strict=True))  # type: ignore[return-value]

    def starts(self, axis: int) -> list[int]:
        """Lattice starts along ``axis`` whose patches are needed to cover the volume."""
        o, p, s, n = self.origin[axis], self.patch[axis], self.stride[axis], self.shape[axis]
        last = max(0, math.ceil((n - o - p) / s))
        return [o + k * s for k in range(last + 1)]

    def patch_count(self) -> int:
        """Patches in the lattice: what a job predicts when no patch is predicted twice."""
        return math.prod(len(self.starts(a)) for a in range(3))

    def block_grid(self) -> list[Zyx]:
        """Block indices, z-major."""
        counts = [math.ceil(n / b) for n, b in zip(self.shape, self.block, strict=True)]
        return list(itertools.product(*(range(c) for c in counts)))  # type: ignore[arg-type]

    def write_box(self, block: Zyx) -> tuple[Zyx, Zyx]:
        """(start, stop) of the voxels this block writes, clipped to the volume."""
        start = tuple(i * b for i, b in zip(block, self.block, strict=True))
        stop = tuple(min(a + b, n) for a, b, n in zip(start, self.block, self.shape, strict=True))
        return start, stop  # type: ignore[return-value]

    def patches(self, block: Zyx) -> list[Zyx]:
        """Starts of every lattice patch that covers a voxel of the block."""
        start, stop = self.write_box(block)
        per_axis = []
        for axis in range(3):
            p = self.patch[axis]
            per_axis.append([s for s in self.starts(axis)
                             if s < stop[axis] and s + p > start[axis]])
        return list(itertools.product(*per_axis))  # type: ignore[arg-type]

    def read_box(self, block: Zyx) -> tuple[Zyx, Zyx]:
        """(start, stop) of the input the block's patches read (may reach outside the volume:
        the engine pads it by reflection about the volume's own borders)."""
        patches = self.patches(block)
        start = tuple(min(p[a] for p in patches) for a in range(3))
        stop = tuple(max(p[a] for p in patches) + self.patch[a] for a in range(3))
        return start, stop  # type: ignore[return-value]

    def digest(self) -> str:
        """A short hash of the layout: done-markers and resumption are keyed by it."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def choose_chunks_and_block(shape: Zyx, patch: Zyx, stride: Zyx, chunks: Zyx | None,
                            block: Zyx | None) -> tuple[Zyx, Zyx]:
    """Default chunks tile the block; the default block is 8 strides per axis (patches that
    straddle a block border are predicted by both blocks: larger blocks waste less)."""
    if block is None:
        block = tuple(min(n, max(s * 8, p)) for n, s, p in zip(shape, stride, patch, strict=True))  # type: ignore[assignment]
    assert block is not None
    if chunks is None:
        chunks = tuple(_largest_divisor_at_most(b, 256 if a else 32) for a, b in enumerate(block))  # type: ignore[assignment]
    assert chunks is not None
    return chunks, block


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)
