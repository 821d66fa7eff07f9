"""Facts about a built model: parameters, FLOPs per voxel, receptive field, accepted sizes.

Parameters and FLOPs are measured on the built module, so every model has them; the
receptive field and the divisor are the spec's own answers (``ModelBase.receptive_field``:
None for a model that does not know it).

Receptive field
---------------
RSUNet and UpDown compute theirs from the spec (``emrun.recipe.receptive_field``), resenc and
mednext theirs too (``emrun.recipe.receptive_field_unets``).
:func:`empirical_receptive_field` measures the same thing by autograd on a structural twin of
the model (same class and code path, one channel per level, no norms, activations replaced by
identity, max pools by average pools, all weights positive, float64; any spec with
``widths``, ``in_channels`` and ``norm`` has one), so that a non-zero
gradient marks exactly the voxels some path connects, with no cancellation, dead ReLUs or
max-pool ties (which make the gradient of the real model on one input an underestimate). It
runs on thin inputs (long along one axis only, the divisor along the others), one backward
pass per output offset within a divisor period: well under a second for models of up to
4 levels, minutes for 8 levels pooled by 2 (128 offsets over inputs thousands of voxels
long); the tests check that both agree.

FLOPs
-----
:func:`flops_per_voxel` counts the FLOPs of one forward pass with
``torch.utils.flop_counter.FlopCounterMode`` on meta tensors (no memory, no compute) and divides
by the number of output voxels. FlopCounterMode counts a multiply-add as 2 FLOPs and counts
convolutions, transposed convolutions and matrix products only; norms, activations, pooling,
interpolation and sums (all O(channels) per voxel, small next to the convs) are not counted.
For a fixed architecture the count per voxel does not depend on the patch size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from ..geometry import Zyx
from ..recipe.model import ModelBase
from ..registry import models
from .rsunet import parameter_count


@dataclass(frozen=True)
class ModelFacts:
    """What a built model costs and sees.

    ``params``: trainable parameters; ``flops_per_voxel``: forward FLOPs per output voxel
    (multiply-add = 2); ``receptive_field``: input voxels per axis that can influence one
    output voxel, z, y, x (None: the model does not say); ``divisor``: every input size must
    be a multiple of it, per axis.
    """

    params: int
    flops_per_voxel: float
    receptive_field: Zyx | None
    divisor: Zyx

    def accepts(self, shape: Sequence[int]) -> bool:
        """Whether the model takes a (z, y, x) input of this size (the last 3 of ``shape``)."""
        return accepts(self.divisor, shape)


def accepts(divisor: Sequence[int], shape: Sequence[int]) -> bool:
    """Whether every size in the last 3 entries of ``shape`` is a positive multiple of
    ``divisor``."""
    size = tuple(shape)[-3:]
    if len(size) != 3:
        return False
    return all(int(s) > 0 and int(s) % int(d) == 0 for s, d in zip(size, divisor, strict=True))


TWIN_FIELDS = ("widths", "in_channels", "norm")
"""Fields a spec needs for :func:`empirical_receptive_field` to build its structural twin."""


def _structural_twin(spec: ModelBase) -> nn.Module:
    """The model's dependency structure: same layers, one channel, linear, positive weights."""
    widths = [1] * len(spec.widths)  # type: ignore[attr-defined]
    thin = spec.model_copy(update={"widths": widths, "in_channels": 1,
                                   "norm": "none"})
    twin = models.build(thin, head_channels={"rf": 1})

    def linearise(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, nn.MaxPool3d):
                setattr(module, name, nn.AvgPool3d(child.kernel_size, stride=child.stride))
            elif isinstance(child, nn.ReLU | nn.ELU | nn.LeakyReLU | nn.GELU):
                setattr(module, name, nn.Identity())
            else:
                linearise(child)

    linearise(twin)
    with torch.no_grad():
        for m in twin.modules():
            if isinstance(m, nn.Conv3d | nn.ConvTranspose3d):
                m.weight.fill_(1.0 / math.prod(m.weight.shape[2:]))
                if m.bias is not None:
                    m.bias.zero_()
    return twin.double().eval()


