"""Open every volume a recipe references and check it can feed training as described.

Reads metadata (shape, dtype, voxel size) and a few sections of voxel data, so it is fast on
any size.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..capacity import size_text
from ..devices import available_memory
from ..errors import UserError
from ..geometry import Coordinate, Roi, box_of
from ..io import Volume, VolumeError
from ..io.intensity import outside_unit
from ..io.masks import inside
from ..io.window import Placed, data_box, other_offset, placed_in
from ..recipe import LoadedRecipe, Problem, Recipe
from ..recipe.augment import augment_problems
from ..recipe.checks import nm_target_problems
from ..recipe.data import SourceBase, SyntheticSource, VolumeSource
from ..recipe.errors import KeyPath
from ..synth import peak_memory
from .augment import Context, Pipeline
from .sources import labelled_fraction, mixture_weights, open_in_source, open_sources
from .targets import Patch


@dataclass(frozen=True)
class SourceFacts:
    """What the checks learnt about one source, for the summary."""

    group: str
    name: str
    kind: str
    shape: tuple[int, ...] | None
    dtype: str | None
    voxel_size: tuple[float, ...] | None
    weight: float | None
    sampled: tuple[int, ...] | None = None  # the box patches come from (labels' part), z y x


def check_data(loaded: LoadedRecipe) -> tuple[list[SourceFacts], list[Problem]]:
    """Facts about every source and every problem found with its volumes."""
    recipe = loaded.recipe
    facts: list[SourceFacts] = []
    problems: list[Problem] = []
    pipeline = Pipeline(recipe.augment)
    for group in ("sources", "validation"):
        for name, source in getattr(recipe.data, group).items():
            path: KeyPath = ("data", group, name)
            found: list[tuple[KeyPath, str]] = []
            fact = _check_source(group, name, source, recipe.train.patch, path, found,
                                 pipeline)
            if group == "sources" and not found and fact.shape is not None:
                _check_augmented_read(pipeline, recipe.train.patch, source, fact, path, found)
            facts.append(fact)
            problems += [Problem(msg, loaded.mark(p), p) for p, msg in found]
    problems += [Problem(msg, loaded.mark(p), p) for p, msg in _check_nm_targets(loaded, facts)]
    problems += [Problem(msg, loaded.mark(p), p) for p, msg in _check_labelled(recipe)]
    problems += [Problem(msg, loaded.mark(p), p) for p, msg in _check_scaled_steps(recipe, facts)]
    if not problems:  # every volume opens and fits: what the sampler would weigh
        problems += [Problem(msg, loaded.mark(p), p) for p, msg in _check_sampled(recipe)]
    return facts, problems


def _check_sampled(recipe: Recipe) -> list[tuple[KeyPath, str]]:
    """Sources weighed by their labelled voxels (no `weight`) that hold none (labels 0
    everywhere, or inside no mask): `validate` said ok, and training stopped as its loader
    was made, after its run folder, naming no file or line. Asked of the loader's own
    weighing (`mixture_weights`: a few sections, every one when those hold none); sources
    given a weight, or synthetic ones, are never weighed so."""
    specs = recipe.data.sources
    if not specs or any(not isinstance(s, VolumeSource) or s.weight is not None
                        for s in specs.values()):
        return []
    try:
        mixture_weights(open_sources(specs))  # type: ignore[arg-type]
    except UserError:
        return [(("data", "sources", name, "labels" if source.labels else "mask"),
                 "no labelled voxel to sample from (labels 0 everywhere sampled, or inside "
                 "no mask): check the labels and the mask")
                for name, source in specs.items()]
    return []


def label_cautions(loaded: LoadedRecipe) -> list[str]:
    """Located warnings for training labels with negative ids in a few sampled sections:
    training takes each negative id as an object (only 0 is background), while many
    datasets mean -1 as "unlabelled", which wants a mask instead. Volumes that cannot be
    opened are `check_data`'s to report."""
    found = []
    for group in ("sources", "validation"):
        for name, source in getattr(loaded.recipe.data, group).items():
            if not isinstance(source, VolumeSource) or not source.labels:
                continue
            key: KeyPath = ("data", group, name, "labels")
            text = _negative_ids(source.labels, source.voxel_size)
            if text:
                found.append(str(Problem(text, loaded.mark(key), key)))
    for name, source in loaded.recipe.data.sources.items():
        text = _weighed_empty(name, source)
        if text:
            key = ("data", "sources", name, "labels" if source.labels else "mask")
            found.append(str(Problem(text, loaded.mark(key), key)))
    return found


