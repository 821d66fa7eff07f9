"""The iteration-based multi-task trainer.

One iteration: ``train.accumulate`` batches (forward under the recipe's precision, the
weighted sum of task losses, backward), then gradient clipping, one optimizer step, the LR
schedule and the EMA. Every random stream (python, numpy, torch, the data stream position)
is saved with each checkpoint, so a resumed run continues bitwise-identically on a CPU with
``train.deterministic``. Only rank 0 writes logs and checkpoints.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import locks
from ..data.loader import (
    train_batches,
    unpack,
    unusable_validation_sources,
    validation_batches,
)
from ..devices import parse_device, require_visible
from ..errors import UserError
from ..infer.engine import ACTIVATIONS
from ..io.checkpoint import CheckpointError, checkpoint_of, load
from ..io.package import load_network
from ..losses import LossResult, total_loss
from ..models import build_model, weights_mismatch
from ..recipe import LoadedRecipe, Recipe
from ..recipe.errors import Problem, RecipeError
from ..registry import losses, segmenters
from ..subprocesses import catching_signals
from . import distributed, run_dir
from .background import BackgroundScorer, Pending
from .checkpoint import CheckpointDir, rng_state, set_rng_state
from .logging import RunLogger
from .optim import (
    EMA,
    adopt_recipe_settings,
    build_optimizer,
    build_scheduler,
    clip_gradients,
    lr_factor,
)
from .seg_validation import (
    affinity_task,
    predict_validation,
    score_validation,
    unscorable_sources,
)

MAX_NONFINITE_IN_A_ROW = 10
RESUMED_PARTS = ("model", "optimizer", "scheduler", "scaler", "iteration", "data", "rng")
"""What a checkpoint must hold for a run to continue from it exactly."""


@dataclass(frozen=True)
class TrainResult:
    """How a run ended."""

    iteration: int
    run_dir: Path
    interrupted: str | None = None  # "SIGINT" / "SIGTERM" when stopped by a signal
    nonfinite_steps: int = 0


class _Signals:
    """Turns SIGINT/SIGTERM into a flag checked between iterations (checkpoint, then exit):
    ``received`` is the last signal's name. Outside the main thread nothing is installed."""

    def __init__(self) -> None:
        self._catching = catching_signals()
        self._caught: list[str] = []

    @property
    def received(self) -> str | None:
        return self._caught[-1] if self._caught else None

    def __enter__(self) -> _Signals:
        self._caught = self._catching.__enter__()
        return self

    def __exit__(self, *exc: Any) -> bool | None:
        return self._catching.__exit__(*exc)


def _device(requested: str | None, world: distributed.World) -> torch.device:
    """The device asked for (checked: a typo, a missing GPU or a kind torch cannot train on
    here is the user's to fix), else a GPU when there is one. Under DDP each process trains
    on its own GPU, cuda:LOCAL_RANK: a plain ``--device cuda`` put every rank on one GPU."""
    if requested:
        device = parse_device(requested)
        if device.type == "cuda" and world.distributed:
            if device.index is not None:
                raise UserError(f"--device {requested}: under --gpus each process trains on "
                                "its own GPU (cuda:LOCAL_RANK); give --device cuda")
            device = torch.device("cuda", world.local_rank)
        require_visible(device, requested)
        return device
    if torch.cuda.is_available():
        if world.local_rank >= torch.cuda.device_count():
            raise UserError(f"--gpus: process {world.local_rank} of this machine has no GPU of "
                            f"its own ({torch.cuda.device_count()} visible); give --gpus at "
                            "most the number of GPUs")
        return torch.device("cuda", world.local_rank)
    return torch.device("cpu")


def plain_pointwise_strides(model: nn.Module) -> None:
    """Give 1x1x1 convolution weights the plain strides their gradients come with. Under
    channels_last_3d such a weight (out, in, 1, 1, 1) has strides (in, 1, in, in, in), the
    same memory order as the plain ones; DDP compared strides and warned "Grad strides do not
    match bucket view strides" on every rank."""
    for parameter in model.parameters():
        if parameter.dim() == 5 and tuple(parameter.shape[2:]) == (1, 1, 1):
            parameter.data = parameter.data.clone(memory_format=torch.contiguous_format)


def check_rank_devices(requested: str | None, processes: int) -> None:
    """Before torchrun starts ``processes`` ranks on this machine: the device each would
    take, checked here, once (a rank's refusal came back as torchrun's traceback, exit 1).
    Without a visible GPU and without ``--device``, the ranks fell back to the CPU without a
    word (``--gpus 8`` trained eight CPU processes): that is refused unless asked for."""
    if requested is None and processes > 1 and not torch.cuda.is_available():
        raise UserError(f"--gpus {processes}: no GPU is visible to torch {torch.__version__}; "
                        f"give --device cpu to train {processes} processes on the CPU")
    for rank in range(processes):
        _device(requested, distributed.World(rank=rank, local_rank=rank, size=processes))


