"""Probes of where a training sample's targets and masks sit inside its input window, when
what is read (the augmentation-enlarged crop, a validation box smaller than the patch, an
inference patch) is larger or smaller than what is learned or written.

emrun's convention (``emrun.models.facts.output_problem``, the README): a network's outputs
keep its input's size, so a training sample's image, target and mask are one window of the
patch's size; augmentations read a larger crop and crop back (``emrun.data.augment``), a
warp centred on the input's centre; validation pads the image by reflection and masks the
pad out; inference places each patch's output over its own input.

Volumes hold their own coordinates (image z * 4096 + y * 64 + x as uint16; labels blocky
regions, a mask from a coordinate pattern), so a sample's image says exactly which voxels
it took and the references (plain loops over voxels) say what its target and mask must
then be, for odd and even differences between read and patch on every axis.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from emrun.data.augment import Context, Sample
from emrun.data.loader import _validation_sample, tile_corners
from emrun.data.samples import SampleMaker, batch_rng
from emrun.data.sources import open_sources
from emrun.infer.array import predict_array
from emrun.infer.engine import Engine
from emrun.io.write import write_volume
from emrun.recipe import Recipe
from emrun.recipe.augment import Warp
from emrun.registry import augmentations, targets

VOXEL = (30, 6, 6)
SHAPE = (6, 22, 26)
OFFSETS = [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [0, 0, 2], [0, 1, 0]]


def code(shape, start=(0, 0, 0)) -> np.ndarray:
    z, y, x = np.meshgrid(*(np.arange(s, s + n) for s, n in zip(start, shape, strict=True)),
                          indexing="ij")
    return z * 4096 + y * 64 + x


def region_labels(shape) -> np.ndarray:
    """Blocks 2 x 3 x 4 voxels, each its own id; one column of blocks is 0 (unlabelled)."""
    z, y, x = np.indices(shape)
    labels = 1 + (z // 2) * 1000 + (y // 3) * 30 + (x // 4)
    labels[(x // 4) == 2] = 0
    return labels.astype(np.uint32)


def coord_mask(shape) -> np.ndarray:
    z, y, x = np.indices(shape)
    return ((z + y // 2 + x // 3) % 5 != 0).astype(np.uint8)


def store(tmp_path: Path, shape=SHAPE) -> dict:
    path = tmp_path / "v.zarr"
    write_volume(path, "image", code(shape).astype(np.uint16), voxel_size=VOXEL, label=False,
                 offset=(0, 0, 0))
    write_volume(path, "labels", region_labels(shape), voxel_size=VOXEL, offset=(0, 0, 0),
                 label=True)
    write_volume(path, "mask", coord_mask(shape), voxel_size=VOXEL, offset=(0, 0, 0),
                 label=False)
    return {"image": f"{path}/image", "labels": f"{path}/labels", "mask": f"{path}/mask"}


def recipe_of(spec: dict, patch, augment=(), relabel=False) -> Recipe:
    return Recipe.model_validate({
        "name": "t", "seed": 5, "data": {"sources": {"a": spec}, "validation": {"a": spec}},
        "augment": list(augment),
        "model": {"type": "rsunet", "widths": [4, 8]},
        "tasks": {"aff": {"target": {"type": "affinity", "offsets": OFFSETS,
                                     "relabel": relabel}}},
        "train": {"patch": list(patch), "iterations": 1, "batch_size": 1, "workers": 0},
    })


def reference_affinity(labels: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Plain loops: channel c at p counts when p and p + offset are inside the patch, both
    labelled and valid; its target is 1 when counted and of one id."""
    target = np.zeros((len(OFFSETS), *labels.shape), np.uint8)
    mask = np.zeros_like(target)
    for c, offset in enumerate(OFFSETS):
        for p in itertools.product(*(range(n) for n in labels.shape)):
            q = tuple(a + d for a, d in zip(p, offset, strict=True))
            if not all(0 <= a < n for a, n in zip(q, labels.shape, strict=True)):
                continue
            if labels[p] and labels[q] and valid[p] and valid[q]:
                mask[(c, *p)] = 1
                target[(c, *p)] = int(labels[p] == labels[q])
    return target, mask


