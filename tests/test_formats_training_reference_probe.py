"""Reference probe: training and inference from every input format.

One small image, labels and mask (distinct values, non-cubic, not a multiple of any chunk)
are written into every format with the format's own library (h5py with funlib's
`resolution`/`offset` and with Fiji's `element_size_um`, tifffile as ImageJ stacks and as
folders of sections, numpy .npy, tensorstore N5 with `resolution`/`offset` in x, y, z, zarr
v2 and v3 arrays with funlib attributes, OME-Zarr 0.4 and 0.5 multiscale groups written by
hand with two levels listed coarsest first), plus one copy written by emrun
(`write_volume`), the reference. Then, against the reference:

- `open_volume` gives the same values, shape, dtype and the voxel size and offset the
  README says each format states (ImageJ and Fiji state no offset; a TIFF folder and .npy
  nothing);
- training samples (`SampleMaker.sample` with fixed rngs, every deepem augmentation,
  affinity and lsd targets) from a recipe naming each format are bit-identical to the
  reference's, also with labels and a mask of a part of the image placed by their offset,
  and from a coarser OME level;
- `emrun infer` on each format's image writes the same bits as on the reference, with the
  voxel size and offset of its input, and `--level s1` of an OME image the same as an emrun
  copy of that level, its translation (half-voxel shift) kept;
- `emrun evaluate` with the truth (and a mask) in each format gives the same scores.
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
from emrun.data.samples import SampleMaker
from emrun.io import choose_level, open_volume, write_volume
from emrun.recipe import Recipe
from emrun.registry import models

pytest.importorskip("tensorstore")

SHAPE = (13, 37, 45)
VOXEL = (40.0, 12.0, 8.0)  # distinct per axis: an axis swapped shows
OFFSET = (3, 5, 7)  # voxels
OFFSET_NM = [o * v for o, v in zip(OFFSET, VOXEL, strict=True)]
PARTS = ("image", "labels", "mask")
runner = CliRunner()


def arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, SHAPE, dtype=np.uint8)
    z, y, x = np.indices(SHAPE)
    labels = (1 + (z // 4) * 100 + (y // 9) * 10 + x // 11).astype(np.uint16)
    labels[:, 20:22, :] = 0  # a boundary of unlabelled voxels
    mask = np.zeros(SHAPE, np.uint8)
    mask[2:11, 4:33, 6:40] = 1
    return {"image": image, "labels": labels, "mask": mask}


DATA = arrays()

# format: ({part: path inside the folder}, voxel size stated, offset stated)
FORMATS: dict[str, tuple[dict[str, str], tuple[float, ...] | None, tuple[int, ...] | None]] = {
    "ref": ({p: f"ref.zarr/{p}" for p in PARTS}, VOXEL, OFFSET),
    "hdf5": ({p: f"v.h5/volumes/{p}" for p in PARTS}, VOXEL, OFFSET),
    "fiji_hdf5": ({p: f"fiji.h5/{p}" for p in PARTS}, VOXEL, None),
    "imagej_tiff": ({p: f"{p}.tif" for p in PARTS}, VOXEL, None),
    "tiff_folder": ({p: f"{p}_sections" for p in PARTS}, None, None),
    "npy": ({p: f"{p}.npy" for p in PARTS}, None, None),
    "n5": ({p: f"v.n5/{p}" for p in PARTS}, VOXEL, OFFSET),
    "zarr_v2": ({p: f"v2.zarr/{p}" for p in PARTS}, VOXEL, OFFSET),
    "zarr_v3": ({p: f"v3.zarr/{p}" for p in PARTS}, VOXEL, OFFSET),
    "ome_0.4": ({p: f"ome2.zarr/{p}" for p in PARTS}, VOXEL, OFFSET),
    "ome_0.5": ({p: f"ome3.zarr/{p}" for p in PARTS}, VOXEL, OFFSET),
}
OTHERS = [name for name in FORMATS if name != "ref"]

# the coarser OME level: y and x halved; its translation the centre of the 2 x 2 window
LEVEL1_VOXEL = (40.0, 24.0, 16.0)
LEVEL1_TRANSLATION = [OFFSET_NM[0], OFFSET_NM[1] + 6.0, OFFSET_NM[2] + 4.0]


def level1(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a[:, ::2, ::2])


def ome_group(root: Path, fmt: int, name: str, a: np.ndarray) -> None:
    """An OME-Zarr image group (0.4 on zarr v2, 0.5 on v3) with levels s0 and s1, listed
    coarsest first (README: taken finest first whatever the order)."""
    store = zarr.open_group(str(root / f"ome{fmt}.zarr"), mode="a", zarr_format=fmt)
    group = store.create_group(name)
    for level, data in (("s0", a), ("s1", level1(a))):
        array = group.create_array(level, shape=data.shape, dtype=data.dtype, chunks=(4, 16, 16))
        array[...] = data
    datasets = [
        {"path": "s1", "coordinateTransformations": [
            {"type": "scale", "scale": list(LEVEL1_VOXEL)},
            {"type": "translation", "translation": LEVEL1_TRANSLATION}]},
        {"path": "s0", "coordinateTransformations": [
            {"type": "scale", "scale": list(VOXEL)},
            {"type": "translation", "translation": OFFSET_NM}]},
    ]
    multiscale = {"name": name, "datasets": datasets,
                  "axes": [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"]}
    if fmt == 2:
        group.attrs["multiscales"] = [{"version": "0.4", **multiscale}]
    else:
        group.attrs["ome"] = {"version": "0.5", "multiscales": [multiscale]}


def write_everything(root: Path) -> None:
    for name, a in DATA.items():
        write_volume(root / "ref.zarr", name, a, voxel_size=VOXEL, offset=OFFSET,
                     label=name == "labels", levels=1)
        with h5py.File(root / "v.h5", "a") as f:
            d = f.create_dataset(f"volumes/{name}", data=a, chunks=(4, 16, 16))
            d.attrs["resolution"] = VOXEL
            d.attrs["offset"] = OFFSET_NM
        with h5py.File(root / "fiji.h5", "a") as f:  # Fiji writes float32 micrometres
            f.create_dataset(name, data=a).attrs["element_size_um"] = np.array(
                [v / 1000 for v in VOXEL], np.float32)
        tifffile.imwrite(root / f"{name}.tif", a, imagej=True,
                         resolution=(1 / (VOXEL[2] / 1000), 1 / (VOXEL[1] / 1000)),
                         metadata={"spacing": VOXEL[0] / 1000, "unit": "micron", "axes": "ZYX"})
        folder = root / f"{name}_sections"
        folder.mkdir()
        for i, section in enumerate(a):  # unpadded numbers: natural order, not s_10 < s_2
            tifffile.imwrite(folder / f"s_{i}.tif", section)
        np.save(root / f"{name}.npy", a)
        n5_dataset(root / "v.n5" / name, a, block=[16, 16, 4], resolution=list(VOXEL[::-1]),
                   offset=OFFSET_NM[::-1])
        for fmt in (2, 3):
            array = zarr.create_array(str(root / f"v{fmt}.zarr"), name=name, shape=a.shape,
                                      dtype=a.dtype, chunks=(4, 16, 16), zarr_format=fmt)
            array[...] = a
            array.attrs.update({"voxel_size": list(VOXEL), "offset": OFFSET_NM})
            ome_group(root, fmt, name, a)
        # the reference of the coarser level: emrun's copy, its translation kept as a shift
        write_volume(root / "ref1.zarr", name, level1(a), voxel_size=LEVEL1_VOXEL,
                     offset=(3, 3, 4), shift_nm=(0.0, -6.0, -4.0), label=name == "labels",
                     levels=1)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("formats")
    write_everything(folder)
    return folder


def path_of(root: Path, fmt: str, part: str) -> str:
    return str(root / FORMATS[fmt][0][part])


# ======================================================================== open_volume


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("part", PARTS)
def test_open_volume_reads_values_shape_dtype_voxel_size_and_offset(root, fmt, part):
    volume = open_volume(path_of(root, fmt, part))
    _, voxel, offset = FORMATS[fmt]
    got = volume.read()
    want = DATA[part]
    assert got.dtype == want.dtype and volume.dtype == want.dtype
    assert volume.shape == want.shape and got.flags.c_contiguous
    assert np.array_equal(got, want)
    assert volume.voxel_size == voxel
    assert volume.offset == offset
    assert volume.shift_nm in (None, (0.0, 0.0, 0.0))


@pytest.mark.parametrize("fmt", ["ome_0.4", "ome_0.5"])
def test_ome_levels_listed_coarsest_first_are_taken_finest_first(root, fmt):
    image = path_of(root, fmt, "image")
    volume = open_volume(image)
    assert [(lv.name, lv.voxel_size) for lv in volume.levels()] == [
        ("s0", VOXEL), ("s1", LEVEL1_VOXEL)]
    assert choose_level(image, "s1") == choose_level(image, "1") == f"{image}/s1"
    assert choose_level(image, "40,24,16") == f"{image}/s1"
    coarse = open_volume(f"{image}/s1")
    assert np.array_equal(coarse.read(), level1(DATA["image"]))
    assert coarse.voxel_size == LEVEL1_VOXEL
    # 66 nm at 24 nm is 2.75 voxels: whole voxels (3) and the shift that puts it back
    placed = [o * v + s for o, v, s in zip(coarse.offset, coarse.voxel_size,
                                           coarse.shift_nm or (0, 0, 0), strict=True)]
    assert placed == pytest.approx(LEVEL1_TRANSLATION)
    reference = open_volume(root / "ref1.zarr/image")
    assert (coarse.offset, coarse.shift_nm) == (reference.offset, reference.shift_nm)


# ======================================================================== training


SMALL_AUGMENT = [{"type": "flip_rotate"}, {"type": "grayscale", "p": 0.7},
                 {"type": "missing_section", "max_sections": 1}]
"""For sources smaller than what deepem's warp reads around a patch."""


