"""Volumes written block by block carry a mark until their last block is in.

An interrupted `emrun infer` or blockwise `emrun segment` leaves its output under its final
name, half zeros, so that `--resume` can finish it; read as if complete, it was segmented,
scored and converted without a word (a segmentation of one segment, "arand 0.956"). The
writer marks such a volume unfinished when it creates it (``emrun.unfinished`` in its
attributes: how to finish it) and clears the mark after its last block; `open_volume`
refuses a marked volume unless the reader asks for it (a viewer of a run in progress).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import zarr

from .volume import Volume, VolumeError

UNFINISHED = "unfinished"


def unfinished(how_to_finish: str) -> dict[str, Any]:
    """The entry to put under a new volume's ``emrun`` attributes."""
    return {UNFINISHED: how_to_finish}


def how_to_finish(volume: Volume) -> str | None:
    """How to finish ``volume`` when its writer has not (None when it is finished)."""
    note = volume.attributes().get("emrun")
    if isinstance(note, dict) and note.get(UNFINISHED):
        return str(note[UNFINISHED])
    return None


def check_finished(volume: Volume) -> None:
    """Refuse a volume its writer has not finished, saying how to finish it."""
    if (how := how_to_finish(volume)) is not None:
        raise VolumeError(f"{volume}: is unfinished: {how}")


def mark_finished(group_path: str | Path) -> None:
    """Clear the mark of the OME-Zarr image group at ``group_path`` (after its last block)."""
    group = zarr.open_group(str(group_path), mode="r+")
    note = group.attrs.get("emrun")
    if isinstance(note, dict) and UNFINISHED in note:
        group.attrs["emrun"] = {k: v for k, v in note.items() if k != UNFINISHED}
