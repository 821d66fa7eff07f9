"""Probe of the networks (rsunet, updown, resenc, mednext) against the facts they state.

Each stated fact is checked against an independent measurement on the built network: the
receptive field by impulses through the real layers (max pools, activations and transposed
convs kept), parameters by counting, FLOPs by hooks on every convolution, the divisor by
running sizes and by recipe validation, and the equivalences a network must keep (memory
format, batch, seed, state dict).
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from conftest import MINIMAL
from test_models import build, image
from torch import nn

from emrun.models import build_model, parameter_count
from emrun.models import facts as facts_module
from emrun.models.facts import empirical_receptive_field, model_facts, output_problem
from emrun.recipe import RecipeError, load_recipe
from emrun.recipe.model import RSUNet, UpDown
from emrun.recipe.unets import MedNeXt, ResEnc

TASKS = {"affinity": 3, "lsd": 10, "mito": 1}


def spec_id(spec: object) -> str:
    return f"{spec.type}-{len(spec.widths)}-{spec.norm}"  # type: ignore[attr-defined]


def at_least_two(spec: object) -> tuple[int, int, int]:
    """The smallest size every norm takes: twice the divisor along z (instance norm needs
    more than one voxel at the deepest level)."""
    d = spec.divisor()  # type: ignore[attr-defined]
    return (2 * d[0], d[1], d[2])


# ------------------------------------------------------------------ receptive field


def positive_model(spec: object) -> nn.Module:
    """The spec's real network (max pools, ReLUs, GELUs, strided and transposed convs as
    built) without norms, with positive weights and zero biases, in float64: every value is
    a sum of non-negative terms, so an output is non-zero exactly where some path reaches."""
    update = {"norm": "none"}
    if "activation" in type(spec).model_fields:
        update["activation"] = "relu"
    model = build(spec.model_copy(update=update), heads={"rf": 1})  # type: ignore[attr-defined]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv3d | nn.ConvTranspose3d):
                m.weight.copy_(0.5 + 0.5 * torch.rand(m.weight.shape, generator=gen))
                m.bias.zero_()
    return model.double().eval()


def impulse_extent(spec: object, axis: int) -> int:
    """The receptive field along ``axis`` measured on :func:`positive_model`: one sample per
    input plane (a unit impulse on the whole plane at one index along ``axis``, zeros
    elsewhere); the extent of the impulses an output voxel responds to, maximised over one
    divisor period of output positions. Independent of the spec's interval propagation and
    of the structural twin (no pool or activation is swapped)."""
    d = spec.divisor()[axis]  # type: ignore[attr-defined]
    reach = spec.receptive_field()[axis]  # type: ignore[attr-defined]
    n = -(-(reach + 4 * d) // d) * d
    size = list(spec.divisor())  # type: ignore[attr-defined]
    size[axis] = n
    x = torch.zeros((n, spec.input_channels(), *size), dtype=torch.float64)  # type: ignore
    for p in range(n):
        plane: list[slice | int] = [slice(None)] * 3
        plane[axis] = p
        x[(p, slice(None), *plane)] = 1.0
    with torch.no_grad():
        out = positive_model(spec)(x)["rf"][:, 0]
    extent = 0
    start = n // 2 // d * d
    for t in range(d):
        voxel = [s // 2 for s in size]
        voxel[axis] = start + t
        hit = torch.nonzero(out[(slice(None), *voxel)] > 0).flatten()
        lo, hi = int(hit.min()), int(hit.max())
        assert lo > 0 and hi < n - 1  # not cut by the border
        extent = max(extent, hi - lo + 1)
    return extent


RF_SPECS = [
    RSUNet(widths=[2, 2, 2], downsample=[(1, 3, 1), (1, 1, 2)], kernel=(5, 3, 1),
           anisotropic_levels=[2], upsample="transpose"),
    RSUNet(widths=[2, 2, 2], downsample=[(3, 2, 1), (2, 2, 3)], kernel=(3, 3, 1),
           input_kernel=(3, 1, 5)),
    UpDown(widths=[2, 2], downsample=[(2, 1, 2)], factor=(3, 3, 1), kernel=(3, 1, 3)),
    ResEnc(widths=[2, 2, 2], downsample=[(1, 3, 3), (1, 2, 3)], kernel=(1, 1, 3),
           anisotropic_levels=[], upsample="interp", blocks=[2, 2, 2]),
    ResEnc(widths=[2, 2, 2], downsample=[(2, 3, 2), (3, 1, 1)], kernel=(1, 5, 3),
           anisotropic_levels=[1], upsample="transpose", blocks=[1, 2, 1]),
    MedNeXt(widths=[2, 2, 2], downsample=[(3, 3, 1), (1, 2, 1)], kernel=(5, 3, 3),
            blocks=[1, 2, 1]),
]


@pytest.mark.parametrize("spec", RF_SPECS, ids=spec_id)
def test_stated_receptive_field_is_what_impulses_through_the_real_network_reach(spec):
    measured = tuple(impulse_extent(spec, axis) for axis in range(3))
    assert measured == spec.receptive_field()


# ------------------------------------------------------------- parameters and FLOPs


def conv_flops_per_voxel(model: nn.Module, x: torch.Tensor) -> float:
    """Multiply-adds (x2) of every conv and transposed conv, counted by forward hooks from
    the shapes each one saw, per input voxel of one sample."""
    total = [0]

    def count(m: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        # a conv does one multiply-add per weight per output voxel; a transposed conv one
        # per weight per input voxel (each input voxel scatters its whole kernel)
        voxels = inputs[0] if isinstance(m, nn.ConvTranspose3d) else out
        total[0] += 2 * m.weight.numel() * voxels.shape[2:].numel() * voxels.shape[0]

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, nn.Conv3d | nn.ConvTranspose3d)]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return total[0] / x.shape[2:].numel() / x.shape[0]


FACT_SPECS = [
    (RSUNet(widths=[3, 5, 7], norm="none", activation="relu", anisotropic_levels=[1],
            downsample=[(2, 2, 2), (1, 3, 3)], in_channels=2), {"affinity": 3, "lsd": 10}),
    (RSUNet(widths=[4, 8], norm="group", groups=4, activation="gelu", upsample="transpose",
            kernel=(1, 3, 5), input_kernel=(1, 1, 1)), {"mito": 1}),
    (RSUNet(widths=[1], norm="instance", activation="leaky_relu"), TASKS),
    (UpDown(widths=[2, 4, 6], norm="batch", factor=(2, 1, 3), upsample="transpose",
            anisotropic_levels=[0, 2]), {"affinity": 3, "mito": 1}),
    (ResEnc(widths=[2, 6, 4], blocks=[2, 1, 3], norm="batch", activation="elu",
            downsample=[(1, 3, 2), (2, 1, 2)], kernel=(3, 5, 1), in_channels=3), TASKS),
    (ResEnc(widths=[4, 4], norm="group", groups=2, upsample="interp"), {"lsd": 10}),
    (ResEnc(widths=[5], norm="none", kernel=(1, 1, 1)), {"affinity": 3}),
    (MedNeXt(widths=[2, 4, 6], blocks=[1, 2, 1], expansion=3, norm="group", groups=2,
             downsample=[(1, 2, 2), (3, 3, 1)], kernel=(3, 3, 3), in_channels=2), TASKS),
    (MedNeXt(widths=[3, 3], norm="none", expansion=1, anisotropic_levels=[0]), {"mito": 1}),
    (MedNeXt(widths=[1], kernel=(15, 1, 7)), {"affinity": 3, "mito": 1}),
]


@pytest.mark.parametrize(("spec", "heads"), FACT_SPECS, ids=lambda v: spec_id(v)
                         if hasattr(v, "widths") else str(sum(v.values())))
def test_stated_parameters_and_flops_match_counts_on_the_built_network(spec, heads):
    model = build(spec, heads=heads)
    size = at_least_two(spec)
    facts = model_facts(model, spec, size)
    assert facts.params == sum(p.numel() for p in model.parameters()) == parameter_count(model)
    if isinstance(spec, RSUNet | UpDown):
        assert spec.parameter_count(list(heads.values())) == facts.params
    x = image((2, spec.input_channels(), *size))
    assert facts.flops_per_voxel == pytest.approx(conv_flops_per_voxel(model, x), rel=1e-9)
    # FLOPs per voxel are a property of the architecture, not of the patch
    larger = tuple(a * b for a, b in zip(size, (2, 3, 1), strict=True))
    assert model_facts(model, spec, larger).flops_per_voxel == pytest.approx(
        facts.flops_per_voxel, rel=1e-9)


def test_every_extra_task_adds_its_head_and_nothing_else():
    spec = ResEnc(widths=[4, 8], blocks=[1, 1])
    one = model_facts(build(spec, heads={"mito": 1}), spec, (2, 4, 4))
    more = model_facts(build(spec, heads={"mito": 1, "lsd": 10}), spec, (2, 4, 4))
    assert more.params - one.params == 4 * 10 + 10
    assert more.flops_per_voxel - one.flops_per_voxel == pytest.approx(2 * 4 * 10)


# ----------------------------------------------------------------------------- divisor

SIZE_SPECS = [
    RSUNet(widths=[2, 3, 4], downsample=[(1, 2, 3), (2, 1, 2)], upsample="transpose"),
    UpDown(widths=[2, 3], downsample=[(3, 1, 2)], factor=(1, 2, 2), norm="none"),
    ResEnc(widths=[2, 3, 4], blocks=[1, 1, 1], downsample=[(2, 2, 1), (1, 3, 2)],
           norm="batch"),
    MedNeXt(widths=[2, 3, 4], blocks=[1, 1, 1], downsample=[(2, 3, 1), (1, 1, 3)],
            norm="group", groups=1, kernel=(3, 3, 3)),
]


@pytest.mark.parametrize("spec", SIZE_SPECS, ids=spec_id)
def test_every_multiple_of_the_divisor_keeps_its_size_for_every_task(spec):
    model = build(spec, heads=TASKS).eval()
    d = spec.divisor()
    with torch.no_grad():
        for times in [(1, 1, 1), (2, 3, 1), (1, 2, 5)]:  # (1, 1, 1): the smallest size
            size = tuple(a * t for a, t in zip(d, times, strict=True))
            out = model(image((1, 1, *size)))
            assert {k: tuple(v.shape) for k, v in out.items()} == {
                k: (1, c, *size) for k, c in TASKS.items()}
    for axis in (a for a in range(3) if d[a] > 1):
        size = [2 * a for a in d]
        size[axis] += 1
        with pytest.raises(ValueError, match=r"multiple of the divisor"):
            model(image((1, 1, *size)))


MODEL_LINES = {
    "rsunet": "{type: rsunet, widths: [4, 8, 8], downsample: [[1, 2, 2], [2, 2, 2]]}",
    "updown": "{type: updown, widths: [4, 8], factor: [1, 2, 2]}",
    "resenc": "{type: resenc, widths: [4, 8, 8], blocks: [1, 1, 1]}",
    "mednext": "{type: mednext, widths: [4, 8, 8], blocks: [1, 1, 1]}",
}


def with_model(model: str, patch: str | None = None, infer: str | None = None) -> str:
    """MINIMAL with this model line, and this train and infer patch."""
    text = MINIMAL.replace("model: {type: rsunet, widths: [4, 8]}", f"model: {model}")
    if patch is not None:
        text = text.replace("patch: [8, 32, 32]", f"patch: {patch}")
    return text + (f"infer:\n  patch: {infer}\n" if infer is not None else "")


@pytest.mark.parametrize("kind", list(MODEL_LINES))
@pytest.mark.parametrize("key", ["train", "infer"])
def test_a_patch_off_the_divisor_is_refused_at_validation_naming_it(write, kind, key):
    ok = load_recipe(write(with_model(MODEL_LINES[kind]))).recipe
    d = ok.model.divisor()
    bad = str([2 * a + (a > 1) for a in d])  # one voxel off on every axis the model pools
    text = with_model(MODEL_LINES[kind], **({"patch": bad} if key == "train" else {"infer": bad}))
    with pytest.raises(RecipeError) as caught:
        load_recipe(write(text))
    message = str(caught.value)
    assert f"{key}.patch" in message and "divisible by" in message
    assert all(str(a) in message for a in d if a > 1)
    assert ok.model.title() in message


# ------------------------------------------------------------------------ equivalences

EQUIV_SPECS = [
    RSUNet(widths=[4, 8], norm="batch", upsample="transpose"),
    UpDown(widths=[4, 8], norm="group", groups=2, factor=(2, 2, 2), activation="gelu"),
    ResEnc(widths=[4, 8], blocks=[1, 2], norm="instance", upsample="interp"),
    ResEnc(widths=[4, 8], blocks=[2, 1], norm="batch", downsample=[(2, 2, 2)]),
    MedNeXt(widths=[4, 8], blocks=[1, 1], norm="batch", kernel=(3, 3, 3)),
    MedNeXt(widths=[4, 8], blocks=[1, 1], norm="group", groups=4, expansion=3),
]


def outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {k: v.detach() for k, v in model(x).items()}


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec", EQUIV_SPECS, ids=spec_id)
def test_seed_batch_memory_format_and_state_dict_change_nothing(spec):
    model = build(spec, heads=TASKS, seed=7)
    again = build(spec, heads=TASKS, seed=7)
    other = build(spec, heads=TASKS, seed=8)
    weights, twin = model.state_dict(), again.state_dict()
    assert all(torch.equal(weights[k], twin[k]) for k in weights)  # same seed, same model
    assert any(not torch.equal(weights[k], other.state_dict()[k]) for k in weights)

    x = image((3, 1, *(2 * a for a in spec.divisor())))
    model.train()(x)  # move batch norm's running statistics off their start
    model.eval()
    ref = outputs(model, x)
    assert all(torch.equal(ref[k], v) for k, v in outputs(model, x).items())  # deterministic
    for i in range(3):  # in eval, a sample's outputs do not depend on the rest of the batch
        assert_close({k: v[i:i + 1] for k, v in ref.items()}, outputs(model, x[i:i + 1]))

    last = torch.channels_last_3d
    fast = build(spec, heads=TASKS)
    fast.load_state_dict(model.state_dict())
    fast.to(memory_format=last).eval()
    assert_close(outputs(fast, x.contiguous(memory_format=last)), ref)
    # in training too (batch statistics, per-sample norms), on both memory formats
    torch.manual_seed(0)
    model.train()
    fast.train()
    assert_close(outputs(fast, x.contiguous(memory_format=last)), outputs(model, x))

    buffer = io.BytesIO()  # (the training forwards above moved batch norm's statistics)
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    loaded = build(spec, heads=TASKS, seed=99)
    loaded.load_state_dict(torch.load(buffer))
    now = outputs(model.eval(), x)
    assert all(torch.equal(now[k], v) for k, v in outputs(loaded.eval(), x).items())


# ------------------------------------------------------------------ extreme valid specs

EXTREME_SPECS = [
    RSUNet(widths=[1], norm="group", groups=1, in_channels=3, kernel=(1, 1, 1),
           input_kernel=(1, 1, 1)),
    RSUNet(widths=[1, 1, 1], norm="instance", downsample=[(4, 4, 4), (1, 1, 1)],
           in_channels=2, upsample="transpose"),
    UpDown(widths=[1, 1], norm="batch", factor=(4, 1, 3), in_channels=2),
    ResEnc(widths=[1], norm="group", groups=1, kernel=(15, 15, 15), in_channels=3),
    ResEnc(widths=[1, 1, 1], norm="instance", downsample=[(4, 4, 4), (1, 1, 1)],
           blocks=[1, 1, 1]),
    MedNeXt(widths=[1], norm="batch", kernel=(15, 15, 15), expansion=8, in_channels=2),
    MedNeXt(widths=[8, 8], norm="group", groups=8, downsample=[(4, 4, 4)],
            kernel=(5, 5, 5)),
]


@pytest.mark.parametrize("spec", EXTREME_SPECS, ids=spec_id)
def test_extreme_valid_specs_build_run_both_ways_and_state_true_facts(spec):
    model = build(spec, heads={"affinity": 3, "mito": 1})
    size = at_least_two(spec)
    x = image((2, spec.input_channels(), *size))
    for training in (True, False):
        model.train(training)
        out = model(x)
        for task, channels in {"affinity": 3, "mito": 1}.items():
            assert out[task].shape == (2, channels, *size)
            assert torch.isfinite(out[task]).all()
    facts = model_facts(model, spec, size)
    assert facts.receptive_field == empirical_receptive_field(spec, start=8)
    assert facts.params == sum(p.numel() for p in model.parameters())


# -------------------------------------------------------- found: fixed in emrun/models


class Cropping(nn.Module):
    """A plugin-like model of two input channels whose output loses a border voxel."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mito": x[:, :1, 1:, 1:, 1:]}


