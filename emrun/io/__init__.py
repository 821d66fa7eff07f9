"""Volume I/O: lazy, read-only access to zarr (v2/v3), HDF5, TIFF and .npy volumes."""

from emrun.io.volume import Volume, VolumeError, open_volume, split_volume_path

__all__ = ["Volume", "VolumeError", "open_volume", "split_volume_path"]
