"""The `emrun` command line: one small function per command, wiring only."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import yaml
from rich.console import Console
from rich.markup import escape

from . import __version__
from .errors import (
    Interrupted,
    NotImplementedYet,
    UserError,
    disk_full,
    host_out_of_memory,
    not_a_folder,
    not_allowed,
)
from .geometry import Roi

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="emrun",
    help="Recipe-driven training and chunked inference for 3D EM segmentation.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
data_app = typer.Typer(help="Data tools: convert volumes, make synthetic EM, preview samples.",
                       no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks: data loading, model, trainer, inference, "
                        "segmentation, SNEMI3D.",
                        no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")

# emoji=False: rich would turn ":x:" in a user's text (--device cuda:x:) into an emoji
out = Console(highlight=False, soft_wrap=True, emoji=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)

Overrides = Annotated[
    list[str] | None,
    typer.Option("--override", "-o", metavar="KEY.PATH=VALUE",
                 help="Override a recipe value (VALUE is YAML); repeatable."),
]
RecipeFile = Annotated[Path, typer.Argument(help="Recipe YAML file.")]
Device = Annotated[str | None, typer.Option(
    metavar="cpu|cuda|cuda:N", help="Device (default: cuda when there is one, else cpu).")]
JsonLine = Annotated[bool, typer.Option(
    "--json", help="Print the figures as one JSON line on stdout (the text for people goes to "
    "stderr, so `... --json | jq` works).")]
ANY_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}
Levels = Annotated[int | None, typer.Option(
    metavar="N", help="Multiscale levels written, each halving y and x (z where anisotropy "
    "allows); 1 = full resolution only (default: until y and x are at most 256, at most 8).")]
Nm = Annotated[tuple[float, float, float] | None, typer.Option(metavar="Z Y X",
                                                                help="Voxel size in nm.")]
LevelChoice = Annotated[str | None, typer.Option(
    "--level", metavar="NAME|Z,Y,X", help="The input's level of a multiscale image (OME-Zarr, "
    "precomputed): its name (s1) or its voxel size in nm, z,y,x (40,8,8).")]


def _at_level(path: str, level: str | None) -> str:
    """The path naming `level` of the multiscale image at `path` (itself without --level)."""
    if level is None:
        return path
    from .io import choose_level

    return choose_level(path, level)



def _check_nm(voxel_size: tuple[float, float, float] | None) -> None:
    """--voxel-size as given: three positive, finite nm (a 0 would reach the writers or the
    generator as an internal error)."""
    if voxel_size is not None and not all(math.isfinite(v) and v > 0 for v in voxel_size):
        given = " ".join(f"{v:g}" for v in voxel_size)
        raise UserError(f"--voxel-size {given}: give three positive sizes in nm (z y x)")


def guarded(fn: F) -> F:
    """Map failures to exit codes: the user's mistakes 2 (message only), ours 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with _text_to_stderr(bool(kwargs.get("json_"))):
                return fn(*args, **kwargs)
        except UserError as exc:
            for line in str(exc).splitlines():
                err.print(f"[red]error:[/] {escape(line)}", markup=True)
            raise typer.Exit(2) from None
        except NotImplementedYet as exc:
            err.print(f"{exc}", markup=False)
            raise typer.Exit(1) from None
        except Interrupted as exc:
            err.print(f"stopped by {exc.signal_name}: {exc}", markup=False)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:  # Ctrl-C in a command without its own handling
            logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # zarr's IO cut short
            err.print("stopped by SIGINT (Ctrl-C): nothing half-written stands under a final "
                      "name; run the command again (with --resume where it has one)",
                      markup=False)
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:
            if (full := disk_full(exc)) is not None:
                _report_disk_full(full)
                raise typer.Exit(2) from None
            if (file := not_a_folder(exc)) is not None:
                err.print(f"error: {file.filename}: is a file, not a folder, so nothing can be "
                          "written under it; give another path", markup=False)
                raise typer.Exit(2) from None
            if (denied := not_allowed(exc)) is not None:
                where = f" {denied.filename}" if denied.filename else ""
                err.print(f"error: cannot write or read{where} ({denied.strerror}): choose a "
                          "place this user may write, or fix its permissions", markup=False)
                raise typer.Exit(2) from None
            if type(exc).__name__ == "OutOfMemoryError":  # torch's, without importing torch
                _report_out_of_memory(exc)
                raise typer.Exit(2) from None
            if (short := host_out_of_memory(exc)) is not None:
                err.print(f"error: this machine ran out of memory ({short}): lower "
                          "train.batch_size or train.patch (training), infer.batch_size or "
                          "infer.patch (inference), --block or --shape, or free memory",
                          markup=False)
                raise typer.Exit(2) from None
            if os.environ.get("EMRUN_DEBUG"):
                traceback.print_exc()
            err.print(f"internal error: {type(exc).__name__}: {exc}\n"
                      "This is a bug in emrun; rerun with EMRUN_DEBUG=1 for a traceback "
                      "and report it.", markup=False)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _report_disk_full(exc: OSError) -> None:
    """A full disk is the user's to fix: one line, and no noise from zarr's IO tasks that the
    error cut short (asyncio logs them as it shuts down)."""
    where = f" writing {exc.filename}" if exc.filename else ""
    err.print(f"[red]error:[/] the disk is full ({escape(exc.strerror or 'no space left')})"
              f"{escape(where)}: free space and run the command again (with --resume where it "
              "has one); nothing half-written stands under a final name", markup=True)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