def empirical_receptive_field(spec: ModelBase, *, start: int = 64) -> Zyx:
    """The receptive field measured by autograd on the model's structural twin (see the
    module docstring): per axis, the extent of the input voxels with a non-zero gradient of
    one output voxel, maximised over the output voxel's position within one divisor period.

    The input starts long enough for the spec's stated field (so a right statement costs one
    pass) and doubles while some output voxel's field reaches the border, so a stated field
    too small is still measured in full.
    """
    if not all(name in type(spec).model_fields for name in TWIN_FIELDS):
        raise TypeError(f"no structural twin for model type {spec.type!r}")
    twin = _structural_twin(spec)
    divisor = tuple(int(d) for d in spec.divisor())
    stated = spec.receptive_field()
    rf = [1, 1, 1]
    for axis in range(3):
        d = divisor[axis]
        room = 0 if stated is None else int(stated[axis]) + 4 * d
        n = -(-max(start, 4 * d, room) // d) * d
        while (extent := _axis_extent(twin, divisor, axis, n)) is None:
            n *= 2
        rf[axis] = extent
    return (rf[0], rf[1], rf[2])


def _axis_extent(twin: nn.Module, divisor: Sequence[int], axis: int, n: int) -> int | None:
    """The twin's largest field along ``axis`` over one divisor period of output voxels, on
    an input ``n`` long along ``axis`` (the divisor along the others); None as soon as one
    output voxel's field reaches the input's border (``n`` is too short to measure it)."""
    d = divisor[axis]
    size = list(divisor)
    size[axis] = n
    x = torch.zeros((1, 1, *size), dtype=torch.float64, requires_grad=True)
    out = twin(x)["rf"]
    centre = [s // 2 for s in size]
    centre[axis] = n // 2 // d * d
    other = tuple(a for a in range(3) if a != axis)
    extent = 0
    for t in range(d):
        index = list(centre)
        index[axis] += t
        (grad,) = torch.autograd.grad(out[(0, 0, *index)], x, retain_graph=True)
        hit = torch.nonzero(grad[0, 0].abs().amax(dim=other) > 0).flatten()
        lo, hi = int(hit.min()), int(hit.max())
        if lo == 0 or hi == n - 1:
            return None
        extent = max(extent, hi - lo + 1)
    return extent


def flops_per_voxel(model: nn.Module, patch: Sequence[int], in_channels: int = 1) -> float:
    """Forward FLOPs (multiply-add = 2; convs and matmuls only) per output voxel at ``patch``.

    Runs one forward in eval mode on meta tensors: instant, and leaves the model (weights,
    buffers, device, train/eval mode) untouched.
    """
    patch = tuple(int(p) for p in patch)
    tensors = {name: torch.empty_like(t, device="meta")
               for name, t in [*model.named_parameters(), *model.named_buffers()]}
    x = torch.empty((1, in_channels, *patch), device="meta")
    counter = FlopCounterMode(display=False)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()  # the count does not depend on the mode; eval takes any accepted patch
    try:
        with torch.no_grad(), counter:
            functional_call(model, tensors, (x,))
    finally:
        for m, training in modes:
            m.training = training
    return counter.get_total_flops() / math.prod(patch)


def model_facts(model: nn.Module, spec: ModelBase, patch: Sequence[int]) -> ModelFacts:
    """Parameters (counted from ``model``), FLOPs per output voxel at ``patch`` (measured),
    receptive field and divisor (the spec's answers) of a built model and its spec.

    Raises ValueError (naming the divisor) when ``patch`` is not a size the model accepts.
    """
    divisor = tuple(int(d) for d in spec.divisor())
    if not accepts(divisor, patch):
        raise ValueError(f"patch {tuple(patch)} is not a multiple of the model's divisor "
                         f"{divisor} (z, y, x)")
    return ModelFacts(
        params=parameter_count(model),
        flops_per_voxel=flops_per_voxel(model, patch, spec.input_channels()),
        receptive_field=spec.receptive_field(),
        divisor=(divisor[0], divisor[1], divisor[2]),
    )


def output_problem(model: nn.Module, head_channels: dict[str, int], patch: Sequence[int],
                   in_channels: int = 1) -> str | None:
    """What is wrong with the model's outputs for one input of ``patch``, or None.

    Every consumer (losses, inference, export) takes one output per task, each of the
    task's channels and the input's size; a third-party model that returns something else
    would fail later, deep in the trainer or the engine, or predict a shifted volume. One
    forward in eval mode on meta tensors (no memory, no compute); a model whose code cannot
    run on meta tensors (data-dependent steps) is not checked (None), one whose forward
    fails otherwise (e.g. it takes other input channels than its spec says) is a problem.
    """
    patch = tuple(int(p) for p in patch)
    tensors = {name: torch.empty_like(t, device="meta")
               for name, t in [*model.named_parameters(), *model.named_buffers()]}
    x = torch.empty((1, in_channels, *patch), device="meta")
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            out = functional_call(model, tensors, (x,))
    except Exception as exc:
        text = " ".join(str(exc).split())
        if isinstance(exc, NotImplementedError) or "meta" in text.lower():
            return None  # data-dependent code, say: the real forward will tell
        return (f"a forward of an input of {(1, in_channels, *patch)} fails: "
                f"{type(exc).__name__}: {text[:300]}")
    finally:
        for m, training in modes:
            m.training = training
    return _outputs_problem(out, head_channels, patch, in_channels)


def _outputs_problem(out: object, head_channels: dict[str, int], patch: tuple[int, ...],
                     in_channels: int = 1) -> str | None:
    """How ``out`` differs from one (1, channels, *patch) tensor per task, by task name
    (the message names the input as given: ``in_channels`` channels)."""
    if not isinstance(out, dict):
        return (f"it returns a {type(out).__name__}, not a dict of one output per task "
                f"({', '.join(repr(n) for n in head_channels)})")
    if set(out) != set(head_channels):
        return (f"its outputs are named {sorted(out)}, not after the tasks "
                f"{sorted(head_channels)}")
    for name, channels in head_channels.items():
        value = out[name]
        want = (1, channels, *patch)
        if not isinstance(value, torch.Tensor):
            return f"its output {name!r} is a {type(value).__name__}, not a tensor"
        if value.dim() == 5 and value.shape[1] != channels:
            return (f"its output {name!r} has {value.shape[1]} channels, not the task's "
                    f"{channels} (head_channels[{name!r}])")
        if tuple(value.shape) != want:
            return (f"its output {name!r} is {tuple(value.shape)} for an input of "
                    f"{(1, in_channels, *patch)}, not {want}: outputs keep the input's size "
                    "(pad the convolutions, e.g. padding='same')")
        if not value.is_floating_point():
            return f"its output {name!r} is {value.dtype}, not a floating-point tensor"
    return None
