"""File-level IO as other tools and file systems leave it: TIFFs cut short (judged from
the file, not tifffile's wording), folders on file systems without locks, TorchScript export
under torch's deprecation, HDF5 attributes, N5 pyramids and pre-1.0 N5, Fortran-ordered
.npy files."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import torch

from emrun import locks
from emrun.errors import UserError
from emrun.geometry import Roi
from emrun.io import VolumeError, open_volume

IMAGE = np.random.default_rng(0).integers(0, 255, (16, 48, 40), np.uint8)


# --- TIFFs cut short, whatever tifffile logs ------------------------------------------------


@pytest.fixture
def tifffile_silent(monkeypatch: pytest.MonkeyPatch) -> None:
    """tifffile logging nothing (as if it reworded or dropped its 'invalid page offset'):
    the file's own facts must still tell a cut file."""
    import tifffile.tifffile as inner

    silent = logging.getLogger("emrun-tests.tifffile-silent")
    silent.disabled = True
    monkeypatch.setattr(inner, "logger", lambda: silent)


def _cuts(size: int) -> list[int]:
    return [300, 2000, size // 3, size // 2, size - 100, size - 1]


@pytest.mark.parametrize(("compression", "kwargs"), [
    (None, {}), ("zlib", {}), ("zlib", {"tile": (16, 16)}), (None, {"metadata": None}),
    ("zlib", {"metadata": None, "rowsperstrip": 8}), (None, {"bigtiff": True, "metadata": None}),
])
def test_a_tiff_cut_anywhere_is_refused_without_tifffile_s_words(
        tmp_path: Path, tifffile_silent: None, compression: str | None, kwargs: dict) -> None:
    """A compressed file cut in its middle opened as its first pages (a shorter or 2-d
    volume), refused only because tifffile logged 'invalid page offset'; without that line
    it was read as whole. Every cut is refused, naming the file as cut short; a whole file
    still reads."""
    whole = tmp_path / "whole.tif"
    tifffile.imwrite(whole, IMAGE, compression=compression, **kwargs)
    np.testing.assert_array_equal(open_volume(whole).read(), IMAGE)
    data = whole.read_bytes()
    for cut in _cuts(len(data)):
        path = tmp_path / f"cut{cut}.tif"
        path.write_bytes(data[:cut])
        try:
            volume = open_volume(path)
        except VolumeError as exc:
            assert "the TIFF file is cut short" in str(exc), (cut, str(exc))
            continue
        # only a cut that loses no page structure nor data may open, and it reads whole
        np.testing.assert_array_equal(volume.read(), IMAGE, err_msg=f"cut at {cut}")


def test_a_tiff_whose_page_chain_breaks_names_the_pages_it_holds(
        tmp_path: Path, tifffile_silent: None) -> None:
    whole = tmp_path / "whole.tif"
    tifffile.imwrite(whole, IMAGE, compression="zlib")
    with tifffile.TiffFile(whole) as tif:
        fourth = tif.pages[4].offset  # the fifth page's header: the file ends just before it
    (tmp_path / "cut.tif").write_bytes(whole.read_bytes()[:fourth])
    with pytest.raises(VolumeError, match=r"cut short or damaged: only 4 of its pages"):
        open_volume(tmp_path / "cut.tif")


def test_a_long_stack_and_an_imagej_file_still_open(tmp_path: Path) -> None:
    """The chain and data checks walk every page: a whole file of many pages passes."""
    many = np.zeros((300, 8, 8), np.uint16)
    tifffile.imwrite(tmp_path / "many.tif", many, compression="zlib")
    assert open_volume(tmp_path / "many.tif").shape == (300, 8, 8)
    tifffile.imwrite(tmp_path / "ij.tif", IMAGE, imagej=True)
    np.testing.assert_array_equal(open_volume(tmp_path / "ij.tif").read(), IMAGE)


# --- folders on a file system without locks -----------------------------------------------


@pytest.fixture
def no_locks(monkeypatch: pytest.MonkeyPatch) -> None:
    """flock fails as on an NFS mount without its lock service."""

    def refuse(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(locks.fcntl, "flock", refuse)
    monkeypatch.setattr(locks, "_told_no_locks", False, raising=False)


HOLDER = textwrap.dedent("""\
    import errno, os, sys
    from pathlib import Path
    from emrun import locks
    def refuse(fd, operation):
        raise OSError(errno.ENOLCK, "no locks")
    locks.fcntl.flock = refuse
    try:
        locks.hold(Path(sys.argv[1]), "x")
    except Exception as exc:
        print("refused" if "in use" in str(exc) else repr(exc), flush=True)
        sys.exit(0)
    print("held", flush=True)
    sys.stdin.readline()
    """)


def test_two_emruns_on_a_file_system_without_locks_do_not_both_write(
        tmp_path: Path, no_locks: None, capfd: pytest.CaptureFixture[str]) -> None:
    """flock's ENOLCK let every process go on without a lock, so two wrote one output; the
    lock file now stands in, and the user is told once."""
    folder = tmp_path / "out.zarr"
    folder.mkdir()
    other = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=r"in use by another emrun \(pid \d+ on .*remove "):
            locks.hold(folder, "give another output")
        with pytest.raises(UserError, match="in use by another emrun"):
            locks.check_free(folder, "x")
    finally:
        other.communicate("\n", timeout=60)
    assert "cannot lock files (ENOLCK)" in capfd.readouterr().err
    assert not (folder / locks.LOCK_NAME).exists()  # its holder let go when it ended

    locks.hold(folder, "x")
    try:
        mine = (folder / locks.LOCK_NAME).read_text()
        assert mine.startswith(f"pid {os.getpid()} on {socket.gethostname()} since ")
        done = subprocess.run([sys.executable, "-c", HOLDER, str(folder)], text=True,
                              input="\n", capture_output=True, timeout=60)
        assert done.stdout.strip() == "refused", done.stderr
        other_folder = tmp_path / "second"
        other_folder.mkdir()
        locks.hold(other_folder, "x")
        locks.release(other_folder)
        assert capfd.readouterr().err == ""  # said once per process
    finally:
        locks.release(folder)
    assert not (folder / locks.LOCK_NAME).exists()


def test_without_locks_a_killed_holder_s_file_is_taken_over_on_its_host_only(
        tmp_path: Path, no_locks: None) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    here = socket.gethostname()
    (folder / locks.LOCK_NAME).write_text(f"pid {gone.stdout.strip()} on {here} since x\n")
    locks.check_free(folder, "x")  # a dead holder on this machine holds nothing
    locks.hold(folder, "x")
    try:
        assert (folder / locks.LOCK_NAME).read_text().startswith(f"pid {os.getpid()} ")
    finally:
        locks.release(folder)

    (folder / locks.LOCK_NAME).write_text("pid 1 on another-machine since x\n")
    with pytest.raises(UserError, match=rf"remove {folder / locks.LOCK_NAME}"):
        locks.hold(folder, "x")
    assert (folder / locks.LOCK_NAME).read_text() == "pid 1 on another-machine since x\n"


# --- TorchScript export under torch's deprecation ------------------------------------------


def _trained(tmp_path: Path) -> Path:
    from emrun.models import build_model
    from emrun.recipe import Recipe
    from emrun.train.run_dir import recipe_text

    recipe = Recipe.model_validate({
        "name": "quiet",
        "data": {"sources": {"a": {"type": "synthetic", "shape": [16, 64, 64], "seed": 3}}},
        "model": {"type": "rsunet", "widths": [4, 8]},
        "tasks": {"aff": {"target": {"type": "affinity"}}},
        "train": {"patch": [4, 16, 16], "iterations": 2, "workers": 0}})
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"model": build_model(recipe).state_dict(), "iteration": 2,
                "recipe": recipe_text(recipe)}, run / "checkpoints" / "last.pt")
    return run


