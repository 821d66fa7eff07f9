"""`emrun bench snemi3d --final`: the benchmark's settings trained on all 70 sections, as a
model package.

The validation run (`bench snemi3d [--recipe R] --out DIR`) trains on sections 0-59 and
chooses the segmenter's value on 60-69. The final run repeats its recipe, overrides and
iterations on all
70 sections (none is left to validate on), writes the chosen value into the recipe's
``segment`` section and exports the last checkpoint as ``DIR/snemi3d.emrun``: `emrun infer
--model DIR/snemi3d.emrun` predicts new SNEMI3D-like volumes with it, and `emrun segment`
segments its predictions with the chosen value (an inference output records its recipe).
A stopped final run continues when the same command runs again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import locks
from ..atomic import write_text
from ..errors import Interrupted, UserError
from ..recipe.run import SegmenterBase
from ..registry import segmenters
from ..stages import Stages
from ..train.trainer import Trainer
from .snemi3d import (
    DEFAULT_RECIPE,
    SECTIONS,
    budgeted_recipe,
    converted,
    find_data,
    recipe_file,
)

__all__ = ["PACKAGE", "run_final"]

PACKAGE = "snemi3d.emrun"


Export = Callable[[Path, Path, str], list[str]]


def run_final(data: Path | None, out: Path, export: Export, *, device: str | None = None,
              console: Any = None) -> dict[str, Any]:
    """Train with the validation run's settings on all sections; ``export`` (emrun.export's,
    handed in by the command: exporting sits beside the benchmarks, not below them) writes
    the package; returns the facts. ``out`` is held meanwhile (`locks.holding_out`)."""
    out = Path(os.path.abspath(out))  # as the validation run names it (`run_snemi3d`)
    chosen = _validation_results(out)
    with locks.holding_out(out):
        return _final(data, out, export, chosen, device, console)


def _final(data: Path | None, out: Path, export: Export, chosen: dict[str, Any],
           device: str | None, console: Any) -> dict[str, Any]:
    """`run_final`'s work, once ``out`` is held."""
    package = out / PACKAGE
    if package.exists():
        raise UserError(f"{package} exists: the final model of this benchmark is written "
                        "(nothing was overwritten)")
    stage = Stages(console)
    volumes, shape = converted(find_data(data), out, stage)
    spec = segmenters.entry(chosen["segmenter"]).spec()
    assert isinstance(spec, SegmenterBase)
    value = spec.value_update(chosen["chosen"])
    everything = [f"data.sources.snemi3d.image={volumes}/image",
                  f"data.sources.snemi3d.labels={volumes}/labels",
                  f"data.sources.snemi3d.roi.shape=[{SECTIONS}, {shape[1]}, {shape[2]}]",
                  "data.validation={}", "train.validate_every=0",
                  *(f"segment.{k}={json.dumps(v)}" for k, v in value.items())]
    loaded = budgeted_recipe(recipe_file(chosen["recipe_file"]), [], int(chosen["iterations"]),
                             list(chosen["overrides"]), last=everything)
    if loaded.recipe.segment.type != chosen["segmenter"]:
        raise UserError(f"{out / 'results.json'}: chose a {chosen['segmenter']} value, but the "
                        f"recipe now segments with {loaded.recipe.segment.type}")
    run = out / "final"
    resume = (run / "checkpoints" / "last.pt").exists()
    stage(f"{'continuing' if resume else 'training'} {loaded.recipe.name} on all {SECTIONS} "
          f"sections to {loaded.recipe.train.iterations} iterations in {run}")
    trainer = Trainer(loaded, run, resume=resume, device=device, console=console,
                      stop_hint="run the same bench snemi3d --final command again to continue")
    if (stopped := trainer.fit().interrupted) is not None:
        raise Interrupted(stopped, f"final training checkpointed at iteration "
                          f"{trainer.iteration} in {run}; run the same command again to "
                          "continue (the package is written when training is done)")
    stage(f"exporting {run} to {package}")
    lines = export(run, package, "emrun")
    facts = {"recipe": loaded.recipe.name, "overrides": list(chosen["overrides"]),
             "sections": [0, SECTIONS - 1], "iterations": trainer.iteration,
             "train_seconds": round(trainer.seconds(), 1), "device": ", ".join(trainer.devices),
             "segmenter": chosen["segmenter"], "parameter": chosen["parameter"],
             "value": chosen["chosen"], "package": str(package), "export": lines}
    write_text(out / "final.json", json.dumps(facts, indent=2) + "\n")
    return facts


def _validation_results(out: Path) -> dict[str, Any]:
    """What the validation run in ``out`` chose (its results.json)."""
    path = out / "results.json"
    if not path.is_file():
        raise UserError(f"{out}: no results.json; --final trains with the settings a finished "
                        f"validation benchmark chose: run `emrun bench snemi3d --out {out}` "
                        "first")
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
        needed = {k: found[k] for k in ("segmenter", "parameter", "chosen", "iterations",
                                        "overrides")}
        needed["recipe_file"] = found.get("recipe_file", DEFAULT_RECIPE)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: not a bench snemi3d result ({exc}); run the validation "
                        "benchmark again into an empty --out") from None
    if (wrong := _wrong_field(needed)) is not None:
        raise UserError(f"{path}: not a bench snemi3d result ({wrong}); run the validation "
                        "benchmark again into an empty --out")
    return needed


def _wrong_field(needed: dict[str, Any]) -> str | None:
    """The first field of a results.json (hand-edited, or an older emrun's) that is not of
    the kind `_final` uses, in words; None when all are: ``"iterations": "2k"`` stopped
    the final run as emrun's internal error, after the SNEMI3D data was converted."""
    checks = (("segmenter", isinstance(needed["segmenter"], str)),
              ("parameter", isinstance(needed["parameter"], str)),
              ("chosen", isinstance(needed["chosen"], int | float)
               and not isinstance(needed["chosen"], bool)),
              ("iterations", isinstance(needed["iterations"], int)
               and not isinstance(needed["iterations"], bool) and needed["iterations"] >= 1),
              ("overrides", isinstance(needed["overrides"], list)
               and all(isinstance(o, str) for o in needed["overrides"])),
              ("recipe_file", isinstance(needed["recipe_file"], str)))
    return next((f"{name!r} is {needed[name]!r}" for name, ok in checks if not ok), None)
