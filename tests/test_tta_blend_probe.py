"""Probe of test-time augmentation (`emrun.infer.tta`) and blending windows
(`emrun.infer.blend`) with hand-made stand-in networks whose outputs are known exactly.

An equivariant network (its output on a flipped / y-x transposed input is the flipped /
transposed output, with affinity channels re-mapped and shifted, LSD components mirrored)
must give, under any TTA, the plain output at every voxel, the patch and volume borders
included. A constant network must blend to its constant everywhere, whatever the lattice.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import emrun.infer.blend  # registers the windows
from emrun.data.lsd import local_shape_descriptors
from emrun.errors import UserError
from emrun.infer.array import predict_array
from emrun.infer.engine import Engine
from emrun.infer.tta import Variant, check_offsets, reduce, variants
from emrun.recipe import Recipe
from emrun.recipe.run import Bump, Gaussian
from emrun.registry import blends

NEAREST = [(-1, 0, 0), (0, -1, 0), (0, 0, -1)]
LONG = [*NEAREST, (-2, 0, 0), (0, -3, 0), (0, 0, -3), (0, -9, 0), (0, 0, -9), (-5, 0, 0)]
DIAGONAL = [*NEAREST, (0, -1, -1), (0, -1, 1), (-1, -2, -2), (-1, -2, 2), (-1, 2, -2),
            (-1, 2, 2)]
BORDER = 0.3  # what the affinity stand-in gives where the partner lies outside the patch


def pair(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A symmetric function of a voxel and its partner: f(a, b) == f(b, a)."""
    return a * b + (a + b) / 3


def affinities(x: torch.Tensor, offsets) -> torch.Tensor:
    """(b, 1, z, y, x) -> (b, c, z, y, x): channel c at p is pair(x[p], x[p + o_c]), BORDER
    where p + o_c lies outside."""
    x = x[:, 0]
    shape = x.shape[-3:]
    out = torch.full((x.shape[0], len(offsets), *shape), BORDER, dtype=x.dtype)
    for c, o in enumerate(offsets):
        if any(abs(d) >= n for d, n in zip(o, shape, strict=True)):
            continue
        at_p = tuple(slice(max(0, -d), n - max(0, d)) for d, n in zip(o, shape, strict=True))
        at_q = tuple(slice(max(0, d), n - max(0, -d)) for d, n in zip(o, shape, strict=True))
        out[(slice(None), c, *at_p)] = pair(x[(slice(None), *at_p)], x[(slice(None), *at_q)])
    return out


def boundary(x: torch.Tensor) -> torch.Tensor:
    """A non-affinity channel: the largest difference to a face neighbour (edge repeated),
    equivariant under every flip and transpose."""
    padded = F.pad(x, (1, 1, 1, 1, 1, 1), mode="replicate")
    z, y, w = x.shape[-3:]
    best = torch.zeros_like(x)
    for axis in range(3):
        for step in (0, 2):
            index = [slice(1, 1 + z), slice(1, 1 + y), slice(1, 1 + w)]
            index[axis] = slice(step, step + x.shape[2 + axis])
            best = torch.maximum(best, (padded[(..., *index)] - x).abs())
    return best


def lsd(x: torch.Tensor) -> torch.Tensor:
    """Exact LSDs (factor 1) of labels made from the input: equivariant up to rounding."""
    out = []
    for item in x[:, 0].numpy():
        labels = (np.floor(item * 3).astype(np.int64) + 1)
        out.append(local_shape_descriptors(labels, (2.0, 1.5, 1.5), (1.0, 1.0, 1.0),
                                           dtype=np.float32))
    return torch.from_numpy(np.stack(out)).to(x.dtype)


class Equivariant(nn.Module):
    """aff: affinities of the input; bnd: `boundary`; dist: x squared; lsd: `lsd`."""

    def __init__(self, offsets, tasks=("aff", "bnd", "dist")) -> None:
        super().__init__()
        self.offsets = offsets
        self.tasks = tasks

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"aff": affinities(x, self.offsets), "bnd": boundary(x), "dist": x * x}
        if "lsd" in self.tasks:
            out["lsd"] = lsd(x)
        return {k: v for k, v in out.items() if k in self.tasks}


