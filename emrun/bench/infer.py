"""`emrun bench infer`: the engine's end-to-end output voxels/s against the model alone.

The model-only rate is forward passes on the same patch size, batch and precision, with the
input already on the device. The engine is `emrun infer`'s block worker (reads ahead, writes
behind) timed from the first block to the last written, model loading excluded; its seconds
per stage tell whether the device or the IO bounds it. The engine has to predict every voxel
``overlap`` times (patch voxels x patches / output voxels), so its efficiency is
``engine_voxels_per_s * overlap / model_voxels_per_s`` (1.0: no time lost to reading,
blending, padding, quantising or writing).

Options add: ``no_model`` (a stand-in network that costs almost nothing, so the rate is the
engine's own: read, blend, quantise, compress, write), the patches predicted against the
lattice's (a patch that straddles unit borders is predicted once more per other unit),
``workers`` (the same volume through ``schedule.run_local`` with N worker processes) and
``configs`` (the model-only rate over batch size, memory format and torch.compile, with the
overrides that select the best).

This module runs the bench and reports it: it checks the options, generates the volume, times
the model, the engine, the worker processes and MONAI, and turns the times into the figures
and the lines printed. The parts live apart: the stand-in network in `standin`, the checks
that the run fits the machine in `room`, the model-only timing in `model_rate` and the
configuration search in `infer_configs`.
"""

from __future__ import annotations

import math
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..devices import available_memory, gpu_memory
from ..errors import UserError
from ..geometry import Zyx, zyx
from ..infer import schedule
from ..infer.engine import Engine
from ..infer.job import Job, check_block, check_memory, prepare_job
from ..infer.plan import Layout, choose_chunks_and_block
from ..infer.worker import BlockWorker
from ..io.checkpoint import save_atomic
from ..io.write import write_volume
from ..models import build_model
from ..recipe import Recipe
from ..synth import synthesize
from . import bench_device
from .infer_configs import search_configs
from .model_rate import model_times, sync
from .room import check_room, estimate_needs, free_device_memory, size_text
from .standin import StandIn, stand_in

TILE = (64, 512, 512)
"""Largest synthetic block generated; bigger volumes repeat it, mirrored (generation costs
seconds per 10 M voxels, and the bench is about the engine, not the data)."""


def synthetic_tile(shape: Zyx) -> Zyx:
    """The block `synthetic_image` generates for a volume of ``shape``."""
    return zyx(min(n, t) for n, t in zip(shape, TILE, strict=True))


def synthetic_image(shape: tuple[int, int, int]) -> np.ndarray:
    """A synthetic EM-like volume of ``shape``: one generated block of at most ``TILE``,
    mirrored at its faces to fill the rest (no seams of constant value)."""
    tile = synthetic_tile(shape)
    image = synthesize(tile, 0).image
    if tile == shape:
        return image
    pad = [(0, n - t) for n, t in zip(shape, tile, strict=True)]
    return np.pad(image, pad, mode="symmetric")


# --- checking what the user asked for, before generating anything ---------------------------


def check_zyx(option: str, zyx: Zyx) -> None:
    """Sizes must be positive: zero or negative voxels is a typo, not a volume."""
    if any(n < 1 for n in zyx):
        raise UserError(f"{option} {' '.join(str(n) for n in zyx)}: give three sizes (z y x) "
                        "of at least 1 voxel each")


def worker_counts(values: list[str] | None) -> list[int]:
    """``--workers`` values (repeated and/or comma lists) as sorted distinct counts, 1 included
    (the baseline of every speed-up); [] when not given."""
    if not values:
        return []
    counts = set()
    for text in ",".join(values).split(","):
        try:
            count = int(text.strip())
        except ValueError:
            count = 0
        if count < 1:
            raise UserError(f"--workers {','.join(values)}: give worker counts of at least 1, "
                            "e.g. --workers 1,2,4")
        counts.add(count)
    return sorted(counts | {1})


