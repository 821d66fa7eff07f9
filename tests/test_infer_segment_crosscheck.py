"""Inference and segmentation against independent references written here (numpy, scipy,
brute force on tiny inputs).

Inference runs a network whose output is a known function of its input patch (the input
scaled per channel plus a term that depends on the position inside the patch, so the blend
weights and the lattice matter), and the reference is a whole-volume sliding window written
from the documented rules: patches at ``-(patch - stride) // 2 + k * stride`` until the
volume is covered, reflection about the volume's borders, the bump (or Gaussian) window, the
weighted mean. TTA is checked against the edge semantics of affinities (which transformed
channel and voxel hold the edge p -> p + o), not against ``tta.py``'s own mapping.

Segmentation is checked against union-find connected components, an independent mutex
watershed (Wolf et al.), an independent region graph plus waterz-style agglomeration on the
at-scale fragments, and an independent adapted Rand error for sweeps.

Tests marked xfail(strict=True) show a bug each (the reason says which).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from scipy import ndimage
from test_segment import cells
from typer.testing import CliRunner

from emrun.cli import app
from emrun.geometry import Roi
from emrun.infer.job import finish_job, prepare_job, release_job
from emrun.infer.schedule import run_local, worker_slots
from emrun.io import open_volume, write_volume
from emrun.recipe import Recipe
from emrun.recipe.run import ConnectedComponents, MutexWatershed, Waterz
from emrun.registry import models, segmenters
from emrun.segment import segment_array, segment_into
from emrun.segment.pipeline import segment_values
from emrun.segment.scale.fragments import watershed_fragments
from emrun.segment.sweep import sweep

NEAREST = ((-1, 0, 0), (0, -1, 0), (0, 0, -1))
PATCH = (4, 8, 8)


# ============================================================================ inference


def make_recipe(offsets=NEAREST, patch=PATCH, **infer) -> Recipe:
    return Recipe.model_validate({
        "name": "x", "data": {"sources": {"a": {"type": "synthetic", "shape": [16, 64, 64]}}},
        "model": {"type": "rsunet", "widths": [2, 2]},
        "tasks": {"aff": {"target": {"type": "affinity", "offsets": [list(o) for o in offsets]},
                          "activation": "none"}},
        "train": {"patch": list(patch), "iterations": 1},
        "infer": {"dtype": "float32", "batch_size": 2, "precision": "fp32",
                  "patch": list(patch), **infer},
    })


def position_term(shape) -> np.ndarray:
    z, y, x = (np.arange(n, dtype=np.float64) for n in shape)
    return z[:, None, None] * 0.01 + y[None, :, None] * 0.003 + x[None, None, :] * 0.001


def known_output(x: np.ndarray, channels: int) -> np.ndarray:
    """What `Known` predicts for one patch (numpy, float64)."""
    pos = position_term(x.shape)
    return np.stack([x * (c + 1) / (2 * channels) + pos * (c + 1) for c in range(channels)])


class Known(torch.nn.Module):
    """A network whose output is a known function of its input patch (no weights)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        pos = torch.from_numpy(position_term(x.shape[2:]).astype(np.float32))
        c = self.channels
        return {"aff": torch.cat([x * (k + 1) / (2 * c) + pos * (k + 1) for k in range(c)],
                                 dim=1)}


def known3(recipe: Recipe) -> torch.nn.Module:
    return Known(3)


def known6(recipe: Recipe) -> torch.nn.Module:
    return Known(6)


def reflect(index: np.ndarray, n: int) -> np.ndarray:
    """Indices mirrored about the borders, read off numpy's own reflect padding (not the
    engine's formula); a single voxel repeats."""
    reach = int(np.abs(index).max()) + n + 1
    mirrored = np.pad(np.arange(n), reach, mode="reflect") if n > 1 else np.zeros(
        n + 2 * reach, int)
    return mirrored[index + reach]


def window(patch, blend="bump", sigma=0.125) -> np.ndarray:
    profiles = []
    for n in patch:
        if blend == "bump":
            x = (np.arange(n) + 0.5) / n
            profiles.append(np.exp(-1.0 / (x * (1.0 - x))))
        else:
            x = np.arange(n) + 0.5 - n / 2
            profiles.append(np.exp(-0.5 * (x / (sigma * n)) ** 2))
    w = profiles[0][:, None, None] * profiles[1][None, :, None] * profiles[2][None, None, :]
    return w / w.max()


