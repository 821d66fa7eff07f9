"""The inference engine's outputs, pinned bit for bit: speeding up its host-side work (reads,
padding, patch cuts, blending, quantising, chunk writes) must not change one bit.

The hashes were taken from the engine before that work, and taken again (once) where the
blending windows came to be scaled per axis before their float32 product (a last-bit change
of the weights, at most 1.8e-7 relative; a narrow Gaussian had underflowed). The network is
an exact stand-in (products and sums of dyadic numbers, position-dependent in the patch so
misplaced or misweighted patches show): a convolution's last bits depend on the CPU's
instruction set, this one's do not. Each run covers a path of its own: hand-over within a
unit and recomputation across units, both windows, float32/float16/uint8, TTA, a ROI, a mask
with skipped and blank blocks, a float input with NaN outside the mask, non-finite network
outputs, and the whole-array prediction (`predict_array`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from torch import nn

from emrun.geometry import Roi
from emrun.infer.array import predict_array
from emrun.infer.engine import Engine
from emrun.infer.job import prepare_job
from emrun.infer.schedule import run_local
from emrun.infer.worker import BlockWorker
from emrun.io.write import write_volume
from emrun.models import build_model
from emrun.recipe import Recipe

OFFSETS = [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [0, -5, 0]]
PATCH = (4, 16, 16)
SHAPE = (11, 37, 45)


def make_recipe(**infer: Any) -> Recipe:
    return Recipe.model_validate({
        "name": "pin", "data": {"sources": {"a": {"type": "synthetic", "shape": [16, 64, 64]}}},
        "model": {"type": "rsunet", "widths": [4, 8]},
        "tasks": {"aff": {"target": {"type": "affinity", "offsets": OFFSETS}},
                  "mito": {"target": {"type": "binary", "volume": "mito"}}},
        "train": {"patch": list(PATCH), "iterations": 1},
        "infer": {"dtype": "float32", "overlap": [0.5, 0.25, 0.25], "batch_size": 3,
                  "precision": "fp32", **infer},
    })


class Exact(nn.Module):
    """Per channel ``x * w + ramp`` (dyadic ``w`` and ramp over the patch: each operation
    rounds once, the same on every CPU); with ``nan_above``, NaN where the input is above
    it (non-finite outputs, counted and blended as 0)."""

    def __init__(self, channels: dict[str, int], nan_above: float | None = None) -> None:
        super().__init__()
        self.channels = channels
        self.nan_above = nan_above
        z, y, x = (torch.arange(n, dtype=torch.float32) for n in PATCH)
        self.register_buffer("ramp", (z[:, None, None] / 8 - y[None, :, None] / 16
                                      + x[None, None, :] / 32)[None, None])

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        first = 0
        for name, n in self.channels.items():
            w = (torch.arange(first, first + n, dtype=torch.float32) / 4 + 0.5)
            value = x * w[None, :, None, None, None] - self.ramp * (first % 3 + 1) / 4
            if self.nan_above is not None:
                value = torch.where(x > self.nan_above, torch.nan, value)
            out[name] = value
            first += n
        return out


def digest(output: Path, tasks: list[str]) -> str:
    """Hash of every task's level-0 array (dtype, shape, bytes) and of the done-markers."""
    h = hashlib.sha256()
    for task in tasks:
        data = zarr.open_array(str(output / task / "0"), mode="r")[...]
        h.update(f"{task}:{data.dtype}:{data.shape}".encode())
        h.update(np.ascontiguousarray(data).tobytes())
    for marker in sorted(output.glob(".emrun-done/*/*_*_*")):
        h.update(f"{marker.name}={marker.read_text()}".encode())
    return h.hexdigest()[:16]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("pin")
    recipe = make_recipe()
    torch.save({"model": build_model(recipe).state_dict(), "iteration": 1}, tmp / "c.pt")
    rng = np.random.default_rng(0)
    image = (rng.random(SHAPE) * 255).astype(np.uint8)
    image[:4, :16, :16] = 0  # a blank block (block 4 x 16 x 16): skipped, not predicted
    write_volume(tmp / "in.zarr", "image", image, voxel_size=(30, 6, 6))
    floats = (image / 255).astype(np.float32)
    mask = np.zeros(SHAPE, np.uint8)
    mask[2:9, 5:30, 10:40] = 1
    floats[0, 0, 0] = np.nan  # outside the mask: read as black
    write_volume(tmp / "in.zarr", "floats", floats, voxel_size=(30, 6, 6))
    write_volume(tmp / "in.zarr", "mask", mask, voxel_size=(30, 6, 6))
    return tmp