def bench_layout(recipe: Recipe, shape: Zyx, block: Zyx | None, checked: bool = True
                 ) -> Layout:
    """The block layout `emrun infer` would use for ``shape`` and ``block``; ``checked``:
    refused as `emrun infer` refuses it (a block under one patch stride, too many blocks)."""
    patch = recipe.infer_patch()
    stride = recipe.infer.resolved_stride(patch)
    chunks, chosen = choose_chunks_and_block(shape, patch, stride, recipe.infer.chunks,
                                             block or recipe.infer.block)
    if checked:
        check_block(chosen, stride, shape)
    try:
        return Layout(shape, patch, stride, chunks, chosen)
    except ValueError as exc:
        raise UserError(f"--block {' '.join(str(n) for n in chosen)}: {exc}") from None


def block_count(layout: Layout) -> int:
    return math.prod(math.ceil(n / b) for n, b in zip(layout.shape, layout.block, strict=True))


def default_shape(recipe: Recipe, block: Zyx | None, workers: int) -> Zyx:
    """Three patches per axis; with several workers, deep enough in z for two blocks per worker
    (with fewer blocks than workers some workers idle and the speed-up means nothing)."""
    patch = recipe.infer_patch()
    shape: Zyx = (patch[0] * 3, patch[1] * 3, patch[2] * 3)
    if workers <= 1:
        return shape
    # only its block's depth counts (the volume is made of that, checked): not checked here
    deep = bench_layout(recipe, (10**6, shape[1], shape[2]), block, checked=False)
    per_slab = math.ceil(shape[1] / deep.block[1]) * math.ceil(shape[2] / deep.block[2])
    slabs = math.ceil(2 * workers / per_slab)
    return (max(shape[0], slabs * deep.block[0]), shape[1], shape[2])


# --- MONAI's sliding window, for comparison --------------------------------------------------


def _monai_bytes(recipe: Recipe, shape: Zyx) -> int:
    """MONAI's sliding window holds the volume, the outputs and a count map in float32 on the
    device (its importance map and padding come on top)."""
    return math.prod(shape) * 4 * (sum(recipe.head_channels().values()) + 2)


def _monai_rate(engine: Engine, image: np.ndarray) -> float | None:
    """MONAI's sliding-window output voxels/s on the same volume, or None without MONAI."""
    try:
        from monai.inferers import sliding_window_inference
    except ImportError:
        return None
    overlap = [1 - s / p for s, p in zip(engine.stride, engine.patch, strict=True)]
    volume = torch.from_numpy(image.astype(np.float32) / 255)[None, None].to(engine.device)

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        return torch.cat(list(engine._forward(batch).values()), dim=1)

    def run() -> None:
        sliding_window_inference(volume, engine.patch, engine.batch_size, predictor,
                                 overlap=overlap, mode="gaussian", sw_device=engine.device,
                                 device=engine.device)

    run()  # warm-up
    sync(engine.device)
    start = time.perf_counter()
    run()
    sync(engine.device)
    return image.size / (time.perf_counter() - start)


# --- the engine: one in-process worker, then N worker processes ------------------------------


@dataclass(frozen=True)
class EngineRun:
    """`emrun infer`'s worker after a run, its seconds, its units and the hand-over budget
    they were chosen for, and the device memory it took at most (None on a CPU)."""

    worker: BlockWorker
    seconds: float
    units: list[list[Zyx]]
    budget: int
    device_peak: int | None


def _engine_run(job: Job, device: torch.device, model: nn.Module | None) -> EngineRun:
    """`emrun infer`'s worker over every block, in the units `emrun infer` gives one worker;
    seconds from the first block read to the last written (building the worker and loading
    the model are not timed)."""
    worker = BlockWorker(job, device, model=model)
    units = schedule.job_units(job, job.pending(), 1, str(device))
    budget = schedule.handover_budget(job, str(device))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    worker.run_units(units, budget=budget)
    seconds = time.perf_counter() - started
    return EngineRun(worker, seconds, units, budget, device_peak(device))


def device_peak(device: torch.device) -> int | None:
    """Bytes the device held at most since its peak was last reset (None on a CPU): what
    the model, its batches and the partial sums took beside the hand-over budget."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


class Completions:
    """When each block was written, from the start of a run (start-up included)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.times: list[float] = []

    def mark(self, report: Any = None, *_: Any) -> None:
        """A block was written (called with a worker's or ``run_local``'s report; the
        latter's first, with the plan and no block done, is none)."""
        if getattr(report, "done", None) == len(self.times):
            return
        self.times.append(time.perf_counter() - self.started)


