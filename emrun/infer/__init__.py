"""Blockwise, blended, resumable inference into zarr (importing registers the blend windows)."""

from . import blend  # noqa: F401