def _duration(seconds: float) -> str:
    """Seconds for people: 45 s, 12 min, 3.5 h, 9 days."""
    for unit, scale, digits in (("days", 86400, 1), ("h", 3600, 1), ("min", 60, 0)):
        if seconds >= 2 * scale:
            return f"{seconds / scale:.{digits}f} {unit}"
    return f"{seconds:.0f} s"


def _report_out_of_memory(exc: Exception) -> None:
    """The device's memory is too small for the batch and patch asked for: the user's to
    change (torch's message says what was asked for and what was free)."""
    detail = " ".join(str(exc).split("Including non-PyTorch memory")[0].split())
    err.print(f"[red]error:[/] the device ran out of memory: {escape(detail)} Lower "
              "train.batch_size or train.patch (training), or infer.batch_size (inference); "
              "bf16 precision halves activations", markup=True)


@contextlib.contextmanager
def _text_to_stderr(json_mode: bool) -> Iterator[None]:
    """With --json, stdout carries the JSON line alone: text for people goes to stderr."""
    if not json_mode:
        yield
        return
    saved = out._file  # None: whatever sys.stdout is at the time
    out.file = err.file
    try:
        yield
    finally:
        out._file = saved


def _version(value: bool) -> None:
    if value:
        out.print(f"emrun {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """emrun: declarative experiments for 3D electron-microscopy segmentation."""


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
    from .recipe import RecipeError, load_recipe
    from .recipe.loader import shown_path
    from .summary import print_summary

    loaded = load_recipe(recipe, override or [])
    _warn(loaded.cautions())
    facts = None
    if not no_data:
        from .data.checks import check_data

        facts, problems = check_data(loaded)
        if problems:
            raise RecipeError(problems)
    if print_:
        out.print(yaml.safe_dump(loaded.recipe.resolved(), sort_keys=False), end="", markup=False)
        return
    from .models import build_model
    from .models.facts import model_facts

    model = model_facts(build_model(loaded.recipe), loaded.recipe.model, loaded.recipe.train.patch)
    # the summary is markup: a path's [brackets] must stay text
    print_summary(out, loaded.recipe, facts, escape(shown_path(recipe)), model)


@app.command()
@guarded
def schema(
    output: Annotated[
        Path, typer.Option("--output", help="Where to write the JSON Schema.")
    ] = Path("schemas/recipe.schema.json"),
) -> None:
    """Write the recipe's JSON Schema (for editor completion and checking)."""
    from .atomic import write_text
    from .recipe.loader import shown_path
    from .recipe.schema import recipe_schema_text, refuse_foreign_file

    if output.is_dir():
        raise UserError(f"{output} is a directory; give a file path")
    refuse_foreign_file(output)
    write_text(output, recipe_schema_text())
    out.print(f"wrote {shown_path(output)}", markup=False)


@app.command()
@guarded
def recipes() -> None:
    """List the shipped recipes with one-line descriptions."""
    from .shipped import RECIPES, recipe_description, shipped_recipes

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
        "--run-dir", help="Run directory (default: runs/<recipe name>).")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the run in the run directory from checkpoints/last.pt.")]
    = False,
    init_from: Annotated[Path | None, typer.Option(
        "--init-from", help="Start from the weights of this checkpoint or model package "
        "(fine-tuning).")] = None,
    gpus: Annotated[int | None, typer.Option(
        min=1, help="Launch N processes with torchrun (distributed data parallel).")] = None,
    device: Device = None,
) -> None:
    """Train a recipe: run directory, checkpoints, TensorBoard, events.jsonl, exact resume."""
    if gpus is not None and gpus > 1 and "WORLD_SIZE" not in os.environ:
        raise typer.Exit(_launch_torchrun(gpus))
    from .data.checks import check_data
    from .recipe import RecipeError, load_recipe
    from .train.trainer import Trainer

    if resume and init_from is not None:
        raise UserError("--resume continues a run; --init-from starts a new one: use one")
    loaded = load_recipe(recipe, override or [])
    _, problems = check_data(loaded)
    if problems:
        raise RecipeError(problems)
    _warn(loaded.cautions())
    path = run_dir or Path("runs") / loaded.recipe.name
    result = Trainer(loaded, path, resume=resume, init_from=init_from, device=device,
                     console=out).fit()
    if result.interrupted:
        raise typer.Exit(130 if result.interrupted == "SIGINT" else 143)
    out.print(f"done: {result.iteration} iterations in {path}", markup=False)
    if result.iteration > loaded.recipe.train.iterations:  # resumed past a lowered target
        _warn([f"the run was already at iteration {result.iteration}, past "
               f"train.iterations {loaded.recipe.train.iterations}: nothing was trained"])


def _launch_torchrun(processes: int) -> int:
    """Re-run this command under torchrun with one process per GPU."""
    import subprocess

    args = sys.argv[1:]
    cleaned = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg == "--gpus":
            skip = True
            continue
        if arg.startswith("--gpus="):
            continue
        cleaned.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", "-m", "emrun", *cleaned]
    return subprocess.call(command)


