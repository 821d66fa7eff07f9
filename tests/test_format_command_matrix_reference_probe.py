"""Reference probe: every input format into every command that reads volumes.

One small set of volumes (affinities (3, z, y, x) float32 with their `offsets`, truth ids,
a mask, a segmentation; distinct per-axis voxel size 40 x 12 x 8 nm and offset (2, 3, 5)
voxels; shapes that are no multiple of any chunk) is written into every format with the
format's own library: emrun's `write_volume` (the reference), zarr v2 and v3 arrays with
funlib attributes, OME-Zarr 0.4 and 0.5 image groups written by hand, HDF5 with funlib
`resolution`/`offset` and with Fiji's `element_size_um`, ImageJ TIFF, OME-TIFF, a plain
multi-page TIFF, a folder of TIFF sections, .npy, N5 (tensorstore) and neuroglancer
precomputed (tensorstore). Then each (format, command, role) is compared with the same
command on the reference:

- `segment` with the affinities in each 4-d format (cc, in memory and block by block, and
  mws): every voxel of the segmentation, and its voxel size and offset (the input's);
- `segment --mask` and `segment --sweep --truth` with the mask / truth in each format;
- `evaluate` with the segmentation (SEG), truth and mask in each format: the JSON figures;
- `data convert` from each format: every voxel, the voxel size and offset the format states,
  affinities' `offsets` kept;
- `infer --mask` with the mask in each format: the bits of the prediction;
- `emrun view` (its layers only, no serving): OME-Zarr and N5 shown, other formats refused
  in one line;
- a volume that cannot serve a role (3-d affinities, 4-d truth or mask, float ids, 4-d
  affinities without offsets) is refused in one line, exit 2, in every format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import tifffile
import torch
import yaml
import zarr
from n5_writing import n5_dataset
from typer.testing import CliRunner

import emrun.models  # noqa: F401  (registers the models)
from emrun.cli import app
from emrun.errors import UserError
from emrun.io import open_volume, write_volume
from emrun.recipe import Recipe
from emrun.registry import models

ts = pytest.importorskip("tensorstore")

SHAPE = (9, 21, 26)
VOXEL = (40.0, 12.0, 8.0)
OFFSET = (2, 3, 5)
OFFSET_NM = [o * v for o, v in zip(OFFSET, VOXEL, strict=True)]
OFFSETS = [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]
OFFSETS_TEXT = json.dumps(OFFSETS)
runner = CliRunner()


def arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    z, y, x = np.indices(SHAPE)
    truth = (1 + (z // 4) * 100 + (y // 7) * 10 + (x + y // 3) // 9).astype(np.uint16)
    truth[:, 13:15, :] = 0  # unlabelled voxels
    affs = np.zeros((3, *SHAPE), np.float32)
    for c, (dz, dy, dx) in enumerate(OFFSETS):
        shifted = np.roll(truth, (-dz, -dy, -dx), axis=(0, 1, 2))
        same = (shifted == truth).astype(np.float32)
        noisy = np.where(same > 0, rng.uniform(0.55, 1.0, SHAPE), rng.uniform(0, 0.45, SHAPE))
        noisy[rng.random(SHAPE) < 0.004] = 0.9  # a few false joins: merges
        affs[c] = noisy
        affs[c][tuple(slice(0, 1) if d else slice(None) for d in (dz, dy, dx))] = 0
    mask = np.zeros(SHAPE, np.uint8)
    mask[1:8, 2:19, 3:23] = 1
    mask[4, 5:9, 6:12] = 0  # a hole
    seg = (truth.astype(np.int64) * 3 % 1000).astype(np.uint16)
    seg[:, :, 17:] += 1000  # splits
    seg[:, 5:7, :] = 7  # merges
    return {"affs": affs, "truth": truth, "mask": mask, "seg": seg}


DATA = arrays()


def nm(offset: tuple[int, ...]) -> list[float]:
    return [o * v for o, v in zip(offset, VOXEL, strict=True)]


# ======================================================================== writers
# each writes `a` (z, y, x or c, z, y, x) named `name` under `root` and returns its path


def w_ref(root: Path, name: str, a: np.ndarray, offset: tuple[int, ...] = OFFSET) -> str:
    extra: dict[str, Any] = {"channel_axis": True, "attrs": {"offsets": OFFSETS}} \
        if a.ndim == 4 else {"label": name in ("truth", "seg")}
    write_volume(root / "ref.zarr", name, a, voxel_size=VOXEL, offset=offset, levels=1,
                 **extra)
    return str(root / "ref.zarr" / name)


def _zarr(fmt: int) -> Any:
    def write(root: Path, name: str, a: np.ndarray, offset: tuple[int, ...] = OFFSET) -> str:
        array = zarr.create_array(str(root / f"v{fmt}.zarr"), name=name, shape=a.shape,
                                  dtype=a.dtype, chunks=(1, 4, 8, 8)[4 - a.ndim:],
                                  zarr_format=fmt)
        array[...] = a
        array.attrs.update({"voxel_size": list(VOXEL), "offset": nm(offset),
                            **({"offsets": OFFSETS} if a.ndim == 4 else {})})
        return str(root / f"v{fmt}.zarr" / name)
    return write


def _ome(fmt: int) -> Any:
    def write(root: Path, name: str, a: np.ndarray, offset: tuple[int, ...] = OFFSET) -> str:
        store = zarr.open_group(str(root / f"ome{fmt}.zarr"), mode="a", zarr_format=fmt)
        group = store.create_group(name)
        group.create_array("s0", shape=a.shape, dtype=a.dtype,
                           chunks=(3, 4, 8, 8)[4 - a.ndim:])[...] = a
        lead = [1.0] if a.ndim == 4 else []
        axes = ([{"name": "c", "type": "channel"}] if a.ndim == 4 else []) + [
            {"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"]
        multiscale = {"name": name, "axes": axes, "datasets": [{"path": "s0",
                      "coordinateTransformations": [
                          {"type": "scale", "scale": lead + list(VOXEL)},
                          {"type": "translation", "translation": [0.0] * len(lead)
                           + nm(offset)}]}]}
        if fmt == 2:
            group.attrs["multiscales"] = [{"version": "0.4", **multiscale}]
        else:
            group.attrs["ome"] = {"version": "0.5", "multiscales": [multiscale]}
        if a.ndim == 4:
            group.attrs["offsets"] = OFFSETS
        return str(root / f"ome{fmt}.zarr" / name)
    return write


def w_hdf5(root: Path, name: str, a: np.ndarray, offset: tuple[int, ...] = OFFSET) -> str:
    with h5py.File(root / "v.h5", "a") as f:
        d = f.create_dataset(f"volumes/{name}", data=a, chunks=(1, 4, 8, 8)[4 - a.ndim:])
        d.attrs["resolution"] = VOXEL
        d.attrs["offset"] = nm(offset)
        if a.ndim == 4:
            d.attrs["offsets"] = np.array(OFFSETS)
    return str(root / "v.h5/volumes" / name)


def w_fiji(root: Path, name: str, a: np.ndarray) -> str:
    with h5py.File(root / "fiji.h5", "a") as f:
        f.create_dataset(name, data=a).attrs["element_size_um"] = np.array(
            [v / 1000 for v in VOXEL], np.float32)
    return str(root / "fiji.h5" / name)


def w_imagej(root: Path, name: str, a: np.ndarray) -> str:
    path = root / f"ij_{name}.tif"
    tifffile.imwrite(path, a, imagej=True,
                     resolution=(1 / (VOXEL[2] / 1000), 1 / (VOXEL[1] / 1000)),
                     metadata={"spacing": VOXEL[0] / 1000, "unit": "micron", "axes": "ZYX"})
    return str(path)


def w_ome_tiff(root: Path, name: str, a: np.ndarray) -> str:
    path = root / f"ome_{name}.ome.tif"
    meta = {"axes": "CZYX" if a.ndim == 4 else "ZYX"}
    if a.ndim == 3:
        meta.update({"PhysicalSizeZ": VOXEL[0], "PhysicalSizeZUnit": "nm",
                     "PhysicalSizeY": VOXEL[1], "PhysicalSizeYUnit": "nm",
                     "PhysicalSizeX": VOXEL[2], "PhysicalSizeXUnit": "nm"})
    tifffile.imwrite(path, a, ome=True, metadata=meta)
    return str(path)


def w_tiff(root: Path, name: str, a: np.ndarray) -> str:
    path = root / f"plain_{name}.tif"
    tifffile.imwrite(path, a, metadata={"axes": "CZYX" if a.ndim == 4 else "ZYX"})
    return str(path)


def w_folder(root: Path, name: str, a: np.ndarray) -> str:
    folder = root / f"{name}_sections"
    folder.mkdir()
    for i, section in enumerate(a):
        tifffile.imwrite(folder / f"s_{i:03d}.tif", section)
    return str(folder)


def w_npy(root: Path, name: str, a: np.ndarray) -> str:
    np.save(root / f"{name}.npy", a)
    return str(root / f"{name}.npy")


def w_n5(root: Path, name: str, a: np.ndarray, offset: tuple[int, ...] = OFFSET) -> str:
    extra: dict[str, Any] = {"offsets": OFFSETS} if a.ndim == 4 else {}
    n5_dataset(root / "v.n5" / name, a, block=[8, 8, 4, 1][: a.ndim],
               resolution=list(VOXEL[::-1]), offset=nm(offset)[::-1], **extra)
    return str(root / "v.n5" / name)


def w_precomputed(root: Path, name: str, a: np.ndarray,
                  offset: tuple[int, ...] = OFFSET) -> str:
    channels = a.shape[0] if a.ndim == 4 else 1
    kind = "segmentation" if name in ("truth", "seg") else "image"
    store = ts.open({
        "driver": "neuroglancer_precomputed",
        "kvstore": {"driver": "file", "path": str(root / f"pc_{name}")},
        "multiscale_metadata": {"type": kind, "data_type": str(a.dtype),
                                "num_channels": channels},
        "scale_metadata": {"size": list(a.shape[-3:][::-1]), "resolution": list(VOXEL[::-1]),
                           "voxel_offset": list(offset[::-1]), "chunk_size": [8, 8, 4],
                           "encoding": "raw"},
        "create": True}).result()
    xyzc = a.T if a.ndim == 4 else a.T[..., None]
    store[ts.d[:].translate_to[0]][...] = xyzc
    return str(root / f"pc_{name}")


# format: (writer, voxel size stated, offset stated, holds 4-d affinities' offsets)
FORMATS: dict[str, tuple[Any, tuple[float, ...] | None, tuple[int, ...] | None, bool]] = {
    "ref": (w_ref, VOXEL, OFFSET, True),
    "zarr_v2": (_zarr(2), VOXEL, OFFSET, True),
    "zarr_v3": (_zarr(3), VOXEL, OFFSET, True),
    "ome_0.4": (_ome(2), VOXEL, OFFSET, True),
    "ome_0.5": (_ome(3), VOXEL, OFFSET, True),
    "hdf5": (w_hdf5, VOXEL, OFFSET, True),
    "fiji_hdf5": (w_fiji, VOXEL, None, False),
    "imagej_tiff": (w_imagej, VOXEL, None, False),
    "ome_tiff": (w_ome_tiff, VOXEL, None, False),
    "plain_tiff": (w_tiff, None, None, False),
    "tiff_folder": (w_folder, None, None, False),
    "npy": (w_npy, None, None, False),
    "n5": (w_n5, VOXEL, OFFSET, True),
    "precomputed": (w_precomputed, VOXEL, OFFSET, False),
}
OTHERS = [f for f in FORMATS if f != "ref"]
# formats that hold (c, z, y, x): ImageJ hyperstacks put channels after z, a folder of
# sections has no channels
FORMATS_4D = [f for f in FORMATS if f not in ("imagej_tiff", "tiff_folder")]
OTHERS_4D = [f for f in FORMATS_4D if f != "ref"]
# the voxel size 4-d data states: Fiji's element_size_um has 3 entries (z, y, x) for a
# 4-d dataset too; OME-TIFF's sizes are read for 3-d images only (tiff_volume)
VOXEL_4D = {"fiji_hdf5": VOXEL, "ome_tiff": None}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("matrix")
    for fmt, (writer, *_rest) in FORMATS.items():
        for name, a in DATA.items():
            if a.ndim == 4 and fmt not in FORMATS_4D:
                continue
            writer(folder, name, a)
    return folder


def path_of(root: Path, fmt: str, name: str) -> str:
    """The path of volume `name` in format `fmt` (written by the fixture)."""
    return {
        "ref": f"ref.zarr/{name}", "zarr_v2": f"v2.zarr/{name}", "zarr_v3": f"v3.zarr/{name}",
        "ome_0.4": f"ome2.zarr/{name}", "ome_0.5": f"ome3.zarr/{name}",
        "hdf5": f"v.h5/volumes/{name}", "fiji_hdf5": f"fiji.h5/{name}",
        "imagej_tiff": f"ij_{name}.tif", "ome_tiff": f"ome_{name}.ome.tif",
        "plain_tiff": f"plain_{name}.tif", "tiff_folder": f"{name}_sections",
        "npy": f"{name}.npy", "n5": f"v.n5/{name}", "precomputed": f"pc_{name}",
    }[fmt].join([str(root) + "/", ""])


def offsets_args(fmt: str) -> tuple[str, ...]:
    return () if FORMATS[fmt][3] else ("--offsets", OFFSETS_TEXT)


def run_ok(*args: str) -> Any:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


def refused(*args: str) -> str:
    """The command's output when it is refused: exit 2, one line, no traceback."""
    result = runner.invoke(app, list(args))
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    return lines[0]


