"""Whether a benchmark fits the machine, checked before it starts: what it would need in host
memory, disk and device memory against what is free, so that a volume too large is the user's
error in one line (exit 2) rather than a crash, or a full disk, minutes later.

The probe `free_device_memory` serves any benchmark (`free_disk` and `size_text` come from
`emrun.capacity`, `available_memory` from `emrun.devices`); `estimate_needs` and
`check_room` size a run of the inference engine over a generated uint8 volume (`emrun bench
infer`, and any benchmark that runs the engine so)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..capacity import free_disk, size_text
from ..devices import available_memory
from ..errors import UserError
from ..geometry import Zyx
from ..infer.plan import Layout
from ..recipe import Recipe
from ..synth import peak_memory


@dataclass(frozen=True)
class Needs:
    """Bytes a run needs: host memory, disk in the temporary directory and device memory
    (one block's float32 working set per worker, on a GPU); of the disk, the input's and the
    outputs' share, and of the memory, generating the input's (the refusals name them)."""

    memory: int
    disk: int
    device: int
    input: int
    output: int
    generate: int = 0


def estimate_needs(recipe: Recipe, layout: Layout, workers: int, on_gpu: bool,
                   tile: Zyx | None = None) -> Needs:
    """The input (uint8, generated in memory and written to disk), the outputs at their raw
    size (the compressed size is unknown; raw bounds it) and one block's working set per
    worker (input, accumulators per channel and weights, float32, over the block's read box);
    with ``tile``, the synthesizer's working memory for the generated block of that shape
    (the input is mirrored from it: `synthetic_image`)."""
    voxels = math.prod(layout.shape)
    generate = 0 if tile is None else peak_memory(tile)  # bench's: synthesize(tile, 0)
    channels = sum(recipe.head_channels().values())
    output = channels * voxels * np.dtype(recipe.infer.dtype).itemsize
    read_voxels = math.prod(min(b, n) + p for b, n, p in zip(  # a block and its context
        layout.block, layout.shape, layout.patch, strict=True))
    block = workers * read_voxels * 4 * (channels + 2)
    # generating peaks before the input is made whole (the synthesizer's working memory is
    # freed by then); the blocks come after, while the input is held
    memory = max(generate, voxels) + (0 if on_gpu else block)
    return Needs(memory=memory, disk=voxels + output,
                 device=block if on_gpu else 0, input=voxels, output=output, generate=generate)


def free_device_memory(device: torch.device) -> int | None:
    """Free memory of a GPU, or None for a CPU (its memory is the host's)."""
    if device.type != "cuda":
        return None
    return torch.cuda.mem_get_info(device)[0]


def check_room(needs: Needs, device: torch.device, shape: Zyx, tmp: Path) -> None:
    """Refuse, in one line, a volume whose input and outputs would not fit: say what it would
    take against what is free, before generating anything."""
    asked = f"--shape {' '.join(str(n) for n in shape)}"
    disk = free_disk(tmp)
    if needs.disk > disk:
        raise UserError(f"{asked} would need {size_text(needs.disk)} of disk in {tmp} (input "
                        f"{size_text(needs.input)} uint8, outputs {size_text(needs.output)} "
                        f"raw); {size_text(disk)} is free: give a smaller --shape or another "
                        "TMPDIR")
    memory = available_memory()
    if needs.memory > memory:
        making = f", generating it {size_text(needs.generate)}" if needs.generate else ""
        raise UserError(f"{asked} would need {size_text(needs.memory)} of memory (input "
                        f"{size_text(needs.input)} uint8{making} and each worker's block); "
                        f"{size_text(memory)} is free: give a smaller --shape or --block")
    gpu = free_device_memory(device)
    if gpu is not None and needs.device > gpu:
        raise UserError(f"{asked}: a block's accumulators would need {size_text(needs.device)} "
                        f"on {device}; {size_text(gpu)} is free: give a smaller --block")


def training_step_bytes(recipe: Recipe, precision: str = "fp32") -> int | None:
    """Bytes one training step of ``recipe`` holds at least: the activations its forward
    pass keeps for the backward pass (counted in float32 on PyTorch's meta device, which
    allocates nothing; half of that under bf16 or fp16 ``precision``), the batch (image,
    targets and masks, float32) and the weights with their gradients and two optimizer
    moments. None where the model cannot run on the meta device (a plugin's operator
    without a meta kernel): then nothing is refused."""
    batch, patch = recipe.train.batch_size, recipe.train.patch
    voxels = batch * math.prod(patch)
    saved: dict[int, torch.Tensor] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        saved[id(tensor)] = tensor  # held, so an id is never reused while counting
        return tensor

    try:
        from ..models import build_model

        with torch.device("meta"):
            model = build_model(recipe).train()
            image = torch.empty((batch, recipe.model.input_channels(), *patch))
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            outputs = model(image)
    except Exception:  # any failure only means: not known
        return None
    kept = sum(t.numel() * t.element_size() for t in saved.values())
    kept = kept if precision == "fp32" else kept // 2  # autocast keeps half-size activations
    found = outputs.values() if isinstance(outputs, dict) else [outputs]
    produced = sum(o.numel() * o.element_size() for o in found
                   if isinstance(o, torch.Tensor) and id(o) not in saved)
    heads = sum(recipe.head_channels().values())
    inputs = voxels * (recipe.model.input_channels() + 2 * heads) * 4
    weights = 4 * sum(p.numel() * p.element_size() for p in model.parameters())
    return kept + produced + inputs + weights


def check_step_room(recipe: Recipe, device: torch.device, precision: str = "fp32") -> None:
    """Refuse, in one line and before anything is allocated, a batch and patch whose training
    step cannot fit the device's free memory (the host's on a CPU): a batch_size of 100,000
    was killed by the out-of-memory killer, or ran for hours, instead. ``precision``: the
    step's (`bench model` times fp32 first; `bench train` the recipe's)."""
    need = training_step_bytes(recipe, precision)
    if need is None:
        return
    gpu = free_device_memory(device)
    free = available_memory() if gpu is None else gpu
    if need > free:
        raise UserError(f"train.batch_size {recipe.train.batch_size} x train.patch "
                        f"{list(recipe.train.patch)}: a training step would need at least "
                        f"{size_text(need)} of memory; {size_text(free)} is free on {device}: "
                        "lower train.batch_size or train.patch (-o train.batch_size=N)")
