"""`emrun data ...`: convert volumes, make synthetic EM, preview training samples."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from ..errors import UserError
from ..paths import suffix_only
from .app import LevelChoice, Levels, Nm, Overrides, RecipeFile, at_level, data_app, guarded


def _check_nm(voxel_size: tuple[float, float, float] | None) -> None:
    """--voxel-size as given: three positive, finite nm (a 0 would reach the writers or the
    generator as an internal error) that the stores can keep (4e-9, metres, was refused only
    after the whole volume was written, as "image.partial: scale [0.0, ...]")."""
    from ..io.convert import voxel_size_problem

    if voxel_size is None:
        return
    given = " ".join(f"{v:g}" for v in voxel_size)
    if not all(math.isfinite(v) and v > 0 for v in voxel_size):
        raise UserError(f"--voxel-size {given}: give three positive sizes in nm (z y x)")
    if (problem := voxel_size_problem(voxel_size)) is not None:
        raise UserError(f"--voxel-size {given}: {problem}")


def _check_store_name(out: Path) -> None:
    if (why := suffix_only(out)) is not None:
        raise UserError(f"{out}: {why}")


SYNTH_TAKEN = "give another output store, or --overwrite to replace them"
"""What `data synth` advises for a volume name already taken in its output store."""


@data_app.command("convert")
@guarded
def data_convert(
    source: Annotated[str, typer.Argument(
        metavar="SOURCE", help="TIFF file or folder, file.h5/dataset, vol.zarr/array, .npy; "
        "with emrun[remote] vol.n5/dataset, precomputed, URLs.")],
    out: Annotated[Path, typer.Argument(
        metavar="OUT", help="Output zarr folder (created if missing).")],
    voxel_size: Nm = None,
    chunks: Annotated[tuple[int, int, int] | None, typer.Option(
        metavar="Z Y X", help="Output chunk size in voxels (default: up to 16 x 256 x 256); "
        "a 4-d (c, z, y, x) source keeps all channels in each chunk.")
    ] = None,
    name: Annotated[str | None, typer.Option(
        metavar="NAME", help="Array name in OUT (default: image with --image; else labels for "
        "a segmentation or integers wider than 8 bits, mask for booleans, image otherwise).")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an existing array of that name.")
    ] = False,
    level: LevelChoice = None,
    labels: Annotated[bool | None, typer.Option(
        "--labels/--image", help="Write a segmentation (OME labels: mode-downsampled, under "
        "OUT/labels) or an image (default: labels for an OME label image or integers wider "
        "than 8 bits).")] = None,
    levels: Levels = None,
) -> None:
    """Convert a volume to zarr v3 with OME-Zarr 0.5 metadata and a multiscale pyramid,
    losslessly, streamed in slabs of whole chunks."""
    from ..io.convert import convert
    from ..io.metadata import STATE_WITH_OPTION, stated_voxel_size

    _check_nm(voxel_size)
    _check_store_name(out)
    if name is None and labels is False:  # the dtype's guess, "labels", is refused for images
        name = "image"
    with stated_voxel_size(voxel_size, how=STATE_WITH_OPTION):  # overrides, at every level
        result = convert(at_level(source, level), out, name=name, voxel_size=voxel_size,
                         chunks=chunks, overwrite=overwrite, label=labels, levels=levels)
    voxel = "unknown" if result.voxel_size is None else " x ".join(
        f"{v:g}" for v in result.voxel_size) + " nm"
    print(f"wrote {out}/{result.name}: shape {list(result.shape)}, {result.dtype}, voxel "
          f"{voxel}, chunks {list(result.chunks)}")


@data_app.command("preview")
@guarded
def data_preview(
    recipe: RecipeFile,
    override: Overrides = None,
    synthetic: Annotated[bool, typer.Option(
        "--synthetic", help="Replace the recipe's sources by synthetic volumes.")] = False,
    n: Annotated[int, typer.Option(
        "--n", min=1, max=64, metavar="N", help="Samples (rows).")] = 8,
    out: Annotated[Path, typer.Option(
        "--out", metavar="PNG", help="PNG file to write.")] = Path("preview.png"),
) -> None:
    """A PNG grid of augmented samples: sections with label boundaries and each target."""
    from ..data.synthetic import with_synthetic_sources
    from ..preview import write_preview
    from ..recipe import load_recipe

    loaded = load_recipe(recipe, override or [])
    chosen = with_synthetic_sources(loaded.recipe) if synthetic else loaded.recipe
    if out.is_dir():
        raise UserError(f"{out} is a directory; give a .png file path")
    if out.suffix.lower() != ".png":  # x.jpg held PNG bytes
        raise UserError(f"--out {out}: the preview is a PNG image; give a .png file path")
    print(f"wrote {write_preview(chosen, out, n)}")


@data_app.command("synth")
@guarded
def data_synth(
    out: Annotated[Path, typer.Argument(
        metavar="OUT", help="Output zarr folder (created if missing).")],
    shape: Annotated[tuple[int, int, int], typer.Option(
        metavar="Z Y X", help="Volume size in voxels.")] = (64, 256, 256),
    seed: Annotated[int, typer.Option(min=0, metavar="S", help="Generator seed.")] = 0,
    voxel_size: Nm = (30.0, 6.0, 6.0),
    defects: Annotated[bool, typer.Option(help="Add missing/dim sections and a shift.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace existing arrays.")] = False,
    levels: Levels = None,
) -> None:
    """Write a synthetic EM volume: arrays image, labels, mito and synapse (stand-in clefts),
    deterministic from SEED."""
    from ..capacity import size_text
    from ..devices import available_memory
    from ..io.pyramid import level_factors
    from ..io.write import check_new_volume, held_store, write_volumes
    from ..synth import MAX_ANISOTROPY, peak_memory, synthesize

    if shape is None or min(shape) < 1:
        raise UserError("--shape needs three positive sizes")
    _check_store_name(out)
    _check_nm(voxel_size)
    voxel_size = voxel_size or (30.0, 6.0, 6.0)
    if max(voxel_size) > MAX_ANISOTROPY * min(voxel_size):
        raise UserError(f"--voxel-size {' '.join(f'{v:g}' for v in voxel_size)}: give sizes "
                        f"at most {MAX_ANISOTROPY:g} times apart")
    level_factors(shape, voxel_size, levels)  # before generating
    need, free = peak_memory(shape, voxel_size), available_memory()
    if need > free:
        raise UserError(f"--shape {' '.join(map(str, shape))}: generating it takes about "
                        f"{size_text(need)} of memory (it is made whole, in memory), "
                        f"{size_text(free)} is available; give a smaller --shape")
    names = {"image": False, "labels": True, "mito": True, "synapse": True}  # name: label
    with held_store(out):  # another emrun writing it is refused before the generating
        if not overwrite:
            for name, label in names.items():  # so is a taken name
                check_new_volume(out, name, label, taken=SYNTH_TAKEN)
        volume = synthesize(shape, seed, voxel_size=voxel_size, defects=defects)
        write_volumes(out, {name: (getattr(volume, name), label)
                            for name, label in names.items()},
                      voxel_size=volume.voxel_size, attrs={"emrun": {"synthetic_seed": seed}},
                      levels=levels, overwrite=overwrite, taken=SYNTH_TAKEN)
    cells = int(volume.labels.max())
    print(f"wrote {out}/image, labels, mito, synapse: shape {list(shape)}, seed {seed}, "
          f"{cells} cell{'' if cells == 1 else 's'}")


