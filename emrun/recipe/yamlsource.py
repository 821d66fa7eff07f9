"""YAML parsing that remembers where every value came from.

PyYAML's composer keeps line/column marks on nodes; we build plain Python data from the node
tree ourselves so that each key path gets the mark of its key and of its value, duplicate
keys are caught, and syntax errors become located problems.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import KeyPath, Mark, Problem, RecipeError

MAX_BYTES = 10 * 1024 * 1024


@dataclass
class Located:
    """Plain data plus the mark of every key path (value marks and key marks)."""

    data: Any
    values: dict[KeyPath, Mark] = field(default_factory=dict)
    keys: dict[KeyPath, Mark] = field(default_factory=dict)

    def mark(self, path: KeyPath, key: bool = False) -> Mark | None:
        """The mark of ``path`` or of its nearest marked ancestor."""
        table = self.keys if key else self.values
        for n in range(len(path), -1, -1):
            prefix = path[:n]
            if prefix in table:
                return table[prefix]
            if prefix in self.values:
                return self.values[prefix]
        return None


def read_text(path: Path, shown: str) -> str:
    """The file's text, or a located problem saying why it cannot be a recipe."""
    def fail(message: str) -> RecipeError:
        return RecipeError([Problem(message, Mark(shown))])

    if not path.exists():
        raise fail("no such file")
    if path.is_dir():
        raise fail("is a directory, not a recipe file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise fail(f"cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_BYTES:
        raise fail(f"is {len(raw)} bytes; a recipe is a small YAML text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise fail(f"is not a UTF-8 text file (invalid byte at offset {exc.start})") from None


def _mark(shown: str, node_mark: yaml.Mark) -> Mark:
    return Mark(shown, node_mark.line + 1, node_mark.column + 1)


def parse(text: str, shown: str) -> Located:
    """Parse one YAML document into located plain data."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise RecipeError([Problem("the file is empty; a recipe is a mapping with name, "
                                       "data, model, tasks and train", Mark(shown))])
        located = Located(None)
        located.data = _convert(loader, node, (), located, shown)
        return located
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = exc.problem or str(exc)
        if "'\\t'" in message:
            message += " (tabs are not allowed for indentation in YAML; use spaces)"
        if exc.context and exc.problem:
            message = f"{exc.context}: {message}"
        where = _mark(shown, mark) if mark else Mark(shown)
        raise RecipeError([Problem(f"invalid YAML: {message}", where)]) from None
    except yaml.YAMLError as exc:
        raise RecipeError([Problem(f"invalid YAML: {exc}", Mark(shown))]) from None
    except RecursionError:
        raise RecipeError([Problem("YAML nested too deeply", Mark(shown))]) from None
    finally:
        loader.dispose()


def _convert(loader: yaml.SafeLoader, node: yaml.Node, path: KeyPath, out: Located,
             shown: str) -> Any:
    out.values[path] = _mark(shown, node.start_mark)
    if isinstance(node, yaml.MappingNode):
        own_keys: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool) or key is None:
                raise RecipeError([Problem(f"keys must be plain names, not {key!r}",
                                           _mark(shown, key_node.start_mark))])
            if key in own_keys:
                first = own_keys[key].start_mark.line + 1
                raise RecipeError([Problem(
                    f"duplicate key {key!r} (first defined on line {first})",
                    _mark(shown, key_node.start_mark), (*path, key))])
            own_keys[key] = key_node
        loader.flatten_mapping(node)  # YAML merge keys (<<): explicit keys come last and win
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            out.keys[(*path, key)] = _mark(shown, key_node.start_mark)
            result[key] = _convert(loader, value_node, (*path, key), out, shown)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_convert(loader, item, (*path, i), out, shown) for i, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)
