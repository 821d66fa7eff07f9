"""Probes of blockwise inference against an independent sliding window written here.

The networks are stand-ins with known outputs: a pointwise one (the blend of f(x) must be
f(x) everywhere), and one that depends on the voxel's place in the patch and on its
neighbour (so the blend, the lattice, the reflection at the borders and the test-time
augmentation each change the numbers). The reference pads with numpy's 'reflect' and loops
over the lattice itself; it shares only the lattice's origin rule with the engine.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch import nn

from emrun.errors import UserError
from emrun.geometry import Roi
from emrun.infer import schedule
from emrun.infer.array import predict_array
from emrun.infer.engine import Engine
from emrun.infer.job import finish_job, prepare_job, release_job
from emrun.infer.schedule import run_local
from emrun.io import open_volume
from emrun.io.write import write_volume
from emrun.recipe import Recipe
from emrun.registry import blends, models

OFFSETS = [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]


def probe_recipe(patch=(4, 8, 8), *, stride=None, overlap=None, blend=None,
                 **infer) -> Recipe:
    """Two tasks whose activation is the identity: affinities (3 channels) and a distance."""
    settings = {"dtype": "float32", "batch_size": 3, "precision": "fp32",
                "patch": list(patch), **infer}
    if stride is not None:
        settings["stride"] = list(stride)
    if overlap is not None:
        settings["overlap"] = list(overlap)
    if blend is not None:
        settings["blend"] = blend
    return Recipe.model_validate({
        "name": "probe",
        "data": {"sources": {"a": {"type": "synthetic", "shape": [16, 64, 64]}}},
        "model": {"type": "rsunet", "widths": [4, 8]},
        "tasks": {"aff": {"target": {"type": "affinity", "offsets": OFFSETS},
                          "activation": "none"},
                  "dist": {"target": {"type": "distance"}, "activation": "none"}},
        "train": {"patch": [4, 8, 8], "iterations": 1},
        "infer": settings,
    })


class Pointwise(nn.Module):
    """aff = x + c / 10 per channel c, dist = 1.5 x - 0.25: functions of the voxel alone."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        shift = torch.arange(3, dtype=x.dtype).view(1, 3, 1, 1, 1) / 10
        return {"aff": x + shift, "dist": 1.5 * x - 0.25}


class Lopsided(nn.Module):
    """Neither pointwise nor symmetric: each output reads the voxel's +x neighbour (edge
    repeated) and adds a ramp over the voxel's place in the patch, different per channel."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z, y, w = x.shape[-3:]
        grid = torch.meshgrid(*(torch.arange(n, dtype=x.dtype) for n in (z, y, w)),
                              indexing="ij")
        ramp = 0.01 * grid[0] + 0.02 * grid[1] + 0.003 * grid[2] ** 2
        shifted = torch.cat([x[..., 1:], x[..., -1:]], dim=-1)
        aff = torch.cat([shifted + ramp * (c + 1) + c for c in range(3)], dim=1)
        return {"aff": aff, "dist": 2 * shifted - ramp}


def make_network(recipe: Recipe) -> nn.Module:
    """The job's stand-in network (a module-level factory, as `run_local` wants)."""
    return Lopsided()


def make_pointwise(recipe: Recipe) -> nn.Module:
    return Pointwise()


def sliding_window(image: np.ndarray, network: nn.Module, patch, stride, window,
                   offset=(0, 0, 0), shape=None, transforms=None, reduce="mean"
                   ) -> dict[str, np.ndarray]:
    """The blended outputs over the box ``offset``, ``shape`` of ``image`` (values already in
    [0, 1]), the context reflected about the image's borders; ``transforms``: the TTA
    variants as (flip axes, transpose), each network output mapped back by hand."""
    shape = tuple(shape or image.shape)
    starts = lattice(shape, patch, stride)
    low = [a[0] + o for a, o in zip(starts, offset, strict=True)]
    high = [a[-1] + p + o for a, p, o in zip(starts, patch, offset, strict=True)]
    pads = [(max(0, -lo), max(0, hi - n)) for lo, hi, n in zip(low, high, image.shape,
                                                               strict=True)]
    padded = np.pad(image.astype(np.float64), pads, mode="reflect")
    base = [lo + before for lo, (before, _) in zip(low, pads, strict=True)]
    sums: dict[str, np.ndarray] = {}
    weight = np.zeros(shape)
    for start in itertools.product(*starts):
        cut = padded[tuple(slice(s - starts[a][0] + base[a], s - starts[a][0] + base[a] + p)
                           for a, (s, p) in enumerate(zip(start, patch, strict=True)))]
        outputs = predict_patch(network, cut, transforms, reduce)
        inside = [slice(max(0, -s), min(p, n - s))
                  for s, p, n in zip(start, patch, shape, strict=True)]
        target = tuple(slice(s + i.start, s + i.stop) for s, i in zip(start, inside,
                                                                      strict=True))
        for name, out in outputs.items():
            total = sums.setdefault(name, np.zeros((out.shape[0], *shape)))
            total[(slice(None), *target)] += (out * window)[(slice(None), *inside)]
        weight[target] += window[tuple(inside)]
    return {name: total / weight for name, total in sums.items()}


