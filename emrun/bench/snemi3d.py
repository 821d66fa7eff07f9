"""`emrun bench snemi3d`: the whole pipeline on real EM data, with its budget on the record.

Converts the SNEMI3D training volume (70 sections; 0-59 train, 60-69 validate) to zarr,
trains `recipes/snemi3d_aff.yaml` for the given number of iterations, predicts the validation
sections with the inference engine (`--roi`: the training sections around them give context),
segments them for each value of the segmenter's parameter (`segment --sweep`), keeps the value
with the lowest adapted Rand error, and writes `results.json`, `results.md` and figures.

Scores follow the recipe's ``train.validate_connected_truth`` (SNEMI3D's: each truth object's
connected pieces inside sections 60-69, `emrun.evaluate.pieces`); the scores against the labels
as given are reported beside them, with the floor those labels set: their own connected pieces'
score (0.107 for sections 60-69), what a perfect segmentation of these sections alone gets.

The sweep is tuned and scored on the same validation sections, and these are not the
SNEMI3D test sections (70-99, held out): figures are comparable between emrun runs, not with
the challenge's leaderboard. An interrupted benchmark continues where it stopped when run
again with the same ``--out``: conversion is kept, training resumes, inference resumes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
import zarr

from .. import locks
from ..atomic import atomic_output, write_text
from ..errors import Interrupted, UserError
from ..evaluate import score
from ..evaluate.pieces import connected_pieces
from ..geometry import Roi
from ..infer.engine import file_digest
from ..infer.job import started_with
from ..infer.run import run_inference
from ..infer.schedule import Stopped
from ..io import open_volume
from ..io.convert import convert
from ..io.layout import volume_dir
from ..io.write import write_volume
from ..recipe import LoadedRecipe, load_recipe
from ..recipe.tasks import AffinityTarget
from ..registry import segmenters
from ..segment.affinities import to_float
from ..segment.sweep import sweep, value_line
from ..shipped import RECIPES
from ..stages import Stages
from ..train.seg_validation import affinity_task
from ..train.trainer import Trainer, device_name

FILES = {"image": "train-input.tif", "labels": "train-labels.tif"}
SECTIONS = 70
TRAIN_SECTIONS = 60
VOXEL_SIZE = (30.0, 6.0, 6.0)
AS_LABELLED = ("arand", "voi_split", "voi_merge", "cremi_score")


def find_data(data: Path | None) -> Path:
    """The folder with SNEMI3D's train-input.tif and train-labels.tif."""
    candidates = [data] if data is not None else [
        Path("../shared/data/snemi3d"), RECIPES.parent.parent / "shared" / "data" / "snemi3d"]
    for folder in candidates:
        if folder is not None and all((folder / f).is_file() for f in FILES.values()):
            return folder
    where = " or ".join(str(c) for c in candidates)
    raise UserError(f"SNEMI3D not found at {where}: give --data DIR with "
                    f"{' and '.join(FILES.values())} (the 70 public training sections)")


def converted(folder: Path, out: Path, stage: Stages) -> tuple[Path, tuple[int, ...]]:
    """SNEMI3D's training volumes as zarr in ``out`` (converted once); their shape."""
    out.mkdir(parents=True, exist_ok=True)
    volumes = out / "snemi3d.zarr"
    for name, file in FILES.items():
        if not (volumes / name).exists():
            stage(f"converting {folder / file} to {volumes}/{name}")
            convert(folder / file, volumes, name=name, voxel_size=VOXEL_SIZE, progress=False)
    shape = tuple(open_volume(f"{volumes}/image").shape)
    if len(shape) != 3 or shape[0] != SECTIONS:
        raise UserError(f"{folder / FILES['image']}: expected the {SECTIONS} SNEMI3D training "
                        f"sections (70 x 1024 x 1024), found shape {list(shape)}")
    return volumes, shape


DEFAULT_RECIPE = "snemi3d_aff"


def recipe_file(recipe: str | Path | None) -> Path:
    """The benchmark's recipe: a file, or a shipped recipe's name (default snemi3d_aff). It
    must name its training source ``snemi3d`` and its validation source ``snemi3d_val``:
    the benchmark points them at the converted volumes."""
    name = str(recipe or DEFAULT_RECIPE)
    path = Path(name)
    if not path.is_file():
        shipped = RECIPES / f"{name.removesuffix('.yaml')}.yaml"
        if not shipped.is_file():
            names = ", ".join(p.stem for p in sorted(RECIPES.glob("snemi3d*.yaml")))
            raise UserError(f"--recipe {name}: no such file or shipped recipe (SNEMI3D's: "
                            f"{names})")
        path = shipped
    try:
        data = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("data") or {}
        sources, validation = data.get("sources") or {}, data.get("validation") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        sources, validation = {}, {}  # let the recipe loader say what is wrong
    else:
        if "snemi3d" not in sources or "snemi3d_val" not in validation:
            raise UserError(f"{path}: the SNEMI3D benchmark needs data.sources.snemi3d and "
                            "data.validation.snemi3d_val (it points them at the converted "
                            "sections); rename the recipe's sources")
    return path


