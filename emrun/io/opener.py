"""`open_volume`: from a path to the right format's `Volume`.

It inspects a path cheaply (metadata only, no pixel data) and hands it to the format's
opener; the formats' modules are imported only when a path needs them, to keep startup fast.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Sequence
from typing import Any

from emrun.io.completion import check_finished
from emrun.io.locations import PRECOMPUTED_PREFIX, is_url, local_precomputed, strip_precomputed
from emrun.io.metadata import stated_voxel_size
from emrun.io.volume import (
    CONTAINER_SUFFIXES,
    HDF5_SUFFIXES,
    SUPPORTED,
    TIFF_SUFFIXES,
    ZARR_MARKERS,
    Volume,
    VolumeError,
    one_line,
)
from emrun.paths import is_link_loop, not_a_file


def split_volume_path(spec: str | os.PathLike[str]) -> tuple[str, str | None]:
    """Split "a/vol.zarr/image" into ("a/vol.zarr", "image").

    The container ends at the first path component whose name ends in .zarr, .h5, .hdf5 or
    .hdf; anything after it is the array path inside. Other paths come back whole, and so
    does a path to a file that exists below a folder so named (`proj.zarr/exports/stack.tif`
    was opened as a dataset of `proj.zarr`).
    """
    text = os.fspath(spec)
    if os.sep != "/":
        text = text.replace(os.sep, "/")
    parts = text.split("/")
    a_file = "://" not in text and os.path.isfile(text)
    for i, part in enumerate(parts):
        if a_file and os.path.isdir("/".join(parts[: i + 1])):
            continue  # a folder the file lies in, whatever its name
        if part.lower().endswith(CONTAINER_SUFFIXES):
            inner = [p for p in parts[i + 1 :] if p]
            if DOT_SEGMENTS.intersection(inner):
                return split_volume_path(_without_dot_segments(text))
            return "/".join(parts[: i + 1]), "/".join(inner) or None
    return (text.rstrip("/") or text), None


DOT_SEGMENTS = frozenset((".", ".."))


def _without_dot_segments(text: str) -> str:
    """`text` with its "." and ".." resolved, as the file system resolves them. zarr and
    tensorstore refuse them inside a store (an "invalid path", an "invalid key"), where a
    script's `os.path.join(store, "./raw")` puts them; a URL keeps its scheme and host."""
    scheme, sep, rest = text.rpartition("://")
    return f"{scheme}{sep}{posixpath.normpath(rest)}" if sep else posixpath.normpath(text)


def open_volume(path: str | os.PathLike[str], dataset: str | None = None, *,
                unfinished: bool = False, voxel_size: Sequence[float] | None = None) -> Volume:
    """Open a volume for lazy reading; reads metadata only.

    `path` may carry the dataset ("vol.zarr/image"); an explicit `dataset` is appended to
    whatever the path carries. Every problem comes out as a one-line `VolumeError`. A volume
    its writer has not finished (`emrun.io.completion`) is refused unless ``unfinished``.
    ``voxel_size`` (nm, z, y, x), the size the user states, takes the place of voxel-size
    metadata that cannot be read, with a warning (`emrun.io.metadata.stated_voxel_size`).
    """
    if voxel_size is not None:
        with stated_voxel_size(voxel_size):
            return open_volume(path, dataset, unfinished=unfinished)
    _check_names_a_volume(os.fspath(path))
    container, inner = split_volume_path(path)
    if dataset is not None and dataset.strip("/"):
        dataset = dataset.strip("/")
        dataset = f"{inner}/{dataset}" if inner else dataset
    else:
        dataset = inner
    name = f"{container}/{dataset}" if dataset else container

    tensorstore_format = _tensorstore_format(container)
    if tensorstore_format is not None:
        opener, kind = tensorstore_format
    else:
        if is_link_loop(container):
            raise VolumeError(f"{container} is a loop of symbolic links")
        if not os.path.exists(container):
            raise VolumeError(f"{container}: no such file or directory")
        if not os.path.isdir(container) and (why := not_a_file(container)) is not None:
            raise VolumeError(f"{container} {why}")
        opener, kind = _choose_opener(container)
    try:
        volume = opener(container, dataset)
    except VolumeError:
        raise
    except Exception as exc:
        raise VolumeError(f"{name}: cannot open as {kind}: {one_line(exc)}") from exc
    if not unfinished:
        check_finished(volume)
    return volume


def _check_names_a_volume(text: str) -> None:
    """Refuse a path that names no volume (an empty `--input "$UNSET"`, a bare scheme) and a
    URL with a query or fragment: each file of a store is read at the store's URL plus its
    key, which a query would end up inside ("/pcinfo?token=abc/"), so a volume that is there
    was reported missing."""
    location = strip_precomputed(text.strip())
    rest = location.partition("://")[2].strip("/") if is_url(location) else location
    if not rest:
        raise VolumeError(f"{text!r} names no volume: give a path or URL such as "
                          "vol.zarr/raw or https://host/vol.zarr/raw")
    if is_url(location) and ("?" in rest or "#" in rest):
        raise VolumeError(f"{text}: a volume URL cannot carry a query string (?...) or "
                          "fragment (#...): emrun reads each file of the store at its own "
                          "URL; give the store's plain URL (for a neuroglancer link, its "
                          "layer's source)")


