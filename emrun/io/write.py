"""Writing volumes: every volume emrun writes is an OME-Zarr 0.5 image group.

Layout (one decision, used by conversion, inference, segmentation and synthesis alike; the
store's root and where labels go are `emrun.io.layout`'s):

    OUT.zarr/               zarr v3 group, and an OME-Zarr image naming its primary image's
                            levels (`affinity/0`, ...), so OME readers open it at the root
      affinity/             image group, attrs["ome"] = OME-Zarr 0.5 "multiscales" (+ "omero"
        0/ 1/ 2/            channel labels): levels 0..N-1, (c, z, y, x) or (z, y, x)
      labels/               OME "labels" group listing the segmentations
        segmentation/       image group with "image-label"; levels 0..N-1 (z, y, x)

Why this layout: OME-Zarr 0.5 has no collection of images, only an image with its labels
(`IMAGE/labels/NAME`), so a store that readers open at its root must *be* an image. The root
names the arrays of one image group by path instead of holding its own, so every volume
keeps its group and its path (`OUT.zarr/affinity`, `seg.zarr/segmentation`: `open_volume`
looks for a NAME that is no image among the store's labels), several predictions share a
store, and ome-zarr-models validates the root (checked by the tests), ome-zarr-py's Reader
finds the labels from it and napari shows them as labels layers.

Every level array also carries funlib.persistence's `voxel_size`, `offset` (nm) and
`axis_names`, so `open_ds`, gunpowder and daisy read its geometry without OME support.
Levels 1..N-1 are built after level 0 is complete (`emrun.io.pyramid`: mean for images and
predictions, most frequent id for labels; y and x halved per level, z where anisotropy
allows); `write_volume` and `staged_volume` build them before the volume takes its name,
inference after its last block (`build_pyramid`).

`open_volume("OUT.zarr/image")` opens the group's first multiscale level and reports the
voxel size (nm, zyx) and offset (voxels) from its scale and translation.

Compression depends on the width of the dtype, one rule for every volume emrun writes. Bytes
(uint8 EM, inference's uint8 predictions) get zarr's zstd codec at level 1: writing 12-channel
affinities is on inference's critical path (on an H200 the writer threads were the engine's
bottleneck) and byte shuffle does nothing for one-byte values, so blosc adds only the cost of
its small blocks. Wider types (uint16 EM, float predictions, uint32/uint64 labels and
segmentations) get blosc zstd level 1 with byte shuffle, which finds the runs of equal ids
in labels (bitshuffle breaks them up: dense labels about 2x worse) and helps smooth data.
Measured with `emrun bench codecs` on this project's 2-core development VM (zarr 3.1.6,
numcodecs 0.16.6; its second core busy with other work, so MB/s are per CPU second): the
affinities of SNEMI3D sections 60-69 (12 x 10 x 1024 x 1024 uint8, 126 MB) predicted by
recipes/snemi3d_aff.yaml trained 111 iterations on the CPU (patch 20 x 128 x 128, fp32),
chunks 12 x 10 x 256 x 256, median of 5:

    codec                ratio  encode  decode  write through zarr (MB per CPU second)
    zstd 1 (bytes)       1.47x  410     938     187
    blosc-zstd 1 byte    1.49x  233     512     145   (wider types; all volumes before)
    zstd 2               1.68x  292     951     152
    zstd 3               1.81x  194     981     113
    blosc-zstd 3 byte    1.89x  101     655      77
    blosc-zstd 1 bit     1.51x  321     560     175
    blosc-lz4 1 bit      1.21x  844    1727     254

The rule for the affinities: the cheapest write whose ratio is at least 90 % of the previous
codec's. zstd 1 encodes 1.8x and writes 1.3x faster per core than blosc-zstd 1 at the same
ratio (most of the gap is blosc's small blocks at level 1); lz4 is faster still but its files
are 23 % larger; zstd 2 is the choice where disk matters more than writer cores. Chunk shape
changed the ratio by under 3 % (12 x 8 x 512 x 512, 12 x 10 x 128 x 128, 1 x 10 x 256 x 256:
1.45-1.49x). Raw uint8 EM: 1.07x with zstd 1 against 1.10x. uint64 segmentations keep blosc's
byte shuffle: 119x against zstd 1's 46x (the SNEMI3D labels, sections 0-29) and 99x against
56x (a cc segmentation of the affinities above).

Shards. Inference stores each output chunk of its layout (the write unit, whole ones per
block) as one zarr 3 shard, cut into inner chunks that a reader decodes one at a time
(`shard_chunks`: all channels, at most `INNER_ZYX` = 8 x 128 x 128, dividing the shard; a
shard that small stays one plain chunk). A later blockwise step reading a block with a thin
halo (segment at scale: 2 x 8 x 8) decoded the 26 neighbouring chunks whole; now it decodes
the inner chunks the halo touches. The file count is unchanged (one per shard), and so is
the codec, applied to each inner chunk. Writers must own whole shards (a write into part of
one rewrites its file): `emrun.io.pyramid.write_chunks` is that unit, zarr's ``chunks`` the
inner one. Measured on the 2-core VM (zarr 3.1.6, loaded by other work), synthetic
12 x 72 x 576 x 576 uint8 affinities in shards of 12 x 32 x 256 x 256, written shard by
shard, CPU seconds, median of 3; halo: one block with 2 x 8 x 8 around it:

    inner chunks         write  block read  block+halo read
    none (unsharded)     1.04   0.032       0.494
    8 x 128 x 128        1.26   0.039       0.194
    8 x 64 x 64          1.83   0.116       0.200
    4 x 128 x 128        1.43   0.064       0.229
    16 x 128 x 128       1.44   0.066       0.228
    8 x 256 x 256        1.59   0.089       0.330
    32 x 128 x 128       1.62   0.109       0.326

8 x 128 x 128 reads a block with its halo 2.5x faster at the block read's cost; smaller
inner chunks gain nothing more on the halo and cost every read and write. Sharding costs the
writers about a fifth more CPU: `emrun bench infer emrun/recipes/demo.yaml --no-model
--device cpu --shape 72 576 576` (6 channels, shards of 18 x 192 x 192 cut into 6 x 96 x 96),
writer threads 0.60 -> 0.75 s, median of 3, the engine's rate unchanged (11.6 and 11.4
Mvoxel/s: the writes overlap prediction). Read through `open_volume` as segment at scale's
fragments step reads it (12 x 96 x 768 x 768, a 32 x 256 x 256 block and its halo), 0.56 ->
0.22 s; files as many, 3 % smaller.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from emrun import locks
from emrun.io import PRIVATE_PREFIX, adding
from emrun.io.layout import LABELS, refresh_root, volume_dir
from emrun.io.metadata import (
    declared_shift,
    from_ome,
    funlib_attrs,
    image_label_attrs,
    ome_image_attrs,
)
from emrun.io.pyramid import (
    Progress,
    files_stamp,
    level_block,
    level_factors,
    level_shape,
    write_chunks,
    write_level,
)
from emrun.io.volume import VolumeError, native_dtype
from emrun.io.zarr_volume import PARTIAL_SUFFIX
from emrun.paths import file_in_the_way, is_link_loop, missing_folders, remove_empty

LEVEL = "0"  # the full-resolution level; coarser ones are "1", "2", ...
CHUNK_ZYX = (16, 256, 256)  # default chunk: thin in z (anisotropic EM), wide in y and x
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def compressor(dtype: Any) -> ZstdCodec | BloscCodec:
    """The codec for a volume of ``dtype`` (see the module docstring for the choice): zstd 1
    for one-byte types, blosc zstd 1 with byte shuffle for wider ones."""
    if np.dtype(dtype).itemsize == 1:
        return ZstdCodec(level=1)
    return BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")


STORABLE = "bool, integer or float of at most 64 bits"
"""The dtypes a volume may have (zarr has none wider: a long double was an internal error)."""


def storable(dtype: Any) -> bool:
    """Whether a volume of ``dtype`` can be written (`STORABLE`)."""
    dt = np.dtype(dtype)
    return dt.kind in "biuf" and dt.itemsize <= 8


def guess_label(dtype: Any, name: str, channel_axis: bool = False) -> bool:
    """Whether a volume is a segmentation when nobody said: integers wider than 8 bits (ids;
    16-bit EM images exist, so say `label=False` for those) or named "labels"."""
    kind, size = np.dtype(dtype).kind, np.dtype(dtype).itemsize
    return not channel_axis and kind in "iu" and (size > 1 or name == LABELS)


def default_chunks(shape: Sequence[int], channel_axis: bool = False) -> tuple[int, ...]:
    """(min(z,16), min(y,256), min(x,256)), after all channels in one chunk when present."""
    spatial = tuple(max(1, min(int(n), c)) for n, c in zip(shape[-3:], CHUNK_ZYX, strict=True))
    return ((max(1, int(shape[0])),) if channel_axis else ()) + spatial


INNER_ZYX = (8, 128, 128)
"""The largest inner chunk of a shard (z, y, x; `shard_chunks`): measured on synthetic 12-channel
uint8 affinities in shards of 12 x 32 x 256 x 256 (module docstring, "Shards")."""


def shard_chunks(shard: Sequence[int], limit: Sequence[int] | None = None
                 ) -> tuple[int, ...] | None:
    """The chunks a shard of shape ``shard`` (leading axes whole, then z, y, x) is cut into
    inside its file: per axis the largest divisor of the shard up to ``limit`` (default:
    every leading axis whole, then `INNER_ZYX`), or the whole axis where that divisor is
    under half the limit (a 37-voxel axis: chunks of 1). None where no axis is cut: a shard
    that small stays one unsharded chunk."""
    limits = tuple(limit) if limit is not None else (
        *(int(n) for n in shard[:-3]), *INNER_ZYX)
    inner = tuple(_inner_axis(int(s), int(c)) for s, c in zip(shard, limits, strict=True))
    return None if inner == tuple(int(s) for s in shard) else inner


def _inner_axis(shard: int, limit: int) -> int:
    """One axis of `shard_chunks`."""
    if shard <= limit:
        return shard
    divisor = max(d for d in range(1, limit + 1) if shard % d == 0)
    return divisor if 2 * divisor >= limit else shard


def write_volumes(
    path: str | os.PathLike[str],
    volumes: dict[str, tuple[np.ndarray, bool]],
    *,
    voxel_size: Sequence[float] | None = None,
    attrs: dict[str, Any] | None = None,
    levels: int | None = None,
    overwrite: bool = False,
    taken: str | None = None,
) -> None:
    """Write several in-memory volumes ({name: (array, label)}) into one store, all or none:
    every name is checked before any is written, and a failure part-way removes the ones
    this call added (a store it made goes with them), so a rerun finds its names free.
    With `overwrite`, the volumes replaced are renamed into place together once every new
    one is written (`committed_together`): replaced one by one, a synth killed or failing
    part-way left a new image beside the old labels, of the same shape, which nothing
    flagged; a failure or a kill now leaves the old ones, all. The store is held against
    other emrun processes throughout (`held_store`): two at once mixed their volumes.
    ``taken``: the advice, in the calling command's options, for a name already there (the
    default names no option: `data synth` has no --name, `segment` no --overwrite)."""
    with held_store(path) as new_store:
        for name, (_, label) in volumes.items():
            _prepare(path, name, label, overwrite, taken)
        with adding_all(path, [(name, label) for name, (_, label) in volumes.items()],
                        new_store), committed_together(path):
            for name, (array, label) in volumes.items():
                write_volume(path, name, array, voxel_size=voxel_size, attrs=attrs,
                             label=label, levels=levels, overwrite=overwrite, taken=taken)


_DEFERRED: ContextVar[list[tuple[Path, Path, bool]] | None] = ContextVar(
    "emrun_deferred_commits", default=None)
"""The volumes staged (partial, target, overwrite) inside `committed_together`."""


@contextmanager
def committed_together(path: str | os.PathLike[str]) -> Iterator[None]:
    """Volumes staged in the ``with`` block (`staged_volume`) stay ``NAME.partial`` until it
    ends, then are renamed into place one after the other (renames: a kill's window is
    theirs alone); a failure removes them, and a kill leaves partial volumes, which the
    store's next writer removes: the volumes there before stay, all of them."""
    pending: list[tuple[Path, Path, bool]] = []
    token = _DEFERRED.set(pending)
    try:
        yield
    except BaseException:
        for partial, _, _ in pending:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        _DEFERRED.reset(token)
    for partial, target, overwrite in pending:
        _commit(partial, target, overwrite)
        refresh_root(path)  # one at a time, in order: the root names the first image written