def budgeted_recipe(path: Path, settings: list[str], iterations: int | None,
                    overrides: list[str], last: Sequence[str] = ()) -> LoadedRecipe:
    """The recipe at ``path`` with ``settings``, ``iterations``, the user's ``overrides`` and
    ``last``, in that order; a short budget that would end inside the recipe's warm-up gets a
    warm-up of a tenth of it (unless the overrides set the schedule). The budget is the
    iterations the recipe ends with, however given (`--iterations` or `-o
    train.iterations=`): `--final`, which passes the scored run's, trained with another
    warm-up than a run budgeted by an override."""
    settings = list(settings)
    if iterations is not None:
        settings.append(f"train.iterations={iterations}")
    loaded = load_recipe(path, [*settings, *overrides, *last])
    budget = loaded.recipe.train.iterations
    warmup = getattr(loaded.recipe.train.schedule, "warmup", 0)
    if warmup > budget // 10 and not any(o.startswith("train.schedule") for o in overrides):
        settings.append(f"train.schedule.warmup={budget // 10}")
        loaded = load_recipe(path, [*settings, *overrides, *last])
    return loaded


def run_snemi3d(data: Path | None, out: Path, *, iterations: int | None = None,
                device: str | None = None, overrides: list[str] | None = None,
                console: Any = None, recipe: str | Path | None = None) -> dict[str, Any]:
    """Convert, train, infer, sweep-segment, evaluate; returns (and writes) the results.
    ``out`` is held meanwhile (`locks.holding_out`)."""
    path = recipe_file(recipe)
    folder = find_data(data)
    out = Path(os.path.abspath(out))  # the recipe names its volumes under it: `--out rel`
    with locks.holding_out(out):  # and `--out $PWD/rel` must be one benchmark to resume
        return _run(path, folder, out, iterations, device, overrides, console)