def _weighed_empty(name: str, source: SourceBase) -> str | None:
    """A source given a `weight` with no labelled voxel (labels 0 everywhere, or inside no
    mask): the weight draws it all the same, and every sample from it is masked out of the
    loss, steps that teach nothing (a source weighed by its labels is refused instead)."""
    if not isinstance(source, VolumeSource) or not source.weight or (
            source.labels is None and source.mask is None):
        return None
    try:
        opened = open_sources({name: source})
    except (UserError, VolumeError):
        return None  # check_data's to report
    if labelled_fraction(opened[0]):
        return None
    return (f"no labelled voxel (labels 0 everywhere, or inside no mask), yet weight "
            f"{source.weight:g} draws the source: its samples teach nothing; check the labels "
            "and the mask, or remove the source")


def _negative_ids(ref: str, voxel_size: Sequence[float] | None) -> str | None:
    try:
        labels = open_in_source(ref, voxel_size)
    except VolumeError:
        return None
    if labels.dtype.kind != "i" or len(labels.shape) != 3:
        return None
    depth, height, width = (int(n) for n in labels.shape)
    for z in np.unique(np.linspace(0, depth - 1, 4).round()).astype(int):
        section = labels.read(Roi((int(z), 0, 0), (1, height, width)))
        if section.size and section.min() < 0:
            return (f"{labels} holds negative ids (section {z} has {int(section.min())}): "
                    "training takes each as an object and only 0 as background; if they "
                    "mark unlabelled voxels, give the source a mask of the labelled ones")
    return None


def _check_scaled_steps(recipe: Recipe, facts: list[SourceFacts]) -> list[tuple[KeyPath, str]]:
    """The augmentation steps judged again at the voxel sizes the volumes' metadata give
    where the recipe states none: a displacement in `voxel_reference` pixels is scaled to
    them in training, which the recipe's own check could not know (it left it to this one).
    A volume without one is judged in its pixels, as training takes them."""
    stated = {name for name, source in recipe.data.sources.items() if source.voxel_size}
    sizes = [tuple(float(v) for v in f.voxel_size[-3:]) if f.voxel_size else None
             for f in facts if f.group == "sources" and f.kind == "volume"
             and f.shape is not None and f.name not in stated]
    found: list[tuple[KeyPath, str]] = []
    for voxel in dict.fromkeys(sizes):
        for where, msg in augment_problems(recipe.augment, recipe.train.patch, voxel):
            if (("augment", *where), msg) not in found:
                found.append((("augment", *where), msg))
    return found


def _check_labelled(recipe: Recipe) -> list[tuple[KeyPath, str]]:
    """A volume source without `labels` while a task's target needs them: `validate` said
    ok, and training stopped at its first sample (a validation source: at the first
    validation), naming no source."""
    unlabelled = [(group, name) for group in ("sources", "validation")
                  for name, source in getattr(recipe.data, group).items()
                  if isinstance(source, VolumeSource) and source.labels is None]
    needing = _tasks_needing_labels(recipe) if unlabelled else []
    if not needing:
        return []
    return [(("data", group, name), f"has no `labels`, which task {needing[0]!r} "
             f"({recipe.tasks[needing[0]].target.type} target) needs: give its `labels`")
            for group, name in unlabelled]