@contextmanager
def adding_all(path: str | os.PathLike[str], volumes: list[tuple[str, bool]],
               new_store: bool) -> Iterator[None]:
    """All or none of ``volumes`` ([(name, label)]) written in the ``with`` block into the
    store ``path`` (held by the caller; ``new_store``: made by it): a failure removes those
    the block added (a store made for them goes with them), and a kill is undone by the
    store's next writer (`adding`), so a rerun finds their names free. Volumes there before
    are not the block's: `overwrite` keeps what it already replaced."""
    root = Path(path)
    to_add = [(name, label) for name, label in volumes
              if not volume_dir(root, name, label).exists()]
    adding.start(root, to_add, new_store)
    try:
        yield
    except BaseException:
        if new_store:
            shutil.rmtree(root, ignore_errors=True)
        else:
            for name, label in to_add:
                shutil.rmtree(volume_dir(root, name, label), ignore_errors=True)
            refresh_root(root)
            adding.finish(root)
        raise
    adding.finish(root)


def create_volume(
    path: str | os.PathLike[str],
    name: str,
    shape: Sequence[int],
    dtype: Any,
    *,
    chunks: Sequence[int] | None = None,
    shards: Sequence[int] | None = None,
    voxel_size: Sequence[float] | None = None,
    offset: Sequence[int] | None = None,
    shift_nm: Sequence[float] | None = None,
    channel_axis: bool = False,
    channel_names: Sequence[str] | None = None,
    label: bool = False,
    attrs: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> zarr.Array:
    """Create the empty volume `path/name` (an OME-Zarr 0.5 image group) and return its array.

    `path` is a zarr v3 group folder named *.zarr, created when missing. The array lies at
    `path/name/0` (`path/labels/name/0` for a `label`: a segmentation, with `image-label`
    metadata), filled with zeros until written; coarser levels come later from
    `build_pyramid`. `voxel_size` is in nm and `offset` in voxels, both z, y, x (None:
    unknown voxel size, zero offset); `shift_nm` moves it by less than a voxel (an output
    made from a coarser pyramid level: `Volume.shift_nm`); `channel_names` label the channels
    for viewers; `attrs` are extra attributes for the image group (e.g. provenance).
    `shards` (a whole number of `chunks` per axis) stores the array as zarr 3 shards: one
    file per shard, `chunks` decoded one at a time inside it (`shard_chunks`). An
    existing `name`
    is a VolumeError unless `overwrite`, which deletes it first. The volume is visible as
    soon as it is created; use `write_volume` (or `staged_volume`) for all-or-nothing writes.
    It is made as `name.partial` and renamed: a run killed between the image group and its
    level-0 array left a group without an array under the final name, which the resumed job
    took for its own and then failed on (FileNotFoundError, exit 1) however it was rerun.
    """
    with held_store(path):
        target = _prepare(path, name, label, overwrite)
        spec = _spec(target, shape, dtype, chunks, voxel_size, offset, channel_axis, attrs,
                     channel_names, label, shift_nm, shards)
        parent = _open_parent(target.parent, label)
        partial = target.with_name(target.name + PARTIAL_SUFFIX)
        if partial.exists():  # a stale one, from a run killed while creating it
            shutil.rmtree(partial)
        try:
            _create(parent, partial.name, name, spec)
            if target.exists():
                shutil.rmtree(target)
            os.rename(partial, target)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        refresh_root(path)
    return zarr.open_array(str(target / LEVEL), mode="r+")


def write_volume(
    path: str | os.PathLike[str],
    name: str,
    array: np.ndarray,
    *,
    chunks: Sequence[int] | None = None,
    voxel_size: Sequence[float] | None = None,
    offset: Sequence[int] | None = None,
    shift_nm: Sequence[float] | None = None,
    channel_axis: bool = False,
    channel_names: Sequence[str] | None = None,
    label: bool | None = None,
    levels: int | None = None,
    attrs: dict[str, Any] | None = None,
    overwrite: bool = False,
    taken: str | None = None,
) -> zarr.Array:
    """Write a (small) in-memory array as the volume `path/name`, with its pyramid; all or
    nothing.

    Same arguments as `staged_volume`; shape and dtype come from `array`. Returns the
    written level-0 array, opened for further writes (inside `committed_together`, where
    the volume is not in place yet, the staged one: `write_volumes` takes none).
    """
    data = np.asarray(array)
    label = guess_label(data.dtype, name, channel_axis) if label is None else label
    with staged_volume(
        path,
        name,
        data.shape,
        data.dtype,
        chunks=chunks,
        voxel_size=voxel_size,
        offset=offset,
        shift_nm=shift_nm,
        channel_axis=channel_axis,
        channel_names=channel_names,
        label=label,
        levels=levels,
        attrs=attrs,
        overwrite=overwrite,
        taken=taken,
    ) as staged:
        staged[...] = data
    if _DEFERRED.get() is not None:  # in place at the end of `committed_together` only
        return staged
    return zarr.open_array(str(volume_dir(path, name, label) / LEVEL), mode="r+")


@contextmanager
def staged_volume(
    path: str | os.PathLike[str],
    name: str,
    shape: Sequence[int],
    dtype: Any,
    *,
    chunks: Sequence[int] | None = None,
    voxel_size: Sequence[float] | None = None,
    offset: Sequence[int] | None = None,
    shift_nm: Sequence[float] | None = None,
    channel_axis: bool = False,
    channel_names: Sequence[str] | None = None,
    label: bool | None = None,
    levels: int | None = None,
    attrs: dict[str, Any] | None = None,
    overwrite: bool = False,
    taken: str | None = None,
) -> Iterator[zarr.Array]:
    """Create `name` as `name.partial`, yield its level-0 array to fill, build the pyramid's
    `levels` (None: `emrun.io.pyramid`'s default; 1: level 0 alone) and rename it at the end.
    `label`: a segmentation (None: `guess_label`), kept in the store's OME labels group.

    A stale `name.partial` (from a killed run) is removed first. If the block raises, the
    partial volume is removed and `name` is left as it was; a run killed outright leaves
    only `name.partial`, which no reader takes for a volume. With `overwrite`, an existing
    `name` is replaced only once the new one is complete. A bad `levels` is a VolumeError
    before anything is written. The store is held against other emrun processes while the
    volume is written (`held_store`): a second writer removed the first one's `name.partial`
    as stale, and the two wrote one volume. ``taken`` as for `write_volumes`.
    """
    label = guess_label(dtype, name, channel_axis) if label is None else label
    with held_store(path):
        target = _prepare(path, name, label, overwrite, taken)
        spec = _spec(target, shape, dtype, chunks, voxel_size, offset, channel_axis, attrs,
                     channel_names, label, shift_nm)
        level_factors(spec["shape"][-3:], spec["voxel_size"], levels)  # checked up front
        parent = _open_parent(target.parent, label)
        partial = target.with_name(target.name + PARTIAL_SUFFIX)
        if partial.exists():
            shutil.rmtree(partial)
        try:
            yield _create(parent, partial.name, name, spec)
            build_pyramid(partial, levels, label=label)
            if (deferred := _DEFERRED.get()) is not None:  # with the others, at the end
                deferred.append((partial, target, overwrite))
            else:
                _commit(partial, target, overwrite)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        refresh_root(path)


TAKEN_ADVICE = "give another output store"
"""What a command is told to do about a volume already there unless it says (``taken``): the
commands writing volumes offer different options (`data convert` --name and --overwrite,
`data synth` --overwrite only, `segment` --name only), so this names none of them."""

STORE_ADVICE = "give another output store"
"""What a command refused a store another emrun is writing is told to do (`emrun.locks`)."""


@contextmanager
def held_store(path: str | os.PathLike[str], advice: str = STORE_ADVICE) -> Iterator[bool]:
    """`hold_store` for the ``with`` block, then `release_store`; yields whether the store was
    made here. A store this process holds already (a job around its volumes) stays held, and
    is that job's to clean up."""
    root = Path(path)
    _check_store(root, clear=False)  # what is no store gets no lock file
    outer = locks.held(root)
    new = hold_store(root, advice)
    try:
        yield new
    except BaseException:
        if not outer:
            release_store(root, new, failed=True)
        raise
    if not outer:
        release_store(root)


def hold_store(path: str | os.PathLike[str], advice: str = STORE_ADVICE) -> bool:
    """Hold the output store ``path`` against other emrun processes (`emrun.locks`) until
    `release_store` or this process's end, or refuse it in one line ending with ``advice``;
    it is made if missing (the lock lives in it; through a symbolic link to a folder not made
    yet, the folder it names). Returns whether it was made here (or is what a killed first
    write left, `killed_first_write`: as good as made here)."""
    root = Path(path)
    if (above := file_in_the_way(root)) is not None:
        raise VolumeError(f"{root}: {above} is a file, not a folder; give another path")
    new = not os.path.lexists(root) or killed_first_write(root)
    made = Path(os.path.realpath(root))  # root itself, unless a link names it
    missing = missing_folders(made)
    outer = locks.held(root)
    try:
        made.mkdir(parents=True, exist_ok=True)
        try:
            locks.hold(root, advice)
        except FileNotFoundError:  # removed just now by another's failed first write
            made.mkdir(parents=True, exist_ok=True)
            locks.hold(root, advice)
    except OSError as exc:
        remove_empty(missing)  # `new/../x.zarr` with no `new`: x.zarr was made, then refused
        raise VolumeError(f"{root}: cannot write a store there ({exc.strerror or exc})"
                          ) from exc
    if not outer:  # ours alone now: what a killed writer left is nobody's
        remove_zarr_temporaries(root)
        restore_replaced(root)
        killed_adding = adding.undo_killed(root)
        if (remove_partial_volumes(root) or killed_adding) and _bare(root):
            new = True  # made by the killed write, and as it was before it: as good as new
        if (root / "zarr.json").is_file():
            refresh_root(root)  # a kill between a volume's rename and this left it stale
    return new


ZARR_TEMPORARY = re.compile(r".+\.[0-9a-f]{32}\.partial")
"""zarr writes each file as ``NAME.<uuid hex>.partial`` and renames it: one that a writer
killed outright left behind."""


def is_zarr_temporary(path: Path) -> bool:
    """Whether ``path`` is a file zarr was writing when its writer was killed outright."""
    return bool(ZARR_TEMPORARY.fullmatch(path.name)) and path.is_file()


def store_entries(folder: Path) -> list[Path]:
    """What a store folder holds that anyone put there on purpose: its entries, without
    the `emrun.locks` file and zarr's temporaries that a killed writer left."""
    return [entry for entry in locks.contents(folder)
            if not is_zarr_temporary(entry) and not adding.is_record(entry)]


def killed_first_write(folder: Path) -> bool:
    """Whether ``folder`` is what a new store's first write, killed outright (kill -9, the
    OOM killer), left: its lock file and perhaps zarr's temporaries, nothing else. It is
    as good as absent: the next write takes it as a store it makes (and removes it again
    should that write fail too)."""
    return (folder.is_dir() and not folder.is_symlink()
            and (folder / locks.LOCK_NAME).is_file() and not store_entries(folder))


def remove_zarr_temporaries(root: Path) -> None:
    """Remove the zarr temporaries a killed writer left in the store's metadata folders:
    the root, the labels group, each volume's group and its levels (chunk folders are not
    walked: a store may hold millions of chunks). Only the store's lock holder calls it."""
    folders = [root]
    for group in (root, root / LABELS):
        with contextlib.suppress(OSError):
            volumes = [e for e in group.iterdir() if e.is_dir() and not e.is_symlink()]
            folders += volumes
            for volume in volumes:
                folders += [e for e in volume.iterdir() if e.is_dir() and e.name.isdigit()]
    for folder in folders:
        with contextlib.suppress(OSError):
            for entry in folder.iterdir():
                if is_zarr_temporary(entry):
                    entry.unlink(missing_ok=True)


def release_store(path: str | os.PathLike[str], new: bool = False, failed: bool = False
                  ) -> None:
    """Let other processes write the store ``path`` again. One that `hold_store` made
    (``new``) for a write that ``failed`` is first removed if it holds nothing but group
    metadata, so that a failed first write leaves no empty `OUT.zarr` behind."""
    if new and failed:
        _remove_if_bare(Path(path))
    locks.release(Path(path))


def _remove_if_bare(store: Path) -> None:
    """Remove a store this write made and that holds nothing but group metadata (and its
    lock), so that a failed first write leaves no empty `OUT.zarr` behind; a store holding
    anything else (a volume another process has begun meanwhile) is left alone."""
    if _bare(store):
        shutil.rmtree(store, ignore_errors=True)


def _bare(store: Path) -> bool:
    """Whether ``store`` holds nothing but group metadata, emrun's lock and records, and
    zarr's temporaries."""
    return all(p.is_dir() or p.name == "zarr.json" or locks.is_lock_file(p.name)
               or is_zarr_temporary(p) or adding.is_record(p) for p in store.rglob("*"))


def remove_partial_volumes(root: Path) -> bool:
    """Remove the volumes a killed writer left half-written (`NAME.partial`, in the root
    and its labels group; they only ever exist while their writer holds the store, and no
    reader opens them): one stayed, a whole level 0 of disk, until a write of that same
    name. Returns whether there were any. Only the store's lock holder calls it, after
    `restore_replaced` (a replaced volume set aside is a user's)."""
    found = False
    for group in (root, root / LABELS):
        with contextlib.suppress(OSError):
            for entry in group.iterdir():
                if entry.name.endswith(PARTIAL_SUFFIX) and entry.is_dir() and \
                        not entry.is_symlink() and (entry / "zarr.json").is_file():
                    shutil.rmtree(entry, ignore_errors=True)
                    found = True
    return found


def restore_replaced(root: Path) -> None:
    """Finish what a replacing write (``overwrite``) killed between its two renames left:
    the old volume set aside as `NAME.replaced.partial` and no `NAME`. The old one goes back
    under its name (the user's volume was absent, and gone for good once a later write
    removed it as stale); beside a `NAME` it is what the finished replacement failed to
    remove. Only the store's lock holder calls it."""
    suffix = ".replaced" + PARTIAL_SUFFIX
    for group in (root, root / LABELS):
        with contextlib.suppress(OSError):
            for entry in group.iterdir():
                if not (entry.name.endswith(suffix) and entry.is_dir()):
                    continue
                target = entry.with_name(entry.name[: -len(suffix)])
                if os.path.lexists(target):
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    os.rename(entry, target)


PYRAMID_PROGRESS = f"{PRIVATE_PREFIX}pyramid"
"""The hidden folder of an image group where a pyramid build keeps its progress
(`emrun.io.pyramid.Progress`); no zarr node, gone once the build is complete."""

PYRAMID_RECORD = "emrun-pyramid"
"""The image group's attribute that says which pyramid was built from which level 0."""


def build_pyramid(
    group_path: str | os.PathLike[str],
    levels: int | None = None,
    *,
    label: bool | None = None,
    threads: int | None = None,
) -> int:
    """Build levels 1..N-1 of the image group at `group_path` from its complete level 0,
    and name them in its OME metadata; returns N. `label` None: a group with `image-label`
    is a label. The store root, when `group_path` is one of its volumes, is refreshed.

    Resumable: a build cut short (a killed job) goes on where it stopped on the next call,
    keeping its finished levels and the finished blocks of the level in progress, and the
    result is the same as an uninterrupted build's. What a level is (its factor and step,
    shape, chunks, dtype, block, labels or not, voxel size and offset) is recorded with the
    progress, in the group's hidden `PYRAMID_PROGRESS` folder (plain files, no zarr node;
    removed when the build is complete); a level whose record differs (another --levels,
    another dtype) is built again, and so is every level after it. Level 0 is identified by
    `files_stamp` (its files' names, sizes and modification times; zarr writes a chunk as a
    new file), taken when a build begins: level 0 written again after a partial build, even
    with the same values, makes the next call start over. A complete pyramid records the
    stamps of all its levels in the group's `PYRAMID_RECORD` attribute: called again with
    the same levels, and nothing written since, it is left as it is (only its metadata
    written again); a level changed since is rebuilt, with the levels after it.
    """
    folder = Path(group_path)
    group = zarr.open_group(str(folder), mode="r+")
    attrs = dict(group.attrs)
    multiscale = attrs["ome"]["multiscales"][0]
    channel_axis = multiscale["axes"][0].get("type") == "channel"
    base = group[LEVEL]
    ndim = len(base.shape)
    voxel, offset = from_ome(str(folder), ndim, attrs, LEVEL) or (None, None)
    factors = level_factors(base.shape[-3:], voxel, levels)
    if label is None:
        label = "image-label" in attrs["ome"]
    specs = _level_specs(base, factors, label, voxel, offset)
    progress = Progress(folder / PYRAMID_PROGRESS)
    base_stamp = files_stamp(folder / LEVEL)
    kept, done, stamps = _plan(group, folder, attrs, progress, specs, base_stamp)
    previous = base if kept == 0 else group[str(kept)]
    for level in range(kept + 1, len(factors)):
        resumed = level == kept + 1 and bool(done)
        array = _level_array(group, folder, level, specs[level - 1], base,
                             funlib_attrs(voxel, offset, channel_axis, factors[level]),
                             resumed)
        with (zarr.config.set({"array.write_empty_chunks": False}),
              progress.journal(level) as mark):  # closed however the level ends
            write_level(previous, array, specs[level - 1]["step"], label, threads=threads,
                        block=specs[level - 1]["block"], skip=done if resumed else (),
                        done=mark)
        stamps.append(files_stamp(folder / str(level)))
        progress.finish_level(level, stamps[-1])
        previous = array
    names = [c["label"] for c in attrs["ome"].get("omero", {}).get("channels", [])] or None
    ome = ome_image_attrs(multiscale.get("name", folder.name), ndim, voxel, offset,
                          channel_axis, factors, names, declared_shift(multiscale))["ome"]
    group.attrs.update({"ome": {**attrs["ome"], **ome},
                        PYRAMID_RECORD: {"version": 1, "levels": specs,
                                         "stamps": [base_stamp, *stamps]}})
    progress.remove()  # after the record: a kill between the two finds every level done
    if folder.parent.name == LABELS:
        refresh_root(folder.parent.parent)
    elif (folder.parent / "zarr.json").is_file():
        refresh_root(folder.parent)
    return len(factors)


def _level_specs(base: zarr.Array, factors: list[tuple[int, int, int]], label: bool,
                 voxel: Any, offset: Any) -> list[dict[str, Any]]:
    """What each level 1..N-1 is, as JSON: a level built to another spec is not reused."""
    specs = []
    lead = tuple(int(n) for n in base.shape[:-3])
    for level, factor in enumerate(factors[1:], start=1):
        shape = level_shape(base.shape, factor)
        unit = tuple(min(c, n) for c, n in zip(write_chunks(base), shape, strict=True))
        step = tuple(f // p for f, p in zip(factor, factors[level - 1], strict=True))
        spec: dict[str, Any] = {
            "factor": list(factor), "step": list(step), "shape": list(shape),
            "chunks": list(unit), "dtype": str(base.dtype), "label": bool(label),
            "block": list(level_block(lead, base.dtype.itemsize, step, unit[-3:])),
            "voxel_size": None if voxel is None else [float(v) for v in voxel],
            "offset": None if offset is None else [float(v) for v in offset],
        }
        inner = shard_chunks(unit, base.chunks) if base.shards else None
        if inner is not None:  # the key only then: an unsharded level's record is as before
            spec.update(chunks=list(inner), shards=list(unit))
        specs.append(spec)
    return json.loads(json.dumps(specs))  # as read back from a record


def _plan(group: zarr.Group, folder: Path, attrs: dict[str, Any], progress: Progress,
          specs: list[dict[str, Any]], base_stamp: str) -> tuple[int, set[int], list[str]]:
    """Decide what of an earlier build is kept (`_reusable_levels`), record the build about
    to run and remove the levels it makes again; returns what `_reusable_levels` does."""
    kept, done, stamps = _reusable_levels(folder, attrs, progress, specs, base_stamp)
    if done and _open_level(folder / str(kept + 1), specs[kept]) is None:
        done = set()  # its array is gone or not as recorded: its blocks are made again
    if kept < len(specs) or PYRAMID_RECORD not in attrs:
        # the progress first: it outranks the record, so a kill between the two keeps the
        # kept levels (the other way round, it found neither and started over)
        progress.start({"version": 1, "base": base_stamp, "levels": specs}, stamps,
                       resumed=bool(done))
        if PYRAMID_RECORD in attrs:  # no longer complete: nobody may take it for complete
            del group.attrs[PYRAMID_RECORD]
    _remove_levels(folder, after=kept + (1 if done else 0))
    return kept, done, stamps


def _reusable_levels(folder: Path, attrs: dict[str, Any], progress: Progress,
                     specs: list[dict[str, Any]], base_stamp: str
                     ) -> tuple[int, set[int], list[str]]:
    """How many levels (1..k) a build may keep, the finished blocks of level k + 1, and the
    kept levels' stamps. A build in progress keeps a finished level while it has the stamp
    it was finished with (written over or removed since, it is made again, with the levels
    after it); a complete pyramid, while its record's stamps match."""
    record = progress.record()
    if record is not None and record.get("version") == 1 and record.get("base") == base_stamp:
        old = record.get("levels") or []
        stamps = []
        while len(stamps) < min(len(old), len(specs)) and old[len(stamps)] == specs[len(stamps)]:
            stamp = _finished_stamp(folder, progress, len(stamps) + 1, specs[len(stamps)])
            if stamp is None:
                break
            stamps.append(stamp)
        kept = len(stamps)
        resumable = kept < min(len(old), len(specs)) and old[kept] == specs[kept]
        return kept, progress.blocks(kept + 1) if resumable else set(), stamps
    built = attrs.get(PYRAMID_RECORD)
    if record is not None or not isinstance(built, dict) or built.get("version") != 1:
        return 0, set(), []
    old, old_stamps = built.get("levels") or [], built.get("stamps") or []
    if not old_stamps or old_stamps[0] != base_stamp:
        return 0, set(), []
    stamps: list[str] = []
    while (len(stamps) < min(len(old), len(specs), len(old_stamps) - 1)
           and old[len(stamps)] == specs[len(stamps)]):
        stamp = files_stamp(folder / str(len(stamps) + 1))
        if stamp != old_stamps[len(stamps) + 1]:
            break
        stamps.append(stamp)
    return len(stamps), set(), stamps


def _finished_stamp(folder: Path, progress: Progress, level: int, spec: dict[str, Any]
                    ) -> str | None:
    """The stamp of `level` if a build in progress finished it and it is as it was then;
    None otherwise. A marker without a stamp (the previous release's) is taken while the
    level opens as `spec` says."""
    marked = progress.level_stamp(level)
    if marked is None:
        return None
    stamp = files_stamp(folder / str(level))
    if marked == stamp or (marked == "" and _open_level(folder / str(level), spec) is not None):
        return stamp
    return None


def _remove_levels(folder: Path, after: int) -> None:
    """Remove the level arrays (digit-named folders) after level `after`."""
    for entry in folder.iterdir():
        if entry.name.isdigit() and int(entry.name) > after and entry.is_dir():
            shutil.rmtree(entry)


def _open_level(path: Path, spec: dict[str, Any]) -> zarr.Array | None:
    """The level array at `path` if it is there as `spec` says (shape, chunks, shards,
    dtype)."""
    try:
        found = zarr.open_array(str(path), mode="r+")
    except Exception:  # missing, or its metadata cut short: made again
        return None
    shards = None if found.shards is None else list(found.shards)
    if (list(found.shape) == spec["shape"] and list(found.chunks) == spec["chunks"]
            and shards == spec.get("shards") and str(found.dtype) == spec["dtype"]):
        return found
    return None


def _level_array(group: zarr.Group, folder: Path, level: int, spec: dict[str, Any],
                 base: zarr.Array, attributes: dict[str, Any], resumed: bool) -> zarr.Array:
    """The array of `level`: the one a resumed build began (`resumed`), else a new one."""
    if resumed and (found := _open_level(folder / str(level), spec)) is not None:
        return found
    if (folder / str(level)).exists():
        shutil.rmtree(folder / str(level))
    return group.create_array(
        name=str(level),
        shape=tuple(spec["shape"]),
        dtype=base.dtype,
        chunks=tuple(spec["chunks"]),
        shards=tuple(spec["shards"]) if spec.get("shards") else None,
        compressors=[compressor(base.dtype)],
        dimension_names=list(base.metadata.dimension_names or ()) or None,
        attributes=attributes,
    )


def _commit(partial: Path, target: Path, overwrite: bool) -> None:
    """Rename the finished volume into place; an old one goes only once the new one is in."""
    if not target.exists():
        os.rename(partial, target)
        return
    if not overwrite:  # appeared while we were writing
        raise VolumeError(f"{target}: appeared while it was being written; not replaced")
    old = target.with_name(target.name + ".replaced" + PARTIAL_SUFFIX)
    if old.exists():
        shutil.rmtree(old)
    os.rename(target, old)
    try:
        os.rename(partial, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


# --- checks -------------------------------------------------------------------------------


def check_new_volume(path: str | os.PathLike[str], name: str, label: bool,
                     taken: str | None = None) -> None:
    """Refuse now what writing volume ``name`` into ``path`` would refuse at the end (a store
    that is not one, a bad or taken name, a store another emrun is writing), so that a long
    job does not run to lose its work; ``taken`` as for `write_volumes`. What a killed
    write of several volumes added is undone first, as its next writer would (`adding`):
    `segment` with several values, killed after the first, was refused its own rerun."""
    if Path(path).is_dir():
        locks.check_free(Path(path), STORE_ADVICE)
        if (Path(path) / adding.RECORD).is_file():
            with held_store(path):
                pass
    _prepare(path, name, label, overwrite=False, taken=taken)


def _prepare(path: str | os.PathLike[str], name: str, label: bool, overwrite: bool,
             taken: str | None = None) -> Path:
    """Check the output store and the volume name; return the volume's folder. ``taken``:
    what the calling command tells its user to do about a volume already there (its own
    options; `TAKEN_ADVICE` names none, as the commands writing here offer different ones)."""
    root_path = Path(path)
    _check_name(root_path, name)
    _check_store(root_path)
    if not label and name == LABELS:
        raise VolumeError(f"{root_path}: {LABELS!r} is the store's OME labels group; give the "
                          "image another name")
    target = volume_dir(root_path, name, label)
    other = volume_dir(root_path, name, not label)
    if (other / "zarr.json").is_file() and not (label and name == LABELS):
        kind = "an image" if label else "a segmentation (labels)"
        raise VolumeError(f"{root_path}: holds {kind} named {name!r}; give another output "
                          "store")  # a name to choose: not every command takes one
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise VolumeError(f"{target}: already exists; not replaced: {taken or TAKEN_ADVICE}")
    if target.exists() and not _is_volume(target):  # overwrite replaces volumes, nothing else
        raise VolumeError(f"{target}: exists and is not a volume; not replaced: give "
                          "another output store")
    return target


def _is_volume(folder: Path) -> bool:
    """Whether `folder` is an image group (a volume emrun may replace), not a file or a
    folder of something else."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    try:
        doc = json.loads((folder / "zarr.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and "multiscales" in (doc.get("attributes") or {}).get("ome", {})


def _open_parent(parent: Path, label: bool) -> zarr.Group:
    """Open (or create) the group the volume goes in, once everything has been checked: the
    store's root, or for a label its OME labels group."""
    root = parent.parent if label else parent
    try:
        group = zarr.open_group(str(root), mode="a", zarr_format=3)
        if not label:
            return group
        if LABELS in group:
            labels = group[LABELS]
            if not isinstance(labels, zarr.Group) or "multiscales" in labels.attrs.get("ome", {}):
                raise VolumeError(f"{root}/{LABELS}: is an image, not an OME labels group; "
                                  "write the segmentation to another store")
            return labels
        return group.create_group(LABELS, attributes={"ome": {"version": "0.5", "labels": []}})
    except VolumeError:
        raise
    except Exception as exc:
        raise VolumeError(f"{root}: cannot open as a zarr v3 group for writing: {exc}") from exc


def _check_name(root: Path, name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name.startswith("__"):
        raise VolumeError(
            f"{root}: bad volume name {name!r}; use letters, digits, '_', '-' and '.', "
            "starting with a letter, digit or '_' (one level: no '/')"
        )
    if name.endswith(PARTIAL_SUFFIX) or name.endswith(".replaced"):
        raise VolumeError(f"{root}: bad volume name {name!r}; the suffix is reserved")
    if name.lower().startswith("zarr."):  # zarr.json: the store's own metadata
        raise VolumeError(f"{root}: bad volume name {name!r}; names starting 'zarr.' are "
                          "zarr's own")


def _root_image(doc: dict[str, Any]) -> bool:
    """Whether a group's zarr.json makes it an OME image whose levels lie at its root
    (datasets ``s0``, ``s1``): emrun's root names an image below it (``image/0``)."""
    try:
        datasets = doc["attributes"]["ome"]["multiscales"][0]["datasets"]
        return any("/" not in str(d["path"]) for d in datasets)
    except (KeyError, IndexError, TypeError):
        return False


def _check_store(root: Path, clear: bool = True) -> None:
    """The output must be a *.zarr folder that is missing, empty or a zarr v3 group (its
    `emrun.locks` file and zarr's temporaries aside: a first write killed while zarr wrote
    the root's metadata left `zarr.<uuid>.partial`, and every later write was refused as
    'not a zarr store'). A first write's leftovers are removed (``clear``) or let be."""
    if not root.name.lower().endswith(".zarr"):
        raise VolumeError(f"{root}: an output store must be a folder whose name ends in .zarr")
    if is_link_loop(root):
        raise VolumeError(f"{root} is a loop of symbolic links; give a .zarr folder")
    if (holder := volume_around(root)) is not None:
        raise VolumeError(f"{root}: lies inside the volume {holder} (an array, or an image "
                          "with its levels): replacing that volume, or rebuilding its "
                          "pyramid, would delete it; give a path outside it")
    if not root.exists():
        if (above := file_in_the_way(root)) is not None:  # found now, not after the work
            raise VolumeError(f"{root}: {above} is a file, not a folder; give another path")
        return
    if not root.is_dir():
        raise VolumeError(f"{root}: exists and is not a folder; not writing a zarr store there")
    meta = root / "zarr.json"
    if meta.is_file():
        try:
            doc = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise VolumeError(f"{root}: unreadable zarr.json: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("node_type") != "group":
            raise VolumeError(f"{root}: is a zarr array, not a group; volumes go into a group")
        if _root_image(doc):
            raise VolumeError(f"{root}: is an OME-Zarr image itself (its levels at its root, "
                              "another tool's); emrun adds volumes to a group, and would "
                              "rename the image the store opens as: give another .zarr path")
        return
    if (root / ".zgroup").exists() or (root / ".zarray").exists():
        raise VolumeError(
            f"{root}: is a zarr v2 store; emrun writes zarr v3 (OME-Zarr 0.5) volumes, "
            "choose another .zarr path"
        )
    entries = store_entries(root)
    if _only_partial_volumes(entries):  # a first write cut short: zarr's IO outlived cleanup
        for leftover in entries if clear else ():
            shutil.rmtree(leftover)
        return
    if entries:
        raise VolumeError(f"{root}: exists and is not a zarr store (no zarr.json); not writing")


def volume_around(root: Path) -> Path | None:
    """The zarr array or image (a volume another command may replace as a whole) a store
    would lie inside, if any: ``outer.zarr/image/inner.zarr`` was written, and a later
    ``convert ... outer.zarr --overwrite`` deleted it with the image."""
    for folder in Path(os.path.abspath(root)).parents:
        if (folder / ".zarray").is_file() or _is_volume(folder):
            return folder
        try:
            doc = json.loads((folder / "zarr.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and doc.get("node_type") == "array":
            return folder
    return None


def _only_partial_volumes(entries: list[Path]) -> bool:
    """Whether a store without metadata holds nothing but volumes being written
    (`NAME.partial`, also under `labels/`; ``entries``: its own, the lock's aside): what an
    interrupted first write leaves when zarr's IO thread writes chunks after the cleanup
    removed the store."""
    found = False
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink() and entry.name.endswith(PARTIAL_SUFFIX):
            found = True
        elif entry.name == LABELS and entry.is_dir() and not entry.is_symlink():
            for inner in entry.iterdir():
                if (inner.name == "zarr.json" and inner.is_file()) or \
                        is_zarr_temporary(inner):
                    continue
                if not (inner.is_dir() and inner.name.endswith(PARTIAL_SUFFIX)):
                    return False
                found = True
        else:
            return False
    return found


def _spec(
    target: Path,
    shape: Sequence[int],
    dtype: Any,
    chunks: Sequence[int] | None,
    voxel_size: Sequence[float] | None,
    offset: Sequence[int] | None,
    channel_axis: bool,
    attrs: dict[str, Any] | None,
    channel_names: Sequence[str] | None = None,
    label: bool = False,
    shift_nm: Sequence[float] | None = None,
    shards: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Validate what the volume will be; user-facing problems are VolumeErrors naming it."""
    shape = tuple(_int(target, n, "shape") for n in shape)
    expected = 4 if channel_axis else 3
    if len(shape) != expected or any(n < 0 for n in shape):
        axes = "(c, z, y, x)" if channel_axis else "(z, y, x)"
        raise VolumeError(f"{target}: shape {list(shape)} is not a {expected}-d {axes} shape")
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise VolumeError(f"{target}: unsupported dtype {dtype!r}") from exc
    if not storable(dt):
        raise VolumeError(f"{target}: unsupported dtype {dt}; expected {STORABLE}")
    dt = native_dtype(dt)
    if chunks is None:
        chunks = default_chunks(shape, channel_axis)
    chunks = tuple(_int(target, c, "chunks") for c in chunks)
    if len(chunks) != len(shape) or any(c < 1 for c in chunks):
        raise VolumeError(f"{target}: chunks {list(chunks)} must be {len(shape)} positive ints")
    if shards is not None:
        shards = tuple(_int(target, c, "shards") for c in shards)
        if len(shards) != len(shape) or any(
                s < c or s % c for s, c in zip(shards, chunks, strict=True)):
            raise VolumeError(f"{target}: shards {list(shards)} must be whole numbers of the "
                              f"chunks {list(chunks)}")
    if voxel_size is not None:
        voxel_size = tuple(voxel_size)
        if len(voxel_size) != 3 or not all(
            isinstance(v, int | float | np.integer | np.floating)
            and not isinstance(v, bool)
            and math.isfinite(v)
            and v > 0
            for v in voxel_size
        ):
            raise VolumeError(
                f"{target}: voxel size {list(voxel_size)} must be 3 positive numbers (nm, z y x)"
            )
        voxel_size = tuple(float(v) for v in voxel_size)
    if offset is not None:
        offset = tuple(_int(target, o, "offset") for o in offset)
        if len(offset) != 3:
            raise VolumeError(f"{target}: offset {list(offset)} must be 3 integers (voxels, zyx)")
    if label and (channel_axis or dt.kind not in "iu"):
        raise VolumeError(f"{target}: a segmentation is one integer id per voxel (z, y, x), "
                          f"not {dt}{' with channels' if channel_axis else ''}")
    if channel_names is not None:
        channel_names = [str(n) for n in channel_names]
        if not channel_axis or len(channel_names) != shape[0]:
            raise ValueError(f"{target}: {len(channel_names)} channel names for shape {shape}")
    extra = dict(attrs or {})
    if "ome" in extra:
        raise ValueError(f"{target}: attrs must not set 'ome'; it is written from the arguments")
    return {
        "shape": shape,
        "dtype": dt,
        "chunks": chunks,
        "shards": shards,
        "voxel_size": voxel_size,
        "offset": offset,
        "channel_axis": channel_axis,
        "channel_names": channel_names,
        "label": label,
        "attrs": extra,
        "shift_nm": None if shift_nm is None else tuple(float(v) for v in shift_nm),
    }


def _int(target: Path, value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer | float | np.floating):
        raise VolumeError(f"{target}: {key} must be integers, got {value!r}")
    if int(value) != value:
        raise VolumeError(f"{target}: {key} must be integers, got {value!r}")
    return int(value)


def _create(parent: zarr.Group, node: str, name: str, spec: dict[str, Any]) -> zarr.Array:
    """Create image group `node` (OME name `name`) and its level-0 array."""
    ome = ome_image_attrs(
        name, len(spec["shape"]), spec["voxel_size"], spec["offset"], spec["channel_axis"],
        channel_names=spec["channel_names"], shift_nm=spec["shift_nm"],
    )
    if spec["label"]:
        ome["ome"]["image-label"] = image_label_attrs()
    group = parent.create_group(node, attributes={**spec["attrs"], **ome})
    axes = ["c", "z", "y", "x"] if spec["channel_axis"] else ["z", "y", "x"]
    return group.create_array(
        name=LEVEL,
        shape=spec["shape"],
        dtype=spec["dtype"],
        chunks=spec["chunks"],
        shards=spec["shards"],
        compressors=[compressor(spec["dtype"])],
        dimension_names=axes,
        attributes=funlib_attrs(spec["voxel_size"], spec["offset"], spec["channel_axis"]),
    )
