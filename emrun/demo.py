"""`emrun demo`: the main job on the embedded default, on a CPU in minutes.

Trains `recipes/demo.yaml` (synthetic EM volumes generated from seeds) and draws what it
learnt on a held-out synthetic test volume next to the untrained network. Blockwise
inference, segmentation and evaluation join the demo when those commands land.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import atomic_output
from .errors import UserError
from .recipe import load_recipe
from .registry import models
from .shipped import RECIPES
from .synth import synthesize
from .train.trainer import Trainer

TEST_SEED = 99


def _predict_boundaries(model: torch.nn.Module, image: np.ndarray, task: str) -> np.ndarray:
    """Mean predicted nearest-neighbour affinity of the middle section (1 = same cell)."""
    model.eval()
    with torch.no_grad():
        out = model(torch.from_numpy(image)[None, None])[task]
    return torch.sigmoid(out[0, :3]).mean(0)[image.shape[0] // 2].numpy()


def _figure(path: Path, image: np.ndarray, labels: np.ndarray, trained: np.ndarray,
            untrained: np.ndarray, events: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(17, 3.6))
    mid = image.shape[0] // 2
    axes[0].imshow(image[mid], cmap="gray", vmin=0, vmax=1)
    axes[0].set_title("test input (middle section)")
    edges = np.zeros(labels.shape[1:], bool)
    lab = labels[mid]
    edges[1:] |= lab[1:] != lab[:-1]
    edges[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    axes[1].imshow(edges | (lab == 0), cmap="gray_r")
    axes[1].set_title("true boundaries")
    axes[2].imshow(untrained, cmap="gray", vmin=0, vmax=1)
    axes[2].set_title("untrained: affinities")
    axes[3].imshow(trained, cmap="gray", vmin=0, vmax=1)
    axes[3].set_title("trained: affinities")
    steps = [(e["iteration"], e["loss/total"]) for e in events if "loss/total" in e]
    vals = [(e["iteration"], e["validation"]["loss/total"]) for e in events if "validation" in e]
    if steps:
        axes[4].plot(*zip(*steps, strict=True), label="training")
    if vals:
        axes[4].plot(*zip(*vals, strict=True), "o-", label="validation")
    axes[4].set_xlabel("iteration")
    axes[4].set_title("loss")
    axes[4].legend()
    for ax in axes[:4]:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def run_demo(out: Path, console: Any = None, overrides: list[str] | None = None) -> Path:
    """Train the demo recipe into ``out/run`` and draw ``out/demo.png``; returns the figure."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; choose another --out "
                        "(nothing was overwritten)")
    loaded = load_recipe(RECIPES / "demo.yaml", overrides or [])
    recipe = loaded.recipe
    trainer = Trainer(loaded, out / "run", console=console)
    untrained = models.build(recipe.model, head_channels=recipe.head_channels())
    untrained.load_state_dict(trainer.model.state_dict())
    trainer.fit()

    patch = recipe.infer_patch()
    test = synthesize((patch[0], 2 * patch[1], 2 * patch[2]), TEST_SEED)
    image = test.image.astype(np.float32) / 255
    task = next(n for n, t in recipe.tasks.items() if t.target.type == "affinity")
    trained_model = trainer.model.cpu()
    events = [json.loads(line) for line in
              (out / "run" / "events.jsonl").read_text(encoding="utf-8").splitlines() if line]
    figure = out / "demo.png"
    _figure(figure, image, test.labels,
            _predict_boundaries(trained_model, image, task),
            _predict_boundaries(untrained, image, task), events)
    return figure
