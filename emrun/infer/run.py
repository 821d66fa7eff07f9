"""`run_inference`: prepare a job, then run it with the scheduler asked for.

``local`` (the default) runs the blocks on this machine (``schedule``); ``daisy`` hands them to
daisy's blockwise scheduler (``daisy_scheduler``, imported only when asked for: daisy is an
optional dependency).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..devices import check_launch, daisy_package
from ..errors import UserError
from ..geometry import Roi, Zyx, zyx
from ..io import open_volume
from ..io.one_channel import single_channel
from ..paths import unwritable_folder
from ..recipe import LoadedRecipe, Problem, Recipe
from ..recipe.checks import cautions
from .job import Job, finish_job, prepare_job, release_job
from .schedule import (
    Progress,
    check_device,
    check_handover,
    run_local,
    stop_at_once,
    worker_slots,
)

Scheduler = Literal["local", "daisy"]

TRAINING_ONLY: tuple[tuple[str, ...], ...] = (("train",), ("data", "validation"))
"""Where the recipe's cautions that concern only training lie (the warm-up, the validation
cadence, how validation is scaled): a checkpoint's training is over, so infer does not say
them on every prediction."""


def inference_cautions(loaded: LoadedRecipe) -> list[str]:
    """The recipe's cautions that concern prediction (an absurd ``infer.stride``, tiny
    ``infer.chunks``, the intensity scale every input is read by), each located and worded
    as `emrun validate` and `emrun train` print them: infer predicted with them unsaid."""
    return [str(Problem(message, loaded.mark(path), path))
            for path, message in cautions(loaded.recipe)
            if not any(path[:len(key)] == key for key in TRAINING_ONLY)]


def run_inference(recipe: Recipe, checkpoint: Path, input_path: str, output: Path, *,
                  block: Zyx | None = None, device: str | None = None, tta: int | None = None,
                  resume: bool = False, mask_path: str | None = None,
                  workers: int | None = None, scheduler: Scheduler = "local",
                  launch: str | None = None, roi: Roi | None = None,
                  levels: int | None = None, handover: int | None = None,
                  handover_host: int = 0,
                  on_block: Callable[[Progress], None] | None = None) -> Progress:
    """Predict ``input_path`` (or its box ``roi``) into ``output`` (one array
    per task), then build each output's ``levels``-level pyramid; returns the counts.
    ``handover``: bytes of partial sums each worker may hold (None: the default,
    `handover_budget`), ``handover_host``: and beyond them in host memory. ``output`` is
    held against other emrun processes meanwhile (`prepare_job`)."""
    job, slots = _checked_job(recipe, checkpoint, input_path, output, block=block,
                              device=device, tta=tta, resume=resume, mask_path=mask_path,
                              workers=workers, scheduler=scheduler, launch=launch, roi=roi,
                              levels=levels, handover=handover,
                              handover_host=handover_host)
    try:
        if scheduler == "daisy":
            from .daisy_scheduler import run_daisy

            progress = run_daisy(job, device or "auto", workers or 1, launch=launch,
                                 on_block=on_block)
        else:
            progress = run_local(job, slots, on_block=on_block)
        with stop_at_once(progress):
            finish_job(job)
    finally:
        release_job(job)
    return progress


@dataclass(frozen=True)
class InferencePlan:
    """What `run_inference` would do with the same arguments (`emrun infer --plan`)."""

    job: Job
    pending: int  # blocks without a done-marker
    device: str
    units: Progress  # the units planned (`Progress.plan`), no block done
    owned: int  # the patches the pending blocks own (the lattice's, on a new output)
    input_shape: Zyx  # the input's (the job's layout has the box's: `--roi`)


def plan_inference(recipe: Recipe, checkpoint: Path, input_path: str, output: Path, *,
                   block: Zyx | None = None, device: str | None = None,
                   tta: int | None = None, resume: bool = False,
                   mask_path: str | None = None, workers: int | None = None,
                   scheduler: Scheduler = "local", launch: str | None = None,
                   roi: Roi | None = None, levels: int | None = None,
                   handover: int | None = None, handover_host: int = 0) -> InferencePlan:
    """`run_inference`'s checks and plan, with nothing created, held or predicted: the
    layout, the blocks left, the units and the patches they predict again."""
    job, slots = _checked_job(recipe, checkpoint, input_path, output, block=block,
                              device=device, tta=tta, resume=resume, mask_path=mask_path,
                              workers=workers, scheduler=scheduler, launch=launch, roi=roi,
                              levels=levels, handover=handover,
                              handover_host=handover_host, plan_only=True)
    if (stopped := unwritable_folder(output)) is not None:  # the run's first write would fail
        raise UserError(f"{output}: cannot write a store there ({stopped} is not writable by "
                        "this user)")
    where, count = (slots[0][0], len(slots)) if slots else (device or "auto", workers or 1)
    units = Progress(total=len(job.layout.block_grid()))
    units.plan(job, count, where)
    if where == "auto":  # daisy's workers resolve it where they run; the budget, as here
        where = f"auto ({'cuda' if torch.cuda.is_available() else 'cpu'} on this machine)"
    pending = job.pending()
    owned = sum(map(job.layout.owned_count, pending))
    shape = zyx(single_channel(open_volume(job.input_path)).shape[-3:])
    return InferencePlan(job, len(pending), where, units, owned, shape)


def _checked_job(recipe: Recipe, checkpoint: Path, input_path: str, output: Path, *,
                 block: Zyx | None, device: str | None, tta: int | None, resume: bool,
                 mask_path: str | None, workers: int | None, scheduler: Scheduler,
                 launch: str | None, roi: Roi | None, levels: int | None,
                 handover: int | None, handover_host: int = 0, plan_only: bool = False
                 ) -> tuple[Job, list[tuple[str, int]]]:
    """The job and the local worker slots (none for daisy), every argument checked before
    any output exists (`prepare_job`; with ``plan_only`` none is made)."""
    if launch is not None and scheduler != "daisy":
        raise UserError("--launch is for --scheduler daisy (workers started by a command)")
    check_launch(launch)
    if scheduler == "daisy":
        daisy_package()  # missing: said before the output is made (its rerun was refused)
    # Devices are checked before any output exists; daisy workers resolve theirs where they
    # run (the scheduler's own machine, a login node say, may have no GPU at all).
    slots = worker_slots(device, workers) if scheduler == "local" else []
    on_cpu = check_device(device, workers).type == "cpu"
    here = len(slots) if scheduler == "local" else 1 if launch else workers or 1
    if not launch:  # launched workers hold theirs on machines this one cannot see
        check_handover(handover, device, here, handover_host)
    job = prepare_job(recipe, checkpoint, input_path, output, block=block, tta=tta,
                      resume=resume, mask_path=mask_path, roi=roi, levels=levels,
                      workers=here if on_cpu else 1,  # GPUs: in their own memory
                      handover=handover, handover_host=handover_host, plan_only=plan_only)
    return job, slots
