"""Turn pydantic's validation errors into located, human problems with "did you mean"."""

from __future__ import annotations

import datetime
import difflib
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import ErrorDetails

from ..registry import ALL, not_a_name, suggest
from .errors import KeyedValueError, KeyPath, Problem
from .recipe import Recipe
from .yamlsource import Located

NAME_PATTERNS = {
    r"^[A-Za-z][A-Za-z0-9_\-]*$": "must start with a letter and use only letters, digits, "
    "'_' and '-'",
}
"""Regular expressions of the recipe's string fields, in words."""

MAPPING_ERRORS = ("dict_type", "model_type", "model_attributes_type")


def problem_from_error(err: ErrorDetails, located: Located) -> Problem:
    """One pydantic error as a Problem at the right file position."""
    loc = tuple(err["loc"])
    error = (err.get("ctx") or {}).get("error")
    if isinstance(error, KeyedValueError):  # a whole-model check about one of its keys
        loc = (*loc, error.key)
    kind = err["type"]
    if _is_key_error(err):
        return _key_problem(err, loc, located)
    path = _data_path(located.data, loc, missing=kind == "missing")
    message = _message(err, loc)
    if kind == "missing" and isinstance(loc[-1], int) and path[-1:] == loc[-1:]:
        parent = _value_at(located.data, path[:-1])
        if isinstance(parent, list):  # a tuple too short: pydantic calls item N "missing"
            path = path[:-1]
            message = f"should be {_sequence_words(loc[:-1])}, not {len(parent)}"
    at = _value_at(located.data, path)
    if kind in ("union_tag_invalid", "union_tag_not_found") and isinstance(at, dict) \
            and "type" in at:
        path = (*path, "type")  # point at the misspelled (or empty) name itself
    key_level = kind in ("extra_forbidden",) or loc[-1:] == ("[key]",)
    return Problem(message, located.mark(path, key=key_level), path)


WRONG_FORM = frozenset({"float_type", "int_type", "tuple_type", "list_type", "dict_type",
                        "string_type", "bool_type", "float_parsing", "int_parsing",
                        "int_from_float", "model_type", "model_attributes_type"})
"""Errors that say a value is not of one form of a union (a number where a list is also
taken): beside an error about the form the value has, they are noise."""


def relevant_errors(errors: list[ErrorDetails], data: Any) -> list[ErrorDetails]:
    """``errors`` without those of union members the value does not have the form of: a
    value taken as a number or a z, y, x list (``sigma: 0``) got one line per member, the
    list's 'should be a list of values' beside the number's 'greater than 0'. A wrong-form
    error goes where another error lies at its key or within it."""
    paths = [_data_path(data, tuple(err["loc"])) for err in errors]
    # a key YAML read as a number or true (`0x10:`, `yes:`): the name is what is wrong, not
    # what its value lacks (a task's missing target was said under the key "16", and the
    # key's own error, taken for a wrong form, was left out)
    keys = [tuple(err["loc"])[:-1] for err in errors if _is_key_error(err)]  # pydantic's own
    kept = []
    for i, err in enumerate(errors):
        if _is_key_error(err):
            kept.append(err)
            continue
        if any(tuple(err["loc"])[:len(key)] == key for key in keys):
            continue
        if err["type"] in WRONG_FORM and any(
                j != i and errors[j]["type"] not in WRONG_FORM and other[:len(paths[i])] == paths[i]
                for j, other in enumerate(paths)):
            continue
        kept.append(err)
    return kept


def _is_key_error(err: ErrorDetails) -> bool:
    """Whether pydantic's error is about a mapping key itself (see `_key_problem`)."""
    loc = tuple(err["loc"])
    return err["type"] == "invalid_key" or (err["type"] == "string_type" and
                                            loc[-1:] == ("[key]",))


def _key_problem(err: ErrorDetails, loc: tuple[Any, ...], located: Located) -> Problem:
    """A mapping key that is no string: YAML 1.1 reads ``on:`` as true and ``1.5:`` as a
    number. Pydantic's loc names such a key as it likes (true as 1, 1.5 as '1.5'), so the
    problem is about the mapping, located at the key itself (the input is the key)."""
    key = err.get("input")
    parent = _data_path(located.data, loc[:-2] if loc[-1:] == ("[key]",) else loc[:-1])
    if isinstance(key, bool):
        what = (f"{str(key).lower()}, not as a name (YAML reads yes, no, on and off as "
                "true or false)")
    elif isinstance(key, int | float):
        what = f"the number {key!r}, not as a name"
    else:
        what = f"{key!r}, not as a name"
    return Problem(f"this key is read by YAML as {what}; put the name in quotes",
                   located.mark((*parent, key), key=True), parent)


