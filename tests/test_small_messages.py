"""Small messages: a work folder that is a file or on /proc, a synthetic volume too small for
a cell or named only `.zarr`, zarr's warning for a stray file under `emrun view`, the AWS
log before an s3 error, a stated voxel size at a remote store's coarser level, and how the
refusal of unreadable voxel-size metadata says to state one."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import h5py
import numpy as np
import pytest
import zarr
from test_remote_volumes import served
from typer.testing import CliRunner

from emrun import capacity
from emrun.capacity import check_output_fits, check_work_folder, work_folder
from emrun.cli import app
from emrun.errors import UserError
from emrun.io import VolumeError, ignore_stray_objects, open_volume
from emrun.io.metadata import MetadataIgnored, stated_voxel_size
from emrun.synth import synthesize

runner = CliRunner()
IMAGE = np.arange(6 * 10 * 14, dtype=np.uint8).reshape(6, 10, 14)
STATED = (30.0, 6.0, 6.0)


# ============================================ 1. work folders: a file, a pseudo file system


@pytest.mark.parametrize("check", [work_folder, check_work_folder])
def test_a_file_given_as_a_folder_is_said_to_be_a_file(tmp_path: Path, check: Any) -> None:
    """work_folder said 'cannot make a folder there (File exists)'."""
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError) as caught:
        check(tmp_path / "notes.txt", "--work-dir")
    said = str(caught.value)
    assert "File exists" not in said
    assert said == (f"--work-dir {tmp_path / 'notes.txt'}: cannot make a folder there (it is "
                    "not a folder but a file)")


def test_a_folder_below_a_file_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match=r"\(.*notes\.txt is not a folder but a file\)"):
        work_folder(tmp_path / "notes.txt" / "sub", "--folder")
    assert (tmp_path / "notes.txt").is_file()


def _no_blocks(monkeypatch: pytest.MonkeyPatch, where: Path) -> None:
    """Make ``where`` look like /proc: a file system without a single block."""
    real = os.statvfs

    def statvfs(path: Any) -> Any:
        found = real(path)
        if Path(path) == where:
            return SimpleNamespace(f_blocks=0, f_bavail=0, f_frsize=found.f_frsize)
        return found

    monkeypatch.setattr(capacity.os, "statvfs", statvfs)


@pytest.mark.parametrize("check", [work_folder, check_work_folder])
def test_a_folder_on_a_pseudo_file_system_cannot_be_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, check: Any) -> None:
    """/proc as root passed the writable check and then read as '0 MB free' (or, made,
    'No such file or directory')."""
    _no_blocks(monkeypatch, tmp_path)
    with pytest.raises(UserError, match=r"cannot be written: .* is a pseudo file system"
                                        r".*, not a disk; give a folder on a disk"):
        check(tmp_path / "work", "--work-dir")
    assert not (tmp_path / "work").exists()


def test_an_output_on_a_pseudo_file_system_is_not_0_mb_free(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_blocks(monkeypatch, tmp_path)
    with pytest.raises(UserError) as caught:
        check_output_fits(tmp_path / "out.zarr", 10**9, "converting x")
    assert "0 MB" not in str(caught.value)
    assert "pseudo file system" in str(caught.value)


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.isdir("/proc")
                    or os.statvfs("/proc").f_blocks != 0, reason="needs Linux's /proc")
def test_proc_itself_is_named_with_its_type() -> None:
    with pytest.raises(UserError, match=r"/proc is a pseudo file system \(proc\), not a disk"):
        check_work_folder("/proc/emrun-work", "--work-dir")
    with pytest.raises(UserError, match=r"/proc/o\.zarr: cannot be written: /proc is a pseudo"):
        check_output_fits("/proc/o.zarr", 10**9, "converting x")


def test_a_disk_folder_is_still_made(tmp_path: Path) -> None:
    assert work_folder(tmp_path / "a" / "b", "--work-dir") == str(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()
    check_output_fits(tmp_path / "out.zarr", 1000, "converting x")


# ============================================ 2. data synth: tiny shapes, a name that is a suffix


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 2, 2), (1, 4, 4), (3, 3, 3), (8, 1, 1)])
def test_a_tiny_synthetic_volume_has_a_cell(shape: tuple[int, int, int]) -> None:
    """1 x 1 x 1 made '0 cells': every piece was below the dust size (or membrane)."""
    for seed in range(3):
        labels = synthesize(shape, seed).labels
        ids = np.unique(labels[labels > 0])
        assert ids.size >= 1
        np.testing.assert_array_equal(ids, np.arange(1, ids.size + 1))  # still consecutive


def test_a_volume_with_cells_is_as_it_was() -> None:
    """The fallback is only for volumes that had none: others keep every voxel."""
    volume = synthesize((8, 32, 32), 0)
    assert int(volume.labels.max()) > 1
    assert (volume.labels == 0).any()  # membranes are still carved


def test_data_synth_of_one_voxel_says_one_cell(tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "synth", str(tmp_path / "t.zarr"),
                                 "--shape", "1", "1", "1"])
    assert result.exit_code == 0, result.output
    assert result.stdout.rstrip().endswith(", 1 cell")


@pytest.mark.parametrize("command", [["synth"], ["convert", "IN"]])
@pytest.mark.parametrize("name", [".zarr", ".ZARR"])
def test_an_output_named_only_by_its_suffix_is_refused(tmp_path: Path, command: list[str],
                                                       name: str) -> None:
    """`data synth .zarr` wrote a hidden folder '.zarr'."""
    source = tmp_path / "in.npy"
    np.save(source, IMAGE)
    args = [str(source) if a == "IN" else a for a in command]
    result = runner.invoke(app, ["data", *args, str(tmp_path / name)])
    assert result.exit_code == 2, result.output
    assert "names only the suffix" in result.stderr and "volume.zarr" in result.stderr
    assert not (tmp_path / name).exists()


# ============================================ 3. emrun view: a stray file in a store


def test_view_keeps_zarrs_stray_file_warning_quiet(tmp_path: Path) -> None:
    """zarr's ZarrUserWarning ('Object at notes.txt is not recognized as a component of a
    Zarr hierarchy') came out with its source line when a store was listed."""
    from emrun.view import layer_for

    store = tmp_path / "v.zarr"
    zarr.open_group(str(store), mode="w").create_array("image", data=IMAGE)
    (store / "notes.txt").write_text("mine")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ignore_stray_objects()  # as on import; pytest's own filters replaced them
        with pytest.raises((UserError, VolumeError), match="nope"):
            layer_for(f"{store}/nope", set())
    assert not [w for w in caught if "not recognized" in str(w.message)]