# ======================================================================== the inputs read


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("name", ["affs", "truth", "mask", "seg"])
def test_every_format_reads_back_what_was_written(root, fmt, name):
    """The premise of the matrix: each format opens with its values, shape, dtype, voxel
    size and offset (a mismatch below would otherwise be blamed on a command)."""
    if DATA[name].ndim == 4 and fmt not in FORMATS_4D:
        pytest.skip("no channels in this format")
    volume = open_volume(path_of(root, fmt, name))
    a = DATA[name]
    assert volume.shape == a.shape and volume.dtype == a.dtype
    np.testing.assert_array_equal(volume.read(), a)
    voxel = VOXEL_4D.get(fmt, FORMATS[fmt][1]) if a.ndim == 4 else FORMATS[fmt][1]
    assert volume.voxel_size == voxel
    assert (volume.offset or (0, 0, 0)) == (FORMATS[fmt][2] or (0, 0, 0))


# ======================================================================== segment: AFFS


def segment(root: Path, affs: str, out: str, *extra: str) -> Any:
    return run_ok("segment", affs, str(root / out), "--levels", "1", *extra)


def segmentation(root: Path, out: str, name: str = "segmentation") -> Any:
    return open_volume(root / out / name)


MODES = {
    "cc": ("--method", "cc", "--threshold", "0.5", "--min-size", "4"),
    "cc_blocks": ("--method", "cc", "--threshold", "0.5", "--min-size", "4",
                  "--block", "4", "8", "9"),
    "mws": ("--method", "mws", "--bias", "0.5"),
}


