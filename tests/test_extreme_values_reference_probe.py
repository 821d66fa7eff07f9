"""Reference probe of extreme values through the main commands (`data convert`, `train`,
`infer`, `segment --method cc`, `evaluate`), on tiny volumes made here whose values sit at the
edges of what emrun accepts: uint64 ids near 2**64 - 1 and above 2**53 that differ only in
their low bits (float64 would merge them), negative int64 ids, uint8 labels with 255 objects,
bool labels, a single object, none, one-voxel objects; float16, int8 (negative), float64
images far from 0, constant images, NaN outside a mask; z = 1, x = 1, 1 x 1 x 1, a volume of
exactly one patch, prime sizes on every axis.

References written here: voxel-by-voxel equality and brute-force pyramid levels (the most
frequent id of each window, the smallest on ties; means rounded half up in Fractions), the
affinity pair loop over Python ints, union-find connected components over the
nearest-neighbour edges, and the Rand/VOI scores from a contingency table of Python ints.
Where no closed form exists (a network's output), metamorphic references: inputs that the
README says scale to the same floats must predict the same bytes, and labels that are one
relabelling of another must train and validate the same. The README's refusals are one
line, exit 2, no traceback."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml
from typer.testing import CliRunner

import emrun.models  # noqa: F401  (registers the models)
from emrun.cli import app
from emrun.data.samples import SampleMaker
from emrun.errors import UserError
from emrun.io import open_volume, write_volume
from emrun.recipe import Recipe
from emrun.registry import models

runner = CliRunner()
NEAREST = [(-1, 0, 0), (0, -1, 0), (0, 0, -1)]
TOP = 2**64 - 1


def assert_refused(result, *needles: str) -> None:
    """A user's mistake: exit 2, one `error:` line on stderr, no traceback."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.output and "internal error" not in result.output
    for needle in needles:
        assert needle in errors[0], errors[0]


