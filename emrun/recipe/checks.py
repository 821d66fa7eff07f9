"""Checks across sections that no single field can make, each naming the key it is about."""

from __future__ import annotations

import math
from numbers import Integral

from .augment import UNSTATED, augment_problems
from .data import VolumeSource
from .recipe import Recipe
from .tasks import (
    NEAREST,
    AffinityTarget,
    BinaryTarget,
    DistanceTarget,
    LSDTarget,
    MalisLoss,
    SynapseTarget,
)

Path = tuple[str | int, ...]
AXES = "zyx"


def _divisibility(patch: tuple[int, int, int], divisor: tuple[int, int, int],
                  model: str) -> str | None:
    bad = [a for a in range(3) if patch[a] % divisor[a]]
    if not bad:
        return None
    # each divisor with its axes, so that (2, 4, 4) says which axis needs which
    groups = [(d, [AXES[a] for a in range(3) if divisor[a] == d])
              for d in sorted({divisor[a] for a in range(3) if divisor[a] > 1})]
    parts = [f"{_joined(axes)} {'must be divisible ' if i == 0 else ''}by {d}"
             for i, (d, axes) in enumerate(groups)]
    return f"{', '.join(parts)} for {model} (got {list(patch)})"


def _joined(axes: list[str]) -> str:
    return " and ".join(axes) if len(axes) <= 2 else "z, y and x"


def divisor_problem(divisor: object, model: str) -> str | None:
    """Why a spec's ``divisor()`` is not three whole sizes of at least 1, or None.

    A third-party spec can return anything; a 0 would otherwise surface as a
    ZeroDivisionError deep in the checks (an internal error naming nothing)."""
    values = tuple(divisor) if isinstance(divisor, tuple | list) else None
    if values is not None and len(values) == 3 and all(
            isinstance(d, Integral) and not isinstance(d, bool) and d >= 1 for d in values):
        return None
    return (f"model {model!r}: its spec's divisor() gives {divisor!r}, not three whole "
            "sizes of at least 1 (z, y, x); the spec (or the plugin adding it) needs fixing")


def _voxel_sizes(recipe: Recipe) -> list[tuple[str, tuple[float, float, float]]]:
    """(``data.group.name``, voxel size) of every source whose voxel size the recipe knows
    (the others take theirs from the volume's metadata, seen only when data is opened)."""
    return [(f"data.{group}.{name}", source.voxel_size)
            for group in ("sources", "validation")
            for name, source in getattr(recipe.data, group).items()
            if source.voxel_size is not None]


def _lsd_problem(target: LSDTarget, patch: tuple[int, int, int],
                 sizes: list[tuple[str, tuple[float, float, float]]]) -> str | None:
    """Why LSDs of this sigma would be meaningless on some source, or None.

    Below one voxel the window holds only the voxel itself. Beyond the window's reach
    (3 sigma) of half the patch, a patch centre's window is cut by the patch edge on both
    sides, so no voxel sees its whole window (descriptors then measure the crop).
    """
    sigma = target.sigma_zyx()
    for where, size in sizes:
        small = [AXES[a] for a in range(3) if sigma[a] < size[a]]
        if small:
            return (f"sigma {list(sigma)} nm is below one voxel of {where} (voxel size "
                    f"{list(size)} nm) in {', '.join(small)}")
        reach = [3 * sigma[a] / size[a] for a in range(3)]
        large = [AXES[a] for a in range(3) if reach[a] > patch[a] / 2]
        if large:
            return (f"3 sigma reaches {[round(r, 1) for r in reach]} voxels of {where}, more "
                    f"than half of train.patch {list(patch)} in {', '.join(large)}; lower "
                    f"sigma or enlarge the patch")
    return None


