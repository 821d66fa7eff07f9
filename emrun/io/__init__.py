"""Volume I/O: lazy reading of zarr (v2/v3), HDF5, TIFF and .npy volumes (N5, neuroglancer
precomputed and remote stores with the `remote` extra), a multiscale level by name or voxel
size (`choose_level`); writing and
converting to emrun's layout, one OME-Zarr 0.5 image group per volume (`OUT.zarr/NAME`).

The writing side (zarr, rich) is imported on first use, so reading-only callers and CLI
startup stay fast. The converter is exported as `convert_volume`: the package attribute
`convert` is the submodule `emrun.io.convert` (whose function is `convert`).
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

from emrun.io.levels import choose_level
from emrun.io.opener import forks_safely, open_volume, split_volume_path
from emrun.io.volume import Level, Volume, VolumeError

PRIVATE_PREFIX = ".emrun-"
"""emrun's commands may keep their own bookkeeping inside an output store, in plain hidden
folders named ``.emrun-<what>`` (by design not zarr nodes, e.g. inference's done-markers)."""



def ignore_stray_objects() -> None:
    """zarr warns about such folders, and about any stray file in a store (a user's
    notes.txt), whenever the group is listed: a line with zarr's source line that tells a
    user nothing. Installed on import."""
    warnings.filterwarnings("ignore", message=r"Object at .* is not recognized as a "
                            "component of a Zarr hierarchy")


ignore_stray_objects()

if TYPE_CHECKING:
    from emrun.io.convert import ConvertResult, convert_volume, guess_name
    from emrun.io.write import create_volume, default_chunks, staged_volume, write_volume

_LAZY = {
    "ConvertResult": "emrun.io.convert",
    "convert_volume": "emrun.io.convert",
    "guess_name": "emrun.io.convert",
    "create_volume": "emrun.io.write",
    "default_chunks": "emrun.io.write",
    "staged_volume": "emrun.io.write",
    "write_volume": "emrun.io.write",
}

__all__ = [
    "PRIVATE_PREFIX",
    "ConvertResult",
    "Level",
    "Volume",
    "VolumeError",
    "choose_level",
    "convert_volume",
    "create_volume",
    "default_chunks",
    "forks_safely",
    "guess_name",
    "open_volume",
    "split_volume_path",
    "staged_volume",
    "write_volume",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