def test_a_wrong_output_shape_is_reported_against_the_input_as_given():
    """The message named an input of (1, 1, ...) whatever the model's input channels."""
    problem = output_problem(Cropping(), {"mito": 1}, (4, 8, 8), in_channels=2)
    assert problem is not None and "for an input of (1, 2, 4, 8, 8)" in problem


@pytest.mark.parametrize("spec", [
    RSUNet(widths=[64, 64], upsample="transpose"),
    ResEnc(widths=[32, 64], blocks=[1, 1], downsample=[(2, 2, 2)]),
], ids=spec_id)
def test_transposed_convs_start_with_he_weights_by_their_true_fan_in(spec):
    """A transposed conv with kernel = stride sums ``c_in`` inputs into each output voxel,
    so He init is std sqrt(2 / c_in); torch's fan_in of its weight is ``c_out * prod(k)``,
    which gave the upsampled path a quarter (here) to a half of the stated variance."""
    model = build(spec, heads={"mito": 1})
    ups = [m for m in model.modules() if isinstance(m, nn.ConvTranspose3d)]
    assert ups
    for up in ups:
        std = float(up.weight.detach().std())
        assert std == pytest.approx(math.sqrt(2 / up.in_channels), rel=0.05)
        # He keeps the second moment through ReLUs: E[y^2] = c_in var(w) E[x^2] = 2 E[x^2]
        x = torch.relu(torch.randn((4, up.in_channels, 2, 4, 4),
                                   generator=torch.Generator().manual_seed(0)))
        with torch.no_grad():
            ratio = float(up(x).square().mean() / x.square().mean())
        assert ratio == pytest.approx(2, rel=0.25)