def blocky_ids(shape, ids, cell=(4, 8, 8), dtype=np.uint64) -> np.ndarray:
    """Box-shaped objects (each one connected piece) numbered through ``ids`` (a list of
    Python ints, used in order)."""
    z, y, x = np.indices(shape)
    ny, nx = -(-shape[1] // cell[1]), -(-shape[2] // cell[2])
    k = (z // cell[0]) * ny * nx + (y // cell[1]) * nx + x // cell[2]
    table = np.array(ids, dtype=dtype)
    return table[k % len(ids)]


# ======================================================================== data convert


def _level_reference(data: np.ndarray, label: bool) -> np.ndarray:
    """One pyramid step for unknown voxel size (z kept, y and x halved, windows cut by the
    end use the voxels present): the most frequent id (smallest on ties), or the mean, in
    Fractions rounded half up for integers, fsum for floats."""
    zs, ys, xs = data.shape
    out = np.empty((zs, -(-ys // 2), -(-xs // 2)), data.dtype)
    for z, y, x in np.ndindex(out.shape):
        values = [data[z, j, i].item() for j in range(2 * y, min(2 * y + 2, ys))
                  for i in range(2 * x, min(2 * x + 2, xs))]
        if label:
            counts = Counter(values)
            best = max(counts.values())
            out[z, y, x] = min(v for v in counts if counts[v] == best)
        elif data.dtype.kind in "iu":
            out[z, y, x] = math.floor(Fraction(sum(values), len(values)) + Fraction(1, 2))
        else:
            out[z, y, x] = math.fsum(values) / len(values)
    return out


def _convert_cases() -> dict[str, tuple[np.ndarray, list[str], str, np.dtype, bool]]:
    """name: (array, options, volume name written, dtype expected, label pyramid)."""
    rng = np.random.default_rng(1)
    shape = (3, 13, 11)  # prime y and x: every window cut at the end
    top = np.uint64(TOP) - rng.integers(0, 3, shape).astype(np.uint64)
    above53 = np.uint64(2**53) + rng.integers(0, 3, shape).astype(np.uint64)
    return {
        "uint64-top": (top, [], "labels", np.dtype(np.uint64), True),
        "uint64-2**53": (above53, [], "labels", np.dtype(np.uint64), True),
        "uint8-255-objects": (rng.integers(0, 256, shape).astype(np.uint8), ["--labels"],
                              "labels", np.dtype(np.uint8), True),
        "int64-negative": (rng.integers(-2**63, -2**63 + 3, shape, dtype=np.int64), [],
                           "labels", np.dtype(np.int64), True),
        "bool": (rng.random(shape) < 0.5, [], "mask", np.dtype(np.uint8), False),
        "int8-negative": (rng.integers(-128, 128, shape).astype(np.int8), [], "image",
                          np.dtype(np.int8), False),
        "uint64-image-top": (top, ["--image"], "image", np.dtype(np.uint64), False),
        "float16": (rng.random(shape).astype(np.float16) * 100, [], "image",
                    np.dtype(np.float16), False),
        "float64-1e15": (1e15 + rng.integers(0, 8, shape).astype(np.float64), [], "image",
                         np.dtype(np.float64), False),
        "constant": (np.full(shape, 7, np.uint8), [], "image", np.dtype(np.uint8), False),
    }


@pytest.mark.parametrize("case", list(_convert_cases()))
def test_convert_keeps_every_voxel_and_builds_levels_like_the_brute_force(tmp_path, case):
    array, options, name, dtype, label = _convert_cases()[case]
    np.save(tmp_path / "in.npy", array)
    result = runner.invoke(app, ["data", "convert", str(tmp_path / "in.npy"),
                                 str(tmp_path / "out.zarr"), "--levels", "3", *options])
    assert result.exit_code == 0, result.output
    expected = array.astype(np.uint8) if array.dtype == bool else array
    levels = [open_volume(tmp_path / f"out.zarr/{name}/{k}").read() for k in range(3)]
    assert levels[0].dtype == dtype
    assert np.array_equal(levels[0], expected)
    assert levels[0].tolist() == expected.tolist()  # as Python ints: no float rounding
    want = expected
    for k in (1, 2):
        want = _level_reference(want, label)
        assert levels[k].dtype == dtype
        assert levels[k].tolist() == want.tolist(), (case, k)
        if label:  # invents no id
            assert set(np.unique(levels[k]).tolist()) <= set(np.unique(expected).tolist())


@pytest.mark.parametrize("shape", [(1, 5, 7), (5, 7, 1), (1, 1, 1), (7, 11, 13)])
def test_convert_of_thin_and_prime_shapes_from_tiff_and_big_endian_npy(tmp_path, shape):
    rng = np.random.default_rng(sum(shape))
    ids = (np.uint64(TOP) - rng.integers(0, 4, shape).astype(np.uint64)).astype(np.uint64)
    tifffile.imwrite(tmp_path / "in.tif", ids)
    np.save(tmp_path / "be.npy", ids.astype(">u8"))
    for source, out in (("in.tif", "a.zarr"), ("be.npy", "b.zarr")):
        result = runner.invoke(app, ["data", "convert", str(tmp_path / source),
                                     str(tmp_path / out), "--levels", "1"])
        assert result.exit_code == 0, result.output
        got = open_volume(tmp_path / out / "labels").read()
        assert got.dtype == np.dtype("<u8") and got.shape == shape
        assert got.tolist() == ids.tolist()


@pytest.mark.parametrize("array, options, needle", [
    (np.zeros((2, 3, 4), np.complex64), [], "unsupported dtype complex64"),
    (np.zeros((3, 4), np.uint8), [], "is 2-d"),
    (np.zeros((0, 4, 4), np.uint8), [], "is empty"),
    (np.zeros((2, 3, 4), np.float16), ["--labels"], "not float16"),
], ids=["complex", "2-d", "empty", "float-labels"])
def test_convert_refusals_are_one_line(tmp_path, array, options, needle):
    np.save(tmp_path / "in.npy", array)
    result = runner.invoke(app, ["data", "convert", str(tmp_path / "in.npy"),
                                 str(tmp_path / "out.zarr"), *options])
    assert_refused(result, needle)


def test_convert_of_a_long_double_volume_is_a_one_line_refusal(tmp_path):
    np.save(tmp_path / "in.npy", np.zeros((2, 3, 4), np.longdouble))
    result = runner.invoke(app, ["data", "convert", str(tmp_path / "in.npy"),
                                 str(tmp_path / "out.zarr")])
    assert_refused(result, "float128")


# ======================================================================== training


def recipe_dict(folder: Path, name: str, patch=(8, 32, 32), offsets=None, mask=None,
                validation=False, intensity=None) -> dict:
    source = {"image": str(folder / "image.npy"), "labels": str(folder / f"{name}.npy")}
    if mask is not None:
        source["mask"] = str(folder / mask)
    if intensity is not None:
        source["intensity"] = intensity
    target = {"type": "affinity"}
    if offsets is not None:
        target["offsets"] = [list(o) for o in offsets]
    recipe = {"name": name, "seed": 1, "data": {"sources": {"s": source}},
              "model": {"type": "rsunet", "widths": [2, 4]},
              "tasks": {"aff": {"target": target}},
              "train": {"patch": list(patch), "iterations": 2, "batch_size": 1,
                        "workers": 0}}
    if validation:
        recipe["data"]["validation"] = {"val": dict(source)}
        recipe["segment"] = {"type": "cc", "threshold": 0.5}
        recipe["train"].update(validate_every=2, validate_in_background=False)
    return recipe


def train(folder: Path, recipe: dict, *extra: str):
    path = folder / f"{recipe['name']}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return runner.invoke(app, ["train", str(path), "--run-dir",
                               str(folder / f"run_{recipe['name']}"), "--device", "cpu",
                               *extra])


def events(folder: Path, name: str) -> list[dict]:
    lines = (folder / f"run_{name}" / "events.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def affinity_reference(labels: np.ndarray, offsets) -> tuple[np.ndarray, np.ndarray]:
    """Target and mask by a loop over voxel pairs in Python ints: the mask where both ends
    are labelled and inside the patch, the target where they hold the same id."""
    ids = labels.tolist()
    target = np.zeros((len(offsets), *labels.shape), np.uint8)
    mask = np.zeros_like(target)
    for c, offset in enumerate(offsets):
        for p in itertools.product(*map(range, labels.shape)):
            q = tuple(a + b for a, b in zip(p, offset, strict=True))
            if not all(0 <= v < n for v, n in zip(q, labels.shape, strict=True)):
                continue
            a, b = ids[p[0]][p[1]][p[2]], ids[q[0]][q[1]][q[2]]
            mask[(c, *p)] = a != 0 and b != 0
            target[(c, *p)] = a == b and a != 0
    return target, mask


@pytest.mark.parametrize("ids", [
    [TOP - k for k in range(32)],                     # differ in the lowest bits at the top
    [2**53 + k for k in range(32)],                   # 2**53 + 1 is no float64
    [(-(2**63) + k) for k in range(32)],              # negative int64: objects too
], ids=["near-2**64", "above-2**53", "int64-min"])
def test_affinity_targets_of_huge_ids_equal_the_pair_loop(tmp_path, ids):
    """A volume of exactly one patch, no augmentation: the sample's target is that of the
    whole volume, and neighbouring objects whose ids differ by 1 stay apart."""
    labels = blocky_ids((8, 32, 32), ids, dtype=np.int64 if ids[0] < 0 else np.uint64)
    labels[:, :, 13] = 0  # unlabelled voxels: masked pairs
    np.save(tmp_path / "lab.npy", labels)
    np.save(tmp_path / "image.npy", np.random.default_rng(0).random((8, 32, 32),
                                                                     dtype=np.float32))
    recipe = Recipe.model_validate(recipe_dict(tmp_path, "lab"))
    sample = SampleMaker(recipe, keep_memory=False).sample(np.random.default_rng(3))
    target, mask = affinity_reference(labels, NEAREST)
    assert np.array_equal(sample["mask"]["aff"], mask)
    assert np.array_equal(sample["target"]["aff"] * mask, target)
    assert (target[mask == 1] == 0).sum() > 100  # many boundaries between ids 1 apart


def test_training_on_huge_ids_is_training_on_their_small_relabelling(tmp_path):
    """Train and validate (loss and segmentation scores) on ids near 2**64 - 1, then on the
    same partition as ids 1..K: every logged figure the same. Merged into one id (what a
    float64 round trip of the huge ids makes of them) the figures differ, so the equality
    is not vacuous."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "image.npy", rng.random((8, 32, 32), dtype=np.float32))
    small = blocky_ids((8, 32, 32), list(range(1, 33)))
    small[:, :, 13] = 0
    huge = np.where(small == 0, 0, np.uint64(TOP) - small).astype(np.uint64)
    assert len(np.unique(huge.astype(np.float64))) == 2  # 0 and one float for all objects
    merged = (small != 0).astype(np.uint64)
    figures = {}
    for name, labels in (("small", small), ("huge", huge), ("merged", merged)):
        np.save(tmp_path / f"{name}.npy", labels)
        result = train(tmp_path, recipe_dict(tmp_path, name, validation=True))
        assert result.exit_code == 0, result.output
        found = events(tmp_path, name)
        figures[name] = ([e["loss/total"] for e in found if "loss/total" in e],
                         [e["validation"] for e in found if "validation" in e])
        assert figures[name][1], found
    assert figures["huge"] == figures["small"]
    assert figures["merged"][0] != figures["small"][0]
    assert figures["merged"][1][0]["arand"] != figures["small"][1][0]["arand"]


@pytest.mark.parametrize("case", ["uint8-255-objects", "bool", "single-object", "z1-2d",
                                  "one-voxel-objects", "int8-constant-image"])
def test_training_on_edge_labels_and_shapes(tmp_path, case):
    rng = np.random.default_rng(0)
    z, y, x = np.indices((8, 32, 32))
    image = rng.random((8, 32, 32), dtype=np.float32)
    patch, offsets = (8, 32, 32), None
    if case == "uint8-255-objects":
        labels = ((z // 2 * 64 + y // 4 * 8 + x // 4) % 255 + 1).astype(np.uint8)
        assert len(np.unique(labels)) == 255
    elif case == "bool":
        labels = y < 16
    elif case == "single-object":
        labels = np.full((8, 32, 32), TOP, np.uint64)
    elif case == "z1-2d":
        labels = ((y // 8) * 4 + x // 8 + 1).astype(np.uint32)[:1]
        image, patch, offsets = image[:1], (1, 32, 32), NEAREST[1:]
    elif case == "one-voxel-objects":
        labels = np.zeros((8, 32, 32), np.uint64)
        ones = np.arange(4 * 16 * 16, dtype=np.uint64).reshape(4, 16, 16)
        labels[::2, ::2, ::2] = np.uint64(2**53) + ones  # no two touch
    else:
        labels = blocky_ids((8, 32, 32), [TOP - k for k in range(32)])
        image = np.full((8, 32, 32), -7, np.int8)
    np.save(tmp_path / "image.npy", image)
    np.save(tmp_path / "lab.npy", labels)
    result = train(tmp_path, recipe_dict(tmp_path, "lab", patch=patch, offsets=offsets))
    assert result.exit_code == 0, result.output
    losses = [e["loss/total"] for e in events(tmp_path, "lab") if "loss/total" in e]
    assert losses and all(math.isfinite(v) for v in losses)


def test_training_on_labels_all_zero_is_a_one_line_refusal(tmp_path):
    np.save(tmp_path / "image.npy", np.zeros((8, 32, 32), np.float32))
    np.save(tmp_path / "lab.npy", np.zeros((8, 32, 32), np.uint64))
    assert_refused(train(tmp_path, recipe_dict(tmp_path, "lab")),
                   "no labelled voxel to sample from")


def test_a_volume_of_exactly_one_patch_without_a_mask_trains(tmp_path):
    np.save(tmp_path / "image.npy", np.random.default_rng(0).random((8, 32, 32),
                                                                     dtype=np.float32))
    np.save(tmp_path / "lab.npy", blocky_ids((8, 32, 32), list(range(1, 33))))
    assert train(tmp_path, recipe_dict(tmp_path, "lab")).exit_code == 0


def test_a_volume_of_exactly_one_patch_with_a_full_mask_trains(tmp_path):
    """The mask lets in every voxel, so the one place the patch fits is acceptable, as it
    is without the mask (test above). Ten seeds of the sample stream: all must find it."""
    np.save(tmp_path / "image.npy", np.random.default_rng(0).random((8, 32, 32),
                                                                     dtype=np.float32))
    np.save(tmp_path / "lab.npy", blocky_ids((8, 32, 32), list(range(1, 33))))
    np.save(tmp_path / "mask.npy", np.ones((8, 32, 32), np.uint8))
    recipe = recipe_dict(tmp_path, "lab", mask="mask.npy")
    maker = SampleMaker(Recipe.model_validate(recipe), keep_memory=False)
    found = 0
    for seed in range(10):
        try:
            maker.sample(np.random.default_rng(seed))
            found += 1
        except UserError:  # no acceptable patch
            pass
    assert found == 10
    assert train(tmp_path, recipe).exit_code == 0


# ======================================================================== inference

INFER_RECIPE = {
    "name": "xv", "data": {"sources": {"a": {"type": "synthetic", "shape": [16, 64, 64]}}},
    "model": {"type": "rsunet", "widths": [2, 4]},
    "tasks": {"aff": {"target": {"type": "affinity"}}},
    "train": {"patch": [4, 16, 16], "iterations": 1},
    "infer": {"precision": "fp32", "batch_size": 2},
}


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("model")
    recipe = Recipe.model_validate(INFER_RECIPE)
    torch.manual_seed(0)
    model = models.build(recipe.model, head_channels=recipe.head_channels())
    for p in model.parameters():
        p.data.normal_(0, 0.3)  # lively outputs: every input voxel shows
    torch.save({"model": model.state_dict(), "iteration": 1}, root / "c.pt")
    (root / "r.yaml").write_text(yaml.safe_dump(recipe.resolved()))
    return root / "c.pt", root / "r.yaml"


def infer(model_files, folder: Path, name: str, array: np.ndarray, *extra: str):
    checkpoint, recipe = model_files
    np.save(folder / f"{name}.npy", array)
    result = runner.invoke(app, ["infer", "--checkpoint", str(checkpoint), "--recipe",
                                 str(recipe), "--input", str(folder / f"{name}.npy"),
                                 "--output", str(folder / f"{name}.zarr"), "--device", "cpu",
                                 "--levels", "1", *extra])
    assert result.exit_code == 0, result.output
    return open_volume(folder / f"{name}.zarr" / "aff").read(), result


SHAPE = (9, 37, 41)


def test_int8_images_predict_as_their_uint8_shift(model_files, tmp_path):
    """int8's default scale is -128..127 (README: the dtype's range), so x and x + 128 as
    uint8 are the same floats: the same bytes out. An int8 image of 0 (mid grey) is no blank
    input; one of -128 (its low end) is, and reads as zeros with a warning."""
    x = np.random.default_rng(0).integers(-128, 128, SHAPE).astype(np.int8)
    a, _ = infer(model_files, tmp_path, "i8", x)
    b, _ = infer(model_files, tmp_path, "u8", (x.astype(np.int16) + 128).astype(np.uint8))
    assert a.std() > 5 and np.array_equal(a, b)
    grey, _ = infer(model_files, tmp_path, "i8grey", np.zeros(SHAPE, np.int8))
    grey_u8, _ = infer(model_files, tmp_path, "u8grey", np.full(SHAPE, 128, np.uint8))
    assert grey.max() > 0 and np.array_equal(grey, grey_u8)
    low, result = infer(model_files, tmp_path, "i8low", np.full(SHAPE, -128, np.int8))
    assert not low.any()
    assert "blank" in result.stderr


def test_float16_and_float64_far_from_zero_predict_as_float32(model_files, tmp_path):
    rng = np.random.default_rng(1)
    r16 = rng.random(SHAPE).astype(np.float16)
    a, _ = infer(model_files, tmp_path, "f16", r16)
    b, _ = infer(model_files, tmp_path, "f32", r16.astype(np.float32))
    assert a.std() > 5 and np.array_equal(a, b)
    base = rng.random(SHAPE)
    far = 1e12 + base  # float64: its fraction is kept to ~1e-4
    np.save(tmp_path / "lab.npy", np.ones((4, 16, 16), np.uint32))
    resolved = yaml.safe_load(model_files[1].read_text())
    resolved["data"]["sources"] = {"a": {
        "image": str(tmp_path / "f64.npy"), "labels": str(tmp_path / "lab.npy"),
        "intensity": {"low": 1e12, "high": 1e12 + 1}}}
    (tmp_path / "r64.yaml").write_text(yaml.safe_dump(resolved))
    c, _ = infer((model_files[0], tmp_path / "r64.yaml"), tmp_path, "f64", far)
    d, _ = infer(model_files, tmp_path, "f64base", (far - 1e12).astype(np.float32))
    assert np.array_equal(c, d)


def test_nan_outside_the_mask_predicts_as_black(model_files, tmp_path):
    rng = np.random.default_rng(2)
    image = rng.random(SHAPE).astype(np.float32)
    mask = np.ones(SHAPE, np.uint8)
    mask[:, :, 30:] = 0
    np.save(tmp_path / "mask.npy", mask)
    a, _ = infer(model_files, tmp_path, "nan", np.where(mask == 0, np.nan, image),
                 "--mask", str(tmp_path / "mask.npy"))
    b, _ = infer(model_files, tmp_path, "black", np.where(mask == 0, 0, image),
                 "--mask", str(tmp_path / "mask.npy"))
    assert np.array_equal(a, b) and a[:, :, :, :30].any()


@pytest.mark.parametrize("shape", [(1, 37, 41), (9, 37, 1), (1, 1, 1), (11, 37, 41)])
def test_infer_of_thin_tiny_and_prime_shapes(model_files, tmp_path, shape):
    """Smaller than the patch on some axis (reflect padding) or prime on every axis in
    blocks that do not divide it: the output has the input's shape, and cut in blocks it
    is the same as in one."""
    image = np.random.default_rng(3).random(shape).astype(np.float32)
    whole, _ = infer(model_files, tmp_path, "whole", image)
    assert whole.shape == (3, *shape) and whole.dtype == np.uint8
    if shape == (11, 37, 41):
        blocks, _ = infer(model_files, tmp_path, "blocks", image, "--block", "8", "32", "32")
        assert np.array_equal(blocks, whole)


# ======================================================================== segment --method cc


def cc_reference(affinities: np.ndarray, offsets, above) -> np.ndarray:
    """Union-find over the nearest-neighbour edges whose affinity ``above(value)``."""
    shape = affinities.shape[1:]
    parent = {p: p for p in itertools.product(*map(range, shape))}

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for c, offset in enumerate(offsets):
        for p in parent:
            q = tuple(a + b for a, b in zip(p, offset, strict=True))
            if all(0 <= v < n for v, n in zip(q, shape, strict=True)) and above(
                    affinities[(c, *p)].item()):
                parent[find(p)] = find(q)
    roots = {p: find(p) for p in parent}
    numbers = {r: k for k, r in enumerate(dict.fromkeys(roots.values()), 1)}
    out = np.zeros(shape, np.int64)
    for p, r in roots.items():
        out[p] = numbers[r]
    return out


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = set(zip(a.ravel().tolist(), b.ravel().tolist(), strict=True))
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


def segment(folder: Path, affinities: np.ndarray, offsets, *extra: str) -> np.ndarray:
    store = folder / "affs.zarr"
    if not store.exists():
        write_volume(store, "affinity", affinities, channel_axis=True,
                     attrs={"offsets": [list(o) for o in offsets]}, levels=1)
    out = folder / f"seg{len(list(folder.glob('seg*.zarr')))}.zarr"
    result = runner.invoke(app, ["segment", str(store / "affinity"), str(out), "--method",
                                 "cc", "--levels", "1", *extra])
    assert result.exit_code == 0, result.output
    return open_volume(out / "segmentation").read()


@pytest.mark.parametrize("shape", [(7, 11, 13), (1, 9, 10), (5, 6, 1), (1, 1, 1), (4, 1, 1)])
def test_cc_equals_union_find_in_memory_and_in_blocks(tmp_path, shape):
    rng = np.random.default_rng(sum(shape))
    offsets = NEAREST if shape[0] > 1 else NEAREST[1:]  # z = 1: no z channel needed
    affinities = ((rng.random((len(offsets), *shape)) < 0.35) * 0.9 + 0.05).astype(np.float32)
    want = cc_reference(affinities, offsets, lambda v: v > 0.5)
    for extra in ([], ["--block", "3", "4", "5"]):
        got = segment(tmp_path, affinities, offsets, *extra)
        assert got.dtype == np.uint64 and got.shape == shape
        assert same_partition(got, want)
        ids = np.unique(got).tolist()
        assert ids == list(range(1, len(ids) + 1))  # 1..K, no 0 without a mask


@pytest.mark.parametrize("threshold", ["0.2", "0.5", "0.6", "0.7"])
def test_cc_on_uint8_joins_exactly_the_values_above_the_threshold(tmp_path, threshold):
    """uint8 affinities are v / 255: every value 0..255 once, on its own x edge."""
    affinities = np.zeros((2, 1, 256, 2), np.uint8)
    affinities[1, 0, :, 1] = np.arange(256)
    t = Fraction(threshold)
    want = [Fraction(v, 255) > t for v in range(256)]
    for extra in ([], ["--block", "1", "64", "2"]):
        got = segment(tmp_path, affinities, [(0, -1, 0), (0, 0, -1)], "--threshold", threshold,
                      *extra)[0]
        assert (got[:, 0] == got[:, 1]).tolist() == want


@pytest.mark.parametrize("shape", [(7, 11, 13), (1, 13, 11), (3, 5, 7)])
def test_cc_min_size_blockwise_is_the_in_memory_partition(tmp_path, shape):
    rng = np.random.default_rng(len(shape) + shape[0])
    offsets = NEAREST if shape[0] > 1 else NEAREST[1:]
    affinities = rng.integers(0, 256, (len(offsets), *shape)).astype(np.uint8)
    affinities = np.where(rng.random(affinities.shape) < 0.5, affinities // 8 * 8, affinities)
    for size in ("3", "6"):
        memory = segment(tmp_path, affinities.astype(np.uint8), offsets, "--threshold", "0.6",
                         "--min-size", size)
        blocks = segment(tmp_path, affinities.astype(np.uint8), offsets, "--threshold", "0.6",
                         "--min-size", size, "--block", "2", "4", "3")
        assert same_partition(memory, blocks)
        _, counts = np.unique(memory, return_counts=True)
        assert counts.min() >= int(size)  # every voxel has a neighbour: none stays small


@pytest.mark.parametrize("dtype, needle", [(np.int16, "dtype int16 is not affinities"),
                                           (np.uint16, "dtype uint16 is not affinities")])
def test_segment_refuses_integer_affinities_other_than_uint8(tmp_path, dtype, needle):
    write_volume(tmp_path / "a.zarr", "affinity", np.ones((3, 2, 3, 4), dtype),
                 channel_axis=True, attrs={"offsets": [list(o) for o in NEAREST]}, levels=1)
    result = runner.invoke(app, ["segment", str(tmp_path / "a.zarr/affinity"),
                                 str(tmp_path / "s.zarr"), "--method", "cc"])
    assert_refused(result, needle)


def test_segment_refuses_nan_and_logit_affinities(tmp_path):
    base = np.random.default_rng(0).random((3, 4, 6, 7)).astype(np.float32)
    for name, bad, needle in (("nan", np.where(base < 0.1, np.nan, base), "NaN or infinite"),
                              ("logits", base * 3, "outside [0, 1]")):
        write_volume(tmp_path / f"{name}.zarr", "affinity", bad.astype(np.float32),
                     channel_axis=True, attrs={"offsets": [list(o) for o in NEAREST]},
                     levels=1)
        result = runner.invoke(app, ["segment", str(tmp_path / f"{name}.zarr/affinity"),
                                     str(tmp_path / f"s_{name}.zarr"), "--method", "cc"])
        assert_refused(result, needle)


# ======================================================================== evaluate


def score_reference(seg: np.ndarray, truth: np.ndarray) -> dict:
    """From the contingency table in Python ints (truth 0 not scored), Fractions for Rand,
    conditional entropies in bits for VOI."""
    voxels = [(s, t) for s, t in zip(seg.ravel().tolist(), truth.ravel().tolist(),
                                     strict=True) if t != 0]
    n = len(voxels)
    table, t_size, s_size = Counter(voxels), Counter(t for _, t in voxels), Counter(
        s for s, _ in voxels)
    sum_n2 = sum(c * c for c in table.values())
    sum_t2 = sum(c * c for c in t_size.values())
    sum_s2 = sum(c * c for c in s_size.values())
    voi_split = -math.fsum(c * math.log2(c / t_size[t]) for (_, t), c in table.items()) / n
    voi_merge = -math.fsum(c * math.log2(c / s_size[s]) for (s, _), c in table.items()) / n
    return {"arand": float(1 - Fraction(2 * sum_n2, sum_t2 + sum_s2)),
            "rand_split": float(Fraction(sum_n2, sum_t2)),
            "rand_merge": float(Fraction(sum_n2, sum_s2)),
            "voi_split": voi_split, "voi_merge": voi_merge, "voxels": n,
            "truth_objects": len(t_size), "segments": len(s_size)}


def evaluate(folder: Path, seg: np.ndarray, truth, *extra: str):
    write_volume(folder / "s.zarr", "segmentation", seg, label=True, levels=1, overwrite=True)
    if isinstance(truth, np.ndarray):
        write_volume(folder / "t.zarr", "labels", truth, label=True, levels=1, overwrite=True)
        truth = str(folder / "t.zarr/labels")
    return runner.invoke(app, ["evaluate", str(folder / "s.zarr/segmentation"), truth,
                               "--json", "--min-overlap", "1", *extra])


@pytest.mark.parametrize("shape", [(7, 11, 13), (1, 9, 10), (5, 6, 1)])
def test_evaluate_of_ids_that_differ_only_in_low_bits(tmp_path, shape):
    """Truth ids 2**64 - 1 - k and segment ids 2**53 + k: float64 merges each set into one."""
    rng = np.random.default_rng(sum(shape))
    tk, sk = rng.integers(0, 4, shape), rng.integers(0, 5, shape)
    truth = np.where(tk == 0, 0, np.uint64(TOP) - tk.astype(np.uint64)).astype(np.uint64)
    seg = (np.uint64(2**53) + sk.astype(np.uint64)).astype(np.uint64)
    want = score_reference(seg, truth)
    assert want["truth_objects"] == 3 and want["segments"] == 5
    extras = [[]] + ([["--workers", "2", "--block", "2", "3", "4"]] if shape[0] == 7 else [])
    for extra in extras:
        result = evaluate(tmp_path, seg, truth, *extra)
        assert result.exit_code == 0, result.output
        got = json.loads(result.stdout.strip().splitlines()[-1])
        for key, value in want.items():
            assert got[key] == pytest.approx(value, abs=1e-12, rel=0), (key, extra)


def test_evaluate_of_a_one_voxel_truth_and_negative_ids(tmp_path):
    seg = np.ones((4, 6, 7), np.uint64)
    truth = np.zeros((4, 6, 7), np.int64)
    truth[3, 5, 6] = -(2**63)
    result = evaluate(tmp_path, seg, truth)
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert (got["voxels"], got["truth_objects"], got["segments"], got["arand"]) == (1, 1, 1, 0)
    assert "negative ids" in result.stderr


@pytest.mark.parametrize("truth, needle", [
    (np.zeros((4, 6, 7), np.uint32), "no labelled voxel"),
    (np.ones((4, 6, 7), bool), "dtype bool, not integer ids"),
    (np.ones((4, 6, 7), np.float32), "dtype float32, not integer ids"),
], ids=["all-zero", "bool", "float"])
def test_evaluate_refusals_are_one_line(tmp_path, truth, needle):
    np.save(tmp_path / "t.npy", truth)
    result = evaluate(tmp_path, np.ones((4, 6, 7), np.uint64), str(tmp_path / "t.npy"))
    assert_refused(result, needle)
