"""One scaled segmentation job: the inputs, the block grid, the database and what is done.

The parent checks what a user can get wrong and writes the job as JSON into
``OUT.zarr/.emrun-segment/job.json``; a worker, here or on another machine, needs only that
file. Each finished block of a step leaves a done-marker file under
``.emrun-segment/<step>/<bz>_<by>_<bx>`` (the graph step's marker is its row in the database,
committed with the block's nodes and edges), so any scheduler resumes what another started.
The job's ``digest`` covers what decides the fragments (input, offsets, grid, method, mask):
a resumed job whose digest differs refuses to mix its work with the old one. Affinities (or a
mask inside the output) since moved keep their first locations in ``started`` for it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ...atomic import write_text
from ...geometry import BlockGrid, Roi, Zyx, box_of, zyx
from ...io import PRIVATE_PREFIX
from ..affinities import Offset

__all__ = ["FOLDER", "FRAGMENTS", "ScaleJob", "listed_markers", "marker_name", "output_name",
           "saved_job"]

FOLDER = f"{PRIVATE_PREFIX}segment"
FRAGMENTS = "fragments"
JOB_FILE = "job.json"


def output_name(name: str, threshold: float, several: bool) -> str:
    """The segmentation volume of one threshold: ``name`` alone, or ``name_0.7`` among
    several."""
    return f"{name}_{threshold:g}" if several else name


@dataclass(frozen=True)
class ScaleJob:
    """Everything a worker needs for any block of any step."""

    affinities: str
    offsets: tuple[Offset, ...]
    output: str
    shape: Zyx
    block: Zyx
    fragments: str  # "watershed" or "mws"
    thresholds: tuple[float, ...]
    scoring: str  # "mean" or "p85"
    min_size: int
    db: str
    name: str = "segmentation"
    mask: str | None = None
    levels: int | None = None
    agglomeration: str = "global"  # or "blockwise"
    run: str = ""
    """A token made when the job starts and kept by every resume: the graph database records
    it, so that a graph another run left there (another output, or this output started
    over) is never taken for this run's (the digest alone cannot tell: same input path)."""
    started: tuple[str, str | None] | None = None
    """The affinities' and the mask's locations when the job started, once either has moved
    since (None: where they are now): the digest, and all keyed by it (the fragments'
    record, the database, the tables), stays the one they were made with."""

    @property
    def folder(self) -> Path:
        return Path(self.output) / FOLDER

    @property
    def grid(self) -> BlockGrid:
        return BlockGrid(box_of(self.shape), self.block)

    def box(self, index: Zyx) -> Roi:
        """Block ``index``'s voxels, the last block of an axis cut at the volume's end; from
        plain integers (`grid.box` built a grid and went through funlib's coordinates:
        several times the cost, for every block of every step)."""
        begin = [i * b for i, b in zip(index, self.block, strict=True)]
        if not all(0 <= s < n for s, n in zip(begin, self.shape, strict=True)):
            return self.grid.box(index)  # outside the volume: as the grid clips it
        return Roi(begin, [min(b, n - s) for s, b, n in zip(begin, self.block, self.shape,
                                                             strict=True)])

    @property
    def block_voxels(self) -> int:
        """Voxels in a whole block: a block's fragment ids start above ``block_id`` times
        this."""
        z, y, x = self.block
        return z * y * x

    @property
    def counts(self) -> tuple[int, int, int]:
        """Blocks per axis, as plain integers (`grid.counts` built a grid and coordinates:
        44 us for each block of a plan, 4 s per step for 10^5 blocks)."""
        z, y, x = (-(-n // b) for n, b in zip(self.shape, self.block, strict=True))
        return z, y, x

    def block_id(self, index: Zyx) -> int:
        """The block's number in raster order (its fragments' ids start above
        ``block_id * block voxels``)."""
        _, y, x = self.counts
        return (index[0] * y + index[1]) * x + index[2]

    @property
    def names(self) -> list[str]:
        several = len(self.thresholds) > 1
        return [output_name(self.name, t, several) for t in self.thresholds]

    def digest(self) -> str:
        """Hash of what decides the fragments and the graph: their markers are keyed by it."""
        affinities, mask = self.started or (self.affinities, self.mask)
        key = json.dumps([affinities, [list(o) for o in self.offsets], list(self.shape),
                          list(self.block), self.fragments, mask])
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def marker(self, step: str, index: Zyx) -> Path:
        return self.folder / step / marker_name(index)

    def is_done(self, step: str, index: Zyx) -> bool:
        return self.marker(step, index).exists()

    def undone(self, step: str, indices: Sequence[Zyx]) -> list[Zyx]:
        """The blocks of ``indices`` that have no done-marker of ``step``, from one listing
        of the step's markers: a stat per block (`is_done`) cost 40 us each here, and far
        more on a cluster's network file system, for every step of every run and resume."""
        done = listed_markers(self.folder / step)
        return [index for index in indices if marker_name(index) not in done]

    def mark_done(self, step: str, index: Zyx) -> None:
        path = self.marker(step, index)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> ScaleJob:
        data = json.loads(text)
        data["offsets"] = tuple(zyx(o) for o in data["offsets"])
        data["shape"], data["block"] = zyx(data["shape"]), zyx(data["block"])
        data["thresholds"] = tuple(data["thresholds"])
        if data.get("started") is not None:
            data["started"] = tuple(data["started"])
        return cls(**data)

    @property
    def job_file(self) -> Path:
        return self.folder / JOB_FILE

    def save(self) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_text(self.job_file, self.to_json())
        return self.job_file

    @classmethod
    def load(cls, path: str | Path) -> ScaleJob:
        return cls.from_json(Path(path).read_text())


def marker_name(index: Sequence[int]) -> str:
    """The name of block ``index``'s done-marker in its step's folder."""
    return "_".join(map(str, index))


def listed_markers(folder: Path) -> frozenset[str]:
    """The done-markers in a step's ``folder`` (none while it does not exist)."""
    try:
        return frozenset(os.listdir(folder))
    except FileNotFoundError:
        return frozenset()


def saved_job(output: str | Path) -> ScaleJob | None:
    """The job saved in ``output`` (None: none, or unreadable: the resume check says so), so
    that a resume falls back on the settings the job started with, not on the defaults."""
    try:
        return ScaleJob.load(Path(output) / FOLDER / JOB_FILE)
    except (OSError, ValueError, TypeError, KeyError):
        return None
