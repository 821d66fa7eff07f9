"""resenc (nnU-Net ResEnc) and mednext (MedNeXt): shapes, parameters, receptive fields,
persistence, and the user's paths (validate, train, infer with TTA, export, bench model)
on the CPU."""

from __future__ import annotations

import importlib.util
import io
import json
import re

import numpy as np
import pytest
import torch
from conftest import ROOT
from typer.testing import CliRunner

from emrun.cli import app
from emrun.io import open_volume, write_volume
from emrun.models import parameter_count
from emrun.models.facts import empirical_receptive_field, flops_per_voxel, model_facts
from emrun.recipe.unets import MedNeXt, ResEnc
from emrun.registry import models

HEADS = {"affinity": 3, "mito": 1}
runner = CliRunner()


def build(spec, heads=HEADS, seed=0):
    torch.manual_seed(seed)
    return models.build(spec, head_channels=heads)


def image(shape, seed=1):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


SPECS = [
    ResEnc(widths=[4, 8], blocks=[1, 2], downsample=[(1, 2, 2)]),
    ResEnc(widths=[4, 8, 8], blocks=[2, 1, 1], upsample="interp", norm="batch",
           activation="relu", anisotropic_levels=[0]),
    ResEnc(widths=[4, 8, 8], blocks=[1, 1, 1], downsample=[(2, 2, 2), (1, 3, 3)],
           kernel=(3, 5, 3), norm="group", groups=2, anisotropic_levels=[]),
    MedNeXt(widths=[4, 8], blocks=[1, 1], downsample=[(1, 2, 2)]),
    MedNeXt(widths=[4, 8, 8], blocks=[1, 2, 1], expansion=3, kernel=(3, 7, 7),
            anisotropic_levels=[0], norm="batch"),
    MedNeXt(widths=[4, 8, 8], blocks=[1, 1, 1], downsample=[(2, 2, 2), (1, 3, 3)],
            kernel=(3, 3, 5), norm="group", groups=2),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.type)
def test_output_size_equals_input_size_for_every_multiple_of_the_divisor(spec):
    model = build(spec).eval()
    d = spec.divisor()
    with torch.no_grad():
        for mult in [(2, 1, 1), (3, 2, 1)]:  # instance norm needs 2 voxels at the bottom
            size = tuple(a * m for a, m in zip(d, mult, strict=True))
            out = model(image((2, 1, *size)))
            assert list(out) == list(HEADS)
            assert {k: v.shape for k, v in out.items()} == {
                k: (2, c, *size) for k, c in HEADS.items()}


def test_default_downsampling_is_in_plane_twice_then_isotropic():
    assert ResEnc().factors() == [(1, 2, 2), (1, 2, 2), (2, 2, 2)]
    assert ResEnc().divisor() == (2, 8, 8)
    assert MedNeXt(widths=[4, 8], blocks=[1, 1]).divisor() == (1, 2, 2)
    assert MedNeXt(widths=[4] * 5, blocks=[1] * 5).divisor() == (4, 16, 16)
    assert ResEnc().level_kernel(1) == (1, 3, 3) and ResEnc().level_kernel(2) == (3, 3, 3)


def test_default_blocks_follow_the_number_of_levels():
    assert ResEnc().level_blocks() == [1, 3, 4, 6]
    assert ResEnc(widths=[4, 8, 8, 8, 8, 8]).level_blocks() == [1, 3, 4, 6, 6, 6]
    assert MedNeXt(widths=[4, 8, 8]).level_blocks() == [2, 2, 2]
    assert ResEnc(widths=[4, 8], blocks=[2, 5]).level_blocks() == [2, 5]


@pytest.mark.parametrize(("spec", "size", "divisor"), [
    (ResEnc(widths=[4, 8, 16], blocks=[1, 1, 1]), (4, 8, 6), "(1, 4, 4)"),
    (MedNeXt(widths=[4, 8], blocks=[1, 1]), (3, 8, 5), "(1, 2, 2)"),
])
def test_unacceptable_size_raises_naming_the_divisor(spec, size, divisor):
    with pytest.raises(ValueError, match=re.escape(divisor)):
        build(spec)(image((1, 1, *size)))