def sliding_window(volume, patch, stride, per_patch, channels, *, roi=None, blend="bump",
                   scale=(0.0, 255.0)) -> np.ndarray:
    """Whole-volume (or whole-ROI) blended prediction, from the documented rules; raw
    ``scale[0]..scale[1]`` is the network's 0..1."""
    image = (volume.astype(np.float64) - scale[0]) / (scale[1] - scale[0])
    offset, shape = roi or ((0, 0, 0), volume.shape)
    weights = window(patch, blend)
    starts = []
    for a in range(3):
        s = [-((patch[a] - stride[a]) // 2)]
        while s[-1] + patch[a] < shape[a]:
            s.append(s[-1] + stride[a])
        starts.append(s)
    acc = np.zeros((channels, *shape))
    total = np.zeros(shape)
    for start in itertools.product(*starts):
        index = [reflect(np.arange(s, s + p) + o, n)
                 for s, p, o, n in zip(start, patch, offset, volume.shape, strict=True)]
        out = per_patch(image[np.ix_(*index)])
        inside = tuple(slice(max(s, 0), min(s + p, n))
                       for s, p, n in zip(start, patch, shape, strict=True))
        local = tuple(slice(i.start - s, i.stop - s) for i, s in zip(inside, start, strict=True))
        acc[(slice(None), *inside)] += (out * weights)[(slice(None), *local)]
        total[inside] += weights[local]
    return acc / total


def save_checkpoint(recipe: Recipe, path: Path) -> Path:
    torch.manual_seed(0)
    model = models.build(recipe.model, head_channels=recipe.head_channels())
    torch.save({"model": model.state_dict(), "iteration": 1}, path)
    return path


def predict(recipe, tmp, volume_path, out, *, model=known3, **job_args) -> np.ndarray:
    """Run the engine (one worker, in this process) with ``model`` instead of the
    checkpoint's network; returns the level-0 output of task ``aff``."""
    checkpoint = save_checkpoint(recipe, tmp / "c.pt")
    on_block = job_args.pop("on_block", None)
    job = prepare_job(recipe, checkpoint, str(volume_path), out, **job_args)
    try:
        run_local(job, worker_slots("cpu", 1), on_block=on_block, model=model)
        finish_job(job)
    finally:
        release_job(job)
    return zarr.open_array(str(out / "aff" / "0"), mode="r")[...]


def image(shape, seed=0, dtype=np.uint8, top=255) -> np.ndarray:
    return (np.random.default_rng(seed).random(shape) * top).astype(dtype)


CASES = [  # shape, block, infer settings
    ((7, 13, 21), (4, 8, 8), {}),
    ((1, 9, 10), None, {}),  # one section, smaller than a patch in y and x
    ((3, 5, 30), (3, 5, 8), {"stride": [3, 5, 7]}),  # shape no multiple of the stride
    ((2, 19, 3), (1, 7, 3), {"stride": [1, 3, 8], "batch_size": 3}),  # block < patch
    ((5, 11, 12), (5, 11, 12), {"overlap": [0.0, 0.5, 0.5]}),  # one block
]


@pytest.mark.parametrize(("shape", "block", "infer"), CASES)
def test_blockwise_output_equals_an_independent_sliding_window(tmp_path, shape, block, infer):
    recipe = make_recipe(**infer)
    volume = image(shape)
    write_volume(tmp_path / "in.zarr", "image", volume, voxel_size=(40, 4, 4))
    got = predict(recipe, tmp_path, tmp_path / "in.zarr/image", tmp_path / "o.zarr",
                  block=block)
    stride = recipe.infer.resolved_stride(PATCH)
    want = sliding_window(volume, PATCH, stride, lambda x: known_output(x, 3), 3)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_random_layouts_equal_the_sliding_window(tmp_path):
    """Random patch, stride, volume and block sizes (blocks thinner than a stride, volumes
    thinner than a patch) against the reference."""
    rng = np.random.default_rng(5)
    for i in range(6):
        patch = tuple(int(v) for v in rng.integers([1, 2, 2], [6, 10, 10]))
        stride = tuple(int(rng.integers(1, p + 1)) for p in patch)
        shape = tuple(int(v) for v in rng.integers([1, 1, 1], [9, 20, 20]))
        block = tuple(int(rng.integers(min(s, n), n + 3))
                      for s, n in zip(stride, shape, strict=True))
        recipe = make_recipe(patch=patch, stride=list(stride), batch_size=int(rng.integers(1, 4)))
        volume = image(shape, seed=i)
        write_volume(tmp_path / f"in{i}.zarr", "image", volume)
        got = predict(recipe, tmp_path, tmp_path / f"in{i}.zarr/image",
                      tmp_path / f"o{i}.zarr", block=block)
        want = sliding_window(volume, patch, stride, lambda x: known_output(x, 3), 3)
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0,
                                   err_msg=f"{patch} {stride} {shape} {block}")


def test_gaussian_blend_equals_its_formula(tmp_path):
    recipe = make_recipe(blend={"type": "gaussian", "sigma": 0.125})
    volume = image((6, 17, 17))
    write_volume(tmp_path / "in.zarr", "image", volume)
    got = predict(recipe, tmp_path, tmp_path / "in.zarr/image", tmp_path / "o.zarr",
                  block=(6, 9, 9))
    want = sliding_window(volume, PATCH, recipe.infer.resolved_stride(PATCH),
                          lambda x: known_output(x, 3), 3, blend="gaussian")
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("dtype", "low", "high"), [(np.uint16, 0, 65535),
                                                    (np.int16, -32768, 32767),
                                                    (np.float32, 0, 1)])