class Constant(nn.Module):
    def __init__(self, channels: dict[str, int], value: float = 0.625) -> None:
        super().__init__()
        self.channels, self.value = channels, value

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: torch.full((x.shape[0], c, *x.shape[2:]), self.value, dtype=x.dtype)
                for n, c in self.channels.items()}


class NaNs(nn.Module):
    """A diverged network: NaN everywhere."""

    def __init__(self, offsets) -> None:
        super().__init__()
        self.offsets = offsets

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        nan = torch.full_like(x, float("nan"))
        return {"aff": nan.expand(-1, len(self.offsets), -1, -1, -1).clone(), "bnd": nan,
                "dist": nan}


def recipe_of(offsets, patch=(4, 8, 8), *, lsd_task=False, tta_reduce=None, **infer) -> Recipe:
    tasks = {"aff": {"target": {"type": "affinity", "offsets": [list(o) for o in offsets]},
                     "activation": "none"},
             "bnd": {"target": {"type": "boundary"}, "activation": "none"},
             "dist": {"target": {"type": "distance"}, "activation": "none"}}
    if lsd_task:
        tasks["lsd"] = {"target": {"type": "lsd", "sigma": [60.0, 12.0, 12.0]}}
    settings = {"dtype": "float32", "batch_size": 3, "precision": "fp32",
                "patch": list(patch), **infer}
    if tta_reduce:
        settings["tta_reduce"] = tta_reduce
    return Recipe.model_validate({
        "name": "ttaprobe",
        "data": {"sources": {"a": {"type": "synthetic", "shape": [16, 64, 64]}}},
        "model": {"type": "rsunet", "widths": [4, 8]},
        "tasks": tasks,
        "train": {"patch": [8, 16, 16], "iterations": 1},
        "infer": settings,
    })


def image_of(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape).astype(np.float32)


# -- TTA, one patch -----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["mean", "min"])
@pytest.mark.parametrize(("offsets", "n", "shape"), [
    (LONG, 16, (6, 10, 10)),  # (0, +-9) and (-5, 0, 0): borders wider than half the patch
    (DIAGONAL, 16, (5, 7, 7)),  # diagonals: pairs swap and shift along two or three axes
    ([(-1, 0, 0), (0, -2, 0), (0, 0, -1), (-3, 0, 0)], 4, (4, 6, 9)),  # y/x anisotropic
], ids=["long", "diagonal", "anisotropic"])
def test_tta_of_an_equivariant_network_is_its_plain_output_at_every_voxel(
        offsets, n, shape, how):
    """Each variant's inverted affinities equal the plain ones wherever they are not NaN
    (so a wrong channel or shift shows); the reduction gives the plain output everywhere,
    the BORDER value of the partner-less voxels included."""
    check_offsets(offsets, variants(n))
    x = torch.from_numpy(image_of((2, 1, *shape), seed=n))
    plain = affinities(x, offsets)
    backs = []
    for v in variants(n):
        back = v.invert_affinity(affinities(v.apply(x), offsets), offsets)
        known = ~torch.isnan(back)
        torch.testing.assert_close(back[known], plain[known], atol=1e-6, rtol=0,
                                   msg=f"variant {v.name}")
        backs.append(back)
    gaps = torch.stack([v.affinity_gaps(offsets, shape) for v in variants(n)])[:, None]
    out = reduce(torch.stack(backs), how, gaps)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, plain, atol=1e-6, rtol=0)
    assert (plain == BORDER).any()  # the borders were exercised


@pytest.mark.parametrize("v", variants(16), ids=str)
def test_lsd_inverse_of_exact_descriptors_is_exact(v: Variant):
    """The descriptors of the transformed labels, mapped back by `invert_lsd`, are the
    descriptors of the labels (z sigma differs from y/x: z is never swapped)."""
    x = torch.from_numpy(image_of((1, 1, 6, 9, 9), seed=3))
    plain = lsd(x)
    back = v.invert_lsd(lsd(v.apply(x)))
    torch.testing.assert_close(back, plain, atol=2e-6, rtol=0)


