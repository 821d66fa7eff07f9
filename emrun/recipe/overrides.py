"""``-o key.path=value`` overrides: applied to located recipe data, and blamed for what they do.

What an override sets is located at the override (``override -o EXPR``), and so is every
mapping it had to create on the way to its key (``-o train.optimizer.lr=0.01`` on a recipe
without ``optimizer:``). A created mapping for a typed section starts as that section's
default (``{type: adam}`` there), so setting one field of a default section just works.

A problem the file does not have without the overrides is located at the one that brought
it, where that is clear: the offsets list around ``-o tasks.affinity.target.offsets.0.0=0``,
a schedule that ``-o train.schedule.type=step`` left without ``milestones``, offsets that
``-o infer.patch=[1,2,2]`` made too long for the patch. One the file has anyway stays at
its line.

A value YAML 1.1 reads otherwise than a user may mean (``no`` is false, ``1e3`` a string)
gets a hint in any problem about it.
"""

from __future__ import annotations

import copy
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from .augment import PRESETS
from .errors import KeyPath, Mark, Problem, RecipeError, dotted
from .pydantic_errors import _tags, _type_tags, _unwrap
from .recipe import Recipe
from .yamlsource import MAX_NESTING, STR_TAG, Located, e_number_hint, too_large

Found = set[tuple[KeyPath, str]]
"""The (key path, message) of every problem a recipe has."""


@dataclass(frozen=True)
class Override:
    """One applied override: where it is reported, the key path it set (list indices
    resolved) and hints for values in it that YAML reads unexpectedly (by key path within it)."""

    expr: str
    mark: Mark
    path: KeyPath
    hints: dict[KeyPath, str] = field(default_factory=dict)


def apply_override(located: Located, expr: str) -> Override:
    """Apply one ``key.path=value`` override (value parsed as YAML) in place."""
    shown = expr if len(expr) <= 80 else f"{expr[:77]}..."
    where = Mark(f"override -o {shown}")
    key, sep, text = expr.partition("=")
    if not sep or not key.strip():
        raise RecipeError([Problem("an override is written key.path=value", where)])
    parts = [p.strip() for p in key.split(".")]
    if any(not p for p in parts) or parts[0] == "extends":
        raise RecipeError([Problem(f"{key!r} is not a key path one can override", where)])
    try:
        value = yaml.safe_load(text)
    except RecursionError:
        raise RecipeError([Problem("the value is nested too deeply", where)]) from None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        mark = getattr(exc, "problem_mark", None)
        at = f" (at character {mark.column + 1} of the value)" if mark and mark.line == 0 else ""
        raise RecipeError([Problem(f"the value is not valid YAML: {problem}{at}", where)]) from None
    except (ValueError, KeyError, AttributeError, TypeError, OverflowError):
        raise RecipeError([Problem(f"the value is not valid YAML: a tag (!!...) cannot read "
                                   f"{text.strip()!r}", where)]) from None
    if (why := too_large(value) or _duplicate_key(text)) is not None:
        raise RecipeError([Problem(why, where)])
    node: Any = located.data
    path: list[str | int] = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not _is_index(part) or not -len(node) <= int(part) < len(node):
                raise RecipeError([Problem(f"{dotted(tuple(path))} is a list of {len(node)}; "
                                           f"{part!r} is not an index in it", where)])
            step: str | int = int(part) % len(node)
        elif isinstance(node, dict):
            step = part
            if not last and node.get(step) is None and _is_index(parts[i + 1]):
                whole = dotted((*path, step))
                raise RecipeError([Problem(
                    f"{whole} is not in the recipe, so it has no item {parts[i + 1]} to set; "
                    f"set the whole list (-o {whole}=[...])", where)])
            if not last and node.get(step) is None:
                # made by the override: as the section is by default where it has a `type:`;
                # a key written as null keeps its place (a task's is its head's order)
                default = _default_type(located.data, (*path, step))
                node[step] = {} if default is None else {"type": default}
                _locate(located, (*path, step), where)
        else:
            raise RecipeError([Problem(f"cannot set {key}: {dotted(tuple(path))} is "
                                       f"{node!r}, not a mapping", where)])
        path.append(step)
        if last:
            if step == "type" and node.get(step) != value:
                _hint_siblings(located, node, tuple(path[:-1]), key.rpartition(".")[0].strip())
            node[step] = value
        else:
            node[step] = _expanded(tuple(path), node[step])
            node = node[step]
    _locate(located, tuple(path), where)
    return Override(expr, where, tuple(path), _hints(text))


