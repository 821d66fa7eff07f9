"""`emrun data preview`: a PNG grid of augmented training samples, so a person can see what
the network sees (image sections with label boundaries, and every task's target)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_output
from .capacity import pseudo_file_system
from .data.samples import SampleMaker, batch_rng
from .errors import UserError
from .paths import make_folder
from .recipe import Recipe


def _boundaries(labels: np.ndarray) -> np.ndarray:
    """Where a 2D label section changes from one pixel to the next (or is 0)."""
    edge = labels == 0
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    return edge


def _target_view(target: np.ndarray, mask: np.ndarray, z: int) -> np.ndarray:
    """One 2D picture of a task's target at section z: the mean over its channels, with
    excluded voxels (mask 0 in every channel) set to NaN (drawn grey). A mask of one channel
    stands for every channel (an lsd target's ten share one: the panel showed their sum)."""
    mask = np.broadcast_to(mask, target.shape)
    counted = mask[:, z].sum(axis=0)
    view = np.where(counted > 0, (target[:, z] * mask[:, z]).sum(axis=0) / np.maximum(counted, 1),
                    np.nan)
    return view.astype(np.float32)


SOFTWARE = "emrun data preview"
"""Written into each preview PNG, so that a later preview replaces it and nothing else."""


def refuse_foreign_file(out: Path) -> None:
    """An existing ``out`` is replaced only if it is an earlier preview (a user's own PNG or
    file of that name is kept)."""
    if not out.exists():
        return
    if not out.is_file():  # a pipe would block the read below until something writes to it
        raise UserError(f"{out}: exists and is not a regular file (a device, pipe or socket); "
                        "give a .png file path")
    try:
        with open(out, "rb") as handle:
            head = handle.read(4096)
    except OSError:
        head = b""
    if not (head.startswith(b"\x89PNG") and b"Software\x00" + SOFTWARE.encode() in head):
        raise UserError(f"{out}: exists and is not an emrun preview; not overwriting it (give "
                        "another --out, or remove it)")


@dataclass(frozen=True)
class Shown:
    """One previewed sample: where it sits in the training stream, and what it holds."""

    batch: int
    position: int
    """Its place in its batch (0 .. batch_size - 1)."""
    sample: dict[str, Any]
    labels: np.ndarray | None
    """Its augmented labels (for the boundaries drawn over the image), when it has some."""


def training_samples(recipe: Recipe, samples: int) -> Iterator[Shown]:
    """The first ``samples`` samples rank 0 trains on, in order: every sample of batch 0,
    then of batch 1, ... (`SampleMaker.batch` draws a batch's samples one after the other
    from that batch's stream; showing one sample per batch showed only each batch's first)."""
    maker = SampleMaker(recipe)
    left = samples
    for index in count():
        rng = batch_rng(recipe.seed, 0, index)
        for position in range(recipe.train.batch_size):
            if left <= 0:
                return
            sample = maker.sample(rng)
            yield Shown(index, position, sample, maker.last_labels)
            left -= 1


def _row_name(shown: Shown, batch_size: int) -> str:
    """The label on a row's left: which batch, and which sample of it (both from 0)."""
    if batch_size == 1:
        return f"batch {shown.batch}"
    return f"batch {shown.batch}\nsample {shown.position}"


def _title(recipe: Recipe, samples: int) -> str:
    """What the grid shows: with several samples a batch, how many batches and whether the
    last is cut short (``--n`` counts samples)."""
    size = recipe.train.batch_size
    what = ("the first augmented sample training sees" if samples == 1 else
            f"the first {samples} augmented samples training sees")
    if size > 1:
        batches, cut = divmod(samples, size)
        whole = f"{batches} whole batch{'es' if batches != 1 else ''}" if batches else ""
        part = f"{cut} of the {size} samples of batch {batches}" if cut else ""
        what += f" (batch_size {size}: {' and '.join(p for p in (whole, part) if p)})"
    patch = " x ".join(str(v) for v in recipe.train.patch)
    return f"{recipe.name}: {what}\npatch {patch} (grey: excluded from the loss)"


def write_preview(recipe: Recipe, out: Path, samples: int = 8) -> Path:
    """Draw the first ``samples`` augmented samples of the training stream into a PNG, one
    row each, every sample of a batch (``train.batch_size`` > 1) labelled with its place."""
    if (kind := pseudo_file_system(out)) is not None:  # before the samples are drawn
        raise UserError(f"--out {out}: cannot be written: {kind}, not a disk; give a .png "
                        "file path on a disk")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(recipe.tasks)
    columns = ["image z=0", "image mid-z + labels", "image z=last", *tasks]
    # constrained: tight_layout left the title over the column headers
    fig, axes = plt.subplots(samples, len(columns), figsize=(2.2 * len(columns), 2.2 * samples),
                             squeeze=False, layout="constrained")
    for row, shown in enumerate(training_samples(recipe, samples)):
        sample = shown.sample
        image = sample["image"][0]
        mid = image.shape[0] // 2
        panels: list[tuple[np.ndarray, np.ndarray | None]] = [
            (image[0], None), (image[mid], None), (image[-1], None)]
        for ax, (picture, _) in zip(axes[row, :3], panels, strict=True):
            ax.imshow(picture, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        labels = shown.labels
        if labels is not None:
            edges = np.ma.masked_where(~_boundaries(labels[mid]), np.ones(labels.shape[1:]))
            axes[row, 1].imshow(edges, cmap="autumn", alpha=0.6, interpolation="nearest")
        for col, name in enumerate(tasks, start=3):
            view = _target_view(sample["target"][name], sample["mask"][name], mid)
            cmap = plt.get_cmap("viridis").with_extremes(bad="0.5")
            low, high = recipe.tasks[name].target.value_range()  # signed distance: -1..1
            axes[row, col].imshow(np.ma.masked_invalid(view), cmap=cmap, vmin=low, vmax=high,
                                  interpolation="nearest")
        for col, ax in enumerate(axes[row]):
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(columns[col], fontsize=8)
        axes[row, 0].set_ylabel(_row_name(shown, recipe.train.batch_size), fontsize=8)
    fig.suptitle(_title(recipe, samples), fontsize=9)
    refuse_foreign_file(out)
    folder = make_folder(out.parent)  # not `new` of `new/../x.png`
    with atomic_output(folder / out.name) as tmp:
        fig.savefig(tmp, format="png", dpi=80, metadata={"Software": SOFTWARE})
    plt.close(fig)
    return out
