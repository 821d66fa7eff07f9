"""LSD and distance targets (against direct sums), the task defaults they bring, their trip
through the loader, and a short training run with an auxiliary LSD head."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from conftest import MINIMAL
from scipy import ndimage
from typer.testing import CliRunner

from emrun.cli import app
from emrun.data.loader import to_tensors, unpack
from emrun.data.lsd import _half_bits, auto_factor, local_shape_descriptors
from emrun.data.samples import pack, stack
from emrun.data.targets import Distance, LocalShapeDescriptors, Patch
from emrun.recipe.recipe import Recipe
from emrun.recipe.tasks import DistanceTarget, LSDTarget, MSELoss
from emrun.registry import targets

PAIRS = ((0, 1), (0, 2), (1, 2))


def lsd_reference(labels, sigma, voxel_size, truncate=3.0):
    """The definition, voxel by voxel: explicit window sums over the voxel's object. It is
    funkelab's ``lsd`` package's definition (checked against lsds 0.1.3 at factor 1: within
    1.1e-4 on three such volumes); that package cannot be a test dependency: it needs
    gunpowder, which needs zarr 2."""
    sigma, size = np.asarray(sigma, float), np.asarray(voxel_size, float)
    in_voxels = sigma / size
    radius = [int(truncate * s + 0.5) for s in in_voxels]
    kernels = []
    for r, s in zip(radius, in_voxels, strict=True):
        k = np.exp(-0.5 * (np.arange(-r, r + 1) / s) ** 2)
        kernels.append(k / k.sum())
    out = np.zeros((10, *labels.shape))
    for v in zip(*np.nonzero(labels), strict=True):
        lo = [max(0, c - r) for c, r in zip(v, radius, strict=True)]
        hi = [min(n, c + r + 1) for c, r, n in zip(v, radius, labels.shape, strict=True)]
        window = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        weights = np.ones([b - a for a, b in zip(lo, hi, strict=True)])
        for axis in range(3):
            k = kernels[axis][lo[axis] - v[axis] + radius[axis]:hi[axis] - v[axis] + radius[axis]]
            shape = [1, 1, 1]
            shape[axis] = -1
            weights = weights * k.reshape(shape)
        weights = weights * (labels[window] == labels[v])
        points = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi, strict=True)],
                                      indexing="ij"), axis=-1) * size
        mass = weights.sum()
        mean = (weights[..., None] * points).sum(axis=(0, 1, 2)) / mass
        d = points - mean
        cov = np.einsum("zyx,zyxa,zyxb->ab", weights, d, d) / mass
        here = np.asarray(v) * size
        channels = [*(0.5 + 0.5 * (mean - here) / sigma),
                    *(cov[a, a] / sigma[a] ** 2 for a in range(3)),
                    *(0.5 + 0.5 * cov[a, b] / np.sqrt(max(cov[a, a], 1e-3) * max(cov[b, b], 1e-3))
                      for a, b in PAIRS), mass]
        out[(slice(None), *v)] = np.clip(channels, 0, 1)
    return out


def cells(shape, n, seed, sampling=(4.0, 1.0, 1.0)):
    """Voronoi-like dense labels with n cells, ids 1..n."""
    rng = np.random.default_rng(seed)
    seeds = np.zeros(shape, np.uint32)
    seeds[tuple(rng.integers(0, shape, size=(n, 3)).T)] = np.arange(1, n + 1)
    _, nearest = ndimage.distance_transform_edt(seeds == 0, sampling=sampling,
                                                return_indices=True)
    return seeds[tuple(nearest)]


def small_labels():
    labels = np.zeros((4, 11, 13), np.int32)
    labels[:, :6] = 1
    labels[:, 6:, :7] = 2
    labels[:, 6:, 7:] = 3
    labels[1:3, 2:5, 3:9] = 4  # an island inside 1: 1 is not convex
    labels[:, 8] = 0  # a background stripe
    labels[0, ::3, ::2] = 5  # scattered single voxels of one object
    return labels


@pytest.mark.parametrize(("sigma", "size"), [((45, 10, 8), (30, 5, 4)), ((20, 20, 20),
                                                                       (10, 10, 10))])
def test_lsd_equals_the_direct_window_sums_without_downsampling(sigma, size):
    labels = small_labels()
    got = local_shape_descriptors(labels, sigma, size)
    assert got.shape == (10, *labels.shape) and got.dtype == np.float32
    np.testing.assert_allclose(got, lsd_reference(labels, sigma, size), atol=2e-5)


@pytest.mark.parametrize("factor", [(1, 1, 1), (1, 2, 2), (2, 3, 3)])
def test_lsd_in_float16_is_the_float32_result_rounded_once(factor):
    labels = cells((9, 40, 37), 7, seed=3)  # sides that the blocks do not divide
    exact = local_shape_descriptors(labels, (60, 20, 20), (20, 4, 4), factor)
    half = local_shape_descriptors(labels, (60, 20, 20), (20, 4, 4), factor, np.float16)
    assert half.dtype == np.float16
    np.testing.assert_array_equal(half, exact.astype(np.float16))


def test_float16_rounding_of_the_tables_matches_numpy_ties_and_subnormals_included():
    # the tables are rounded to float16 by a compiled routine (numba has no float16): it
    # must agree with numpy everywhere in [0, 1], most of all where rounding is decided
    halves = np.arange(0, 0x3C01, dtype=np.uint16).view(np.float16)  # every float16 in [0, 1]
    exact = halves.astype(np.float32)
    ties = (exact[:-1] + exact[1:]) / 2  # exactly between two float16s: to the even one
    ulp = np.float32(np.inf)
    values = np.concatenate([exact, ties, np.nextafter(ties, ulp), np.nextafter(ties, -ulp),
                             np.random.default_rng(0).random(200_000, np.float32),
                             np.float32([1e-30, 2.0**-25, 3 * 2.0**-26, 2.0**-14])])
    np.testing.assert_array_equal(_half_bits(values), values.astype(np.float16).view(np.uint16))


def test_lsd_ignores_how_ids_are_numbered():
    labels = small_labels()
    expected = local_shape_descriptors(labels, (45, 10, 8), (30, 5, 4))
    huge = np.where(labels > 0, labels.astype(np.uint64) * 10**12 + 7, 0)
    negative = np.where(labels > 0, 3 - labels.astype(np.int64), 0)  # 2, 1, -1, -2, 0 -> ...
    negative[labels == 3] = -7  # (3 - 3 would be 0: keep it an object)
    for renamed in (huge, negative, labels.astype(np.uint16)):
        np.testing.assert_array_equal(local_shape_descriptors(renamed, (45, 10, 8),
                                                              (30, 5, 4)), expected)


def test_lsd_on_a_coarse_grid_stays_close_to_the_exact_one():
    labels = cells((8, 64, 64), 25, seed=3)
    labels[:, :, 30] = 0
    sigma, size = (60, 48, 48), (30, 6, 6)
    factor = auto_factor([s / v for s, v in zip(sigma, size, strict=True)])
    assert factor == (1, 2, 2)
    error = np.abs(local_shape_descriptors(labels, sigma, size, factor)
                   - local_shape_descriptors(labels, sigma, size))
    assert error.mean(axis=(1, 2, 3)).max() < 0.02
    assert np.percentile(error, 99, axis=(1, 2, 3)).max() < 0.05


def test_lsd_channels_mean_what_they_say():
    size, sigma = (10.0, 10.0, 10.0), (20.0, 20.0, 20.0)
    labels = np.ones((15, 15, 30), np.uint8)
    labels[:, :, 15:] = 2  # object 2 lies on the +x side
    lsd = local_shape_descriptors(labels, sigma, size)
    centre = lsd[:, 7, 7, 7]  # deep inside object 1 (7 voxels > 3 sigma from any edge)
    np.testing.assert_allclose(centre[[0, 1, 2, 6, 7, 8]], 0.5, atol=1e-6)
    np.testing.assert_allclose(centre[3:6], 1.0, atol=0.03)  # a whole window: sigma^2
    np.testing.assert_allclose(centre[9], 1.0, atol=1e-6)  # fills its window
    edge = lsd[:, 7, 7, 15]  # first voxel of object 2: its mass lies towards +x
    assert edge[2] > 0.8 and edge[5] < 0.5 and 0.45 < edge[9] < 0.65
    np.testing.assert_allclose(edge[[0, 1]], 0.5, atol=1e-6)
    assert (lsd[:, 7, 7, 14][2] < 0.2)  # last voxel of object 1: towards -x


def test_lsd_target_masks_background_and_invalid_voxels():
    labels = cells((6, 32, 32), 6, seed=1)
    labels[:, 10] = 0
    valid = np.ones(labels.shape, bool)
    valid[:, :, :5] = False
    build = targets.build(LSDTarget(sigma=(40, 12, 12)))
    assert isinstance(build, LocalShapeDescriptors) and build.channels == 10
    target, mask = build(Patch(labels, valid, voxel_size=(20.0, 4.0, 4.0)))
    assert target.shape == (10, *labels.shape) and mask.shape == (1, *labels.shape)
    assert target.dtype == np.float16 and mask.dtype == np.uint8
    assert target.min() >= 0 and target.max() <= 1
    counted = (labels != 0) & valid
    assert (mask == counted[None]).all()
    assert (target[:, ~counted] == 0).all()
    # invalid voxels are no object: the result is that of labels zeroed there
    expected = local_shape_descriptors(np.where(valid, labels, 0), (40, 12, 12),
                                       (20, 4, 4), auto_factor((2, 3, 3)))
    np.testing.assert_array_equal(target, expected.astype(np.float16))
    with pytest.raises(ValueError, match="voxel size"):
        build(Patch(labels))


def test_distance_is_in_nm_along_the_right_axes_and_clipped():
    labels = np.zeros((6, 1, 1), np.uint32)
    labels[:4] = 1  # z 0-3 object, 4-5 background; 30 nm per section
    target, mask = Distance(clip=100.0)(Patch(labels, voxel_size=(30.0, 6.0, 6.0)))
    np.testing.assert_allclose(target[0, :, 0, 0], [1.0, 0.9, 0.6, 0.3, 0, 0], atol=5e-4)
    assert target.dtype == np.float16  # how it travels to the trainer
    assert mask.shape == (1, *labels.shape) and mask.all()
    signed, _ = Distance(clip=100.0, signed=True)(Patch(labels, voxel_size=(30.0, 6.0, 6.0)))
    np.testing.assert_allclose(signed[0, :, 0, 0], [1.0, 0.9, 0.6, 0.3, -0.3, -0.6], atol=5e-4)


def test_distance_counts_label_changes_as_boundaries_and_uses_the_mask():
    labels = np.zeros((1, 1, 9), np.uint32)
    labels[..., :4], labels[..., 4:8] = 1, 2  # touching objects, then background
    valid = np.ones(labels.shape, np.uint8)
    valid[..., 0] = 0
    build = targets.build(DistanceTarget(clip=20))
    target, mask = build(Patch(labels, valid, voxel_size=(1.0, 1.0, 5.0)))
    np.testing.assert_allclose(target[0, 0, 0], [1, 0.75, 0.5, 0.25, 0.25, 0.5, 0.5, 0.25, 0])
    assert mask[0, 0, 0].tolist() == [0, 1, 1, 1, 1, 1, 1, 1, 1]
    empty, _ = Distance(clip=20, signed=True)(Patch(np.zeros((2, 2, 2), np.uint8),
                                                    voxel_size=(1.0, 1.0, 1.0)))
    assert (empty == -1).all()


def test_tasks_named_after_a_target_type_need_no_target_and_get_its_loss():
    data = yaml.safe_load(MINIMAL)
    data["tasks"] = {"affinity": {}, "lsd": {"weight": 0.5},
                     "dist": {"target": {"type": "distance", "signed": True}},
                     "b": {"target": {"type": "boundary"}, "activation": "none"}}
    recipe = Recipe.model_validate(data)
    lsd = recipe.tasks["lsd"]
    assert isinstance(lsd.target, LSDTarget) and lsd.target.sigma == 80.0
    assert isinstance(lsd.loss, MSELoss) and lsd.activation == "none" and lsd.weight == 0.5
    assert recipe.tasks["affinity"].loss.type == "bce"
    assert recipe.tasks["affinity"].activation == "sigmoid"
    assert recipe.tasks["dist"].loss.type == "mse"
    assert recipe.tasks["b"].loss.type == "bce" and recipe.tasks["b"].activation == "none"
    assert recipe.head_channels() == {"affinity": 3, "lsd": 10, "dist": 1, "b": 1}
    again = Recipe.model_validate(recipe.resolved())  # the resolved form round-trips
    assert again == recipe


def test_float_targets_travel_as_float16_and_bits_as_bits():
    rng = np.random.default_rng(0)
    lsd = rng.random((10, 2, 4, 11)).astype(np.float32)
    aff = (rng.random((3, 2, 4, 11)) < 0.5).astype(np.uint8)
    sample = {"image": rng.random((1, 2, 4, 11)).astype(np.float32),
              "target": {"lsd": lsd, "aff": aff},
              "mask": {"lsd": np.ones_like(aff[:1]), "aff": aff}}
    packed = stack([pack(sample), pack(sample)])
    assert packed["target"]["lsd"].dtype == np.float16
    assert packed["target"]["aff"].dtype == np.uint8 and packed["target"]["aff"].shape[-1] == 2
    batch = unpack(to_tensors(packed))
    assert batch["target"]["lsd"].dtype == torch.float32
    np.testing.assert_allclose(batch["target"]["lsd"][1].numpy(), lsd, atol=5e-4)
    assert (batch["target"]["aff"][0].numpy() == aff).all()


def test_affinity_and_lsd_heads_train_on_cpu(write, tmp_path):
    text = MINIMAL.replace("iterations: 10", "iterations: 2") + \
        "  validate_every: 0\n"
    data = yaml.safe_load(text)
    data["tasks"]["lsd"] = {"weight": 0.5, "target": {"type": "lsd", "sigma": [30, 24, 24]}}
    path = write(yaml.safe_dump(data))
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(path), "--run-dir", str(run),
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    from emrun.models import build_model
    from emrun.recipe import load_recipe

    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["iteration"] == 2
    model = build_model(load_recipe(path).recipe).eval()
    model.load_state_dict(state["model"])
    with torch.no_grad():
        out = model(torch.zeros(1, 1, 8, 32, 32))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "affinity": (1, 3, 8, 32, 32), "lsd": (1, 10, 8, 32, 32)}


@pytest.mark.parametrize(("task", "key", "says"), [
    ("lsd: {target: {type: lsd, sigma: 3}}", "tasks.lsd.target.sigma", "below one voxel"),
    ("lsd: {weight: 0.5}", "tasks.lsd.target.sigma", "more than half of train.patch"),
    ("d: {target: {type: distance, clip: 2}}", "tasks.d.target.clip", "below one voxel"),
])
def test_validate_refuses_meaningless_lsd_and_distance_settings(write, task, key, says):
    path = write(MINIMAL.replace("tasks:\n", f"tasks:\n  {task}\n"))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{path}:" in lines[0], result.stderr
    assert f"{key}: " in lines[0] and says in lines[0]


@pytest.mark.parametrize(("downsample", "factor"), [(1, (1, 1, 1)), ([1, 2, 2], (1, 2, 2)),
                                                    (None, (1, 2, 2))])
def test_lsd_spec_downsample_picks_the_block_size(downsample, factor):
    labels = cells((4, 24, 24), 5, seed=2)
    spec = LSDTarget(sigma=(30, 36, 36), downsample=downsample)  # sigma 1 z, 6 y/x voxels
    target, _ = targets.build(spec)(Patch(labels, voxel_size=(30.0, 6.0, 6.0)))
    expected = local_shape_descriptors(labels, (30, 36, 36), (30, 6, 6), factor, np.float16)
    np.testing.assert_array_equal(target, expected)


def test_validate_with_data_needs_a_voxel_size_for_lsd(write, tmp_path):
    np.save(tmp_path / "image.npy", np.zeros((16, 64, 64), np.uint8))
    np.save(tmp_path / "labels.npy", np.ones((16, 64, 64), np.uint32))
    source = f"a: {{image: {tmp_path}/image.npy, labels: {tmp_path}/labels.npy}}"
    text = MINIMAL.replace("a: {type: synthetic, shape: [16, 64, 64], seed: 1}", source)
    path = write(text.replace("tasks:\n", "tasks:\n  lsd: {target: {type: lsd, sigma: 30}}\n"))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert "data.sources.a: has no voxel size" in result.stderr and "'lsd'" in result.stderr
    fixed = CliRunner().invoke(app, ["validate", str(path), "-o",
                                     "data.sources.a.voxel_size=[30, 6, 6]"])
    assert fixed.exit_code == 0, fixed.output
    assert CliRunner().invoke(app, ["validate", str(path), "--no-data"]).exit_code == 0


def test_a_signed_distance_with_uint8_outputs_is_warned_about(write):
    text = MINIMAL.replace("tasks:\n", "tasks:\n  dist: {target: {type: distance, "
                                       "signed: true}}\n")
    result = CliRunner().invoke(app, ["validate", str(write(text)), "--no-data"])
    assert result.exit_code == 0, result.output
    assert "infer.dtype" in result.stderr and "negative half" in result.stderr
    quiet = CliRunner().invoke(app, ["validate", str(write(text)), "--no-data", "-o",
                                     "infer.dtype=float16"])
    assert quiet.exit_code == 0 and "negative half" not in quiet.stderr


def test_a_tanh_task_with_uint8_outputs_is_warned_about_too(write):
    """Only a signed distance was warned about; any task whose activation is tanh loses its
    negative half in uint8 outputs as well."""
    text = MINIMAL.replace("tasks:\n", "tasks:\n  dist: {target: {type: distance}, "
                                       "activation: tanh}\n")
    result = CliRunner().invoke(app, ["validate", str(write(text)), "--no-data"])
    assert result.exit_code == 0, result.output
    assert "negative half of the task 'dist' (activation tanh)" in result.stderr