def _run(path: Path, folder: Path, out: Path, iterations: int | None, device: str | None,
         overrides: list[str] | None, console: Any) -> dict[str, Any]:
    """`run_snemi3d`'s work, once ``out`` is held."""
    if (out / "results.json").exists():
        raise UserError(f"{out} holds a finished benchmark (results.json); choose another "
                        "--out (nothing was overwritten)")
    stage = Stages(console)
    volumes, shape = converted(folder, out, stage)
    validation = Roi((TRAIN_SECTIONS, 0, 0), (SECTIONS - TRAIN_SECTIONS, shape[1], shape[2]))
    settings = [f"data.sources.snemi3d.image={volumes}/image",
                f"data.sources.snemi3d.labels={volumes}/labels",
                f"data.validation.snemi3d_val.image={volumes}/image",
                f"data.validation.snemi3d_val.labels={volumes}/labels",
                f"data.sources.snemi3d.roi.shape=[{TRAIN_SECTIONS}, {shape[1]}, {shape[2]}]",
                f"data.validation.snemi3d_val.roi.shape={list(validation.shape)}"]
    loaded = budgeted_recipe(path, settings, iterations, list(overrides or []))
    recipe = loaded.recipe
    task = affinity_task(recipe)
    if task is None:
        raise UserError("the recipe has no affinity task to segment")
    segmenters.build(recipe.segment)  # a segmenter missing its package fails before training
    run = out / "run"
    pred = out / "pred.zarr"  # checked before hours of training, not after
    if pred.exists() and not _ours(started_with(pred).get("checkpoint"),
                                   run / "checkpoints" / "last.pt"):
        raise UserError(f"{pred} is no prediction of this benchmark's run {run} (it is "
                        "replaced when the run trains further): move it, or give another "
                        "--out (nothing was removed)")
    seg_path = out / "seg.zarr"
    _check_segmentation_is_ours(seg_path)
    resume = (run / "checkpoints" / "last.pt").exists()
    stage(f"{'continuing' if resume else 'training'} {recipe.name} on sections 0-"
          f"{TRAIN_SECTIONS - 1} to {recipe.train.iterations} iterations in {run}")
    trainer = Trainer(loaded, run, resume=resume, device=device, console=console,
                      stop_hint="run the same bench snemi3d command again to continue")
    if (stopped := trainer.fit().interrupted) is not None:
        raise Interrupted(stopped, f"training checkpointed at iteration {trainer.iteration} "
                          f"in {run}; run the same command again to continue (nothing is "
                          "scored until training is done)")

    started = time.perf_counter()
    stage(f"predicting sections {TRAIN_SECTIONS}-{SECTIONS - 1} into {out / 'pred.zarr'}")
    pred = out / "pred.zarr"
    checkpoint = run / "checkpoints" / "last.pt"
    if pred.exists() and started_with(pred).get("checkpoint_sha256") != file_digest(checkpoint):
        stage(f"{pred} holds another checkpoint's predictions (trained further since): "
              "predicting again")
        shutil.rmtree(pred)  # the benchmark's own intermediate
    try:
        progress = run_inference(recipe, checkpoint, f"{volumes}/image", pred,
                                 device=device, roi=validation, resume=pred.exists())
    except Stopped as stop:  # its blocks are kept: the same command resumes the prediction
        raise Interrupted(stop.signal_name, f"stopped while predicting into {pred} "
                          f"({stop.progress.done + stop.progress.skipped} of "
                          f"{stop.progress.total} blocks done); run the same command again "
                          "to continue") from None
    if (nonfinite := progress.nonfinite_warning()) is not None:
        stage(f"warning: {nonfinite}")
    infer_seconds = time.perf_counter() - started

    started = time.perf_counter()
    labels = open_volume(f"{volumes}/labels").read(validation)
    pieces = connected_pieces(labels)
    connected = recipe.train.validate_connected_truth
    truth = pieces if connected else labels
    affs = to_float(open_volume(f"{pred}/{task}").read(), f"{pred}/{task}")
    target = recipe.tasks[task].target
    assert isinstance(target, AffinityTarget)
    values = recipe.segment.validation_values
    stage(f"segmenting them ({recipe.segment.type}) at {len(values)} values and scoring each")
    parameter = recipe.segment.value_name
    result = sweep(affs, target.offsets, recipe.segment, values, truth,
                   on_value=lambda i, row: stage(value_line(parameter, values, i, row)))
    segment_seconds = time.perf_counter() - started
    _check_segmentation_is_ours(seg_path)  # again: --out is held, but not its files
    write_volume(seg_path, "segmentation", result.segmentation.astype(np.uint64),
                 voxel_size=VOXEL_SIZE, offset=tuple(validation.offset), overwrite=True,
                 label=True, attrs={"emrun": OUR_SEGMENTATION})
    final = score(result.segmentation, truth)
    as_labelled = score(result.segmentation, labels).as_dict()

    results = {
        "recipe": recipe.name, "recipe_file": str(path.resolve()),
        "overrides": list(overrides or []), "data": str(folder),
        "train_sections": [0, TRAIN_SECTIONS - 1],
        "validation_sections": [validation.begin[0], validation.end[0] - 1],
        "iterations": trainer.iteration, "device": ", ".join(trainer.devices),
        "train_seconds": round(trainer.seconds(), 1),
        "infer_device": device_name(trainer.device),
        "infer_seconds": round(infer_seconds, 1),
        "segment_seconds": round(segment_seconds, 1),
        "segmenter": recipe.segment.type, "parameter": result.parameter,
        "chosen": result.best_value, "chosen_at_edge": result.at_edge,
        "sweep": result.table(), "connected_truth": connected,
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in final.as_dict().items()},
        "as_labelled": {k: round(as_labelled[k], 4) for k in AS_LABELLED},
        "as_labelled_floor": round(score(pieces, labels).arand, 4),
    }
    stage("drawing the figures and writing results.md, results.json")
    _figures(out, open_volume(f"{volumes}/image").read(validation), affs, result.segmentation,
             truth, run)
    write_text(out / "results.md", _table(results))
    write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    return results