def _lsd_block_problem(target: LSDTarget,
                       sizes: list[tuple[str, tuple[float, float, float]]]) -> str | None:
    """A ``downsample`` block larger than sigma: the window sums, taken on the coarse grid,
    no longer resolve the window (sigma half a block was off by up to 0.66 against the
    exact descriptors; the automatic choice keeps 3 blocks per sigma, off by 0.04)."""
    blocks = target.downsample_zyx()
    if blocks is None:
        return None
    sigma = target.sigma_zyx()
    for where, size in sizes:
        per = [sigma[a] / size[a] / blocks[a] for a in range(3)]
        coarse = [AXES[a] for a in range(3) if per[a] < 1]
        if coarse:
            return (f"downsample {list(blocks)} leaves sigma {[round(v, 2) for v in per]} "
                    f"blocks of {where} (voxel size {list(size)} nm), under one in "
                    f"{', '.join(coarse)}: use blocks of at most sigma (null chooses 3 "
                    "blocks per sigma)")
    return None


def _distance_problem(target: DistanceTarget,
                      sizes: list[tuple[str, tuple[float, float, float]]]) -> str | None:
    """A clip below the smallest voxel side saturates every labelled voxel (the nearest
    boundary is at least one voxel away): the target would be constant."""
    for where, size in sizes:
        if target.clip < min(size):
            return (f"clip {target.clip:g} nm is below one voxel of {where} (voxel size "
                    f"{list(size)} nm): every labelled voxel would be 1")
    return None


def nm_target_problems(recipe: Recipe, sizes: list[tuple[str, tuple[float, float, float]]]
                       ) -> list[tuple[Path, str]]:
    """Problems of the lsd and distance tasks on sources of these (name, voxel size)."""
    problems: list[tuple[Path, str]] = []
    for name, task in recipe.tasks.items():
        target = task.target
        if isinstance(target, LSDTarget):
            msg = _lsd_problem(target, recipe.train.patch, sizes)
            if msg:
                problems.append((("tasks", name, "target", "sigma"), msg))
            elif msg := _lsd_block_problem(target, sizes):
                problems.append((("tasks", name, "target", "downsample"), msg))
        if isinstance(target, DistanceTarget):
            msg = _distance_problem(target, sizes)
            if msg:
                problems.append((("tasks", name, "target", "clip"), msg))
    return problems


def _one_voxel_problem(recipe: Recipe, patch: tuple[int, int, int],
                       divisor: tuple[int, int, int], training: bool) -> str | None:
    """A patch equal to the divisor leaves one voxel at the deepest level; a normalisation
    with nothing to take statistics over there stops training (and for instance and group
    norm inference) inside torch: instance norm always, group norm with one channel per
    group, batch norm of one sample (training only: inference uses running statistics)."""
    model = recipe.model
    if any(a != d for a, d in zip(patch, divisor, strict=True)):
        return None
    norm = getattr(model, "norm", None)
    groups = getattr(model, "groups", None)
    if norm == "instance":
        why = "instance norm has no statistics"
    elif norm == "group" and groups in model.deepest_norm_widths():
        why = f"group norm of {groups} groups over {groups} channels has no statistics"
    elif norm == "batch" and training and recipe.train.batch_size == 1:
        why = "batch norm of one sample (train.batch_size 1) has no statistics"
    else:
        return None
    return (f"{list(patch)} leaves one voxel at the deepest level of {model.title()}, where "
            f"{why}; use a multiple of at least 2 on some axis")