def lattice(shape, patch, stride) -> list[list[int]]:
    """Patch starts per axis: from -((patch - stride) // 2) in steps of the stride until the
    axis is covered."""
    starts = []
    for p, s, n in zip(patch, stride, shape, strict=True):
        axis = [-((p - s) // 2)]
        while axis[-1] + p < n:
            axis.append(axis[-1] + s)
        starts.append(axis)
    return starts


def predict_patch(network: nn.Module, cut: np.ndarray, transforms, reduce: str
                  ) -> dict[str, np.ndarray]:
    """The network's outputs for one patch, averaged (or minimised) over ``transforms``."""
    def run(array: np.ndarray) -> dict[str, np.ndarray]:
        tensor = torch.from_numpy(np.ascontiguousarray(array, np.float32))[None, None]
        with torch.no_grad():
            return {k: v[0].double().numpy() for k, v in network(tensor).items()}

    if transforms is None:
        return run(cut)
    stacks: dict[str, list[np.ndarray]] = {}
    for flips, transpose in transforms:
        seen = np.flip(cut, [a - 3 for a in flips]) if flips else cut
        seen = seen.swapaxes(-1, -2) if transpose else seen
        for name, out in run(seen).items():
            back = out.swapaxes(-1, -2) if transpose else out
            back = np.flip(back, [a - 3 for a in flips]) if flips else back
            if name == "aff":
                back = affinities_back(back, flips, transpose)
            stacks.setdefault(name, []).append(back)
    pick = np.nanmean if reduce == "mean" else np.nanmin
    return {name: pick(np.stack(s), axis=0) for name, s in stacks.items()}


def affinities_back(out: np.ndarray, flips, transpose) -> np.ndarray:
    """Affinities of a flipped/transposed patch, already flipped back: channel ``c`` then
    links each voxel to its neighbour at the flipped (and swapped) offset; where that is
    the opposite of a task offset ``o`` the value belongs to the neighbour at ``o``
    (NaN where the neighbour lies outside the patch)."""
    result = np.full_like(out, np.nan)
    for c, offset in enumerate(OFFSETS):
        moved = [offset[0], offset[2], offset[1]] if transpose else list(offset)
        moved = [-v if a in flips else v for a, v in enumerate(moved)]
        d = next(i for i, o in enumerate(OFFSETS) if [abs(v) for v in o] ==
                 [abs(v) for v in moved])
        if moved == OFFSETS[d]:
            result[d] = out[c]
            continue
        axis = next(a for a in range(3) if OFFSETS[d][a])  # a unit step back along it
        src = [slice(None)] * 3
        dst = [slice(None)] * 3
        src[axis], dst[axis] = slice(0, -1), slice(1, None)
        result[(d, *dst)] = out[(c, *src)]
    return result


def window_of(recipe: Recipe) -> np.ndarray:
    return blends.build(recipe.infer.blend, patch=recipe.infer_patch()).astype(np.float64)


def checkpoint(recipe: Recipe, folder: Path) -> Path:
    """Weights the recipe's model accepts (the job checks them; the stand-in predicts)."""
    model = models.build(recipe.model, head_channels=recipe.head_channels())
    path = folder / "c.pt"
    torch.save({"model": model.state_dict(), "iteration": 1}, path)
    return path


def run_job(recipe: Recipe, folder: Path, source: str, output: Path, factory=make_network,
            **options):
    """A whole inference job with one in-process worker and the stand-in network."""
    job = prepare_job(recipe, checkpoint(recipe, folder), source, output, **options)
    try:
        progress = run_local(job, [("cpu", 1)], model=factory)
        finish_job(job)
    finally:
        release_job(job)
    return progress


def read(output: Path, task: str) -> np.ndarray:
    return zarr.open_array(str(output / task / "0"), mode="r")[...]


# shape, patch, stride: odd shapes, a volume smaller than the patch, one-voxel axes,
# anisotropic patches, strides that divide nothing, a one-voxel patch, stride 1.
GRIDS = [
    ((5, 7, 9), (4, 6, 6), (3, 4, 4)),
    ((1, 13, 1), (4, 6, 6), (3, 5, 5)),
    ((2, 3, 3), (4, 8, 8), (2, 4, 4)),
    ((9, 20, 17), (3, 7, 5), (2, 3, 4)),
    ((3, 4, 5), (1, 1, 1), (1, 1, 1)),
    ((6, 7, 8), (4, 4, 4), (1, 2, 3)),
]


@pytest.mark.parametrize(("shape", "patch", "stride"), GRIDS)
def test_the_blend_matches_an_independent_sliding_window(shape, patch, stride):
    recipe = probe_recipe(patch, stride=stride)
    image = np.random.default_rng(1).random(shape).astype(np.float32)
    engine = Engine(recipe, Lopsided(), torch.device("cpu"))
    got = predict_array(engine, image, (0.0, 1.0))
    want = sliding_window(image, Lopsided(), patch, stride, window_of(recipe))
    for task in ("aff", "dist"):
        np.testing.assert_allclose(got[task], want[task], atol=2e-6, rtol=0)
    pointwise = predict_array(Engine(recipe, Pointwise(), torch.device("cpu")), image,
                              (0.0, 1.0))
    np.testing.assert_allclose(pointwise["dist"][0], 1.5 * image - 0.25, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("patch", "settings"), [
    ((4, 64, 64), {"overlap": (0, 0, 0)}),  # abutting patches: edge voxels count alone
    ((6, 64, 64), {"stride": (5, 63, 63)}),  # a one-voxel overlap
    ((4, 16, 16), {"blend": {"type": "gaussian", "sigma": 0.03}}),
])
def test_windows_too_small_for_float32_at_their_edges_still_blend(patch, settings):
    """The bump at a 64-voxel patch's edge is e^-128 of its centre: 0 in float32. Voxels
    that only patch edges cover got a total weight of 0 and the output NaN there (and
    whatever uint8 makes of NaN)."""
    recipe = probe_recipe(patch, **settings)
    window = blends.build(recipe.infer.blend, patch=patch)
    assert window.dtype == np.float32 and (window > 0).all()
    image = np.random.default_rng(2).random((9, 70, 70)).astype(np.float32)
    got = predict_array(Engine(recipe, Pointwise(), torch.device("cpu")), image, (0.0, 1.0))
    assert np.isfinite(got["dist"]).all()
    np.testing.assert_allclose(got["dist"][0], 1.5 * image - 0.25, atol=1e-6, rtol=0)


@pytest.fixture
def volume(tmp_path):
    """A random float image in [0, 1] placed at offset (1, 2, 3) voxels of 30x6x6 nm."""
    image = np.random.default_rng(3).random((7, 19, 23)).astype(np.float32)
    write_volume(tmp_path / "in.zarr", "image", image, voxel_size=(30, 6, 6),
                 offset=(1, 2, 3))
    return image, tmp_path


@pytest.mark.parametrize(("block", "chunks"), [((4, 6, 10), (2, 3, 5)), ((3, 19, 7), None),
                                               ((7, 19, 23), (7, 1, 23))])
def test_a_blockwise_job_writes_the_reference_for_any_block_and_chunks(volume, block, chunks):
    """Blocks smaller than the patch and unaligned with the stride, chunks smaller than the
    block; the output carries the input's voxel size and place."""
    image, tmp = volume
    recipe = probe_recipe((4, 8, 8), stride=(3, 6, 5),
                          **({"chunks": list(chunks)} if chunks else {}))
    out = tmp / "o.zarr"
    run_job(recipe, tmp, str(tmp / "in.zarr/image"), out, block=block)
    want = sliding_window(image, Lopsided(), (4, 8, 8), (3, 6, 5), window_of(recipe))
    for task in ("aff", "dist"):
        np.testing.assert_allclose(read(out, task), want[task], atol=2e-6, rtol=0)
    written = open_volume(str(out / "dist"))
    assert written.voxel_size == (30.0, 6.0, 6.0) and written.offset[-3:] == (1, 2, 3)
    if chunks:
        assert zarr.open_array(str(out / "dist" / "0")).chunks == (1, *chunks)


@pytest.mark.parametrize(("roi", "tta"), [(None, 1), (Roi((1, 3, 2), (6, 15, 19)), 1),
                                         (Roi((1, 3, 2), (6, 15, 19)), 4)],
                         ids=["whole", "roi", "roi-tta"])
def test_units_of_one_block_write_the_same_bits_as_one_unit(volume, monkeypatch, roi, tta):
    """Partial sums handed over within a unit and recomputed at unit borders (reading
    input beyond the block's own, around a ROI too) agree to the last bit: the design's
    promise for resumption and any worker count."""
    image, tmp = volume
    shape = image.shape if roi is None else tuple(roi.shape)
    recipe = probe_recipe((4, 8, 8), stride=(3, 6, 5))
    one = run_job(recipe, tmp, str(tmp / "in.zarr/image"), tmp / "one.zarr", block=(4, 6, 10),
                  roi=roi, tta=tta)
    monkeypatch.setattr(schedule, "handover_budget", lambda *args, **kwargs: 0)
    many = run_job(recipe, tmp, str(tmp / "in.zarr/image"), tmp / "many.zarr",
                   block=(4, 6, 10), roi=roi, tta=tta)
    assert one.patches == np.prod([len(a) for a in lattice(shape, (4, 8, 8), (3, 6, 5))])
    assert many.patches > one.patches  # the borders' patches were predicted again
    assert one.voxels == many.voxels == np.prod(shape)
    for task in ("aff", "dist"):
        np.testing.assert_array_equal(read(tmp / "many.zarr", task), read(tmp / "one.zarr", task))


@pytest.mark.parametrize("roi", [((0, 0, 0), (1, 1, 1)), ((6, 18, 22), (1, 1, 1)),
                                 ((2, 5, 20), (5, 14, 3)), ((0, 11, 0), (7, 8, 23))],
                         ids=["first-voxel", "last-voxel", "inner", "touching-borders"])
def test_a_roi_is_predicted_with_the_volume_around_it_as_context(volume, roi):
    image, tmp = volume
    recipe = probe_recipe((4, 8, 8), stride=(3, 6, 5))
    out = tmp / "roi.zarr"
    run_job(recipe, tmp, str(tmp / "in.zarr/image"), out, block=(4, 6, 10), roi=Roi(*roi))
    want = sliding_window(image, Lopsided(), (4, 8, 8), (3, 6, 5), window_of(recipe),
                          offset=roi[0], shape=roi[1])
    for task in ("aff", "dist"):
        np.testing.assert_allclose(read(out, task), want[task], atol=2e-6, rtol=0)
    written = open_volume(str(out / "aff"))
    assert written.shape == (3, *roi[1])
    assert written.offset[-3:] == tuple(1 + i + o for i, o in enumerate(roi[0]))


def transforms(tta: int) -> list[tuple[tuple[int, ...], bool]]:
    """The flips (axes) and transposes that ``tta`` averages, as the docs list them: x, then
    y, then the y/x transpose, then z."""
    flips = [(), (2,), (1,), (1, 2)]
    chosen = [(f, False) for f in flips][:tta]
    if tta >= 8:
        chosen += [(f, True) for f in flips]
    if tta == 16:
        chosen += [((0, *f), t) for f, t in chosen]
    return chosen


@pytest.mark.parametrize(("tta", "how"), [(2, "mean"), (4, "min"), (8, "mean"), (16, "min")])
def test_tta_matches_flips_undone_by_hand(tta, how):
    """A network that is neither symmetric nor pointwise: every variant's output differs,
    affinities change channel and shift by a voxel where a flip reverses their offset."""
    recipe = probe_recipe((4, 8, 8), stride=(3, 6, 5), tta_reduce={"aff": how})
    image = np.random.default_rng(4).random((5, 11, 13)).astype(np.float32)
    engine = Engine(recipe, Lopsided(), torch.device("cpu"), tta=tta)
    got = predict_array(engine, image, (0.0, 1.0))
    window = window_of(recipe)
    want = sliding_window(image, Lopsided(), (4, 8, 8), (3, 6, 5), window,
                          transforms=transforms(tta), reduce=how)
    mean = sliding_window(image, Lopsided(), (4, 8, 8), (3, 6, 5), window,
                          transforms=transforms(tta))
    plain = sliding_window(image, Lopsided(), (4, 8, 8), (3, 6, 5), window)
    np.testing.assert_allclose(got["aff"], want["aff"], atol=2e-6, rtol=0)
    # the distance is averaged whatever the affinities' reduction
    np.testing.assert_allclose(got["dist"], mean["dist"], atol=2e-6, rtol=0)
    assert np.abs(got["aff"] - plain["aff"]).max() > 1e-2  # the variants changed something


@pytest.mark.parametrize("dtype", ["uint8", "int8", "uint16", "int16", "uint32", "float64"])
def test_every_input_dtype_is_scaled_by_its_range(tmp_path, dtype):
    """The network sees (raw - dtype min) / (dtype max - dtype min) (floats as they are)."""
    rng = np.random.default_rng(5)
    if dtype.startswith("float"):
        raw = rng.random((5, 9, 11)).astype(dtype)
        low, high = 0.0, 1.0
    else:
        info = np.iinfo(dtype)
        raw = rng.integers(info.min, info.max, (5, 9, 11), endpoint=True, dtype=dtype)
        raw.flat[:2] = info.min, info.max  # both ends of the range
        low, high = float(info.min), float(info.max)
    write_volume(tmp_path / "in.zarr", "image", raw, label=False)
    out = tmp_path / "o.zarr"
    run_job(probe_recipe((4, 8, 8), stride=(3, 6, 5)), tmp_path, str(tmp_path / "in.zarr/image"),
            out, factory=make_pointwise, block=(4, 6, 10))
    seen = (raw.astype(np.float64) - low) / (high - low)
    np.testing.assert_allclose(read(out, "dist")[0], 1.5 * seen - 0.25, atol=2e-6, rtol=0)


def test_uint8_and_float16_outputs_round_and_clip_as_documented(tmp_path):
    """uint8 stores round(255 p) of p clipped to [0, 1]; float16 stores p rounded to it."""
    wanted = np.concatenate([np.linspace(-0.25, 1.25, 41),  # both clips
                             (np.arange(256) + 0.3) / 255, (np.arange(256) - 0.3) / 255])
    wanted = np.clip(wanted, -0.25, 1.25)
    image = np.resize((wanted + 0.25) / 1.5, (4, 10, 14)).astype(np.float32)
    write_volume(tmp_path / "in.zarr", "image", image)
    p = 1.5 * image.astype(np.float64) - 0.25
    for dtype in ("uint8", "float16"):
        out = tmp_path / f"{dtype}.zarr"
        run_job(probe_recipe((4, 8, 8), stride=(3, 6, 5), dtype=dtype), tmp_path,
                str(tmp_path / "in.zarr/image"), out, factory=make_pointwise)
        got = read(out, "dist")[0]
        assert got.dtype == np.dtype(dtype)
        if dtype == "uint8":
            np.testing.assert_array_equal(got, np.rint(np.clip(p, 0, 1) * 255))
        else:
            np.testing.assert_allclose(got.astype(np.float64), p, atol=1e-3, rtol=1e-3)
            assert got.min() < 0 and got.max() > 1  # not clipped


def test_a_mask_under_a_roi_is_read_where_the_roi_lies(volume):
    """Blocks are predicted where the mask, at the ROI's place in the input, lets voxels in;
    the others are left zero."""
    image, tmp = volume
    mask = np.zeros(image.shape, np.uint8)
    mask[5, 14, 20] = 1  # one voxel: in block (1, 1, 1) of the ROI below
    write_volume(tmp / "in.zarr", "mask", mask, voxel_size=(30, 6, 6), offset=(1, 2, 3))
    roi = Roi((2, 4, 10), (5, 12, 12))
    recipe = probe_recipe((4, 8, 8), stride=(3, 6, 5))
    out = tmp / "m.zarr"
    progress = run_job(recipe, tmp, str(tmp / "in.zarr/image"), out, block=(3, 6, 6), roi=roi,
                       mask_path=str(tmp / "in.zarr/mask"))
    assert progress.done == 8 and progress.empty == 7
    want = sliding_window(image, Lopsided(), (4, 8, 8), (3, 6, 5), window_of(recipe),
                          offset=(2, 4, 10), shape=(5, 12, 12))["dist"]
    got = read(out, "dist")
    inside = (slice(None), slice(3, 5), slice(6, 12), slice(6, 12))
    np.testing.assert_allclose(got[inside], want[inside], atol=2e-6, rtol=0)
    got[inside] = 0
    assert not got.any()


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_input_is_refused_with_the_volume_s_own_count(tmp_path, bad):
    """One bad voxel that the reflection at the borders repeats was reported as 4, in a box
    reaching outside the volume."""
    image = np.random.default_rng(6).random((5, 9, 11)).astype(np.float32)
    image[2, 4, 5] = bad
    write_volume(tmp_path / "in.zarr", "image", image)
    with pytest.raises(UserError, match=r": 1 NaN or infinite voxels around block \[0, 0, 0\] "
                       r"\(input \[0, 0, 0\] to \[5, 9, 11\]\)"):
        run_job(probe_recipe((4, 8, 8), stride=(3, 6, 5)), tmp_path,
                str(tmp_path / "in.zarr/image"), tmp_path / "o.zarr")


def test_a_volume_thinner_than_the_patch_on_every_axis(tmp_path):
    """One voxel in z and x, fewer than a patch in y: the reflection repeats the input."""
    image = np.random.default_rng(7).random((1, 5, 1)).astype(np.float32)
    write_volume(tmp_path / "in.zarr", "image", image)
    recipe = probe_recipe((4, 8, 8), stride=(3, 6, 5))
    run_job(recipe, tmp_path, str(tmp_path / "in.zarr/image"), tmp_path / "o.zarr")
    want = sliding_window(image, Lopsided(), (4, 8, 8), (3, 6, 5), window_of(recipe))
    for task in ("aff", "dist"):
        np.testing.assert_allclose(read(tmp_path / "o.zarr", task), want[task], atol=2e-6,
                                   rtol=0)


def test_a_level_of_a_multiscale_input_keeps_its_voxel_size_and_place(volume):
    """--level: the output lies on the level's grid, where the level lies in space."""
    from emrun.io import choose_level

    image, tmp = volume
    write_volume(tmp / "ms.zarr", "image", image, voxel_size=(30, 6, 6), offset=(1, 2, 3),
                 levels=2)
    path = choose_level(str(tmp / "ms.zarr/image"), "30,12,12")
    level = open_volume(path)
    run_job(probe_recipe((4, 8, 8), stride=(3, 6, 5)), tmp, path, tmp / "l.zarr",
            factory=make_pointwise)
    written = open_volume(str(tmp / "l.zarr/dist"))
    assert written.voxel_size == level.voxel_size == (30.0, 12.0, 12.0)
    assert written.offset[-3:] == level.offset[-3:] and written.shift_nm == level.shift_nm
    np.testing.assert_allclose(read(tmp / "l.zarr", "dist")[0], 1.5 * level.read() - 0.25,
                               atol=2e-6, rtol=0)


def test_a_one_channel_mask_is_read_as_its_volume(volume):
    """A (1, z, y, x) mask (another inference's binary task, as `segment` and `evaluate`
    take it) was refused: 'mask shape [1, 7, 19, 23] differs from the input's [7, 19, 23]'."""
    image, tmp = volume
    mask = np.zeros(image.shape, np.uint8)
    mask[:3, :6, :10] = 1
    write_volume(tmp / "in.zarr", "flat", mask, voxel_size=(30, 6, 6), offset=(1, 2, 3))
    write_volume(tmp / "in.zarr", "one", mask[None], channel_axis=True, voxel_size=(30, 6, 6),
                 offset=(1, 2, 3))
    recipe = probe_recipe((4, 8, 8), stride=(3, 6, 5))
    for name in ("flat", "one"):
        progress = run_job(recipe, tmp, str(tmp / "in.zarr/image"), tmp / f"{name}.zarr",
                           block=(4, 6, 10), mask_path=str(tmp / f"in.zarr/{name}"))
        assert progress.empty == progress.done - 1
    np.testing.assert_array_equal(read(tmp / "one.zarr", "aff"), read(tmp / "flat.zarr", "aff"))


def test_the_default_block_is_whole_chunks_of_the_recipe_s_chunks(volume):
    """With `infer.chunks` and no block, a volume thinner than four strides got a block of
    its own size, refused as 'not a whole number of chunks' naming a --block never given."""
    image, tmp = volume
    recipe = probe_recipe((4, 8, 8), stride=(3, 6, 5), chunks=[2, 4, 4])
    out = tmp / "o.zarr"
    run_job(recipe, tmp, str(tmp / "in.zarr/image"), out, factory=make_pointwise)
    assert zarr.open_array(str(out / "dist" / "0")).chunks == (1, 2, 4, 4)
    np.testing.assert_allclose(read(out, "dist")[0], 1.5 * image - 0.25, atol=2e-6, rtol=0)


def test_blank_blocks_are_those_at_the_scale_s_low_end_not_raw_zero(tmp_path):
    """An int16 image's raw 0 is mid-grey, yet its blocks of raw 0 were skipped (written 0):
    the output depended on the block size (0.50 in one block, 0.00 in small ones). Blocks
    at the scale's low end (-32768, black) are the blank ones."""
    raw = np.full((6, 12, 20), -32768, np.int16)
    raw[:, :, 14:] = 0  # mid-grey beyond x 14 (the first block's patches reach x 11)
    write_volume(tmp_path / "in.zarr", "image", raw, label=False)
    recipe = probe_recipe((4, 8, 8), stride=(3, 6, 5))
    out = tmp_path / "o.zarr"
    progress = run_job(recipe, tmp_path, str(tmp_path / "in.zarr/image"), out,
                       factory=make_pointwise, block=(6, 12, 5))
    dist = read(out, "dist")[0]
    grey = 1.5 * (32768 / 65535) - 0.25
    np.testing.assert_allclose(dist[:, :, 15:], grey, atol=1e-5)  # predicted, not skipped
    assert progress.empty == 1 and not dist[:, :, :5].any()  # the first block: all black


def test_a_mask_elsewhere_is_refused_and_a_larger_one_is_cut_to_the_input(volume):
    """infer --mask compared shapes only: a mask of the input's shape at another offset or
    voxel size masked another box, silently; a larger mask covering the input (placed by
    its offset, as segment and evaluate take it) was refused."""
    image, tmp = volume  # at offset (1, 2, 3), 30 x 6 x 6 nm
    mask = np.zeros(image.shape, np.uint8)
    mask[:3, :6, :10] = 1
    write_volume(tmp / "in.zarr", "shifted", mask, voxel_size=(30, 6, 6), offset=(0, 0, 0))
    write_volume(tmp / "in.zarr", "finer", mask, voxel_size=(30, 3, 3), offset=(1, 4, 6))
    larger = np.zeros((9, 25, 30), np.uint8)
    larger[1:4, 2:8, 3:13] = 1  # the same voxels as `mask`, in a box starting at 0
    write_volume(tmp / "in.zarr", "larger", larger, voxel_size=(30, 6, 6), offset=(0, 0, 0))
    write_volume(tmp / "in.zarr", "placed", mask, voxel_size=(30, 6, 6), offset=(1, 2, 3))
    recipe = probe_recipe((4, 8, 8), stride=(3, 6, 5))
    source = str(tmp / "in.zarr/image")
    for name, words in (("shifted", r"lies at offset \[0, 0, 0\]"), ("finer", "voxel size")):
        with pytest.raises(UserError, match=words):
            run_job(recipe, tmp, source, tmp / f"{name}.zarr", block=(4, 6, 10),
                    mask_path=str(tmp / f"in.zarr/{name}"))
    for name in ("larger", "placed"):
        progress = run_job(recipe, tmp, source, tmp / f"{name}.zarr", block=(4, 6, 10),
                           mask_path=str(tmp / f"in.zarr/{name}"))
        assert progress.empty == progress.done - 1
    np.testing.assert_array_equal(read(tmp / "larger.zarr", "aff"),
                                  read(tmp / "placed.zarr", "aff"))