def test_inputs_are_scaled_by_their_dtype_range(tmp_path, dtype, low, high):
    """A signed image spans its dtype's whole range (its negative half was clipped)."""
    volume = (image((5, 11, 12), dtype=np.float64, top=high - low) + low).astype(dtype)
    write_volume(tmp_path / "in.zarr", "image", volume, label=False)
    got = predict(make_recipe(), tmp_path, tmp_path / "in.zarr/image", tmp_path / "o.zarr",
                  block=(4, 8, 8))
    want = sliding_window(volume, PATCH, make_recipe().infer.resolved_stride(PATCH),
                          lambda x: known_output(x, 3), 3, scale=(low, high))
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_roi_output_and_its_metadata(tmp_path):
    """A ROI of an input that has its own offset: the values are the reference's over the
    ROI with the input around it as context; the output lies at input offset + ROI offset,
    with the input's (anisotropic) voxel size and one named channel per offset."""
    volume = image((8, 20, 22))
    write_volume(tmp_path / "in.zarr", "image", volume, voxel_size=(40, 4, 5), offset=(3, 10, 20))
    roi = Roi((1, 2, 3), (5, 9, 13))
    got = predict(make_recipe(), tmp_path, tmp_path / "in.zarr/image", tmp_path / "o.zarr",
                  block=(4, 8, 8), roi=roi)
    want = sliding_window(volume, PATCH, make_recipe().infer.resolved_stride(PATCH),
                          lambda x: known_output(x, 3), 3, roi=((1, 2, 3), (5, 9, 13)))
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    out = open_volume(str(tmp_path / "o.zarr/aff"))
    assert out.shape == (3, 5, 9, 13)
    assert out.voxel_size[-3:] == (40.0, 4.0, 5.0) and out.offset[-3:] == (4, 12, 23)
    attrs = dict(zarr.open_group(str(tmp_path / "o.zarr/aff"), mode="r").attrs)
    assert attrs["offsets"] == [list(o) for o in NEAREST]
    labels = [c["label"] for c in attrs["ome"]["omero"]["channels"]]
    assert labels == ["aff -1 0 0", "aff 0 -1 0", "aff 0 0 -1"]
    (dataset,) = attrs["ome"]["multiscales"][0]["datasets"][:1]
    transforms = {t["type"]: t[t["type"]] for t in dataset["coordinateTransformations"]}
    assert transforms["scale"] == [1.0, 40.0, 4.0, 5.0]
    assert transforms["translation"] == [0.0, 160.0, 48.0, 115.0]


def test_uint8_and_float16_outputs_are_the_float_output_quantised(tmp_path):
    volume = image((6, 20, 19))
    write_volume(tmp_path / "in.zarr", "image", volume)
    path = tmp_path / "in.zarr/image"
    outs = {dtype: predict(make_recipe(dtype=dtype), tmp_path, path, tmp_path / f"{dtype}.zarr",
                           block=(4, 8, 8)) for dtype in ("float32", "uint8", "float16")}
    value = outs["float32"]
    assert outs["uint8"].dtype == np.uint8 and outs["float16"].dtype == np.float16
    assert value.max() > 0.5  # round(255 p) of p clipped to [0, 1], half to even
    np.testing.assert_array_equal(
        outs["uint8"], np.rint(np.clip(value, 0, 1) * np.float32(255)).astype(np.uint8))
    np.testing.assert_array_equal(outs["float16"], value.astype(np.float16))


def test_resumed_run_equals_the_sliding_window(tmp_path):
    volume = image((8, 16, 16))
    write_volume(tmp_path / "in.zarr", "image", volume)
    recipe, path, out = make_recipe(), tmp_path / "in.zarr/image", tmp_path / "o.zarr"

    class Stop(Exception):
        pass

    def stop_after_three(progress):
        if progress.done == 3:
            raise Stop

    with pytest.raises(Stop):
        predict(recipe, tmp_path, path, out, block=(4, 8, 8), on_block=stop_after_three)
    got = predict(recipe, tmp_path, path, out, block=(4, 8, 8), resume=True)
    want = sliding_window(volume, PATCH, recipe.infer.resolved_stride(PATCH),
                          lambda x: known_output(x, 3), 3)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_masked_blocks_are_zero_and_the_others_unchanged(tmp_path):
    volume = image((6, 16, 16))
    mask = np.zeros(volume.shape, np.uint8)
    mask[0:2, 0:3, 0:3] = 1  # inside block (0, 0, 0) only
    write_volume(tmp_path / "in.zarr", "image", volume)
    write_volume(tmp_path / "in.zarr", "mask", mask, label=True)
    got = predict(make_recipe(), tmp_path, tmp_path / "in.zarr/image", tmp_path / "o.zarr",
                  block=(4, 8, 8), mask_path=str(tmp_path / "in.zarr/labels/mask"))
    want = sliding_window(volume, PATCH, make_recipe().infer.resolved_stride(PATCH),
                          lambda x: known_output(x, 3), 3)
    np.testing.assert_allclose(got[:, :4, :8, :8], want[:, :4, :8, :8], atol=1e-6, rtol=0)
    rest = np.ones(volume.shape, bool)
    rest[:4, :8, :8] = False
    assert not got[:, rest].any()