@app.command()
@guarded
def infer(
    input_: Annotated[str, typer.Option("--input", help="Volume to predict, e.g. vol.zarr/image.")],
    output: Annotated[Path, typer.Option("--output", help="Output .zarr folder.")],
    checkpoint: Annotated[Path | None, typer.Option(
        "--checkpoint", help="A training checkpoint (.pt); or give --model.")] = None,
    model: Annotated[Path | None, typer.Option(
        "--model", help="A model package (`emrun export`): weights and recipe in one file.")]
    = None,
    override: Overrides = None,
    block: Annotated[tuple[int, int, int] | None, typer.Option(
        metavar="Z Y X", help="Write-block size in voxels, a whole number of output chunks "
        "(default: infer.block, else 4 patch strides per axis).")] = None,
    tta: Annotated[int | None, typer.Option(
        metavar="1|2|4|8|16", help="Flip/transpose variants averaged (default: infer.tta).")]
    = None,
    mask: Annotated[str | None, typer.Option(help="Predict only blocks where this is non-zero.")]
    = None,
    device: Device = None,
    resume: Annotated[bool, typer.Option("--resume", help="Finish an interrupted output.")]
    = False,
    workers: Annotated[int | None, typer.Option(
        help="Worker processes (default: one per GPU; one on a CPU).")] = None,
    scheduler: Annotated[str, typer.Option(
        metavar="local|daisy", help="local (worker processes here) or daisy (extra "
        "emrun[daisy]).")] = "local",
    launch: Annotated[str | None, typer.Option(
        help="daisy only: command that starts each worker, e.g. 'srun --gres=gpu:1'.")] = None,
    roi: Annotated[str | None, typer.Option(
        metavar="OFFSET/SHAPE", help="Predict only this box of the input, in voxels, e.g. "
        "60,0,0/10,1024,1024 (the input around it still gives context).")] = None,
    recipe: Annotated[Path | None, typer.Option(
        "--recipe", help="Recipe YAML file (default: the one the checkpoint was trained "
        "with; a recipe whose model or tasks differ from it is refused).")] = None,
    level: LevelChoice = None,
    levels: Levels = None,
) -> None:
    """Predict a volume blockwise into zarr: one array per task, blended, resumable."""
    from .infer.checkpoint_recipe import recipe_for
    from .infer.progress import block_progress
    from .infer.run import run_inference
    from .infer.schedule import Stopped

    if tta is not None and tta not in (1, 2, 4, 8, 16):
        raise UserError(f"--tta must be 1, 2, 4, 8 or 16 (got {tta})")
    if scheduler not in ("local", "daisy"):
        raise UserError(f"--scheduler must be local or daisy (got {scheduler!r})")
    box = _parse_roi(roi)
    input_ = _at_level(input_, level)
    checkpoint = _network_file(checkpoint, model)
    loaded = recipe_for(checkpoint, recipe, override or [])
    try:
        with block_progress(err) as report:
            progress = run_inference(loaded.recipe, checkpoint, input_, output, block=block,
                                     device=device, tta=tta, resume=resume, mask_path=mask,
                                     workers=workers,
                                     scheduler=scheduler,  # type: ignore[arg-type]
                                     launch=launch, roi=box, levels=levels,
                                     on_block=report)
    except Stopped as stop:
        done = stop.progress.done + stop.progress.skipped
        raise Interrupted(stop.signal_name, f"{done} of {stop.progress.total} blocks are done "
                          "and marked; continue with --resume") from None
    empty = (f" ({progress.empty} of them empty: outside the mask or all-zero input)"
             if progress.empty else "")
    out.print(f"wrote {output}: {progress.done} blocks predicted{empty}, {progress.skipped} "
              f"already done, {progress.voxels / max(progress.seconds, 1e-9) / 1e6:.2f} "
              "Mvoxel/s", markup=False)
    if progress.done and progress.empty == progress.done and not progress.skipped:
        why = "--mask is 0 over the whole input" if mask else "the input is all zero"
        err.print(f"warning: {output} holds zeros only: {why}; is it the right volume?",
                  markup=False)


def _network_file(checkpoint: Path | None, model: Path | None) -> Path:
    """The one file infer predicts with: a checkpoint (--checkpoint) or a package (--model)."""
    import zipfile

    from .io.package import is_package
    from .paths import not_a_file

    if (checkpoint is None) == (model is None):
        raise UserError("give the network to predict with: --checkpoint CHECKPOINT or "
                        "--model PACKAGE (one of them)")
    if checkpoint is not None and is_package(checkpoint):
        raise UserError(f"--checkpoint {checkpoint} is a model package: give it as --model")
    if model is not None and not os.path.lexists(model):
        raise UserError(f"--model {model}: no such model package")
    if model is not None and (why := not_a_file(model)) is not None:
        raise UserError(f"--model {model} {why}")
    if model is not None and not is_package(model):
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
        help="A run directory (its best.pt, else last.pt), a checkpoint or a model package.")],
    output: Annotated[Path, typer.Argument(
        help="File to write: NAME.emrun, NAME.zip (bioimageio) or NAME.onnx.")],
    format_: Annotated[str | None, typer.Option(
        "--format", metavar="emrun|bioimageio|onnx", help="emrun: a model package for "
        "`infer --model` and `train --init-from`; bioimageio: a bioimage.io model (extra "
        "emrun[bioimageio]); onnx: an ONNX graph (extra emrun[onnx]). Default: from "
        "OUTPUT's suffix (.emrun, .zip, .onnx).")] = None,
) -> None:
    """Write a trained network as one file that travels: weights, recipe, facts, checksums."""
    from .export import export as run_export

    for line in run_export(source, output, format_):
        out.print(line, markup=False)