def _scaling(recipe: Recipe, root: Path, block: Zyx | None, device: torch.device,
             counts: list[int], no_model: bool, handover: int | None = None,
             handover_host: int = 0) -> list[dict[str, Any]]:
    """Output voxels/s with each count of local workers, each into a fresh output (removed
    after), over the wall time: worker start-up and model loading included, as `emrun infer
    --workers N` costs them on this volume; when the first block was written tells how much
    of it that start-up is."""
    rows = []
    for count in counts:
        output = root / f"out-{count}-workers.zarr"
        job = prepare_job(recipe, root / "model.pt", str(root / "in.zarr/image"), output,
                          block=block, handover=handover, handover_host=handover_host)
        slots = schedule.worker_slots(str(device), count)
        clock = Completions()
        progress = schedule.run_local(job, slots, on_block=clock.mark,
                                      model=stand_in if no_model else None)
        seconds = time.perf_counter() - clock.started
        shutil.rmtree(output)
        rate = math.prod(job.layout.shape) / seconds
        rows.append({"workers": count, "seconds": round(seconds, 3),
                     "first_block_seconds": round(clock.times[0], 3) if clock.times else None,
                     "voxels_per_s": round(rate, 1),
                     "voxels_per_s_per_core": round(rate / schedule.cpu_cores(), 1),
                     "predicted_patches": progress.patches,
                     # patches that straddle a border between two workers' units
                     "duplicate_fraction": round(
                         progress.patches / job.layout.patch_count() - 1, 4)})
    for row in rows:
        row["speedup"] = round(row["voxels_per_s"] / rows[0]["voxels_per_s"], 3)
    return rows


# --- the figures -----------------------------------------------------------------------------


MAIN_STAGES = {"predict": "predict", "read": "wait_read", "write": "wait_write"}
"""What bounds the rate, by what the main thread spends its time on: predicting (the device:
forward passes, blending, quantising), or waiting for a read or for a write slot."""


def stage_shares(seconds: dict[str, float], wall: float) -> dict[str, float]:
    """Each stage's seconds per second of engine wall time (reader and writer threads are two
    each: their shares may pass 1)."""
    return {stage: round(value / wall, 3) if wall > 0 else 0.0
            for stage, value in seconds.items()}


def bound_by(seconds: dict[str, float]) -> str:
    """The stage that bounds the rate: predict when the waits are small, else read or write,
    whichever the main thread waited for longest."""
    return max(MAIN_STAGES, key=lambda stage: seconds[MAIN_STAGES[stage]])


def bench_infer(recipe: Recipe, *, shape: Zyx | None = None, device: str | None = None,
                repeats: int = 15, no_model: bool = False, block: Zyx | None = None,
                workers: list[str] | None = None, configs: bool = False,
                compile_: bool | None = None, handover: int | None = None,
                handover_host: int = 0) -> dict[str, Any]:
    """The figures `emrun bench infer` reports; ``handover``: the hand-over budget, bytes
    (None: `emrun infer`'s default), ``handover_host``: host memory beside it."""
    dev = bench_device(device)
    standin, counts, shape = _checked(recipe, dev, shape, block, workers, no_model, configs)
    schedule.check_handover(handover, str(dev), max(counts, default=1), handover_host)
    torch.manual_seed(recipe.seed)
    model = build_model(recipe)
    model = model.to(torch.device("cpu") if no_model else dev).eval()
    engine = None if no_model else Engine(recipe, model, dev)
    with tempfile.TemporaryDirectory(prefix="emrun-bench-infer-") as name:
        root = Path(name)
        image = synthetic_image(shape)
        times = [] if engine is None else model_times(engine, image, repeats)
        write_volume(root / "in.zarr", "image", image)
        save_atomic(root / "model.pt", {"model": model.state_dict(), "iteration": 0})
        job = prepare_job(recipe, root / "model.pt", str(root / "in.zarr/image"),
                          root / "out.zarr", block=block, handover=handover,
                          handover_host=handover_host)
        run = _engine_run(job, dev, None if standin is None else standin.to(dev))
        if engine is not None:  # before the engine and after it: a drifting machine biases
            times += model_times(engine, image, repeats)  # neither
        # one output on disk at a time, as `check_room` counts: the worker runs write theirs
        shutil.rmtree(root / "out.zarr", ignore_errors=True)
        scaling = _scaling(recipe, root, block, dev, counts, no_model, handover,
                           handover_host) \
            if counts else None
        grid = search_configs(recipe, model, dev, image, _compile_axis(dev, compile_),
                              repeats) if configs else None
    notes = _notes(job.layout, counts, dev, scaling, grid)
    monai_rate = None if engine is None else _monai_if_room(recipe, engine, image, dev, notes)
    return _figures(recipe, dev, job, run, times, monai_rate, scaling, grid, notes, no_model)