@pytest.fixture(scope="module")
def reference_segmentations(root) -> dict[str, np.ndarray]:
    found = {}
    for mode, args in MODES.items():
        segment(root, path_of(root, "ref", "affs"), f"seg_ref_{mode}.zarr", *args)
        volume = segmentation(root, f"seg_ref_{mode}.zarr")
        assert (volume.voxel_size, volume.offset) == (VOXEL, OFFSET)
        found[mode] = volume.read()
        assert len(np.unique(found[mode])) > 5  # a real segmentation, not one id
    return found


SOME_4D = ["zarr_v2", "ome_0.4", "hdf5", "plain_tiff", "npy", "n5", "precomputed"]
SOME = ["zarr_v2", "hdf5", "plain_tiff", "tiff_folder", "npy", "n5", "precomputed"]


@pytest.mark.parametrize(("fmt", "mode"), [(f, m) for m in MODES for f in OTHERS_4D
                                           if m != "mws" or f in SOME_4D])
def test_segment_of_affinities_in_each_format(root, fmt, mode, reference_segmentations):
    out = f"seg_{fmt}_{mode}.zarr"
    segment(root, path_of(root, fmt, "affs"), out, *MODES[mode], *offsets_args(fmt))
    volume = segmentation(root, out)
    np.testing.assert_array_equal(volume.read(), reference_segmentations[mode])
    voxel = VOXEL_4D.get(fmt, FORMATS[fmt][1])
    assert volume.voxel_size == voxel
    assert (volume.offset or (0, 0, 0)) == (FORMATS[fmt][2] or (0, 0, 0))