def cross_checks(recipe: Recipe) -> list[tuple[Path, str]]:
    """Every cross-section problem as (key path, message); empty when the recipe is coherent."""
    problems: list[tuple[Path, str]] = []
    model = recipe.model
    divisor = model.divisor()
    patch = recipe.train.patch
    bad_divisor = divisor_problem(divisor, str(model.type))  # type: ignore[attr-defined]
    if bad_divisor:
        problems.append((("model", "type"), bad_divisor))

    for path, p in ((("train", "patch"), patch), (("infer", "patch"), recipe.infer.patch)):
        if p is not None and not bad_divisor:
            msg = _divisibility(p, divisor, model.title()) or \
                _one_voxel_problem(recipe, p, divisor, training=path[0] == "train")
            if msg:
                problems.append((path, msg))

    if not any(task.weight > 0 for task in recipe.tasks.values()):
        problems.append((("tasks",), "at least one task needs a weight above 0"))

    problems += nm_target_problems(recipe, _voxel_sizes(recipe))
    for name, task in recipe.tasks.items():
        target = task.target
        if isinstance(task.loss, MalisLoss):
            if not isinstance(target, AffinityTarget):
                problems.append((("tasks", name, "loss", "type"),
                                 f"malis needs an affinity target, not {target.type!r}"))
            else:
                missing = [list(o) for o in NEAREST if o not in target.offsets]
                if missing:
                    problems.append((("tasks", name, "target", "offsets"),
                                     f"malis needs the nearest-neighbour offsets "
                                     f"(-1,0,0), (0,-1,0), (0,0,-1); missing {missing}"))
        if isinstance(target, AffinityTarget):
            extent = target.extent()
            patches = ((("train", "patch"), patch), (("infer", "patch"), recipe.infer_patch()))
            for ppath, p in patches:
                too_big = [AXES[a] for a in range(3) if extent[a] >= p[a]]
                if too_big:
                    problems.append((
                        ("tasks", name, "target", "offsets"),
                        f"offsets reach {list(extent)} voxels, not smaller than "
                        f"{'.'.join(ppath)} {list(p)} in {', '.join(too_big)}",
                    ))
                    break
        if isinstance(target, BinaryTarget | SynapseTarget):
            for group in ("sources", "validation"):
                for sname, source in getattr(recipe.data, group).items():
                    if target.volume not in source.semantic_names():
                        have = ", ".join(sorted(source.semantic_names())) or "none"
                        problems.append((
                            ("tasks", name, "target", "volume"),
                            f"data.{group}.{sname} has no semantic volume {target.volume!r} "
                            f"(it has: {have})",
                        ))

    # each step judged on the shapes the steps after it make it produce, at each voxel size
    # (a volume's that the recipe does not state: by the data checks, from its metadata)
    voxels = [UNSTATED if isinstance(s, VolumeSource) and s.voxel_size is None else s.voxel_size
              for s in recipe.data.sources.values()]
    for voxel in dict.fromkeys(voxels or [None]):
        for where, msg in augment_problems(recipe.augment, patch, voxel):
            if (("augment", *where), msg) not in problems:
                problems.append((("augment", *where), msg))

    ipatch = recipe.infer_patch()
    stride = recipe.infer.resolved_stride(ipatch)
    if any(s > p for s, p in zip(stride, ipatch, strict=True)):
        problems.append((("infer", "stride"), f"stride {list(stride)} exceeds the patch "
                         f"{list(ipatch)}: voxels between patches would never be predicted"))
    for tname in recipe.infer.tta_reduce:
        if tname not in recipe.tasks:
            problems.append((("infer", "tta_reduce", tname),
                             f"no task named {tname!r} (tasks: {', '.join(recipe.tasks)})"))
    chunks, block = recipe.infer.chunks, recipe.infer.block
    if chunks and block and any(b % c for b, c in zip(block, chunks, strict=True)):
        problems.append((("infer", "block"), f"block {list(block)} is not a whole number of "
                         f"chunks {list(chunks)}"))
    if block and (thin := [AXES[a] for a in range(3) if block[a] < stride[a]]):
        # passed validation, then `emrun infer` refused it on any volume thicker than it
        problems.append((("infer", "block"), f"block {list(block)} is smaller than one patch "
                         f"stride {list(stride)} in {_joined(thin)}: `emrun infer` refuses it "
                         "(blocks and their chunk files for every few voxels); give at least "
                         "the stride"))

    weighted = [src.weight is not None for src in recipe.data.sources.values()]
    if any(weighted) and not all(weighted):
        unweighted = [n for n, s in recipe.data.sources.items() if s.weight is None]
        problems.append((("data", "sources"), f"give a weight to every source or to none "
                         f"(no weight: {', '.join(unweighted)})"))
    for sname, source in recipe.data.sources.items():  # validation crops may be smaller
        size = source.roi.shape if source.roi is not None else getattr(source, "shape", None)
        key = "roi" if source.roi is not None else "shape"
        if size is not None and any(s < p for s, p in zip(size, patch, strict=True)):
            problems.append((("data", "sources", sname, key),
                             f"{key} {list(size)} is smaller than train.patch {list(patch)}"))
        shape = getattr(source, "shape", None)
        if shape is not None and source.roi is not None:
            end = [o + s for o, s in zip(source.roi.offset, source.roi.shape, strict=True)]
            if any(e > s for e, s in zip(end, shape, strict=True)):
                problems.append((("data", "sources", sname, "roi"),
                                 f"roi ends at {end}, outside the synthetic shape {list(shape)}"))
    return problems