TTA_OFFSETS = ((-1, 0, 0), (0, -1, 0), (0, 0, -1), (-2, 0, 0), (0, -3, 0), (0, 0, -3))


def _variants(n):
    """(flips z, y, x; transpose) in the documented order."""
    every = [((fz, fy, fx), t) for fz in (False, True) for t in (False, True)
             for fy, fx in ((False, False), (False, True), (True, False), (True, True))]
    return every[:n]


def tta_patch(x: np.ndarray, n: int, how: str) -> np.ndarray:
    """The TTA output of one patch from the affinities' meaning: the edge p -> p + o of the
    original frame is, in a variant's frame, the edge T(p) -> T(p) + L o; the network's
    channel for L o at T(p) holds it, or the channel for -L o at T(p) + L o (missing when
    that voxel is outside the patch)."""
    shape = x.shape
    outs = []
    for flips, transpose in _variants(n):
        def move(v, flips=flips, transpose=transpose):
            v = list(v)
            if transpose:
                v[1], v[2] = v[2], v[1]
            return tuple(v)

        moved = x
        for axis, flip in enumerate(flips):
            if flip:
                moved = np.flip(moved, axis)
        if transpose:
            moved = moved.transpose(0, 2, 1)
        net = known_output(np.ascontiguousarray(moved), len(TTA_OFFSETS))
        result = np.full((len(TTA_OFFSETS), *shape), np.nan)
        for d, o in enumerate(TTA_OFFSETS):
            lo = move(tuple(-v if f else v for v, f in zip(o, flips, strict=True)))
            for p in itertools.product(*map(range, shape)):
                q = move(tuple(n_ - 1 - v if f else v
                               for v, f, n_ in zip(p, flips, shape, strict=True)))
                if lo in TTA_OFFSETS:
                    result[(d, *p)] = net[(TTA_OFFSETS.index(lo), *q)]
                    continue
                c = TTA_OFFSETS.index(tuple(-v for v in lo))
                r = tuple(a + b for a, b in zip(q, lo, strict=True))
                if all(0 <= r[a] < net.shape[1 + a] for a in range(3)):
                    result[(d, *p)] = net[(c, *r)]
        outs.append(result)
    stack = np.stack(outs)
    return np.nanmean(stack, 0) if how == "mean" else np.nanmin(stack, 0)


@pytest.mark.parametrize(("n", "how"), [(2, "mean"), (4, "min"), (8, "mean"), (16, "mean")])
def test_tta_equals_the_brute_force_combination_of_every_variant(tmp_path, n, how):
    recipe = make_recipe(offsets=TTA_OFFSETS, tta=n, tta_reduce={"aff": how})
    volume = image((4, 8, 9))
    write_volume(tmp_path / "in.zarr", "image", volume)
    got = predict(recipe, tmp_path, tmp_path / "in.zarr/image", tmp_path / "o.zarr",
                  block=(4, 8, 8), model=known6)
    want = sliding_window(volume, PATCH, recipe.infer.resolved_stride(PATCH),
                          lambda x: tta_patch(x, n, how), len(TTA_OFFSETS))
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_output_of_a_coarser_level_lies_where_that_level_lies(tmp_path):
    volume = image((4, 32, 32))
    write_volume(tmp_path / "in.zarr", "image", volume, voxel_size=(40, 4, 4), offset=(3, 10, 20),
                 levels=2)
    level = open_volume(str(tmp_path / "in.zarr/image/1"))
    got = predict(make_recipe(), tmp_path, tmp_path / "in.zarr/image/1", tmp_path / "o.zarr",
                  block=(4, 8, 8))
    want = sliding_window(level.read(), PATCH, make_recipe().infer.resolved_stride(PATCH),
                          lambda x: known_output(x, 3), 3)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)  # the values are right

    def placed(group):
        attrs = dict(zarr.open_group(str(group), mode="r").attrs)
        first = attrs["ome"]["multiscales"][0]["datasets"]
        return {d["path"]: {t["type"]: t[t["type"]][-3:] for t in d["coordinateTransformations"]}
                for d in first}

    source = placed(tmp_path / "in.zarr/image")["1"]  # scale 40, 8, 8; translation 120, 42, 82
    output = placed(tmp_path / "o.zarr/aff")["0"]
    assert output["scale"] == source["scale"]
    assert output["translation"] == source["translation"]  # output: 120, 40, 80


