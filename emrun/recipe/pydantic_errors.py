"""Turn pydantic's validation errors into located, human problems with "did you mean"."""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import ErrorDetails

from ..registry import ALL, suggest
from .errors import KeyPath, Problem
from .recipe import Recipe
from .yamlsource import Located


def problem_from_error(err: ErrorDetails, located: Located) -> Problem:
    """One pydantic error as a Problem at the right file position."""
    loc = tuple(err["loc"])
    path = _data_path(located.data, loc)
    kind = err["type"]
    message = _message(err, loc)
    key_level = kind in ("extra_forbidden",)
    return Problem(message, located.mark(path, key=key_level), path)


def _data_path(data: Any, loc: tuple[Any, ...]) -> KeyPath:
    """The key path in the user's data: pydantic's loc without union tags."""
    path: list[str | int] = []
    node = data
    for i, step in enumerate(loc):
        if (isinstance(node, dict) and step in node) or (isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node)):
            node = node[step]
        elif i == len(loc) - 1 or not isinstance(node, dict | list):
            node = None  # a missing key (last) or a value that was expanded (e.g. a preset)
        else:
            continue  # a union tag such as 'rsunet' or 'function-after[...]'
        path.append(step)
    return tuple(path)


def _message(err: ErrorDetails, loc: tuple[Any, ...]) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        key = str(loc[-1])
        known = _field_names(loc[:-1])
        hint = suggest(key, known)[:1]
        did = f"; did you mean {hint[0]!r}?" if hint else ""
        allowed = f" (allowed: {', '.join(known)})" if known and not hint else ""
        return f"unknown key {key!r}{did}{allowed}"
    if kind == "union_tag_invalid":
        tag = ctx.get("tag")
        registry = _registry_for(ctx.get("expected_tags", ""))
        if registry is not None:
            return registry.unknown_message(tag)
        return f"unknown type {tag!r} (expected one of: {ctx.get('expected_tags')})"
    if kind == "union_tag_not_found":
        registry = _registry_for(ctx.get("expected_tags", ""))
        names = ", ".join(registry.names()) if registry else ctx.get("expected_tags", "")
        return f"missing `type:` (one of: {names})"
    message = err["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    if message:
        message = message[0].lower() + message[1:]
    value = err.get("input")
    if kind == "literal_error" and isinstance(value, str):
        options = [o.strip(" '") for o in str(ctx.get("expected", "")).replace(" or ", ",").split(",")]
        hint = suggest(value, options)[:1]
        if hint:
            message += f"; did you mean {hint[0]!r}?"
    if isinstance(value, str | int | float | bool) and kind != "value_error":
        shown = repr(value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        message += f" (got {shown})"
    return message


def _registry_for(expected: str) -> Any:
    tags = {t.strip(" '") for t in str(expected).split(",")}
    for registry in ALL.values():
        if set(registry.names()) == tags:
            return registry
    return None


def _field_names(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model at ``loc`` (union tags pick the member)."""
    tp: Any = Recipe
    for step in loc:
        tp = _descend(tp, step)
        if tp is None:
            return []
    tp = _unwrap(tp, None)
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
            chosen = [m for m in members if tag is not None and _type_tag(m) == tag]
            if chosen:
                return _unwrap(chosen[0], None)
            models = [m for m in members if isinstance(_unwrap(m, None), type)]
            if len(models) != 1:
                return tp
            tp = models[0]
        else:
            return tp


def _type_tag(tp: Any) -> Any:
    tp = _unwrap(tp, None)
    if isinstance(tp, type) and issubclass(tp, BaseModel) and "type" in tp.model_fields:
        return tp.model_fields["type"].default
    return None


def _descend(tp: Any, step: Any) -> Any:
    tp_inner = _unwrap(tp, step)
    origin = typing.get_origin(tp_inner)
    if origin in (typing.Union, types.UnionType):
        return tp_inner  # a tag step will pick the member next
    if isinstance(tp_inner, type) and issubclass(tp_inner, BaseModel):
        if _type_tag(tp_inner) == step and step not in tp_inner.model_fields:
            return tp_inner  # the union tag itself
        field = tp_inner.model_fields.get(step)
        return field.annotation if field else None
    if origin in (list, dict, tuple):
        return typing.get_args(tp_inner)[-1]
    return None