@pytest.mark.parametrize("fmt", [f for f in OTHERS_4D if FORMATS[f][3]])
def test_segment_takes_the_offsets_each_format_stores(root, fmt):
    """Stored offsets given in another channel order via --offsets must change the result:
    the stored ones are what a plain run used."""
    out = f"segoff_{fmt}.zarr"
    result = segment(root, path_of(root, fmt, "affs"), out, *MODES["cc"], "--offsets",
                     json.dumps(OFFSETS[::-1]))
    assert "replace the offsets" in result.output  # the stored ones were found
    attrs = dict(zarr.open_group(root / out / "labels/segmentation", mode="r").attrs)
    assert json.dumps(OFFSETS[::-1]) in json.dumps(attrs)


# ======================================================================== segment: --mask


@pytest.fixture(scope="module")
def reference_masked(root) -> np.ndarray:
    segment(root, path_of(root, "ref", "affs"), "segm_ref.zarr", *MODES["cc"], "--mask",
            path_of(root, "ref", "mask"))
    got = segmentation(root, "segm_ref.zarr").read()
    assert (got[DATA["mask"] == 0] == 0).all() and (got[DATA["mask"] > 0] > 0).all()
    return got


@pytest.mark.parametrize("fmt", OTHERS)
def test_segment_mask_in_each_format(root, fmt, reference_masked):
    out = f"segm_{fmt}.zarr"
    segment(root, path_of(root, "ref", "affs"), out, *MODES["cc"], "--mask",
            path_of(root, fmt, "mask"))
    np.testing.assert_array_equal(segmentation(root, out).read(), reference_masked)


@pytest.mark.parametrize("fmt", SOME)
def test_segment_mask_in_each_format_block_by_block(root, fmt):
    want = "segmb_ref.zarr"
    if not (root / want).exists():
        segment(root, path_of(root, "ref", "affs"), want, *MODES["cc_blocks"], "--mask",
                path_of(root, "ref", "mask"))
    out = f"segmb_{fmt}.zarr"
    segment(root, path_of(root, "ref", "affs"), out, *MODES["cc_blocks"], "--mask",
            path_of(root, fmt, "mask"))
    np.testing.assert_array_equal(segmentation(root, out).read(),
                                  segmentation(root, want).read())


# ======================================================================== segment: --sweep


def sweep(root: Path, affs: str, truth: str, out: str, *extra: str) -> dict[str, Any]:
    result = segment(root, affs, str(root / out), "--method", "cc", "--sweep", "--truth",
                     truth, "--threshold", "0.3,0.5,0.7", "--workers", "1", "--json", *extra)
    found = json.loads(result.stdout.strip().splitlines()[-1])
    return found


def sweep_figures(found: dict[str, Any]) -> Any:
    return {k: v for k, v in found["sweep"].items() if k != "truth"}


@pytest.fixture(scope="module")
def reference_sweep(root) -> dict[str, Any]:
    found = sweep(root, path_of(root, "ref", "affs"), path_of(root, "ref", "truth"),
                  "sweep_ref.zarr")
    table = sweep_figures(found)["table"]
    assert len(table) == 3 and len({row["arand"] for row in table}) == 3
    return found


@pytest.mark.parametrize("fmt", OTHERS)
def test_segment_sweep_truth_in_each_format(root, fmt, reference_sweep):
    found = sweep(root, path_of(root, "ref", "affs"), path_of(root, fmt, "truth"),
                  f"sweep_{fmt}.zarr")
    assert sweep_figures(found) == sweep_figures(reference_sweep)
    np.testing.assert_array_equal(segmentation(root, f"sweep_{fmt}.zarr").read(),
                                  segmentation(root, "sweep_ref.zarr").read())


@pytest.mark.parametrize("fmt", OTHERS_4D)
def test_segment_sweep_affinities_in_each_format(root, fmt, reference_sweep):
    found = sweep(root, path_of(root, fmt, "affs"), path_of(root, "ref", "truth"),
                  f"sweepa_{fmt}.zarr", *offsets_args(fmt))
    assert sweep_figures(found) == sweep_figures(reference_sweep)