# ========================================================================= segmentation


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return pairs.shape[1] == np.unique(a).size == np.unique(b).size


def voxel_edges(shape, offset):
    """Every (v, v + offset) with both inside ``shape``."""
    for v in itertools.product(*map(range, shape)):
        w = tuple(a + b for a, b in zip(v, offset, strict=True))
        if all(0 <= w[a] < shape[a] for a in range(3)):
            yield v, w


class UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i


def union_find_cc(affs, offsets, threshold, mask=None) -> np.ndarray:
    shape = affs.shape[1:]
    sets = UnionFind(int(np.prod(shape)))
    for c, o in enumerate(offsets):
        if sum(map(abs, o)) != 1:
            continue
        for v, w in voxel_edges(shape, o):
            if (mask is None or (mask[v] and mask[w])) and affs[c][v] > threshold:
                sets.parent[sets.find(int(np.ravel_multi_index(v, shape)))] = \
                    sets.find(int(np.ravel_multi_index(w, shape)))
    labels = np.array([sets.find(i) for i in range(int(np.prod(shape)))]).reshape(shape) + 1
    if mask is not None:
        labels[~mask] = 0
    return labels


def mutex_watershed(affs, offsets, bias, mask=None) -> np.ndarray:
    """Wolf et al.: edges by decreasing |weight|; attractive ones join clusters without a
    mutex between them, repulsive ones add a mutex; then each cluster's 6-connected pieces."""
    shape = affs.shape[1:]
    n = int(np.prod(shape))
    edges = []
    for c, o in enumerate(offsets):
        b = 0.5 if sum(map(abs, o)) == 1 else bias
        for v, w in voxel_edges(shape, o):
            if mask is not None and not (mask[v] and mask[w]):
                continue
            weight = float(affs[c][v]) - b
            if weight != 0:
                edges.append((abs(weight), weight > 0, int(np.ravel_multi_index(v, shape)),
                              int(np.ravel_multi_index(w, shape))))
    edges.sort(key=lambda e: -e[0])
    sets = UnionFind(n)
    mutex: list[set[int]] = [set() for _ in range(n)]
    for _, attract, a, b in edges:
        ra, rb = sets.find(a), sets.find(b)
        if ra == rb:
            continue
        if attract:
            if rb in mutex[ra]:
                continue
            sets.parent[rb] = ra
            for m in mutex[rb]:
                mutex[m].discard(rb)
                mutex[m].add(ra)
            mutex[ra] |= mutex[rb]
        else:
            mutex[ra].add(rb)
            mutex[rb].add(ra)
    clusters = np.array([sets.find(i) for i in range(n)]).reshape(shape) + 1
    if mask is not None:
        clusters[~mask] = 0
    out, top = np.zeros(shape, np.int64), 0
    for cluster in np.unique(clusters[clusters != 0]):
        pieces, count = ndimage.label(clusters == cluster)
        out[pieces > 0] = pieces[pieces > 0] + top
        top += count
    return out


def perfect(truth: np.ndarray, offsets=NEAREST) -> np.ndarray:
    """1 where v and v + offset share an id, 0 elsewhere (and where v + offset is outside)."""
    out = np.zeros((len(offsets), *truth.shape), np.float32)
    for c, o in enumerate(offsets):
        for v, w in voxel_edges(truth.shape, o):
            out[(c, *v)] = truth[v] == truth[w]
    return out


