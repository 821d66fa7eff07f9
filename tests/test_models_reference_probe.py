"""Reference probe of the networks (rsunet, updown, resenc, mednext) against what emrun says
about them, on tiny widths in float64 on the CPU.

Not repeated from tests/test_models*.py and tests/test_model_facts_probe.py: translation
equivariance by whole divisor periods (and its loss by a single voxel on pooled axes); the
kernels of anisotropic levels, read off every convolution and measured (a z-slice sees only
itself); the gradient of the *real* network (its own activations, max pools, batch norm in
eval) for every output offset within a divisor period, against the stated receptive field,
UpDown included; a sample's outputs in eval against a batch of very different samples, for
every model and norm; that eval forwards leave every buffer alone; and which patches the
recipe checks accept that the network then cannot run.
"""

from __future__ import annotations

import pytest
import torch
from conftest import MINIMAL
from torch import nn

import emrun.models  # noqa: F401  (registers the builders)
from emrun.models import model_facts, weights_mismatch
from emrun.recipe import RecipeError, load_recipe
from emrun.recipe.model import RSUNet, UpDown
from emrun.recipe.unets import MedNeXt, ResEnc
from emrun.registry import models

HEADS = {"affinity": 3, "mito": 1}


def spec_id(spec: object) -> str:
    return f"{spec.type}-{spec.norm}-{'x'.join(map(str, spec.divisor()))}"  # type: ignore


def prepared(spec: object, heads: dict[str, int] = HEADS) -> nn.Module:
    """The built network in float64 and eval mode; batch norm's running statistics moved
    off their start by two training forwards, so that eval is not the identity."""
    torch.manual_seed(0)
    model = models.build(spec, head_channels=heads).double()
    d = spec.divisor()  # type: ignore[attr-defined]
    gen = torch.Generator().manual_seed(3)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            x = 3 * torch.rand((2, spec.input_channels(), *(2 * a for a in d)),  # type: ignore
                               generator=gen, dtype=torch.float64) - 1
            model(x)
    return model.eval()


def rand(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed),
                      dtype=torch.float64)


