"""``emrun export --format emrun``: the ``.emrun`` model package (format in ``io/package.py``)."""

from __future__ import annotations

import shlex
from pathlib import Path

from ..io.package import write_package
from .manifest import manifest, notes
from .source import Trained
from .staging import publish, staging_folder


def export_package(trained: Trained, output: Path) -> list[str]:
    """Write ``trained`` as a model package at ``output`` (atomically)."""
    facts = manifest(trained)
    with staging_folder(output) as folder:
        staged = write_package(folder / output.name, facts, trained.recipe_text,
                               trained.weights, trained.iteration, shown=output)
        publish(staged, output)
    tasks = ", ".join(f"{name} ({task['channels']} channels)"
                      for name, task in facts["tasks"].items())
    return [f"wrote {output}: {trained.path} at iteration {trained.iteration}; tasks {tasks}",
            *notes(facts),
            f"predict with: emrun infer --model {shlex.quote(str(output))} --input VOLUME "
            "--output OUT.zarr"]