def test_no_variant_moves_z_into_y_or_x():
    """Anisotropic EM: z is never exchanged with y or x (only y with x), so a z-coarse
    volume keeps its z axis under every variant."""
    z = torch.arange(5, dtype=torch.float32).view(1, 1, 5, 1, 1).expand(1, 1, 5, 6, 6)
    for v in variants(16):
        seen = v.apply(z)
        want = z.flip(-3) if v.flip[0] else z
        assert torch.equal(seen, want), v.name
        assert v.offset_back((-1, 0, 0)) in ((-1, 0, 0), (1, 0, 0))
        assert v.offset_back((0, -2, 0))[0] == 0 and v.offset_back((0, 0, -2))[0] == 0


# -- TTA through the engine --------------------------------------------------------------


@pytest.mark.parametrize(("tta", "how"), [(2, "mean"), (4, "min"), (8, "mean"), (16, "min")])
def test_engine_tta_of_an_equivariant_multitask_network_equals_no_tta(tta, how):
    """Affinities (long-range and diagonal), a boundary and a distance head, blended over an
    odd-shaped volume: any tta gives what tta 1 gives, at every voxel of every task."""
    offsets = [*NEAREST, (0, -1, -1), (0, -1, 1), (-2, 0, 0), (0, -3, 0), (0, 0, -3)]
    recipe = recipe_of(offsets, stride=(3, 6, 5), tta_reduce={"aff": how})
    image = image_of((5, 11, 13), seed=tta)
    net = Equivariant(offsets)
    plain = predict_array(Engine(recipe, net, torch.device("cpu"), tta=1), image, (0.0, 1.0))
    engine = Engine(recipe, net, torch.device("cpu"), tta=tta)
    assert len(engine.variants) == tta
    got = predict_array(engine, image, (0.0, 1.0))
    assert got.nonfinite == plain.nonfinite == 0
    for task in ("aff", "bnd", "dist"):
        assert np.isfinite(got[task]).all()
        np.testing.assert_allclose(got[task], plain[task], atol=2e-6, rtol=0, err_msg=task)


def test_engine_tta_16_of_exact_lsds_equals_no_tta():
    recipe = recipe_of(NEAREST, (4, 8, 8), lsd_task=True, stride=(3, 6, 6))
    image = image_of((5, 10, 9), seed=7)
    net = Equivariant(NEAREST, tasks=("aff", "bnd", "dist", "lsd"))
    plain = predict_array(Engine(recipe, net, torch.device("cpu"), tta=1), image, (0.0, 1.0))
    got = predict_array(Engine(recipe, net, torch.device("cpu"), tta=16), image, (0.0, 1.0))
    np.testing.assert_allclose(got["lsd"], plain["lsd"], atol=5e-6, rtol=0)
    assert np.abs(plain["lsd"] - 0.5).max() > 0.1  # the descriptors are not trivial


def test_engine_refuses_offsets_a_variant_cannot_map_back():
    """(0, -1, -1) alone: flip-x makes it (0, -1, 1), neither an offset nor a negative."""
    recipe = recipe_of([*NEAREST, (0, -1, -1)])
    with pytest.raises(UserError, match=r"flip-x.*\(0, -1, -1\)"):
        Engine(recipe, Equivariant(NEAREST), torch.device("cpu"), tta=2)
    Engine(recipe, Equivariant(NEAREST), torch.device("cpu"), tta=1)


def test_engine_tta_still_counts_a_diverged_network_s_nan_outputs():
    """tta 1 counts every NaN output (blended as 0; the caller warns). Under tta >= 2 the
    variants' NaNs went through `reduce`, whose NaN means 'no prediction from this variant'
    and whose all-NaN voxels become 0.0: nothing was counted, nothing warned."""
    recipe = recipe_of(NEAREST, stride=(3, 6, 5))
    image = image_of((5, 11, 13), seed=1)
    plain = predict_array(Engine(recipe, NaNs(NEAREST), torch.device("cpu"), tta=1), image,
                          (0.0, 1.0))
    assert plain.nonfinite > 0
    got = predict_array(Engine(recipe, NaNs(NEAREST), torch.device("cpu"), tta=2), image,
                        (0.0, 1.0))
    assert got.nonfinite > 0