def count_twin_forwards(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the forward passes of every structural twin built from now on."""
    calls = [0]
    make = facts_module._structural_twin

    def counted(spec: object) -> nn.Module:
        twin = make(spec)
        twin.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        return twin

    monkeypatch.setattr(facts_module, "_structural_twin", counted)
    return calls


def test_measuring_a_right_receptive_field_takes_one_pass_per_axis(monkeypatch):
    """The input started at 64 voxels and doubled while a field reached its border, redoing
    every output offset each time: 7 passes for a 4-level rsunet (12 minutes for 8 levels);
    sized for the stated field it takes one per axis."""
    calls = count_twin_forwards(monkeypatch)
    spec = RSUNet(widths=[1, 1, 1, 1])
    assert empirical_receptive_field(spec) == spec.receptive_field() == (57, 204, 204)
    assert calls[0] == 3


def test_a_stated_receptive_field_too_small_is_still_measured_in_full(monkeypatch):
    spec = MedNeXt(widths=[1, 1, 1], blocks=[1, 1, 1])
    truth = spec.receptive_field()
    calls = count_twin_forwards(monkeypatch)
    monkeypatch.setattr(MedNeXt, "receptive_field", lambda self: (1, 1, 1))
    assert empirical_receptive_field(spec, start=8) == truth
    assert calls[0] > 3  # it had to grow the input


def test_updown_summary_names_the_pooling_it_runs_behind():
    """Two UpDowns pooling by different factors read the same (RSUNet's) line in
    `emrun validate` and in the export manifest, though they run at other resolutions."""
    fine, coarse = UpDown(widths=[4, 8]), UpDown(widths=[4, 8], factor=(2, 2, 2))
    assert fine.summary() != coarse.summary()
    assert "factor [2, 2, 2]" in coarse.summary() and "factor [1, 2, 2]" in fine.summary()
    assert coarse.summary().startswith(RSUNet(widths=[4, 8]).summary())


@pytest.mark.parametrize("kind", list(MODEL_LINES))
def test_tasks_named_like_module_attributes_build_and_run(write, kind):
    """A task named `values`, `train`, `type` or `training` passed validation, then the build
    failed with an internal KeyError ("attribute 'values' already exists", nn.ModuleDict)."""
    text = with_model(MODEL_LINES[kind]).replace(
        "  affinity:\n    target: {type: affinity}\n",
        "".join(f"  {name}:\n    target: {{type: affinity}}\n"
                for name in ("values", "train", "type", "training")))
    recipe = load_recipe(write(text)).recipe
    model = build_model(recipe)
    x = image((2, 1, *recipe.model.divisor()[:1], 8, 8))
    out = model.train()(x)
    assert list(out) == ["values", "train", "type", "training"]
    assert all(v.shape == (2, 3, *x.shape[2:]) for v in out.values())
    model.eval()
    assert not any(m.training for m in model.modules())  # the mode flag is still the flag
    weights = model.state_dict()
    prefix = "inner.heads" if kind == "updown" else "heads"
    assert {f"{prefix}.values.weight", f"{prefix}.training.bias"} <= set(weights)
    again = build_model(recipe)
    again.load_state_dict(weights)
    assert_close(outputs(again.eval(), x), outputs(model, x))


# ------------------------------------------------- one voxel at the deepest level


@pytest.mark.parametrize("kind", ["rsunet", "resenc", "mednext"])
def test_batch_norm_on_one_voxel_of_one_sample_is_refused(write, kind):
    """A train.patch equal to the divisor with batch norm and batch_size 1 passed
    validation; training then failed in torch ('Expected more than 1 value per channel')."""
    model = {"rsunet": "{type: rsunet, widths: [4, 8], downsample: [[2, 2, 2]]}",
             "resenc": "{type: resenc, widths: [4, 8], downsample: [[2, 2, 2]], "
                       "norm: batch}",
             "mednext": "{type: mednext, widths: [4, 8], downsample: [[2, 2, 2]], "
                        "norm: batch, kernel: [3, 3, 3]}"}[kind]
    path = write(with_model(model, patch="[2, 2, 2]"))
    spec = RSUNet if kind == "rsunet" else ResEnc if kind == "resenc" else MedNeXt
    recipe_model = spec(widths=[4, 8], downsample=[(2, 2, 2)], norm="batch",
                        **({"kernel": (3, 3, 3)} if kind == "mednext" else {}))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        build(recipe_model).train()(image((1, 1, 2, 2, 2)))  # what training meets
    with pytest.raises(RecipeError, match=r"train\.patch"):
        load_recipe(path)


@pytest.mark.parametrize("key", ["train", "infer"])
def test_group_norm_on_one_value_per_group_is_refused(write, key):
    """Group norm with one channel per group on the one voxel of the deepest level passed
    validation; the forward then failed in torch, in training and inference alike."""
    model = "{type: rsunet, widths: [4, 8], downsample: [[2, 2, 2]], norm: group, groups: 4}"
    text = with_model(model, **({"patch": "[2, 2, 2]"} if key == "train" else
                                {"infer": "[2, 2, 2]"}))
    spec = RSUNet(widths=[4, 8], downsample=[(2, 2, 2)], norm="group", groups=4)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        build(spec).eval()(image((1, 1, 2, 2, 2)))  # what inference meets
    with pytest.raises(RecipeError, match=rf"{key}\.patch"):
        load_recipe(write(text))
