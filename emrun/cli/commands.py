"""The top-level commands: validate, schema, recipes, train, infer, export, segment,
evaluate, view, demo. Each parses its arguments and calls one function of the part below."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.markup import escape

from ..capacity import parse_size, size_text
from ..errors import UserError
from ..geometry import Roi
from .app import (
    Device,
    JsonLine,
    LevelChoice,
    Levels,
    Overrides,
    RecipeFile,
    app,
    at_level,
    err,
    guarded,
    out,
    warn,
    write_whole,
)


@app.command()
@guarded
def validate(
    recipe: RecipeFile,
    override: Overrides = None,
    print_: Annotated[
        bool, typer.Option("--print", help="Print the fully resolved recipe.")
    ] = False,
    no_data: Annotated[bool, typer.Option("--no-data", help="Do not open data volumes.")] = False,
) -> None:
    """Check a recipe (and, unless --no-data, the volumes it names); exit 2 on problems."""
    from ..recipe import RecipeError, load_recipe
    from ..recipe.loader import shown_path
    from ..summary import print_summary

    loaded = load_recipe(recipe, override or [])
    warn(loaded.cautions())
    facts = None
    if not no_data:
        from ..data.checks import check_data, label_cautions

        facts, problems = check_data(loaded)
        if problems:
            raise RecipeError(problems)
        warn(label_cautions(loaded))
    if print_:
        out.print(yaml.safe_dump(loaded.recipe.resolved(), sort_keys=False), end="", markup=False)
        return
    from ..models import build_model
    from ..models.facts import model_facts

    model = model_facts(build_model(loaded.recipe), loaded.recipe.model, loaded.recipe.train.patch)
    # the summary is markup: a path's [brackets] must stay text
    print_summary(out, loaded.recipe, facts, escape(shown_path(recipe)), model)


@app.command()
@guarded
def schema(
    output: Annotated[
        Path, typer.Option("--output", metavar="PATH",
                           help="Where to write the JSON Schema ('-': print it).")
    ] = Path("schemas/recipe.schema.json"),
) -> None:
    """Write the recipe's JSON Schema (for editor completion and checking)."""
    from ..atomic import write_text
    from ..recipe.loader import shown_path
    from ..recipe.schema import recipe_schema_text, refuse_foreign_file

    if str(output) == "-":
        write_whole(recipe_schema_text())  # 200 kB: more than a pipe holds
        return
    if output.is_dir():
        raise UserError(f"{output} is a directory; give a file path")
    refuse_foreign_file(output)
    write_text(output, recipe_schema_text())
    out.print(f"wrote {shown_path(output)}", markup=False)


@app.command()
@guarded
def recipes() -> None:
    """List the shipped recipes with one-line descriptions."""
    from ..shipped import RECIPES, recipe_description, shipped_recipes

    found = shipped_recipes()
    if not found:
        raise UserError(f"no shipped recipes found in {RECIPES}")
    width = max(len(p.name) for p in found)
    for path in found:
        out.print(f"{path.name:<{width}}  {recipe_description(path)}", markup=False)
    out.print(f"\n(in {RECIPES})", markup=False)


