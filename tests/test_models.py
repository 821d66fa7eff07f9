"""Models: RSUNet / UpDown shapes, parameters, gradients, persistence, speed features, facts."""

from __future__ import annotations

import io
import math
import os
import re

import pytest
import torch
from conftest import MINIMAL

from emrun.models import build_model, parameter_count
from emrun.models.facts import (
    ModelFacts,
    empirical_receptive_field,
    flops_per_voxel,
    model_facts,
)
from emrun.recipe import load_recipe
from emrun.recipe.model import RSUNet, UpDown
from emrun.registry import models

HEADS = {"affinity": 3, "mito": 1}
NORMS = ["batch", "group", "instance", "none"]


def build(spec, heads=HEADS, seed=0):
    torch.manual_seed(seed)
    return models.build(spec, head_channels=heads)


def image(shape, seed=1):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("spec", "sizes"), [
    (RSUNet(widths=[4, 8]), [(1, 2, 2), (3, 8, 8), (5, 12, 20)]),
    (RSUNet(widths=[4, 8, 16], upsample="transpose"), [(2, 4, 4), (3, 12, 8)]),
    (RSUNet(widths=[4, 8, 16], downsample=[(2, 2, 2), (2, 2, 2)], activation="relu"),
     [(4, 4, 4), (8, 12, 4)]),
    (RSUNet(widths=[4, 8, 8], downsample=[(1, 2, 2), (2, 2, 2)], anisotropic_levels=[0],
            kernel=(3, 3, 3)), [(2, 4, 4), (6, 8, 12)]),
    (RSUNet(widths=[4]), [(1, 1, 1), (3, 5, 7)]),
    (UpDown(widths=[4, 8]), [(1, 4, 4), (3, 8, 12)]),
    (UpDown(widths=[4, 8], factor=(2, 2, 2), upsample="transpose"), [(2, 4, 4), (4, 8, 12)]),
])
def test_output_size_equals_input_size(spec, sizes):
    model = build(spec).eval()
    with torch.no_grad():
        for size in sizes:
            out = model(image((2, 1, *size)))
            assert list(out) == list(HEADS)  # heads in recipe order
            for task, channels in HEADS.items():
                assert out[task].shape == (2, channels, *size)


def test_even_kernels_are_refused_by_the_spec():
    with pytest.raises(ValueError, match="kernel sizes must be odd"):
        RSUNet(widths=[4, 8], kernel=(2, 2, 3))


@pytest.mark.parametrize(("spec", "size", "divisor"), [
    (RSUNet(widths=[4, 8, 16]), (4, 8, 6), "(1, 4, 4)"),
    (RSUNet(widths=[4, 8], downsample=[(2, 2, 2)]), (3, 8, 8), "(2, 2, 2)"),
    (UpDown(widths=[4, 8]), (2, 6, 8), "(1, 4, 4)"),
])
def test_unacceptable_size_raises_naming_the_divisor(spec, size, divisor):
    model = build(spec)
    with pytest.raises(ValueError, match=re.escape(f"multiple of the divisor {divisor}")):
        model(image((1, 1, *size)))


def test_wrong_input_channels_or_rank_raise():
    model = build(RSUNet(widths=[4, 8], in_channels=2))
    with pytest.raises(ValueError, match="2 input channel"):
        model(image((1, 1, 2, 4, 4)))
    with pytest.raises(ValueError, match="5D input"):
        model(image((2, 2, 4, 4)))
    with pytest.raises(ValueError, match="at least one task head"):
        build(RSUNet(widths=[4, 8]), heads={})


@pytest.mark.parametrize("widths", [[4, 8], [4, 8, 16]])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("upsample", ["interp", "transpose"])
def test_parameter_count_matches_the_spec_formula(widths, norm, upsample):
    spec = RSUNet(widths=widths, norm=norm, groups=4, upsample=upsample, in_channels=2,
                  anisotropic_levels=[len(widths) - 1], downsample=[(2, 2, 2)] * (len(widths) - 1))
    assert parameter_count(build(spec)) == spec.parameter_count(list(HEADS.values()))


def test_updown_adds_no_parameters():
    spec = UpDown(widths=[4, 8], factor=(2, 2, 2))
    assert parameter_count(build(spec)) == spec.parameter_count([3, 1])
    assert parameter_count(build(spec)) == parameter_count(build(RSUNet(widths=[4, 8])))