def test_opening_a_missing_array_says_nothing_of_a_stray_file(tmp_path: Path) -> None:
    store = tmp_path / "v.zarr"
    zarr.open_group(str(store), mode="w").create_array("image", data=IMAGE)
    (store / "notes.txt").write_text("mine")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ignore_stray_objects()  # as on import; pytest's own filters replaced them
        with pytest.raises(VolumeError):
            open_volume(f"{store}/nope")
    assert not [w for w in caught if "not recognized" in str(w.message)]


# ============================================ 4. s3: the AWS library's log


S3_PROBE = """
import os, sys
from emrun.io.tensorstore_volume import context, native_log_dropped, tensorstore
ts = tensorstore("s3")
retries = {"max_retries": 0, "initial_delay": "0.1s", "max_delay": "0.1s"}
spec = {"driver": "s3", "bucket": "bucket", "path": "vol.zarr/",
        "endpoint": "http://127.0.0.1:9", "aws_region": "us-east-1"}
for debug in ("", "1"):
    os.environ["EMRUN_DEBUG"] = debug
    print(f"debug={debug}", file=sys.stderr, flush=True)
    with native_log_dropped("s3://bucket/vol.zarr"):  # a new context: credentials sought again
        store = ts.KvStore.open(spec, context=context(ts, retries)).result()
        try:
            store.read("zarr.json").result(timeout=20)
        except Exception as exc:
            print("failed", type(exc).__name__)
"""


def test_an_s3_failure_prints_no_aws_log_lines(tmp_path: Path) -> None:
    """'E1206 15:18:28.663384 8277 common-io:5] static: Failed to open file ...
    /root/.aws/config' and eight more came before emrun's one-line error. An s3 read at a
    closed local port (no network), no AWS credentials anywhere; then the same with
    EMRUN_DEBUG, which keeps the lines (so the first cannot pass by the AWS library falling
    silent on its own)."""
    pytest.importorskip("tensorstore")
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("AWS_", "EMRUN_DEBUG", "TENSORSTORE_VERBOSE"))}
    result = subprocess.run([sys.executable, "-c", S3_PROBE], capture_output=True, text=True,
                            timeout=60, env={**clean, "HOME": str(tmp_path)})
    assert result.stdout.splitlines() == ["failed ValueError"] * 2, result.stderr
    quiet, _, debug = result.stderr.partition("debug=1\n")
    assert quiet == "debug=\n"  # other stderr output still comes through
    assert any(".aws" in line for line in debug.splitlines())


# ============================================ 5. a remote store's coarser level, size stated