def _hint_siblings(located: Located, mapping: dict[Any, Any], parent: KeyPath,
                   shown: str) -> None:
    """A `type` an override changes keeps the mapping's other keys (another type's, most
    likely): a problem at one of them says so (it said "unknown key 'shape'" alone), and how
    to set the whole mapping instead, as a base's changed type replaces it (`extends`)."""
    for name in mapping:
        mark = located.keys.get((*parent, name))
        if name != "type" and mark is not None:
            located.hints[mark] = (f"a key of this mapping before -o changed its type; to "
                                   f"replace the whole mapping, give -o '{shown}={{type: ...}}'")


def _is_index(part: str) -> bool:
    """Whether a key path part is a list index (recipe keys are names that start with a
    letter, so a number there can only mean an item of a list); ASCII digits only (`١`,
    an Arabic-Indic one, was read as 1)."""
    digits = part.removeprefix("-")
    return digits.isascii() and digits.isdigit()


def _duplicate_key(text: str) -> str | None:
    """A key a mapping in the value has twice: PyYAML keeps the last silently, where a
    recipe file's duplicate is refused (``-o 'model={type: rsunet, type: updown}'``)."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        stack, seen = ([root] if root is not None else []), set()
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if isinstance(node, yaml.SequenceNode):
                stack.extend(node.value)
            elif isinstance(node, yaml.MappingNode):
                keys = [k for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"]
                names: set[Any] = set()
                for key in keys:
                    name = loader.construct_object(key, deep=True)
                    if name in names:
                        return f"the value has the key {name!r} twice"
                    names.add(name)
                stack.extend(v for _, v in node.value)
    except (yaml.YAMLError, TypeError):
        pass  # it parsed as a value already
    finally:
        loader.dispose()
    return None


def _expanded(path: KeyPath, value: Any) -> Any:
    """An augmentation preset's list where an override reaches into it (``-o augment.1.p=0.5``
    on ``augment: deepem``), so its items can be set like those of a written list."""
    if path == ("augment",) and isinstance(value, str) and value in PRESETS:
        return copy.deepcopy(PRESETS[value])
    return value


def _locate(located: Located, prefix: KeyPath, where: Mark) -> None:
    """``prefix`` and everything under it came from ``where``."""
    for table in (located.values, located.keys):
        for p in [p for p in table if p[: len(prefix)] == prefix]:
            del table[p]
        table[prefix] = where


def _default_type(data: Any, path: KeyPath) -> str | None:
    """The `type:` of the section at ``path`` when the recipe leaves it out: what the recipe
    as it stands validates to there (a task's loss follows its target: mse for lsd), else
    the field's own default (adam for train.optimizer). None where the field takes no
    `type:`, has no default, or is no known field."""
    info = _field_at(data, path)
    if info is None or not (_tags(info.annotation) or _type_tags(info.annotation)):
        return None
    try:
        value = _attribute_at(Recipe.model_validate(data), path)
    except Exception:  # not valid as it stands (half made, say): the field's own default
        try:
            value = info.get_default(call_default_factory=True)
        except Exception:  # a factory that needs the other fields: none to tell
            return None
    kind = getattr(value, "type", None) if isinstance(value, BaseModel) else None
    return kind if isinstance(kind, str) else None


def _field_at(data: Any, path: KeyPath) -> FieldInfo | None:
    """The recipe model's field at ``path`` in ``data`` (a union member picked by the
    data's `type:`), or None where ``path`` is no field."""
    tp: Any = Recipe
    node = data
    info = None
    for step in path:
        inner = _unwrap(tp, node.get("type") if isinstance(node, dict) else None)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            info = inner.model_fields.get(step) if isinstance(step, str) else None
            if info is None:
                return None
            tp = info.annotation
        elif typing.get_origin(inner) in (list, dict, tuple) and typing.get_args(inner):
            info, tp = None, typing.get_args(inner)[-1]
        else:
            return None
        node = node[step] if isinstance(node, dict) and step in node else None
    return info


def _attribute_at(value: Any, path: KeyPath) -> Any:
    """The part of a validated recipe at ``path`` (None where it has none)."""
    for step in path:
        if isinstance(value, dict):
            value = value.get(step)
        elif isinstance(value, list | tuple) and isinstance(step, int):
            value = value[step] if -len(value) <= step < len(value) else None
        elif isinstance(value, BaseModel) and isinstance(step, str):
            value = getattr(value, step, None)
        else:
            return None
    return value


# --------------------------------------------------------------------------- YAML hints

YAML_BOOLS = frozenset({"yes", "no", "on", "off"})
"""Words YAML 1.1 reads as true or false, which a user may mean as words."""


def _hints(text: str) -> dict[KeyPath, str]:
    """Hints for the scalars in an override's value that YAML 1.1 reads unexpectedly, by key
    path within the value: ``no`` is false, ``1e3`` the string '1e3'."""
    loader = yaml.SafeLoader(text)
    hints: dict[KeyPath, str] = {}
    try:
        root = loader.get_single_node()
        stack: list[tuple[yaml.Node, KeyPath]] = [(root, ())] if root is not None else []
        seen: set[int] = set()  # an alias repeats a node: look at it once
        while stack:
            node, path = stack.pop()
            if id(node) in seen or len(path) > MAX_NESTING:
                continue
            seen.add(id(node))
            if isinstance(node, yaml.SequenceNode):
                stack.extend((item, (*path, i)) for i, item in enumerate(node.value))
            elif isinstance(node, yaml.MappingNode):
                for key_node, value_node in node.value:
                    name = loader.construct_object(key_node, deep=True)
                    if isinstance(name, str | int):
                        stack.append((value_node, (*path, name)))
            elif isinstance(node, yaml.ScalarNode) and (hint := _scalar_hint(node)):
                hints[path] = hint
    except (yaml.YAMLError, RecursionError, TypeError):
        pass  # it parsed as a value already; a hint is a courtesy
    finally:
        loader.dispose()
    return hints


def _scalar_hint(node: yaml.ScalarNode) -> str | None:
    word = node.value
    if node.tag == "tag:yaml.org,2002:bool" and word.lower() in YAML_BOOLS:
        truth = "true" if word.lower() in ("yes", "on") else "false"
        return f"YAML reads {word} as {truth}; write '{word}' in quotes for the word"
    if node.tag == STR_TAG and not node.style:
        return e_number_hint(word)
    return None


def with_hint(problem: Problem, override: Override) -> Problem:
    """``problem`` (located at ``override``) with the hint for the value it is about."""
    hint = None
    if problem.path[: len(override.path)] == override.path:
        hint = override.hints.get(problem.path[len(override.path):])
    if hint is None:
        return problem
    return Problem(f"{problem.message}; {hint}", problem.mark, problem.path)


# --------------------------------------------------------------------------- blame


def blame(error: RecipeError, located: Located, base: Located, applied: Sequence[Override],
          found: Callable[[Located], Found]) -> RecipeError:
    """``error`` (the problems of ``located``: ``base`` with ``applied``) with each problem
    an override caused located at that override, and hints added.

    ``found`` lists the problems of a recipe; it is called for the recipe with fewer of the
    overrides applied, to see whether the file has a problem without them, or which
    override brought it.
    """
    states: dict[int, Found] = {len(applied): {(p.path, p.message) for p in error.problems}}

    def problems_after(count: int) -> Found:
        """The problems of ``base`` with the first ``count`` overrides applied."""
        if count not in states:
            state = base.copy(copy.deepcopy(base.data))
            for override in applied[:count]:
                apply_override(state, override.expr)
            states[count] = found(state)
        return states[count]

    problems = []
    for problem in error.problems:
        own = [o for o in applied if o.mark == problem.mark]
        if own:  # at a key it set, or at a mapping it made
            problems.append(with_hint(problem, own[-1]))
            continue
        culprit = _culprit(problem, located, applied, problems_after)
        if culprit is not None:
            problem = with_hint(Problem(problem.message, culprit.mark, problem.path), culprit)
        problems.append(problem)
    return RecipeError(list(dict.fromkeys(problems)), more=error.more)


def _culprit(problem: Problem, located: Located, applied: Sequence[Override],
             problems_after: Callable[[int], Found]) -> Override | None:
    """The override that brought ``problem``, or None where the file has it anyway (or which
    override did is not clear).

    The first override after which the problem appears brought it if the recipe was valid
    before it, or if it changed the mapping or list the problem is located at and nothing
    there was wrong before it (a problem there might have hidden this one: a mapping whose
    fields fail is not checked as a whole).
    """
    seen = (problem.path, problem.message)
    first = next((n for n in range(len(applied) + 1) if seen in problems_after(n)), None)
    if first is None or first == 0:  # the file has it (or it is beyond those listed)
        return None
    culprit, before = applied[first - 1], problems_after(first - 1)
    if not before:
        return culprit
    at = located.marked(problem.path)  # the mapping or list the problem got its mark from
    if at is None or culprit.path[: len(at)] != at:
        return None
    if any(path[: len(at)] == at for path, _ in before):
        return None
    return culprit