def test_resenc_parameters_by_hand():
    spec = ResEnc(widths=[2, 4], blocks=[1, 1], norm="none", kernel=(1, 1, 1),
                  anisotropic_levels=[], downsample=[(1, 2, 2)])
    conv = lambda a, b, k=1: a * b * k + b  # noqa: E731
    expected = (conv(1, 2)  # stem
                + 2 * conv(2, 2)  # level 0: one block, identity shortcut
                + conv(2, 4) + conv(4, 4) + conv(2, 4)  # level 1: strided block + projection
                + conv(4, 2, 4)  # transposed conv 1x2x2
                + conv(4, 2)  # decoder conv on the concatenation
                + conv(2, 3) + conv(2, 1))  # heads
    assert parameter_count(build(spec)) == expected
    normed = spec.model_copy(update={"norm": "instance"})
    # norms after: stem (2), block 0 (2 + 2), block 1 (4 + 4 + projection 4), decoder (2)
    assert parameter_count(build(normed)) - expected == 2 * (2 + 4 + 12 + 2)


def test_mednext_parameters_by_hand():
    spec = MedNeXt(widths=[2, 4], blocks=[1, 1], kernel=(1, 3, 3), expansion=2,
                   downsample=[(1, 2, 2)], norm="instance")
    conv = lambda a, b, k=1: a * b * k + b  # noqa: E731

    def block(c_in, c_out, residual=0):
        depthwise = c_in * 9 + c_in
        return depthwise + 2 * c_in + conv(c_in, 2 * c_in) + conv(2 * c_in, c_out) + residual

    expected = (conv(1, 2)  # stem
                + block(2, 2) + block(4, 4)  # encoder blocks
                + block(2, 4, conv(2, 4))  # down block with its strided 1x1x1 residual
                + block(4, 2, conv(4, 2))  # up block with its transposed 1x1x1 residual
                + block(2, 2)  # decoder block
                + conv(2, 3) + conv(2, 1))
    assert parameter_count(build(spec)) == expected


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.type)
def test_gradients_reach_every_parameter(spec):
    model = build(spec).train()
    out = model(image((2, 1, *(2 * d for d in spec.divisor()))))
    sum(o.square().mean() for o in out.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


def test_receptive_fields_of_two_level_models_by_hand():
    # resenc, 3x3x3 everywhere, z unpooled: stem 2 + level 0 block 2x2 + level 1 block 2x2
    # + decoder conv 2 -> 13. y: the decoder conv needs 3 fine voxels, the 1x2x2 transposed
    # conv 2 coarse ones, level 1's second conv 4, its strided conv [2c-1, 2c+7] 9 fine
    # voxels, level 0's block 13 and the stem 15.
    resenc = ResEnc(widths=[4, 8], blocks=[1, 1], anisotropic_levels=[],
                    downsample=[(1, 2, 2)])
    assert resenc.receptive_field() == (13, 15, 15)
    # mednext, 3x3x3: z: five depthwise convs (decoder, up, level 1, down, level 0) -> 11;
    # y: 3 fine voxels, the up block's transposed conv (k 3, stride 2) reads 3 coarse ones for
    # even outputs, level 1's block 5, the down block's strided conv 11, level 0's block 13.
    mednext = MedNeXt(widths=[4, 8], blocks=[1, 1], kernel=(3, 3, 3), downsample=[(1, 2, 2)])
    assert mednext.receptive_field() == (11, 13, 13)
    assert model_facts(build(mednext), mednext, (2, 2, 2)).receptive_field == (11, 13, 13)


@pytest.mark.parametrize("spec", [
    *SPECS,
    ResEnc(widths=[4, 8, 16], blocks=[1, 2, 3], upsample="transpose",
           downsample=[(4, 1, 2), (2, 3, 2)], kernel=(1, 3, 5)),
    MedNeXt(widths=[4, 8, 16], blocks=[2, 1, 2], downsample=[(1, 2, 2), (2, 2, 2)],
            kernel=(3, 5, 5), anisotropic_levels=[0]),
], ids=lambda s: s.type)
def test_empirical_receptive_field_matches_the_analytic_one(spec):
    assert empirical_receptive_field(spec) == spec.receptive_field()


@pytest.mark.parametrize("spec", [
    ResEnc(widths=[4, 8], blocks=[1, 1], norm="batch", downsample=[(1, 2, 2)]),
    MedNeXt(widths=[4, 8], blocks=[1, 1], norm="batch", downsample=[(1, 2, 2)]),
], ids=lambda s: s.type)
def test_gradient_of_the_real_model_stays_within_the_analytic_field(spec):
    """An impulse probe on the real model (random weights, real activations)."""
    model = build(spec).eval()  # batch norm in eval: pointwise
    x = torch.zeros((1, 1, 32, 64, 64), requires_grad=True)
    model(x)["affinity"][0, 0, 16, 32, 32].backward()
    hit = torch.nonzero(x.grad[0, 0])
    extent = tuple(int(hit[:, a].max() - hit[:, a].min() + 1) for a in range(3))
    rf = spec.receptive_field()
    assert all(e <= r for e, r in zip(extent, rf, strict=True))
    assert extent[0] == rf[0]  # z is not pooled: every path is reached


@pytest.mark.parametrize("spec", SPECS[:1] + SPECS[3:4], ids=lambda s: s.type)
def test_flops_per_voxel_positive_and_constant_across_patches(spec):
    model = build(spec)
    d = spec.divisor()
    small = flops_per_voxel(model, (2 * d[0], d[1], d[2]))  # instance norm: 2 voxels deep
    assert small > 0
    assert flops_per_voxel(model, tuple(4 * a for a in d)) == pytest.approx(small)


@pytest.mark.parametrize("spec", SPECS[1:2] + SPECS[4:5], ids=lambda s: s.type)
def test_saved_and_loaded_model_gives_identical_outputs(spec):
    model = build(spec)
    x = image((1, 1, *(2 * d for d in spec.divisor())))
    model.train()(x)  # move batch-norm running statistics
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    again = build(spec, seed=5)
    again.load_state_dict(torch.load(buffer))
    with torch.no_grad():
        a, b = model.eval()(x), again.eval()(x)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("spec", [ResEnc(), MedNeXt(), ResEnc(norm="batch"),
                                  MedNeXt(norm="batch")], ids=lambda s: f"{s.type}-{s.norm}")
def test_default_models_start_with_outputs_of_order_one(spec):
    """Residual streams must not grow with depth at initialisation (trainable from step 1)."""
    model = build(spec).train()  # what the first training step sees
    with torch.no_grad():
        out = model(image((2, 1, 4, 16, 16)))["affinity"]
    assert 0 < float(out.std()) < 5  # mednext with He init instead: ~16


@pytest.mark.parametrize("spec", SPECS[:1] + SPECS[3:4], ids=lambda s: s.type)
def test_torch_compile_traces_the_model(spec):
    """Dynamo + AOT autograd (no code generation): the model is traceable for `bench model`
    and `train.compile`."""
    model = build(spec, heads={"affinity": 3})
    compiled = torch.compile(model, backend="aot_eager")
    x = image((1, 1, 2, 8, 8))
    out = compiled(x)["affinity"]
    out.sum().backward()
    torch.testing.assert_close(out, model(x)["affinity"], rtol=1e-4, atol=1e-5)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("spec", SPECS[1:2] + SPECS[4:5], ids=lambda s: s.type)
def test_channels_last_3d_matches_contiguous(spec):
    model = build(spec).eval()
    x = image((1, 1, *(2 * d for d in spec.divisor())))
    with torch.no_grad():
        ref = model(x)
        fast = model.to(memory_format=torch.channels_last_3d)(
            x.contiguous(memory_format=torch.channels_last_3d))
    for task in HEADS:
        torch.testing.assert_close(fast[task], ref[task], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------- as the user runs them

RECIPE = """\
name: tiny-{type}
data:
  sources:
    a: {{type: synthetic, shape: [8, 32, 32], seed: 1}}
model: {{type: {type}, widths: [4, 8], blocks: [1, 1]}}
tasks:
  affinity:
    target: {{type: affinity}}
train:
  patch: [4, 16, 16]
  iterations: 2
  workers: 0
  validate_every: 0
  checkpoint_every: 2
  log_every: 1
  image_every: 0
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["resenc", "mednext"])
def test_validate_train_infer_tta_export_and_bench(kind, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(RECIPE.format(type=kind))
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 0, result.output
    assert f"{kind} with 2 levels" in result.output or f"model {kind}" in result.output
    assert "receptive field unknown" not in result.output

    run = tmp_path / "run"
    result = runner.invoke(app, ["train", str(recipe), "--run-dir", str(run), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    checkpoint = run / "checkpoints" / "last.pt"
    assert checkpoint.exists()

    write_volume(tmp_path / "vol.zarr", "image", np.random.default_rng(0).integers(
        0, 255, (8, 32, 32)).astype(np.uint8))
    for tta in ("1", "4"):
        out = tmp_path / f"pred{tta}.zarr"
        result = runner.invoke(app, ["infer", "--checkpoint", str(checkpoint), "--input",
                                     str(tmp_path / "vol.zarr/image"), "--output", str(out),
                                     "--device", "cpu", "--tta", tta])
        assert result.exit_code == 0, result.output
        got = open_volume(f"{out}/affinity").read()
        assert got.shape == (3, 8, 32, 32) and np.isfinite(got).all()
    assert not np.allclose(open_volume(f"{tmp_path}/pred1.zarr/affinity").read(),
                           open_volume(f"{tmp_path}/pred4.zarr/affinity").read())  # TTA acted

    # a model package predicts the checkpoint's bits; the ONNX export matches PyTorch
    package = tmp_path / "net.emrun"
    result = runner.invoke(app, ["export", str(run), str(package)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["infer", "--model", str(package), "--input",
                                 str(tmp_path / "vol.zarr/image"), "--output",
                                 str(tmp_path / "pkg.zarr"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(open_volume(f"{tmp_path}/pkg.zarr/affinity").read(),
                                  open_volume(f"{tmp_path}/pred1.zarr/affinity").read())
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnxscript"):
        result = runner.invoke(app, ["export", str(run), str(tmp_path / "net.onnx"),
                                     "--format", "onnx"])
        assert result.exit_code == 0, result.output
        assert "onnxruntime matches PyTorch" in result.stdout

    result = runner.invoke(app, ["bench", "model", str(recipe), "--no-compile", "--steps", "1",
                                 "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["model"] == kind
    model = build(ResEnc(widths=[4, 8], blocks=[1, 1]) if kind == "resenc"
                  else MedNeXt(widths=[4, 8], blocks=[1, 1]), heads={"affinity": 3})
    assert figures["params"] == parameter_count(model)
    spec_rf = (ResEnc if kind == "resenc" else MedNeXt)(widths=[4, 8], blocks=[1, 1])
    assert figures["receptive_field"] == list(spec_rf.receptive_field())
    assert figures["flops_per_voxel"] > 0 and figures["step_voxels_per_s"] > 0


# ----------------------------------------------------------------- bad recipes

BAD = [  # corpus case, the key its one message must name
    ("resenc_patch_not_divisible", "train.patch"),
    ("resenc_zero_blocks", "model.blocks.1"),
    ("resenc_blocks_wrong_count", "blocks"),
    ("mednext_kernel_too_large", "model.kernel.2"),
    ("mednext_even_kernel", "kernel"),
    ("mednext_kernel_below_factor", "downsample"),
    ("mednext_expansion_zero", "model.expansion"),
]


@pytest.mark.parametrize(("name", "key"), BAD)
def test_a_bad_model_recipe_exits_2_with_one_located_message_naming_the_key(name, key):
    path = ROOT / "tests" / "bad_recipes" / f"{name}.yaml"
    expect = re.match(r"# expect: (\d+): (.+)$", path.read_text().split("\n", 1)[0])
    assert expect
    result = runner.invoke(app, ["validate", str(path), "--no-data"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert f"{path.name}:{expect[1]}:" in lines[0] and expect[2] in lines[0]
    assert key in lines[0]


def test_a_patch_leaving_one_voxel_for_instance_norm_is_refused(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(type="resenc").replace("patch: [4, 16, 16]",
                                                           "patch: [1, 2, 2]"))
    result = runner.invoke(app, ["validate", str(recipe), "--no-data"])
    assert result.exit_code == 2
    assert "train.patch: [1, 2, 2] leaves one voxel at the deepest level" in result.stderr
    ok = runner.invoke(app, ["validate", str(recipe), "--no-data", "-o",
                             "model.norm=batch", "-o", "train.patch=[2, 2, 2]"])
    assert "train.patch" not in ok.stderr


def test_a_one_level_resenc_builds_without_naming_a_key_not_written():
    """The default in-plane levels [0, 1] made a one-level ResEnc fail validation with
    'anisotropic_levels [1] outside 0..0', a key the recipe never wrote."""
    from emrun.recipe.unets import ResEnc

    spec = ResEnc(widths=[8])
    assert spec.anisotropic_levels == [0] and ResEnc(widths=[8, 16]).anisotropic_levels == [0, 1]
    with pytest.raises(ValueError, match=r"anisotropic_levels \[1\] outside 0..0"):
        ResEnc(widths=[8], anisotropic_levels=[1])  # written: still refused