def _tasks_needing_labels(recipe: Recipe) -> list[str]:
    """The tasks whose target refuses a patch without labels (asked of each target on a
    tiny patch, so a plugin's target answers for itself)."""
    from ..registry import targets

    empty = Patch(None, None, {}, (1.0, 1.0, 1.0))
    needing = []
    for name, task in recipe.tasks.items():
        try:
            targets.build(task.target)(empty)
        except UserError:
            needing.append(name)
        except Exception:  # it wants something else (a semantic volume): not labels
            continue
    return needing


def _check_nm_targets(loaded: LoadedRecipe, facts: list[SourceFacts]
                      ) -> list[tuple[KeyPath, str]]:
    """Targets measured in nm (lsd, distance) need every source's voxel size; the recipe
    checks could only judge the sizes the recipe gives, these come from the metadata."""
    recipe = loaded.recipe
    in_nm = [name for name, task in recipe.tasks.items() if task.target.type in ("lsd", "distance")]
    if not in_nm:
        return []
    found: list[tuple[KeyPath, str]] = []
    known = []
    for fact in facts:
        if fact.voxel_size is None:
            found.append((("data", fact.group, fact.name), f"has no voxel size (no `voxel_size` "
                          f"and none in the volume's metadata), which task {in_nm[0]!r} "
                          f"({recipe.tasks[in_nm[0]].target.type}) needs: give `voxel_size`"))
        elif getattr(recipe.data, fact.group)[fact.name].voxel_size is None:
            size = tuple(float(v) for v in fact.voxel_size[-3:])
            known.append((f"data.{fact.group}.{fact.name}", size))
    return found + nm_target_problems(recipe, known)  # type: ignore[arg-type]


def _check_augmented_read(pipeline: Pipeline, patch: tuple[int, int, int], source: SourceBase,
                          fact: SourceFacts, path: KeyPath,
                          problems: list[tuple[KeyPath, str]]) -> None:
    """The augmentations read a larger crop than the patch (a warp its rotated bounding
    box, a misalignment its shift): the sampled box must hold the largest one."""
    voxel = tuple(fact.voxel_size[-3:]) if fact.voxel_size else None
    largest = pipeline.largest_input(patch, Context(voxel))  # type: ignore[arg-type]
    assert fact.shape is not None
    box = fact.sampled or (source.roi.shape if source.roi is not None
                           else tuple(fact.shape[-3:]))
    if any(b < n for b, n in zip(box, largest, strict=True)):
        key = "roi" if source.roi is not None else (
            "shape" if fact.kind == "synthetic" else "image")
        what = ("part the labels cover" if fact.sampled is not None else
                "roi" if source.roi is not None else "volume")
        problems.append(((*path, key), f"the augmentations may read crops up to {list(largest)} "
                         f"for train.patch {list(patch)}, larger than this source's "
                         f"{what} {list(box)}; use a smaller patch, a larger roi, or milder "
                         "augmentation (e.g. warp rot_max)"))