def noisy(truth, offsets=NEAREST, sigma=0.15, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    affs = perfect(truth, offsets) * 0.6 + 0.2 + rng.normal(0, sigma, (len(offsets), *truth.shape))
    return np.clip(affs, 0, 1).astype(np.float32)


def connected_pieces(labels: np.ndarray) -> np.ndarray:
    out, top = np.zeros(labels.shape, np.int64), 0
    for i in np.unique(labels[labels != 0]):
        pieces, count = ndimage.label(labels == i)
        out[pieces > 0] = pieces[pieces > 0] + top
        top += count
    return out


CC_OFFSETS = ((-1, 0, 0), (0, -1, 0), (0, 0, -1), (0, 0, 2), (0, -3, 0), (1, 0, 0))


def test_cc_equals_union_find_in_memory_and_blockwise():
    """Random uint8 affinities (positive and long-range offsets too, a mask on half the
    cases): in memory and block by block equal union-find on the thresholded edges."""
    rng = np.random.default_rng(0)
    for case in range(20):
        shape = tuple(int(v) for v in rng.integers(1, 7, 3))
        affs = (rng.random((len(CC_OFFSETS), *shape)) * 255).astype(np.uint8)
        mask = rng.random(shape) > 0.2 if case % 2 else None
        threshold = float(rng.choice([0.3, 0.5, 0.7]))
        segmenter = segmenters.build(ConnectedComponents(threshold=threshold))
        want = union_find_cc(affs.astype(np.float64) / 255, CC_OFFSETS, threshold, mask)
        got = segment_array(affs, CC_OFFSETS, segmenter, mask=mask)
        assert same_partition(got, want), (case, shape)
        assert got.dtype == np.uint64 and np.unique(got[got != 0]).tolist() == \
            list(range(1, int(got.max()) + 1))
        block = tuple(int(rng.integers(1, n + 1)) for n in shape)
        out = np.zeros(shape, np.uint64)
        segment_into(out, affs, CC_OFFSETS, segmenter, mask=mask, block=block)
        assert same_partition(out, want), (case, shape, block)
        assert np.unique(out[out != 0]).tolist() == list(range(1, int(out.max()) + 1))


MWS_OFFSETS = ((-1, 0, 0), (0, -1, 0), (0, 0, -1), (0, -2, 0), (0, 0, -3), (-1, -1, 0))


def test_mws_equals_an_independent_mutex_watershed():
    """Random float affinities (no ties), long-range and diagonal offsets, biases, masks;
    volumes at least as deep as every offset (the next test: thinner ones)."""
    rng = np.random.default_rng(1)
    for case in range(15):
        shape = tuple(int(v) for v in rng.integers([1, 2, 3], [5, 6, 6]))
        affs = rng.random((len(MWS_OFFSETS), *shape)).astype(np.float32)
        bias = float(rng.choice([0.3, 0.5, 0.9]))
        mask = rng.random(shape) > 0.2 if case % 3 == 0 else None
        got = segment_array(affs, MWS_OFFSETS, segmenters.build(MutexWatershed(bias=bias)),
                            mask=mask)
        assert same_partition(got, mutex_watershed(affs, MWS_OFFSETS, bias, mask)), case


def test_mws_on_a_volume_thinner_than_a_long_range_offset():
    offsets = ((-1, 0, 0), (0, -1, 0), (0, 0, -1), (-3, 0, 0))
    affs = np.random.default_rng(0).random((4, 2, 5, 5)).astype(np.float32)
    try:
        got = segment_array(affs, offsets, segmenters.build(MutexWatershed()))
    except BaseException as exc:  # pyo3's PanicException is a BaseException
        raise AssertionError(f"{type(exc).__name__}: {exc}") from None
    # the (-3, 0, 0) channel has no edge here: the nearest neighbours alone decide
    assert same_partition(got, mutex_watershed(affs, offsets, 0.5))


def test_blockwise_mws_keeps_apart_what_a_block_kept_apart():
    """Row 0: A A | C C, row 1: B B | C C (blocks split x). A-B repel (0.05), A-C and B-C
    attract (0.9). The whole volume: A+C and B. Block 0 keeps A and B apart; the stitching
    then joins A-C and B-C, and so A with B."""
    affs = np.ones((3, 1, 2, 4), np.float32)
    affs[1, 0, 1, 0:2] = 0.05
    affs[2, 0, :, 2] = 0.9
    segmenter = segmenters.build(MutexWatershed())
    whole = segment_array(affs, NEAREST, segmenter)
    assert whole[0, 0].tolist() == [1, 1, 1, 1] and whole[0, 1].tolist() == [2, 2, 1, 1]
    out = np.zeros((1, 2, 4), np.uint64)
    segment_into(out, affs, NEAREST, segmenter, block=(1, 2, 2))
    assert out[0, 0, 0] != out[0, 1, 0]  # A and B: apart in the block that holds both


def test_blockwise_cc_with_min_size_equals_in_memory_on_tied_uint8_affinities():
    """(0,0) and (0,1) are single voxels, (1,0)-(1,1) a pair; every edge between the three
    has affinity 0. In memory cc3d numbers them (0,0)=1, pair=2, (0,1)=3, so (0,0) joins
    the pair first and then (0,1) joins too (one segment); blockwise (rows as blocks)
    numbers (0,0)=1, (0,1)=2, pair=3: the singles join each other (two segments)."""
    affs = np.zeros((3, 1, 2, 2), np.uint8)
    affs[2, 0] = [[100, 0], [200, 200]]
    segmenter = segmenters.build(ConnectedComponents(threshold=0.5, min_size=2))
    whole = segment_array(affs, NEAREST, segmenter)
    out = np.zeros((1, 2, 2), np.uint64)
    segment_into(out, affs, NEAREST, segmenter, block=(1, 1, 2))
    assert same_partition(out, whole)


def test_blockwise_cc_with_min_size_equals_in_memory_without_ties():
    rng = np.random.default_rng(6)
    for case in range(20):
        shape = tuple(int(v) for v in rng.integers(1, 7, 3))
        affs = rng.random((3, *shape)).astype(np.float32)
        segmenter = segmenters.build(ConnectedComponents(threshold=0.6,
                                                         min_size=int(rng.integers(2, 6))))
        block = tuple(int(rng.integers(1, n + 1)) for n in shape)
        out = np.zeros(shape, np.uint64)
        segment_into(out, affs, NEAREST, segmenter, block=block)
        assert same_partition(out, segment_array(affs, NEAREST, segmenter)), case


def test_a_uint8_affinity_equal_to_the_threshold_is_not_above_it():
    affs = np.zeros((3, 1, 1, 2), np.uint8)
    segmenter = segmenters.build(ConnectedComponents(threshold=0.6))
    affs[2, 0, 0, 1] = 153  # p = 0.6 exactly: not above 0.6
    assert np.unique(segment_array(affs, NEAREST, segmenter)).size == 2
    for level, threshold in ((51, 0.2), (102, 0.4), (204, 0.8)):
        affs[2, 0, 0, 1] = level  # p = threshold exactly: not above it either
        got = segment_array(affs, NEAREST, segmenters.build(
            ConnectedComponents(threshold=threshold)))
        assert np.unique(got).size == 2, (level, threshold)


def test_waterz_thresholds_in_any_order_equal_one_run_each():
    pytest.importorskip("waterz")
    truth = cells((6, 24, 24), 8, 2)
    affs = noisy(truth, sigma=0.2, seed=1)
    single = {t: segment_array(affs, NEAREST, segmenters.build(Waterz(thresholds=[t],
                                                                      min_size=0)))
              for t in (0.2, 0.5, 0.8)}
    counts = [np.unique(single[t]).size for t in (0.2, 0.5, 0.8)]
    assert counts[0] > counts[1] > counts[2]  # a larger threshold merges more
    segmenter = segmenters.build(Waterz(min_size=0))
    for values in ([0.2, 0.5, 0.8], [0.8, 0.2, 0.5], [0.5, 0.5, 0.2]):
        for got, value in zip(segment_values(affs, NEAREST, segmenter, values), values,
                              strict=True):
            assert same_partition(got, single[value]), (values, value)
    # the same affinities as +1 channels: waterz's layout is made by shifting them
    positive = ((1, 0, 0), (0, 1, 0), (0, 0, 1))
    shifted = np.zeros_like(affs)
    shifted[0, :-1], shifted[1, :, :-1], shifted[2, :, :, :-1] = \
        affs[0, 1:], affs[1, :, 1:], affs[2, :, :, 1:]
    for t in (0.2, 0.5, 0.8):
        got = segment_array(shifted, positive, segmenters.build(Waterz(thresholds=[t],
                                                                       min_size=0)))
        assert same_partition(got, single[t])


def adapted_rand_error(seg: np.ndarray, truth: np.ndarray) -> float:
    """SNEMI3D's: 1 - F-score of pair counts over the voxels with truth != 0."""
    inside = truth != 0
    s, t = seg[inside].astype(np.int64), truth[inside].astype(np.int64)
    _, joint = np.unique(np.stack([s, t]), axis=1, return_counts=True)
    _, a = np.unique(s, return_counts=True)
    _, b = np.unique(t, return_counts=True)
    both = (joint.astype(float) ** 2).sum()
    precision, recall = both / (a.astype(float) ** 2).sum(), both / (b.astype(float) ** 2).sum()
    return 1 - 2 * precision * recall / (precision + recall)


@pytest.mark.parametrize(("spec", "values"), [(ConnectedComponents(min_size=5), [0.3, 0.6, 0.9]),
                                              (MutexWatershed(), [0.1, 0.5, 0.9])])
def test_sweep_scores_and_picks_like_an_independent_adapted_rand(spec, values):
    truth = cells((6, 24, 24), 8, 2)
    affs = np.round(noisy(truth, sigma=0.25, seed=1) * 255).astype(np.uint8)
    truth[:, :3] = 0  # unlabelled: not scored
    result = sweep(affs, NEAREST, spec, values, truth, workers=1)
    mine = [adapted_rand_error(segment_array(affs, NEAREST, segmenters.build(spec)
                                             .with_value(v)), truth) for v in values]
    np.testing.assert_allclose([s["arand"] for s in result.scores], mine, atol=1e-12)
    assert result.best == int(np.argmin(mine))
    assert same_partition(result.segmentation, segment_array(
        affs, NEAREST, segmenters.build(spec).with_value(values[result.best])))


def agglomerate_by_definition(fragments, affs, threshold) -> np.ndarray:
    """The region graph of the fragments (nearest-neighbour edges between different ids,
    summed affinity and count), then waterz's mean agglomeration: the pair of regions with
    the lowest 1 - mean affinity merges while that is below the threshold."""
    total: dict[tuple[int, int], float] = {}
    count: dict[tuple[int, int], int] = {}
    for c, o in enumerate(NEAREST):
        for v, w in voxel_edges(fragments.shape, o):
            a, b = int(fragments[v]), int(fragments[w])
            if a != b:
                key = (min(a, b), max(a, b))
                total[key] = total.get(key, 0.0) + float(affs[c][v])
                count[key] = count.get(key, 0) + 1
    region = {int(i): int(i) for i in np.unique(fragments)}
    while True:
        rt: dict[tuple[int, int], float] = {}
        rc: dict[tuple[int, int], int] = {}
        for (a, b), s in total.items():
            ra, rb = region[a], region[b]
            if ra != rb:
                key = (min(ra, rb), max(ra, rb))
                rt[key] = rt.get(key, 0.0) + s
                rc[key] = rc.get(key, 0) + count[(a, b)]
        if not rt:
            break
        best = min(rt, key=lambda k: 1 - rt[k] / rc[k])
        if 1 - rt[best] / rc[best] >= threshold:
            break
        for node, r in region.items():
            if r == best[1]:
                region[node] = best[0]
    return np.vectorize(lambda i: region[int(i)])(fragments)


def test_at_scale_segmentation_equals_its_definition_on_its_fragments(tmp_path):
    """`--scheduler local`: the segmentation at each threshold is the definition's
    agglomeration of the fragments it wrote; uint64, the affinities' voxel size and
    offset."""
    truth = cells((6, 16, 16), 8, 1)
    affs = np.round(noisy(truth, seed=2) * 255).astype(np.uint8)
    write_volume(tmp_path / "in.zarr", "aff", affs, channel_axis=True, voxel_size=(40, 4, 4),
                 offset=(2, 3, 5), attrs={"offsets": [list(o) for o in NEAREST]})
    out = tmp_path / "o.zarr"
    result = CliRunner().invoke(app, [
        "segment", str(tmp_path / "in.zarr/aff"), str(out), "--scheduler", "local",
        "--workers", "1", "--block", "3", "8", "8", "--threshold", "0.3,0.5", "--min-size", "0"])
    assert result.exit_code == 0, result.output
    fragments = zarr.open_array(str(out / "labels/fragments/0"), mode="r")[...]
    assert np.unique(fragments).size > 16
    for threshold in ("0.3", "0.5"):
        seg = open_volume(str(out / f"labels/segmentation_{threshold}"))
        assert seg.dtype == np.uint64 and seg.voxel_size == (40.0, 4.0, 4.0)
        assert seg.offset == (2, 3, 5)
        want = agglomerate_by_definition(fragments, affs.astype(np.float32) / 255,
                                         float(threshold))
        assert same_partition(seg.read(), want), threshold


def test_in_memory_and_blockwise_outputs_keep_the_affinities_placement(tmp_path):
    truth = cells((4, 16, 16), 5, 1)
    affs = np.round(perfect(truth) * 255).astype(np.uint8)
    write_volume(tmp_path / "in.zarr", "aff", affs, channel_axis=True, voxel_size=(40, 4, 4),
                 offset=(2, 3, 5), attrs={"offsets": [list(o) for o in NEAREST]})
    for name, extra in (("memory", []), ("blocks", ["--block", "2", "8", "8"])):
        result = CliRunner().invoke(app, ["segment", str(tmp_path / "in.zarr/aff"),
                                          str(tmp_path / f"{name}.zarr"), "--method", "cc",
                                          *extra])
        assert result.exit_code == 0, result.output
        seg = open_volume(str(tmp_path / f"{name}.zarr/labels/segmentation"))
        assert seg.dtype == np.uint64 and seg.segmentation
        assert seg.voxel_size == (40.0, 4.0, 4.0) and seg.offset == (2, 3, 5)
        assert same_partition(seg.read(), connected_pieces(truth))


def test_at_scale_fragments_of_a_one_section_volume():
    truth = cells((1, 24, 24), 6, 1)
    affs = perfect(truth)  # the z channel is 0: its partner lies outside the volume
    waterz_in_memory = segment_array(affs, NEAREST, segmenters.build(Waterz(thresholds=[0.5],
                                                                            min_size=0))) \
        if _has_waterz() else connected_pieces(truth)
    assert same_partition(waterz_in_memory, connected_pieces(truth))
    fragments = watershed_fragments(affs, NEAREST)
    # fragments never cross a boundary: each lies inside one piece of the truth
    pairs = np.unique(np.stack([fragments.ravel(), connected_pieces(truth).ravel()]), axis=1)
    assert pairs.shape[1] == np.unique(fragments).size


def _has_waterz() -> bool:
    try:
        import waterz  # noqa: F401
    except ImportError:
        return False
    return True