def _data_path(data: Any, loc: tuple[Any, ...], missing: bool = False) -> KeyPath:
    """The key path in the user's data: pydantic's loc without union tags or '[key]'.

    A step that is not in the data is a union tag (e.g. 'rsunet'), unless it is the last one
    of a "missing" error: then it is the key that is missing.
    """
    path: list[str | int] = []
    node = data
    tp: Any = Recipe  # the type at this point of ``loc``, to tell union tags from keys
    for i, step in enumerate(loc):
        if isinstance(step, str) and step in _tags(tp):
            tp = _descend(tp, step)
            continue  # a union tag, even where the data has a key of the same name
        tp = _descend(tp, step) if tp is not None else None
        if (isinstance(node, dict) and step in node) or (
            isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node)
        ):
            node = node[step]
        elif i == len(loc) - 1 and missing:
            node = None
        elif isinstance(node, int | float) and isinstance(step, str):
            continue  # a union member's tag under a number ('constrained-float', 'tuple[...]')
        elif not isinstance(node, dict | list):
            node = None  # a value that was expanded (e.g. a preset)
        else:
            continue  # a union tag such as 'rsunet' or 'function-after[...]', or '[key]'
        path.append(step)
    return tuple(path)


def _value_at(data: Any, path: KeyPath) -> Any:
    """The value at ``path``, or None where the data has none."""
    for step in path:
        try:
            data = data[step]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _message(err: ErrorDetails, loc: tuple[Any, ...]) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    value = err.get("input")
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        key = str(loc[-1])
        known = _field_names(loc[:-1])
        hint = _close(key, known)
        did = f"; did you mean {' or '.join(repr(h) for h in hint)}?" if hint else ""
        allowed = f" (allowed: {', '.join(known)})" if known and not hint else ""
        return f"unknown key {key!r}{did}{allowed}"
    if kind == "union_tag_invalid":
        # the value as written: pydantic's tag is its str() (an empty `type:` read 'None')
        tag = value["type"] if isinstance(value, dict) and "type" in value else ctx.get("tag")
        registry = _registry_for(ctx.get("expected_tags", ""))
        if registry is not None:
            return registry.unknown_message(tag)
        options = [t.strip(" '") for t in str(ctx.get("expected_tags", "")).split(",")]
        what = f"{loc[-1]}" if loc and isinstance(loc[-1], str) else "its"
        if (empty := not_a_name(tag, what, ", ".join(options))) is not None:
            return empty
        hint = _close(str(tag), options)
        did = f"; did you mean {' or '.join(repr(h) for h in hint)}?" if hint else ""
        what = f"{loc[-1]} type" if loc and isinstance(loc[-1], str) else "type"
        return f"unknown {what} {tag!r}{did} (known: {', '.join(options)})"
    if kind == "union_tag_not_found" and isinstance(value, dict):
        tags = _union_tags(loc)
        names = ", ".join(tags)
        registry = _registry_for(names)
        # `type:` given as no name (a union's default type applies only where it is absent)
        if "type" in value and (empty := not_a_name(
                value["type"], registry.kind if registry else "its", names)) is not None:
            return empty
        return f"missing `type:` (one of: {names})" if names else "missing `type:`"
    if loc[-1:] == ("[key]",) and kind == "string_pattern_mismatch":
        return f"the name {value!r} {NAME_PATTERNS.get(ctx.get('pattern'), 'is not allowed')}"
    if kind == "string_pattern_mismatch" and ctx.get("pattern") in NAME_PATTERNS:
        return f"{NAME_PATTERNS[ctx['pattern']]} (got {value!r})"
    if kind in MAPPING_ERRORS or kind == "union_tag_not_found":  # the latter: not a mapping
        if value is None:
            return "is empty; it should be a mapping of keys to values"
        message = "should be a mapping of keys to values"
        if isinstance(value, str) and value in _union_tags(loc):
            message += f"; write {{type: {value}}}"
    elif kind == "tuple_type":
        message = f"should be {_sequence_words(loc)}"
    elif kind in ("too_short", "too_long") and "actual_length" in ctx:
        actual = ctx["actual_length"]
        if ctx.get("field_type") == "Tuple":
            return f"should be {_sequence_words(loc)}, not {actual}"
        dictionary = ctx.get("field_type") == "Dictionary"

        def items(n: int) -> str:
            if dictionary:
                return f"{n} entr{'y' if n == 1 else 'ies'}"
            return f"{n} item{'' if n == 1 else 's'}"

        if kind == "too_long":
            return f"has {items(actual)}; at most {ctx.get('max_length')} are allowed"
        least = f"needs at least {items(ctx.get('min_length', 1))}"
        return f"is empty; it {least}" if actual == 0 else f"has {items(actual)}; it {least}"
    else:
        message = err["msg"]
        for prefix in ("Value error, ", "Assertion failed, "):
            message = message.removeprefix(prefix)
        if message:
            message = message[0].lower() + message[1:]
    if kind == "literal_error" and isinstance(value, str):
        expected = str(ctx.get("expected", "")).replace(" or ", ",")
        quoted = [o.strip() for o in expected.split(",")]
        options = [o.strip(" '") for o in quoted]
        if value.strip() in [o for o in quoted if not o.startswith("'")]:  # '8' for 8
            message += f"; write {value.strip()} without quotes (a number, not text)"
        elif hint := _close(value, options):
            message += f"; did you mean {' or '.join(repr(h) for h in hint)}?"
    if isinstance(value, str | int | float | bool) and kind != "value_error":
        shown = str(value).lower() if isinstance(value, bool) else repr(value)  # YAML's words
        if len(shown) > 60:
            shown = shown[:57] + "..."
        message += f" (got {shown})"
    elif kind != "value_error":
        message += _unexpected(value)
    return message