def _bookkeeping_cautions(recipe: Recipe) -> list[tuple[Path, str]]:
    """Schedule milestones and validations the run never reaches: a recipe shortened for a
    quick try keeps the long run's intervals, and nothing said that no validation (so no
    best.pt) or no decay would happen."""
    train, found = recipe.train, []
    every = train.validate_every
    if recipe.data.validation and every > train.iterations:
        found.append((("train", "validate_every"),
                      f"{every} is more than train.iterations {train.iterations}: the run "
                      "never validates, so it writes no best.pt (0 turns validation off)"))
    late = [m for m in getattr(train.schedule, "milestones", []) if m >= train.iterations]
    if late:
        found.append((("train", "schedule", "milestones"),
                      f"{', '.join(map(str, late))} {'is' if len(late) == 1 else 'are'} not "
                      f"before train.iterations {train.iterations}: the rate never decays "
                      "there"))
    return found


def cautions(recipe: Recipe) -> list[tuple[Path, str]]:
    """What is valid but probably not meant, as (key path, message): warned, not refused."""
    found: list[tuple[Path, str]] = []
    warmup = recipe.train.schedule.warmup
    if warmup >= recipe.train.iterations:
        found.append((("train", "schedule", "warmup"),
                      f"the warm-up ({warmup} iterations) lasts the whole run "
                      f"(train.iterations {recipe.train.iterations}): the learning rate never "
                      f"reaches its set value, the last step uses "
                      f"{recipe.train.iterations / (warmup + 1):.2g} of it"))
    found += _bookkeeping_cautions(recipe)
    found += _infer_cautions(recipe)
    found += _intensity_cautions(recipe)
    found += _activation_cautions(recipe)
    if recipe.infer.dtype == "uint8":
        signed = [(n, "the signed distance task") for n, t in recipe.tasks.items()
                  if isinstance(t.target, DistanceTarget) and t.target.signed]
        signed += [(n, "the task") for n, t in recipe.tasks.items()
                   if t.activation == "tanh" and (n, "the signed distance task") not in signed]
        if signed:
            name, what = signed[0]
            found.append((("infer", "dtype"),
                          f"uint8 outputs clip to [0, 1], so the negative half of {what} "
                          f"{name!r} (activation {recipe.tasks[name].activation}) is lost; "
                          "use float16"))
    return found


MAX_PATCHES_PER_VOXEL = 64
"""Patches that predict each voxel, beyond which a stride is probably a slip: the default
overlap gives about 2.4, an overlap of half the patch 8; `stride: [1, 1, 1]` gave thousands
(a 20 x 64 x 64 volume took minutes on a CPU, a real one would take years)."""

MIN_CHUNK_VOXELS = 4096
"""Voxels of an output chunk below which chunks are probably a slip: every chunk is a file
per task (`chunks: [1, 1, 1]` wrote one per voxel, at a few kilovoxels a second)."""


