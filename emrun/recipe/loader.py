"""From a recipe file (plus `extends:` bases and `-o` overrides) to a validated Recipe.

Every problem is reported with the file, line and column it came from; all problems that
validation finds are reported together, not only the first.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from .checks import cautions, cross_checks
from .errors import SHOWN, KeyPath, Mark, Problem, RecipeError
from .overrides import Found, apply_override, blame
from .pydantic_errors import problem_from_error, relevant_errors
from .recipe import DEFAULT_SOURCE_TYPE, Recipe
from .yamlsource import Located, parse, read_text


@dataclass(frozen=True)
class LoadedRecipe:
    """A validated recipe and where it came from (for messages and provenance)."""

    recipe: Recipe
    source: Located
    path: Path
    files: tuple[Path, ...]  # the recipe file and every file it extends

    def mark(self, path: KeyPath) -> Mark | None:
        return self.source.mark(path)

    def cautions(self) -> list[str]:
        """Valid settings that are probably a mistake, each located: print them as warnings."""
        return [str(Problem(message, self.mark(path), path))
                for path, message in cautions(self.recipe)]


def shown_path(path: Path) -> str:
    """A path as the user would write it: relative to the working directory when inside it."""
    absolute = Path(os.path.abspath(path))
    try:
        return str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return str(absolute)


def load_recipe(path: str | os.PathLike[str], overrides: Sequence[str] = (), *,
                text: str | None = None, shown: str | None = None) -> LoadedRecipe:
    """Load, resolve and validate a recipe file; raises RecipeError listing every problem.

    With ``text``, the recipe is that text, held in the file ``path`` (a checkpoint's or a
    model package's recipe) and named ``shown`` in messages (default: ``path``).
    """
    file = Path(path)
    files: list[Path] = []
    located = _resolve(file, (), files, None, text, shown)
    if not isinstance(located.data, dict):
        raise RecipeError([Problem(f"a recipe must be a mapping of sections (name, data, model, "
                                   f"tasks, train), not {_what(located.data)}",
                                   located.mark(()))])
    base = (located.copy(copy.deepcopy(located.data))
            if overrides else located)  # the recipe as the file has it, to blame overrides
    applied = [apply_override(located, expr) for expr in overrides]
    try:
        recipe = validate(located)
    except RecursionError:  # a value nested thousands deep (the YAML parser took it)
        raise RecipeError([Problem("a value is nested too deeply to be a recipe setting",
                                   located.mark(()))]) from None
    except RecipeError as exc:
        if not applied:
            raise
        raise blame(exc, located, base, applied, _found) from None
    return LoadedRecipe(recipe, located, file, tuple(files))


def _what(value: Any) -> str:
    """A YAML value's kind in a recipe author's words (``a int`` read as Python)."""
    if value is None:
        return "an empty value"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, str):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        return f"the text {shown}"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__} value"


def validate(located: Located) -> Recipe:
    """Validate located data; raises RecipeError with every problem, located."""
    try:
        recipe = Recipe.model_validate(located.data)
    except ValidationError as exc:
        errors = relevant_errors(exc.errors(), located.data)  # as many as are shown located
        problems = [located.hinted(problem_from_error(err, located)) for err in errors[:SHOWN]]
        mixed = _booleans_among_numbers(located.data)
        if mixed:  # `probs: [true, 0.3]` said "probs sum to 1.3": say what is wrong instead
            problems = [located.hinted(Problem(msg, located.mark(p), p)) for p, msg in mixed] + [
                q for q in problems if not any(q.path == p[:len(q.path)] for p, _ in mixed)]
        raise RecipeError(_unique(problems), more=max(0, len(errors) - SHOWN)) from None
    found = [*_booleans_as_numbers(located.data, recipe), *cross_checks(recipe)]
    problems = [located.hinted(Problem(msg, located.mark(p), p)) for p, msg in found]
    if problems:
        raise RecipeError(_unique(problems))
    return recipe


def _booleans_as_numbers(data: Any, recipe: Recipe) -> list[tuple[KeyPath, str]]:
    """Where the recipe has a YAML boolean that validated to a number: pydantic's lax mode
    takes true as 1, so ``tta: yes`` (meant: TTA on) would silently be 1 (no TTA) and
    ``weight: no`` would silently drop a task. Plugins' specs are covered too."""
    found: list[tuple[KeyPath, str]] = []
    stack: list[tuple[Any, Any, KeyPath]] = [(data, recipe, ())]
    while stack:
        raw, value, path = stack.pop()
        if isinstance(raw, bool):
            if _numeric(value):
                found.append((path, f"should be a number, not {str(raw).lower()}"))
            continue
        items = (raw.items() if isinstance(raw, dict)
                 else enumerate(raw) if isinstance(raw, list) else ())
        for key, item in items:
            child = _part(value, key)
            if child is not _NONE:
                stack.append((item, child, (*path, key)))
    return sorted(found, key=lambda f: [str(k) for k in f[0]])


def _booleans_among_numbers(data: Any) -> list[tuple[KeyPath, str]]:
    """YAML booleans in a list of numbers (`displacement: [2, true]`): never meant, and read
    as 1 by the checks that run before `_booleans_as_numbers` can say so."""
    found: list[tuple[KeyPath, str]] = []
    stack: list[tuple[Any, KeyPath]] = [(data, ())]
    while stack:
        raw, path = stack.pop()
        if isinstance(raw, dict):
            stack += [(item, (*path, key)) for key, item in raw.items()]
        elif isinstance(raw, list):
            if any(_numeric(v) for v in raw):
                found += [((*path, i), f"should be a number, not {str(v).lower()}")
                          for i, v in enumerate(raw) if isinstance(v, bool)]
            stack += [(item, (*path, i)) for i, item in enumerate(raw)]
    return sorted(found, key=lambda f: [str(k) for k in f[0]])


_NONE = object()


def _part(value: Any, key: Any) -> Any:
    """The validated counterpart of ``key`` inside ``value`` (_NONE where there is none)."""
    if isinstance(value, dict):
        return value.get(key, _NONE)
    if isinstance(value, list | tuple):
        return value[key] if isinstance(key, int) and 0 <= key < len(value) else _NONE
    if isinstance(value, BaseModel) and isinstance(key, str) and key in type(value).model_fields:
        return getattr(value, key)
    return _NONE


def _numeric(value: Any) -> bool:
    """A number (not a bool), or a list of them (a scalar a validator spread per axis)."""
    if isinstance(value, list | tuple):
        return bool(value) and all(_numeric(v) for v in value)
    return isinstance(value, int | float) and not isinstance(value, bool)


def _unique(problems: list[Problem]) -> list[Problem]:
    return list(dict.fromkeys(problems))


def _found(located: Located) -> Found:
    """The (key path, message) of every problem of ``located`` (for blaming overrides)."""
    try:
        validate(located)
    except RecipeError as exc:
        return {(p.path, p.message) for p in exc.problems}
    except RecursionError:
        pass
    return set()


SECTIONS = frozenset(Recipe.model_fields) | {"extends"}
"""Top-level keys a recipe may have."""


def _resolve(file: Path, chain: tuple[Path, ...], files: list[Path], referrer: Mark | None,
             text: str | None = None, shown: str | None = None) -> Located:
    """Parse ``file`` (or ``text``, held in it and named ``shown``) and deep-merge it onto the
    files it `extends`."""
    shown = shown or shown_path(file)
    try:
        real = file.resolve()
    except RuntimeError:  # a loop of symbolic links: read_text says so, located below
        real = file.absolute()
    if real in chain:
        cycle = " -> ".join(shown_path(p) for p in (*chain, real))
        raise RecipeError([Problem(f"`extends` cycle: {cycle}", referrer, ("extends",))])
    try:
        text = read_text(file, shown) if text is None else text
    except RecipeError as exc:
        if referrer is None:
            raise
        # a base that cannot be read is a problem of the `extends:` line that names it
        raise RecipeError([Problem(f"{shown!r}: {p.message}", referrer, ("extends",))
                           for p in exc.problems]) from None
    files.append(real)
    located = parse(text, shown)
    data = located.data
    if not isinstance(data, dict) or "extends" not in data:
        return located
    bases = data.pop("extends")
    mark = located.values.get(("extends",))
    if isinstance(bases, str):
        bases = [bases]
    if bases is None or bases == []:  # no base, as the schema allows
        located.values.pop(("extends",), None)
        located.keys.pop(("extends",), None)
        return located
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        bad = next((i for i, b in enumerate(bases) if not isinstance(b, str)), None) \
            if isinstance(bases, list) else None
        raise RecipeError([Problem("must be a file name or a list of file names",
                                   located.values.get(("extends", bad), mark), ("extends",))])
    merged = Located({})
    for i, base in enumerate(bases):
        base_file = file.parent / base
        # a base's problem is its item's (a block list's first line named another base)
        mark = located.values.get(("extends", i), located.values.get(("extends",)))
        if not base.strip():  # it was "'.': is a directory, not a recipe file"
            raise RecipeError([Problem("an empty file name; name the recipe it extends, or "
                                       "remove `extends`", mark, ("extends",))])
        base_located = _resolve(base_file, (*chain, real), files, mark)
        if not isinstance(base_located.data, dict):
            raise RecipeError([Problem(f"{base!r} is not a mapping of recipe sections", mark,
                                       ("extends",))])
        if base_located.data and not set(base_located.data) & SECTIONS:
            # some other file (a config, a system file): say so, do not list its keys back
            raise RecipeError([Problem(
                f"{base!r} is not a recipe: none of its keys is a recipe section "
                f"({', '.join(sorted(SECTIONS))})", mark, ("extends",))])
        merged = _merge(merged, base_located)
    located.values.pop(("extends",), None)
    located.keys.pop(("extends",), None)
    return _merge(merged, located)


def _merge(base: Located, child: Located) -> Located:
    """Deep-merge ``child`` onto ``base``: mappings merge, everything else replaces."""
    data = _merge_data(copy.deepcopy(base.data), child.data)
    values = {p: m for p, m in base.values.items() if _exists(data, p)} | child.values
    keys = {p: m for p, m in base.keys.items() if _exists(data, p)} | child.keys
    return Located(data, values, keys, base.hints | child.hints)  # by mark: none go stale


def _merge_data(base: Any, child: Any, path: KeyPath = ()) -> Any:
    """Mappings merge key by key, except one whose `type:` the child changes: the base's
    keys belong to the other type (a synthetic source's `shape` on a volume source), and a
    child could not remove them, so the child's mapping replaces it whole."""
    if isinstance(base, dict) and isinstance(child, dict) and not _retyped(base, child, path):
        for key, value in child.items():
            base[key] = _merge_data(base[key], value, (*path, key)) if key in base \
                else copy.deepcopy(value)
        return base
    return copy.deepcopy(child)


def _retyped(base: dict[Any, Any], child: dict[Any, Any], path: KeyPath) -> bool:
    """Whether ``child`` gives another `type:` than ``base`` has, where a source without
    one is a volume source (a base relying on that kept its `image` under a child's
    `type: synthetic`, refused as unknown keys of the base's file)."""
    default = DEFAULT_SOURCE_TYPE if len(path) == 3 and path[0] == "data" and \
        path[1] in ("sources", "validation") else None
    kind = base.get("type", default)
    return kind is not None and "type" in child and kind != child["type"]


def _exists(data: Any, path: KeyPath) -> bool:
    for key in path:
        if (isinstance(data, dict) and key in data) or (
            isinstance(data, list) and isinstance(key, int) and 0 <= key < len(data)
        ):
            data = data[key]
        else:
            return False
    return True


def resolved_now(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's resolved recipe with this emrun's defaults filled in. A setting that
    emrun gained since the checkpoint was written is absent from it and resolves to its
    default now: compared as saved, an unchanged recipe was "changed" (its model, tasks or
    data refused, other sections reported as applied from here on). As saved when this
    emrun does not take it as a recipe (a setting renamed or removed since)."""
    try:
        return Recipe.model_validate(saved).resolved()
    except Exception:  # pydantic's ValidationError, or a check of a spec's own
        return saved