# ======================================================================== evaluate


def scores(seg: str, truth: str, *extra: str) -> dict[str, Any]:
    overlap = () if "--binary" in extra else ("--min-overlap", "1")
    result = run_ok("evaluate", seg, truth, "--json", *overlap, *extra)
    found = json.loads(result.stdout)
    return {k: v for k, v in found.items() if k not in ("seg", "truth", "mask")}


@pytest.fixture(scope="module")
def reference_scores(root) -> dict[str, dict[str, Any]]:
    seg, truth, mask = (path_of(root, "ref", n) for n in ("seg", "truth", "mask"))
    found = {"plain": scores(seg, truth), "mask": scores(seg, truth, "--mask", mask),
             "blocks": scores(seg, truth, "--workers", "2", "--block", "4", "8", "8")}
    assert found["plain"]["arand"] > 0.05 and found["plain"]["splits"] > 0
    assert found["plain"]["merges"] > 0 and found["mask"] != found["plain"]
    assert found["blocks"] == found["plain"]
    return found


@pytest.mark.parametrize("fmt", OTHERS)
def test_evaluate_segmentation_in_each_format(root, fmt, reference_scores):
    assert scores(path_of(root, fmt, "seg"), path_of(root, "ref", "truth")) \
        == reference_scores["plain"]


@pytest.mark.parametrize("fmt", OTHERS)
def test_evaluate_every_role_in_the_same_format(root, fmt, reference_scores):
    seg, truth, mask = (path_of(root, fmt, n) for n in ("seg", "truth", "mask"))
    assert scores(seg, truth, "--mask", mask) == reference_scores["mask"]


@pytest.mark.parametrize("fmt", ["plain_tiff", "precomputed"])  # spawns workers: slow
def test_evaluate_in_blocks_with_the_segmentation_in_each_format(root, fmt, reference_scores):
    got = scores(path_of(root, fmt, "seg"), path_of(root, fmt, "truth"), "--workers", "2",
                 "--block", "4", "8", "8")
    assert got == reference_scores["blocks"]


@pytest.mark.parametrize("fmt", ["precomputed", "ome_tiff", "plain_tiff"])
def test_evaluate_truth_and_mask_in_formats_the_other_probe_leaves_out(root, fmt,
                                                                      reference_scores):
    got = scores(path_of(root, "ref", "seg"), path_of(root, fmt, "truth"), "--mask",
                 path_of(root, fmt, "mask"))
    assert got == reference_scores["mask"]


# ======================================================================== data convert


@pytest.mark.parametrize("fmt", OTHERS)
@pytest.mark.parametrize("name", ["truth", "mask", "affs"])
def test_convert_from_each_format(root, fmt, name):
    if DATA[name].ndim == 4 and fmt not in FORMATS_4D:
        pytest.skip("no channels in this format")
    out = root / f"conv_{fmt}_{name}.zarr"
    label = ("--labels",) if name == "truth" else ("--image",)
    run_ok("data", "convert", path_of(root, fmt, name), str(out), "--name", name,
           "--levels", "1", *label)
    volume = open_volume(out / name)
    a = DATA[name]
    got = volume.read()
    assert got.dtype == a.dtype
    np.testing.assert_array_equal(got, a)
    voxel = VOXEL_4D.get(fmt, FORMATS[fmt][1]) if a.ndim == 4 else FORMATS[fmt][1]
    assert volume.voxel_size == voxel
    assert (volume.offset or (0, 0, 0)) == (FORMATS[fmt][2] or (0, 0, 0))
    if a.ndim == 4 and FORMATS[fmt][3]:  # README: `data convert` keeps the offsets
        assert volume.attributes().get("offsets") == OFFSETS


@pytest.mark.parametrize("fmt", [f for f in OTHERS_4D if FORMATS[f][3]])
def test_converted_affinities_segment_as_the_source_does(root, fmt, reference_segmentations):
    """The copy `data convert` makes segments without --offsets, as the source does."""
    out = root / f"conv_{fmt}_affs.zarr"
    if not out.exists():
        run_ok("data", "convert", path_of(root, fmt, "affs"), str(out), "--name", "affs",
               "--levels", "1", "--image")
    segment(root, str(out / "affs"), f"segconv_{fmt}.zarr", *MODES["cc"])
    np.testing.assert_array_equal(segmentation(root, f"segconv_{fmt}.zarr").read(),
                                  reference_segmentations["cc"])


# ======================================================================== infer --mask

INFER_RECIPE = {
    "name": "fm", "data": {"sources": {"a": {"type": "synthetic", "shape": [16, 64, 64]}}},
    "model": {"type": "rsunet", "widths": [2, 4]},
    "tasks": {"aff": {"target": {"type": "affinity", "offsets": OFFSETS}}},
    "train": {"patch": [4, 16, 16], "iterations": 1},
    "infer": {"dtype": "float32", "precision": "fp32", "batch_size": 2},
}


