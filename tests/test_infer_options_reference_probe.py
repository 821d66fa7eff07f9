"""Reference probe of `emrun infer`'s options (--roi, --mask, --levels, --level, --tta, an
input with an offset and a channel axis) against small references written here: a plain
sliding window over the documented lattice with its own test-time augmentation (flips and
the y/x transpose undone by index arithmetic, affinities re-paired voxel by voxel), its own
pyramid means and its own OME translations, on tiny synthetic volumes and a tiny network
with lively random weights (not symmetric, so every flip and transpose matters)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from emrun.cli import app
from emrun.geometry import Roi
from emrun.infer.run import run_inference
from emrun.io import open_volume
from emrun.io.write import write_volume
from emrun.recipe import Recipe
from emrun.registry import models

PATCH = (4, 16, 16)
STRIDE = (2, 12, 12)  # overlap 0.5, 0.25, 0.25 of PATCH
# closed under every flip (negated: a shifted pairing) and the y/x transpose
OFFSETS = [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [0, -3, 0], [0, 0, -3]]
VOXEL = (30.0, 6.0, 6.0)


def make_recipe(**infer) -> Recipe:
    return Recipe.model_validate({
        "name": "p", "data": {"sources": {"a": {"type": "synthetic", "shape": [16, 64, 64]}}},
        "model": {"type": "rsunet", "widths": [4, 8]},
        "tasks": {"aff": {"target": {"type": "affinity", "offsets": OFFSETS}},
                  "mito": {"target": {"type": "binary", "volume": "mito"}}},
        "train": {"patch": list(PATCH), "iterations": 1},
        "infer": {"dtype": "float32", "overlap": [0.5, 0.25, 0.25], "batch_size": 3,
                  "precision": "fp32", **infer},
    })


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A recipe, its checkpoint (c.pt) with lively random weights, the model, and a random
    uint8 volume (in.zarr/image, 30 x 6 x 6 nm, at voxel offset 0)."""
    tmp = tmp_path_factory.mktemp("opts")
    recipe = make_recipe()
    torch.manual_seed(0)
    model = models.build(recipe.model, head_channels=recipe.head_channels())
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    torch.save({"model": model.state_dict(), "iteration": 1}, tmp / "c.pt")
    volume = (np.random.default_rng(1).random((10, 30, 34)) * 255).astype(np.uint8)
    write_volume(tmp / "in.zarr", "image", volume, voxel_size=VOXEL, levels=1)
    return recipe, model.eval(), volume, tmp


# ---------------------------------------------------------------- references

