"""`emrun demo`: the main job on the embedded default, on a CPU in minutes.

Trains `recipes/demo.yaml` (synthetic EM volumes generated from seeds), then runs the whole
pipeline on a held-out synthetic test volume for the trained and the untrained network:
blockwise inference (`emrun infer`'s engine), segmentation (the recipe's segmenter, as
`emrun segment` does it) and evaluation against the test volume's labels (as
`emrun evaluate`). Writes `metrics.json` (adapted Rand error and VOI, trained vs untrained)
and `demo.png`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from . import locks
from .atomic import atomic_output, write_text
from .capacity import pseudo_file_system
from .errors import Interrupted, UserError
from .evaluate import score_volumes
from .geometry import Roi
from .infer.run import run_inference
from .infer.schedule import Stopped
from .io import open_volume
from .io.checkpoint import save_atomic
from .io.write import write_volume
from .models import build_model
from .paths import file_in_the_way
from .recipe import LoadedRecipe, Recipe, load_recipe
from .segment.job import run_segment
from .segment.request import SegmentRequest
from .shipped import RECIPES
from .stages import Stages
from .synth import synthesize
from .train.seg_validation import affinity_task
from .train.trainer import Trainer

TEST_SEED = 99


def _segment_and_score(recipe: Recipe, checkpoint: Path, test: Path, out: Path,
                       tag: str, stage: Stages) -> dict[str, float]:
    """Infer, segment and evaluate the test volume with one checkpoint; the scores."""
    pred, seg = out / f"pred_{tag}.zarr", out / f"seg_{tag}.zarr"
    stage(f"predicting the test volume with the {tag} network")
    try:
        progress = run_inference(recipe, checkpoint, f"{test}/image", pred, device="cpu")
    except Stopped as stop:  # not infer's --resume: the demo starts afresh
        raise Interrupted(stop.signal_name, f"stopped while predicting with the {tag} "
                          "network; the demo does not resume: run it again into an empty "
                          "--out") from None
    if (nonfinite := progress.nonfinite_warning()) is not None:
        stage(f"warning: {nonfinite}")
    stage(f"segmenting its affinities ({recipe.segment.type}) and scoring them")
    first = recipe.segment.model_copy(  # one segmentation (a list of thresholds: the first)
        update=recipe.segment.value_update(recipe.segment.value()))
    run_segment(SegmentRequest(f"{pred}/{affinity_task(recipe)}", seg, spec=first))
    scores = score_volumes(open_volume(f"{seg}/segmentation"), open_volume(f"{test}/labels"))
    return {k: round(v, 4) for k, v in scores.as_dict().items()
            if k in ("arand", "voi_split", "voi_merge", "cremi_score")}


def _figure(path: Path, test: Path, out: Path, metrics: dict[str, dict[str, float]],
            events: list[dict[str, Any]], task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = open_volume(f"{test}/image").read()
    labels = open_volume(f"{test}/labels").read()
    mid = image.shape[0] // 2
    section = Roi((mid, 0, 0), (1, *image.shape[1:]))  # the middle section, channels whole
    fig, axes = plt.subplots(1, 6, figsize=(20, 3.6))
    axes[0].imshow(image[mid], cmap="gray", vmin=0, vmax=255)
    axes[0].set_title("test input (middle section)")
    lab = labels[mid]
    edges = np.zeros(lab.shape, bool)
    edges[1:] |= lab[1:] != lab[:-1]
    edges[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    axes[1].imshow(edges | (lab == 0), cmap="gray_r")
    axes[1].set_title("true boundaries")
    for ax, tag in zip(axes[2:4], ("untrained", "trained"), strict=True):
        affs = open_volume(f"{out}/pred_{tag}.zarr/{task}").read(section)[:3]
        ax.imshow(affs[:, 0].mean(0), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"{tag}: affinities")
    seg = open_volume(f"{out}/seg_trained.zarr/segmentation").read(section)[0]
    colours = np.random.default_rng(0).random((int(seg.max()) + 1, 3))
    axes[4].imshow(image[mid], cmap="gray", vmin=0, vmax=255)
    axes[4].imshow(colours[seg % len(colours)], alpha=0.45)
    axes[4].set_title(f"trained: segments (ARAND {metrics['trained']['arand']:.3f}; "
                      f"untrained {metrics['untrained']['arand']:.3f})", fontsize=9)
    steps = [(e["iteration"], e["loss/total"]) for e in events if "loss/total" in e]
    vals = [(e["iteration"], e["validation"]["loss/total"]) for e in events if "validation" in e]
    if steps:
        axes[5].plot(*zip(*steps, strict=True), label="training")
    if vals:
        axes[5].plot(*zip(*vals, strict=True), "o-", label="validation")
    axes[5].set_xlabel("iteration")
    axes[5].set_title("loss")
    axes[5].legend()
    for ax in axes[:5]:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def run_demo(out: Path, console: Any = None, overrides: list[str] | None = None
             ) -> dict[str, dict[str, float]]:
    """Train the demo recipe into ``out/run``, run the pipeline on a test volume with the
    trained and the untrained network, write ``out/metrics.json`` and ``out/demo.png``;
    returns the metrics. ``out`` is held against other emrun processes meanwhile
    (`emrun.locks`): a second demo into it was refused by its training, as if it had a
    --run-dir to change."""
    if (kind := pseudo_file_system(out)) is not None:  # not "No such file or directory"
        raise UserError(f"--out {out}: cannot be written: {kind}, not a disk; give a folder "
                        "on a disk")
    if (above := file_in_the_way(out)) is not None:
        raise UserError(f"--out {out}: {above} is a file, not a folder; give another --out")
    _check_empty(out)
    loaded = load_recipe(RECIPES / "demo.yaml", overrides or [])
    with locks.holding_out(out):
        _check_empty(out)  # again, held: one that ended just now may have filled it
        return _demo(out, loaded, console)


def _check_empty(out: Path) -> None:
    """Refuse an ``out`` that holds anything (a file there is not called a folder)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file, not a folder; give a new or empty folder "
                        "(nothing was overwritten)")
    if out.exists() and locks.contents(out):
        raise UserError(f"{out} already exists and is not empty; choose another --out "
                        "(nothing was overwritten)")


