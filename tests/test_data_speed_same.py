"""Training samples are pinned bit for bit: making them faster must not change one of them.

Batch k is a pure function of (seed, rank, k), and a resumed run relies on it; so a speed-up
of the augmentations, the sampler or the targets has to give the very same images, targets and
masks. The hashes below were taken with the code before any such speed-up, on small volumes
made here, for three shipped recipes' augmentation stacks and targets (the demo's; snemi3d_lsd:
the deepem stack, 12 affinities and LSDs, here with a source mask and semantic volumes that no
target reads; multitask: semantic volumes, binary and dilated synapse targets).

Float kernels (numpy's exp/log/sin/cos, torch's grid_sample, scipy's DCT) may round
differently on another CPU family; a canary of those kernels, pinned on the same machine,
tells that apart from a changed sample (the test is then skipped, saying why).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.fft
import torch
import torch.nn.functional as F

from emrun.data.augment import Context, Pipeline
from emrun.data.samples import SampleMaker, batch_rng
from emrun.recipe import Recipe, load_recipe
from emrun.recipe.data import VolumeSource

RECIPES = Path(__file__).resolve().parent.parent / "emrun" / "recipes"

CANARY = "b79c84d24b9ff3dc"
"""The hash of `_canary` on the machine the sample hashes were taken on."""

PINNED = {
    "demo": "c2db70a65f07355f",
    "snemi3d_lsd": "4a92e43ceacb5cbc",  # masked centres; warp parity; cut blocks weighed
    "multitask": "9219de1dbfd852c6",  # warp parity
}
"""Per recipe: one hash over several samples (float32 image, targets, masks) and two packed
batches, made by the code before it was sped up (snemi3d_lsd's pinned again when a masked
source's centres came to be drawn among those a patch fits around: other draws, the same
distribution; both warped stacks again when a warp's read took the output's parity, one
voxel larger in half the draws; snemi3d_lsd's again when the blocks a centres' box cuts, where
few, came to be weighed by their share inside: other draws, the same distribution)."""


def _hash(arrays: list[np.ndarray]) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def _canary() -> str:
    """The float kernels the samples go through, on fixed inputs."""
    x = np.linspace(1e-3, 1.0, 4099, dtype=np.float32)
    angles = np.linspace(-1.0, 1.0, 257)
    rng = np.random.default_rng(5)
    image = torch.from_numpy(rng.random((2, 1, 9, 11), dtype=np.float32))
    grid = torch.from_numpy(rng.uniform(-1, 1, (2, 7, 5, 2)).astype(np.float32))
    sampled = F.grid_sample(image, grid, mode="bilinear", padding_mode="border",
                            align_corners=True).numpy()
    coef = scipy.fft.dctn(rng.random((3, 16, 12), dtype=np.float32), type=2, axes=(1, 2))
    return _hash([np.exp(x), np.log(x), np.sin(angles), np.cos(angles), np.sin(x),
                  np.cos(x), sampled, coef, scipy.fft.idctn(coef, type=2, axes=(1, 2))])


def _cells(shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 image and uint32 labels: blocky cells of random ids (repeats included, so a
    relabelling splits some), 0-labelled membranes between them, a noisy image."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    coarse = rng.integers(1, 60, (nz // 2 + 1, ny // 11 + 1, nx // 9 + 1), dtype=np.uint32)
    labels = coarse.repeat(2, 0).repeat(11, 1).repeat(9, 2)[:nz, :ny, :nx].copy()
    for z, shift in enumerate(rng.integers(-4, 5, nz).tolist()):  # cells move along z
        labels[z] = np.roll(labels[z], shift, axis=0)
    edge = np.zeros(shape, bool)
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[:, :, 1:] |= labels[:, :, 1:] != labels[:, :, :-1]
    labels[edge] = 0
    image = 180 + 40 * rng.random(shape) - 140 * edge
    return np.clip(image, 0, 255).astype(np.uint8), labels


def _recipe(tmp_path: Path, name: str, patch: tuple[int, int, int], *, mask: bool = False,
            semantic: bool = False) -> Recipe:
    """A shipped recipe with its sources replaced by two volumes made here, and ``patch``."""
    recipe = load_recipe(RECIPES / f"{name}.yaml").recipe
    recipe = recipe.model_copy(update={"train": recipe.train.model_copy(
        update={"patch": patch})})
    need = Pipeline(recipe.augment).largest_input(patch, None)
    shape = (need[0] + 4, need[1] + 24, need[2] + 24)
    sources = {}
    for i in range(2):
        image, labels = _cells(shape, seed=10 + i)
        paths: dict[str, Any] = {}
        for key, array in (("image", image), ("labels", labels)):
            paths[key] = str(tmp_path / f"{name}_{i}_{key}.npy")
            np.save(paths[key], array)
        if mask:
            valid = np.ones(shape, np.uint8)
            valid[:, : shape[1] // 3, : shape[2] // 2] = 0
            paths["mask"] = str(tmp_path / f"{name}_{i}_mask.npy")
            np.save(paths["mask"], valid)
        if semantic:
            paths["semantic"] = {}
            for key, array in (("mito", (labels % 7 == 3) * labels),
                               ("synapse", (image < 60).astype(np.uint8))):
                paths["semantic"][key] = str(tmp_path / f"{name}_{i}_{key}.npy")
                np.save(paths["semantic"][key], array)
        sources[f"s{i}"] = VolumeSource(voxel_size=(30.0, 6.0, 6.0), weight=1.0 + i, **paths)
    data = recipe.data.model_copy(update={"sources": sources, "validation": {}})
    return recipe.model_copy(update={"data": data})


def _samples_hash(recipe: Recipe, samples: int) -> str:
    """One hash over ``samples`` samples (image, every target and mask) and two batches."""
    maker = SampleMaker(recipe)
    arrays = []
    for index in range(samples):
        made = maker.sample(batch_rng(recipe.seed, 0, index))
        arrays.append(made["image"])
        for task in sorted(made["target"]):
            arrays += [made["target"][task], made["mask"][task]]
    for rank, index in ((0, 7), (1, 2)):
        batch = maker.batch(recipe.seed, rank, index)
        arrays.append(batch["image"])
        for part in ("target", "mask"):
            arrays += [batch[part][task] for task in sorted(batch[part])]
    return _hash(arrays)


CASES = {
    "demo": ({"patch": (12, 64, 64)}, 10),
    "snemi3d_lsd": ({"patch": (12, 72, 80), "mask": True, "semantic": True}, 8),
    "multitask": ({"patch": (10, 64, 56), "semantic": True}, 8),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_samples_are_bit_for_bit_those_made_before_the_speed_up(tmp_path, name):
    if _canary() != CANARY:
        pytest.skip("this machine's float kernels round unlike those the hashes were pinned "
                    "on: rerun the pins' maker (the code before a speed-up) here to compare")
    options, samples = CASES[name]
    recipe = _recipe(tmp_path, name, **options)
    assert _samples_hash(recipe, samples) == PINNED[name]


def test_the_pins_see_a_changed_voxel(tmp_path, monkeypatch):
    """The hash covers the targets: one affinity voxel flipped in one sample changes it."""
    recipe = _recipe(tmp_path, "demo", (12, 64, 64))
    before = _samples_hash(recipe, 2)
    real = SampleMaker.sample
    calls = []

    def flipped(self: SampleMaker, rng: np.random.Generator) -> dict[str, Any]:
        made = real(self, rng)
        calls.append(1)
        if len(calls) == 2:
            made["target"]["affinity"][0, 0, 0, 0] ^= 1
        return made

    monkeypatch.setattr(SampleMaker, "sample", flipped)
    assert _samples_hash(recipe, 2) != before


# ----------------------------------------------------------------------------------------------
# The faster ways against the plain ones they replace, on any platform


def _plain_affinity(labels: np.ndarray, valid: np.ndarray | None, offsets, zero: str
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Affinities as the documented rule says, one 3-d slice pair per channel."""
    labelled = labels != 0
    usable = labelled.copy() if zero == "mask" else np.ones(labels.shape, bool)
    if valid is not None:
        usable &= valid.astype(bool)
    target = np.zeros((len(offsets), *labels.shape), np.uint8)
    mask = np.zeros_like(target)
    for c, offset in enumerate(offsets):
        if any(abs(d) >= n for d, n in zip(offset, labels.shape, strict=True)):
            continue
        here = tuple(slice(max(0, -d), n - max(0, d)) for d, n in zip(offset, labels.shape,
                                                                       strict=True))
        there = tuple(slice(s.start + d, s.stop + d) for s, d in zip(here, offset, strict=True))
        counted = usable[here] & usable[there]
        same = counted & (labels[here] == labels[there])
        if zero == "boundary":
            same &= labelled[here]
        target[c][here], mask[c][here] = same, counted
    return target, mask