def forks_safely(path: str | os.PathLike[str]) -> bool:
    """Whether a process that read `path` may fork workers that read it too: not for the
    formats tensorstore reads (it aborts a forked process), so those need spawned workers."""
    return _tensorstore_format(split_volume_path(path)[0]) is None


def _tensorstore_format(container: str) -> tuple[Any, str] | None:
    """The opener for a path tensorstore reads (N5, precomputed, any URL), else None."""
    lower = container.lower().rstrip("/")
    if lower.startswith(PRECOMPUTED_PREFIX):
        return _precomputed, "neuroglancer precomputed"
    if lower.endswith(".n5"):
        from emrun.io.n5_volume import open_n5

        return open_n5, "N5"
    if is_url(lower):
        if lower.endswith(".zarr"):
            from emrun.io.remote_zarr import open_remote_zarr

            return open_remote_zarr, "zarr"
        return _precomputed, "neuroglancer precomputed"
    if local_precomputed(container) is not None:
        return _precomputed, "neuroglancer precomputed"
    return None


def _precomputed(container: str, dataset: str | None) -> Volume:
    """A precomputed volume: at `container`, or `container` names a scale of its parent's.

    Locally the `info` file says which; a URL is asked for its info, then its parent's."""
    from emrun.io.precomputed_volume import open_precomputed
    from emrun.io.tensorstore_volume import MetadataReader

    location = strip_precomputed(container).rstrip("/")
    prefix = container[: len(container) - len(strip_precomputed(container))]
    if not is_url(location):
        found = local_precomputed(location)
        if found is None:
            raise VolumeError(f"{container}: no neuroglancer precomputed volume there (no "
                              "info file listing scales in it or its parent)")
        root, key = found
    elif dataset is None and MetadataReader(location).json("info") is None:
        root, _, key = location.rpartition("/")
        if "/" not in root.partition("://")[2] or MetadataReader(root).json("info") is None:
            raise VolumeError(f"{container}: no volume there: no info file (neuroglancer "
                              "precomputed) and the path does not end in .zarr or .n5")
    else:
        root, key = location, None
    scale = "/".join(p for p in (key, dataset) if p)
    return open_precomputed(prefix + root, scale or None)


def _choose_opener(container: str) -> tuple[Any, str]:
    """Pick a format from the path; backends are imported lazily to keep startup fast."""
    lower = container.lower().rstrip("/")
    if os.path.isdir(container):
        if lower.endswith(".zarr") or any(
            os.path.exists(os.path.join(container, m)) for m in ZARR_MARKERS
        ):
            from emrun.io.zarr_volume import open_zarr

            return open_zarr, "zarr"
        from emrun.io.tiff_volume import has_tiffs, open_tiff_stack

        if has_tiffs(container):
            return _no_dataset(open_tiff_stack), "a folder of TIFF sections"
        if os.path.isfile(os.path.join(container, "info")):  # precomputed_scale_keys said no
            raise VolumeError(f"{container}: its info file is not a neuroglancer precomputed "
                              "info (JSON listing `scales`): damaged or cut short? Copy it "
                              "again")
        if os.path.isfile(os.path.join(container, "attributes.json")):
            raise VolumeError(f"{container}: looks like N5 (it holds an attributes.json), "
                              "but emrun knows an N5 container by its name ending in .n5: "
                              "rename its folder or link to it (ln -s FOLDER vol.n5)")
        raise VolumeError(
            f"{container}: folder is neither a zarr store (no zarr.json, .zarray or .zgroup) "
            "nor a folder of .tif/.tiff sections"
        )
    if lower.endswith(HDF5_SUFFIXES):
        from emrun.io.hdf5_volume import open_hdf5

        return open_hdf5, "HDF5"
    if lower.endswith(TIFF_SUFFIXES):
        from emrun.io.tiff_volume import open_tiff

        return _no_dataset(open_tiff), "TIFF"
    if lower.endswith(".npy"):
        from emrun.io.npy_volume import open_npy

        return _no_dataset(open_npy), "numpy .npy"
    if lower.endswith(".zarr"):
        raise VolumeError(f"{container}: is a file, but a zarr store must be a folder")
    suffix = os.path.splitext(lower)[1] or "(no extension)"
    raise VolumeError(f"{container}: unsupported format {suffix}; supported: {SUPPORTED}")


def _no_dataset(opener: Any) -> Any:
    """Wrap a single-array format's opener so a stray inner path is a clear error."""

    def open_single(container: str, dataset: str | None) -> Volume:
        if dataset:
            raise VolumeError(
                f"{container}: holds a single array, there is no dataset {dataset!r} inside it"
            )
        return opener(container)

    return open_single
