"""Probe of the per-process cache of opened TIFF files (`emrun.io.tiff_volume._opened`).

The cache keys an opened `tifffile.TiffFile` by the file's version in this process
(`FileKey`: real path, pid, device, inode, size, mtime, ctime) and keeps the `KEPT_FILES`
most recently used. Probed here: files replaced in place or by a rename,
deleted, changed after their volume was opened; more files than are kept (are evicted
ones closed, and what of a read racing an eviction); reader threads; forked children;
symlinks; BigTIFF; a folder of sections. Small synthetic files in tmp_path only."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tifffile

import emrun.io.tiff_volume as tv
from emrun.geometry import Roi
from emrun.io import VolumeError
from emrun.io.tiff_volume import KEPT_FILES, open_tiff, open_tiff_stack

SHAPE = (5, 64, 64)  # 5 sections: a leading 3 or 4 would be written as colour planes


def stack(seed: int = 0, dtype: type = np.uint16) -> np.ndarray:
    return (np.arange(np.prod(SHAPE)).reshape(SHAPE) * 7 + seed * 1000).astype(dtype)


@pytest.fixture(autouse=True)
def own_cache() -> Iterator[None]:
    """Each test starts with an empty cache; what it opened is closed after it."""
    with tv._kept_lock:
        saved = tv._kept.copy()
        tv._kept.clear()
    try:
        yield
    finally:
        with tv._kept_lock:
            for key, opened in tv._kept.items():
                if key[1] == os.getpid():
                    opened.tif.close()
            tv._kept.clear()
            tv._kept.update(saved)


def open_fds() -> dict[str, str]:
    """This process's open file descriptors: number -> what they point at."""
    found = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed meanwhile
            found[fd] = os.readlink(f"/proc/self/fd/{fd}")
    return found


def fds_to(path: Path) -> list[str]:
    return [target for target in open_fds().values() if target.startswith(str(path))]


def same_time(path: Path, like: os.stat_result) -> None:
    os.utime(path, ns=(like.st_atime_ns, like.st_mtime_ns))


# --- a file replaced or changed under a cached handle ---------------------------------

def test_a_rewrite_in_place_of_the_same_layout_and_time_reads_the_new_data(
        tmp_path: Path) -> None:
    """Same inode, same size, mtime put back: the cached handle's page offsets still fit,
    and the data read is the file's now."""
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, stack(0))
    volume = open_tiff(str(path))
    np.testing.assert_array_equal(volume.read(), stack(0))
    before = os.stat(path)
    tifffile.imwrite(path, stack(1))
    same_time(path, before)
    assert os.stat(path).st_ino == before.st_ino and os.stat(path).st_size == before.st_size
    np.testing.assert_array_equal(volume.read(), stack(1))


def test_a_new_version_with_another_mtime_is_opened_again(tmp_path: Path) -> None:
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, stack(0))
    volume = open_tiff(str(path))
    volume.read()
    replacement = tmp_path / "new.tif"
    tifffile.imwrite(replacement, stack(2))
    os.utime(replacement, ns=(0, os.stat(path).st_mtime_ns + 10**9))
    os.replace(replacement, path)
    np.testing.assert_array_equal(volume.read(), stack(2))
    np.testing.assert_array_equal(open_tiff(str(path)).read(), stack(2))