def _checked(recipe: Recipe, device: torch.device, shape: Zyx | None, block: Zyx | None,
             workers: list[str] | None, no_model: bool, configs: bool
             ) -> tuple[StandIn | None, list[int], Zyx]:
    """Everything the user can get wrong, refused in one line before anything is generated:
    the stand-in (when asked for), the worker counts and the volume's shape (and its room)."""
    if no_model and configs:
        raise UserError("--configs times the model's forward pass; with --no-model there is "
                        "no model to time: drop one of them")
    standin = stand_in(recipe) if no_model else None
    counts = worker_counts(workers)
    for option, given in (("--shape", shape), ("--block", block)):
        if given is not None:
            check_zyx(option, given)
    shape = shape or default_shape(recipe, block, max(counts, default=1))
    layout = bench_layout(recipe, shape, block)
    check_memory(recipe, layout)  # as `emrun infer` would, once the input is generated
    needs = estimate_needs(recipe, layout, max(counts, default=1), device.type == "cuda",
                           tile=synthetic_tile(shape))
    check_room(needs, device, shape, Path(tempfile.gettempdir()))
    return standin, counts, shape


def _compile_axis(device: torch.device, compile_: bool | None) -> bool:
    """torch.compile is searched on CUDA unless --no-compile; on a CPU only with --compile
    (it needs a C++ compiler and minutes per config)."""
    return device.type == "cuda" if compile_ is None else compile_


def _monai_if_room(recipe: Recipe, engine: Engine, image: np.ndarray, device: torch.device,
                   notes: list[str]) -> float | None:
    """MONAI's rate, unless its in-memory sliding window would not fit (then a note)."""
    need = _monai_bytes(recipe, zyx(image.shape))
    free = free_device_memory(device)
    free = available_memory() if free is None else free
    if need > 0.8 * free:
        notes.append(f"MONAI skipped: its in-memory sliding window would need about "
                     f"{size_text(need)} on {device}, {size_text(free)} is free")
        return None
    return _monai_rate(engine, image)


def _notes(layout: Layout, counts: list[int], device: torch.device,
           scaling: list[dict[str, Any]] | None, grid: dict[str, Any] | None) -> list[str]:
    """What makes a figure less telling than it looks, in words."""
    notes = []
    blocks = block_count(layout)
    if blocks == 1:
        notes.append("one block: reading, predicting and writing cannot overlap (give a larger "
                     "--shape or a smaller --block to see the steady state)")
    if counts and blocks < 2 * max(counts):
        notes.append(f"{blocks} block(s) for up to {max(counts)} workers: workers wait for "
                     "blocks and the speed-up is bounded by them (give a larger --shape or a "
                     "smaller --block)")
    if scaling and any(r["first_block_seconds"] > 0.25 * r["seconds"] for r in scaling):
        notes.append("a worker run wrote its first block after more than a quarter of its "
                     "time (start-up, model loading and warm-up count there): a larger --shape "
                     "gives speed-ups closer to a long job's")
    if grid is not None and not grid["compile_measured"]:
        notes.append("torch.compile not searched" + (" (on a CPU it needs a C++ compiler and "
                     "minutes per config: add --compile)" if device.type == "cpu" else ""))
    best = None if grid is None else grid["best_config"]
    per_block = layout.patch_count() / blocks
    if best is not None and best["batch_size"] > per_block:
        notes.append(f"the best batch ({best['batch_size']}) is more than the patches a block "
                     f"holds (about {per_block:.0f}): the engine fills it only with larger "
                     "blocks (--block here, infer.block in a recipe)")
    return notes


