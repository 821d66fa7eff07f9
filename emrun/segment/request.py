"""What `emrun segment` is asked to do, as one value checked where it is made (the command
line), before any file is opened: the job (emrun.segment.job) then only does the work."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from ..devices import check_launch
from ..errors import UserError
from ..recipe.run import SegmenterBase
from ..registry import segmenters
from .scale.job import FRAGMENTS

__all__ = ["GIVEN_OPTIONS", "SegmentRequest"]

GIVEN_OPTIONS = ("name", "fragments", "agglomeration")
"""The options whose defaults a resume cannot tell from given values by the value alone."""


@dataclass(frozen=True)
class SegmentRequest:
    """Affinities in, a segmentation out, and how.

    ``method`` names a segmenter with its spec defaults; ``spec`` (e.g. a recipe's
    ``segment``) replaces it; with neither, the segmenter is the one the affinities' recipe
    records, else the default. ``values`` maps a swept value's name (the segmenter spec's
    ``value_name``: ``bias``, ``threshold``; the command's ``--bias``, ``--threshold``) to
    the values given: one output per value, or the values a ``sweep`` scores against
    ``truth`` (default: the spec's ``sweep_values``). ``min_size`` overrides the spec's.
    ``connected_truth``: the sweep scores against the truth's connected pieces.
    ``workers``: values a sweep segments at once. ``block``: segment block by block.
    ``levels``: the output's pyramid levels (None: the default; 1: full resolution only).
    ``scheduler`` (``local``, ``daisy``): the graph pipeline (emrun.segment.scale) with
    ``workers`` processes (or daisy workers started through ``launch``), the region graph
    in the database at ``db`` (default: SQLite in the output), ``fragments`` made by
    ``watershed`` or ``mws``, ``agglomeration`` of the whole graph in one process
    (``global``) or ``blockwise`` on the workers; ``resume`` finishes (or extends) a job
    found in the output. ``given``: which of ``name``, ``fragments``, ``agglomeration`` the
    caller gave (the command line passes their defaults for those it was not given): a
    resume takes the saved job's settings only where the option was not given, and an
    explicit default (``--name segmentation``) is a request like any other value.
    """

    affinities: str
    output: Path
    method: str | None = None
    spec: SegmenterBase | None = None
    values: Mapping[str, tuple[float, ...]] = field(
        default_factory=lambda: MappingProxyType({}))
    min_size: int | None = None
    mask: str | None = None
    offsets: str | None = None
    block: tuple[int, int, int] | None = None
    name: str = "segmentation"
    sweep: bool = False
    truth: str | None = None
    connected_truth: bool = False
    workers: int | None = None
    levels: int | None = None
    scheduler: str | None = None
    launch: str | None = None
    db: str | None = None
    fragments: str = "watershed"
    agglomeration: str = "global"
    resume: bool = False
    given: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", MappingProxyType(
            {key: tuple(float(v) for v in given) for key, given in self.values.items() if given}))
        if self.spec is None and self.method is not None and self.method not in segmenters:
            raise UserError(f"--method: {segmenters.unknown_message(self.method)}")
        if self.sweep:
            if self.truth is None:
                raise UserError("--sweep scores each value against ground truth: give --truth")
            if self.block is not None:
                raise UserError("--sweep runs in memory; drop --block (sweep a smaller crop)")
        elif self.truth is not None or self.connected_truth:
            flag = "--truth" if self.truth is not None else "--connected-truth"
            raise UserError(f"{flag} is for --sweep; add --sweep or drop {flag}")
        elif self.workers is not None and self.scheduler is None:
            raise UserError("--workers is for --sweep (the values it segments at once) or "
                            "--scheduler (the processes segmenting blocks); add one or drop "
                            "--workers")
        if self.scheduler is not None:
            if self.scheduler not in ("local", "daisy"):
                raise UserError(f"--scheduler {self.scheduler!r}: choose local or daisy")
            if self.sweep:
                raise UserError("--sweep runs in memory; drop --scheduler (sweep a crop)")
            if self.name == FRAGMENTS:  # taken as the finished output: 0 segments written
                raise UserError(f"--name {FRAGMENTS}: the graph pipeline keeps its fragments "
                                "under that name; give another --name")
        elif given := self._pipeline_options():
            raise UserError(f"{', '.join(given)}: only with --scheduler local or daisy (the "
                            "graph pipeline); add --scheduler or drop them")
        if self.launch is not None and self.scheduler != "daisy":
            raise UserError("--launch starts daisy workers; add --scheduler daisy")
        check_launch(self.launch)
        if self.workers is not None and self.workers < 1:
            raise UserError(f"--workers must be at least 1 (got {self.workers})")
        if self.block is not None and min(self.block) < 1:
            raise UserError(f"--block {list(self.block)}: sizes must be positive")
        if self.min_size is not None and self.min_size < 0:
            raise UserError(f"--min-size must be 0 or more (got {self.min_size})")
        if unknown := set(self.given) - set(GIVEN_OPTIONS):
            raise ValueError(f"given: {sorted(unknown)} are not among {GIVEN_OPTIONS}")

    def _pipeline_options(self) -> list[str]:
        """The graph pipeline's options given (an explicit default too: ``--fragments
        watershed`` without --scheduler was ignored without a word); --launch is left to its
        own check, which names --scheduler daisy."""
        given = [flag for flag, value in (("--db", self.db), ("--resume", self.resume))
                 if value]
        for option, default in (("fragments", "watershed"), ("agglomeration", "global")):
            if option in self.given or getattr(self, option) != default:
                given.append(f"--{option}")
        return given