@app.command()
@guarded
def segment(
    affs: Annotated[str, typer.Argument(
        help="Affinities (c, z, y, x), e.g. pred.zarr/affinity; uint8 (255 = 1) or float.")],
    output: Annotated[Path, typer.Argument(help="Output .zarr folder (created if missing).")],
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
        min=0, help="Merge segments smaller than this into their best neighbour.")] = None,
    mask: Annotated[str | None, typer.Option(
        help="Volume, non-zero where to segment; 0 outside in the output.")] = None,
    offsets: Annotated[str | None, typer.Option(
        help="Offsets if AFFS has no 'offsets' attribute: JSON "
             "'[[-1,0,0],[0,-1,0],[0,0,-1]]' or '-1,0,0 0,-1,0 0,0,-1'.")] = None,
    block: Annotated[tuple[int, int, int] | None, typer.Option(
        metavar="Z Y X", help="Segment block by block with this block size (default: only "
                              "volumes beyond 4 GiB of working memory, in blocks that fit "
                              "it, at most 32 512 512).")] = None,
    name: Annotated[str, typer.Option(help="Output volume name in OUT.")] = "segmentation",
    sweep: Annotated[bool, typer.Option(
        "--sweep", help="Try each --threshold/--bias (default 0.1 ... 0.9) against --truth; "
                        "write the best by adapted Rand error.")] = False,
    truth: Annotated[str | None, typer.Option(help="Ground-truth labels for --sweep.")] = None,
    connected_truth: Annotated[bool, typer.Option(
        "--connected-truth", help="--sweep: score against each truth object's connected "
        "pieces (as emrun evaluate --connected-truth; for a crop of a larger "
        "annotation).")] = False,
    levels: Levels = None,
    workers: Annotated[int | None, typer.Option(
        min=1, help="--sweep: values segmented at once in worker processes (default: as "
                    "many as cores and memory allow); --scheduler: worker processes.")] = None,
    level: LevelChoice = None,
    scheduler: Annotated[str | None, typer.Option(
        metavar="local|daisy", help="Segment at scale, block by block on --workers: fragments "
        "(OUT/fragments), a region graph in a database, agglomeration by --threshold as "
        "waterz, relabelling; resumable. local: processes here; daisy: daisy workers "
        "(extra emrun[daisy]).")] = None,
    launch: Annotated[str | None, typer.Option(
        metavar="CMD", help="--scheduler daisy: start each worker through this command, e.g. "
        "'srun -c 2 --mem 4G' (nodes share the output folder and the database).")] = None,
    db: Annotated[str | None, typer.Option(
        metavar="URL", help="--scheduler: the region graph's database, e.g. "
        "postgresql://user@host/graphs (extra emrun[postgres]); default: SQLite in "
        "OUT/.emrun-segment.")] = None,
    fragments: Annotated[str, typer.Option(
        metavar="watershed|mws", help="--scheduler: how blocks are cut into fragments.")
    ] = "watershed",
    agglomeration: Annotated[str, typer.Option(
        metavar="global|blockwise", help="--scheduler: agglomerate the whole graph in one "
        "process (exact; about 500 bytes per edge), or each block's neighbourhood on the "
        "workers, then join their merges (about 100 bytes per edge).")] = "global",
    resume: Annotated[bool, typer.Option(
        "--resume", help="--scheduler: finish the job in OUT (or agglomerate its graph at "
        "other thresholds, with another --name).")] = False,
    json_: JsonLine = False,
) -> None:
    """Affinities to a neuron segmentation (mutex watershed, waterz, components)."""
    import json

    from .segment.job import run_segment
    from .segment.request import SegmentRequest
    from .stages import Stages

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

    request = SegmentRequest(
        affinities=_at_level(affs, level), output=output, method=method,
        values={"bias": values("--bias", bias), "threshold": values("--threshold", threshold)},
        min_size=min_size, mask=mask, offsets=offsets, block=block, name=name, sweep=sweep,
        truth=truth, connected_truth=connected_truth, workers=workers, levels=levels,
        scheduler=scheduler, launch=launch, db=db, fragments=fragments,
        agglomeration=agglomeration, resume=resume)
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
        out.print(f"wrote {output}/{item['name']}: {item['segments']} segments ({result.method} "
                  f"{value}, min_size {result.parameters['min_size']}; {result.mode}) in "
                  f"{result.seconds:.1f} s", markup=False)
    if json_:
        print(json.dumps(result.as_dict()))