def run(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return dict(model(x))


# ------------------------------------------------------------- translation equivariance

EQUIVARIANT = [
    RSUNet(widths=[2, 2], downsample=[(2, 2, 2)], input_kernel=(1, 3, 3), norm="batch"),
    RSUNet(widths=[2, 2, 2], downsample=[(1, 2, 3), (2, 1, 1)], kernel=(3, 1, 3),
           norm="none", upsample="transpose", activation="relu"),
    UpDown(widths=[2, 2], downsample=[(1, 2, 2)], factor=(2, 1, 2), upsample="transpose",
           norm="batch"),
    ResEnc(widths=[2, 2, 2], blocks=[1, 2, 1], downsample=[(1, 2, 2), (2, 2, 2)],
           anisotropic_levels=[0], upsample="interp", norm="batch"),
    ResEnc(widths=[2, 2], blocks=[1, 1], downsample=[(3, 1, 2)], norm="none"),
    MedNeXt(widths=[2, 2], blocks=[1, 1], downsample=[(2, 2, 2)], kernel=(3, 3, 3),
            norm="batch"),
    MedNeXt(widths=[2, 2, 2], blocks=[1, 1, 1], downsample=[(1, 3, 2), (2, 1, 2)],
            kernel=(3, 3, 5), norm="none"),
]


def shift_gap(model: nn.Module, spec: object, axis: int, shift: int) -> float:
    """Largest difference between the network's output on a window and on the same window
    moved by ``shift`` voxels along ``axis`` (one input volume), compared where both see
    their whole receptive field (a margin of the stated field from each window's border);
    the other axes are the same in both windows and compared in full."""
    d = spec.divisor()  # type: ignore[attr-defined]
    rf = spec.receptive_field()[axis]  # type: ignore[attr-defined]
    n = -(-(2 * rf + 2 * shift + 2) // d[axis]) * d[axis]  # a window: a multiple of d
    size = [2 * a for a in d]
    size[axis] = n
    big = list(size)
    big[axis] = n + shift
    volume = 3 * rand((1, spec.input_channels(), *big)) - 1  # type: ignore[attr-defined]
    first = [slice(None)] * 5
    first[2 + axis] = slice(0, n)
    moved = [slice(None)] * 5
    moved[2 + axis] = slice(shift, shift + n)
    a = run(model, volume[tuple(first)])
    b = run(model, volume[tuple(moved)])
    inner = [slice(None)] * 5
    inner[2 + axis] = slice(rf + shift, n - rf)  # in window a's coordinates
    back = [slice(None)] * 5
    back[2 + axis] = slice(rf, n - rf - shift)  # the same voxels in window b's coordinates
    assert n - rf > rf + shift  # something is compared
    return max(float((a[k][tuple(inner)] - b[k][tuple(back)]).abs().max()) for k in a)


@pytest.mark.parametrize("spec", EQUIVARIANT, ids=spec_id)
def test_outputs_move_with_the_input_by_whole_divisor_periods(spec):
    """Shifting the input by the divisor (and twice it) shifts the outputs by as much, away
    from the borders: no position-dependent layer (batch norm in eval is pointwise)."""
    model = prepared(spec)
    d = spec.divisor()
    for axis in range(3):
        for times in (1, 2):
            gap = shift_gap(model, spec, axis, times * d[axis])
            assert gap < 1e-10, (axis, times, gap)


@pytest.mark.parametrize("spec", EQUIVARIANT, ids=spec_id)
def test_a_one_voxel_shift_breaks_equivariance_only_on_pooled_axes(spec):
    """The converse: by one voxel the outputs move exactly where the axis is not pooled,
    and do not where it is (pools and strides see the content on another grid) - so the
    test above can tell."""
    model = prepared(spec)
    d = spec.divisor()
    for axis in range(3):
        gap = shift_gap(model, spec, axis, 1)
        if d[axis] == 1:
            assert gap < 1e-10, (axis, gap)
        else:
            assert gap > 1e-6, (axis, gap)


# --------------------------------------------------------------- anisotropic kernels


def level_modules(model: nn.Module) -> dict[int, list[nn.Module]]:
    """The modules of each level whose convolutions use the level's kernel (1x1x1 convs,
    transposed convs by the factor and the heads are checked apart)."""
    levels: dict[int, list[nn.Module]] = {}

    def add(level: int, module: nn.Module) -> None:
        levels.setdefault(level, []).append(module)

    inner = getattr(model, "inner", model)  # updown's RSUNet
    for i, m in enumerate(inner.encoders):
        add(i, m)
    for i, m in enumerate(inner.decoders):
        add(i, m)
    if hasattr(inner, "stem"):
        add(0, inner.stem)
    for i, m in enumerate(getattr(inner, "downs", [])):
        add(i + 1, m)  # mednext: the down and up blocks use the lower level's kernel
    for i, m in enumerate(getattr(inner, "ups", [])):
        add(i + 1, m)
    return levels


def kernels(module: nn.Module) -> set[tuple[int, ...]]:
    return {tuple(m.kernel_size) for m in module.modules()
            if isinstance(m, nn.Conv3d | nn.ConvTranspose3d) and tuple(m.kernel_size) != (1, 1, 1)}


ANISOTROPIC = [
    (RSUNet(widths=[2, 2, 2], kernel=(3, 5, 5), anisotropic_levels=[0, 2]),
     {0: (1, 3, 3), 1: (3, 5, 5), 2: (1, 3, 3)}),
    (UpDown(widths=[2, 2], kernel=(5, 3, 3), anisotropic_levels=[1]),
     {0: (5, 3, 3), 1: (1, 3, 3)}),
    (ResEnc(widths=[2, 2, 2], blocks=[1, 2, 1], kernel=(3, 5, 7)),  # default levels 0, 1
     {0: (1, 5, 7), 1: (1, 5, 7), 2: (3, 5, 7)}),
    (MedNeXt(widths=[2, 2, 2], blocks=[1, 1, 1], kernel=(3, 5, 5), anisotropic_levels=[2]),
     {0: (3, 5, 5), 1: (3, 5, 5), 2: (1, 5, 5)}),
]


@pytest.mark.parametrize(("spec", "want"), ANISOTROPIC, ids=lambda v: getattr(v, "type", ""))
def test_every_convolution_of_an_anisotropic_level_has_the_in_plane_kernel(spec, want):
    """rsunet's anisotropic levels are 1x3x3 whatever `kernel` says; resenc's and mednext's
    1 x kernel_y x kernel_x; the others `kernel` - in every conv of the level (encoder,
    decoder, stem, mednext's down and up blocks), not only the first."""
    model = models.build(spec, head_channels=HEADS)
    found = {level: set().union(*(kernels(m) for m in mods))
             for level, mods in level_modules(model).items()}
    assert found == {level: {k} for level, k in want.items()}


FLAT = [
    RSUNet(widths=[2, 2, 2], anisotropic_levels=[0, 1, 2], norm="batch"),
    UpDown(widths=[2, 2], anisotropic_levels=[0, 1], norm="batch", factor=(1, 2, 2)),
    ResEnc(widths=[2, 2, 2], blocks=[1, 1, 1], anisotropic_levels=[0, 1, 2],
           downsample=[(1, 2, 2), (1, 2, 2)], norm="batch"),
    MedNeXt(widths=[2, 2], blocks=[1, 1], anisotropic_levels=[0, 1],
            downsample=[(1, 2, 2)], norm="batch"),
]


@pytest.mark.parametrize("spec", FLAT, ids=spec_id)
def test_all_anisotropic_levels_without_z_pooling_see_one_section(spec):
    """Every level in-plane and no pooling in z: the stated field is 1 in z, and changing
    one input section changes the outputs of that section alone."""
    assert spec.receptive_field()[0] == 1
    model = prepared(spec)
    d = spec.divisor()
    x = rand((1, 1, 5, 2 * d[1], 2 * d[2]))
    y = x.clone()
    y[0, 0, 2] += 1.0
    a, b = run(model, x), run(model, y)
    for k in a:
        changed = (a[k] - b[k]).abs().amax(dim=(0, 1, 3, 4))
        assert [bool(c > 0) for c in changed] == [False, False, True, False, False]


# ----------------------------------------------- receptive field of the real network

REAL = [
    RSUNet(widths=[3, 3, 3], downsample=[(1, 2, 3), (2, 1, 1)], kernel=(3, 3, 1),
           norm="batch"),
    UpDown(widths=[3, 3], downsample=[(1, 2, 2)], factor=(3, 1, 2), norm="batch"),
    UpDown(widths=[3, 3], downsample=[(2, 1, 2)], factor=(1, 2, 1), norm="batch",
           upsample="transpose", activation="relu"),
    ResEnc(widths=[3, 3, 3], blocks=[1, 2, 1], downsample=[(1, 3, 2), (2, 1, 2)],
           kernel=(3, 3, 5), anisotropic_levels=[0], upsample="interp", norm="batch"),
    MedNeXt(widths=[3, 3, 3], blocks=[1, 1, 2], downsample=[(3, 1, 2), (1, 2, 2)],
            kernel=(3, 3, 5), norm="batch"),
]


def real_extent(model: nn.Module, spec: object, axis: int) -> int:
    """The largest extent along ``axis`` of the input voxels with a non-zero gradient of one
    output voxel of the real network, over every output offset within one divisor period
    (an input long along ``axis``, twice the divisor along the others)."""
    d = spec.divisor()  # type: ignore[attr-defined]
    stated = spec.receptive_field()[axis]  # type: ignore[attr-defined]
    n = -(-(stated + 4 * d[axis]) // d[axis]) * d[axis]
    size = [2 * a for a in d]
    size[axis] = n
    x = (3 * rand((1, 1, *size)) - 1).requires_grad_(True)
    out = model(x)["affinity"]
    other = tuple(a for a in range(3) if a != axis)
    extent = 0
    for t in range(d[axis]):
        voxel = [s // 2 for s in size]
        voxel[axis] = n // 2 // d[axis] * d[axis] + t
        (grad,) = torch.autograd.grad(out[(0, 0, *voxel)], x, retain_graph=True)
        hit = torch.nonzero(grad[0, 0].abs().amax(dim=other) > 0).flatten()
        lo, hi = int(hit.min()), int(hit.max())
        assert lo > 0 and hi < n - 1  # the input was long enough to see all of it
        extent = max(extent, hi - lo + 1)
    return extent


@pytest.mark.parametrize("spec", REAL, ids=spec_id)
def test_the_real_network_reaches_no_further_than_the_stated_field(spec):
    """The engine's overlap and any user's context choice rely on the stated field not being
    too small. Measured with the network's own activations, pools, strided and transposed
    convs (batch norm in eval), every output offset of a period: never beyond the stated
    field; exactly it on axes nothing max-pools (resenc and mednext have no max pool)."""
    model = prepared(spec)
    stated = spec.receptive_field()
    measured = tuple(real_extent(model, spec, axis) for axis in range(3))
    assert all(m <= s for m, s in zip(measured, stated, strict=True)), (measured, stated)
    pooled = [spec.divisor()[a] > 1 and isinstance(spec, RSUNet | UpDown) for a in range(3)]
    for a in range(3):
        if not pooled[a]:
            assert measured[a] == stated[a], (a, measured, stated)


@pytest.mark.parametrize("norm", ["instance", "group"])
@pytest.mark.parametrize("kind", [RSUNet, ResEnc, MedNeXt])
def test_patch_statistics_norms_reach_the_whole_patch_beyond_the_stated_field(kind, norm):
    """README says so for instance norm; group norm does the same: a voxel far outside the
    stated field still changes the output (so patch-wise outputs of these norms are
    blended, never trusted to the field alone)."""
    extra = {"kernel": (3, 3, 3)} if kind is MedNeXt else {}
    spec = kind(widths=[2, 2], downsample=[(1, 2, 2)], norm=norm, groups=1, **extra)
    model = prepared(spec)
    rf = spec.receptive_field()
    size = (2, 2, 2 * rf[2] + 4)
    x = rand((1, 1, *size))
    y = x.clone()
    y[0, 0, :, :, -1] += 5.0  # beyond the field of x = 0
    assert float((run(model, x)["mito"] - run(model, y)["mito"])[..., 0].abs().max()) > 1e-8


# ------------------------------------------------------------- batch, eval, state dict

KINDS = {
    "rsunet": lambda norm: RSUNet(widths=[2, 4], norm=norm, groups=2, downsample=[(2, 2, 2)]),
    "updown": lambda norm: UpDown(widths=[2, 4], norm=norm, groups=2, factor=(1, 2, 1),
                                  upsample="transpose"),
    "resenc": lambda norm: ResEnc(widths=[2, 4], blocks=[1, 2], norm=norm, groups=2,
                                  upsample="interp", downsample=[(2, 1, 2)]),
    "mednext": lambda norm: MedNeXt(widths=[2, 4], blocks=[1, 1], norm=norm, groups=2,
                                    kernel=(3, 3, 3), downsample=[(2, 2, 2)]),
}


@pytest.mark.parametrize("norm", ["batch", "group", "instance", "none"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_eval_outputs_are_bitwise_repeatable_per_sample_and_leave_buffers_alone(kind, norm):
    """In eval: the same bits twice; a sample's outputs the same alone and in a batch with
    samples of other statistics (scaled by 100, offset by -50) on either side; and no
    forward moves a buffer (batch norm's running statistics stay put)."""
    spec = KINDS[kind](norm)
    model = prepared(spec)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    size = tuple(2 * a for a in spec.divisor())
    x = rand((1, 1, *size))
    others = 100 * rand((2, 1, *size), seed=5) - 50
    alone = run(model, x)
    assert all(torch.equal(alone[k], v) for k, v in run(model, x).items())
    mixed = run(model, torch.cat([others[:1], x, others[1:]]))
    for k in alone:
        torch.testing.assert_close(mixed[k][1:2], alone[k], rtol=1e-12, atol=1e-12)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_state_dict_fits_its_own_model_and_names_a_head_of_another_width(kind):
    """weights_mismatch finds nothing wrong with a model's own weights (round trip exact in
    eval) and names the head that differs when a task's channels change."""
    spec = KINDS[kind]("batch")
    model = prepared(spec)
    weights = model.state_dict()
    assert weights_mismatch(models.build(spec, head_channels=HEADS), weights) is None
    fresh = models.build(spec, head_channels=HEADS).double()
    fresh.load_state_dict(weights)
    x = rand((2, 1, *(2 * a for a in spec.divisor())))
    a, b = run(model, x), run(fresh.eval(), x)
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = models.build(spec, head_channels={"affinity": 3, "mito": 2})
    message = weights_mismatch(other, weights)
    assert message is not None and "heads.mito.weight" in message and "[1, 2, 1, 1, 1]" in message


# ---------------------------------------------- patches the recipe checks accept run


def with_model(model: str, patch: str) -> str:
    return MINIMAL.replace("model: {type: rsunet, widths: [4, 8]}", f"model: {model}").replace(
        "patch: [8, 32, 32]", f"patch: {patch}")


def forward_error(recipe) -> str | None:
    """The error of the recipe's network on its train patch, in training (its batch size)
    and in eval (one sample), or None when both run."""
    torch.manual_seed(0)
    model = models.build(recipe.model, head_channels=recipe.head_channels())
    for training, batch in ((True, recipe.train.batch_size), (False, 1)):
        model.train(training)
        try:
            with torch.no_grad():
                model(torch.rand(batch, 1, *recipe.train.patch))
        except (ValueError, RuntimeError) as exc:
            return f"{'train' if training else 'eval'}: {exc}"
    return None


SWEEP = {
    "rsunet": "{type: rsunet, widths: [2, 4, 4], norm: NORM, groups: 2, downsample: DOWN}",
    "updown": "{type: updown, widths: [2, 4], norm: NORM, groups: 2, factor: [1, 2, 2], "
              "downsample: [DOWN1]}",
    "resenc": "{type: resenc, widths: [4, 2, 4], blocks: [1, 1, 1], norm: NORM, groups: 2, "
              "downsample: DOWN}",
    "mednext": "{type: mednext, widths: [2, 4, 4], blocks: [1, 1, 1], norm: NORM, groups: 2, "
               "kernel: [3, 3, 3], downsample: DOWN}",
}
DOWNS = ["[[1, 1, 1], [2, 2, 2]]", "[[1, 2, 2], [2, 1, 1]]", "[[2, 2, 2], [1, 2, 2]]"]


@pytest.mark.parametrize("norm", ["batch", "group", "instance", "none"])
@pytest.mark.parametrize("kind", list(SWEEP))
def test_every_small_patch_the_checks_accept_runs_and_the_others_name_the_patch(
        write, kind, norm):
    """Over downsamplings whose last factor is not (1, 1, 1) and patches of one and two
    divisor periods per axis (and one voxel off): validation either refuses at train.patch
    or the network runs in training and in eval."""
    for down in DOWNS:
        line = SWEEP[kind].replace("NORM", norm).replace("DOWN1", down[1:10]).replace(
            "DOWN", down)
        d = load_recipe(write(with_model(line, "[8, 32, 32]"))).recipe.model.divisor()
        for times in [(1, 1, 1), (2, 1, 1), (1, 1, 2), (2, 2, 2)]:
            for off in (0, 1):
                patch = [a * t for a, t in zip(d, times, strict=True)]
                patch[2] += off
                try:
                    recipe = load_recipe(write(with_model(line, str(patch)))).recipe
                except RecipeError as exc:
                    assert "train.patch" in str(exc), (down, patch, str(exc))
                    continue
                assert off == 0 or d[2] == 1, (down, patch)
                assert forward_error(recipe) is None, (down, patch, forward_error(recipe))


TRAILING = {
    "rsunet": "{type: rsunet, widths: [2, 4, 4], norm: group, groups: 2, "
              "downsample: [[2, 2, 2], [1, 1, 1]]}",
    "updown": "{type: updown, widths: [2, 4, 4], norm: group, groups: 2, factor: [1, 1, 1], "
              "downsample: [[2, 2, 2], [1, 1, 1]]}",
    "resenc": "{type: resenc, widths: [4, 2, 4], blocks: [1, 1, 1], norm: group, groups: 2, "
              "downsample: [[2, 2, 2], [1, 1, 1]]}",
    "mednext": "{type: mednext, widths: [2, 4, 4], blocks: [1, 1, 1], norm: group, groups: 2, "
               "kernel: [3, 3, 3], downsample: [[2, 2, 2], [1, 1, 1]]}",
}


@pytest.mark.parametrize("kind", list(TRAILING))
def test_a_trailing_unit_factor_one_voxel_level_is_refused_at_the_patch(write, kind):
    line = TRAILING[kind]
    ok = load_recipe(write(with_model(line, "[8, 32, 32]"))).recipe
    assert ok.model.divisor() == (2, 2, 2)
    spec = ok.model.model_copy()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        models.build(spec, head_channels={"a": 1}).eval()(torch.rand(1, 1, 2, 2, 2))
    with pytest.raises(RecipeError, match=r"train\.patch"):
        load_recipe(write(with_model(line, "[2, 2, 2]")))


# ------------------------------------------------------------------ README's figures

README_FIGURES = [
    (RSUNet(widths=[8, 16, 32]), (8, 64, 64), 164_259, 66.6),
    (ResEnc(widths=[8, 16, 32], blocks=[1, 2, 2]), (8, 64, 64), 115_931, 23.9),
    (MedNeXt(widths=[8, 16, 32], blocks=[1, 1, 1]), (8, 64, 64), 26_123, 11.6),
    (RSUNet(widths=[16, 32, 64, 128]), (16, 128, 128), 2_655_747, 370.3),
]


@pytest.mark.parametrize(("spec", "patch", "params", "kflops"), README_FIGURES,
                         ids=lambda v: getattr(v, "type", None))
def test_the_readmes_model_figures_are_what_the_built_models_state(spec, patch, params, kflops):
    """README: 3 levels [8, 16, 32] with 3 affinity outputs, and rsunet [16, 32, 64, 128]
    (receptive field 57 x 204 x 204)."""
    model = models.build(spec, head_channels={"affinity": 3})
    facts = model_facts(model, spec, patch)
    assert facts.params == params
    assert round(facts.flops_per_voxel / 1e3, 1) == pytest.approx(kflops)
    if len(spec.widths) == 4:
        assert facts.receptive_field == (57, 204, 204)
