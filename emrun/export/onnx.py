"""``emrun export --format onnx``: the network as one ONNX file, checked against PyTorch.

The graph is `network.ExportedNetwork`: input ``raw`` (batch, channel, z, y, x), already
scaled to [0, 1] (the caller applies the intensity scale the model package states); one
output per task, activated, named after the task. Batch and z, y, x are dynamic: any size
of ``patch + k * divisor`` (the recipe's model) works. The export is refused unless
onnxruntime, run on the patch size and on a larger one, reproduces PyTorch's outputs within
`TOLERANCE`: a graph that computes something else is worse than none.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError, disk_full, not_allowed
from ..synth import synthesize
from .network import exported_network, output_names, renamed
from .source import Trained
from .staging import publish, staging_folder

TOLERANCE = 1e-4
"""Largest absolute difference allowed between onnxruntime's outputs and PyTorch's."""
OPSET = 18


def export_onnx(trained: Trained, output: Path) -> list[str]:
    """Write ``trained`` as an ONNX graph at ``output`` (atomically) and check it."""
    onnxruntime = _onnxruntime()
    network = exported_network(trained.recipe, trained.weights)
    patch = trained.recipe.infer_patch()
    divisor = trained.recipe.model.divisor()
    example = _example(trained, patch)
    # traced on the larger one: a size of 1 (a patch one section deep, batch 1) is
    # specialised by torch.export, and the graph then declared that axis of its outputs 1
    larger = _example(trained, tuple(p + d for p, d in zip(patch, divisor, strict=True)),
                      batch=2)
    names = output_names(network.tasks)
    with staging_folder(output) as folder:
        staged = folder / output.name
        _export(network, larger, staged, names)
        worst = max(_difference(onnxruntime, staged, network, x) for x in (example, larger))
        if not worst <= TOLERANCE:
            raise UserError(f"the ONNX graph of this model differs from PyTorch by {worst:.2g} "
                            f"(more than {TOLERANCE:g}); it was not written")
        publish(staged, output)
    return [f"wrote {output}: ONNX (opset {OPSET}) of {trained.path} at iteration "
            f"{trained.iteration}; input raw (b, {trained.recipe.model.input_channels()}, z, y, "
            f"x) in [0, 1], outputs {', '.join(names)}; onnxruntime matches PyTorch "
            f"within {worst:.1g}", *renamed(network.tasks)]


def _onnxruntime() -> Any:
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError:
        raise UserError("exporting to ONNX needs the extra: pip install 'emrun[onnx]'"
                        ) from None
    return onnxruntime


def _example(trained: Trained, shape: tuple[int, ...], batch: int = 1) -> torch.Tensor:
    """Synthetic EM in [0, 1], (batch, channels, z, y, x)."""
    image = torch.from_numpy(synthesize(shape, seed=1).image.astype(np.float32) / 255)
    channels = trained.recipe.model.input_channels()
    return image[None, None].expand(batch, channels, *shape).contiguous()


def _export(network: torch.nn.Module, example: torch.Tensor, path: Path,
            names: list[str]) -> None:
    auto = torch.export.Dim.AUTO
    quiet = logging.getLogger("torch.onnx")  # notes about torchvision's operators, and such
    level = quiet.level
    try:
        quiet.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(network, (example,), str(path), dynamo=True, verbose=False,
                              opset_version=OPSET, external_data=False, input_names=["raw"],
                              output_names=names,
                              dynamic_shapes=({0: auto, 2: auto, 3: auto, 4: auto},))
    except Exception as exc:  # torch.export and the ONNX translation raise many kinds
        if disk_full(exc) or not_allowed(exc):  # the place's fault, not the model's
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"this model cannot be exported to ONNX: {first[:200]}") from None
    finally:
        quiet.setLevel(level)


def _difference(onnxruntime: Any, path: Path, network: torch.nn.Module,
                image: torch.Tensor) -> float:
    """The largest absolute difference between onnxruntime's outputs and PyTorch's."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"raw": image.numpy()})
    with torch.no_grad():
        expected = network(image)
    return max(float(np.abs(a - b.numpy()).max()) for a, b in zip(got, expected, strict=True))