@pytest.mark.parametrize("spec", [
    RSUNet(widths=[4, 8]),
    RSUNet(widths=[4, 8, 8], norm="group", groups=2, upsample="transpose", activation="gelu"),
    RSUNet(widths=[4, 8], norm="instance", activation="leaky_relu"),
    RSUNet(widths=[4, 8], norm="none", activation="relu"),
    UpDown(widths=[4, 8]),
])
def test_gradients_reach_every_parameter(spec):
    model = build(spec).train()
    out = model(image((2, 1, 2, 16, 16)))
    loss = sum((y * torch.randn_like(y)).sum() for y in out.values())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.norm() > 0, name


@pytest.mark.parametrize("norm", NORMS)
def test_saved_and_loaded_model_gives_identical_outputs(norm):
    spec = RSUNet(widths=[4, 8], norm=norm, groups=2)
    model = build(spec, seed=0).train()
    with torch.no_grad():
        for i in range(2):  # move the batch-norm running statistics off their defaults
            model(image((2, 1, 2, 8, 8), seed=10 + i))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = build(spec, seed=123)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    model.eval()
    fresh.eval()
    x = image((1, 1, 3, 8, 8))
    with torch.no_grad():
        a, b = model(x), fresh(x)
    for task in HEADS:
        assert torch.equal(a[task], b[task])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("norm", NORMS)
def test_bf16_cpu_autocast_is_close_to_fp32(norm):
    model = build(RSUNet(widths=[4, 8], norm=norm, groups=2)).eval()
    x = image((1, 1, 4, 16, 16))
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    for task in HEADS:
        assert low[task].dtype == torch.bfloat16
        assert relative_error(low[task], ref[task]) < 5e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_is_close_to_fp32(dtype):
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("bf16 not supported on this GPU")
    model = build(RSUNet(widths=[4, 8, 16], upsample="transpose")).cuda().eval()
    model = model.to(memory_format=torch.channels_last_3d)
    x = image((1, 1, 4, 16, 16)).cuda().contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cuda", dtype=dtype):
            low = model(x)
    for task in HEADS:
        assert low[task].dtype == dtype
        assert relative_error(low[task], ref[task]) < 5e-2


@pytest.mark.parametrize("spec", [
    RSUNet(widths=[4, 8], norm="batch"),
    RSUNet(widths=[4, 8, 8], norm="group", groups=2, upsample="transpose"),
    RSUNet(widths=[4, 8], norm="instance"),
    UpDown(widths=[4, 8], norm="none"),
])
@pytest.mark.parametrize("train", [False, True])
def test_channels_last_3d_matches_contiguous(spec, train):
    model = build(spec).train(train)
    x = image((2, 1, 2, 16, 16))
    with torch.no_grad():
        ref = model(x)
        fast = model.to(memory_format=torch.channels_last_3d)(
            x.contiguous(memory_format=torch.channels_last_3d))
    for task in HEADS:
        torch.testing.assert_close(fast[task], ref[task], rtol=1e-5, atol=1e-5)


def _compile_and_step(backend: str) -> None:
    model = build(RSUNet(widths=[4, 8]), heads={"affinity": 3})
    compiled = torch.compile(model, backend=backend)
    x = image((1, 1, 2, 8, 8))
    out = compiled(x)["affinity"]
    out.sum().backward()
    torch.testing.assert_close(out, model(x)["affinity"], rtol=1e-4, atol=1e-5)
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="divisor"):
        compiled(image((1, 1, 2, 7, 8)))


def test_torch_compile_traces_the_model():
    """Dynamo + AOT autograd (no code generation): fast, checks the model is traceable."""
    _compile_and_step("aot_eager")


@pytest.mark.skipif(os.environ.get("EMRUN_TEST_COMPILE") != "1",
                    reason="inductor compilation takes ~30 s on 2 CPU cores even for a tiny "
                           "model; set EMRUN_TEST_COMPILE=1 to run it")
def test_torch_compile_inductor():
    _compile_and_step("inductor")


def test_model_facts_of_a_tiny_rsunet():
    spec = RSUNet(widths=[4, 8], norm="none")
    model = build(spec, heads={"affinity": 3})
    facts = model_facts(model, spec, (4, 16, 16))
    assert isinstance(facts, ModelFacts)
    assert facts.params == spec.parameter_count([3]) == parameter_count(model)
    # multiply-adds per output voxel, counted by hand (level 1 has 1/4 of the voxels):
    # input conv 1*4*25; level-0 encoder and decoder blocks 2 * 4 convs of 4*4*27;
    # 1x1x1 reduce 8*4 and head 4*3; level-1 block (4*8*27 + 3 * 8*8*27) / 4
    macs = 1 * 4 * 25 + 8 * 4 * 4 * 27 + 8 * 4 + 4 * 3 + (4 * 8 * 27 + 3 * 8 * 8 * 27) / 4
    assert facts.flops_per_voxel == 2 * macs  # FlopCounterMode: a multiply-add is 2 FLOPs
    assert facts.divisor == (1, 2, 2)
    assert facts.accepts((4, 16, 16)) and facts.accepts((1, 1, 3, 2, 6))
    assert not facts.accepts((4, 15, 16)) and not facts.accepts((0, 2, 2))
    with pytest.raises(ValueError, match="divisor"):
        model_facts(model, spec, (4, 15, 16))


