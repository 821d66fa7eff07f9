"""The recipe to predict with: the one a checkpoint carries, or the user's, checked against it.

A training checkpoint holds its run's resolved recipe (model, tasks, inference settings), so
`emrun infer --checkpoint C` needs no --recipe: a run trained with `-o` overrides is
predicted with exactly those settings. A --recipe given beside it may change how to predict
(infer.*) but not what the network is: a model or tasks that differ from the checkpoint's
are refused with the keys that differ, instead of a cut-off state_dict error.
"""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from ..io.package import RECIPE, is_package, load_network
from ..recipe import LoadedRecipe, RecipeError, load_recipe
from ..recipe.loader import resolved_now, shown_path

FIXED = ("model", "tasks")
"""Recipe sections that define the network in a checkpoint."""

SHOWN = 5


def recipe_for(checkpoint: Path, recipe: Path | None, overrides: Sequence[str]) -> LoadedRecipe:
    """``recipe`` checked against the checkpoint's, or the checkpoint's own when None."""
    network = load_network(checkpoint)
    check_plugins(checkpoint, network.get("plugins"))
    saved_text = network.get("recipe")
    saved = _parsed(saved_text, checkpoint, strict=recipe is None)
    if recipe is None:
        if not isinstance(saved, dict):
            raise UserError(f"{checkpoint} carries no recipe (not written by `emrun train`?); "
                            "give the one it was trained with: --recipe RECIPE")
        # problems point into the checkpoint ("run/checkpoints/last.pt (its recipe):43:7")
        member = f"its {RECIPE}" if is_package(checkpoint) else "its recipe"
        shown = f"{shown_path(checkpoint)} ({member})"
        try:
            loaded = load_recipe(checkpoint, overrides, text=saved_text, shown=shown)
        except RecipeError as exc:
            if not _augmentation_only(exc):
                raise
            print(f"warning: {exc.problems[0]}: predicting needs no augmentation, so the "
                  "checkpoint's are left out here", file=sys.stderr, flush=True)
            saved["augment"] = []
            loaded = load_recipe(checkpoint, overrides,
                                 text=yaml.safe_dump(saved, sort_keys=False), shown=shown)
        if overrides and (found := _other_network(loaded, saved)):  # -o tasks.x.activation
            raise UserError(f"-o {' -o '.join(overrides)} changes the network of "
                            f"{checkpoint}: {found}. Only what is not the network (infer, "
                            "segment, ...) may be overridden")
        return loaded
    loaded = load_recipe(recipe, overrides)
    if isinstance(saved, dict) and (found := _other_network(loaded, saved)):
        raise UserError(f"--recipe {recipe} describes another network than {checkpoint}: "
                        f"{found}. Drop --recipe to use the checkpoint's own")
    return loaded


def _other_network(loaded: LoadedRecipe, saved: dict[str, Any]) -> str | None:
    """How ``loaded``'s network (its `FIXED` sections) differs from the checkpoint's saved
    recipe, listed; None when it is the same. An override of the checkpoint's own recipe was
    not compared: other offsets or activations predicted silently with the checkpoint's
    weights, and recorded the changed ones."""
    current, saved = loaded.recipe.resolved(), resolved_now(saved)  # settings added since
    differences = [d for section in FIXED
                   for d in _differences(current.get(section), saved.get(section), (section,))]
    if not differences:
        return None
    more = f" (and {len(differences) - SHOWN} more)" if len(differences) > SHOWN else ""
    return "; ".join(differences[:SHOWN]) + more


def check_plugins(checkpoint: Path, used: Any) -> None:
    """Refuse a package whose network needs a plugin package that is not installed here,
    naming it and its version (the recipe's check would only say that the name is unknown);
    a different version installed is a warning. Plugins a package does not record (packages
    before emrun recorded them, checkpoints) are left to the recipe's check."""
    if not isinstance(used, list):
        return
    for use in used:
        package, version = (use.get("package"), use.get("version")) if isinstance(use, dict) \
            else (None, None)
        if not isinstance(package, str) or use.get("kind") == "augmentation":
            continue  # predicting never augments
        what = f"{use.get('kind')} type {use.get('type')!r}"
        try:
            here = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            named, pin = (f"{package} {version}", f"=={version}") if isinstance(version, str) \
                else (package, "")
            raise UserError(f"{checkpoint}: its network needs the emrun plugin package "
                            f"{named} (for the {what}), which is not installed here: "
                            f"pip install '{package}{pin}'") from None
        if isinstance(version, str) and here != version:
            print(f"warning: {checkpoint} was exported with {package} {version} (for the "
                  f"{what}); {here} is installed here", file=sys.stderr, flush=True)


def _augmentation_only(error: RecipeError) -> bool:
    """Whether every problem of a checkpoint's recipe is in its ``augment`` section: an
    augmentation of a plugin installed where it was trained, not here, stopped inference
    and export, which never augment."""
    return bool(error.problems) and not error.more and \
        all(problem.path[:1] == ("augment",) for problem in error.problems)


def _parsed(text: Any, checkpoint: Path, strict: bool) -> Any:
    """The checkpoint's recipe as data. A damaged one is named in one line (the YAML
    parser's message spans several, with a caret) when it is the one to use (``strict``),
    and is not compared with when the user gives the recipe."""
    if not isinstance(text, str) or not text:
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        if not strict:
            return None
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise UserError(f"{checkpoint}: its recipe is damaged ({problem}{where}); give the "
                        "recipe it was trained with: --recipe RECIPE") from None


def _differences(mine: Any, theirs: Any, path: tuple[str | int, ...]) -> Iterator[str]:
    """Leaf keys where the two differ, as 'key.path: A here, B in the checkpoint'."""
    if isinstance(mine, dict) and isinstance(theirs, dict):
        for key in sorted(set(mine) | set(theirs), key=str):
            yield from _differences(mine.get(key), theirs.get(key), (*path, key))
    elif mine != theirs:
        where = ".".join(str(p) for p in path)
        yield f"{where}: {_short(mine)} in the recipe, {_short(theirs)} in the checkpoint"


def _short(value: Any) -> str:
    """A value as the recipe spells it, on one line: YAML ends a bare scalar with a
    document-end line ('4\n...'), which split the message into several."""
    if value is None:
        return "absent"
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip()
    text = " ".join(text.removesuffix("\n...").split())
    return text if len(text) <= 60 else text[:57] + "..."