def _table(r: dict[str, Any]) -> str:
    """The results as a Markdown table (for results.md and the README)."""
    tried = " / ".join(f"{row[r['parameter']]:g}" for row in r["sweep"])
    truth = ("each truth object's connected pieces in these sections" if r["connected_truth"]
             else "the labels as given")
    plain = r["as_labelled"]
    rows = [
        ("adapted Rand error", f"{r['arand']:.4f} (truth: {truth})"),
        ("VOI split / merge (bits)", f"{r['voi_split']:.3f} / {r['voi_merge']:.3f}"),
        ("CREMI score", f"{r['cremi_score']:.4f}"),
        ("against the labels as given", f"adapted Rand error {plain['arand']:.4f}, VOI "
                                        f"{plain['voi_split']:.3f} / {plain['voi_merge']:.3f} "
                                        "(the labels' own connected pieces score "
                                        f"{r['as_labelled_floor']:.4f}: objects joined only "
                                        "outside these sections)"),
        ("segmenter", f"{r['segmenter']}, {r['parameter']} {r['chosen']:g} (swept over "
                      f"{tried}{'; best at the edge' if r.get('chosen_at_edge') else ''})"),
        ("training", f"{r['iterations']} iterations, {r['train_seconds'] / 60:.1f} min on "
                     f"{r['device']}"),
        ("inference / segmentation", f"{r['infer_seconds']:.0f} s on {r['infer_device']} / "
                                     f"{r['segment_seconds']:.0f} s"),
        ("sections", f"train {r['train_sections'][0]}-{r['train_sections'][1]}, validate "
                     f"{r['validation_sections'][0]}-{r['validation_sections'][1]}"),
        ("recipe", f"{r['recipe']}" + "".join(f", `{o}`" for o in r.get("overrides", []))),
    ]
    lines = ["| SNEMI3D validation | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def loss_curves(path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """The (iteration, loss) points of training and of validation in a run's events.jsonl.
    The benchmark resumes a run it did not start: a line a kill cut short, a record of an
    older emrun (other keys, a validation that is not a mapping) or a NaN loss logged as
    null is passed over; a finished benchmark failed at its last figure over one of them."""
    steps: list[tuple[int, float]] = []
    vals: list[tuple[int, float]] = []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return steps, vals
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or not _is_number(at := record.get("iteration")):
            continue
        validation = record.get("validation")
        for points, source in ((steps, record),
                               (vals, validation if isinstance(validation, dict) else {})):
            if _is_number(loss := source.get("loss/total")):
                points.append((at, loss))
    return steps, vals


def _is_number(value: Any) -> bool:
    """A finite int or float (not a bool: JSON's true is no iteration)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and \
        bool(np.isfinite(value))


def _figures(out: Path, image: np.ndarray, affs: np.ndarray, seg: np.ndarray,
             truth: np.ndarray, run: Path) -> None:
    """input.png, affinities.png, segmentation.png (overlay), training.png (curves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mid = image.shape[0] // 2
    colours = np.random.default_rng(0).random((4096, 3))

    def save(name: str, draw: Any, size: tuple[float, float] = (6, 6)) -> None:
        fig, ax = plt.subplots(figsize=size)
        draw(ax)
        fig.tight_layout()
        with atomic_output(out / name) as tmp:
            fig.savefig(tmp, format="png", dpi=80)
        plt.close(fig)

    def section(ax: Any) -> None:
        ax.imshow(image[mid], cmap="gray")
        ax.set_title(f"SNEMI3D section {TRAIN_SECTIONS + mid} (validation)")
        ax.axis("off")

    def affinities(ax: Any) -> None:
        ax.imshow(affs[:3, mid].mean(0), cmap="gray", vmin=0, vmax=1)
        ax.set_title("mean nearest-neighbour affinity")
        ax.axis("off")

    def overlay(ax: Any) -> None:
        ax.imshow(image[mid], cmap="gray")
        ax.imshow(colours[seg[mid] % len(colours)], alpha=0.45)
        ax.set_title(f"segmentation ({len(np.unique(seg))} segments; truth "
                     f"{len(np.unique(truth[truth > 0]))} objects)")
        ax.axis("off")

    def curves(ax: Any) -> None:
        steps, vals = loss_curves(run / "events.jsonl")
        if steps:
            ax.plot(*zip(*steps, strict=True), label="training loss")
        if vals:
            ax.plot(*zip(*vals, strict=True), "o-", label="validation loss")
        ax.set_xlabel("iteration")
        ax.legend()

    save("input.png", section)
    save("affinities.png", affinities)
    save("segmentation.png", overlay)
    save("training.png", curves, (7, 4))


OUR_SEGMENTATION = {"written_by": "bench snemi3d"}
"""The mark on the segmentation this benchmark writes into --out/seg.zarr: only a marked one
is its to replace (a benchmark stopped after writing it, before results.json)."""


def _check_segmentation_is_ours(seg_path: Path) -> None:
    """Refuse, before training, a ``seg.zarr/labels/segmentation`` in --out that this
    benchmark did not write: it was replaced without a word (its other volumes are left)."""
    volume = volume_dir(seg_path, "segmentation", True)
    if not (volume.exists() or volume.is_symlink()):
        return
    try:
        mark = zarr.open_group(str(volume), mode="r").attrs.get("emrun", {})
    except Exception:  # not a zarr group: no volume of ours either
        mark = {}
    if not isinstance(mark, dict) or mark.get("written_by") != OUR_SEGMENTATION["written_by"]:
        raise UserError(f"{volume} is no segmentation of this benchmark (it writes its own "
                        "there): move it, or give another --out (nothing was removed)")


def _ours(recorded: Any, checkpoint: Path) -> bool:
    """Whether an output's record names this benchmark's checkpoint (its run's last.pt):
    only such a prediction is the benchmark's to replace; a store of the user's in --out
    was deleted."""
    return isinstance(recorded, str) and Path(recorded).resolve() == checkpoint.resolve()