@pytest.mark.parametrize("spec", [
    RSUNet(widths=[4, 8, 16]),
    RSUNet(widths=[4, 8, 16], norm="batch", upsample="transpose"),
    UpDown(widths=[4, 8], downsample=[(2, 2, 2)]),
])
def test_flops_per_voxel_positive_and_constant_across_patches(spec):
    model = build(spec)
    small = model_facts(model, spec, tuple(2 * d for d in spec.divisor())).flops_per_voxel
    large = model_facts(model, spec, tuple(6 * d for d in spec.divisor())).flops_per_voxel
    assert small > 0
    assert math.isclose(small, large, rel_tol=1e-2)


def test_flop_counting_leaves_the_model_untouched():
    model = build(RSUNet(widths=[4, 8])).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flops_per_voxel(model, (2, 8, 8))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_receptive_field_of_a_two_level_rsunet_by_hand():
    spec = RSUNet(widths=[4, 8], kernel=(3, 3, 3))
    # z (no pooling in z): 12 3x3x3 convs at full resolution (4 encoder level 0, 4 level 1,
    # 4 decoder level 0), each adding 2; the 1x5x5 input conv adds nothing in z: 1 + 24.
    # y, x: the decoder block (4 convs) needs 9 fine voxels around the output voxel, which
    # linear interpolation reads from 6 coarse voxels (9 fine voxels span 4.5 coarse ones plus
    # one neighbour each side); the level-1 block widens 6 to 14 coarse voxels, the max pool
    # makes them 28 fine voxels, the level-0 encoder block 36 and the input conv (5) 40.
    assert spec.receptive_field() == (25, 40, 40)
    # a transposed conv reads one coarse voxel per fine one: 9 fine -> 5 coarse -> 13 -> 26
    # -> 34 -> 38
    assert spec.model_copy(update={"upsample": "transpose"}).receptive_field() == (25, 38, 38)
    model = build(spec)
    assert model_facts(model, spec, (1, 2, 2)).receptive_field == (25, 40, 40)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("spec", [
    RSUNet(widths=[4, 8]),
    RSUNet(widths=[16, 32, 64, 128]),
    RSUNet(widths=[4, 8, 16], upsample="transpose", anisotropic_levels=[0, 2]),
    RSUNet(widths=[4, 8, 16], downsample=[(3, 3, 1), (2, 2, 2)]),
    RSUNet(widths=[4, 8, 16], downsample=[(4, 1, 2), (2, 3, 2)], kernel=(1, 3, 5),
           input_kernel=(3, 5, 1)),
    UpDown(widths=[4, 8, 16]),
    UpDown(widths=[4, 8], factor=(2, 2, 2), upsample="transpose"),
])
def test_empirical_receptive_field_matches_the_analytic_one(spec):
    assert empirical_receptive_field(spec) == spec.receptive_field()


def test_receptive_field_of_the_real_model_is_within_the_analytic_one():
    """The gradient of the real model (ELU, max pools, random weights) reaches no further."""
    spec = RSUNet(widths=[4, 8])
    model = build(spec).eval()
    x = torch.zeros((1, 1, 32, 64, 64), requires_grad=True)
    out = model(x)["affinity"]
    out[0, 0, 16, 32, 32].backward()
    hit = torch.nonzero(x.grad[0, 0])
    extent = tuple(int(hit[:, a].max() - hit[:, a].min() + 1) for a in range(3))
    rf = spec.receptive_field()
    assert all(e <= r for e, r in zip(extent, rf, strict=True))
    assert extent[0] == rf[0]  # no pooling along z: nothing is lost to max-pool ties


def test_build_model_from_a_recipe(write):
    recipe = load_recipe(write(MINIMAL)).recipe
    model = build_model(recipe)
    heads = list(recipe.head_channels().values())
    assert parameter_count(model) == recipe.model.parameter_count(heads)
    with torch.no_grad():
        out = model(image((1, 1, *recipe.train.patch)))
    assert {k: v.shape[1] for k, v in out.items()} == recipe.head_channels()