def _demo(out: Path, loaded: LoadedRecipe, console: Any) -> dict[str, dict[str, float]]:
    """`run_demo`'s work, once ``out`` is checked and held."""
    recipe = loaded.recipe
    stage = Stages(console)
    stage(f"training {recipe.name} on synthetic EM: {recipe.train.iterations} iterations on "
          f"the CPU, a line every {recipe.train.log_every}")
    trainer = Trainer(loaded, out / "run", console=console,
                      stop_hint="the demo stops here (it does not resume)")
    untrained = build_model(recipe)
    untrained.load_state_dict(trainer.model.state_dict())
    if (stopped := trainer.fit().interrupted) is not None:
        raise Interrupted(stopped, f"training checkpointed at iteration {trainer.iteration} "
                          f"in {out / 'run'}; the demo does not go on with a partly trained "
                          "network, and starts afresh: run it again into an empty --out")
    untrained_checkpoint = out / "run" / "untrained.pt"
    save_atomic(untrained_checkpoint, {"model": untrained.state_dict(), "iteration": 0})

    patch = recipe.infer_patch()
    test = synthesize((2 * patch[0], 2 * patch[1], 2 * patch[2]), TEST_SEED)
    test_path = out / "test.zarr"
    write_volume(test_path, "image", test.image, voxel_size=(30.0, 6.0, 6.0))
    write_volume(test_path, "labels", test.labels, voxel_size=(30.0, 6.0, 6.0), label=True)
    metrics = {
        "trained": _segment_and_score(recipe, out / "run" / "checkpoints" / "last.pt",
                                      test_path, out, "trained", stage),
        "untrained": _segment_and_score(recipe, untrained_checkpoint, test_path, out,
                                        "untrained", stage),
    }
    write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    events = [json.loads(line) for line in
              (out / "run" / "events.jsonl").read_text(encoding="utf-8").splitlines() if line]
    _figure(out / "demo.png", test_path, out, metrics, events, affinity_task(recipe) or "")
    return metrics