def test_a_file_renamed_over_with_the_same_mtime_and_size_is_read_anew(
        tmp_path: Path) -> None:
    """An atomic save (write aside, rename over) of a stack of the same shape, mtime the
    same (cp -p, rsync -a, tar; or a filesystem keeping whole seconds)."""
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, stack(0))
    volume = open_tiff(str(path))
    np.testing.assert_array_equal(volume.read(), stack(0))
    before = os.stat(path)
    replacement = tmp_path / "new.tif"
    tifffile.imwrite(replacement, stack(3))
    same_time(replacement, before)
    os.replace(replacement, path)
    now = os.stat(path)
    assert (now.st_size, now.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert now.st_ino != before.st_ino
    np.testing.assert_array_equal(open_tiff(str(path)).read(), stack(3))


def test_reopening_a_file_rewritten_in_place_with_the_same_size_and_mtime(
        tmp_path: Path) -> None:
    path = tmp_path / "s.tif"
    first = np.ones(SHAPE, np.uint16)
    tifffile.imwrite(path, first, metadata=None)
    open_tiff(str(path)).read()
    before = os.stat(path)
    second = np.arange(SHAPE[0] * SHAPE[1] * SHAPE[2] * 2,
                       dtype=np.uint8).reshape(SHAPE[0], SHAPE[1], SHAPE[2] * 2)
    tifffile.imwrite(path, second, metadata=None)  # same inode, same size: 2 x uint8
    same_time(path, before)
    assert os.stat(path).st_size == before.st_size
    volume = open_tiff(str(path))
    assert volume.shape == second.shape and volume.dtype == second.dtype
    data = volume.read()
    assert data.shape == second.shape
    np.testing.assert_array_equal(data, second)


def _changed(path: Path, how: str) -> None:
    if how == "float32 now":
        tifffile.imwrite(path, stack(0).astype(np.float32) / 7)
    elif how == "fewer sections":
        tifffile.imwrite(path, stack(0)[:2])
    else:  # smaller sections
        tifffile.imwrite(path, stack(0)[:, :32, :32])
    os.utime(path, ns=(0, os.stat(path).st_mtime_ns + 10**9))


@pytest.mark.parametrize("how", ["float32 now", "fewer sections", "smaller sections"])
def test_a_read_after_the_file_changed_shape_or_dtype_is_refused(
        tmp_path: Path, how: str) -> None:
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, stack(0))
    volume = open_tiff(str(path))
    volume.read()
    _changed(path, how)
    with pytest.raises(VolumeError):
        volume.read()


def test_a_deleted_file_is_a_volume_error_on_read(tmp_path: Path) -> None:
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, stack(0))
    volume = open_tiff(str(path))
    volume.read()
    path.unlink()
    with pytest.raises(VolumeError, match=r"s\.tif"):
        volume.read()


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_no_handle_is_kept_to_a_file_gone_from_its_path(tmp_path: Path, how: str) -> None:
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, stack(0))
    volume = open_tiff(str(path))
    volume.read()
    if how == "deleted":
        path.unlink()
        with pytest.raises(VolumeError):
            volume.read()
    else:
        replacement = tmp_path / "new.tif"
        tifffile.imwrite(replacement, stack(1))
        os.utime(replacement, ns=(0, os.stat(path).st_mtime_ns + 10**9))
        os.replace(replacement, path)
        np.testing.assert_array_equal(volume.read(), stack(1))
    gone = [target for target in fds_to(path) if target.endswith("(deleted)")]
    assert not gone, f"still open: {gone}"


# --- more files than are kept ---------------------------------------------------------

def _files(tmp_path: Path, count: int) -> list[Path]:
    paths = []
    for i in range(count):
        path = tmp_path / f"f{i}.tif"
        tifffile.imwrite(path, stack(i))
        paths.append(path)
    return paths


def test_files_evicted_from_the_cache_are_closed(tmp_path: Path) -> None:
    paths = _files(tmp_path, KEPT_FILES + 3)
    volumes = [open_tiff(str(p)) for p in paths]
    for _ in range(2):
        for i, volume in enumerate(volumes):
            np.testing.assert_array_equal(volume.read(Roi((1, 0, 0), (2, 64, 64))),
                                          stack(i)[1:3])
    assert len(tv._kept) == KEPT_FILES
    assert len(fds_to(tmp_path)) == KEPT_FILES
    kept = {key[0] for key in tv._kept}
    assert kept == {os.path.realpath(p) for p in paths[-KEPT_FILES:]}