def run(inputs: Path, name: str, recipe: Recipe, *, source: str = "image",
        nan_above: float | None = None, single_units: bool = False, **job: Any) -> str:
    """Predict with the exact stand-in through the block worker; the output's digest.
    ``single_units``: every block its own unit (each recomputes its earlier owners)."""
    out = inputs / f"{name}.zarr"
    prepared = prepare_job(recipe, inputs / "c.pt", str(inputs / "in.zarr" / source), out,
                           **job)

    def factory(r: Recipe) -> nn.Module:
        return Exact(r.head_channels(), nan_above)

    if single_units:
        worker = BlockWorker(prepared, torch.device("cpu"), model=factory(recipe).eval())
        worker.run_units([[b] for b in prepared.pending()])
    else:
        run_local(prepared, [("cpu", 1)], model=factory)
    return digest(out, list(recipe.tasks))


RUNS: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    # name: (infer settings, run options, digest)
    "bump_f32": ({}, {"block": (4, 16, 16)}, "faf59340bc14c89b"),
    "bump_f32_units": ({}, {"block": (4, 16, 16), "single_units": True}, "faf59340bc14c89b"),
    "gauss_f16": ({"blend": {"type": "gaussian", "sigma": 0.2}, "dtype": "float16"},
                  {"block": (8, 32, 32)}, "2c162d026241ac6a"),
    "uint8_tta4": ({"dtype": "uint8", "tta": 4}, {"block": (4, 16, 16)}, "3aa50bec0e67a740"),
    "roi": ({}, {"block": (4, 16, 16), "roi": Roi((3, 10, 5), (6, 20, 33))}, "05c8063cae9fee6f"),
    "mask_float_nan": ({}, {"block": (4, 16, 16), "source": "floats",
                            "mask_path": "MASK", "nan_above": 0.9}, "85724c166e2ca8c5"),
    "default_block_uint8": ({"dtype": "uint8", "batch_size": 5}, {}, "e492bf9a5a552f94"),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_outputs_are_the_pinned_bits(inputs: Path, name: str) -> None:
    settings, options, want = RUNS[name]
    options = dict(options)
    if options.get("mask_path") == "MASK":
        options["mask_path"] = str(inputs / "in.zarr" / "mask")
    got = run(inputs, name, make_recipe(**settings), **options)
    assert got == want, f"{name}: outputs changed ({got})"


def test_whole_array_prediction_is_the_pinned_bits() -> None:
    recipe = make_recipe()
    engine = Engine(recipe, Exact(recipe.head_channels()).eval(), torch.device("cpu"))
    image = (np.random.default_rng(1).random((9, 30, 41)) * 255).astype(np.uint8)
    values = predict_array(engine, image, (0.0, 255.0))
    h = hashlib.sha256()
    for name in sorted(values):
        h.update(np.ascontiguousarray(values[name]).tobytes())
    assert h.hexdigest()[:16] == "985e28dcf425445c"


def test_an_engine_reused_on_other_shapes_predicts_as_a_fresh_one() -> None:
    """Work buffers and weight sums are kept from block to block: a smaller block after a
    larger one (and back) must not see the other's leftovers."""
    recipe = make_recipe()
    reused = Engine(recipe, Exact(recipe.head_channels()).eval(), torch.device("cpu"))
    rng = np.random.default_rng(2)
    images = [(rng.random(shape) * 255).astype(np.uint8)
              for shape in ((9, 30, 41), (5, 17, 20), (9, 30, 41), (7, 40, 18))]
    for image in images:
        fresh = Engine(recipe, Exact(recipe.head_channels()).eval(), torch.device("cpu"))
        want = predict_array(fresh, image, (0.0, 255.0))
        got = predict_array(reused, image, (0.0, 255.0))
        for name in want:
            assert np.array_equal(got[name], want[name]), (name, image.shape)


def test_predicting_leaves_torch_threads_as_they_were() -> None:
    """A block's own tensor work runs on one thread; the process's count comes back."""
    recipe = make_recipe()
    engine = Engine(recipe, Exact(recipe.head_channels()).eval(), torch.device("cpu"))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        predict_array(engine, np.full((6, 20, 20), 100, np.uint8), (0.0, 255.0))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