@app.command()
@guarded
def train(
    recipe: RecipeFile,
    override: Overrides = None,
    run_dir: Annotated[Path | None, typer.Option(
        "--run-dir", metavar="DIR", help="Run directory (default: runs/<recipe name>).")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the run in the run directory from checkpoints/last.pt.")]
    = False,
    init_from: Annotated[Path | None, typer.Option(
        "--init-from", metavar="CKPT|PACKAGE|RUN_DIR",
        help="Start from the weights of this checkpoint, model package or "
        "run directory (its best.pt, else last.pt) (fine-tuning).")] = None,
    gpus: Annotated[int | None, typer.Option(
        min=1, metavar="N",
        help="Launch N processes with torchrun (distributed data parallel).")] = None,
    device: Device = None,
) -> None:
    """Train a recipe: run directory, checkpoints, TensorBoard, events.jsonl, exact resume."""
    from ..data.checks import check_data, label_cautions
    from ..recipe import RecipeError, load_recipe
    from ..train import run_dir as run_dirs
    from ..train.launch import LAUNCHED
    from ..train.trainer import Trainer, check_rank_devices

    if resume and init_from is not None:
        raise UserError("--resume continues a run; --init-from starts a new one: use one")
    launching = gpus is not None and gpus > 1 and "WORLD_SIZE" not in os.environ
    loaded = load_recipe(recipe, override or [])
    _, problems = check_data(loaded)
    if problems:
        raise RecipeError(problems)
    path = run_dir or Path("runs") / loaded.recipe.name
    if launching:  # every refusal here, once, before torchrun starts the ranks
        run_dirs.check_free(path, resume)
        check_rank_devices(device, gpus)  # type: ignore[arg-type]
        warn(loaded.cautions() + label_cautions(loaded))
        raise typer.Exit(_launch_torchrun(gpus, rank_args(  # type: ignore[arg-type]
            recipe, override or [], path, resume, init_from, device)))
    if os.environ.get("RANK", "0") == "0" and LAUNCHED not in os.environ:  # said once
        warn(loaded.cautions() + label_cautions(loaded))
    result = Trainer(loaded, path, resume=resume, init_from=init_from, device=device,
                     console=out).fit()
    if result.interrupted:
        raise typer.Exit(130 if result.interrupted == "SIGINT" else 143)
    if os.environ.get("RANK", "0") != "0":
        return  # rank 0 says it
    out.print(f"done: {result.iteration} iterations in {path}", markup=False)
    if result.iteration > loaded.recipe.train.iterations:  # resumed past a lowered target
        warn([f"the run was already at iteration {result.iteration}, past "
               f"train.iterations {loaded.recipe.train.iterations}: nothing was trained"])


def _launch_torchrun(processes: int, args: list[str]) -> int:
    """Run ``emrun *args`` as one rank per GPU under torchrun."""
    from ..train.launch import launch_ranks

    return launch_ranks(processes, args)


def rank_args(recipe: Path, overrides: list[str], run_dir: Path, resume: bool,
              init_from: Path | None, device: str | None) -> list[str]:
    """The ranks' `train` command line, from the parsed arguments: rebuilt from sys.argv,
    it was the caller's own when `train --gpus` ran in-process (a test's CliRunner, a
    script calling the app), and the ranks printed help and the launcher reported exit 0.
    Values go as ``--option=value`` and the recipe after ``--``, so none reads as an option."""
    args = ["train", *(f"--override={o}" for o in overrides), f"--run-dir={run_dir}"]
    if resume:
        args.append("--resume")
    if init_from is not None:
        args.append(f"--init-from={init_from}")
    if device is not None:
        args.append(f"--device={device}")
    return [*args, "--", str(recipe)]


@app.command()
@guarded
def infer(
    input_: Annotated[str, typer.Option(
        "--input", metavar="IN", help="Volume to predict, e.g. vol.zarr/image.")],
    output: Annotated[Path, typer.Option(
        "--output", metavar="OUT.zarr", help="Output .zarr folder.")],
    checkpoint: Annotated[Path | None, typer.Option(
        "--checkpoint", metavar="C|RUN_DIR",
        help="A training checkpoint (.pt) or run directory (its best.pt, "
        "else last.pt); or give --model.")] = None,
    model: Annotated[Path | None, typer.Option(
        "--model", metavar="PACKAGE",
        help="A model package (`emrun export`): weights and recipe in one file.")]
    = None,
    override: Overrides = None,
    block: Annotated[tuple[int, int, int] | None, typer.Option(
        metavar="Z Y X", help="Write-block size in voxels, a whole number of output chunks "
        "(default: infer.block, else 4 patch strides per axis).")] = None,
    tta: Annotated[int | None, typer.Option(
        metavar="1|2|4|8|16", help="Flip/transpose variants averaged (default: infer.tta).")]
    = None,
    mask: Annotated[str | None, typer.Option(
        metavar="MASK", help="Predict only blocks where this is non-zero.")]
    = None,
    device: Device = None,
    resume: Annotated[bool, typer.Option("--resume", help="Finish an interrupted output.")]
    = False,
    workers: Annotated[int | None, typer.Option(
        metavar="N", help="Worker processes (default: one per GPU; one on a CPU).")] = None,
    scheduler: Annotated[str, typer.Option(
        metavar="local|daisy", help="local (worker processes here) or daisy (extra "
        "emrun[daisy]).")] = "local",
    launch: Annotated[str | None, typer.Option(
        metavar="CMD", help="daisy only: command that starts each worker, e.g. 'srun "
        "--gres=gpu:1'.")] = None,
    roi: Annotated[str | None, typer.Option(
        metavar="OFFSET/SHAPE", help="Predict only this box of the input, in voxels, e.g. "
        "60,0,0/10,1024,1024 (the input around it still gives context).")] = None,
    recipe: Annotated[Path | None, typer.Option(
        "--recipe", metavar="R",
        help="Recipe YAML file (default: the one the checkpoint was trained "
        "with; a recipe whose model or tasks differ from it is refused).")] = None,
    level: LevelChoice = None,
    levels: Levels = None,
    handover_memory: Annotated[str | None, typer.Option(
        metavar="SIZE", help="Partial sums each worker may hold for later blocks, e.g. 20GiB "
        "(default: an eighth of its GPU's memory, or of the available memory shared by the "
        "workers): more repeats fewer patches at unit borders.")] = None,
    handover_host_memory: Annotated[str | None, typer.Option(
        metavar="SIZE", help="Host memory each worker may hold partial sums in beyond "
        "--handover-memory, e.g. 64GiB (default: none): on a GPU, pinned and copied back as "
        "their blocks come; fewer patches repeated on volumes a GPU's share cannot span.")
    ] = None,
    plan: Annotated[bool, typer.Option(
        "--plan", help="Check everything and print the plan (lattice, blocks, units, patches "
        "predicted again, output size) without writing or predicting anything.")] = False,
) -> None:
    """Predict a volume blockwise into zarr: one array per task, blended, resumable."""
    from ..infer.cautions import input_cautions
    from ..infer.checkpoint_recipe import recipe_for
    from ..infer.progress import block_progress
    from ..infer.run import inference_cautions, run_inference

    if tta is not None and tta not in (1, 2, 4, 8, 16):
        raise UserError(f"--tta must be 1, 2, 4, 8 or 16 (got {tta})")
    if scheduler not in ("local", "daisy"):
        raise UserError(f"--scheduler must be local or daisy (got {scheduler!r})")
    box = _parse_roi(roi)
    handover = None if handover_memory is None else parse_size(handover_memory,
                                                               "--handover-memory")
    host = 0 if handover_host_memory is None else parse_size(handover_host_memory,
                                                             "--handover-host-memory")
    input_ = at_level(input_, level)
    checkpoint = _network_file(checkpoint, model)
    loaded = recipe_for(checkpoint, recipe, override or [])
    warn(inference_cautions(loaded))
    if cautions := input_cautions(loaded.recipe, checkpoint, input_, tta):
        warn(cautions)
    if plan:
        from ..infer.run import plan_inference

        for line in plan_lines(plan_inference(
                loaded.recipe, checkpoint, input_, output, block=block, device=device, tta=tta,
                resume=resume, mask_path=mask, workers=workers,
                scheduler=scheduler,  # type: ignore[arg-type]
                launch=launch, roi=box, levels=levels, handover=handover,
                handover_host=host)):
            out.print(line, markup=False, highlight=False)
        return
    with block_progress(err) as report:  # a stop: `Stopped`, one line saying what is kept
        progress = run_inference(loaded.recipe, checkpoint, input_, output, block=block,
                                 device=device, tta=tta, resume=resume, mask_path=mask,
                                 workers=workers,
                                 scheduler=scheduler,  # type: ignore[arg-type]
                                 launch=launch, roi=box, levels=levels, handover=handover,
                                 handover_host=host, on_block=noting_the_plan(report))
    empty = (f" ({progress.empty} of them empty: outside the mask or blank input)"
             if progress.empty else "")
    predicted = f"{progress.done} block{'' if progress.done == 1 else 's'} predicted"
    out.print(f"wrote {output}: {predicted}{empty}, {progress.skipped} "
              f"already done, {progress.voxels / max(progress.seconds, 1e-9) / 1e6:.2f} "
              "Mvoxel/s", markup=False)
    if progress.done and progress.empty == progress.done and not progress.skipped:
        why = "--mask lets no voxel in (0, or NaN, over the whole input)" if mask else \
            "the input is blank (all at its intensity scale's low end, 0 when unsigned)"
        err.print(f"warning: {output} holds zeros only: {why}; is it the right volume?",
                  markup=False)
    if (nonfinite := progress.nonfinite_warning()) is not None:
        warn([nonfinite])


def plan_lines(plan: Any) -> list[str]:
    """`emrun infer --plan`'s report of an `InferencePlan`."""
    from ..capacity import free_disk
    from ..infer.job import output_bytes

    job, units = plan.job, plan.units
    layout, recipe = job.layout, job.recipe

    def dims(values: Any) -> str:
        return " x ".join(map(str, values))

    channels = sum(recipe.head_channels().values())
    raw = output_bytes(recipe, layout.shape)
    grid = layout.grid()
    count = math.prod(-(-g // u) for g, u in zip(grid, units.unit, strict=True))
    lattice = layout.patch_count()
    box = "" if layout.shape == plan.input_shape and not any(job.roi_offset) else \
        f", the box of {dims(layout.shape)} at {dims(job.roi_offset)}"
    return [
        f"plan for {job.output} (nothing was written or predicted):",
        f"  input {job.input_path}: {dims(plan.input_shape)} voxels{box}",
        f"  output: {channels} channels of {recipe.infer.dtype} "
        f"({', '.join(recipe.tasks)}), {size_text(raw)} before compression, "
        f"{size_text(free_disk(job.output))} free there",
        f"  lattice: {lattice:,} patches of {dims(layout.patch)}, stride {dims(layout.stride)}",
        f"  blocks: {math.prod(grid):,} of {dims(layout.block)} ({dims(grid)}), chunks "
        f"{dims(layout.chunks)}; {plan.pending:,} to predict",
        f"  units: {count:,} of {dims(units.unit)} blocks for {units.workers} worker"
        f"{'s' if units.workers != 1 else ''} on {plan.device}, a hand-over budget of "
        f"{size_text(units.handover)} per worker{_beside(units.handover_host)}",
        _patches_line(plan.pending, plan.owned, units.repeated)]


def _patches_line(pending: int, owned: int, repeated: float) -> str:
    """The plan's patches: those the blocks left own and their share predicted again at
    unit borders (a resumed output's finished blocks predict none)."""
    if not pending:
        return "  patches predicted: none, every block is done"
    return (f"  patches predicted: about {round(owned * (1 + repeated)):,}, "
            f"{100 * repeated:.1f} % of them again at unit borders")


REPEATS_NOTED = 0.01
"""The share of patches predicted again at unit borders from which infer says so."""


def noting_the_plan(report: Callable[[Any], None]) -> Callable[[Any], None]:
    """``report``, first saying once how many patches the job's units predict again where
    that is at least `REPEATS_NOTED` (a teravoxel in a GPU's default budget: a quarter,
    for hours), and why: the hand-over budget (with the knob that sets it) or the workers
    (each takes whole units)."""
    noted = False

    def on_block(progress: Any) -> None:
        nonlocal noted
        if not noted and progress.unit is not None:
            noted = True
            left = progress.skipped < progress.total  # a finished run's resume: nothing
            if left and progress.repeated >= REPEATS_NOTED:
                err.print(plan_note(progress), markup=False, highlight=False)
        report(progress)

    return on_block


def plan_note(progress: Any) -> str:
    """`noting_the_plan`'s line."""
    unit = " x ".join(map(str, progress.unit))
    said = (f"infer: {100 * progress.repeated:.1f} % of the patches are predicted again, at "
            f"the borders of units of {unit} blocks")
    if progress.alone >= REPEATS_NOTED:
        return (f"{said}, the most a hand-over budget of {size_text(progress.handover)} per "
                f"worker{_beside(progress.handover_host)} holds (--handover-memory or "
                "--handover-host-memory gives more room)")
    alone = "none" if progress.alone == 0 else f"{100 * progress.alone:.1f} %"
    return f"{said}, one or more for each of {progress.workers} workers (one worker: {alone})"


def _beside(host: int) -> str:
    """The host memory a hand-over budget has beside it, said after the budget."""
    return f" and {size_text(host)} of host memory" if host else ""


def _network_file(checkpoint: Path | None, model: Path | None) -> Path:
    """The one file infer predicts with: a checkpoint (--checkpoint) or a package (--model)."""
    import zipfile

    from ..io.package import is_package
    from ..paths import not_a_file

    if (checkpoint is None) == (model is None):
        raise UserError("give the network to predict with: --checkpoint CHECKPOINT or "
                        "--model PACKAGE (one of them)")
    if checkpoint is not None and checkpoint.is_dir():  # a run: the file export would pick
        from ..io.checkpoint import checkpoint_of

        try:
            chosen = checkpoint_of(checkpoint)
        except UserError as exc:
            package = " (a model package as --model)" if "model package" in str(exc) else ""
            raise UserError(f"--checkpoint {exc}{package}") from None
        err.print(f"--checkpoint {checkpoint}: predicting with its "
                  f"{chosen.relative_to(checkpoint)}", markup=False)
        checkpoint = chosen
    if checkpoint is not None and is_package(checkpoint):
        raise UserError(f"--checkpoint {checkpoint} is a model package: give it as --model")
    if model is not None and not os.path.lexists(model):
        raise UserError(f"--model {model}: no such model package")
    if model is not None and (why := not_a_file(model)) is not None:
        raise UserError(f"--model {model} {why}")
    if model is not None and not is_package(model):
        if model.suffix.lower() == ".onnx":
            raise UserError(f"--model {model} is an ONNX graph, for other tools: emrun infer "
                            "predicts with an emrun package (emrun export RUN OUT.emrun) or a "
                            "training checkpoint (--checkpoint)")
        if not zipfile.is_zipfile(model):  # packages and checkpoints are zips: cut short?
            raise UserError(f"--model {model} is not a model package: it is not a readable "
                            "zip file (cut short or damaged? copy or export it again)")
        raise UserError(f"--model {model} is not a model package (a training checkpoint? "
                        "give it as --checkpoint, or make a package with `emrun export`)")
    return checkpoint or model  # type: ignore[return-value]


def _parse_roi(text: str | None) -> Roi | None:
    """``z,y,x/z,y,x`` (offset/shape) to a box (checked against the input later)."""
    if text is None:
        return None
    try:
        offset, shape = (tuple(int(v) for v in part.split(",")) for part in text.split("/"))
        if len(offset) != 3 or len(shape) != 3:
            raise ValueError
    except ValueError:
        raise UserError(f"--roi {text!r}: expected offset/shape as z,y,x/z,y,x, e.g. "
                        "60,0,0/10,1024,1024") from None
    return Roi(offset, shape)


@app.command()
@guarded
def export(
    source: Annotated[Path, typer.Argument(
        metavar="SOURCE",
        help="A run directory (its best.pt, else last.pt), a checkpoint or a model package.")],
    output: Annotated[str, typer.Argument(
        metavar="OUTPUT",
        help="File to write: NAME.emrun, NAME.zip (bioimageio) or NAME.onnx.")],
    format_: Annotated[str | None, typer.Option(
        "--format", metavar="emrun|bioimageio|onnx", help="emrun: a model package for "
        "`infer --model` and `train --init-from`; bioimageio: a bioimage.io model (extra "
        "emrun[bioimageio]); onnx: an ONNX graph (extra emrun[onnx]). Default: from "
        "OUTPUT's suffix (.emrun, .zip, .onnx).")] = None,
) -> None:
    """Write a trained network as one file that travels: weights, recipe, facts, checksums."""
    from ..export import export as run_export
    from ..export import file_output

    for line in run_export(source, file_output(output), format_):
        out.print(line, markup=False)


@app.command()
@guarded
def segment(
    affs: Annotated[str, typer.Argument(
        metavar="AFFS",
        help="Affinities (c, z, y, x), e.g. pred.zarr/affinity; uint8 (255 = 1) or float.")],
    output: Annotated[Path, typer.Argument(
        metavar="OUT", help="Output .zarr folder (created if missing).")],
    method: Annotated[str | None, typer.Option(
        metavar="mws|waterz|cc", help="mws, waterz (extra emrun[waterz]) or cc. Default: the "
        "segmenter (and its settings) of the recipe an `emrun infer` output records, else "
        "mws.")] = None,
    threshold: Annotated[list[str] | None, typer.Option(
        metavar="T", help="cc: affinity above which voxels join; waterz: merge threshold. "
                          "Repeat (or comma-separate) for one output per value, or values to "
                          "--sweep.")] = None,
    bias: Annotated[list[str] | None, typer.Option(
        metavar="B", help="mws: long-range edges repel below this affinity (more splits as "
                          "it rises). Repeat (or comma-separate) like --threshold.")] = None,
    min_size: Annotated[int | None, typer.Option(
        min=0, metavar="N", help="Merge segments smaller than this into their best neighbour.")
    ] = None,
    mask: Annotated[str | None, typer.Option(
        metavar="MASK", help="Volume, non-zero where to segment; 0 outside in the output "
        "(--resume: the job's).")] = None,
    offsets: Annotated[str | None, typer.Option(
        metavar="O", help="Offsets if AFFS has no 'offsets' attribute: JSON "
             "'[[-1,0,0],[0,-1,0],[0,0,-1]]' or '-1,0,0 0,-1,0 0,0,-1' (--resume: the "
             "job's).")] = None,
    block: Annotated[tuple[int, int, int] | None, typer.Option(
        metavar="Z Y X", help="Segment block by block with this block size (default: only "
                              "volumes beyond 4 GiB of working memory, in blocks that fit "
                              "it, at most 32 512 512; --scheduler: 32 256 256, "
                              "--resume: the job's).")] = None,
    name: Annotated[str | None, typer.Option(
        metavar="NAME", help="Output volume name in OUT (default: segmentation; --resume without "
             "--threshold or --min-size: the job's).")
    ] = None,
    sweep: Annotated[bool, typer.Option(
        "--sweep", help="Try each --threshold/--bias (default 0.1 ... 0.9) against --truth; "
                        "write the best by adapted Rand error.")] = False,
    truth: Annotated[str | None, typer.Option(
        metavar="T", help="Ground-truth labels for --sweep.")] = None,
    connected_truth: Annotated[bool, typer.Option(
        "--connected-truth", help="--sweep: score against each truth object's connected "
        "pieces (as emrun evaluate --connected-truth; for a crop of a larger "
        "annotation).")] = False,
    levels: Levels = None,
    workers: Annotated[int | None, typer.Option(
        min=1, metavar="N", help="--sweep: values segmented at once in worker processes "
        "(default: as many as cores and memory allow); --scheduler: worker processes.")] = None,
    level: LevelChoice = None,
    scheduler: Annotated[str | None, typer.Option(
        metavar="local|daisy", help="Segment at scale, block by block on --workers: fragments "
        "(OUT/labels/fragments), a region graph in a database, agglomeration by --threshold as "
        "waterz, relabelling; resumable. local: processes here; daisy: daisy workers "
        "(extra emrun[daisy]).")] = None,
    launch: Annotated[str | None, typer.Option(
        metavar="CMD", help="--scheduler daisy: start each worker through this command, e.g. "
        "'srun -c 2 --mem 4G' (nodes share the output folder and the database).")] = None,
    db: Annotated[str | None, typer.Option(
        metavar="URL", help="--scheduler: the region graph's database, e.g. "
        "postgresql://user@host/graphs (extra emrun[postgres]); default: SQLite in "
        "OUT/.emrun-segment. --resume: the job's (the job keeps no password: PGPASSWORD or "
        "~/.pgpass give it).")] = None,
    fragments: Annotated[str | None, typer.Option(
        metavar="watershed|mws", help="--scheduler: how blocks are cut into fragments "
        "(default: watershed; --resume: the job's).")] = None,
    agglomeration: Annotated[str | None, typer.Option(
        metavar="global|blockwise", help="--scheduler: agglomerate the whole graph in one "
        "process (exact; about 270 bytes per edge with mean scoring, 850 with "
        "p85), or each block's neighbourhood on the "
        "workers, then join their merges (about 100 bytes per edge). Default: global "
        "(a plain --resume: the job's).")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="--scheduler: finish the job in OUT as it was started (its "
        "block, database, thresholds ... where not given), or agglomerate its graph at other "
        "thresholds, with another --name.")] = False,
    json_: JsonLine = False,
) -> None:
    """Affinities to a neuron segmentation (mutex watershed, waterz, components)."""
    import json

    from ..segment.job import find_affinities, run_segment
    from ..segment.request import SegmentRequest
    from ..stages import Stages

    def values(option: str, given: list[str] | None) -> tuple[float, ...]:
        """The numbers given with a value flag (repeated or comma-separated), each once: a
        value given twice segmented twice and then found its own output taken."""
        if not given:
            return ()
        try:
            numbers = [float(v) for item in given for v in item.split(",")]
        except ValueError:
            raise UserError(f"{option} takes numbers separated by commas (got "
                            f"{' '.join(given)})") from None
        return tuple(dict.fromkeys(numbers))

    def report(stage: str, done: int, total: int) -> None:
        if done == total or done % max(1, total // 10) == 0:  # about ten lines per pass
            err.print(f"{stage}: block {done}/{total}", markup=False)

    given = {"name": name, "fragments": fragments, "agglomeration": agglomeration}
    request = SegmentRequest(
        affinities=at_level(find_affinities(affs) or affs, level), output=output,
        method=method,
        values={"bias": values("--bias", bias), "threshold": values("--threshold", threshold)},
        min_size=min_size, mask=mask, offsets=offsets, block=block, sweep=sweep,
        truth=truth, connected_truth=connected_truth, workers=workers, levels=levels,
        scheduler=scheduler, launch=launch, db=db, resume=resume,
        given=frozenset(option for option, value in given.items() if value is not None),
        **{option: value for option, value in given.items() if value is not None})
    result = run_segment(request, on_block=report, on_stage=Stages(err))
    if result.segmenter_from:
        err.print(f"segmenter {result.method} from {result.segmenter_from} (--method to "
                  "choose another)", markup=False)
    if result.sweep:
        parameter = result.sweep["parameter"]
        for row in result.sweep["table"]:
            out.print(f"  {parameter} {row[parameter]:<6g} arand {row['arand']:.4f}  voi split "
                      f"{row['voi_split']:.3f} merge {row['voi_merge']:.3f}", markup=False)
        out.print(f"best {parameter} {result.sweep['chosen']:g}", markup=False)
        if result.sweep["at_edge"]:
            values = [row[parameter] for row in result.sweep["table"]]
            err.print(f"note: the best {parameter} is at the edge of the values tried "
                      f"({min(values):g} ... {max(values):g}); a wider range may segment "
                      "better", markup=False)
    for item in result.outputs:
        value = next(f"{k} {v:g}" for k, v in item.items() if k not in ("name", "segments"))
        segments = f"{item['segments']} segment{'' if item['segments'] == 1 else 's'}"
        out.print(f"wrote {output}/{item['name']}: {segments} ({result.method} "
                  f"{value}, min_size {result.parameters['min_size']}; {result.mode}) in "
                  f"{result.seconds:.1f} s", markup=False)
    if result.mask is not None and result.outputs and \
            not any(i["segments"] for i in result.outputs):  # the mask used: a resume's too
        whose = "" if mask is not None else " (the job's)"
        err.print(f"warning: {output} holds zeros only: --mask {result.mask}{whose} is 0 over "
                  "the whole affinities; is it the right volume?", markup=False)
    if json_:
        print(json.dumps(result.as_dict()))


@app.command()
@guarded
def evaluate(
    seg: Annotated[str, typer.Argument(
        metavar="SEG", help="Segmentation (with --binary: a foreground prediction), e.g. "
        "seg.zarr/segmentation.")],
    truth: Annotated[str, typer.Argument(
        metavar="TRUTH", help="Ground truth, e.g. vol.zarr/labels; 0 is unlabelled, not scored.")],
    mask: Annotated[str | None, typer.Option(metavar="MASK",
                                             help="Score only where this is non-zero.")] = None,
    binary: Annotated[bool, typer.Option(
        "--binary", help="Score a foreground prediction: precision, recall, F1, IoU.")] = False,
    threshold: Annotated[float | None, typer.Option(
        metavar="T", help="With --binary: foreground above this probability, in [0, 1] "
        "(uint8 predictions: above threshold x 255; default: 0.5).")] = None,
    min_overlap: Annotated[int | None, typer.Option(
        min=1, metavar="N",
        help="Voxels an overlap needs to count towards splits and merges (default: "
        "100; not with --binary).")] = None,
    connected_truth: Annotated[bool, typer.Option(
        "--connected-truth", help="Score each truth object's connected pieces inside the "
        "volume as separate objects: for a crop of a larger annotation, where pieces that "
        "join only outside it cannot be joined by any segmentation of the crop.")] = False,
    scheduler: Annotated[str | None, typer.Option(
        metavar="local|daisy", help="Score in blocks: local (worker processes here) or daisy "
        "(extra emrun[daisy]; default: one process, streamed).")] = None,
    workers: Annotated[int | None, typer.Option(
        metavar="N", help="Workers scoring blocks (alone: local worker processes; default: "
        "the cores here for local, 1 for daisy).")] = None,
    launch: Annotated[str | None, typer.Option(
        metavar="CMD", help="daisy only: command that starts each worker, e.g. 'srun -c 4' "
        "(workers must see the volumes and --work-dir).")] = None,
    block: Annotated[tuple[int, int, int] | None, typer.Option(
        metavar="Z Y X", help="Block size in voxels when scoring in blocks (default: whole "
        "storage chunks, about 8 million voxels).")] = None,
    work_dir: Annotated[str | None, typer.Option(
        metavar="DIR", help="Folder for the blocks' results while scoring in blocks, made if "
        "missing, emptied after (default: TMPDIR or the system's); with --launch, one the "
        "nodes share.")] = None,
    json_: JsonLine = False,
) -> None:
    """Score a segmentation against ground truth (adapted Rand, VOI, CREMI score), streamed
    or in parallel blocks."""
    import json

    from ..evaluate import MIN_OVERLAP, Parallel, binary_scores_volumes, score_volumes
    from ..evaluate.binary import check_threshold_used
    from ..evaluate.report import binary_lines, score_lines
    from ..evaluate.stops import stopping
    from ..evaluate.volumes import on_one_box
    from ..io import open_volume
    from ..stages import Stages

    _check_evaluate_mode(binary, threshold, min_overlap, connected_truth)
    parallel = None
    if any(o is not None for o in (scheduler, workers, block, launch, work_dir)):
        parallel = Parallel(scheduler=scheduler or "local", workers=workers, launch=launch,
                            block=block, work_dir=work_dir)
        parallel.check()  # before any volume is opened
    unit = "blocks" if parallel is not None else "slabs"
    with stopping():  # SIGTERM, SIGINT: one line, exit 143 or 130, workers stopped
        seg_vol = open_volume(seg)
        if binary and threshold is not None:  # ignored by bool and most integer dtypes
            check_threshold_used(str(seg_vol), seg_vol.dtype)
        seg_vol, truth_vol, mask_vol = on_one_box(
            seg_vol, open_volume(truth), open_volume(mask) if mask is not None else None)
        mask_name = str(mask_vol) if mask_vol is not None else None
        stage = Stages(err)

        first: list[float] = []  # when the first slab started (with blocks: finished)

        def report(done: int, total: int) -> None:  # large volumes: about ten lines, with ETA
            if total < 10 or not (done <= 2 or done % (total // 10) == 0):
                return  # the second slab gives a first estimate of the time left
            if done == 1:
                first.append(stage.clock())
                stage(f"scoring {math.prod(seg_vol.shape[-3:]):,} voxels in {total} {unit}")
                return
            per_slab = (stage.clock() - first[0]) / (done - 1)
            stage(f"{unit[:-1]} {done} of {total}, about "
                  f"{_duration(per_slab * (total - done))} left")

        if binary:
            result = binary_scores_volumes(seg_vol, truth_vol, mask_vol,
                                           threshold=0.5 if threshold is None else threshold,
                                           on_slab=report, parallel=parallel)
            lines = binary_lines(result, str(seg_vol), str(truth_vol), mask_name,
                                 seg_vol.dtype)
        else:
            result = score_volumes(seg_vol, truth_vol, mask_vol,
                                   min_overlap=MIN_OVERLAP if min_overlap is None else min_overlap,
                                   connected_truth=connected_truth, on_slab=report,
                                   parallel=parallel, warn=lambda line: warn([line]))
            lines = score_lines(result, str(seg_vol), str(truth_vol), mask_name, connected_truth)
    for line in lines:
        out.print(line)
    if json_:
        print(json.dumps({"seg": str(seg_vol), "truth": str(truth_vol), "mask": mask_name,
                          "mode": "binary" if binary else "segmentation",
                          **({} if binary else {"connected_truth": connected_truth}),
                          **result.as_dict()}))


def _check_evaluate_mode(binary: bool, threshold: float | None, min_overlap: int | None,
                         connected_truth: bool) -> None:
    """Options of the other scoring mode would be ignored without a word: refuse them."""
    if threshold is not None and not 0 <= threshold <= 1:  # NaN too: click said "<= 1"
        raise UserError(f"--threshold {threshold:g}: a probability in [0, 1]")
    if not binary and threshold is not None:
        raise UserError("--threshold is for foreground predictions: add --binary, or drop "
                        "--threshold to score a segmentation")
    if binary and min_overlap is not None:
        raise UserError("--min-overlap is for segmentations (object ids); drop it with "
                        "--binary")
    if binary and connected_truth:
        raise UserError("--connected-truth is for segmentations (object ids); drop it with "
                        "--binary")


LAYER_WORDS = {"image": "image", "channels": "RGB (the first three channels)",
               "segmentation": "segmentation"}
"""A layer's kind as the README and `--help` name it: "channels" is the code's word."""


@app.command()
@guarded
def view(
    paths: Annotated[list[str], typer.Argument(
        metavar="PATH...", help="OME-Zarr or N5 volumes to show, e.g. vol.zarr/image "
        "pred.zarr/affinity seg.zarr/segmentation (a layer each; a time series is shown "
        "whole, with neuroglancer's t axis as a slider).")],
    bind: Annotated[str, typer.Option(
        metavar="ADDR",
        help="Address to serve on (0.0.0.0: reachable from other machines).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, metavar="P",
                                      help="Port of the data server (0: any free one).")] = 0,
    client: Annotated[str | None, typer.Option(
        metavar="URL", help="A neuroglancer client to link to (e.g. "
        "https://neuroglancer-demo.appspot.com) instead of the one the neuroglancer package "
        "serves here.")] = None,
    open_browser: Annotated[bool, typer.Option(
        "--open", help="Open the link in a web browser.")] = False,
    json_: JsonLine = False,
) -> None:
    """Show volumes in neuroglancer: serve them from here and print the link (Ctrl-C stops)."""
    import json
    import threading
    import webbrowser

    from ..subprocesses import catching_signals
    from ..view import view as start_view

    shown = start_view(paths, bind=bind, port=port, client=client)
    for layer in shown.layers:
        out.print(f"{layer.name}: {LAYER_WORDS[layer.kind]} layer from {layer.store}"
                  f"{'/' + layer.inner if layer.inner else ''}", markup=False)
        if layer.unfinished is not None:
            warn([f"{layer.name} is unfinished (its blocks not yet written read as zeros): "
                  f"{layer.unfinished}"])
    out.print(f"data served at {shown.server.url}", markup=False)
    if json_:
        print(json.dumps({"link": shown.link, "data": shown.server.url,
                          "state": shown.state}), flush=True)
    else:
        print(shown.link, flush=True)
    if open_browser:
        webbrowser.open(shown.link)
    stop = threading.Event()
    with catching_signals(lambda _: stop.set()):
        stop.wait()
        shown.close()
        err.print("stopped serving", markup=False)


@app.command()
@guarded
def demo(
    out_dir: Annotated[Path, typer.Option(
        "--out", metavar="DIR", help="Folder for the run and figures.")]
    = Path("emrun-demo"),
    override: Overrides = None,
) -> None:
    """Train on synthetic EM on the CPU (minutes), then infer, segment and score a test
    volume with the trained and the untrained network."""
    from ..demo import run_demo

    metrics = run_demo(out_dir, console=out, overrides=override or [])
    for tag in ("untrained", "trained"):
        m = metrics[tag]
        out.print(f"{tag:>9}: adapted Rand error {m['arand']:.4f}  VOI split "
                  f"{m['voi_split']:.3f} merge {m['voi_merge']:.3f}", markup=False)
    out.print(f"wrote {out_dir / 'metrics.json'}, {out_dir / 'demo.png'} (input, true "
              "boundaries, affinities, segments, loss curve), the run in "
              f"{out_dir / 'run'} and the test volume, predictions and segmentations beside "
              "them", markup=False)



def _duration(seconds: float) -> str:
    """Seconds for people: 45 s, 12 min, 3.5 h, 9 days."""
    for unit, scale, digits in (("days", 86400, 1), ("h", 3600, 1), ("min", 60, 0)):
        if seconds >= 2 * scale:
            return f"{seconds / scale:.{digits}f} {unit}"
    return f"{seconds:.0f} s"