# -- blending -----------------------------------------------------------------------------


@pytest.mark.parametrize("blend", [None, {"type": "gaussian", "sigma": 0.05},
                                   {"type": "gaussian", "sigma": 1.0}],
                         ids=["bump", "narrow-gaussian", "wide-gaussian"])
@pytest.mark.parametrize(("shape", "patch", "settings"), [
    ((7, 13, 11), (3, 5, 5), {"overlap": [0, 0, 0]}),  # abutting odd patches
    ((2, 3, 3), (4, 8, 8), {}),  # a patch larger than the volume on every axis
    ((4, 8, 8), (4, 8, 8), {"overlap": [0, 0, 0]}),  # exactly one patch
    ((1, 9, 1), (1, 4, 4), {"stride": [1, 3, 3]}),  # one-voxel axes and a one-voxel patch axis
    ((9, 17, 15), (5, 7, 7), {"stride": [4, 6, 5]}),  # odd sizes, a one-voxel overlap in z
    ((6, 20, 20), (4, 16, 16), {"stride": [1, 1, 15]}),  # heavy overlap: 64 patches a voxel
], ids=["abutting", "patch>volume", "single", "thin", "odd", "dense"])
def test_a_constant_network_blends_to_its_constant_everywhere(shape, patch, settings, blend):
    extra = dict(settings)
    if blend is not None:
        extra["blend"] = blend
    recipe = recipe_of(NEAREST, patch, **extra)
    net = Constant(recipe.head_channels())
    for tta in (1, 4):
        got = predict_array(Engine(recipe, net, torch.device("cpu"), tta=tta),
                            image_of(shape), (0.0, 1.0))
        for task, values in got.items():
            assert values.shape[1:] == shape
            np.testing.assert_allclose(values, 0.625, atol=1e-6, rtol=0,
                                       err_msg=f"{task} tta {tta}")


@pytest.mark.parametrize("patch", [(1, 1, 1), (1, 4, 4), (3, 5, 7), (4, 64, 64), (2, 256, 256)])
@pytest.mark.parametrize("spec", [Bump(), Gaussian(sigma=0.05), Gaussian(sigma=0.5)],
                         ids=["bump", "gaussian-0.05", "gaussian-0.5"])
def test_windows_are_symmetric_positive_and_peak_at_one(patch, spec):
    """Mirror-symmetric along every axis (and in y/x for a square patch), so a patch's
    weights do not depend on how TTA saw it; 1 at the centre, at least FLOOR elsewhere."""
    w = blends.build(spec, patch=patch)
    assert w.shape == patch and w.dtype == np.float32
    assert np.isfinite(w).all() and (w >= np.float32(emrun.infer.blend.FLOOR)).all()
    assert w.max() == 1.0
    centre = tuple(n // 2 for n in patch)
    assert w[centre] == 1.0
    for axes in itertools.chain.from_iterable(itertools.combinations(range(3), k)
                                              for k in (1, 2, 3)):
        assert np.array_equal(np.flip(w, axes), w), axes
    if patch[1] == patch[2]:
        assert np.array_equal(w.swapaxes(1, 2), w)


def test_a_narrow_gaussian_on_an_even_patch_is_still_a_window():
    w = blends.build(Gaussian(sigma=0.01), patch=(2, 8, 8))
    assert np.isfinite(w).all() and w.max() == 1.0
    recipe = recipe_of(NEAREST, (2, 8, 8), blend={"type": "gaussian", "sigma": 0.01})
    got = predict_array(Engine(recipe, Constant(recipe.head_channels()), torch.device("cpu")),
                        image_of((3, 9, 9)), (0.0, 1.0))
    np.testing.assert_allclose(got["dist"], 0.625, atol=1e-6, rtol=0)
