"""`emrun data preview`: a PNG grid of augmented training samples, so a person can see what
the network sees (image sections with label boundaries, and every task's target)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .atomic import atomic_output
from .data.samples import SampleMaker, batch_rng
from .errors import UserError
from .recipe import Recipe


def _boundaries(labels: np.ndarray) -> np.ndarray:
    """Where a 2D label section changes from one pixel to the next (or is 0)."""
    edge = labels == 0
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    return edge


def _target_view(target: np.ndarray, mask: np.ndarray, z: int) -> np.ndarray:
    """One 2D picture of a task's target at section z: the mean over its channels, with
    excluded voxels (mask 0 in every channel) set to NaN (drawn grey)."""
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


def write_preview(recipe: Recipe, out: Path, samples: int = 8) -> Path:
    """Draw ``samples`` augmented samples (the training stream's first ones) into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maker = SampleMaker(recipe)
    tasks = list(recipe.tasks)
    columns = ["image z=0", "image mid-z + labels", "image z=last", *tasks]
    # constrained: tight_layout left the title over the column headers
    fig, axes = plt.subplots(samples, len(columns), figsize=(2.2 * len(columns), 2.2 * samples),
                             squeeze=False, layout="constrained")
    for row in range(samples):
        sample = maker.sample(batch_rng(recipe.seed, 0, row))
        image = sample["image"][0]
        mid = image.shape[0] // 2
        panels: list[tuple[np.ndarray, np.ndarray | None]] = [
            (image[0], None), (image[mid], None), (image[-1], None)]
        for ax, (picture, _) in zip(axes[row, :3], panels, strict=True):
            ax.imshow(picture, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        labels = maker.last_labels
        if labels is not None:
            edges = np.ma.masked_where(~_boundaries(labels[mid]), np.ones(labels.shape[1:]))
            axes[row, 1].imshow(edges, cmap="autumn", alpha=0.6, interpolation="nearest")
        for col, name in enumerate(tasks, start=3):
            view = _target_view(sample["target"][name], sample["mask"][name], mid)
            cmap = plt.get_cmap("viridis").with_extremes(bad="0.5")
            axes[row, col].imshow(np.ma.masked_invalid(view), cmap=cmap, vmin=0, vmax=1,
                                  interpolation="nearest")
        for col, ax in enumerate(axes[row]):
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(columns[col], fontsize=8)
    fig.suptitle(f"{recipe.name}: {samples} augmented samples, patch "
                 f"{list(recipe.train.patch)} (grey: excluded from the loss)", fontsize=9)
    refuse_foreign_file(out)
    with atomic_output(out) as tmp:
        fig.savefig(tmp, format="png", dpi=80, metadata={"Software": SOFTWARE})
    plt.close(fig)
    return out
