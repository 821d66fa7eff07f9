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

import os
from pathlib import Path
from typing import Literal

from ..capacity import pseudo_file_system
from ..errors import UserError

Format = Literal["emrun", "bioimageio", "onnx"]
FORMATS: tuple[str, ...] = ("emrun", "bioimageio", "onnx")


SUFFIXES: dict[str, str] = {".emrun": "emrun", ".zip": "bioimageio", ".onnx": "onnx"}


def export(source: Path, output: Path, format: str | None = None) -> list[str]:
    """Export ``source`` to ``output`` in ``format`` (None: from the output's suffix); the
    lines that report what was done."""
    from .source import load_trained

    _check_format(format)  # the command's own mistake before the output's state
    if output.is_dir():
        raise UserError(f"{output} is a directory; give the file to write")
    if output.exists() or output.is_symlink():
        raise UserError(f"{output} exists; export never overwrites a file: remove it or "
                        "choose another name")
    format = output_format(output, format)
    if (kind := pseudo_file_system(output)) is not None:  # before the network is read
        raise UserError(f"{output}: cannot be written: {kind}, not a disk; give a file path "
                        "on a disk")
    trained = load_trained(source)
    if format == "emrun":
        from .package import export_package

        return export_package(trained, output)
    if format == "bioimageio":
        from .bioimageio import export_bioimageio

        return export_bioimageio(trained, output)
    from .onnx import export_onnx

    return export_onnx(trained, output)


def file_output(text: str) -> Path:
    """The output file as given on the command line. A trailing slash (``q.emrun/``) says a
    folder was meant, and a Path drops it: the file ``q.emrun`` was written, which is not
    what was asked; which file to write in a folder is not to be guessed either."""
    if text.endswith(("/", os.sep)) and text.rstrip("/" + os.sep):
        raise UserError(f"{text}: ends with a slash, as a folder does, but export writes "
                        "one file: give the file's path, without the slash")
    return Path(text)


def _check_format(format: str | None) -> None:
    if format is not None and format not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)} (got {format!r})")


def output_format(output: Path, format: str | None) -> str:
    """The format asked, else the one the suffix names; a suffix of another format is
    refused (`o.onnx` was written as an emrun package, which no ONNX tool opens)."""
    _check_format(format)
    if format is None and output.name.lower() in SUFFIXES:  # ".emrun": hidden, no suffix
        raise UserError(f"{output}: give the file a name before its suffix (e.g. "
                        f"model{output.name.lower()})")
    named = SUFFIXES.get(output.suffix.lower())
    if format is None and named is None:
        raise UserError(f"{output}: give --format ({', '.join(FORMATS)}), or name the file "
                        f"{', '.join(f'*{s}' for s in SUFFIXES)}")
    if format is not None and named is not None and named != format:
        wanted = next(s for s, f in SUFFIXES.items() if f == format)
        raise UserError(f"{output}: a {output.suffix} file is {named}, but --format is "
                        f"{format}; name the file *{wanted} or give --format {named}")
    return format or named  # type: ignore[return-value]


__all__ = ["FORMATS", "Format", "export", "file_output", "output_format"]