@pytest.fixture(scope="module")
def model_files(root) -> tuple[Path, Path]:
    recipe = Recipe.model_validate(INFER_RECIPE)
    torch.manual_seed(0)
    model = models.build(recipe.model, head_channels=recipe.head_channels())
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    torch.save({"model": model.state_dict(), "iteration": 1}, root / "c.pt")
    (root / "r.yaml").write_text(yaml.safe_dump(recipe.resolved()))
    # the image: the truth as uint8 intensities
    write_volume(root / "img.zarr", "image", (DATA["truth"] % 251).astype(np.uint8),
                 voxel_size=VOXEL, offset=OFFSET, levels=1)
    return root / "c.pt", root / "r.yaml"


def infer(root: Path, model_files: tuple[Path, Path], out: str, *extra: str) -> Any:
    checkpoint, recipe = model_files
    run_ok("infer", "--checkpoint", str(checkpoint), "--recipe", str(recipe), "--input",
           str(root / "img.zarr/image"), "--output", str(root / out), "--device", "cpu",
           "--levels", "1", "--block", "4", "16", "16", *extra)
    return open_volume(root / out / "aff")


@pytest.fixture(scope="module")
def reference_masked_prediction(root, model_files) -> np.ndarray:
    unmasked = infer(root, model_files, "pred_plain.zarr").read()
    got = infer(root, model_files, "predm_ref.zarr", "--mask",
                path_of(root, "ref", "mask")).read()
    assert not np.array_equal(got, unmasked)  # the mask did something
    return got


@pytest.mark.parametrize("fmt", OTHERS)
def test_infer_mask_in_each_format(root, model_files, fmt, reference_masked_prediction):
    got = infer(root, model_files, f"predm_{fmt}.zarr", "--mask", path_of(root, fmt, "mask"))
    assert np.array_equal(got.read().view(np.uint8), reference_masked_prediction.view(np.uint8))
    assert (got.voxel_size, got.offset) == (VOXEL, OFFSET)


# ======================================================================== view (no serving)


@pytest.mark.parametrize("fmt", ["ome_0.4", "n5"])
def test_view_shows_ome_zarr_and_n5(root, fmt):
    from emrun.view import view

    shown = view([path_of(root, fmt, "truth"), path_of(root, fmt, "affs")],
                 client="https://neuroglancer.example")
    try:
        assert len(shown.layers) == 2
    finally:
        shown.close()


@pytest.mark.parametrize("fmt", ["zarr_v2", "zarr_v3", "hdf5", "fiji_hdf5", "imagej_tiff",
                                 "ome_tiff", "plain_tiff", "tiff_folder", "npy",
                                 "precomputed"])
def test_view_refuses_other_formats_in_one_line(root, fmt):
    from emrun.view import view

    with pytest.raises(UserError) as caught:
        view([path_of(root, fmt, "truth")], client="https://neuroglancer.example").close()
    assert "\n" not in str(caught.value) and "convert" in str(caught.value)


# ======================================================================== refusals


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_segment_refuses_3d_affinities(root, fmt):
    line = refused("segment", path_of(root, fmt, "mask"), str(root / f"r3_{fmt}.zarr"),
                   "--method", "cc", "--offsets", OFFSETS_TEXT)
    assert "not affinities" in line


@pytest.mark.parametrize("fmt", [f for f in FORMATS_4D if not FORMATS[f][3]])
def test_segment_asks_for_offsets_where_the_format_stores_none(root, fmt):
    line = refused("segment", path_of(root, fmt, "affs"), str(root / f"ro_{fmt}.zarr"),
                   "--method", "cc")
    assert "--offsets" in line


@pytest.mark.parametrize("fmt", SOME_4D)
def test_segment_and_evaluate_refuse_4d_masks_and_truth(root, fmt):
    affs = path_of(root, "ref", "affs")
    refused("segment", affs, str(root / f"rm_{fmt}.zarr"), "--method", "cc", "--mask",
            path_of(root, fmt, "affs"))
    refused("segment", affs, str(root / f"rt_{fmt}.zarr"), "--method", "cc", "--sweep",
            "--truth", path_of(root, fmt, "affs"), "--threshold", "0.5")
    refused("evaluate", path_of(root, "ref", "seg"), path_of(root, fmt, "affs"))
    refused("evaluate", path_of(root, fmt, "affs"), path_of(root, "ref", "truth"))


@pytest.mark.parametrize("fmt", ["ref", "zarr_v3", "hdf5", "n5", "npy", "plain_tiff",
                                 "precomputed"])
def test_float_volumes_are_refused_as_ids(root, fmt):
    """Float volumes are probabilities, not ids: evaluate's SEG and TRUTH (without
    --binary) and the sweep's truth refuse them in every format."""
    floats = FORMATS[fmt][0](root, "floatids", DATA["affs"][0].copy())
    assert open_volume(floats).dtype == np.float32
    refused("evaluate", path_of(root, "ref", "seg"), floats)
    refused("evaluate", floats, path_of(root, "ref", "truth"))
    refused("segment", path_of(root, "ref", "affs"), str(root / f"rf_{fmt}.zarr"),
            "--method", "cc", "--sweep", "--truth", floats, "--threshold", "0.5")


# ======================================================================== beyond the matrix

PLACED = [f for f in OTHERS if FORMATS[f][2] is not None]  # formats that state an offset