def test_a_read_racing_an_eviction_does_not_read_from_a_closed_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The interleaving made certain: another thread reads `KEPT_FILES` other files right
    after this read got its cached handle and before it takes the handle's lock."""
    paths = _files(tmp_path, KEPT_FILES + 1)
    target = open_tiff(str(paths[0]))
    target.read()
    real = tv._opened

    first = [True]

    def then_others_read(path: str):  # type: ignore[no-untyped-def]
        got = real(path)
        if path == str(paths[0]) and first:  # once: a retry is not raced again
            first.clear()
            reader = threading.Thread(target=lambda: [real(str(p)) for p in paths[1:]])
            reader.start()
            reader.join()
        return got

    monkeypatch.setattr(tv, "_opened", then_others_read)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        data = target.read()
    np.testing.assert_array_equal(data, stack(0))
    closed = [str(w.message) for w in said if "closed file" in str(w.message)]
    assert not closed, closed


def test_threads_reading_more_files_than_are_kept_get_their_data(tmp_path: Path) -> None:
    paths = _files(tmp_path, KEPT_FILES + 2)
    volumes = [open_tiff(str(p)) for p in paths]

    def read(job: int) -> bool:
        i = job % len(volumes)
        z = job % SHAPE[0]
        got = volumes[i].read(Roi((z, 3, 5), (1, 40, 50)))
        return bool(np.array_equal(got, stack(i)[z:z + 1, 3:43, 5:55]))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the race above may warn; the data must hold
        with ThreadPoolExecutor(6) as pool:
            assert all(pool.map(read, range(120)))
    assert len(fds_to(tmp_path)) <= KEPT_FILES


# --- reader threads and forks on one cached file --------------------------------------

@pytest.mark.parametrize("compression", [None, "zlib"])
def test_threads_reading_one_cached_file_get_the_right_sections(
        tmp_path: Path, compression: str | None) -> None:
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, stack(0), compression=compression)
    whole = tifffile.imread(path)
    volume = open_tiff(str(path))
    rng = np.random.default_rng(0)
    boxes = []
    for _ in range(200):
        z, y, x = (int(rng.integers(0, n)) for n in SHAPE)
        boxes.append(Roi((z, y, x), (int(rng.integers(1, SHAPE[0] - z + 1)),
                                     int(rng.integers(1, SHAPE[1] - y + 1)),
                                     int(rng.integers(1, SHAPE[2] - x + 1)))))

    def right(box: Roi) -> bool:
        return bool(np.array_equal(volume.read(box), whole[box.to_slices()]))

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(right, boxes))
    assert len(tv._kept) == 1 and len(fds_to(path)) == 1


def _child_reads(path: str, rounds: int) -> int:
    """In a forked child: read every section `rounds` times; 0 when all were right."""
    expected = tifffile.imread(path)
    opened = tv.open_tiff(path)
    for _ in range(rounds):
        for z in range(SHAPE[0]):
            if not np.array_equal(opened.read(Roi((z, 0, 0), (1, 64, 64))),
                                  expected[z:z + 1]):
                return 1
    return 0


def test_a_forked_child_and_its_parent_read_one_cached_file_at_once(tmp_path: Path) -> None:
    """A shared file offset would mix the two processes' reads: the child opens its own."""
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, stack(0), compression="zlib")
    volume = open_tiff(str(path))
    volume.read()
    parent_tif = next(iter(tv._kept.values())).tif
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fork with threads of other tests' pools alive
        pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 2
        try:
            code = _child_reads(str(path), 40)
            mine = [opened.tif for key, opened in tv._kept.items()
                    if key[1] == os.getpid()]
            if len(mine) != 1 or mine[0] is parent_tif:
                code = 3
        finally:
            os._exit(code)
    try:
        for _ in range(40):
            for z in range(SHAPE[0]):
                np.testing.assert_array_equal(volume.read(Roi((z, 0, 0), (1, 64, 64))),
                                              stack(0)[z:z + 1])
    finally:
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert not parent_tif.filehandle.closed
    np.testing.assert_array_equal(volume.read(), stack(0))


def _section_sum(args: tuple[str, int]) -> int:
    path, z = args
    return int(tv.open_tiff(path).read(Roi((z, 0, 0), (1, 64, 64))).sum())


