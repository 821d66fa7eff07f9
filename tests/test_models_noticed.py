"""Model recipes noticed wanting: summaries that hide the down- and upsampling, widths and
kernels bounded only by 1e6, rsunet's anisotropic kernel described by one key only, and
every model type at its smallest recipes (one level, the divisor as patch, z = 1)."""

from __future__ import annotations

import pytest
import torch
from conftest import MINIMAL
from typer.testing import CliRunner

from emrun.cli import app
from emrun.models import build_model, parameter_count
from emrun.recipe import load_recipe
from emrun.recipe import model as model_recipe
from emrun.recipe.model import RSUNet, UpDown
from emrun.recipe.unets import MedNeXt, ResEnc
from emrun.registry import models

runner = CliRunner()
MODEL = "model: {type: rsunet, widths: [4, 8]}"


def with_model(model: str, patch: str | None = None, target: str | None = None) -> str:
    """MINIMAL with this model line (on line 5), and optionally this patch and target."""
    text = MINIMAL.replace(MODEL, f"model: {model}")
    if patch is not None:
        text = text.replace("patch: [8, 32, 32]", f"patch: {patch}")
    if target is not None:
        text = text.replace("target: {type: affinity}", f"target: {target}")
    return text


def refused(write, text: str) -> str:
    """`emrun validate`'s message for a recipe it must refuse as the user's mistake."""
    path = write(text)
    result = runner.invoke(app, ["validate", str(path), "--no-data"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.stderr.replace(str(path), "recipe.yaml")


# ------------------------------------------------------------- 1. summaries show sampling

SAMPLED = [
    RSUNet(widths=[4, 8, 8], downsample=[(1, 2, 2), (2, 2, 2)]),
    UpDown(widths=[4, 8, 8], downsample=[(1, 2, 2), (2, 2, 2)]),
    ResEnc(widths=[4, 8, 8], downsample=[(1, 2, 2), (2, 2, 2)]),
    MedNeXt(widths=[4, 8, 8], downsample=[(1, 2, 2), (2, 2, 2)]),
]


@pytest.mark.parametrize("spec", SAMPLED, ids=lambda s: s.type)
def test_summary_shows_the_down_and_upsampling_factor_of_every_level(spec):
    """The summary (`emrun validate`, the export manifest) listed widths, norm and
    activation only: a (1,2,2)- and a (2,2,2)-pooled network read the same."""
    text = spec.summary()
    assert "down [1x2x2, 2x2x2] by " in text and "up [1x2x2, 2x2x2] by " in text
    isotropic = spec.model_copy(update={"downsample": [(2, 2, 2), (2, 2, 2)]})
    assert isotropic.summary() != text


@pytest.mark.parametrize("spec", SAMPLED, ids=lambda s: s.type)
def test_summary_says_how_each_model_down_and_upsamples(spec):
    how = {"rsunet": ("max pool", "trilinear interpolation"),
           "updown": ("max pool", "trilinear interpolation"),
           "resenc": ("strided conv", "transposed conv"),
           "mednext": ("strided depthwise conv", "transposed depthwise conv")}[spec.type]
    assert f"] by {how[0]}, up [" in spec.summary()
    assert f"] by {how[1]}" in spec.summary()


@pytest.mark.parametrize("cls", [RSUNet, ResEnc, MedNeXt])
def test_a_one_level_summary_says_it_does_not_resample(cls):
    assert "one level (no down- or upsampling)" in cls(widths=[8]).summary()


def test_validate_prints_the_sampling_in_the_model_line(write):
    result = runner.invoke(app, ["validate", str(write(MINIMAL)), "--no-data"])
    assert result.exit_code == 0, result.output
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("model rsunet"))
    assert "down [1x2x2] by max pool, up [1x2x2] by trilinear interpolation" in line


def test_summary_shows_the_kernel_of_the_anisotropic_levels():
    assert "kernel 3x5x5 (1x3x3 at levels [0])" in \
        RSUNet(widths=[4, 8], kernel=(3, 5, 5), anisotropic_levels=[0]).summary()
    assert "kernel 3x5x5 (1x5x5 at levels [0])" in \
        ResEnc(widths=[4, 8], kernel=(3, 5, 5), anisotropic_levels=[0]).summary()


def test_bench_model_names_the_models_sampling(write):
    from emrun.bench.model import bench_model

    recipe = load_recipe(write(with_model("{type: rsunet, widths: [2, 2]}"))).recipe
    result = bench_model(recipe, device="cpu", steps=1, warmup=0, compile_=False)
    assert result["model"] == "rsunet" and "down [1x2x2]" in result["summary"]


# -------------------------------------------------------------- 2. widths and kernel bounds


@pytest.mark.parametrize("kind", ["rsunet", "updown", "resenc", "mednext"])
def test_a_width_typo_is_a_located_error_not_an_allocation(write, kind):
    """widths [4, 8, 640000] passed validation (bounded by 1e6) and then failed as an
    out-of-memory error or a huge allocation."""
    message = refused(write, with_model(f"{{type: {kind}, widths: [4, 8, 640000]}}"))
    assert "recipe.yaml:5:" in message and "model.widths.2" in message
    assert "4096" in message and "640000" in message


@pytest.mark.parametrize("key", ["kernel", "input_kernel"])
def test_an_rsunet_kernel_above_15_is_a_located_error(write, key):
    message = refused(write, with_model(f"{{type: rsunet, widths: [4, 8], {key}: [1, 3, 99]}}"))
    assert "recipe.yaml:5:" in message and f"model.{key}.2" in message and "15" in message


def test_widths_and_kernels_up_to_the_bounds_are_accepted():
    """The bounds refuse typos only: 4,096 channels, 15-voxel kernels still validate."""
    assert RSUNet(widths=[4096], norm="none").parameter_count([]) < model_recipe.MAX_PARAMETERS
    RSUNet(widths=[8, 16], kernel=(15, 15, 15), input_kernel=(15, 15, 15))
    ResEnc(widths=[8, 4096], kernel=(1, 3, 3), blocks=[1, 1], downsample=[(1, 1, 1)])
    MedNeXt(widths=[8], kernel=(15, 15, 15), blocks=[1])


@pytest.mark.parametrize("kind", ["rsunet", "updown", "resenc", "mednext"])
def test_a_network_too_large_for_any_machine_is_refused_stating_its_size(write, kind):
    """Widths that are each within the bound can still make an absurd network: 8 levels of
    4,096 channels have billions of parameters; the error says how many and at which key."""
    widths = "[4096, 4096, 4096, 4096, 4096, 4096, 4096, 4096]"
    downsample = "[" + ", ".join(["[1, 1, 1]"] * 7) + "]"
    message = refused(write, with_model(
        f"{{type: {kind}, widths: {widths}, downsample: {downsample}}}"))
    assert "recipe.yaml:5:" in message and "model.widths:" in message
    assert "parameters" in message and "GiB" in message
    assert f"{model_recipe.MAX_PARAMETERS:,}" in message


def test_the_size_check_points_at_the_kernel_when_only_the_kernel_was_written():
    with pytest.raises(ValueError) as caught:
        ResEnc.model_validate({"kernel": (15, 15, 15), "blocks": [8, 8, 8, 8]})
    assert caught.value.errors()[0]["ctx"]["error"].key == "kernel"


PARAMETER_SPECS = [
    ResEnc(widths=[4, 8, 6], blocks=[2, 1, 3], downsample=[(1, 2, 2), (1, 1, 1)]),
    ResEnc(widths=[4, 4], blocks=[1, 2], upsample="interp", norm="none"),
    ResEnc(widths=[2], blocks=[3], norm="group", groups=2, in_channels=3),
    MedNeXt(widths=[4, 8, 6], blocks=[2, 1, 3], expansion=3, anisotropic_levels=[0]),
    MedNeXt(widths=[2], blocks=[1], norm="none", in_channels=2),
]


@pytest.mark.parametrize("spec", PARAMETER_SPECS, ids=lambda s: s.type)
def test_the_parameter_count_from_the_spec_is_the_built_models(spec):
    """The size check counts parameters without torch: it must count what torch builds."""
    model = models.build(spec, head_channels={"a": 3, "b": 1})
    assert spec.parameter_count([3, 1]) == parameter_count(model)


# ----------------------------------------------------- 3. rsunet's anisotropic levels' kernel


def test_rsunet_kernel_and_anisotropic_levels_both_say_the_fixed_1x3x3():
    """An rsunet anisotropic level is 1x3x3 whatever `kernel` says (resenc and mednext take
    1 x kernel_y x kernel_x): `kernel`'s description did not say so, only the other key."""
    spec = RSUNet(widths=[4, 8], kernel=(3, 5, 5), anisotropic_levels=[1])
    assert spec.level_kernel(1) == (1, 3, 3) and spec.level_kernel(0) == (3, 5, 5)
    kernel = RSUNet.model_fields["kernel"].description or ""
    levels = RSUNet.model_fields["anisotropic_levels"].description or ""
    assert "anisotropic_levels" in kernel and "1x3x3" in kernel
    assert "1x3x3" in levels and "resenc" in levels
    model = models.build(spec, head_channels={"a": 1})
    assert tuple(model.encoders[1].pre.conv.kernel_size) == (1, 3, 3)
    assert tuple(model.encoders[0].pre.conv.kernel_size) == (3, 5, 5)


# ------------------------------------------------ 4. the smallest recipes build and run


def forward_problems(recipe) -> list[str]:
    """Run the recipe's model on CPU at its train patch, in train (the recipe's batch size)
    and eval mode; what comes out other than (batch, channels, *patch), finite."""
    torch.manual_seed(0)
    model = build_model(recipe)
    patch = tuple(recipe.train.patch)
    heads = recipe.head_channels()
    problems = []
    for training, batch in ((True, recipe.train.batch_size), (False, 1)):
        model.train(training)
        with torch.no_grad():
            out = model(torch.rand(batch, recipe.model.input_channels(), *patch))
        for task, channels in heads.items():
            y = out[task]
            if tuple(y.shape) != (batch, channels, *patch) or not torch.isfinite(y).all():
                problems.append(f"{task} {'train' if training else 'eval'}: {tuple(y.shape)}")
    return problems


SMALL_MODELS = {
    "rsunet": "{type: rsunet, widths: [2], norm: NORM, groups: 2}",
    "updown": "{type: updown, widths: [2], norm: NORM, groups: 2, factor: [1, 2, 2]}",
    "resenc": "{type: resenc, widths: [2], blocks: [1], norm: NORM, groups: 2}",
    "mednext": "{type: mednext, widths: [2], blocks: [1], norm: NORM, groups: 2}",
}
BOUNDARY = "{type: boundary}"


@pytest.mark.parametrize("norm", ["batch", "group", "instance", "none"])
@pytest.mark.parametrize("kind", list(SMALL_MODELS))
def test_one_level_models_at_their_smallest_2d_patch_build_and_run(write, kind, norm):
    """Widths of length 1, a z = 1 patch twice the divisor in-plane: accepted, and the model
    gives the stated output shape in train and eval mode."""
    model = SMALL_MODELS[kind].replace("NORM", norm)
    probe = load_recipe(write(with_model(model, target=BOUNDARY))).recipe
    d = probe.model.divisor()
    patch = [1, 2 * d[1], 2 * d[2]]
    recipe = load_recipe(write(with_model(model, str(patch), BOUNDARY))).recipe
    assert forward_problems(recipe) == []


DEEP_MODELS = {
    "rsunet": "{type: rsunet, widths: [4, 4], norm: NORM, groups: 2, kernel: KERNEL}",
    "updown": "{type: updown, widths: [4, 4], norm: NORM, groups: 2, kernel: KERNEL}",
    "resenc": "{type: resenc, widths: [4, 4], blocks: [1, 1], norm: NORM, groups: 2, "
              "kernel: KERNEL}",
    "mednext": "{type: mednext, widths: [4, 4], blocks: [1, 1], norm: NORM, groups: 2, "
               "kernel: KERNEL, expansion: 1}",
}


@pytest.mark.parametrize("norm", ["batch", "group", "instance", "none"])
@pytest.mark.parametrize("kind", list(DEEP_MODELS))
def test_the_smallest_patch_validation_accepts_runs_or_is_refused_at_the_patch(
        write, kind, norm):
    """A patch equal to the divisor (batch 1) is either refused at train.patch (one voxel
    at the deepest level, where the norm has no statistics) or builds and runs."""
    model = DEEP_MODELS[kind].replace("NORM", norm).replace("KERNEL", "[1, 3, 3]")
    probe = load_recipe(write(with_model(model, target=BOUNDARY))).recipe
    patch = str(list(probe.model.divisor()))
    text = with_model(model, patch, BOUNDARY)
    if norm in ("batch", "instance"):
        assert "train.patch" in refused(write, text)
    else:
        assert forward_problems(load_recipe(write(text)).recipe) == []


@pytest.mark.parametrize("kind", list(DEEP_MODELS))
def test_even_kernels_are_refused_at_the_kernel(write, kind):
    model = DEEP_MODELS[kind].replace("NORM", "none").replace("KERNEL", "[3, 4, 4]")
    message = refused(write, with_model(model))
    assert "recipe.yaml:5:" in message and "model.kernel" in message and "odd" in message


@pytest.mark.parametrize("kind", list(DEEP_MODELS))
@pytest.mark.parametrize("kernel", ["[1, 1, 1]", "[5, 5, 5]"])
def test_odd_kernels_are_accepted_and_run_or_refused_at_a_key(write, kind, kernel):
    """1x1x1 and 5x5x5: mednext refuses a kernel smaller than the factor (located), every
    other accepted recipe runs."""
    model = DEEP_MODELS[kind].replace("NORM", "group").replace("KERNEL", kernel)
    text = with_model(model, "[4, 8, 8]")
    if kind == "mednext" and kernel == "[1, 1, 1]":
        assert "model.kernel: level 1's kernel" in refused(write, text)
    else:
        assert forward_problems(load_recipe(write(text)).recipe) == []