@pytest.mark.parametrize("fmt", ["ref", *PLACED])
def test_segment_and_evaluate_with_a_larger_mask_placed_by_its_offset(root, fmt,
                                                                      reference_masked,
                                                                      reference_scores):
    """README: a mask (or truth) larger than the affinities / segmentation is read where
    its offset places them."""
    big = np.zeros((SHAPE[0] + 3, SHAPE[1] + 4, SHAPE[2] + 5), np.uint8)
    big[1:1 + SHAPE[0], 2:2 + SHAPE[1], 3:3 + SHAPE[2]] = DATA["mask"]
    start = (OFFSET[0] - 1, OFFSET[1] - 2, OFFSET[2] - 3)
    path = FORMATS[fmt][0](root, "bigmask", big, offset=start)
    assert_masks_as_the_reference(root, path, f"segbig_{fmt}.zarr", reference_masked,
                                  reference_scores)


def assert_masks_as_the_reference(root, mask: str, out: str, reference_masked,
                                  reference_scores) -> None:
    """`segment --mask` and `evaluate --mask` with ``mask`` give the reference mask's
    segmentation and scores."""
    segment(root, path_of(root, "ref", "affs"), out, *MODES["cc"], "--mask", mask)
    np.testing.assert_array_equal(segmentation(root, out).read(), reference_masked)
    got = scores(path_of(root, "ref", "seg"), path_of(root, "ref", "truth"), "--mask", mask)
    assert got == reference_scores["mask"]


NAN_FORMATS = ["ref", "zarr_v2", "hdf5", "npy", "plain_tiff", "n5", "precomputed"]


@pytest.mark.parametrize("fmt", NAN_FORMATS)
def test_a_float_mask_with_nan_outside_in_each_format(root, fmt, reference_masked,
                                                     reference_scores):
    """README: NaN in a float mask is outside, wherever a mask is given."""
    mask = np.where(DATA["mask"] > 0, np.float32(1), np.float32(np.nan)).astype(np.float32)
    path = FORMATS[fmt][0](root, "nanmask", mask)
    assert_masks_as_the_reference(root, path, f"segnan_{fmt}.zarr", reference_masked,
                                  reference_scores)


@pytest.mark.parametrize("fmt", ["hdf5", "npy", "zarr_v2"])
def test_a_bool_mask_in_each_format(root, fmt, reference_masked, reference_scores):
    path = FORMATS[fmt][0](root, "boolmask", DATA["mask"] > 0)
    segment(root, path_of(root, "ref", "affs"), f"segbool_{fmt}.zarr", *MODES["cc"],
            "--mask", path)
    np.testing.assert_array_equal(segmentation(root, f"segbool_{fmt}.zarr").read(),
                                  reference_masked)
    got = scores(path_of(root, "ref", "seg"), path_of(root, "ref", "truth"), "--mask", path)
    assert got == reference_scores["mask"]


@pytest.fixture(scope="module")
def uint8_affinities(root) -> dict[str, str]:
    affs8 = np.round(DATA["affs"] * 255).astype(np.uint8)
    return {fmt: FORMATS[fmt][0](root, "affs8", affs8) for fmt in FORMATS_4D}


@pytest.mark.parametrize("fmt", OTHERS_4D)
def test_segment_of_uint8_affinities_in_each_format(root, fmt, uint8_affinities):
    want = root / "seg8_ref.zarr"
    if not want.exists():
        segment(root, uint8_affinities["ref"], want.name, *MODES["cc"])
    segment(root, uint8_affinities[fmt], f"seg8_{fmt}.zarr", *MODES["cc"], *offsets_args(fmt))
    np.testing.assert_array_equal(segmentation(root, f"seg8_{fmt}.zarr").read(),
                                  segmentation(root, want.name).read())


def test_uint8_affinities_segment_as_their_float_values(root, uint8_affinities,
                                                        reference_segmentations):
    """255 = 1: uint8 affinities well away from the threshold segment as the floats do."""
    out = root / "seg8_ref.zarr"
    if not out.exists():
        segment(root, uint8_affinities["ref"], out.name, *MODES["cc"])
    np.testing.assert_array_equal(segmentation(root, out.name).read(),
                                  reference_segmentations["cc"])


@pytest.mark.parametrize("fmt", OTHERS_4D)
def test_evaluate_binary_prediction_in_each_format(root, fmt):
    """A (1, z, y, x) probability (an inference output of one channel) reads as (z, y, x)
    in every format that holds channels."""
    prob = DATA["affs"][:1].copy()
    truth = path_of(root, "ref", "mask")
    if not (root / "ref.zarr/prob").exists():
        FORMATS["ref"][0](root, "prob", prob)
    want = scores(path_of(root, "ref", "prob"), truth, "--binary")
    assert 0 < want["f1"] < 1
    got_path = FORMATS[fmt][0](root, "prob", prob)
    assert scores(got_path, truth, "--binary") == want


def test_a_4d_ome_tiff_states_its_voxel_size(root):
    """README: voxel size comes from OME-TIFF metadata (PhysicalSizeZ/Y/X). Affinities or
    channels saved as a (c, z, y, x) OME-TIFF with their sizes lose them."""
    path = root / "sized_affs.ome.tif"
    tifffile.imwrite(path, DATA["affs"], ome=True, metadata={
        "axes": "CZYX", "PhysicalSizeZ": VOXEL[0], "PhysicalSizeZUnit": "nm",
        "PhysicalSizeY": VOXEL[1], "PhysicalSizeYUnit": "nm",
        "PhysicalSizeX": VOXEL[2], "PhysicalSizeXUnit": "nm"})
    assert open_volume(path).voxel_size == VOXEL