def _infer_cautions(recipe: Recipe) -> list[tuple[Path, str]]:
    """Strides and chunks `emrun infer` accepts and predicts with, at a cost nobody means."""
    found: list[tuple[Path, str]] = []
    patch = recipe.infer_patch()
    stride = recipe.infer.resolved_stride(patch)
    per_voxel = math.prod(p / s for p, s in zip(patch, stride, strict=True))
    if per_voxel > MAX_PATCHES_PER_VOXEL:
        key = "stride" if recipe.infer.stride is not None else "overlap"
        found.append((("infer", key),
                      f"a stride of {list(stride)} for patches of {list(patch)} predicts each "
                      f"voxel about {per_voxel:,.0f} times (the default overlap: 2.4): "
                      "inference takes that much longer; a larger stride (or less overlap)"))
    chunks = recipe.infer.chunks
    voxels = math.prod(chunks) if chunks is not None else MIN_CHUNK_VOXELS
    if voxels < MIN_CHUNK_VOXELS:
        files = 2**30 // voxels
        found.append((("infer", "chunks"),
                      f"chunks of {voxels:,} voxel{'s' if voxels > 1 else ''}: each chunk is "
                      "a file, about "
                      f"{files:,} per task for a gigavoxel, and writing them is slow; give "
                      f"chunks of at least {MIN_CHUNK_VOXELS:,} voxels (or leave them out)"))
    return found


def _activation_cautions(recipe: Recipe) -> list[tuple[Path, str]]:
    """A task's activation other than the one its loss trains for: bce (dice, malis) trains
    logits, which inference must pass through a sigmoid; mse trains the raw output, which a
    sigmoid or tanh would then distort."""
    found: list[tuple[Path, str]] = []
    for name, task in recipe.tasks.items():
        trained_for = getattr(type(task.loss), "activation", None)
        if trained_for is None or task.activation == trained_for:
            continue
        how = "logits" if trained_for == "sigmoid" else "the raw output"
        found.append((("tasks", name, "activation"),
                      f"activation {task.activation} with loss {task.loss.type}, which trains "
                      f"{how}: `emrun infer` would write {task.activation} of it, not the "
                      f"target's values; use activation {trained_for} (the default for "
                      f"{task.loss.type})"))
    return found


def _intensity_cautions(recipe: Recipe) -> list[tuple[Path, str]]:
    """Training scales each source by its own `intensity`, inference by one scale: the
    first one given. Sources that give different ones train fine, and `emrun infer` then
    reads every input as the first one's data, which nothing else would say; a validation
    source of another scale is scored on a prediction infer would not make of it."""
    given = {name: (source.intensity.low, source.intensity.high)
             for name, source in recipe.data.sources.items()
             if getattr(source, "intensity", None) is not None}
    found: list[tuple[Path, str]] = []
    if not given:
        return found
    (first, scale), *_ = given.items()
    unscaled = [name for name, source in recipe.data.sources.items() if name not in given]
    if unscaled:
        found.append((("data", "sources", unscaled[0]),
                      f"{', '.join(unscaled)} give{'s' if len(unscaled) == 1 else ''} no "
                      f"intensity (trained on its dtype's range) while {first} gives "
                      f"[{scale[0]:g}, {scale[1]:g}], which `emrun infer` scales every input "
                      "by, this one's kind of data too; give each source its intensity"))
    if len(set(given.values())) > 1:
        others = ", ".join(f"{name} [{low:g}, {high:g}]" for name, (low, high) in given.items()
                           if (low, high) != scale)
        found.append((("data", "sources", first, "intensity"),
                      f"the sources give different intensity scales ({others}); `emrun infer` "
                      f"scales every input by this first one, [{scale[0]:g}, {scale[1]:g}]: "
                      "predict data of the other scales with -o "
                      "'data.sources.NAME.intensity=...' naming theirs"))
    for name, source in recipe.data.validation.items():
        own = getattr(source, "intensity", None)
        if own is not None and (own.low, own.high) != scale:
            found.append((("data", "validation", name, "intensity"),
                          f"validation scales this source by [{own.low:g}, {own.high:g}], "
                          f"`emrun infer` every input by data.sources.{first}'s "
                          f"[{scale[0]:g}, {scale[1]:g}]: its validation scores a prediction "
                          "infer would not make of it (give infer its scale with -o "
                          f"'data.sources.{first}.intensity=...')"))
    return found