def device_name(device: torch.device) -> str:
    """The device as a reader of a results table wants it: the GPU model, or the CPU's
    thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def configure_backends(recipe: Recipe, device: torch.device) -> None:
    """Deterministic kernels when the recipe asks for them, else cuDNN's autotuner on a GPU
    (the fastest convolution for the patch shape, picked once)."""
    if recipe.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


class Trainer:
    """Trains a loaded recipe into a run directory."""

    def __init__(self, loaded: LoadedRecipe, run_path: Path, *, resume: bool = False,
                 init_from: Path | None = None, device: str | None = None,
                 console: Any = None, stop_hint: str = "continue with --resume") -> None:
        """Set up in order: device, seeded model, run directory (and the checkpoint to
        resume), optimisation, counters, restored state, then the compiled/distributed wrapper.

        ``stop_hint``: what the line logged on SIGINT/SIGTERM tells the user to do (a command
        that wraps training and cannot resume says otherwise)."""
        self.loaded = loaded
        self.stop_hint = stop_hint
        self.recipe: Recipe = loaded.recipe
        self.train = self.recipe.train
        self.run_path = run_path
        self.resume = resume
        self._resumed_from: Path | None = None
        self.console = console
        self.init_iteration: int | None = None  # the iteration of the --init-from weights
        self._choose_device(device)
        self.init_from = _weights_file(init_from)
        seed_everything(self.recipe.seed)  # identical initial weights on every rank
        self._build_model(self.init_from)  # weights that do not fit: refused before the folder
        if init_from is not None and self.init_from != Path(init_from):  # a run directory
            self._say(f"--init-from {init_from}: starting from its "
                      f"{self.init_from.relative_to(init_from).as_posix()} (iteration "
                      f"{self.init_iteration})")
        self._check_validation_sources()
        held_before = locks.held(run_path)
        try:
            checkpoint = self._checkpoint_to_resume()  # holds the run directory (rank 0)
            self._build_optimisation()
            self._start_counters()
            if checkpoint is not None:
                self._restore(checkpoint)
            self._wrap_model()
        except BaseException:  # a refused resume (the model changed) kept it held, and
            if not held_before:  # left a lock file in a folder that had none
                locks.release(run_path)
            raise

    # -- set-up -------------------------------------------------------------------------

    def _choose_device(self, device: str | None) -> None:
        """The device and the distributed world; backends set for it; a segmenter whose
        package is missing fails now, not hours on at the first validation."""
        self.world = distributed.setup(_device(device, distributed.World()).type)
        self.device = _device(device, self.world)
        configure_backends(self.recipe, self.device)
        if self.train.validate_every and self.train.validate_segmentation and \
                affinity_task(self.recipe) is not None:
            segmenters.build(self.recipe.segment)

    def _build_model(self, init_from: Path | None) -> None:
        self.heads = self.recipe.head_channels()
        self.model: nn.Module = build_model(self.recipe)
        self.model.to(self.device)
        if self.train.channels_last:
            self.model.to(memory_format=torch.channels_last_3d)
            plain_pointwise_strides(self.model)
        if init_from is not None:
            self._load_weights(init_from)

    def _check_validation_sources(self) -> None:
        """Refuse, before the run directory and the first step, a validation source the
        first validation would stop on (no labels; nothing labelled to score): that stopped
        the run at iteration validate_every, before the checkpoint of that iteration."""
        train = self.train
        if not (self.recipe.data.validation and train.validate_every and
                train.validate_every <= train.iterations):
            return
        found = unusable_validation_sources(self.recipe)
        if train.validate_segmentation and not found:
            found = unscorable_sources(self.recipe)
        if found:
            raise RecipeError([Problem(
                f"{why} (the first validation, at iteration {train.validate_every}, would "
                "stop the run)",
                self.loaded.mark(("data", "validation", name)), ("data", "validation", name))
                for name, why in found])

    def _build_optimisation(self) -> None:
        """Optimizer, schedule, loss scaler, EMA and the tasks' losses and weights."""
        self.optimizer = build_optimizer(self.train.optimizer, self.model.parameters())
        self.scheduler = build_scheduler(self.train.schedule, self.optimizer, self.train.iterations)
        # on a CPU too: without it fp16 autocast's small gradients underflow to 0
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=self.train.precision == "fp16")
        self.ema = EMA(self.model, self.train.ema) if self.train.ema else None
        self.losses = {name: losses.build(task.loss, target=task.target)
                       for name, task in self.recipe.tasks.items()}
        self.scorers = {name: losses.build(without_margins(task.loss), target=task.target)
                        for name, task in self.recipe.tasks.items()}
        self.weights = {name: task.weight for name, task in self.recipe.tasks.items()}
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            self.train.precision)

    def _start_counters(self) -> None:
        """A new run's counters; `_restore` replaces them on resumption."""
        self.iteration = 0
        self.batches_done = 0
        self.nonfinite = 0
        self.last_rate = float(self.optimizer.param_groups[0]["lr"])  # logged: the rate of
        # the last update made
        self.best: float | None = None
        self.best_by: str | None = None  # the figure best is of: arand or loss/total
        self.train_seconds = 0.0  # wall time in fit() over every session of this run
        self.devices: list[str] = []  # the devices that trained it, in order of first use
        self._clock: float | None = None
        # the per-task loss sums since the last log line and how many iterations they hold:
        # checkpointed, so the first line after a resumption averages what an uninterrupted
        # run's would
        self._window: dict[str, torch.Tensor] = {}
        self._window_count = 0

    def _wrap_model(self) -> None:
        """The module the steps call: compiled and/or distributed around the model (the
        model itself stays what checkpoints save)."""
        self.forward_model: nn.Module = self.model
        if self.train.compile:
            self.forward_model = torch.compile(self.model)  # type: ignore[assignment]
        if self.world.distributed:
            self.forward_model = nn.parallel.DistributedDataParallel(
                self.forward_model, device_ids=[self.device.index] if self.device.type == "cuda"
                else None)

    def _checkpoint_to_resume(self) -> dict[str, Any] | None:
        if self.world.main and run_dir.prepare(self.run_path, self.resume):
            self._say(f"{self.run_path}: a previous start saved no checkpoint; starting anew")
        if self.world.distributed:
            torch.distributed.barrier()
        self.checkpoints = CheckpointDir(self.run_path / "checkpoints", self.train.keep_checkpoints)
        if not self.resume:
            return None
        last = self.checkpoints.newest()
        if last is None:  # killed before its first checkpoint: nothing to lose by starting
            self._start_again()
            return None
        state = self._load_to_resume(last)
        run_dir.check_resumable(state.get("recipe", ""), self.recipe, last, self.run_path)
        self._resumed_from = last
        self._say_when_not_last(last, state)
        return state

    def _say_when_not_last(self, chosen: Path, state: dict[str, Any]) -> None:
        """Resuming from a numbered checkpoint above last.pt is right after a kill between
        the two saves, and surprising after last.pt was replaced by hand to go back: say
        which was taken and how to go back instead."""
        last = self.checkpoints.last()
        if last is None or chosen == last:
            return
        try:
            held = int(load(last).get("iteration", -1))
        except (CheckpointError, TypeError, ValueError):
            held = -1
        before = f"iteration {held}" if held >= 0 else "a checkpoint that cannot be read"
        self._say(f"resuming from {chosen.name} (iteration {state.get('iteration', '?')}), "
                  f"newer than last.pt ({before}): a run stopped between saving the two "
                  f"leaves this; to go back to an earlier checkpoint instead, move the later "
                  f"iter_N.pt files out of {chosen.parent}")

    def _start_again(self) -> None:
        """A run stopped before its first checkpoint starts from the beginning: from the
        ``--init-from`` weights its start was given, when it was given some (the resumed
        run used to train a fine-tuning run from random weights, saying only that it
        started again)."""
        weights = run_dir.init_weights(self.run_path)
        begin = f"{self.run_path}: no checkpoint to resume from (the run stopped before its " \
                "first); starting it from the beginning"
        if weights is None:
            self._say(begin)
            return
        try:
            self._load_weights(weights)
        except CheckpointError as exc:
            raise UserError(f"{self.run_path}: the run began from --init-from {weights} and "
                            f"stopped before its first checkpoint, and those weights cannot "
                            f"be read now ({exc}); start it again with --init-from and "
                            "without --resume") from None
        self.init_from = weights
        self._say(f"{begin}, from the weights of its --init-from {weights}")

    def _load_to_resume(self, path: Path) -> dict[str, Any]:
        """The checkpoint to continue from; one that cannot be read is refused, naming the
        newest one that can and what to move aside to resume from it."""
        try:
            return load(path)
        except CheckpointError as exc:
            instead = self.checkpoints.readable_instead(path)
            if instead is None:
                raise
            older, blocking = instead
            moved = " and ".join(p.name for p in blocking)
            raise CheckpointError(f"{exc}; {older.name} can be read: move {moved} out of "
                                  f"{older.parent} to resume from it") from None

    def _say(self, text: str) -> None:
        """A line for the user on the console (stderr when there is none)."""
        if not self.world.main:
            return
        if self.console is not None:
            self.console.print(f"note: {text}", markup=False, highlight=False)
        else:
            print(f"note: {text}", file=sys.stderr)

    def _load_weights(self, path: Path) -> None:
        """Fine-tuning: the weights of a checkpoint or a model package, nothing else."""
        state = load_network(path)
        self.init_iteration = _iteration_or_none(state.get("iteration"))
        if (why := weights_mismatch(self.model, state.get("model"))) is not None:
            raise UserError(f"--init-from {path}: its weights do not fit this recipe's model "
                            f"and tasks (tensors: {why})")
        try:
            self.model.load_state_dict(state["model"])
        except (RuntimeError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise UserError(f"--init-from {path}: its weights do not fit this recipe's model "
                            f"and tasks ({first})") from None

    def _restore(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; a checkpoint that lacks a part or holds a malformed one
        is refused naming the part (it was edited, or written by something else)."""
        path = self._resumed_from
        missing = [key for key in RESUMED_PARTS if key not in state]
        if missing:
            raise CheckpointError(f"{path}: cannot resume from it: it has no "
                                  f"{', '.join(missing)} (emrun's checkpoints hold "
                                  f"{', '.join(RESUMED_PARTS)})")
        steps: list[tuple[str, Callable[[], None]]] = [
            ("model", lambda: self.model.load_state_dict(state["model"])),
            ("optimizer", lambda: self.optimizer.load_state_dict(state["optimizer"])),
            ("scheduler", lambda: self.scheduler.load_state_dict(state["scheduler"])),
            ("scaler", lambda: self._restore_scaler(state["scaler"])),
            ("ema", lambda: self._restore_ema(state.get("ema"))),
            ("counters", lambda: self._restore_counters(state)),
            ("rng", lambda: set_rng_state(state["rng"])),
        ]
        for part, restore in steps:
            try:
                restore()
            except (KeyError, TypeError, ValueError, AttributeError, IndexError,
                    RuntimeError) as exc:
                detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() \
                    else type(exc).__name__
                raise CheckpointError(f"{path}: cannot resume from it: its {part} state is "
                                      f"malformed ({detail})") from None
        self._adopt_changed_settings(state["recipe"])

    def _adopt_changed_settings(self, saved_recipe: str) -> None:
        """Where the recipe's optimizer settings, schedule or iterations changed since the
        checkpoint (a lower rate to continue with, a longer run), they apply from here on,
        and the user is told; otherwise the resumption is exact."""
        others = run_dir.other_changes(saved_recipe, self.recipe)
        if others:
            self._say(f"resuming at iteration {self.iteration} with the recipe's changed "
                      f"{'; '.join(others)}: applied from here on, so the run no longer "
                      "continues as it began")
        changes = run_dir.changed_settings(saved_recipe, self.recipe)
        if not changes:
            return
        before = self.optimizer.param_groups[0]["lr"]
        adopt_recipe_settings(self.optimizer, self.scheduler,
                              lr_factor(self.train.schedule, self.train.iterations))
        after = self.optimizer.param_groups[0]["lr"]
        self._say(f"resuming at iteration {self.iteration} with the recipe's "
                  f"{'; '.join(changes)} (learning rate {before:.3g} -> {after:.3g})")

    def _restore_ema(self, saved: dict[str, Any] | None) -> None:
        """The checkpoint's averages; an EMA the recipe turns on only now starts from the
        resumed weights (it was made from the initial, random ones, and validation, best.pt
        and exports took a mostly untrained model)."""
        if self.ema is None:
            return
        if saved is None:
            self.ema = EMA(self.model, self.ema.decay)
        else:
            self.ema.load_state_dict(saved)

    def _restore_scaler(self, saved: dict[str, Any]) -> None:
        """The loss scaler's state; a run saved without one (fp32, bf16) and resumed in fp16
        starts a fresh one (torch refuses to load the empty state a disabled scaler saves)."""
        if saved or not self.scaler.is_enabled():
            self.scaler.load_state_dict(saved)

    def _restore_counters(self, state: dict[str, Any]) -> None:
        self.iteration = int(state["iteration"])
        self.batches_done = int(state["data"]["batches"])
        self.nonfinite = int(state.get("nonfinite", 0))
        best = state.get("best")
        self.best = None if best is None else float(best)
        self.best_by = state.get("best_by")  # absent before it was kept: taken as comparable
        self.train_seconds = float(state.get("train_seconds", 0.0))
        devices = state.get("devices", [])
        if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
            raise TypeError(f"devices is {type(devices).__name__}, not a list of names")
        self.devices = list(devices)
        processes = state.get("processes")  # absent in checkpoints written before it was kept
        if isinstance(processes, int) and processes != self.world.size:
            self._say(f"resuming at iteration {self.iteration} with {self.world.size} "
                      f"process{'es' if self.world.size != 1 else ''} where the run had "
                      f"{processes}: each process's data stream and the effective batch "
                      f"(train.batch_size x processes) differ from here on, so the run no "
                      "longer continues as it began")
        window = state.get("log_window")  # absent in checkpoints written before it was kept
        if window is not None:
            self._window_count = int(window["iterations"])
            self._window = {name: window["losses"][name].to(self.device)
                            for name in window["losses"] if name in self.losses}
        self.best = self._best_recorded(self.best)

    def _best_recorded(self, saved: float | None) -> float | None:
        """The best validation figure so far: the checkpoint's, or best.pt's when lower. A
        validation scored in the background lands after its iteration's checkpoint, so a run
        killed before its next checkpoint resumed without it and let a worse validation
        replace best.pt. A best.pt of an iteration past the checkpoint is of the attempt the
        resumption abandons: its figure is on no curve the run keeps, and does not count."""
        path = self.checkpoints.best_path
        if not path.is_file():
            return saved
        try:
            best_pt = load(path)
        except CheckpointError as exc:
            self._say(f"{exc}; the next validation's figures replace it")
            return saved
        recorded, recorded_by = best_pt.get("best"), best_pt.get("best_by")
        if not isinstance(recorded, (int, float)) or isinstance(recorded, bool) or \
                not math.isfinite(recorded):
            return saved
        at = best_pt.get("iteration")
        if isinstance(at, int) and at > self.iteration:  # the stopped attempt's, past this
            self._say(f"best.pt holds iteration {at} of the attempt stopped after the "  # point
                      f"checkpoint resumed from ({self.iteration}): events.jsonl is cut back "
                      "to here, and the resumed run's validations replace it when they beat "
                      "the figures up to here")
            return saved
        if saved is None:
            self.best_by = recorded_by
            return float(recorded)
        if None not in (recorded_by, self.best_by) and recorded_by != self.best_by:
            return saved  # best.pt is of another figure: the checkpoint's own kind wins
        return min(saved, float(recorded))

    def state(self) -> dict[str, Any]:
        """Everything needed to continue exactly where this run is."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "iteration": self.iteration,
            "data": {"batches": self.batches_done},
            "rng": rng_state(),
            "nonfinite": self.nonfinite,
            "best": self.best,
            "best_by": self.best_by,
            "train_seconds": self.seconds(),
            "devices": self.devices,
            "processes": self.world.size,
            "log_window": {"iterations": self._window_count,
                           "losses": {name: value.detach().cpu()
                                      for name, value in self._window.items()}},
            "recipe": run_dir.recipe_text(self.recipe),
        }

    def seconds(self) -> float:
        """Wall time spent training this run so far, earlier sessions included (time after
        a session's last checkpoint is lost with it, and counted again when redone)."""
        running = 0.0 if self._clock is None else time.perf_counter() - self._clock
        return self.train_seconds + running

    # -- one iteration --------------------------------------------------------------------

    def step(self, batches: Iterator[dict[str, Any]]) -> dict[str, Any] | None:
        """One optimizer step over ``train.accumulate`` batches; None when it was skipped
        because a loss or the gradient was not finite. Returns the detached per-task losses
        and the batch.

        Every batch is backpropagated, a non-finite loss too, and the ranks agree on the
        skip: under DDP a rank that stopped short of its backward left the others waiting
        in theirs (with batch norm, a hang), or stepped while the others did not."""
        self.model.train()
        accumulate = self.train.accumulate
        kept = [b.detach().clone() for b in self.model.buffers()]  # batch norm's statistics
        sums: dict[str, torch.Tensor] = {}
        finite = True
        batch: dict[str, Any] = {}
        for k in range(accumulate):
            batch = unpack(next(batches), self.device)
            self.batches_done += 1
            with self._gradients_kept_local(last=k == accumulate - 1):
                with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                    enabled=self.autocast_dtype is not None):
                    outputs = self.forward_model(batch["image"])
                    results = {name: fn(outputs[name], batch["target"][name],
                                        batch["mask"][name])
                               for name, fn in self.losses.items()}
                loss = total_loss(results, self.weights) / accumulate
                finite = finite and bool(torch.isfinite(loss))
                self.scaler.scale(loss).backward()
            for name, result in results.items():
                sums[name] = sums.get(name, 0.0) + result.loss.detach() / accumulate
            batch["outputs"] = outputs
        if distributed.any_rank(not finite, self.world, self.device):
            return self._skipped(kept)
        self.scaler.unscale_(self.optimizer)
        norm = clip_gradients(self.model, self.train.grad_clip)
        if not self.scaler.is_enabled() and not self._finite_gradients(norm):
            return self._skipped(kept)  # the same on every rank (reduced)
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if scale is not None and self.scaler.get_scale() < scale:  # inf or NaN gradients:
            return self._skipped(kept)  # the scaler skipped the step (and lowered its scale)
        self.optimizer.zero_grad(set_to_none=True)
        self.last_rate = float(self.optimizer.param_groups[0]["lr"])  # before it moves on
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return {"losses": sums, "batch": batch}

    def _skipped(self, kept: list[torch.Tensor]) -> None:
        """A step skipped (non-finite loss or gradients): no gradient kept, and the buffers
        put back as they were before its forward passes. Batch norm's running statistics
        took the batch in (NaN with it), kept NaN by their running average, and the eval
        mode of validation, best.pt and exports gave NaN while training went on."""
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buffer, before in zip(self.model.buffers(), kept, strict=True):
                buffer.copy_(before)
        return None

    def _gradients_kept_local(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        """Under DDP, every batch but an iteration's last keeps its gradients on its rank
        (``no_sync``): the last backward all-reduces the accumulated sums once, instead of
        one all-reduce per batch (the same gradients: the mean of sums is the sum of means)."""
        if last or not isinstance(self.forward_model, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.forward_model.no_sync()

    def _finite_gradients(self, norm: float | None) -> bool:
        """Whether the gradients' norm (``clip_gradients``', or computed here) is finite: a
        finite loss can have inf or NaN gradients (an overflow in the backward pass), and
        stepping with them made every weight NaN, saved in the next checkpoint as a good one.
        (A GradScaler skips such steps itself: `step` tells them by its lowered scale.)"""
        if norm is None:
            norms = [p.grad.norm() for p in self.model.parameters() if p.grad is not None]
            norm = float(torch.stack(norms).norm()) if norms else 0.0
        return math.isfinite(norm)

    # -- the loop ---------------------------------------------------------------------------

    def fit(self, batches: Iterator[dict[str, Any]] | None = None) -> TrainResult:
        """Train until ``train.iterations``, a signal, or too many non-finite losses."""
        finished = self.iteration >= self.train.iterations  # e.g. a resumed, finished run
        if self.world.main and not (finished and self.iteration):  # a session that trains
            # nothing records none: its recipe (a lowered train.iterations) replaced the run's
            damaged = run_dir.write_recipe_and_provenance(
                self.run_path, self.recipe, self.loaded.path, self.iteration,
                init_from=self.init_from, init_iteration=self.init_iteration)
            if damaged is not None:
                self._say(damaged)
        owned = batches is None  # the stream made here is closed here, however fit ends
        if batches is None:  # a finished run starts no loader workers
            batches = iter(()) if finished else train_batches(
                self.recipe, rank=self.world.rank, start=self.batches_done)
        logger = RunLogger(self.run_path, total=self.train.iterations, enabled=self.world.main,
                           console=self.console, start=self.iteration)
        voxels = self.train.batch_size * math.prod(self.train.patch) * self.train.accumulate
        if not finished and device_name(self.device) not in self.devices:
            self.devices.append(device_name(self.device))  # only devices that trained it
        self._clock = time.perf_counter()
        in_a_row = 0
        window_start, window_iters = time.perf_counter(), 0
        self.scorer = BackgroundScorer()
        first = True  # an out-of-memory error in this process's first step is the recipe's
        try:
            with _Signals() as signals:
                while self.iteration < self.train.iterations and \
                        self._stop(signals) is None:
                    try:
                        result = self.step(batches)
                    except torch.OutOfMemoryError as exc:
                        if not first:
                            raise
                        raise RecipeError([Problem(
                            out_of_memory(exc, self.device, self.train.batch_size,
                                          self.train.patch),
                            self.loaded.mark(("train", "batch_size")),
                            ("train", "batch_size"))]) from None
                    first = False
                    if result is None:
                        self.nonfinite += 1
                        in_a_row += 1
                        logger.message(f"iteration {self.iteration + 1}: the loss or its "
                                       f"gradient is not finite; step skipped ({in_a_row} in "
                                       "a row)")
                        if in_a_row >= MAX_NONFINITE_IN_A_ROW:
                            raise UserError(self._nonfinite_stop(in_a_row))
                        continue
                    in_a_row = 0
                    self.iteration += 1
                    window_iters += 1
                    self._window_count += 1
                    for name, value in result["losses"].items():
                        self._window[name] = self._window.get(name, 0.0) + value
                    if self.iteration % self.train.log_every == 0 or \
                            self.iteration == self.train.iterations:
                        elapsed = time.perf_counter() - window_start
                        self._log(logger, window_iters, elapsed, voxels)
                        self._window, self._window_count, window_iters = {}, 0, 0
                        window_start = time.perf_counter()
                    if self.train.image_every and self.iteration % self.train.image_every == 0:
                        self._images(logger, result["batch"])
                    paused = time.perf_counter()
                    for scored in self.scorer.finished():
                        self._record(logger, scored)
                    if self.train.validate_every and \
                            self.iteration % self.train.validate_every == 0 and \
                            self._stop(signals) is None:  # a stop does not wait for scores
                        self._validate(logger)
                    if self.iteration == self.train.iterations:  # the last checkpoint knows
                        for scored in self.scorer.drain():  # every validation's score
                            self._record(logger, scored)
                    if self.iteration % self.train.checkpoint_every == 0 or \
                            self.iteration == self.train.iterations:
                        self._checkpoint(logger)
                    pause = time.perf_counter() - paused  # not training: out of the rates
                    window_start += pause
                    logger.exclude(pause)
                if (stopped := self._stop(signals)) is not None:
                    self._record_finished(logger)  # a score already in is kept
                    if (busy := self.scorer.busy) is not None:
                        logger.message(f"the validation of iteration {busy.iteration} was "
                                       "still being scored; it is not recorded")
                    self.scorer.close()
                    self._checkpoint(logger)
                    logger.message(f"{stopped}: checkpoint written at iteration "
                                   f"{self.iteration}; {self.stop_hint}")
                distributed.finish_together(self.world)
                return TrainResult(self.iteration, self.run_path, stopped, self.nonfinite)
        finally:
            if owned and hasattr(batches, "close"):
                batches.close()  # stops the loader's workers
            self.scorer.close()
            self.train_seconds, self._clock = self.seconds(), None
            try:
                logger.close()  # may raise what a full disk did to its last writes
            finally:
                self._leave_group()
                locks.release(self.run_path)

    def _leave_group(self) -> None:
        """Under DDP, let go of the process group with every reference to it (DDP's
        wrapper holds one), so that its threads end here rather than at the interpreter's
        exit, where a gloo thread still letting go of a finished all-reduce's tensors
        aborted the rank ("terminate called without an active exception") and torchrun
        failed a finished run."""
        if isinstance(self.forward_model, nn.parallel.DistributedDataParallel):
            self.forward_model = self.forward_model.module
        distributed.teardown(self.world)

    def _stop(self, signals: _Signals) -> str | None:
        """The stopping signal's name, the same on every rank (None: go on). Under DDP the
        ranks agree at the same point of each iteration: each left the loop on its own
        flag, and a group's SIGTERM reaching rank 0 in its logging and rank 1 already in its
        next step made them call different collectives (a hang, then a crash, and no stop
        checkpoint). A rank that saw no signal yet takes SIGTERM's name."""
        received = signals.received
        if not distributed.any_rank(received is not None, self.world, self.device):
            return None
        return received or "SIGTERM"

    def _nonfinite_stop(self, in_a_row: int) -> str:
        """Why the run stopped and what is kept: the last good checkpoint, or that there is
        none yet (the line used to say 'The last good checkpoint is None')."""
        last = self.checkpoints.last()
        kept = f"The last good checkpoint is {last}" if last is not None else \
            "No checkpoint was written before it"
        return (f"{in_a_row} non-finite losses in a row at iteration {self.iteration + 1}; "
                f"stopping. {kept}; lower train.optimizer.lr, set train.grad_clip, or use "
                "precision fp32/bf16")

    def _share_window(self) -> None:
        """Under DDP, every rank's loss window becomes the ranks' mean before rank 0 saves
        it: the line after a resumption (every rank restoring rank 0's) then averages all
        ranks, as it would have (the mean of the sums is the sum of the means)."""
        if not self.world.distributed or not self._window:
            return
        names = list(self._window)
        mean = distributed.all_reduce_mean(
            torch.stack([self._window[name] for name in names]).float(), self.world)
        self._window = dict(zip(names, mean.unbind(), strict=True))

    def _log(self, logger: RunLogger, iters: int, elapsed: float, voxels: int) -> None:
        """One log step: the losses averaged over the window (which may have begun before a
        resumption), the rates over this session's ``iters`` of it."""
        pending, count = self._window, max(self._window_count, 1)
        values = torch.stack([pending[n] / count for n in self.losses]) if pending \
            else torch.zeros(len(self.losses))
        values = distributed.all_reduce_mean(values.float(), self.world).cpu().tolist()
        metrics: dict[str, float] = {f"loss/{n}": v for n, v in zip(self.losses, values,
                                                                    strict=True)}
        metrics["loss/total"] = weighted_total(dict(zip(self.losses, values, strict=True)),
                                               self.weights)
        metrics["lr"] = self.last_rate  # the last update's rate, not the next one's (poly
        # logged 0 on the last line)
        rate = iters / elapsed if elapsed > 0 else 0.0
        metrics["throughput/it_per_s"] = rate
        metrics["throughput/samples_per_s"] = rate * self.train.batch_size * \
            self.train.accumulate * self.world.size
        metrics["throughput/voxels_per_s"] = rate * voxels * self.world.size
        if self.device.type == "cuda":
            metrics["memory/max_allocated_gib"] = torch.cuda.max_memory_allocated(
                self.device) / 2**30
        else:
            metrics["memory/max_rss_gib"] = resource.getrusage(
                resource.RUSAGE_SELF).ru_maxrss / 2**20
        metrics["nonfinite_steps"] = float(self.nonfinite)
        logger.step(self.iteration, metrics)

    def _images(self, logger: RunLogger, batch: dict[str, Any]) -> None:
        if not self.world.main or "outputs" not in batch:
            return
        image = batch["image"][0, 0].float()
        z = image.shape[0] // 2
        panels = {"input": image[z].cpu().numpy()}
        for name in self.losses:
            task = self.recipe.tasks[name]
            activate = ACTIVATIONS[task.activation]  # as inference shows it
            pred = activate(batch["outputs"][name][0].detach().float())[:, z]
            target = batch["target"][name][0][:, z].float()
            mask = batch["mask"][name][0][:, z].float()
            low, high = task.target.value_range()  # to black .. white (signed distance: -1..1)
            panels[f"{name}/prediction"] = ((pred.mean(0) - low) / (high - low)).cpu().numpy()
            panels[f"{name}/target"] = ((target.mean(0) - low) / (high - low)).cpu().numpy()
            panels[f"{name}/mask"] = mask.mean(0).cpu().numpy()
        logger.images(self.iteration, panels)

    def _validate(self, logger: RunLogger) -> None:
        """Per-task losses over the validation sources (EMA weights when enabled)."""
        if not self.recipe.data.validation:
            return
        model = self.model
        if self.ema is not None:
            model = build_model(self.recipe).to(self.device)
            self.ema.copy_to(model)
        model.eval()
        sums = {name: 0.0 for name in self.losses}
        counts = {name: 0.0 for name in self.losses}
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                             enabled=self.autocast_dtype is not None):
            for packed in validation_batches(self.recipe):
                batch = unpack(packed, self.device)
                outputs = model(batch["image"])
                for name, fn in self.scorers.items():  # tile by tile: class balancing and
                    for i in range(len(batch["image"])):  # Dice over a batch made the figure
                        one = slice(i, i + 1)  # depend on train.batch_size
                        result: LossResult = fn(outputs[name][one], batch["target"][name][one],
                                                batch["mask"][name][one])
                        sums[name] += float(result.loss) * float(result.valid)
                        counts[name] += float(result.valid)
        metrics = validation_losses(sums, counts, self.weights)
        if not self.world.main:
            model.train()
            return
        if uncounted := [n for n in self.losses if not counts[n]]:
            logger.message(f"validation: task {', '.join(map(repr, uncounted))} counted no "
                           "voxel of data.validation (its labels all 0, or masked out): no "
                           "validation loss for it")
        inputs = predict_validation(self.recipe, model, self.device) \
            if self.train.validate_segmentation else []
        model.train()
        if nonfinite := sum(i.nonfinite for i in inputs):
            logger.message(f"warning: validation: the network output {nonfinite} NaN or "
                           "infinite values, blended as 0 (in affinities: boundaries), so the "
                           f"segmentation scored splits there; {_nonfinite_hint(self.recipe)}")
        if inputs and self._in_background():
            earlier = self.scorer.submit(self.iteration, metrics, _on_cpu(self.state()),
                                         score_validation, self.recipe.segment, inputs)
            for scored in earlier:
                self._record(logger, scored)
            return
        metrics.update(score_validation(self.recipe.segment, inputs) or {})
        self._record(logger, Pending(self.iteration, metrics, None, None))

    def _record_finished(self, logger: RunLogger) -> None:
        """At a stop: record the validation whose scores are already in; one whose scoring
        failed is said, not raised, so that the stop checkpoint is still written."""
        for scored in self.scorer.finished():
            try:
                self._record(logger, scored)
            except (RuntimeError, MemoryError, UserError) as exc:
                logger.message(f"the validation of iteration {scored.iteration} is not "
                               f"recorded: {exc}")

    def _in_background(self) -> bool:
        chosen = self.train.validate_in_background
        return self.device.type == "cuda" if chosen is None else chosen

    def _record(self, logger: RunLogger, scored: Pending) -> None:
        """Log a validation's figures; save best.pt when it is the best so far (the training
        state of the validated iteration, kept while it was scored)."""
        metrics = scored.result()
        logger.validation(scored.iteration, metrics)
        key = "arand" if "arand" in metrics else "loss/total"  # lower is better for both
        value = metrics.get(key, math.nan)  # none: nothing was counted
        if not math.isfinite(value):
            return
        if self.best is not None and self.best_by is not None and key != self.best_by:
            logger.message(f"best.pt is chosen by {key} from here on (validate_segmentation "
                           f"changed); its {self.best_by} of {self.best:.4g} is not compared")
            self.best = None  # an ARAND was compared with a loss, and never chosen
        if self.best is None or value < self.best:
            self.best, self.best_by = value, key
            state = scored.state if scored.state is not None else self.state()
            self.checkpoints.save_best({**state, "best": self.best, "best_by": key})

    def _checkpoint(self, logger: RunLogger) -> None:
        digest = distributed.check_in_sync(self.model, self.world)
        self._share_window()
        if not self.world.main:
            return
        path = self.checkpoints.save(self.iteration, self.state())
        logger.message(f"checkpoint {path.name} (iteration {self.iteration}, parameters "
                       f"{digest}{', ranks in sync' if self.world.distributed else ''})")


def _weights_file(given: Path | None) -> Path | None:
    """The file ``--init-from`` names: a checkpoint or package as given, or a run
    directory's best (else newest) checkpoint, chosen as ``emrun export`` chooses it (a run
    directory was refused as 'a directory, not a checkpoint file')."""
    if given is None:
        return None
    try:
        return checkpoint_of(Path(given))
    except UserError as exc:
        raise UserError(f"--init-from {exc}") from None


def _iteration_or_none(value: Any) -> int | None:
    """A checkpoint's iteration as an int (a package or an edited file may hold another)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def validation_losses(sums: dict[str, float], counts: dict[str, float],
                      weights: dict[str, float]) -> dict[str, float]:
    """Each task's mean validation loss over the voxels it counted, and their weighted sum;
    a task that counted none (labels all 0, or masked out) has no figure, and the total
    sums the tasks of non-zero weight that have one (the same ones at every validation),
    and is absent when none has. A loss of 0 was logged for nothing counted, and best.pt
    chose by it."""
    metrics: dict[str, float] = {f"loss/{n}": sums[n] / counts[n] for n in sums if counts[n]}
    scored = {n: metrics[f"loss/{n}"] for n in sums if counts[n] and weights[n]}
    if scored:
        metrics["loss/total"] = weighted_total(scored, weights)
    return metrics


def without_margins(spec: Any) -> Any:
    """A loss spec as validation scores with it: DeepEM's margins off. They shape training
    (voxels already right by the margin are dropped, or targets softened), but a validation
    loss with them ranks models wrongly: a better model's few remaining voxels are its hard
    ones, and a near-perfect prediction scored 1.20 against 0.51 for a worse one, so
    best.pt was chosen by the wrong figure."""
    fields = getattr(type(spec), "model_fields", {})
    if "margin0" in fields and "margin1" in fields:
        return spec.model_copy(update={"margin0": 0.0, "margin1": 0.0})
    return spec


def weighted_total(values: dict[str, float], weights: dict[str, float]) -> float:
    """``sum(weight * value)`` over the tasks of non-zero weight, as ``total_loss`` forms
    the trained total: a weight-0 task's NaN made the logged total NaN (0 * NaN), and a
    weight-0 task alone gave a validation total of 0 that best.pt was chosen by."""
    return float(sum(weights[n] * v for n, v in values.items() if weights[n]))


def _nonfinite_hint(recipe: Recipe) -> str:
    """Where NaN in the validation prediction may come from: validation predicts at
    ``infer.precision`` (as `emrun infer` does), not at the training's precision."""
    precision = recipe.infer.precision
    if precision == "fp16":
        return ("an fp16 overflow? (validation predicts at infer.precision fp16, as emrun "
                "infer does: use bf16 or fp32)")
    return (f"validation predicts at infer.precision {precision}, as emrun infer does: "
            "are the weights finite?")


def _on_cpu(value: Any) -> Any:
    """A copy of a (nested) training state with every tensor copied to the CPU: what the
    state was at this iteration, whatever training does next."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return type(value)((k, _on_cpu(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    return value


def seed_everything(seed: int) -> None:
    """Python, numpy and torch global generators from the recipe seed (before anything)."""
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def out_of_memory(exc: BaseException, device: torch.device, batch: int,
                  patch: Sequence[int]) -> str:
    """What a first training step that ran out of device memory asked for and found, in
    torch's own figures (asked, capacity, free)."""
    said = " ".join(str(exc).split()).split(" Including")[0].split(" If reserved")[0]
    return (f"a training step of batch {batch} x patch {'x'.join(map(str, patch))} does not "
            f"fit in the memory of {device_name(device)} (torch: {said}); lower "
            "train.batch_size or train.patch (or use train.precision: bf16, and "
            "train.accumulate for a larger effective batch)")