def lattice(n: int, p: int, s: int) -> list[int]:
    """The documented lattice along one axis of n voxels: origin -((p - s) // 2), stride s,
    until the axis is covered."""
    o = -((p - s) // 2)
    starts = [o]
    while starts[-1] + p < n:
        starts.append(starts[-1] + s)
    return starts


def reflect(i: np.ndarray, n: int) -> np.ndarray:
    """numpy's 'reflect' (no edge repeat), by folding one step at a time."""
    i = i.copy()
    if n == 1:
        return np.zeros_like(i)
    while (i < 0).any() or (i >= n).any():
        i = np.where(i < 0, -i, i)
        i = np.where(i >= n, 2 * (n - 1) - i, i)
    return i


def my_variants(n: int) -> list[tuple[tuple[bool, bool, bool], bool]]:
    """The documented order: identity, flip-x, flip-y, flip-yx, then those transposed, then
    the eight with z flipped: ((flip z, flip y, flip x), transpose)."""
    plane = [(False, False), (False, True), (True, False), (True, True)]
    out = []
    for fz in (False, True):
        for t in (False, True):
            for fy, fx in plane:
                out.append(((fz, fy, fx), t))
    return out[:n]


def forward(model, x: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        raw = model(torch.from_numpy(np.ascontiguousarray(x, np.float32))[None, None])
    return {k: torch.sigmoid(v[0].float()).numpy().astype(np.float64) for k, v in raw.items()}


def tta_patch(model, x: np.ndarray, n: int, how: str = "mean") -> dict[str, np.ndarray]:
    """The mean (``how`` "min": the minimum, for affinities) over the first n variants of
    the network's output mapped back to x's frame, by coordinates: voxel p of x lies at T(p)
    in the transformed patch; an affinity of p with p + o is the transformed pair
    (T p, T p + L o), which the network states at T p in the channel of L o, or at T p - o_c
    in the channel o_c = -L o (none where that voxel is outside the patch: left out)."""
    shape = x.shape
    grid = np.stack(np.meshgrid(*[np.arange(k) for k in shape], indexing="ij"))  # (3, z, y, x)
    mito, aff, seen = [], [], []
    for flips, transpose in my_variants(n):
        t = x
        for axis, f in enumerate(flips):
            if f:
                t = np.flip(t, axis)
        if transpose:
            t = np.swapaxes(t, 1, 2)
        out = forward(model, t)
        q = grid.copy()  # T(p)
        for axis, f in enumerate(flips):
            if f:
                q[axis] = shape[axis] - 1 - q[axis]
        if transpose:
            q = q[[0, 2, 1]]
        tshape = t.shape
        mito.append(out["mito"][:, q[0], q[1], q[2]])
        values = np.zeros((len(OFFSETS), *shape))
        valid = np.ones((len(OFFSETS), *shape), bool)
        for d, o in enumerate(OFFSETS):
            lo = [-v if f else v for v, f in zip(o, flips, strict=True)]
            if transpose:
                lo = [lo[0], lo[2], lo[1]]
            if lo in OFFSETS:
                values[d] = out["aff"][OFFSETS.index(lo), q[0], q[1], q[2]]
                continue
            c = OFFSETS.index([-v for v in lo])
            r = q - np.array(OFFSETS[c])[:, None, None, None]  # T p - o_c
            ok = np.all([(r[a] >= 0) & (r[a] < tshape[a]) for a in range(3)], axis=0)
            rc = [np.clip(r[a], 0, tshape[a] - 1) for a in range(3)]
            values[d] = out["aff"][c, rc[0], rc[1], rc[2]]
            valid[d] = ok
        aff.append(values)
        seen.append(valid)
    aff_v, seen_v = np.stack(aff), np.stack(seen)
    if how == "min":
        reduced = np.where(seen_v, aff_v, np.inf).min(0)
    else:
        reduced = np.where(seen_v, aff_v, 0).sum(0) / seen_v.sum(0)
    return {"mito": np.mean(mito, axis=0), "aff": reduced}


def bump(patch) -> np.ndarray:
    """DeepEM's bump, exp(-1 / (x (1 - x))) per axis at voxel centres x in (0, 1), each axis
    scaled to 1 at its peak (the README's `blend: {type: bump}`)."""
    axes = []
    for n in patch:
        x = (np.arange(n) + 0.5) / n
        b = np.exp(-1.0 / (x * (1.0 - x)))
        axes.append(b / b.max())
    return axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]


_CACHE: dict = {}


def sliding_window(model, volume: np.ndarray, offset=(0, 0, 0), shape=None, tta: int = 1,
                   how: str = "mean") -> dict[str, np.ndarray]:
    """`_sliding_window`, kept for the module's tests (the same model and volumes)."""
    key = (id(model), volume.shape, volume.tobytes()[:64], int(volume.sum()), tuple(offset),
           None if shape is None else tuple(shape), tta, how)
    if key not in _CACHE:
        _CACHE[key] = _sliding_window(model, volume, offset, shape, tta, how)
    return _CACHE[key]


def _sliding_window(model, volume: np.ndarray, offset=(0, 0, 0), shape=None, tta: int = 1,
                    how: str = "mean") -> dict[str, np.ndarray]:
    """Whole-box (offset, shape) blended sliding window on the box's own lattice; context
    from the volume around the box, reflected about the volume's borders."""
    shape = tuple(shape or volume.shape)
    window = bump(PATCH)
    starts = [lattice(n, p, s) for n, p, s in zip(shape, PATCH, STRIDE, strict=True)]
    acc = {"aff": np.zeros((len(OFFSETS), *shape)), "mito": np.zeros((1, *shape))}
    weight = np.zeros(shape)
    scaled = volume.astype(np.float64) / 255
    for start in itertools.product(*starts):
        index = [reflect(np.arange(s, s + p) + o, n) for s, p, o, n in
                 zip(start, PATCH, offset, volume.shape, strict=True)]
        x = scaled[np.ix_(*index)]
        out = tta_patch(model, x, tta, how)
        keep = [slice(max(s, 0), min(s + p, n)) for s, p, n in zip(start, PATCH, shape,
                                                                 strict=True)]
        within = tuple(slice(k.start - s, k.stop - s) for k, s in zip(keep, start, strict=True))
        for name in acc:
            acc[name][(slice(None), *keep)] += out[name][(slice(None), *within)] * window[within]
        weight[tuple(keep)] += window[within]
    return {name: a / weight for name, a in acc.items()}


def mean_down(data: np.ndarray, step) -> np.ndarray:
    """Mean of each window of ``step`` over the last three axes, cut windows using the
    voxels present: plain loops over the output voxels."""
    out_shape = [math.ceil(n / s) for n, s in zip(data.shape[-3:], step, strict=True)]
    out = np.zeros((*data.shape[:-3], *out_shape))
    for i, j, k in itertools.product(*map(range, out_shape)):
        w = data[..., i * step[0]:(i + 1) * step[0], j * step[1]:(j + 1) * step[1],
                 k * step[2]:(k + 1) * step[2]]
        out[..., i, j, k] = w.reshape(*w.shape[:-3], -1).mean(-1)
    return out


def ome(path) -> list[dict]:
    """Each level's (path, scale, translation) of the image group at ``path`` (z, y, x)."""
    attrs = json.loads((path / "zarr.json").read_text())["attributes"]["ome"]
    levels = []
    for d in attrs["multiscales"][0]["datasets"]:
        scale = next(t["scale"] for t in d["coordinateTransformations"] if t["type"] == "scale")
        moved = next((t["translation"] for t in d["coordinateTransformations"]
                      if t["type"] == "translation"), [0.0] * len(scale))
        levels.append({"path": d["path"], "scale": scale[-3:], "translation": moved[-3:]})
    return levels


def run(setup, out_name, recipe=None, **kwargs):
    _, _, _, tmp = setup
    recipe = recipe or setup[0]
    out = tmp / out_name
    kwargs.setdefault("input_path", str(tmp / "in.zarr/image"))
    kwargs.setdefault("levels", 1)
    input_path = kwargs.pop("input_path")
    progress = run_inference(recipe, tmp / "c.pt", input_path, out, **kwargs)
    return out, progress


def read(out, task="aff", level="0"):
    return zarr.open_array(str(out / task / level), mode="r")[...]


# ---------------------------------------------------------------- tests


def test_plain_run_matches_the_sliding_window_and_lies_on_the_input(setup):
    _, model, volume, _ = setup
    want = sliding_window(model, volume)
    out, _ = run(setup, "plain.zarr", block=(4, 12, 12))
    for task in ("aff", "mito"):
        np.testing.assert_allclose(read(out, task), want[task], atol=2e-5, rtol=0)
    (level,) = ome(out / "aff")
    assert level["scale"] == list(VOXEL) and level["translation"] == [0.0, 0.0, 0.0]


def test_roi_is_its_own_sliding_window_with_the_volume_as_context(setup):
    """The box on its own lattice (context read from the volume around it); where the box's
    lattice is the volume's (an offset a whole number of strides) and every patch covering a
    voxel is in both, it is the plain run's crop; it lies at the box's offset in nm."""
    _, model, volume, _ = setup
    offset, shape = (2, 12, 12), (6, 14, 20)
    want = sliding_window(model, volume, offset, shape)
    out, _ = run(setup, "roi.zarr", roi=Roi(offset, shape), block=(4, 12, 12))
    got = read(out, "aff")
    assert got.shape == (len(OFFSETS), *shape)
    np.testing.assert_allclose(got, want["aff"], atol=2e-5, rtol=0)
    np.testing.assert_allclose(read(out, "mito"), want["mito"], atol=2e-5, rtol=0)
    (level,) = ome(out / "aff")
    assert level["translation"] == [o * v for o, v in zip(offset, VOXEL, strict=True)]
    # the crop: voxels whose covering patches (volume lattice) all start on the box's lattice
    whole = sliding_window(model, volume)["aff"]
    crop = whole[(slice(None), *(slice(o, o + n) for o, n in zip(offset, shape, strict=True)))]
    agree = np.ones(shape, bool)
    for axis, (o, n, p, s) in enumerate(zip(offset, shape, PATCH, STRIDE, strict=True)):
        big = lattice(volume.shape[axis], p, s)
        small = {o + v for v in lattice(n, p, s)}
        for v in range(n):
            cover = {b for b in big if b <= o + v < b + p}
            if not cover <= small:
                agree[(slice(None),) * axis + (v,)] = False
    assert agree.any()
    np.testing.assert_allclose(got[:, agree], crop[:, agree], atol=2e-5, rtol=0)
    # a box that ends where the volume does: reflected about the volume's border
    offset, shape = (5, 10, 14), (5, 20, 20)
    out, _ = run(setup, "roiend.zarr", roi=Roi(offset, shape))
    np.testing.assert_allclose(read(out, "aff"), sliding_window(model, volume, offset, shape)
                               ["aff"], atol=2e-5, rtol=0)


def placed_input(setup) -> str:
    """The volume with a channel axis, at voxel offset (3, 5, 7)."""
    _, _, volume, tmp = setup
    if not (tmp / "in.zarr/placed").exists():
        write_volume(tmp / "in.zarr", "placed", volume[None], voxel_size=VOXEL,
                     offset=(3, 5, 7), channel_axis=True, levels=1)
    return str(tmp / "in.zarr/placed")


def test_an_input_offset_and_channel_axis_move_the_output_not_its_values(setup):
    _recipe, model, volume, tmp = setup
    placed_input(setup)
    offset, shape = (1, 4, 8), (7, 20, 22)
    out, _ = run(setup, "placed.zarr", input_path=str(tmp / "in.zarr/placed"),
                 roi=Roi(offset, shape))
    want = sliding_window(model, volume, offset, shape)
    np.testing.assert_allclose(read(out, "aff"), want["aff"], atol=2e-5, rtol=0)
    (level,) = ome(out / "aff")
    assert level["translation"] == [(a + b) * v for a, b, v in
                                    zip((3, 5, 7), offset, VOXEL, strict=True)]
    assert open_volume(str(out / "aff")).offset[-3:] == (4, 9, 15)


@pytest.mark.parametrize("tta", [2, 4, 8, 16])
def test_tta_is_the_mean_over_the_documented_variants(setup, tta):
    _, model, volume, _ = setup
    offset, shape = (6, 14, 18), (4, 16, 16)  # a box at the volume's far end: reflected
    want = sliding_window(model, volume, offset, shape, tta=tta)
    out, _ = run(setup, f"tta{tta}.zarr", roi=Roi(offset, shape), tta=tta)
    for task in ("aff", "mito"):
        np.testing.assert_allclose(read(out, task), want[task], atol=2e-5, rtol=0)
    plain = sliding_window(model, volume, offset, shape)
    assert np.abs(want["aff"] - plain["aff"]).max() > 1e-3  # the variants matter


def test_tta_reduce_min_takes_the_smallest_variant_where_each_has_a_value(setup):
    _, model, volume, _ = setup
    offset, shape = (6, 14, 18), (4, 16, 16)
    want = sliding_window(model, volume, offset, shape, tta=4, how="min")
    out, _ = run(setup, "ttamin.zarr", recipe=make_recipe(tta_reduce={"aff": "min"}),
                 roi=Roi(offset, shape), tta=4)
    np.testing.assert_allclose(read(out, "aff"), want["aff"], atol=2e-5, rtol=0)
    mean = sliding_window(model, volume, offset, shape, tta=4)
    np.testing.assert_allclose(read(out, "mito"), mean["mito"], atol=2e-5, rtol=0)  # mean
    assert (want["aff"] < mean["aff"] - 1e-3).any()


def test_mask_skips_blocks_outside_and_predicts_the_rest_as_the_plain_run(setup):
    _recipe, model, volume, tmp = setup
    mask = np.zeros(volume.shape, np.uint8)
    mask[5, 20, 3] = 1  # one voxel: its block alone
    mask[0:2, 0:3, 30:34] = 1
    write_volume(tmp / "in.zarr", "mask", mask, voxel_size=VOXEL, levels=1)
    block = (4, 12, 12)
    out, progress = run(setup, "mask.zarr", block=block, mask_path=str(tmp / "in.zarr/mask"))
    plain = sliding_window(model, volume)
    got = read(out, "aff")
    stored = zarr.open_array(str(out / "aff" / "0"), mode="r")
    kept = 0
    for b in itertools.product(*(range(math.ceil(n / k)) for n, k in
                                 zip(volume.shape, block, strict=True))):
        box = tuple(slice(i * k, (i + 1) * k) for i, k in zip(b, block, strict=True))
        if mask[box].any():
            kept += 1
            np.testing.assert_allclose(got[(slice(None), *box)], plain["aff"][(slice(None),
                                                                               *box)],
                                       atol=2e-5, rtol=0)
        else:
            assert not got[(slice(None), *box)].any()
    assert kept == 2 and progress.empty == progress.done - kept
    assert 0 < stored.nchunks_initialized < stored.nchunks


def test_a_larger_mask_is_cut_where_the_input_lies(setup):
    """A mask over a larger box (offset 0) than the input (offset 3, 5, 7): the part the
    input's offset places it in masks the input."""
    _recipe, model, volume, tmp = setup
    mask = np.zeros((16, 40, 45), np.uint8)
    mask[3 + 5, 5 + 20, 7 + 3] = 1  # the input's voxel (5, 20, 3): block (1, 1, 0)
    mask[0:3, :, :] = 1  # outside the input
    write_volume(tmp / "in.zarr", "bigmask", mask, voxel_size=VOXEL, levels=1)
    out, progress = run(setup, "bigmask.zarr", input_path=placed_input(setup),
                        block=(4, 12, 12), mask_path=str(tmp / "in.zarr/bigmask"))
    got = read(out, "mito")
    want = sliding_window(model, volume)["mito"]
    box = (slice(None), slice(4, 8), slice(12, 24), slice(0, 12))
    np.testing.assert_allclose(got[box], want[box], atol=2e-5, rtol=0)
    rest = got.copy()
    rest[box] = 0
    assert not rest.any() and progress.done - progress.empty == 1


def test_mask_roi_and_tta_together(setup):
    """A mask made for the --roi box (placed by its offset), TTA 4: the kept blocks are the
    ROI's TTA sliding window, the others zero."""
    _recipe, model, volume, tmp = setup
    offset, shape = (2, 6, 4), (8, 24, 24)
    mask = np.zeros(shape, np.uint8)
    mask[1, 2, 2] = 1  # block (0, 0, 0) of the box
    write_volume(tmp / "in.zarr", "boxmask", mask, voxel_size=VOXEL, offset=offset, levels=1)
    block = (4, 12, 12)
    out, progress = run(setup, "mrt.zarr", block=block, roi=Roi(offset, shape), tta=4,
                        mask_path=str(tmp / "in.zarr/boxmask"))
    want = sliding_window(model, volume, offset, shape, tta=4)
    got = read(out, "mito")
    first = (slice(None), slice(0, 4), slice(0, 12), slice(0, 12))
    np.testing.assert_allclose(got[first], want["mito"][first], atol=2e-5, rtol=0)
    rest = got.copy()
    rest[first] = 0
    assert not rest.any() and progress.done - progress.empty == 1


def test_levels_are_means_of_the_finer_level_with_centred_translations(setup):
    """--levels 3 on 12 x 6 x 6 nm: level 1 halves y, x; level 2 halves z too (12 nm is at
    most half of y's 24); each level the mean of the one before (cut windows: the voxels
    present); scale voxel x factor, translation offset + (factor - 1) / 2 voxels."""
    _recipe, _model, volume, tmp = setup
    write_volume(tmp / "in.zarr", "iso", volume[None], voxel_size=(12, 6, 6),
                 offset=(1, 2, 3), channel_axis=True, levels=1)
    out, _ = run(setup, "levels.zarr", input_path=str(tmp / "in.zarr/iso"), levels=3,
                 roi=Roi((0, 1, 0), (9, 27, 31)))
    base = read(out, "aff")
    levels = ome(out / "aff")
    assert [lv["path"] for lv in levels] == ["0", "1", "2"]
    factors = [(1, 1, 1), (1, 2, 2), (2, 4, 4)]
    mine = base.astype(np.float64)
    for k in (1, 2):
        step = [f // g for f, g in zip(factors[k], factors[k - 1], strict=True)]
        mine = mean_down(mine, step)
        np.testing.assert_allclose(read(out, "aff", str(k)), mine, atol=1e-6, rtol=0)
    for lv, f in zip(levels, factors, strict=True):
        assert lv["scale"] == [v * g for v, g in zip((12, 6, 6), f, strict=True)]
        corner = [(o + (g - 1) / 2) * v for o, g, v in
                  zip((1, 3, 3), f, (12, 6, 6), strict=True)]
        assert lv["translation"] == pytest.approx(corner, abs=1e-9)


def test_uint8_levels_are_rounded_means_of_the_finer_level(setup):
    _, _, _, _tmp = setup
    out, _ = run(setup, "u8levels.zarr", recipe=make_recipe(dtype="uint8"), levels=3,
                 roi=Roi((0, 3, 1), (5, 27, 29)))
    mine = read(out, "aff")
    assert mine.dtype == np.uint8
    for k in (1, 2):
        mine = np.floor(mean_down(mine.astype(np.float64), (1, 2, 2)) + 0.5)
        got = read(out, "aff", str(k))
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, mine)


def test_level_of_a_multiscale_input_is_predicted_at_its_voxel_size(setup):
    """--level 1 of a pyramid (30 x 12 x 12 nm, its half-voxel shift): the output is the
    sliding window over that level's data, at its voxel size and where it lies; the output's
    own level 1 lies on the centres of its pairs of voxels."""
    _recipe, model, volume, tmp = setup
    big = np.repeat(np.repeat(volume, 2, 1), 2, 2)[:, :58, :66]
    big[:, 1::2, ::3] //= 2  # so the level is not volume itself
    write_volume(tmp / "in.zarr", "pyr", big, voxel_size=VOXEL, offset=(0, 4, 2), levels=2)
    level1 = zarr.open_array(str(tmp / "in.zarr/pyr/1"), mode="r")[...]
    (cli,) = [CliRunner().invoke(app, [
        "infer", "--checkpoint", str(tmp / "c.pt"), "--recipe", str(_recipe_file(setup)),
        "--input", str(tmp / "in.zarr/pyr"), "--level", "1", "--output",
        str(tmp / "lvl.zarr"), "--levels", "2"])]
    assert cli.exit_code == 0, cli.output
    want = sliding_window(model, level1)
    out = tmp / "lvl.zarr"
    np.testing.assert_allclose(read(out, "aff"), want["aff"], atol=2e-5, rtol=0)
    source = ome(tmp / "in.zarr/pyr")[1]
    levels = ome(out / "aff")
    assert levels[0]["scale"] == source["scale"] == [30.0, 12.0, 12.0]
    assert levels[0]["translation"] == pytest.approx(source["translation"], abs=1e-9)
    # input level 1: offset (0, 2, 1) level-1 voxels plus half a level-0 voxel in y and x
    assert source["translation"] == pytest.approx([0.0, 2 * 12 + 3.0, 1 * 12 + 3.0])
    assert levels[1]["scale"] == [30.0, 24.0, 24.0]
    assert levels[1]["translation"] == pytest.approx(
        [0.0, 2 * 12 + 3.0 + 6.0, 1 * 12 + 3.0 + 6.0], abs=1e-9)


def _recipe_file(setup):
    import yaml

    recipe, _, _, tmp = setup
    path = tmp / "r.yaml"
    if not path.exists():
        path.write_text(yaml.safe_dump(recipe.resolved()))
    return path


def test_a_coarser_level_with_offset_channel_roi_and_mask_lies_where_its_input_lies(setup):
    """Level 1 of an isotropic (6 nm) pyramid at an odd voxel offset: its
    translation is no whole number of its voxels (a shift of its own); a --roi of it and a
    mask on its grid: the kept block is the level's sliding window over the box, and the
    output's levels lie on the centres of the windows they average, shift included."""
    from emrun.io.levels import choose_level

    _recipe, model, volume, tmp = setup
    big = np.repeat(np.repeat(np.repeat(volume, 2, 0), 2, 1), 2, 2)[:, :59, :67]
    big[1::2, 1::2, ::3] //= 2
    write_volume(tmp / "in.zarr", "iso6", big, voxel_size=(6, 6, 6), offset=(3, 5, 7),
                 levels=2)
    path = choose_level(str(tmp / "in.zarr/iso6"), "12,12,12")
    assert path.endswith("iso6/1")
    source = ome(tmp / "in.zarr/iso6")[1]
    # level 1 averages level 0's 2 x 2 x 2 windows: centred half a level-0 voxel further
    assert source["translation"] == pytest.approx([(o + 0.5) * 6 for o in (3, 5, 7)])
    level1 = zarr.open_array(str(tmp / "in.zarr/iso6/1"), mode="r")[...]
    place = open_volume(path)
    shift = [t - o * 12 for t, o in zip(source["translation"], place.offset[-3:], strict=True)]
    roi_offset, roi_shape = (1, 2, 3), (8, 20, 24)
    mask = np.zeros(level1.shape, np.uint8)
    mask[1 + 5, 2 + 14, 3 + 13] = 1  # the box's block (1, 1, 1) of 4 x 12 x 12
    write_volume(tmp / "in.zarr", "isomask", mask, voxel_size=(12, 12, 12),
                 offset=place.offset[-3:], shift_nm=shift, levels=1)
    out, progress = run(setup, "iso.zarr", input_path=path, roi=Roi(roi_offset, roi_shape),
                        mask_path=str(tmp / "in.zarr/isomask"), block=(4, 12, 12), levels=2)
    want = sliding_window(model, level1, roi_offset, roi_shape)["aff"]
    got = read(out, "aff")
    kept = (slice(None), slice(4, 8), slice(12, 20), slice(12, 24))
    np.testing.assert_allclose(got[kept], want[kept], atol=2e-5, rtol=0)
    rest = got.copy()
    rest[kept] = 0
    assert not rest.any() and progress.done - progress.empty == 1
    levels = ome(out / "aff")
    base = [(o + r) * 12 + m for o, r, m in
            zip(place.offset[-3:], roi_offset, shift, strict=True)]
    assert levels[0]["scale"] == [12.0, 12.0, 12.0]
    assert levels[0]["translation"] == pytest.approx(base, abs=1e-9)
    assert levels[1]["scale"] == [24.0, 24.0, 24.0]
    assert levels[1]["translation"] == pytest.approx([b + 6 for b in base], abs=1e-9)
    np.testing.assert_allclose(read(out, "aff", "1"), mean_down(got.astype(np.float64),
                                                                (2, 2, 2)), atol=1e-6)


def test_a_coarser_level_of_a_channel_axis_pyramid_keeps_its_half_voxel_shift(setup):
    """bioformats2raw's (1, z, y, x) pyramids: `infer --input img/1` of one lies where its
    input lies (README: "A coarser level keeps its half-voxel shift in the outputs made from
    it"); the same level without the channel axis does (the tests above)."""
    _, model, volume, tmp = setup
    big = np.repeat(np.repeat(volume, 2, 1), 2, 2)
    write_volume(tmp / "in.zarr", "chpyr", big[None], voxel_size=VOXEL, channel_axis=True,
                 levels=2)
    source = ome(tmp / "in.zarr/chpyr")[1]
    assert source["translation"] == [0.0, 3.0, 3.0]  # half a level-0 voxel in y and x
    out, _ = run(setup, "chpyr.zarr", input_path=str(tmp / "in.zarr/chpyr/1"))
    np.testing.assert_allclose(read(out, "aff"), sliding_window(model, volume)["aff"],
                               atol=2e-5, rtol=0)  # the values are right
    assert ome(out / "aff")[0]["translation"] == source["translation"]


def test_a_whole_input_mask_with_a_roi_and_the_recipe_s_tta(setup):
    """A mask of the input's shape with --roi: read at the box's place in the input; the
    recipe's `infer.tta: 2` applies when --tta is not given. The kept block (the box's last,
    whose owners before it are masked out: their patches recomputed) is the box's TTA
    sliding window."""
    _, model, volume, tmp = setup
    offset, shape = (2, 6, 10), (8, 24, 24)
    mask = np.zeros(volume.shape, np.uint8)
    mask[offset[0] + 5, offset[1] + 14, offset[2] + 20] = 1  # the box's block (1, 1, 1)
    mask[0, 0, 0] = 1  # outside the box
    write_volume(tmp / "in.zarr", "roimask", mask, voxel_size=VOXEL, levels=1)
    out, progress = run(setup, "roimask.zarr", recipe=make_recipe(tta=2),
                        roi=Roi(offset, shape), block=(4, 12, 12),
                        mask_path=str(tmp / "in.zarr/roimask"))
    want = sliding_window(model, volume, offset, shape, tta=2)["aff"]
    got = read(out, "aff")
    kept = (slice(None), slice(4, 8), slice(12, 24), slice(12, 24))
    np.testing.assert_allclose(got[kept], want[kept], atol=2e-5, rtol=0)
    rest = got.copy()
    rest[kept] = 0
    assert not rest.any() and progress.done - progress.empty == 1
