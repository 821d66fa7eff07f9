"""`emrun export`: a trained network as a file that travels.

Three formats, one source (a run directory, a checkpoint or a model package):

- ``emrun`` (`package`): the ``.emrun`` model package (``io/package.py``) that
  ``emrun infer --model`` predicts with and ``emrun train --init-from`` fine-tunes;
- ``bioimageio`` (`bioimageio`): a bioimage.io model (spec 0.5) for ilastik, deepImageJ,
  BiaPy and bioimage.io's own tools (extra ``emrun[bioimageio]``);
- ``onnx`` (`onnx`): an ONNX graph, checked against PyTorch with onnxruntime (extra
  ``emrun[onnx]``).

The format modules are imported on use: their libraries are optional and heavy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from ..errors import UserError

Format = Literal["emrun", "bioimageio", "onnx"]
FORMATS: tuple[str, ...] = ("emrun", "bioimageio", "onnx")


def export(source: Path, output: Path, format: str = "emrun") -> list[str]:
    """Export ``source`` to ``output`` in ``format``; the lines that report what was done."""
    from .source import load_trained

    if format not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)} (got {format!r})")
    if output.is_dir():
        raise UserError(f"{output} is a directory; give the file to write")
    if output.exists() or output.is_symlink():
        raise UserError(f"{output} exists; export never overwrites a file: remove it or "
                        "choose another name")
    trained = load_trained(source)
    if format == "emrun":
        from .package import export_package

        return export_package(trained, output)
    if format == "bioimageio":
        from .bioimageio import export_bioimageio

        return export_bioimageio(trained, output)
    from .onnx import export_onnx

    return export_onnx(trained, output)


__all__ = ["FORMATS", "Format", "export"]