@pytest.mark.parametrize("zero", ["mask", "boundary"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_flat_affinities_are_the_sliced_ones(zero, with_mask):
    """Computed flat, pairs that wrap into the next row or section get values: every one
    of them must end up 0 (positive, negative, long and out-of-patch offsets)."""
    from emrun.data.targets import Affinity, Patch

    rng = np.random.default_rng(4)
    labels = rng.integers(0, 4, (5, 13, 11)).astype(np.uint64) * np.uint64(2**40)
    valid = (rng.random(labels.shape) < 0.8).astype(np.uint8) if with_mask else None
    offsets = ((-1, 0, 0), (0, -1, 0), (0, 0, -1), (0, 0, 3), (2, -3, 4), (0, 0, -10),
               (0, 12, 0), (5, 0, 0), (0, 0, 11), (-1, 1, -1))
    made = Affinity(offsets, relabel=False, zero=zero)(Patch(labels, valid))
    want = _plain_affinity(labels, valid, offsets, zero)
    assert made[0].dtype == made[1].dtype == np.uint8
    np.testing.assert_array_equal(made[0], want[0])
    np.testing.assert_array_equal(made[1], want[1])
    assert made[1].any() and made[0].any()


def test_a_warp_maps_all_sections_at_once_as_section_by_section():
    """Without a twist the sections are sampled as channels of one image: the same values
    as sampling each section on its own, bit for bit; with a twist, each its own map."""
    from emrun.data.augment.geometric import WarpAugment
    from emrun.recipe.augment import Warp

    rng = np.random.default_rng(8)
    for twist in (0.0, 20.0):
        step = WarpAugment(Warp(type="warp", rot_max=40.0, twist_max=twist)).plan(
            rng, (6, 40, 52), Context())
        warp = step.apply
        image = rng.random(step.in_shape, dtype=np.float32)
        in_h, in_w = warp.in_yx
        norm = np.array([[2 / (in_w - 1)], [2 / (in_h - 1)]])
        u, v = warp.base()
        matrices = np.broadcast_to(warp.matrices, (6, 2, 2))
        grid = np.stack([np.stack([u, v], -1) @ (m * norm).T.astype(np.float32)
                         for m in matrices]).astype(np.float32).reshape(6, 40, 52, 2)
        want = F.grid_sample(torch.from_numpy(image)[:, None], torch.from_numpy(grid),
                             mode="bilinear", padding_mode="border", align_corners=True)
        assert len(warp.matrices) == (1 if twist == 0 else 6)
        np.testing.assert_array_equal(warp.image(image), want.numpy()[:, 0])


def test_half_rounds_as_numpy_does():
    """float32 in [0, 1] to float16 bit by bit: numpy's bits (ties to even, subnormals,
    -0); other values, and another dtype (float64: rounded once, not twice through float32),
    by numpy."""
    from emrun.data.samples import half

    bits = np.random.default_rng(2).integers(0, 2**32, 2**18, dtype=np.uint64)
    values = bits.astype(np.uint32).view(np.float32)
    values = values[np.isfinite(values)]
    ties = (np.arange(1, 2**11, dtype=np.float32) + np.float32(0.5)) * np.float32(2**-11)
    unit = np.random.default_rng(3).integers(0, 0x3F800001, 2**18).astype(np.uint32).view(
        np.float32)  # any float32 in [0, 1]: the fast way's range
    special = np.array([0.0, -0.0, 1.0, 2**-24, 2**-25, 3 * 2**-26, 65504, 65520, np.inf],
                       np.float32)
    for array in (values, unit, -unit, ties, special, special[:6], np.array([-0.0], np.float32),
                  np.linspace(0, 1, 7917, dtype=np.float32).reshape(7, 1131)[:, ::3]):
        with np.errstate(over="ignore"):
            want = array.astype(np.float16)
        np.testing.assert_array_equal(half(array).view(np.uint16), want.view(np.uint16))
    twice = np.array([1 + 2**-11 + 2**-40], np.float64)  # float32 drops the 2**-40: a tie
    assert half(twice)[0] == twice.astype(np.float16)[0] != twice.astype(np.float32).astype(
        np.float16)[0]
    read_only = np.linspace(0, 1, 11, dtype=np.float32)
    read_only.flags.writeable = False
    np.testing.assert_array_equal(half(read_only), read_only.astype(np.float16))


@pytest.mark.parametrize("factor", [(1, 1, 1), (1, 4, 4), (2, 3, 5)])
@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_lsd_channels_are_spread_as_the_tables_say(factor, dtype):
    """Each voxel's channels: offsets from the axis tables at its place in its block, the
    other seven from its pair's row of the plain table."""
    from emrun.data.lsd import _spread

    rng = np.random.default_rng(6)
    pairs, shape = 50, (4, 9, 11)
    index = rng.integers(0, pairs, shape).astype(np.int32)
    plain = rng.integers(0, 9999, (pairs, 7)).astype(dtype)
    tables = [rng.integers(0, 9999, pairs * f).astype(dtype) for f in factor]
    out = np.empty((10, *shape), dtype)
    _spread(index, plain, *tables, *factor, out)
    place = np.indices(shape)
    for axis, (table, f) in enumerate(zip(tables, factor, strict=True)):
        np.testing.assert_array_equal(out[axis], table[index * f + place[axis] % f])
    np.testing.assert_array_equal(out[3:], np.moveaxis(plain[index], -1, 0))


def test_a_batch_of_one_is_the_sample_with_a_batch_axis():
    from emrun.data.samples import stack

    sample = {"image": np.arange(6, dtype=np.float16).reshape(1, 2, 3),
              "target": {"a": np.ones((2, 2, 3), np.uint8)}, "x": np.asarray(3)}
    for samples in ([sample], [sample, sample]):
        made, want = stack(samples), {
            "image": np.stack([s["image"] for s in samples]),
            "target": {"a": np.stack([s["target"]["a"] for s in samples])},
            "x": np.stack([s["x"] for s in samples])}
        for got, expected in ((made["image"], want["image"]), (made["x"], want["x"]),
                              (made["target"]["a"], want["target"]["a"])):
            assert got.shape == expected.shape and got.dtype == expected.dtype
            assert got.flags.c_contiguous
            np.testing.assert_array_equal(got, expected)


def test_only_the_semantic_volumes_a_built_in_stack_uses_are_read(tmp_path):
    """An affinity recipe reads no semantic volume, a multitask one those its targets name;
    a plugin's target or augmentation may read any, so then all are."""
    from emrun.data.augment import Augmentation
    from emrun.data.samples import semantic_read

    plain = SampleMaker(_recipe(tmp_path, "snemi3d_lsd", (12, 72, 80), semantic=True))
    assert plain.semantic == frozenset()
    crop = plain.sampler.draw(np.random.default_rng(0), (12, 72, 80), (12, 72, 80),
                              plain.sources[0], plain.semantic)
    assert crop.semantic == {} and crop.labels is not None
    many = SampleMaker(_recipe(tmp_path, "multitask", (10, 64, 56), semantic=True))
    assert many.semantic == frozenset({"mito", "synapse"})

    class Plugin:
        channels = 1

    assert semantic_read(plain.pipeline, [*plain.targets.values(), Plugin()]) is None

    class Theirs(Augmentation):
        def plan(self, rng, out_shape, context):  # pragma: no cover - never planned
            raise AssertionError

    inner = plain.pipeline.augmentations[0]  # deepem's one_of: a member of theirs is found
    inner.alternatives.append(Theirs(inner.spec))
    assert semantic_read(plain.pipeline, plain.targets.values()) is None


def test_glibc_keeps_freed_sample_memory():
    """Where the libc is glibc, the setting is taken (else every sample's arrays are fresh
    pages again, zeroed by the kernel on first touch)."""
    import platform

    from emrun.data.memory import keep_freed_memory

    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is glibc