def _check_source(group: str, name: str, source: SourceBase, patch: tuple[int, int, int],
                  path: KeyPath, problems: list[tuple[KeyPath, str]],
                  pipeline: Pipeline | None = None) -> SourceFacts:
    if isinstance(source, SyntheticSource):
        need, free = peak_memory(source.shape, source.made_at), available_memory()
        if need > free:  # training's first read would fail (or swap) after its run folder
            problems.append(((*path, "shape"), f"generating {list(source.shape)} takes about "
                             f"{size_text(need)} of memory (it is made whole, in memory), "
                             f"{size_text(free)} is available; give a smaller shape"))
        return SourceFacts(group, name, "synthetic", source.shape, "uint8", source.made_at,
                           source.weight)
    assert isinstance(source, VolumeSource)
    image = _open(source.image, (*path, "image"), problems, source.voxel_size)
    if image is None:
        return SourceFacts(group, name, "volume", None, None, source.voxel_size, source.weight)
    _check_image(image, source, (*path, "image"), problems)
    others: dict[KeyPath, str] = {}
    if source.labels:
        others[(*path, "labels")] = source.labels
    if source.mask:
        others[(*path, "mask")] = source.mask
    for sem, ref in source.semantic.items():
        others[(*path, "semantic", sem)] = ref
    opened: dict[KeyPath, Volume] = {}
    for key, ref in others.items():
        volume = _open(ref, key, problems, source.voxel_size)
        if volume is not None:
            volume = placed_in(volume, image)  # of a part of the image: read at its place
            _check_companion(volume, image, key, problems)
            opened[key] = volume
    before = len(problems)
    sampled = patch if group == "sources" else None  # validation tiles, padding the edges
    _check_roi(image, source, sampled, path, problems)
    box = None
    if len(problems) == before and len(image.shape) == 3:  # values: only where shapes fit
        box = _data_box(image, source, opened, sampled, path, problems)
    voxel = source.voxel_size or image.voxel_size
    if box is not None:
        read = sampled
        if sampled is not None and pipeline is not None:  # what training reads around a
            read = pipeline.largest_input(  # centre: the augmentations' largest crop
                sampled, Context(tuple(voxel[-3:]) if voxel else None))  # type: ignore[arg-type]
        _check_values(image, source, opened.get((*path, "mask")), box, read, path, problems)
    if source.voxel_size and image.voxel_size and not np.allclose(
        source.voxel_size, image.voxel_size[-3:]
    ):
        problems.append(((*path, "voxel_size"), f"{list(source.voxel_size)} nm disagrees with "
                         f"{image} metadata {list(image.voxel_size)} nm"))
    part = tuple(int(n) for n in box.shape) if box is not None and any(
        isinstance(v, Placed) for v in opened.values()) else None
    return SourceFacts(group, name, "volume", image.shape, str(image.dtype), voxel, source.weight,
                       part)


def _data_box(image: Volume, source: VolumeSource, opened: dict[KeyPath, Volume],
              patch: tuple[int, int, int] | None, path: KeyPath,
              problems: list[tuple[KeyPath, str]]) -> Roi | None:
    """The box patches are drawn from (the roi, cut to where labels, mask and semantic
    volumes placed in a part of the image hold data), as the loader computes it; None, with
    a problem, when that leaves nothing or less than a patch."""
    given = source.roi.to_roi() if source.roi is not None else box_of(image.shape[-3:])
    box = data_box(list(opened.values()), given)
    placed = [(key, v) for key, v in opened.items() if isinstance(v, Placed)]
    if not placed:
        return box
    key, volume = placed[0]
    where = "roi" if source.roi is not None else "image"
    if box.empty:
        problems.append((key, f"{volume} covers {_span(volume.extent)} of the image {image}, "
                         f"outside the {where} {_span(given)}: nothing to train on"))
        return None
    if patch is not None and any(b < p for b, p in zip(box.shape, patch, strict=True)):
        problems.append((key, f"{volume} covers {_span(volume.extent)} of the image {image}; "
                         f"with the {where} that leaves {list(box.shape)} voxels, smaller than "
                         f"train.patch {list(patch)}"))
        return None
    return box


def _span(box: Roi) -> str:
    """A box as voxel ranges, z y x: '[10-109, 0-1249, 0-1249]'."""
    return "[" + ", ".join(f"{b}-{e - 1}" for b, e in zip(box.begin, box.end, strict=True)) + "]"


def _check_values(image: Volume, source: VolumeSource, mask: Volume | None, box: Roi,
                  patch: tuple[int, int, int] | None, path: KeyPath,
                  problems: list[tuple[KeyPath, str]]) -> None:
    """The image's values in the sampled ``box`` (a few sections, see `_section_problem`); a
    mask must select something inside it, and for a training source a voxel a patch can be
    centred on (reads the mask once)."""
    (oz, oy, ox), (sz, sy, sx) = box.offset, box.shape
    masked = mask is not None and tuple(mask.shape) == tuple(image.shape)
    if image.dtype.kind == "f":
        for z in np.unique(np.linspace(oz, oz + sz - 1, 4).round()):
            where = Roi((int(z), oy, ox), (1, sy, sx))
            section = image.read(where)
            valid = functools.partial(_valid, mask, where) if masked else None
            found = _section_problem(image, source, section, valid, int(z))
            if found:
                problems.append(((*path, "image"), found))
                break
    if masked:
        _check_mask(mask, box, source.roi is not None, patch, path, problems)  # type: ignore[arg-type]