LEVEL1_VOXEL = (40.0, 24.0, 16.0)


def ome_affinity_pyramid(root: Path, fmt: int) -> str:
    """Affinities as an OME-Zarr image (c, z, y, x) with levels s0 and s1 (y and x halved;
    s1's translation the centre of its 2 x 2 window), listed coarsest first."""
    store = zarr.open_group(str(root / f"omepyr{fmt}.zarr"), mode="a", zarr_format=fmt)
    group = store.create_group("affs")
    a = DATA["affs"]
    group.create_array("s0", shape=a.shape, dtype=a.dtype, chunks=(3, 4, 8, 8))[...] = a
    one = np.ascontiguousarray(a[:, :, ::2, ::2])
    group.create_array("s1", shape=one.shape, dtype=a.dtype, chunks=(3, 4, 8, 8))[...] = one
    t1 = [0.0, OFFSET_NM[0], OFFSET_NM[1] + 6.0, OFFSET_NM[2] + 4.0]
    datasets = [
        {"path": "s1", "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, *LEVEL1_VOXEL]},
            {"type": "translation", "translation": t1}]},
        {"path": "s0", "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, *VOXEL]},
            {"type": "translation", "translation": [0.0, *OFFSET_NM]}]}]
    axes = [{"name": "c", "type": "channel"}] + [
        {"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"]
    multiscale = {"name": "affs", "axes": axes, "datasets": datasets}
    if fmt == 2:
        group.attrs["multiscales"] = [{"version": "0.4", **multiscale}]
    else:
        group.attrs["ome"] = {"version": "0.5", "multiscales": [multiscale]}
    group.attrs["offsets"] = OFFSETS
    return str(root / f"omepyr{fmt}.zarr/affs")


def level0_transforms(group: Path) -> dict[str, Any]:
    ome = json.loads((group / "zarr.json").read_text())["attributes"]["ome"]
    found = {t["type"]: t[t["type"]]
             for t in ome["multiscales"][0]["datasets"][0]["coordinateTransformations"]}
    return {"scale": found["scale"], "translation": found.get("translation")}


@pytest.mark.parametrize("fmt", [2, 3])
@pytest.mark.parametrize("level", ["s1", "1", "40,24,16"])
def test_segment_of_a_coarser_ome_level_of_affinities(root, fmt, level):
    """`segment --level` of an OME image with channels: the result is that of an emrun copy
    of the level, its translation (half-voxel shift) kept."""
    want = root / "seglevel_ref.zarr"
    if not want.exists():
        one = np.ascontiguousarray(DATA["affs"][:, :, ::2, ::2])
        write_volume(root / "ref1.zarr", "affs", one, voxel_size=LEVEL1_VOXEL,
                     offset=(2, 2, 3), shift_nm=(0.0, -6.0, -4.0), channel_axis=True,
                     attrs={"offsets": OFFSETS}, levels=1)
        segment(root, str(root / "ref1.zarr/affs"), want.name, *MODES["cc"])
    source = str(root / f"omepyr{fmt}.zarr/affs")
    if not (root / f"omepyr{fmt}.zarr").exists():
        source = ome_affinity_pyramid(root, fmt)
    out = f"seglevel_{fmt}_{level.replace(',', '_')}.zarr"
    segment(root, source, out, *MODES["cc"], "--level", level)
    got = segmentation(root, out)
    np.testing.assert_array_equal(got.read(), segmentation(root, want.name).read())
    assert level0_transforms(root / out / "labels/segmentation") == \
        level0_transforms(want / "labels/segmentation")
    assert level0_transforms(root / out / "labels/segmentation")["translation"] == \
        pytest.approx([OFFSET_NM[0], OFFSET_NM[1] + 6.0, OFFSET_NM[2] + 4.0])


@pytest.mark.parametrize("fmt", ["ref", "hdf5", "n5", "zarr_v3", "ome_0.5", "precomputed"])
def test_infer_roi_with_a_mask_of_that_box_only_in_each_format(root, model_files, fmt):
    """README: a mask smaller than the input that covers the box `infer --roi` predicts is
    placed by its offset (read as 0 outside its data)."""
    roi_start, roi_shape = (2, 4, 6), (5, 12, 14)
    box = tuple(slice(s, s + n) for s, n in zip(roi_start, roi_shape, strict=True))
    small = np.ascontiguousarray(DATA["mask"][box])
    start = tuple(o + r for o, r in zip(OFFSET, roi_start, strict=True))
    path = FORMATS[fmt][0](root, "roimask", small, offset=start)
    roi = ",".join(map(str, roi_start)) + "/" + ",".join(map(str, roi_shape))
    want = root / "predroi_full.zarr"
    if not want.exists():
        infer(root, model_files, want.name, "--roi", roi, "--mask", path_of(root, "ref", "mask"))
    got = infer(root, model_files, f"predroi_{fmt}.zarr", "--roi", roi, "--mask", path)
    assert np.array_equal(got.read().view(np.uint8),
                          open_volume(want / "aff").read().view(np.uint8))
    assert got.offset == start