def _figures(recipe: Recipe, device: torch.device, job: Job, run: EngineRun,
             times: list[float], monai_rate: float | None,
             scaling: list[dict[str, Any]] | None, grid: dict[str, Any] | None,
             notes: list[str], no_model: bool) -> dict[str, Any]:
    """The JSON `emrun bench infer --json` prints (model figures None with --no-model)."""
    layout, patch = job.layout, job.layout.patch
    worker, seconds = run.worker, run.seconds
    voxels = math.prod(layout.shape)
    lattice = layout.patch_count()
    overlap = lattice * math.prod(patch) / voxels
    engine_rate = voxels / seconds
    model_rate = None
    if times:
        model_rate = recipe.infer.batch_size * math.prod(patch) / statistics.median(times)
    predicted = worker.engine.predicted_patches
    cores = schedule.cpu_cores()
    return {
        "recipe": recipe.name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": recipe.infer.precision,
        "patch": list(patch), "stride": list(layout.stride),
        "batch_size": recipe.infer.batch_size,
        "volume": list(layout.shape), "block": list(layout.block),
        "blocks": block_count(layout),
        "tta": recipe.infer.tta,
        "overlap": round(overlap, 3),
        "no_model": no_model,
        "engine_voxels_per_s": round(engine_rate, 1),
        "cpu_cores": cores,
        "engine_voxels_per_s_per_core": round(engine_rate / cores, 1),
        "model_voxels_per_s": None if model_rate is None else round(model_rate, 1),
        "efficiency": None if model_rate is None else round(engine_rate * overlap / model_rate,
                                                            4),
        "engine_seconds": round(seconds, 3),
        "stage_seconds": {k: round(v, 3) for k, v in worker.seconds.items()},
        # from the rounded seconds, so that the JSON's figures agree with each other
        "stage_shares": stage_shares({k: round(v, 3) for k, v in worker.seconds.items()},
                                     round(seconds, 3)),
        "bound": bound_by(worker.seconds),
        "predicted_patches": predicted,
        "lattice_patches": lattice,
        "duplicate_fraction": round(predicted / lattice - 1, 4),
        "units": len(run.units),
        "handover_budget_bytes": run.budget,
        "handover_host_bytes": job.handover_host,
        "device_peak_bytes": run.device_peak,
        "device_memory_bytes": None if run.device_peak is None else
        gpu_memory(device),
        "monai_voxels_per_s": None if monai_rate is None else round(monai_rate, 1),
        "engine_vs_monai": None if monai_rate is None else round(engine_rate / monai_rate, 3),
        "workers": scaling,
        **(grid or {"configs": None, "best_config": None, "compile_measured": None}),
        "notes": notes,
    }


# --- the lines `emrun bench infer` prints ----------------------------------------------------


def mvox(rate: float) -> str:
    return f"{rate / 1e6:.3f} Mvoxel/s"