def _ome_with_bad_scales(tmp_path: Path) -> Path:
    """o.zarr: levels s0 (6 x 10 x 14) and s1 (y and x halved) whose OME scales are no
    sizes (NaN), in nm axes."""
    store = tmp_path / "o.zarr"
    group = zarr.open_group(str(store), mode="w")
    group.create_array("s0", data=IMAGE)
    group.create_array("s1", data=IMAGE[:, ::2, ::2].copy())
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"],
        "datasets": [{"path": f"s{i}", "coordinateTransformations": [
            {"type": "scale", "scale": [30, 1, 1]}]} for i in range(2)]}]}
    meta = store / "zarr.json"  # NaN, which zarr will not write
    doc = json.loads(meta.read_text())
    for dataset in doc["attributes"]["ome"]["multiscales"][0]["datasets"]:
        dataset["coordinateTransformations"][0]["scale"] = [30, math.nan, 6]
    meta.write_text(json.dumps(doc))
    return store


def test_a_remote_coarser_level_scales_the_stated_size(tmp_path: Path) -> None:
    """A remote store's s1 was given the stated size unscaled (30, 6, 6), a local one's
    30 x 12 x 12."""
    pytest.importorskip("tensorstore")
    store = _ome_with_bad_scales(tmp_path)
    with pytest.warns(MetadataIgnored), stated_voxel_size(STATED):
        local = open_volume(store)
        assert [level.voxel_size for level in local.levels()] == [STATED, (30.0, 12.0, 12.0)]
    with served(tmp_path) as url, pytest.warns(MetadataIgnored), stated_voxel_size(STATED):
        remote = open_volume(f"{url}/o.zarr")
        assert remote.voxel_size == STATED
        assert [level.voxel_size for level in remote.levels()] == [STATED, (30.0, 12.0, 12.0)]
        coarse = open_volume(f"{url}/o.zarr/s1")
        assert coarse.voxel_size == (30.0, 12.0, 12.0)
        np.testing.assert_array_equal(coarse.read(), IMAGE[:, ::2, ::2])


# ============================================ 6. how a size is stated, said where it is stated


def _bad_h5(tmp_path: Path) -> str:
    path = tmp_path / "fiji.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("raw", data=IMAGE).attrs["element_size_um"] = "x"
    return f"{path}/raw"


def test_the_refusal_names_how_the_place_states_a_size(tmp_path: Path) -> None:
    """Recipe users were told to give --voxel-size, which no recipe command has."""
    path = _bad_h5(tmp_path)
    how = "voxel_size: [z, y, x] (nm) in the recipe's source"
    with stated_voxel_size(None, how=how), pytest.raises(VolumeError) as caught:
        open_volume(path)
    assert f"give the voxel size yourself with {how}, which overrides it" in str(caught.value)
    assert "--voxel-size" not in str(caught.value)
    with stated_voxel_size(None, how=how), stated_voxel_size(None), \
            pytest.raises(VolumeError, match=r"voxel_size: \[z, y, x\]"):  # kept: not said
        open_volume(path)
    with pytest.raises(VolumeError, match=r"--voxel-size Z Y X \(nm\)"):  # the default
        open_volume(path)


def test_data_convert_says_its_option(tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "convert", _bad_h5(tmp_path),
                                 str(tmp_path / "out.zarr")])
    assert result.exit_code == 2
    assert "--voxel-size Z Y X (nm), which overrides it" in result.stderr


def test_a_recipe_source_is_told_to_state_voxel_size_in_the_source(tmp_path: Path) -> None:
    from emrun.data.sources import open_volume_source
    from emrun.recipe.data import VolumeSource

    with pytest.raises(VolumeError) as caught:
        open_volume_source(VolumeSource(image=_bad_h5(tmp_path)))
    assert "voxel_size" in str(caught.value) and "--voxel-size" not in str(caught.value)


def test_the_ome_fixture_is_what_it_says(tmp_path: Path) -> None:
    """The NaN really is in the stored scales (zarr would not write it)."""
    doc = json.loads((_ome_with_bad_scales(tmp_path) / "zarr.json").read_text())
    scales = [d["coordinateTransformations"][0]["scale"]
              for d in doc["attributes"]["ome"]["multiscales"][0]["datasets"]]
    assert all(np.isnan(s[1]) for s in scales)


def test_a_command_without_a_voxel_size_option_advises_converting(tmp_path: Path) -> None:
    """infer, segment, evaluate and view have no --voxel-size; the refusal told their users
    to give one."""
    from emrun.io import open_volume as opened

    with pytest.raises(VolumeError, match=r"with emrun data convert IN OUT\.zarr --voxel-size "
                                          r"Z Y X \(nm\), which overrides it"):
        opened(_bad_h5(tmp_path))