def test_fork_pool_workers_read_a_file_the_parent_cached(tmp_path: Path) -> None:
    """As a fork-context DataLoader does: the parent opened the volume, workers read it,
    each starting with none of the parent's entries (`_after_fork_in_child`), none closed."""
    paths = _files(tmp_path, KEPT_FILES + 1)
    for p in paths:
        open_tiff(str(p)).read()
    parent = [opened.tif for opened in tv._kept.values()]
    jobs = [(str(p), z) for p in paths for z in range(SHAPE[0])] * 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with multiprocessing.get_context("fork").Pool(2) as pool:
            sums = pool.map(_section_sum, jobs, chunksize=3)
    expected = [int(stack(i)[z].sum()) for i in range(len(paths)) for z in range(SHAPE[0])]
    assert sums == expected * 2
    assert not any(tif.filehandle.closed for tif in parent)
    for i, p in enumerate(paths[-KEPT_FILES:], start=len(paths) - KEPT_FILES):
        np.testing.assert_array_equal(open_tiff(str(p)).read(), stack(i))


def test_a_child_forked_while_the_cache_lock_is_held_can_read(tmp_path: Path) -> None:
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, stack(0))
    volume = open_tiff(str(path))
    volume.read()
    held, forked = threading.Event(), threading.Event()

    def hold() -> None:  # another thread inside _opened or _keep
        with tv._kept_lock:
            held.set()
            forked.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pid = os.fork()
    if pid == 0:
        code = 2
        try:
            code = 0 if np.array_equal(volume.read(), stack(0)) else 1
        finally:
            os._exit(code)
    forked.set()
    holder.join()
    done = threading.Event()
    waited: list[int] = []

    def wait() -> None:
        waited.append(os.waitpid(pid, 0)[1])
        done.set()

    threading.Thread(target=wait, daemon=True).start()
    finished = done.wait(2)
    if not finished:
        os.kill(pid, 9)
        done.wait(5)
    assert finished and os.waitstatus_to_exitcode(waited[0]) == 0


# --- names, formats -------------------------------------------------------------------

def test_a_symlink_and_its_file_share_one_handle(tmp_path: Path) -> None:
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, stack(0))
    link = tmp_path / "link.tif"
    link.symlink_to(path)
    by_link, by_file = open_tiff(str(link)), open_tiff(str(path))
    np.testing.assert_array_equal(by_link.read(), stack(0))
    np.testing.assert_array_equal(by_file.read(), stack(0))
    assert len(tv._kept) == 1 and len(fds_to(tmp_path)) == 1
    # the link turned to another file of the same size and mtime: its real path differs
    other = tmp_path / "other.tif"
    tifffile.imwrite(other, stack(5))
    same_time(other, os.stat(path))
    link.unlink()
    link.symlink_to(other)
    np.testing.assert_array_equal(by_link.read(), stack(5))
    np.testing.assert_array_equal(by_file.read(), stack(0))


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_a_bigtiff_is_cached_and_read_right(tmp_path: Path, compression: str | None) -> None:
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, stack(0), bigtiff=True, compression=compression)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_bigtiff
    volume = open_tiff(str(path))
    assert volume.shape == SHAPE
    for z in range(SHAPE[0]):
        np.testing.assert_array_equal(volume.read(Roi((z, 10, 0), (1, 20, 64))),
                                      stack(0)[z:z + 1, 10:30])
    assert len(tv._kept) == 1 and len(fds_to(path)) == 1


def test_a_bigtiff_cut_short_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, stack(0), bigtiff=True)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(VolumeError, match="cut short"):
        open_tiff(str(path))
    assert not tv._kept and not fds_to(path)


def test_a_folder_of_sections_reads_right_and_keeps_nothing_open(tmp_path: Path) -> None:
    folder = tmp_path / "sections"
    folder.mkdir()
    for z in range(12):  # natural order: s_2 before s_10
        tifffile.imwrite(folder / f"s_{z}.tif", stack(z)[0])
    volume = open_tiff_stack(str(folder))
    assert volume.shape == (12, *SHAPE[1:])
    expected = np.stack([stack(z)[0] for z in range(12)])

    def right(z: int) -> bool:
        return bool(np.array_equal(volume.read(Roi((z, 0, 0), (3, 64, 64))),
                                   expected[z:z + 3]))

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(right, range(10)))
    assert not fds_to(folder) and not tv._kept