def _unexpected(value: Any) -> str:
    """What YAML made of a value that is none of the plain kinds: nothing after the colon
    (``name:``), or a date (``name: 2024-01-01``, which YAML reads as a date, not text)."""
    if value is None:
        return " (the value is empty)"
    if isinstance(value, datetime.date):
        return (f" (YAML reads {value.isoformat()} as a date; put it in quotes to make it "
                "text)")
    return ""


def _close(word: str, choices: list[str]) -> list[str]:
    """The suggestions for ``word`` that are about equally close (at most two)."""
    hints = suggest(word, choices)
    if len(hints) < 2:
        return hints
    score = [difflib.SequenceMatcher(None, word, h).ratio() for h in hints]
    best = max(score)
    return sorted(h for h, r in zip(hints, score, strict=True) if r >= best - 0.05)[:2]


def _sequence_words(loc: tuple[Any, ...]) -> str:
    """'a list of 3 values (z, y, x)' for the tuple field at ``loc``."""
    tp = _unwrap(_annotation_at(loc), None)
    args = typing.get_args(tp) if typing.get_origin(tp) is tuple else ()
    if not args or Ellipsis in args:
        return "a list of values"
    axes = " (z, y, x)" if len(args) == 3 else ""
    return f"a list of {len(args)} values{axes}"


def _union_tags(loc: tuple[Any, ...]) -> list[str]:
    """The `type:` names a tagged union at ``loc`` accepts (empty when it is no union)."""
    return _tags(_annotation_at(loc))


def _tags(tp: Any) -> list[str]:
    """The `type:` names of the members of union ``tp`` (empty when it is no union)."""
    tp = _unwrap(tp, None)
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return []
    return [tag for member in typing.get_args(tp) for tag in _type_tags(member)]


def _registry_for(expected: str) -> Any:
    tags = {t.strip(" '") for t in str(expected).split(",")}
    for registry in ALL.values():
        if set(registry.names()) == tags:
            return registry
    return None


def _annotation_at(loc: tuple[Any, ...]) -> Any:
    """The annotation of the field at ``loc`` (union tags pick the member); None if unknown."""
    tp: Any = Recipe
    for step in loc:
        tp = _descend(tp, step)
        if tp is None:
            return None
    return tp


def _field_names(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model at ``loc`` (union tags pick the member)."""
    tp = _unwrap(_annotation_at(loc), None)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return list(tp.model_fields)
    return []


def _unwrap(tp: Any, tag: Any) -> Any:
    """Strip Annotated/Optional; pick a union member by ``tag`` when given."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(members) == 1:  # Optional[X]: X (a tuple such as Zyx | None too)
                tp = members[0]
                continue
            chosen = [m for m in members if tag is not None and tag in _type_tags(m)]
            if chosen:
                return _unwrap(chosen[0], None)
            models = [m for m in members if isinstance(_unwrap(m, None), type)]
            if len(models) != 1:
                return tp
            tp = models[0]
        else:
            return tp


def _type_tags(tp: Any) -> tuple[str, ...]:
    """The `type:` values a model accepts (its Literal), empty for other types."""
    tp = _unwrap(tp, None)
    if isinstance(tp, type) and issubclass(tp, BaseModel) and "type" in tp.model_fields:
        return tuple(str(a) for a in typing.get_args(tp.model_fields["type"].annotation))
    return ()


def _descend(tp: Any, step: Any) -> Any:
    tp_inner = _unwrap(tp, step)
    origin = typing.get_origin(tp_inner)
    if origin in (typing.Union, types.UnionType):
        return tp_inner  # a tag step will pick the member next
    if isinstance(tp_inner, type) and issubclass(tp_inner, BaseModel):
        if step in _type_tags(tp_inner) and step not in tp_inner.model_fields:
            return tp_inner  # the union tag itself
        field = tp_inner.model_fields.get(step)
        return field.annotation if field else None
    if origin in (list, dict, tuple):
        return typing.get_args(tp_inner)[-1]
    return None
