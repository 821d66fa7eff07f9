"""`emrun bench ...`: the benchmarks, each one call of `emrun.bench`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer

from ..capacity import parse_size
from ..errors import UserError
from .app import Device, JsonLine, Overrides, RecipeFile, bench_app, guarded, out


@bench_app.command("snemi3d")
@guarded
def bench_snemi3d(
    data: Annotated[Path | None, typer.Option(
        metavar="DIR", help="Folder with SNEMI3D's train-input.tif and train-labels.tif (default: "
        "../shared/data/snemi3d).")] = None,
    iterations: Annotated[int | None, typer.Option(
        min=1, metavar="N", help="Training iterations (default: the recipe's).")] = None,
    out_dir: Annotated[Path, typer.Option(
        "--out", metavar="DIR", help="Folder for data, run, results.")]
    = Path("snemi3d-bench"),
    recipe: Annotated[str | None, typer.Option(
        metavar="NAME", help="A recipe file, or a shipped recipe's name (default snemi3d_aff; "
        "see `emrun recipes`); its sources must be named snemi3d and snemi3d_val.")] = None,
    override: Overrides = None,
    device: Device = None,
    final: Annotated[bool, typer.Option(
        "--final", help="After the benchmark in --out: train its settings on all 70 sections "
        "and write --out/snemi3d.emrun, a model package for emrun infer --model.")] = False,
    json_: JsonLine = False,
) -> None:
    """Train, infer, segment and score a SNEMI3D recipe (default snemi3d_aff) on real data."""
    import json

    from ..bench.snemi3d import run_snemi3d

    if final:
        from ..bench.snemi3d_final import run_final
        from ..export import export

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
    steps: Annotated[int, typer.Option(
        min=1, metavar="N", help="Timed steps per configuration.")] = 5,
    compile_: Annotated[bool, typer.Option(
        "--compile/--no-compile", help="Also time torch.compile'd configurations.")] = True,
    json_: JsonLine = False,
) -> None:
    """Forward+backward+optimizer step time of the recipe's model (fp32/bf16, eager/compiled,
    channels_last_3d on/off) on random input of the recipe's patch and batch size."""
    import json

    from ..bench.model import bench_model as run_bench
    from ..recipe import load_recipe
    from ..summary import flops_text, zyx_text

    loaded = load_recipe(recipe, override or [])
    result = run_bench(loaded.recipe, device=device, steps=steps, compile_=compile_)
    field = result["receptive_field"]
    out.print(f"[bold]{result['recipe']}[/] on {result['device']}: {result['model']}, "
              f"{result['params']:,} parameters, {flops_text(result['flops_per_voxel'])} "
              f"per voxel, receptive field {zyx_text(field) if field else 'unknown'}, patch "
              f"{zyx_text(result['patch'])}, batch {result['batch_size']}")
    out.print(f"  {result['summary']}", markup=False)
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
    steps: Annotated[int, typer.Option(min=1, metavar="N", help="Timed iterations.")] = 30,
    json_: JsonLine = False,
) -> None:
    """The trainer's time per iteration against a bare PyTorch loop on the same in-memory
    batches (synthetic sources, the recipe's model, optimizer, precision, layout, compile and
    losses)."""
    import json

    from ..bench.train import bench_train as run_bench
    from ..recipe import load_recipe

    result = run_bench(load_recipe(recipe, override or []), device=device, steps=steps)
    mode = result["precision"] + (", compiled" if result["compile"] else "")
    each = f" of {result['accumulate']} batches" if result["accumulate"] > 1 else ""
    out.print(f"[bold]{result['recipe']}[/] on {result['device']} ({mode}): "
              f"emrun {result['emrun_step_ms']:.1f} ms/iteration{each}, bare loop "
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
        min=1, metavar="N", help="Timed forward passes per model-only measurement (twice for the "
        "model-alone rate: before and after the engine).")] = 15,
    handover_memory: Annotated[str | None, typer.Option(
        metavar="SIZE", help="As emrun infer --handover-memory: the partial sums each worker "
        "may hold, e.g. 20GiB (default: emrun infer's).")] = None,
    handover_host_memory: Annotated[str | None, typer.Option(
        metavar="SIZE", help="As emrun infer --handover-host-memory: host memory each worker "
        "may hold partial sums in beyond --handover-memory (default: none).")] = None,
    json_: JsonLine = False,
) -> None:
    """Engine output voxels/s on a synthetic volume against model-only forward throughput."""
    import json

    from ..bench.infer import bench_infer as run_bench
    from ..bench.infer import report_lines
    from ..recipe import load_recipe

    if compile_ is not None and not configs:  # it chooses what --configs searches, no more
        raise UserError("--compile/--no-compile says whether --configs searches "
                        "torch.compile: add --configs, or drop it")
    handover = None if handover_memory is None else parse_size(handover_memory,
                                                               "--handover-memory")
    host = 0 if handover_host_memory is None else parse_size(handover_host_memory,
                                                             "--handover-host-memory")
    result = run_bench(load_recipe(recipe, override or []).recipe, shape=shape, device=device,
                       repeats=repeats, no_model=no_model, block=block, workers=workers,
                       configs=configs, compile_=compile_, handover=handover,
                       handover_host=host)
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
        min=1, metavar="N", help="Worker counts to run (repeat; default 1 and 2).")] = None,
    threshold: Annotated[float, typer.Option(
        min=0.0, max=1.0, metavar="T",
        help="Agglomeration threshold, as emrun segment --threshold with --scheduler.")] = 0.5,
    agglomeration: Annotated[str, typer.Option(
        metavar="global|blockwise", help="As emrun segment --agglomeration.")] = "global",
    folder: Annotated[Path | None, typer.Option(
        metavar="DIR",
        help="Where to write the temporary volumes (default: the system's temp folder).")
    ] = None,
    json_: JsonLine = False,
) -> None:
    """Graph segmentation (fragments, region graph, agglomeration) throughput per core."""
    import json

    from ..bench.segment import bench_segment as run_bench
    from ..bench.segment import report_lines

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
        min=0, metavar="N",
        help="Loader worker processes (default: train.workers; 0: in-process).")] = None,
    samples: Annotated[int, typer.Option(min=1, metavar="N", help="Samples to time.")] = 50,
    json_: JsonLine = False,
) -> None:
    """Training-data throughput with the recipe's full augmentation stack and targets."""
    import json

    from ..bench.data import bench_data as run_bench
    from ..recipe import load_recipe
    from ..summary import zyx_text

    loaded = load_recipe(recipe, override or [])
    if not synthetic:  # the volumes as train checks them, located (one was named bare)
        from ..data.checks import check_data
        from ..recipe import RecipeError

        if problems := check_data(loaded)[1]:
            raise RecipeError(problems)
    workers = loaded.recipe.train.workers if workers is None else workers
    result = run_bench(loaded.recipe, synthetic=synthetic, workers=workers, samples=samples)
    loader = "in-process" if workers == 0 else f"{workers} worker{'s' if workers > 1 else ''}"
    out.print(f"[bold]{result['recipe']}[/]: patch {zyx_text(result['patch'])}, {loader}, "
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
    volume: Annotated[str, typer.Argument(
        metavar="VOLUME", help="Volume to measure, e.g. pred.zarr/affinity.")],
    chunks: Annotated[list[str] | None, typer.Option(
        "--chunks", metavar="C,Z,Y,X", help="Chunk shape to try ('C': all channels); "
        "repeatable (default: C,16,256,256 C,32,256,256 C,8,512,512 1,16,256,256).")] = None,
    codec: Annotated[list[str] | None, typer.Option(
        "--codec", metavar="NAME",
        help="Measure only this codec (a name from the table); repeatable.")] = None,
    passes: Annotated[int, typer.Option(min=1, metavar="N", help="Timed passes (median).")
                      ] = 3,
    sample_mb: Annotated[float, typer.Option(
        min=0.001, metavar="MB", help="MB of whole chunks timed one by one on one thread.")] = 32.0,
    max_mb: Annotated[float, typer.Option(
        min=0.001, metavar="MB", help="MB of the volume (its start) written through zarr.")
    ] = 256.0,
    workdir: Annotated[Path | None, typer.Option(
        metavar="DIR",
        help="Folder for the temporary arrays (default: the system's temp folder).")] = None,
    json_: JsonLine = False,
) -> None:
    """Compression ratio, one-thread encode/decode and zarr write/read speed of candidate
    codecs (blosc zstd/lz4/lz4hc, shuffles, zstd) and chunk shapes on a volume."""
    import json

    from ..bench.codecs import TABLE_HEADER, TABLE_NOTE, format_row
    from ..bench.codecs import bench_codecs as run_bench

    for option, value in (("--sample-mb", sample_mb), ("--max-mb", max_mb)):
        if not math.isfinite(value):  # inf passed the range check and failed as ours
            raise UserError(f"{option} {value:g}: give a finite size in MB")
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