def decode(image: np.ndarray, source) -> np.ndarray:
    """Source coordinates (z, y, x) per voxel of a normalised coded image, (3, z, y, x)."""
    raw = np.rint(image.astype(np.float64) * (source.high - source.low) + source.low)
    raw = raw.astype(np.int64)
    return np.stack([raw // 4096, raw % 4096 // 64, raw % 64])


# ---------------------------------------------------------------------------------------
# training samples: image, target and mask from one window


@pytest.mark.parametrize("patch", [(3, 5, 7), (4, 6, 8), (2, 9, 4), (1, 7, 6)])
def test_an_unaugmented_sample_takes_target_and_mask_from_the_image_window(tmp_path, patch):
    recipe = recipe_of(store(tmp_path), patch)
    maker = SampleMaker(recipe, keep_memory=False)
    (source,) = maker.sources
    labels, mask = region_labels(SHAPE), coord_mask(SHAPE)
    for index in range(6):
        sample = maker.sample(batch_rng(5, 0, index))
        where = decode(sample["image"][0], source)
        corner = tuple(int(a) for a in where[:, 0, 0, 0])
        window = tuple(slice(c, c + n) for c, n in zip(corner, patch, strict=True))
        assert np.array_equal(where, np.stack(np.indices(patch))
                              + np.array(corner).reshape(3, 1, 1, 1)), corner
        assert np.array_equal(maker.last_labels, labels[window])
        want_target, want_mask = reference_affinity(labels[window], mask[window])
        assert np.array_equal(sample["target"]["aff"], want_target), corner
        assert np.array_equal(sample["mask"]["aff"], want_mask), corner


GEOMETRIC = {
    "flip_rotate": {"type": "flip_rotate"},
    "misalign_step": {"type": "misalign", "displacement": [1, 3], "mode": "step"},
    "misalign_slip": {"type": "misalign", "displacement": [1, 3], "mode": "slip"},
    "lost_section": {"type": "lost_section", "max_sections": 2},
    "all": [{"type": "lost_section", "max_sections": 1},
            {"type": "misalign", "displacement": [1, 2]}, {"type": "flip_rotate"}],
}


@pytest.mark.parametrize("name", GEOMETRIC)
@pytest.mark.parametrize("patch", [(3, 5, 7), (4, 8, 5)])
def test_an_enlarged_read_keeps_target_and_mask_on_the_voxels_the_image_shows(
        tmp_path, name, patch):
    """Augmentations that read more than the patch (odd and even excess per axis) and move
    voxels whole: each output voxel's label and mask are those of the source voxel its image
    shows, and the target and mask are the reference's on them."""
    spec = GEOMETRIC[name]
    augment = spec if isinstance(spec, list) else [spec]
    recipe = recipe_of(store(tmp_path), patch, [{**a, "p": 1.0} for a in augment])
    maker = SampleMaker(recipe, keep_memory=False)
    (source,) = maker.sources
    labels, mask = region_labels(SHAPE), coord_mask(SHAPE)
    read_shapes = set()
    for index in range(10):
        rng = batch_rng(5, 0, index)
        _, in_shape = maker.pipeline.prepare(np.random.default_rng(index), tuple(patch),
                                                 Context(source.voxel_size))
        read_shapes.add(tuple(in_shape))
        sample = maker.sample(rng)
        where = decode(sample["image"][0], source)
        z, y, x = where
        assert ((where >= 0).all() and (z < SHAPE[0]).all() and (y < SHAPE[1]).all()
                and (x < SHAPE[2]).all())
        assert np.array_equal(maker.last_labels, labels[z, y, x]), index
        want_target, want_mask = reference_affinity(labels[z, y, x], mask[z, y, x])
        assert np.array_equal(sample["target"]["aff"], want_target), index
        assert np.array_equal(sample["mask"]["aff"], want_mask), index
    assert any(s != tuple(patch) for s in read_shapes) or name == "flip_rotate"


# ---------------------------------------------------------------------------------------
# a warp's input centre


def warp_positions(spec: Warp, seed: int, out_shape):
    """The input (y, x) each output voxel's image shows (the image ramps along y, then along
    x: bilinear interpolation is exact on them) and the (y, x) of its gathered label."""
    step = augmentations.build(spec).plan(np.random.default_rng(seed), out_shape, Context())
    _, yy, xx = np.indices(step.in_shape)
    labels = (yy * 64 + xx).astype(np.uint64)
    along_y = step.apply(Sample(yy.astype(np.float32) / 64, labels, None, {}))
    along_x = step.apply(Sample(xx.astype(np.float32) / 64, labels, None, {}))
    label = along_y.labels.astype(np.int64)
    return (step.in_shape, along_y.image.astype(np.float64) * 64,
            along_x.image.astype(np.float64) * 64, label // 64, label % 64)


@pytest.mark.parametrize("out_shape", [(2, 16, 16), (2, 15, 20)])
def test_a_warp_without_deformation_maps_voxels_onto_voxels(out_shape):
    """The documented centre crop: each output voxel is one input voxel, the labels the
    same voxel as the image."""
    spec = Warp(rot_max=0, shear_max=0, scale=(1, 1), stretch_max=0)
    in_shape, y, x, ly, lx = warp_positions(spec, 0, out_shape)
    margin = [(i - o) // 2 for i, o in zip(in_shape, out_shape, strict=True)]
    want_y = np.arange(out_shape[1])[:, None] + margin[1]
    want_x = np.arange(out_shape[2])[None, :] + margin[2]
    assert np.allclose(y, want_y, atol=1e-3) and np.allclose(x, want_x, atol=1e-3)
    assert np.array_equal(ly[0], np.broadcast_to(want_y, ly[0].shape))
    assert np.array_equal(lx[0], np.broadcast_to(want_x, lx[0].shape))


@pytest.mark.parametrize("out_shape", [(2, 16, 16), (2, 15, 20)])
def test_a_warp_of_a_hundredth_of_a_degree_is_still_voxels_onto_voxels(out_shape):
    """Continuity: a rotation of at most 0.01 degrees moves no output voxel's source by more
    than 0.01 voxel from a whole voxel (the undeformed warp's), and the labels are then the
    voxel the image shows."""
    spec = Warp(rot_max=0.01, shear_max=0, scale=(1, 1), stretch_max=0)
    for seed in range(4):
        _, y, x, ly, lx = warp_positions(spec, seed, out_shape)
        assert np.abs(y - np.rint(y)).max() < 0.01, seed
        assert np.abs(x - np.rint(x)).max() < 0.01, seed
        assert np.array_equal(ly, np.rint(y)) and np.array_equal(lx, np.rint(x)), seed


# ---------------------------------------------------------------------------------------
# validation: a box smaller than the patch


def brute_tiles(offset, shape, patch):
    axes = []
    for o, b, p in zip(offset, shape, patch, strict=True):
        if b <= p:
            axes.append([o])
            continue
        starts = list(range(o, o + b - p + 1, p))
        if starts[-1] + p < o + b:
            starts.append(o + b - p)
        axes.append(starts)
    return list(itertools.product(*axes))


@pytest.mark.parametrize("patch", [(4, 6, 8), (3, 9, 7), (8, 30, 11)])
def test_validation_tiles_cover_the_box_and_pad_beyond_it_masked_out(tmp_path, patch):
    """Every tile's image is its window (reflected where the box is shorter than the
    patch), its target and mask the reference's on the window's own labels, and the pad
    masked out with no target."""
    spec = {**store(tmp_path), "roi": {"offset": [1, 2, 3], "shape": [5, 17, 19]}}
    recipe = recipe_of(spec, patch)
    (source,) = open_sources(recipe.data.validation)
    box = source.box
    corners = tile_corners(box, patch)
    assert [tuple(c) for c in corners] == brute_tiles(box.offset, box.shape, patch)
    labels, mask = region_labels(SHAPE), coord_mask(SHAPE)
    built = {name: targets.build(task.target) for name, task in recipe.tasks.items()}
    covered = np.zeros(tuple(box.shape), bool)
    for corner in corners:
        sample = _validation_sample(source, corner, patch, recipe, built)
        size = tuple(min(p, b) for p, b in zip(patch, box.shape, strict=True))
        window = tuple(slice(c, c + n) for c, n in zip(corner, size, strict=True))
        covered[tuple(slice(c - o, c - o + n) for c, o, n in zip(corner, box.offset, size,
                                                                  strict=True))] = True
        assert all(c + n <= o + b for c, n, o, b in zip(corner, size, box.offset, box.shape,
                                                         strict=True))
        pad = [(0, p - s) for p, s in zip(patch, size, strict=True)]
        want_image = np.pad(code(size, corner), pad, mode="reflect" if min(size) > 1 else "edge")
        assert np.array_equal(decode(sample["image"][0], source), np.stack(
            [want_image // 4096, want_image % 4096 // 64, want_image % 64]))
        t, m = reference_affinity(labels[window], mask[window])
        assert np.array_equal(sample["target"]["aff"], np.pad(t, [(0, 0), *pad]))
        assert np.array_equal(sample["mask"]["aff"], np.pad(m, [(0, 0), *pad]))
    assert covered.all()


# ---------------------------------------------------------------------------------------
# inference: an output lies over its own input


class Identity(nn.Module):
    """Every output channel is the input: a prediction placed off its input shows."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"aff": x.expand(-1, 3, -1, -1, -1).clone(), "dist": x.clone()}


def infer_recipe(patch, stride) -> Recipe:
    return Recipe.model_validate({
        "name": "probe",
        "data": {"sources": {"a": {"type": "synthetic", "shape": [16, 64, 64]}}},
        "model": {"type": "rsunet", "widths": [4, 8]},
        "tasks": {"aff": {"target": {"type": "affinity"}, "activation": "none"},
                  "dist": {"target": {"type": "distance"}, "activation": "none"}},
        "train": {"patch": [4, 8, 8], "iterations": 1},
        "infer": {"dtype": "float32", "batch_size": 2, "precision": "fp32",
                  "patch": list(patch), "stride": list(stride)},
    })


@pytest.mark.parametrize(("patch", "stride"), [((3, 7, 6), (2, 4, 3)), ((4, 8, 9), (3, 5, 6)),
                                               ((5, 6, 8), (5, 6, 8))])
def test_inference_places_an_identity_network_s_output_over_its_input(patch, stride):
    """Odd and even (patch - stride) per axis, volumes no multiple of either: the blended
    output of a network that returns its input is the input, voxel for voxel."""
    shape = (7, 19, 23)
    image = (code(shape) / 32768).astype(np.float32)  # 0 < values < 1, a unique value each
    image[0, 0, 0] = 0.5 / 32768
    recipe = infer_recipe(patch, stride)
    engine = Engine(recipe, Identity().eval(), torch.device("cpu"))
    out = predict_array(engine, image, (0.0, 1.0))
    for name in ("aff", "dist"):
        for channel in out[name]:
            np.testing.assert_allclose(channel, image, rtol=0, atol=1e-6 * math.sqrt(3))