def report_lines(r: dict[str, Any]) -> list[str]:
    """The human summary of the figures, one fact per line."""
    head = f"{r['recipe']} on {r['device']} ({r['precision']}): "
    if r["no_model"]:
        lines = [head + f"engine alone (a stand-in for the model) {mvox(r['engine_voxels_per_s'])}"
                 f", {mvox(r['engine_voxels_per_s_per_core'])} per CPU core ({r['cpu_cores']} "
                 "cores): reading, blending, quantising, compressing and writing"]
    else:
        lines = [head + f"engine {mvox(r['engine_voxels_per_s'])}, model alone "
                 f"{mvox(r['model_voxels_per_s'])}, overlap {r['overlap']:.2f}x, efficiency "
                 f"{r['efficiency']:.2f}"]
    stages = r["stage_seconds"]
    blocks = f"{r['blocks']} block{'' if r['blocks'] == 1 else 's'}"
    lines.append(f"{blocks} in {r['engine_seconds']:.2f} s: predicting "
                 f"{stages['predict']:.2f} s, waiting for reads {stages['wait_read']:.2f} s and "
                 f"writes {stages['wait_write']:.2f} s (reader threads {stages['read']:.2f} s"
                 + (f", of which pinning {stages['pin']:.2f} s" if stages["pin"] else "")
                 + f", writer threads {stages['write']:.2f} s)")
    lines.append(_bound_line(r))
    lines.append(f"patches predicted {r['predicted_patches']:,} of {r['lattice_patches']:,} in "
                 f"the lattice: duplicates {100 * r['duplicate_fraction']:+.1f} % (predicted "
                 "more than once)")
    lines.append(_memory_line(r))
    lines += _scaling_lines(r["workers"]) + _config_lines(r)
    if not r["no_model"]:
        if r["monai_voxels_per_s"] is not None:
            lines.append(f"MONAI sliding_window_inference {mvox(r['monai_voxels_per_s'])} "
                         f"(engine / MONAI {r['engine_vs_monai']:.2f}x)")
        elif not any(n.startswith("MONAI") for n in r["notes"]):
            lines.append("MONAI is not installed: no sliding_window_inference comparison")
    return lines + [f"note: {n}" for n in r["notes"]]


def _memory_line(r: dict[str, Any]) -> str:
    """The units and their budget, and on a GPU its peak memory: a peak far below the
    device's memory says a larger hand-over budget would fit (fewer units, fewer patches
    predicted again on a volume larger than this one)."""
    units = f"{r['units']} unit{'' if r['units'] == 1 else 's'}"
    line = f"{units} of blocks for a hand-over budget of {size_text(r['handover_budget_bytes'])}"
    if r["handover_host_bytes"]:
        line += f" and {size_text(r['handover_host_bytes'])} of host memory"
    if r["device_peak_bytes"] is None:
        return line
    return (line + f"; device memory at most {size_text(r['device_peak_bytes'])} of "
            f"{size_text(r['device_memory_bytes'])}")


def _bound_line(r: dict[str, Any]) -> str:
    shares = r["stage_shares"]
    what = {"predict": "the device (predicting, blending, quantising)",
            "read": "reading the input", "write": "compressing and writing the outputs"}
    return (f"bound by {what[r['bound']]}: of the wall time, predicting "
            f"{100 * shares['predict']:.0f} %, waiting for reads {100 * shares['wait_read']:.0f}"
            f" %, for writes {100 * shares['wait_write']:.0f} %")


def _scaling_lines(rows: list[dict[str, Any]] | None) -> list[str]:
    if not rows:
        return []
    lines = ["local worker processes (wall time: start-up and model loading included; the "
             "first block written after):"]
    for row in rows:
        lines.append(f"  {row['workers']}: {mvox(row['voxels_per_s'])}, "
                     f"{mvox(row['voxels_per_s_per_core'])} per core, {row['speedup']:.2f}x "
                     f"the 1-worker rate ({row['seconds']:.2f} s; first block after "
                     f"{row['first_block_seconds']:.2f} s; duplicates "
                     f"{100 * row['duplicate_fraction']:+.1f} % at unit borders)")
    return lines


def _config_text(row: dict[str, Any]) -> str:
    layout = {None: "", True: ", channels_last", False: ", contiguous"}[row["channels_last"]]
    mode = "eager" if row["compile"] is None else f"compiled ({row['compile']})"
    return f"batch {row['batch_size']}{layout}, {mode}"


def _config_lines(r: dict[str, Any]) -> list[str]:
    if r["configs"] is None:
        return []
    lines = ["model alone by configuration:"]
    for row in r["configs"]:
        figure = mvox(row["voxels_per_s"]) if row["voxels_per_s"] else f"failed: {row['error']}"
        lines.append(f"  {_config_text(row)}: {figure}")
    best = r["best_config"]
    if best is not None:
        speedup = "" if best["speedup_vs_recipe"] is None else \
            f", {best['speedup_vs_recipe']:.2f}x the recipe's"
        use = " ".join(f"-o {o}" for o in best["overrides"]) or "the recipe as it is"
        lines.append(f"best: {_config_text(best)} {mvox(best['voxels_per_s'])}{speedup}; "
                     f"use: {use}")
    return lines