def test_a_bioimageio_export_shows_no_torchscript_deprecation_and_hides_nothing_else(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch 2.10+ deprecates torch.jit.trace and torch.jit.save, which bioimage.io's
    torchscript weights need: the user, who cannot act on it, saw torch's advice; and the
    trace ran under a blanket filter that hid every other warning too."""
    pytest.importorskip("bioimageio.spec")
    from typer.testing import CliRunner

    from emrun.cli import app

    real_trace = torch.jit.trace

    def trace_warning_of_its_own(*args: object, **kwargs: object) -> object:
        warnings.warn("a model's own warning", UserWarning, stacklevel=2)
        return real_trace(*args, **kwargs)

    monkeypatch.setattr(torch.jit, "trace", trace_warning_of_its_own)
    out = tmp_path / "quiet.zip"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        done = CliRunner().invoke(app, ["export", str(_trained(tmp_path)), str(out),
                                        "--format", "bioimageio"])
    assert done.exit_code == 0, done.output
    said = [str(w.message) for w in seen]
    assert not [s for s in said if "torch.jit" in s], said
    assert "a model's own warning" in said
    import zipfile

    with zipfile.ZipFile(out) as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import io

        network = torch.jit.load(io.BytesIO(archive.read("weights_torchscript.pt")))
    with torch.no_grad():
        assert tuple(network(torch.rand(1, 1, 4, 16, 16))[0].shape)[1:] == (3, 4, 16, 16)


# --- HDF5: attributes -----------------------------------------------------------------------


def test_hdf5_volumes_report_their_attributes(tmp_path: Path) -> None:
    """`attributes` and `container_attributes` sat inside another function, so every HDF5
    volume reported none: `segment` never found its affinities' `offsets`."""
    from emrun.segment.job import stored_offsets

    path = tmp_path / "affs.h5"
    offsets = [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]
    with h5py.File(path, "w") as f:
        group = f.create_group("pred/nested")
        node = group.create_dataset("affs", data=np.zeros((3, 4, 8, 8), ">f4"),
                                    chunks=(1, 2, 4, 4))
        node.attrs["offsets"] = np.array(offsets, ">i8")
        group.attrs["made_by"] = "another tool"
        f.attrs["note"] = "top"
    volume = open_volume(path / Path("pred/nested/affs"))
    assert volume.dtype == np.dtype("float32") and volume.chunks == (1, 2, 4, 4)
    assert stored_offsets(volume) == offsets
    assert volume.attributes()["made_by"] == "another tool"
    assert volume.container_attributes() == {"note": "top"}


# --- N5: pyramids as n5-viewer writes them, and N5 before 1.0 -------------------------------


def _n5(root: Path, name: str, data: np.ndarray, **attrs: object) -> None:
    import tensorstore as ts

    store = ts.open({"driver": "n5", "kvstore": {"driver": "file", "path": f"{root}/{name}/"},
                     "metadata": {"dimensions": list(data.shape[::-1]),
                                  "blockSize": [4] * data.ndim, "dataType": str(data.dtype),
                                  "compression": {"type": "gzip"}}},
                    create=True, delete_existing=True).result()
    store.write(data.T).result()
    if attrs:
        found = json.loads((root / name / "attributes.json").read_text())
        (root / name / "attributes.json").write_text(json.dumps({**found, **attrs}))


def test_an_n5_viewer_pyramid_level_has_its_own_voxel_size(tmp_path: Path) -> None:
    """n5-viewer (and n5-spark's pyramids) give every level the full resolution's
    `pixelResolution` and the level's `downsamplingFactors`: s1 read as 6 nm, not 12."""
    pytest.importorskip("tensorstore")
    root = tmp_path / "vol.n5"
    pixel = {"dimensions": [0.006, 0.006, 0.03], "unit": "um"}
    _n5(root, "s0", IMAGE[:, :16, :16], pixelResolution=pixel, downsamplingFactors=[1, 1, 1])
    _n5(root, "s1", IMAGE[:, :8, :8], pixelResolution=pixel, downsamplingFactors=[2, 2, 1])
    assert open_volume(root / "s0").voxel_size == (30.0, 6.0, 6.0)
    assert open_volume(root / "s1").voxel_size == (30.0, 12.0, 12.0)


def test_an_n5_dataset_from_before_n5_1_0_reads(tmp_path: Path) -> None:
    """N5 before 1.0 names its codec in `compressionType`; tensorstore refused such a
    dataset ('Error parsing object member "compression"')."""
    pytest.importorskip("tensorstore")
    root = tmp_path / "old.n5"
    for codec in ("raw", "gzip"):
        import tensorstore as ts

        store = ts.open({"driver": "n5", "kvstore": {"driver": "file",
                                                     "path": f"{root}/{codec}/"},
                         "metadata": {"dimensions": [40, 48, 16], "blockSize": [8, 8, 8],
                                      "dataType": "uint8", "compression": {"type": codec}}},
                        create=True, delete_existing=True).result()
        store.write(IMAGE.T).result()
        attrs = json.loads((root / codec / "attributes.json").read_text())
        del attrs["compression"]
        attrs |= {"compressionType": codec, "resolution": [6, 6, 30]}
        (root / codec / "attributes.json").write_text(json.dumps(attrs))
        volume = open_volume(root / codec)
        assert volume.voxel_size == (30.0, 6.0, 6.0)
        np.testing.assert_array_equal(volume.read(Roi((2, 3, 4), (5, 6, 7))),
                                      IMAGE[2:7, 3:9, 4:11])
        assert "compressionType" not in volume.attributes()


# --- .npy in Fortran order -------------------------------------------------------------------


def test_a_fortran_ordered_npy_reads_in_c_order(tmp_path: Path) -> None:
    """Every other format reads C-ordered arrays; a Fortran-ordered .npy (MATLAB's and
    Julia's exports, numpy's own `asfortranarray`) came back Fortran-ordered, which
    torch's `view` refuses."""
    np.save(tmp_path / "f.npy", np.asfortranarray(IMAGE.astype(">u2")))
    volume = open_volume(tmp_path / "f.npy")
    box = volume.read(Roi((1, 2, 3), (4, 5, 6)))
    np.testing.assert_array_equal(box, IMAGE[1:5, 2:7, 3:9])
    assert box.flags.c_contiguous and box.dtype == np.dtype("uint16")
    torch.from_numpy(volume.read()).view(-1)


# --- zarr arrays in a folder with no zarr metadata of its own ---------------------------------


def test_a_zarr_array_in_a_folder_without_group_metadata_opens(tmp_path: Path) -> None:
    """Tools that write arrays one by one leave `vol.zarr/raw` with no `.zgroup` (or
    `zarr.json`) above it; zarr cannot open the folder, and such a volume was refused as
    "not a zarr store". It opens as the bare array it is; a name that is not there lists
    the nodes that are."""
    import zarr

    for fmt, nested in ((2, "raw"), (3, "em/raw")):
        store = tmp_path / f"v{fmt}.zarr"
        array = zarr.open_array(store / nested, mode="w", shape=IMAGE.shape,
                                chunks=(8, 16, 16), dtype=IMAGE.dtype, zarr_format=fmt)
        array[:] = IMAGE
        volume = open_volume(f"{store}/{nested}")
        assert str(volume) == f"{store}/{nested}" and volume.shape == IMAGE.shape
        np.testing.assert_array_equal(volume.read(Roi((2, 3, 4), (5, 6, 7))),
                                      IMAGE[2:7, 3:9, 4:11])
    with pytest.raises(VolumeError, match=r"v2\.zarr has no array 'labels'; zarr nodes in "
                                          r"it: .*v2\.zarr/raw"):
        open_volume(tmp_path / "v2.zarr" / "labels")
    with pytest.raises(VolumeError, match=r"v2\.zarr has no zarr metadata of its own; name "
                                          r"a zarr node inside it: .*v2\.zarr/raw"):
        open_volume(tmp_path / "v2.zarr")
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(VolumeError, match="not a zarr store"):
        open_volume(tmp_path / "empty.zarr" / "raw")


def test_the_labels_group_named_as_a_volume_is_said_to_be_that(tmp_path: Path) -> None:
    """`seg.zarr/labels` was 'seg.zarr has no array 'labels'', though the folder is there:
    it is the store's OME-Zarr labels group, whose segmentations open by their names."""
    from emrun.io import write_volume

    write_volume(tmp_path / "s.zarr", "seg", IMAGE.astype(np.uint64), label=True)
    with pytest.raises(VolumeError, match=r"s\.zarr has no array 'labels' \(.*s\.zarr/labels "
                                          r"is the store's OME-Zarr labels group, whose "
                                          r"segmentations open by name\); arrays: .*s\.zarr/seg$"):
        open_volume(f"{tmp_path}/s.zarr/labels")
    assert open_volume(f"{tmp_path}/s.zarr/seg").shape == IMAGE.shape