def _check_mask(mask: Volume, box: Roi, in_roi: bool, patch: tuple[int, int, int] | None,
                path: KeyPath, problems: list[tuple[KeyPath, str]]) -> None:
    """The sampler centres patches on masked voxels and keeps those that fit in the box:
    a mask whose voxels all lie within half a patch of the box's edges gives no patch, and
    training would stop at its first batch. ``patch``: the largest crop the augmentations
    read for train.patch (a draw that reads it needs room for it)."""
    from .sampler import MaskIndex

    where = "inside its roi" if in_roi else "anywhere"
    centres, fits = box, ""
    if patch is not None and all(b >= p for b, p in zip(box.shape, patch, strict=True)):
        half = Coordinate(p // 2 for p in patch)
        centres = Roi(box.offset + half, box.shape - Coordinate(patch) + 1)
        fits = (f" that a crop of {list(patch)} (train.patch as the augmentations read it) "
                f"centred on it leaves inside the {'roi' if in_roi else 'volume'}")
    if len(MaskIndex(mask, centres).blocks) == 0:
        problems.append(((*path, "mask"), f"{mask} selects no voxel {where}{fits}: nothing "
                         "could be sampled"))


def _valid(mask: Volume, where: Roi) -> np.ndarray:
    return inside(mask.read(where))


def _section_problem(image: Volume, source: VolumeSource, section: np.ndarray,
                     valid: Callable[[], np.ndarray] | None, z: int) -> str | None:
    """What is wrong with one section's values, or None: NaN or infinite values where
    trained on (training would skip every step it meets); without an intensity range, float
    values outside [0, 1]."""
    if image.dtype.kind == "f":
        bad = ~np.isfinite(section)
        if bad.any() and valid is not None:
            bad &= valid()  # masked out: never trained on (the mask is read only then)
        if bad.any():
            return (f"{image} holds NaN or infinite values (section {z}); fix them, or mask "
                    "them out with the source's mask")
        section = np.where(np.isfinite(section), section, 0)
    if source.intensity is not None or section.size == 0:
        return None
    lo, hi = float(section.min()), float(section.max())
    if image.dtype.kind == "f" and outside_unit(lo, hi):
        return (f"{image} is a float image with values in [{lo:g}, {hi:g}] (section {z}), "
                "outside [0, 1]; give `intensity: {low, high}` for this source")
    return None


def _open(ref: str, key: KeyPath, problems: list[tuple[KeyPath, str]],
          voxel_size: Sequence[float] | None) -> Volume | None:
    """The volume, or None with its problem noted; the recipe's ``voxel_size`` stands in for
    metadata that cannot be read, as it does where training opens it (`data.sources`)."""
    try:
        return open_in_source(ref, voxel_size)
    except VolumeError as exc:
        problems.append((key, str(exc)))
        return None


def _check_image(image: Volume, source: VolumeSource, key: KeyPath,
                 problems: list[tuple[KeyPath, str]]) -> None:
    if len(image.shape) != 3:
        problems.append(
            (key, f"{image} has shape {list(image.shape)}; an image must be 3D (z, y, x)")
        )
    if image.segmentation:
        problems.append((key, f"{image} is a segmentation (its OME-Zarr metadata marks it "
                         "image-label); `image` takes the EM image: give this volume as "
                         "`labels`"))
        return
    kind = image.dtype.kind
    if kind not in "uif":
        problems.append((key, f"{image} has dtype {image.dtype}; an image must be numeric"))
    elif kind == "f" and source.intensity is None:
        pass  # float images must already be in [0, 1]; the loader checks values as it reads
    elif kind in "ui" and image.dtype.itemsize > 2 and source.intensity is None:
        problems.append((key, f"{image} has dtype {image.dtype}; give `intensity: {{low, high}}` "
                         "to map its values to [0, 1]"))


def _check_companion(volume: Volume, image: Volume, key: KeyPath,
                     problems: list[tuple[KeyPath, str]]) -> None:
    what = str(key[-1]) if key[-2] != "semantic" else f"semantic volume {key[-1]!r}"
    if what == "mask" and volume.dtype.kind not in "uibf":  # io.masks: non-zero, not NaN
        problems.append((key, f"{volume} has dtype {volume.dtype}; a mask must be boolean, "
                         "integer or float (non-zero and not NaN inside)"))
    elif what != "mask" and volume.dtype.kind not in "uib":
        problems.append((key, f"{volume} has dtype {volume.dtype}; {what} must hold integer ids "
                         "(or booleans)"))
    other_grid = bool(volume.voxel_size and image.voxel_size and not np.allclose(
        volume.voxel_size[-3:], image.voxel_size[-3:]))
    if other_grid:  # its offset and shape, in voxels of another size, say nothing more
        problems.append((key, f"{volume} voxel size {list(volume.voxel_size)} nm disagrees with "
                         f"the image's {list(image.voxel_size)} nm"))
        return
    if len(volume.shape) != 3 and len(image.shape) == 3:  # not placing: an extra axis
        problems.append((key, f"{volume} has shape {list(volume.shape)}: {what} must be 3D "
                         "(z, y, x), as the image is"))
    elif tuple(volume.shape) != tuple(image.shape):
        problems.append((key, f"{volume} has shape {list(volume.shape)} but the image "
                         f"{image} has {list(image.shape)}{_unplaced(volume, image)}"))
    _check_placed_alike(volume, image, key, what, problems)


def _unplaced(volume: Volume, image: Volume) -> str:
    """Why a volume of another shape was not read at its place in the image (`placed_in`)."""
    if volume.offset is None or image.offset is None or volume.voxel_size is None or \
            image.voxel_size is None:
        return ("; a volume of a part of the image needs metadata placing it (offset and "
                "voxel size, as OME-Zarr and emrun's zarr stores have)")
    if len(volume.shape) != len(image.shape):
        return ""
    return (f"; placed at offset {[int(v) for v in volume.offset[-3:]]} against the image's "
            f"{[int(v) for v in image.offset[-3:]]}, it lies partly outside it (it must lie "
            "inside the image, or cover all of it)")


def _check_placed_alike(volume: Volume, image: Volume, key: KeyPath, what: str,
                        problems: list[tuple[KeyPath, str]]) -> None:
    """Companions are read voxel by voxel at the image's coordinates: one whose metadata
    places it at another offset (labels of a cropped box, an unpadded image) would train
    the network on labels shifted against the image. A volume without placement (TIFF,
    .npy) is taken to lie where the image does."""
    if (offsets := other_offset(volume, image)) is not None:
        problems.append((key, f"{volume} lies at offset {offsets[0]} voxels but the image "
                         f"{image} at {offsets[1]}: the {what} would be shifted against the "
                         "image; crop both to the same box"))


def _check_roi(image: Volume, source: VolumeSource, patch: tuple[int, int, int] | None,
               path: KeyPath,
               problems: list[tuple[KeyPath, str]]) -> None:
    shape = tuple(image.shape[-3:])
    if len(shape) != 3:
        return
    if source.roi is not None:
        end = [o + s for o, s in zip(source.roi.offset, source.roi.shape, strict=True)]
        if any(e > s for e, s in zip(end, shape, strict=True)):
            problems.append(((*path, "roi"), f"roi {list(source.roi.offset)} + "
                             f"{list(source.roi.shape)} ends at {end}, outside {image} "
                             f"of shape {list(shape)}"))
        return
    if patch is not None and any(s < p for s, p in zip(shape, patch, strict=True)):
        problems.append(((*path, "image"), f"{image} of shape {list(shape)} is smaller than "
                         f"train.patch {list(patch)}"))