def recipe_of(paths: dict[str, str], voxel_size: tuple[float, ...] | None = None,
              augment: Any = "deepem") -> Recipe:
    source: dict[str, Any] = {"type": "volume", **paths}
    if voxel_size is not None:
        source["voxel_size"] = list(voxel_size)
    return Recipe.model_validate({
        "name": "formats", "seed": 1, "data": {"sources": {"s": source}},
        "model": {"type": "rsunet", "widths": [2, 4]}, "augment": augment,
        "tasks": {"aff": {"target": {"type": "affinity",
                                     "offsets": [[-1, 0, 0], [0, -1, 0], [0, 0, -2]]}},
                  "lsd": {"target": {"type": "lsd"}}},
        "train": {"patch": [4, 16, 16], "iterations": 1, "batch_size": 1, "workers": 0},
    })


def flat(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    if isinstance(tree, dict):
        out: dict[str, np.ndarray] = {}
        for key, value in tree.items():
            out.update(flat(value, f"{prefix}/{key}"))
        return out
    return {prefix: np.asarray(tree)}


def samples(recipe: Recipe, n: int = 4) -> list[dict[str, np.ndarray]]:
    maker = SampleMaker(recipe, keep_memory=False)
    return [flat(maker.sample(np.random.default_rng([11, k]))) for k in range(n)]


def assert_same(got: list[dict[str, np.ndarray]], want: list[dict[str, np.ndarray]]) -> None:
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.keys() == w.keys(), k
        for key in g:
            assert g[key].dtype == w[key].dtype and g[key].shape == w[key].shape, (k, key)
            assert np.array_equal(g[key].view(np.uint8), w[key].view(np.uint8)), (k, key)


@pytest.fixture(scope="module")
def reference_samples(root) -> list[dict[str, np.ndarray]]:
    return samples(recipe_of({p: path_of(root, "ref", p) for p in PARTS}))


def test_reference_samples_differ_and_use_the_mask(reference_samples, root):
    """The reference itself: samples differ from each other (a comparison would otherwise
    pass for a stuck stream), and the source's voxel size is the stated one."""
    for i in range(len(reference_samples)):
        for j in range(i):
            assert not np.array_equal(reference_samples[i]["/image"],
                                      reference_samples[j]["/image"])
    maker = SampleMaker(recipe_of({p: path_of(root, "ref", p) for p in PARTS}),
                        keep_memory=False)
    assert maker.sources[0].voxel_size == VOXEL
    assert maker.sources[0].mask is not None


@pytest.mark.parametrize("fmt", OTHERS)
def test_training_samples_from_each_format_are_the_reference_s(root, fmt, reference_samples):
    """Where a format states no voxel size the recipe states it (as the README advises);
    where it does, the recipe says nothing and the metadata must give the same samples
    (lsd targets and the augmentations depend on the voxel size)."""
    _, voxel, _ = FORMATS[fmt]
    recipe = recipe_of({p: path_of(root, fmt, p) for p in PARTS},
                       voxel_size=None if voxel is not None else VOXEL)
    assert_same(samples(recipe), reference_samples)


CUT = (slice(2, 12), slice(6, 31), slice(9, 40))  # labels and mask of a part of the image
CUT_AT = (2, 6, 9)


@pytest.fixture(scope="module")
def cutouts(root) -> Path:
    """Labels and mask of a part of the image, placed by their offset, in every format that
    states one."""
    folder = root / "cut"
    folder.mkdir()
    at = tuple(o + c for o, c in zip(OFFSET, CUT_AT, strict=True))
    at_nm = [o * v for o, v in zip(at, VOXEL, strict=True)]
    for name in ("labels", "mask"):
        a = np.ascontiguousarray(DATA[name][CUT])
        write_volume(folder / "ref.zarr", name, a, voxel_size=VOXEL, offset=at,
                     label=name == "labels", levels=1)
        with h5py.File(folder / "v.h5", "a") as f:
            d = f.create_dataset(name, data=a)
            d.attrs["resolution"] = VOXEL
            d.attrs["offset"] = at_nm
        n5_dataset(folder / "v.n5" / name, a, block=[16, 16, 4],
                   resolution=list(VOXEL[::-1]), offset=at_nm[::-1])
        for fmt in (2, 3):
            array = zarr.create_array(str(folder / f"v{fmt}.zarr"), name=name, shape=a.shape,
                                      dtype=a.dtype, chunks=(4, 16, 16), zarr_format=fmt)
            array[...] = a
            array.attrs.update({"voxel_size": list(VOXEL), "offset": at_nm})
    return folder


CUT_FORMATS = {"hdf5": ("v.h5/volumes/image", "v.h5"), "n5": ("v.n5/image", "v.n5"),
               "zarr_v2": ("v2.zarr/image", "v2.zarr"), "zarr_v3": ("v3.zarr/image", "v3.zarr")}


@pytest.fixture(scope="module")
def reference_cut_samples(root, cutouts) -> list[dict[str, np.ndarray]]:
    return samples(recipe_of({"image": path_of(root, "ref", "image"),
                              "labels": str(cutouts / "ref.zarr/labels"),
                              "mask": str(cutouts / "ref.zarr/mask")}, augment=SMALL_AUGMENT))


def test_reference_cut_samples_lie_inside_the_cutout(root, cutouts, reference_cut_samples):
    maker = SampleMaker(recipe_of({"image": path_of(root, "ref", "image"),
                                   "labels": str(cutouts / "ref.zarr/labels")},
                                  augment=SMALL_AUGMENT), keep_memory=False)
    box = maker.sources[0].box
    assert (tuple(box.offset), tuple(box.shape)) == (CUT_AT, (10, 25, 31))


@pytest.mark.parametrize("fmt", list(CUT_FORMATS))
def test_training_from_labels_of_a_part_placed_by_offset(root, cutouts, fmt,
                                                         reference_cut_samples):
    image, container = CUT_FORMATS[fmt]
    recipe = recipe_of({"image": str(root / image),
                        "labels": str(cutouts / container / "labels"),
                        "mask": str(cutouts / container / "mask")}, augment=SMALL_AUGMENT)
    assert_same(samples(recipe), reference_cut_samples)


@pytest.mark.parametrize("fmt", ["ome_0.4", "ome_0.5"])
def test_training_from_a_coarser_ome_level(root, fmt):
    """image, labels and mask at level s1 of their OME groups: the samples of emrun's copy
    of that level (the recipe names the same voxel size as both state)."""
    got = samples(recipe_of({p: f"{path_of(root, fmt, p)}/s1" for p in PARTS},
                            augment=SMALL_AUGMENT), n=3)
    want = samples(recipe_of({p: str(root / "ref1.zarr" / p) for p in PARTS},
                             augment=SMALL_AUGMENT), n=3)
    assert_same(got, want)


# ======================================================================== inference

INFER_RECIPE = {
    "name": "fi", "data": {"sources": {"a": {"type": "synthetic", "shape": [16, 64, 64]}}},
    "model": {"type": "rsunet", "widths": [2, 4]},
    "tasks": {"aff": {"target": {"type": "affinity",
                                 "offsets": [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]}}},
    "train": {"patch": [4, 16, 16], "iterations": 1},
    "infer": {"dtype": "float32", "precision": "fp32", "batch_size": 2},
}


@pytest.fixture(scope="module")
def model_files(root) -> tuple[Path, Path]:
    recipe = Recipe.model_validate(INFER_RECIPE)
    torch.manual_seed(0)
    model = models.build(recipe.model, head_channels=recipe.head_channels())
    for p in model.parameters():
        p.data.normal_(0, 0.3)  # lively outputs: every input voxel shows
    torch.save({"model": model.state_dict(), "iteration": 1}, root / "c.pt")
    (root / "r.yaml").write_text(yaml.safe_dump(recipe.resolved()))
    return root / "c.pt", root / "r.yaml"


def infer(model_files: tuple[Path, Path], source: str, out: Path, *extra: str) -> Path:
    checkpoint, recipe = model_files
    result = runner.invoke(app, ["infer", "--checkpoint", str(checkpoint), "--recipe",
                                 str(recipe), "--input", source, "--output", str(out),
                                 "--device", "cpu", "--levels", "1", "--block", "8", "32",
                                 "32", *extra])
    assert result.exit_code == 0, result.output
    return out


def transforms(group: Path) -> dict[str, list[float]]:
    """The OME scale and translation of level 0 of an emrun output's image group."""
    ome = json.loads((group / "zarr.json").read_text())["attributes"]["ome"]
    found = {t["type"]: t[t["type"]]
             for t in ome["multiscales"][0]["datasets"][0]["coordinateTransformations"]}
    return {"scale": found["scale"], "translation": found.get("translation")}


@pytest.fixture(scope="module")
def reference_prediction(root, model_files) -> np.ndarray:
    out = infer(model_files, path_of(root, "ref", "image"), root / "pred_ref.zarr")
    prediction = open_volume(out / "aff")
    assert prediction.shape == (3, *SHAPE)
    assert (prediction.voxel_size, prediction.offset) == (VOXEL, OFFSET)
    data = prediction.read()
    assert data.std() > 0.05  # not a constant: a wrong input would show
    return data


@pytest.mark.parametrize("fmt", OTHERS)
def test_infer_on_each_format_writes_the_reference_s_bits(root, model_files, fmt,
                                                          reference_prediction):
    out = infer(model_files, path_of(root, fmt, "image"), root / f"pred_{fmt}.zarr")
    prediction = open_volume(out / "aff")
    got = prediction.read()
    assert got.dtype == reference_prediction.dtype
    assert np.array_equal(got.view(np.uint8), reference_prediction.view(np.uint8))
    _, voxel, offset = FORMATS[fmt]
    assert prediction.voxel_size == voxel
    assert prediction.offset == (offset or (0, 0, 0))


@pytest.mark.parametrize("fmt", ["hdf5", "n5", "zarr_v2", "ome_0.5", "imagej_tiff", "npy"])
def test_infer_of_a_roi_keeps_the_input_s_place(root, model_files, fmt):
    """--roi counts in the input's voxels; the output lies at the input's offset plus the
    roi's, as the reference's does."""
    roi = "2,3,4/6,20,24"
    if not (root / "roi_ref.zarr").exists():
        infer(model_files, path_of(root, "ref", "image"), root / "roi_ref.zarr", "--roi", roi)
    want = open_volume(root / "roi_ref.zarr/aff")
    assert want.offset == tuple(o + r for o, r in zip(OFFSET, (2, 3, 4), strict=True))
    got = open_volume(infer(model_files, path_of(root, fmt, "image"),
                            root / f"roi_{fmt}.zarr", "--roi", roi) / "aff")
    assert np.array_equal(got.read().view(np.uint8), want.read().view(np.uint8))
    base = FORMATS[fmt][2] or (0, 0, 0)
    assert got.offset == tuple(b + r for b, r in zip(base, (2, 3, 4), strict=True))


@pytest.mark.parametrize("fmt", ["ome_0.4", "ome_0.5"])
@pytest.mark.parametrize("level", ["s1", "1", "40,24,16"])
def test_infer_of_a_coarser_level_is_that_of_its_copy(root, model_files, fmt, level):
    want_out = root / "level_ref.zarr"
    if not want_out.exists():
        infer(model_files, str(root / "ref1.zarr/image"), want_out)
    got_out = infer(model_files, path_of(root, fmt, "image"),
                    root / f"level_{fmt}_{level.replace(',', '_')}.zarr", "--level", level)
    got, want = open_volume(got_out / "aff"), open_volume(want_out / "aff")
    assert np.array_equal(got.read().view(np.uint8), want.read().view(np.uint8))
    assert transforms(got_out / "aff") == transforms(want_out / "aff")
    assert transforms(got_out / "aff")["scale"][1:] == list(LEVEL1_VOXEL)
    assert transforms(got_out / "aff")["translation"][1:] == pytest.approx(LEVEL1_TRANSLATION)


# ======================================================================== evaluate


@pytest.fixture(scope="module")
def segmentation(root) -> str:
    """A segmentation of the labels with splits, merges and a false boundary."""
    seg = DATA["labels"].astype(np.uint64) * 3
    seg[seg % 2 == 0] += 7
    seg[:, :, 30:] += 1000
    seg[:, 10:12, :] = 5
    write_volume(root / "seg.zarr", "segmentation", seg, voxel_size=VOXEL, offset=OFFSET,
                 label=True, levels=1)
    return str(root / "seg.zarr/segmentation")


def scores(seg: str, truth: str, *extra: str) -> dict[str, Any]:
    result = runner.invoke(app, ["evaluate", seg, truth, "--json", "--min-overlap", "1",
                                 *extra])
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    return {k: v for k, v in found.items() if k not in ("seg", "truth", "mask")}


@pytest.mark.parametrize("fmt", OTHERS)
def test_evaluate_with_truth_and_mask_in_each_format(root, segmentation, fmt):
    for extra in ((), ("--mask",)):
        def args(f: str, extra: tuple[str, ...] = extra) -> tuple[str, ...]:
            return (*extra, path_of(root, f, "mask")) if extra else ()

        want = scores(segmentation, path_of(root, "ref", "labels"), *args("ref"))
        got = scores(segmentation, path_of(root, fmt, "labels"), *args(fmt))
        assert want["arand"] > 0.01  # the segmentation is wrong somewhere: figures tell
        assert got == want


@pytest.mark.parametrize("fmt", ["hdf5", "n5", "zarr_v2", "zarr_v3", "ome_0.4", "ome_0.5"])
def test_evaluate_of_a_part_reads_the_truth_at_its_place(root, fmt):
    """A segmentation of a part (what `infer --roi` then `segment` give) is scored against
    the box of the whole truth it covers, found from the truth's offset in each format."""
    seg_path = root / "segcut.zarr"
    if not seg_path.exists():
        seg = (DATA["labels"].astype(np.uint64) * 3)[2:10, 3:30, 4:40].copy()
        seg[:, :, 20:] += 99  # splits
        write_volume(seg_path, "segmentation", seg, voxel_size=VOXEL, offset=(5, 8, 11),
                     label=True, levels=1)
    seg_name = str(seg_path / "segmentation")
    want = scores(seg_name, path_of(root, "ref", "labels"))
    assert want["arand"] > 0.01 and want["rand_merge"] == 1.0  # splits only: it lines up
    assert scores(seg_name, path_of(root, fmt, "labels")) == want


@pytest.mark.parametrize("fmt", ["npy", "hdf5", "tiff", "n5", "zarr_v2"])
def test_evaluate_of_uint64_ids_beyond_float_precision(tmp_path, fmt):
    """Truth ids near 2**63 (distinct in uint64, equal in float64) score as the same truth
    in emrun's zarr: no format rounds them through floats."""
    _z, y, x = np.indices((6, 20, 22))
    base = np.uint64(2**62)
    truth = (base + ((y // 5) * 4 + x // 6).astype(np.uint64)).astype(np.uint64)
    seg = ((y // 5) * 4 + x // 6 + 1).astype(np.uint64)
    seg[:, :, :11] = 1  # merges
    write_volume(tmp_path / "s.zarr", "segmentation", seg, label=True, levels=1)
    write_volume(tmp_path / "t.zarr", "labels", truth, label=True, levels=1)
    if fmt == "npy":
        np.save(tmp_path / "t.npy", truth)
        path = tmp_path / "t.npy"
    elif fmt == "hdf5":
        with h5py.File(tmp_path / "t.h5", "w") as f:
            f["t"] = truth
        path = tmp_path / "t.h5/t"
    elif fmt == "tiff":
        tifffile.imwrite(tmp_path / "t.tif", truth)
        path = tmp_path / "t.tif"
    elif fmt == "n5":
        n5_dataset(tmp_path / "t.n5" / "t", truth, block=[16, 16, 4])
        path = tmp_path / "t.n5/t"
    else:
        array = zarr.create_array(str(tmp_path / "t2.zarr"), shape=truth.shape, dtype="<u8",
                                  chunks=(4, 8, 8), zarr_format=2)
        array[...] = truth
        path = tmp_path / "t2.zarr"
    assert np.array_equal(open_volume(path).read(), truth)
    want = scores(str(tmp_path / "s.zarr/segmentation"), str(tmp_path / "t.zarr/labels"))
    assert want["rand_merge"] < 0.9  # the merges show: ids were kept apart
    assert scores(str(tmp_path / "s.zarr/segmentation"), str(path)) == want


# ======================================================================== dtypes and order


@pytest.mark.parametrize("fmt", ["npy", "hdf5", "zarr_v2", "n5", "imagej_tiff"])
def test_uint16_big_endian_images_train_as_native_ones(tmp_path, fmt):
    """A uint16 image stored big-endian (Java tools' zarr v2, some HDF5 and .npy) or as
    ImageJ's uint16: samples bit-identical to emrun's native copy (the dtype's default
    intensity scale, 65535)."""
    rng = np.random.default_rng(5)
    image = rng.integers(0, 65536, (9, 30, 34), dtype=np.uint16)
    _z, y, x = np.indices(image.shape)
    labels = (1 + (y // 7) * 10 + x // 8).astype(np.uint32)
    write_volume(tmp_path / "ref.zarr", "image", image, voxel_size=VOXEL, levels=1)
    write_volume(tmp_path / "ref.zarr", "labels", labels, voxel_size=VOXEL, label=True,
                 levels=1)
    big = image.astype(">u2")
    if fmt == "npy":
        np.save(tmp_path / "i.npy", big)
        path = tmp_path / "i.npy"
    elif fmt == "hdf5":
        with h5py.File(tmp_path / "i.h5", "w") as f:
            f.create_dataset("i", data=big).attrs["resolution"] = VOXEL
        path = tmp_path / "i.h5/i"
    elif fmt == "zarr_v2":
        array = zarr.create_array(str(tmp_path / "i.zarr"), shape=big.shape, dtype=">u2",
                                  chunks=(4, 16, 16), zarr_format=2)
        array[...] = big
        array.attrs["voxel_size"] = list(VOXEL)
        path = tmp_path / "i.zarr"
    elif fmt == "n5":  # N5 is big-endian on disk whatever the writer holds
        n5_dataset(tmp_path / "i.n5" / "i", image, block=[16, 16, 4],
                   resolution=list(VOXEL[::-1]))
        path = tmp_path / "i.n5/i"
    else:
        tifffile.imwrite(tmp_path / "i.tif", image, imagej=True,
                         resolution=(1 / VOXEL[2], 1 / VOXEL[1]),
                         metadata={"spacing": VOXEL[0], "unit": "nm", "axes": "ZYX"})
        path = tmp_path / "i.tif"
    volume = open_volume(path)
    assert volume.dtype == np.dtype("uint16") and np.array_equal(volume.read(), image)
    labels_path = str(tmp_path / "ref.zarr/labels")
    got = samples(recipe_of({"image": str(path), "labels": labels_path},
                            voxel_size=None if volume.voxel_size else VOXEL), n=3)
    want = samples(recipe_of({"image": str(tmp_path / "ref.zarr/image"),
                              "labels": labels_path}), n=3)
    assert_same(got, want)


@pytest.mark.parametrize(("metadata", "expected"), [
    ({"PhysicalSizeZ": 0.03, "PhysicalSizeY": 0.006, "PhysicalSizeX": 0.004},
     (30.0, 6.0, 4.0)),  # micrometres: the OME schema's default unit
    ({"PhysicalSizeZ": 40, "PhysicalSizeZUnit": "nm", "PhysicalSizeY": 12,
      "PhysicalSizeYUnit": "nm", "PhysicalSizeX": 0.008, "PhysicalSizeXUnit": "µm"},
     (40.0, 12.0, 8.0)),
    ({"PhysicalSizeY": 0.006, "PhysicalSizeX": 0.006}, None),  # no z: no voxel size
])
def test_an_ome_tiff_states_its_voxel_size(tmp_path, metadata, expected):
    """Bio-Formats and microscope software write OME-TIFF, not ImageJ's metadata: its
    PhysicalSize was ignored (the voxel size unknown)."""
    path = tmp_path / "v.ome.tif"
    tifffile.imwrite(path, np.zeros((5, 16, 16), np.uint8), ome=True,
                     metadata={"axes": "ZYX", **metadata})
    assert open_volume(str(path)).voxel_size == expected


def test_an_ome_tiff_size_in_an_unknown_unit_is_refused_naming_it(tmp_path):
    from emrun.io import VolumeError

    path = tmp_path / "v.ome.tif"
    tifffile.imwrite(path, np.zeros((5, 16, 16), np.uint8), ome=True, metadata={
        "axes": "ZYX", "PhysicalSizeZ": 3, "PhysicalSizeZUnit": "furlong",
        "PhysicalSizeY": 6, "PhysicalSizeX": 6})
    with pytest.raises(VolumeError, match=r"OME-TIFF metadata.*furlong"):
        open_volume(str(path))
