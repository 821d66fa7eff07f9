"""Warnings about an input the network may not suit: predicted anyway, but said before.

Four mistakes give plausible-looking but poor predictions and nothing else would say so: an
input at another resolution than the training data, TTA's y/x transposes of an input whose
y and x voxel sizes differ, 8-bit values stored in a wider integer
type (a uint16 volume whose values stop at 255), which the dtype's scale makes nearly
black, and any integer input whose values span a sliver of its dtype's range (ordinary
values in an int64 volume), which reaches the network flat.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io import Volume, VolumeError, open_volume
from ..io.intensity import default_intensity
from ..io.one_channel import single_channel
from ..io.package import PackageError, is_package, read_package
from ..io.sample import sample_boxes
from ..recipe import Recipe
from ..recipe.data import VolumeSource


def input_cautions(recipe: Recipe, checkpoint: Path, input_path: str,
                   tta: int | None = None) -> list[str]:
    """The lines to warn with before predicting ``input_path`` (none when it suits);
    ``tta``: the run's variant count (default: the recipe's)."""
    volume = single_channel(open_volume(input_path))
    found = [resolution_caution(recipe, volume),
             scale_caution(recipe, checkpoint, volume) or flat_caution(recipe, volume),
             transpose_caution(volume, tta if tta is not None else recipe.infer.tta)]
    return [line for line in found if line is not None]


def transpose_caution(volume: Volume, tta: int) -> str | None:
    """A line when TTA's y/x transposes (tta 8 and 16) meet an input whose y and x voxel
    sizes differ: those variants show the network the data at another resolution
    (training's flip_rotate never transposes such a source)."""
    size = volume.voxel_size
    if tta < 8 or size is None or len(size) < 2 or size[-1] == size[-2]:
        return None
    return (f"{volume} has voxels of {size[-2]:g} nm in y and {size[-1]:g} nm in x; tta "
            f"{tta} transposes y and x, showing the network half its variants at another "
            "resolution: use --tta 4 (flips only)")


def resolution_caution(recipe: Recipe, volume: Volume) -> str | None:
    """A line when the input's voxel size is not the one the network was trained at (as
    the recipe's sources declare it)."""
    trained = {tuple(s.voxel_size) for s in recipe.data.sources.values()
               if getattr(s, "voxel_size", None) is not None}
    if len(trained) != 1 or volume.voxel_size is None or len(volume.voxel_size) != 3:
        return None
    (at,) = trained
    if all(0.8 <= v / t <= 1.25 for v, t in zip(volume.voxel_size, at, strict=True)):
        return None
    shown = "x".join(f"{v:g}" for v in volume.voxel_size)
    return (f"{volume} has voxels of {shown} nm; the network was trained at "
            f"{'x'.join(f'{t:g}' for t in at)} nm: predictions at another resolution are "
            "usually poor (--level picks a level of a multiscale input)")


def scale_caution(recipe: Recipe, checkpoint: Path, volume: Volume) -> str | None:
    """A line when an integer input is scaled by a wider range than the training images
    were and its values (nine sampled boxes) stay within the training range: 8-bit data
    in a uint16 volume, read as intensities of at most 255/65535."""
    if volume.dtype.kind not in "ui" or recipe.given_intensity() is not None:
        return None
    trained = training_scale(recipe, checkpoint)
    low, high = default_intensity(volume.dtype)
    if trained is None or high - low <= trained[1] - trained[0]:
        return None
    if (sampled := sampled_range(volume)) is None:
        return None
    smallest, largest = sampled
    if smallest < trained[0] or largest > trained[1] or smallest == largest:
        return None
    shown = f"[{trained[0]:g}, {trained[1]:g}]"
    return (f"{volume} is {volume.dtype} and is scaled by its dtype's range [{low:g}, "
            f"{high:g}], but its sampled values lie in [{smallest}, {largest}] and the network "
            f"was trained on images scaled by {shown}: its input will look nearly flat. "
            f"{_remedy(recipe, trained)}")


FLAT = 1 / 256
"""An integer input whose sampled values span less of its dtype's range than this (one grey
level of 8 bits) reaches the network flat."""


def flat_caution(recipe: Recipe, volume: Volume) -> str | None:
    """A line when an integer input's sampled values span under one 256th of the dtype's
    range it is scaled by: an int32 or int64 volume of ordinary EM values is read as a
    uniform grey (every value near 0.5 for a signed type), which `scale_caution` does not
    see when the values do not fit the training range."""
    if volume.dtype.kind not in "ui" or volume.dtype.itemsize < 2 or \
            recipe.given_intensity() is not None:
        return None
    if (sampled := sampled_range(volume)) is None:
        return None
    smallest, largest = sampled
    low, high = default_intensity(volume.dtype)
    if smallest == largest or (largest - smallest) >= FLAT * (high - low):
        return None
    names = [n for n, s in recipe.data.sources.items() if isinstance(s, VolumeSource)]
    remedy = (f"give the scale the training images had, e.g. -o 'data.sources.{names[0]}."
              f"intensity={{low: {smallest}, high: {largest}}}' (the sampled values)"
              if names else "store it as uint8 (emrun data convert) if its values are 8-bit")
    return (f"{volume} is {volume.dtype} and is scaled by its dtype's range [{low:g}, "
            f"{high:g}], but its sampled values lie in [{smallest}, {largest}], under one "
            f"256th of it: its input will look flat; {remedy}")


def sampled_range(volume: Volume) -> tuple[int, int] | None:
    """The smallest and largest value of an integer volume's nine sampled boxes (None when
    they hold nothing)."""
    boxes = [box for box in sample_boxes(volume) if box.size]
    if not boxes:
        return None
    return min(int(box.min()) for box in boxes), max(int(box.max()) for box in boxes)


def _remedy(recipe: Recipe, trained: tuple[float, float]) -> str:
    """How to predict the input at the training scale."""
    names = [n for n, s in recipe.data.sources.items() if isinstance(s, VolumeSource)]
    if names:
        return (f"Give the scale: -o 'data.sources.{names[0]}.intensity={{low: "
                f"{trained[0]:g}, high: {trained[1]:g}}}'")
    return "Store it in the training images' dtype (its values fit)"


def training_scale(recipe: Recipe, checkpoint: Path) -> tuple[float, float] | None:
    """The raw values the training images' scale mapped to 0 and 1: the first training
    image's dtype range (synthetic sources are uint8), else what a package states; None
    when neither can say."""
    first = next(iter(recipe.data.sources.values()), None)
    if first is not None and not isinstance(first, VolumeSource):
        return default_intensity(np.dtype(np.uint8))
    if isinstance(first, VolumeSource):
        try:
            return default_intensity(open_volume(first.image).dtype)
        except VolumeError:
            pass
    if is_package(checkpoint):
        try:
            stated = read_package(checkpoint).manifest.get("input", {}).get("intensity")
        except PackageError:
            return None
        if isinstance(stated, dict) and not str(stated.get("from", "")).startswith("assumed"):
            low, high = stated.get("low"), stated.get("high")
            if isinstance(low, int | float) and isinstance(high, int | float):
                return float(low), float(high)
    return None