@app.command()
@guarded
def evaluate(
    seg: Annotated[str, typer.Argument(
        metavar="SEG", help="Segmentation (with --binary: a foreground prediction), e.g. "
        "seg.zarr/seg.")],
    truth: Annotated[str, typer.Argument(
        metavar="TRUTH", help="Ground truth, e.g. vol.zarr/labels; 0 is unlabelled, not scored.")],
    mask: Annotated[str | None, typer.Option(metavar="MASK",
                                             help="Score only where this is non-zero.")] = None,
    binary: Annotated[bool, typer.Option(
        "--binary", help="Score a foreground prediction: precision, recall, F1, IoU.")] = False,
    threshold: Annotated[float | None, typer.Option(
        min=0.0, max=1.0, help="With --binary: foreground above this probability "
        "(uint8 predictions: above threshold x 255; default: 0.5).")] = None,
    min_overlap: Annotated[int | None, typer.Option(
        min=1, help="Voxels an overlap needs to count towards splits and merges (default: "
        "100; not with --binary).")] = None,
    connected_truth: Annotated[bool, typer.Option(
        "--connected-truth", help="Score each truth object's connected pieces inside the "
        "volume as separate objects: for a crop of a larger annotation, where pieces that "
        "join only outside it cannot be joined by any segmentation of the crop.")] = False,
    scheduler: Annotated[str | None, typer.Option(
        metavar="local|daisy", help="Score in blocks: local (worker processes here) or daisy "
        "(extra emrun[daisy]; default: one process, streamed).")] = None,
    workers: Annotated[int | None, typer.Option(
        help="Workers scoring blocks (alone: local worker processes; default: the cores here "
        "for local, 1 for daisy).")] = None,
    launch: Annotated[str | None, typer.Option(
        help="daisy only: command that starts each worker, e.g. 'srun -c 4' (workers must "
        "see the volumes and --work-dir).")] = None,
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

    from .evaluate import MIN_OVERLAP, Parallel, binary_scores_volumes, score_volumes
    from .evaluate.report import binary_lines, score_lines
    from .io import open_volume
    from .io.window import covered_part
    from .stages import Stages

    _check_evaluate_mode(binary, threshold, min_overlap, connected_truth)
    parallel = None
    if any(o is not None for o in (scheduler, workers, block, launch, work_dir)):
        parallel = Parallel(scheduler=scheduler or "local", workers=workers, launch=launch,
                            block=block, work_dir=work_dir)
        parallel.check()  # before any volume is opened
    unit = "blocks" if parallel is not None else "slabs"
    seg_vol = open_volume(seg)
    truth_vol = covered_part(seg_vol, open_volume(truth))  # a larger truth: the part SEG covers
    mask_vol = covered_part(seg_vol, open_volume(mask)) if mask is not None else None
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
        lines = binary_lines(result, str(seg_vol), str(truth_vol), mask_name)
    else:
        result = score_volumes(seg_vol, truth_vol, mask_vol,
                               min_overlap=MIN_OVERLAP if min_overlap is None else min_overlap,
                               connected_truth=connected_truth, on_slab=report,
                               parallel=parallel)
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
    if not binary and threshold is not None:
        raise UserError("--threshold is for foreground predictions: add --binary, or drop "
                        "--threshold to score a segmentation")
    if binary and min_overlap is not None:
        raise UserError("--min-overlap is for segmentations (object ids); drop it with "
                        "--binary")
    if binary and connected_truth:
        raise UserError("--connected-truth is for segmentations (object ids); drop it with "
                        "--binary")


@app.command()
@guarded
def view(
    paths: Annotated[list[str], typer.Argument(
        metavar="PATH...", help="OME-Zarr volumes to show, e.g. vol.zarr/image "
        "pred.zarr/affinity seg.zarr/segmentation (a layer each).")],
    bind: Annotated[str, typer.Option(
        help="Address to serve on (0.0.0.0: reachable from other machines).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535,
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
    import signal
    import threading
    import webbrowser

    from .view import view as start_view

    shown = start_view(paths, bind=bind, port=port, client=client)
    for layer in shown.layers:
        out.print(f"{layer.name}: {layer.kind} layer from {layer.store}"
                  f"{'/' + layer.inner if layer.inner else ''}", markup=False)
    out.print(f"data served at {shown.server.url}", markup=False)
    if json_:
        print(json.dumps({"link": shown.link, "data": shown.server.url,
                          "state": shown.state}), flush=True)
    else:
        print(shown.link, flush=True)
    if open_browser:
        webbrowser.open(shown.link)
    stop = threading.Event()
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda *_: stop.set())
    stop.wait()
    shown.close()
    err.print("stopped serving", markup=False)


@app.command()
@guarded
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the run and figures.")]
    = Path("emrun-demo"),
    override: Overrides = None,
) -> None:
    """Train on synthetic EM on the CPU (minutes), then infer, segment and score a test
    volume with the trained and the untrained network."""
    from .demo import run_demo

    metrics = run_demo(out_dir, console=out, overrides=override or [])
    for tag in ("untrained", "trained"):
        m = metrics[tag]
        out.print(f"{tag:>9}: adapted Rand error {m['arand']:.4f}  VOI split "
                  f"{m['voi_split']:.3f} merge {m['voi_merge']:.3f}", markup=False)
    out.print(f"wrote {out_dir / 'metrics.json'}, {out_dir / 'demo.png'} (input, true "
              "boundaries, affinities, segments, loss curve), the run in "
              f"{out_dir / 'run'} and the test volume, predictions and segmentations beside "
              "them", markup=False)


@bench_app.command("snemi3d")
@guarded
def bench_snemi3d(
    data: Annotated[Path | None, typer.Option(
        help="Folder with SNEMI3D's train-input.tif and train-labels.tif (default: "
        "../shared/data/snemi3d).")] = None,
    iterations: Annotated[int | None, typer.Option(
        min=1, help="Training iterations (default: the recipe's).")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for data, run, results.")]
    = Path("snemi3d-bench"),
    recipe: Annotated[str | None, typer.Option(
        help="A recipe file, or a shipped recipe's name (default snemi3d_aff; see `emrun "
        "recipes`); its sources must be named snemi3d and snemi3d_val.")] = None,
    override: Overrides = None,
    device: Device = None,
    final: Annotated[bool, typer.Option(
        "--final", help="After the benchmark in --out: train its settings on all 70 sections "
        "and write --out/snemi3d.emrun, a model package for emrun infer --model.")] = False,
    json_: JsonLine = False,
) -> None:
    """Train, infer, segment and score a SNEMI3D recipe (default snemi3d_aff) on real data."""
    import json

    from .bench.snemi3d import run_snemi3d

    if final:
        from .bench.snemi3d_final import run_final
        from .export import export

        if iterations is not None or override or recipe is not None:
            raise UserError("--final repeats the settings of the benchmark in --out (its "
                            "recipe, iterations and overrides, in results.json); drop "
                            "--recipe, --iterations and -o")
        facts = run_final(data, out_dir, export, device=device, console=out)
        for line in facts["export"]:
            out.print(line, markup=False)
        out.print(f"trained on sections 0-69 for {facts['iterations']} iterations in "
                  f"{facts['train_seconds'] / 60:.1f} min on {facts['device']}; its recipe "
                  f"segments with {facts['segmenter']} {facts['parameter']} "
                  f"{facts['value']:g}; wrote {out_dir / 'final.json'}", markup=False)
        if json_:
            print(json.dumps(facts))
        return
    results = run_snemi3d(data, out_dir, iterations=iterations, device=device,
                          overrides=override or [], console=out, recipe=recipe)
    out.print((out_dir / "results.md").read_text(encoding="utf-8"), markup=False)
    out.print(f"wrote {out_dir / 'results.json'}, results.md and figures (input.png, "
              "affinities.png, segmentation.png, training.png)", markup=False)
    if json_:
        print(json.dumps(results))


@bench_app.command("model")
@guarded
def bench_model(
    recipe: RecipeFile,
    override: Overrides = None,
    device: Device = None,
    steps: Annotated[int, typer.Option(min=1, help="Timed steps per configuration.")] = 5,
    compile_: Annotated[bool, typer.Option(
        "--compile/--no-compile", help="Also time torch.compile'd configurations.")] = True,
    json_: JsonLine = False,
) -> None:
    """Forward+backward+optimizer step time of the recipe's model (fp32/bf16, eager/compiled,
    channels_last_3d on/off) on random input of the recipe's patch and batch size."""
    import json

    from .bench.model import bench_model as run_bench
    from .recipe import load_recipe

    loaded = load_recipe(recipe, override or [])
    result = run_bench(loaded.recipe, device=device, steps=steps, compile_=compile_)
    out.print(f"[bold]{result['recipe']}[/] on {result['device']}: {result['model']}, "
              f"{result['params']:,} parameters, {result['flops_per_voxel'] / 1e3:,.0f} kFLOP "
              f"per voxel, receptive field {result['receptive_field'] or 'unknown'}, patch "
              f"{result['patch']} x batch {result['batch_size']}")
    for c in result["configs"]:
        out.print(f"  {c['precision']:<5} {'compiled' if c['compiled'] else 'eager':<8} "
                  f"{'channels_last' if c['channels_last'] else 'contiguous':<13} "
                  f"{c['step_ms']:>10.1f} ms/step {c['voxels_per_s']:>14,.0f} voxels/s",
                  markup=False)
    if json_:
        print(json.dumps(result))


@bench_app.command("train")
@guarded
def bench_train(
    recipe: RecipeFile,
    override: Overrides = None,
    device: Device = None,
    steps: Annotated[int, typer.Option(min=1, help="Timed iterations.")] = 30,
    json_: JsonLine = False,
) -> None:
    """The trainer's time per iteration against a bare PyTorch loop on the same in-memory
    batches (synthetic sources, the recipe's model, optimizer, precision, layout, compile and
    losses)."""
    import json

    from .bench.train import bench_train as run_bench
    from .recipe import load_recipe

    result = run_bench(load_recipe(recipe, override or []), device=device, steps=steps)
    mode = result["precision"] + (", compiled" if result["compile"] else "")
    out.print(f"[bold]{result['recipe']}[/] on {result['device']} ({mode}): "
              f"emrun {result['emrun_step_ms']:.1f} ms/iteration, bare loop "
              f"{result['bare_step_ms']:.1f} ms, overhead {100 * result['overhead']:+.1f} % "
              f"(a checkpoint, timed apart: {result['checkpoint_ms']:.0f} ms)")
    if json_:
        print(json.dumps(result))


@bench_app.command("infer")
@guarded
def bench_infer(
    recipe: RecipeFile,
    override: Overrides = None,
    shape: Annotated[tuple[int, int, int] | None, typer.Option(
        metavar="Z Y X", help="Synthetic volume (default: three patches per axis; with "
        "--workers, deep enough for two blocks per worker).")] = None,
    block: Annotated[tuple[int, int, int] | None, typer.Option(
        metavar="Z Y X", help="Write-block size (default: the recipe's or the engine's).")]
    = None,
    device: Device = None,
    no_model: Annotated[bool, typer.Option(
        "--no-model", help="A stand-in network that costs almost nothing, with the recipe's "
        "heads: the engine's own rate (read, blend, quantise, compress, write).")] = False,
    workers: Annotated[list[str] | None, typer.Option(
        metavar="N[,N...]", help="Also run N local worker processes (repeatable or a comma "
        "list, e.g. 1,2,4) and report each rate and speed-up over 1.")] = None,
    configs: Annotated[bool, typer.Option(
        "--configs", help="Search batch size, channels_last_3d (CUDA) and torch.compile for "
        "the best model-only rate, and the -o overrides that select it.")] = False,
    compile_: Annotated[bool | None, typer.Option(
        "--compile/--no-compile", help="With --configs: search torch.compile too (default: "
        "on CUDA only; on a CPU it needs a C++ compiler and minutes).")] = None,
    repeats: Annotated[int, typer.Option(
        min=1, help="Timed forward passes per model-only measurement (twice for the "
        "model-alone rate: before and after the engine).")] = 15,
    json_: JsonLine = False,
) -> None:
    """Engine output voxels/s on a synthetic volume against model-only forward throughput."""
    import json

    from .bench.infer import bench_infer as run_bench
    from .bench.infer import report_lines
    from .recipe import load_recipe

    result = run_bench(load_recipe(recipe, override or []).recipe, shape=shape, device=device,
                       repeats=repeats, no_model=no_model, block=block, workers=workers,
                       configs=configs, compile_=compile_)
    for line in report_lines(result):
        out.print(line, markup=False)
    if json_:
        print(json.dumps(result))


@bench_app.command("segment")
@guarded
def bench_segment(
    shape: Annotated[tuple[int, int, int], typer.Option(
        metavar="Z Y X", help="Synthetic affinity volume (generated block by block).")
    ] = (64, 512, 512),
    block: Annotated[tuple[int, int, int], typer.Option(
        metavar="Z Y X", help="Block size of the pipeline.")] = (32, 256, 256),
    workers: Annotated[list[int] | None, typer.Option(
        min=1, help="Worker counts to run (repeat; default 1 and 2).")] = None,
    threshold: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.5,
    agglomeration: Annotated[str, typer.Option(
        metavar="global|blockwise", help="As emrun segment --agglomeration.")] = "global",
    folder: Annotated[Path | None, typer.Option(
        help="Where to write the temporary volumes (default: the system's temp folder).")
    ] = None,
    json_: JsonLine = False,
) -> None:
    """Graph segmentation (fragments, region graph, agglomeration) throughput per core."""
    import json

    from .bench.segment import bench_segment as run_bench
    from .bench.segment import report_lines

    if min(shape) < 1 or min(block) < 1:
        raise UserError("--shape and --block take three sizes of at least 1")
    if agglomeration not in ("global", "blockwise"):
        raise UserError(f"--agglomeration {agglomeration!r}: choose global or blockwise")
    result = run_bench(tuple(shape), tuple(block), sorted(set(workers or [1, 2])), threshold,
                       folder, agglomeration)
    for line in report_lines(result):
        out.print(line, markup=False)
    if json_:
        print(json.dumps(result))


@bench_app.command("data")
@guarded
def bench_data(
    recipe: RecipeFile,
    override: Overrides = None,
    synthetic: Annotated[bool, typer.Option(
        "--synthetic", help="Replace the recipe's sources by synthetic volumes.")] = False,
    workers: Annotated[int | None, typer.Option(
        min=0, help="Loader worker processes (default: train.workers; 0: in-process).")] = None,
    samples: Annotated[int, typer.Option(min=1, help="Samples to time.")] = 50,
    json_: JsonLine = False,
) -> None:
    """Training-data throughput with the recipe's full augmentation stack and targets."""
    import json

    from .bench.data import bench_data as run_bench
    from .recipe import load_recipe

    loaded = load_recipe(recipe, override or [])
    workers = loaded.recipe.train.workers if workers is None else workers
    result = run_bench(loaded.recipe, synthetic=synthetic, workers=workers, samples=samples)
    out.print(f"[bold]{result['recipe']}[/]: patch {result['patch']}, {workers} workers, "
              f"{result['samples_per_s']:.1f} samples/s ({result['ms_per_sample']:.1f} ms per "
              f"sample); one core: median {result['median_ms_per_sample_one_core']:.1f} ms")
    out.print(f"  read {result['read_ms']:.1f} ms, targets {result['targets_ms']:.1f} ms")
    for name, ms in result["per_target_ms"].items():
        out.print(f"  target {name}: {ms:.2f} ms", markup=False)
    for name, ms in result["per_augmentation_ms"].items():
        out.print(f"  {name}: {ms:.2f} ms", markup=False)
    if json_:
        print(json.dumps(result))


@bench_app.command("codecs")
@guarded
def bench_codecs(
    volume: Annotated[str, typer.Argument(help="Volume to measure, e.g. pred.zarr/affinity.")],
    chunks: Annotated[list[str] | None, typer.Option(
        "--chunks", metavar="C,Z,Y,X", help="Chunk shape to try ('C': all channels); "
        "repeatable (default: C,16,256,256 C,32,256,256 C,8,512,512 1,16,256,256).")] = None,
    codec: Annotated[list[str] | None, typer.Option(
        "--codec", metavar="NAME",
        help="Measure only this codec (a name from the table); repeatable.")] = None,
    passes: Annotated[int, typer.Option(min=1, help="Timed passes (median).")] = 3,
    sample_mb: Annotated[float, typer.Option(
        min=0.001, help="MB of whole chunks timed one by one on one thread.")] = 32.0,
    max_mb: Annotated[float, typer.Option(
        min=0.001, help="MB of the volume (its start) written through zarr.")] = 256.0,
    workdir: Annotated[Path | None, typer.Option(
        help="Folder for the temporary arrays (default: the system's temp folder).")] = None,
    json_: JsonLine = False,
) -> None:
    """Compression ratio, one-thread encode/decode and zarr write/read speed of candidate
    codecs (blosc zstd/lz4/lz4hc, shuffles, zstd) and chunk shapes on a volume."""
    import json

    from .bench.codecs import TABLE_HEADER, TABLE_NOTE, format_row
    from .bench.codecs import bench_codecs as run_bench

    printed: list[str] = []

    def progress(row: dict[str, Any]) -> None:  # rows as they come: a run takes minutes
        if not printed:
            printed.append(TABLE_HEADER)
            out.print(TABLE_HEADER, markup=False)
        out.print(format_row(row), markup=False)

    result = run_bench(volume, chunks=chunks, passes=passes, sample_mb=sample_mb,
                       max_mb=max_mb, codecs=codec,
                       workdir=None if workdir is None else str(workdir), progress=progress)
    m = result["machine"]
    out.print(f"{result['volume']}: {result['dtype']} region {result['region']} "
              f"({result['region_mb']:.0f} MB) of {result['shape']}; zarr {m['zarr']}, "
              f"numcodecs {m['numcodecs']}, {m['cpus']} CPUs; median of {result['passes']}",
              markup=False)
    out.print(TABLE_NOTE, markup=False)
    best = result["best"]
    out.print(f"best ({result['rule']}): [bold]{best['codec']}[/] with chunks "
              f"{'x'.join(str(c) for c in best['chunks'])}")
    for pick in result["best_per_chunks"]:
        out.print(f"  at chunks {'x'.join(str(c) for c in pick['chunks'])}: {pick['codec']}",
                  markup=False)
    if not result["lossless"]:
        raise RuntimeError("a codec did not round-trip losslessly (lossless NO in the table)")
    if json_:
        print(json.dumps(result))




@data_app.command("convert")
@guarded
def data_convert(
    source: Annotated[str, typer.Argument(help="TIFF file or folder, file.h5/dataset, "
                                                "vol.zarr/array, .npy; with emrun[remote] "
                                                "vol.n5/dataset, precomputed, URLs.")],
    out: Annotated[Path, typer.Argument(help="Output zarr folder (created if missing).")],
    voxel_size: Nm = None,
    chunks: Annotated[tuple[int, int, int] | None, typer.Option(
        metavar="Z Y X", help="Output chunk size in voxels (default: up to 16 x 256 x 256); "
        "a 4-d (c, z, y, x) source keeps all channels in each chunk.")
    ] = None,
    name: Annotated[str | None, typer.Option(
        help="Array name in OUT (default: image for 8-bit/float, labels for wider ints).")] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an existing array of that name.")
    ] = False,
    level: LevelChoice = None,
    labels: Annotated[bool | None, typer.Option(
        "--labels/--image", help="Write a segmentation (OME labels: mode-downsampled, under "
        "OUT/labels) or an image (default: labels for integers wider than 8 bits).")] = None,
    levels: Levels = None,
) -> None:
    """Convert a volume to zarr v3 with OME-Zarr 0.5 metadata, streamed section by section."""
    from .io.convert import convert

    _check_nm(voxel_size)
    result = convert(_at_level(source, level), out, name=name, voxel_size=voxel_size,
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
    n: Annotated[int, typer.Option("--n", min=1, max=64, help="Samples (rows).")] = 8,
    out: Annotated[Path, typer.Option("--out", help="PNG file to write.")] = Path("preview.png"),
) -> None:
    """A PNG grid of augmented samples: sections with label boundaries and each target."""
    from .data.synthetic import with_synthetic_sources
    from .preview import write_preview
    from .recipe import load_recipe

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
    out: Annotated[Path, typer.Argument(help="Output zarr folder (created if missing).")],
    shape: Annotated[tuple[int, int, int], typer.Option(
        metavar="Z Y X", help="Volume size in voxels.")] = (64, 256, 256),
    seed: Annotated[int, typer.Option(min=0, help="Generator seed.")] = 0,
    voxel_size: Nm = (30.0, 6.0, 6.0),
    defects: Annotated[bool, typer.Option(help="Add missing/dim sections and a shift.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace existing arrays.")] = False,
    levels: Levels = None,
) -> None:
    """Write a synthetic EM volume: arrays image, labels, mito and synapse (stand-in clefts),
    deterministic from SEED."""
    from .capacity import size_text
    from .devices import available_memory
    from .io.pyramid import level_factors
    from .io.write import check_new_volume, write_volumes
    from .synth import MEMORY_PER_VOXEL, synthesize

    if shape is None or min(shape) < 1:
        raise UserError("--shape needs three positive sizes")
    _check_nm(voxel_size)
    level_factors(shape, voxel_size or (30.0, 6.0, 6.0), levels)  # before generating
    need, free = math.prod(shape) * MEMORY_PER_VOXEL, available_memory()
    if need > free:
        raise UserError(f"--shape {' '.join(map(str, shape))}: generating it takes about "
                        f"{size_text(need)} of memory (it is made whole, in memory), "
                        f"{size_text(free)} is available; give a smaller --shape")
    names = {"image": False, "labels": True, "mito": True, "synapse": True}  # name: label
    if not overwrite:
        for name, label in names.items():  # a taken name refuses before the generating
            check_new_volume(out, name, label)
    volume = synthesize(shape, seed, voxel_size=voxel_size or (30.0, 6.0, 6.0),
                        defects=defects)
    write_volumes(out, {name: (getattr(volume, name), label) for name, label in names.items()},
                  voxel_size=volume.voxel_size, attrs={"emrun": {"synthetic_seed": seed}},
                  levels=levels, overwrite=overwrite)
    print(f"wrote {out}/image, labels, mito, synapse: shape {list(shape)}, seed {seed}, "
          f"{int(volume.labels.max())} cells")


def _warn(lines: list[str]) -> None:
    """Warnings on stderr, one line each (stdout stays for results)."""
    for line in lines:
        err.print(f"[yellow]warning:[/] {escape(line)}", markup=True)


def main() -> None:
    """Console-script entry point: a usage mistake (unknown option or command, a missing
    argument) is one line and exit 2, like every other mistake."""
    try:
        code = app(standalone_mode=False)
    except Exception as exc:
        name = type(exc).__name__
        if name == "Abort":  # Ctrl-C outside a command (while parsing its arguments)
            sys.exit(130)
        if getattr(exc, "exit_code", None) != 2 or not hasattr(exc, "format_message"):
            raise
        if name == "NoArgsIsHelpError":  # `emrun` (or a group) alone: the help
            print(exc.format_message())
            sys.exit(0)
        context = getattr(exc, "ctx", None)
        where = f" (see {context.command_path} --help)" if context is not None else ""
        err.print(f"error: {exc.format_message()}{where}", markup=False)
        sys.exit(2)
    sys.exit(code or 0)
