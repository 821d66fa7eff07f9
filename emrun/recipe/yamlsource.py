"""YAML parsing that remembers where every value came from.

PyYAML's composer keeps line/column marks on nodes; we build plain Python data from the node
tree ourselves so that each key path gets the mark of its key and of its value, duplicate
keys are caught, and syntax errors become located problems.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..paths import is_link_loop, not_a_file
from ..shipped import shipped_recipes
from .errors import KeyPath, Mark, Problem, RecipeError

MAX_BYTES = 10 * 1024 * 1024


@dataclass
class Located:
    """Plain data plus the mark of every key path (value marks and key marks)."""

    data: Any
    values: dict[KeyPath, Mark] = field(default_factory=dict)
    keys: dict[KeyPath, Mark] = field(default_factory=dict)
    hints: dict[Mark, str] = field(default_factory=dict)
    """By the mark of a plain (unquoted) scalar: what YAML made of it that its author may
    not have meant (``1e3``, a string), for any problem located at it."""

    def copy(self, data: Any) -> Located:
        """``data`` with these marks and hints (each table copied)."""
        return Located(data, dict(self.values), dict(self.keys), dict(self.hints))

    def hinted(self, problem: Problem) -> Problem:
        """``problem`` with the hint for the scalar it is located at, if that has one."""
        hint = self.hints.get(problem.mark) if problem.mark is not None else None
        if hint is None or hint in problem.message:
            return problem
        return Problem(f"{problem.message}; {hint}", problem.mark, problem.path)

    def mark(self, path: KeyPath, key: bool = False) -> Mark | None:
        """The mark of ``path`` or of its nearest marked ancestor.

        A value that starts on a later line than its key (a block mapping or list) is
        reported at its key: ``train:`` rather than the first line inside it.
        """
        prefix = self.marked(path, key)
        if prefix is None:
            return None
        table = self.keys if key and prefix in self.keys else self.values
        return self._at_key(prefix, table[prefix])

    def marked(self, path: KeyPath, key: bool = False) -> KeyPath | None:
        """``path`` or its nearest ancestor that has a mark: the one ``mark`` reports."""
        table = self.keys if key else self.values
        for n in range(len(path), -1, -1):
            prefix = path[:n]
            if prefix in table or prefix in self.values:
                return prefix
        return None

    def _at_key(self, path: KeyPath, mark: Mark) -> Mark:
        key = self.keys.get(path)
        if key is not None and key.file == mark.file and key.line < mark.line:
            return key
        return mark


def read_text(path: Path, shown: str) -> str:
    """The file's text, or a located problem saying why it cannot be a recipe."""
    def fail(message: str) -> RecipeError:
        return RecipeError([Problem(message, Mark(shown))])

    if is_link_loop(path):
        raise fail("is a loop of symbolic links")
    if not path.exists():
        raise fail("no such file" + _shipped_hint(path))
    if path.is_dir():
        raise fail("is a directory, not a recipe file")
    if (why := not_a_file(path)) is not None:
        raise fail(why)
    try:
        with path.open("rb") as stream:  # bounded: a device or pipe must not read forever
            raw = stream.read(MAX_BYTES + 1)
    except OSError as exc:
        raise fail(f"cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_BYTES:
        raise fail(f"is larger than {MAX_BYTES // 2**20} MiB; a recipe is a small YAML text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise fail(f"is not a UTF-8 text file (invalid byte at offset {exc.start})") from None


def _shipped_hint(path: Path) -> str:
    """Where a missing recipe is named like a shipped one (`emrun validate demo`, or
    `recipes/demo.yaml` away from a clone): the shipped file's path, which a pip install
    has inside the package and nowhere else."""
    stem = path.name.removesuffix(".yaml").removesuffix(".yml")
    found = {p.stem: p for p in shipped_recipes()}.get(stem)
    return "" if found is None else f"; the shipped recipe {found.stem!r} is {found}"


E_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+")
"""A number in e-notation; YAML 1.1 reads it as a string unless it has a '.' (1e3)."""


def e_number_hint(word: str) -> str | None:
    """For a plain scalar that YAML 1.1 read as a string: how to write the number it looks
    like (None when it does not look like one)."""
    if not E_NUMBER.fullmatch(word):
        return None
    number = float(word)
    if number.is_integer() and abs(number) < 1e18:
        return f"YAML reads {word} as a string; write {int(number)}"
    mantissa, e, exponent = word.lower().partition("e")
    dotted_ = mantissa if "." in mantissa else f"{mantissa}.0"
    signed = exponent if exponent[:1] in "+-" else f"+{exponent}"  # YAML 1.1 needs both
    return f"YAML reads {word} as a string; write {dotted_}{e}{signed}"


def _mark(shown: str, node_mark: yaml.Mark) -> Mark:
    return Mark(shown, node_mark.line + 1, node_mark.column + 1)


FAST_LOADER = getattr(yaml, "CSafeLoader", None)
"""libyaml's parser where PyYAML has it: the same nodes and marks, several times faster on a
generated file of thousands of keys. A text it refuses is parsed again by PyYAML's own
parser, whose messages name the problem better."""


def parse(text: str, shown: str) -> Located:
    """Parse one YAML document into located plain data."""
    if FAST_LOADER is not None:
        try:
            return _parse(text, shown, FAST_LOADER)
        except RecipeError:
            pass  # reported below, in PyYAML's words
    return _parse(text, shown, yaml.SafeLoader)


def _parse(text: str, shown: str, kind: type) -> Located:
    loader = None
    try:
        loader = kind(text)  # checks the characters already
        node = loader.get_single_node()
        if node is None:
            raise RecipeError([Problem("the file is empty; a recipe is a mapping with name, "
                                       "data, model, tasks and train", Mark(shown))])
        located = Located(None)
        located.data = _Converter(loader, located, shown).convert(node, ())
        return located
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = _mark(shown, mark) if mark else Mark(shown)
        raise RecipeError([Problem(f"invalid YAML: {_yaml_message(exc)}", where)]) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        col = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        raise RecipeError([Problem(f"invalid YAML: character U+{exc.character:04X} is not "
                                   "allowed in a YAML file", Mark(shown, line, col))]) from None
    except yaml.YAMLError as exc:
        raise RecipeError([Problem(f"invalid YAML: {exc}", Mark(shown))]) from None
    except RecursionError:
        raise RecipeError([Problem(f"YAML nested too deeply (more than {MAX_NESTING} levels)",
                                   _too_deep_at(text, shown))]) from None
    finally:
        if loader is not None:
            loader.dispose()


def _too_deep_at(text: str, shown: str) -> Mark:
    """Where a flow collection (``[`` or ``{``) opens more than `MAX_NESTING` levels deep:
    the parser's recursion gave out before it could say (no line was named)."""
    depth = 0
    for i, char in enumerate(text):
        if char in "[{":
            depth += 1
            if depth > MAX_NESTING:
                line = text.count("\n", 0, i) + 1
                return Mark(shown, line, i - (text.rfind("\n", 0, i) + 1) + 1)
        elif char in "]}":
            depth = max(0, depth - 1)
    return Mark(shown)


_CONTEXTS = {
    "while parsing a flow sequence": "the [...] list",
    "while parsing a flow mapping": "the {...} mapping",
    "while scanning a quoted scalar": "the quoted string",
    "while parsing a block mapping": "the block",
    "while parsing a block collection": "the list",
}


def _yaml_message(exc: yaml.MarkedYAMLError) -> str:
    """PyYAML's problem in words a recipe author can act on."""
    message = exc.problem or str(exc)
    if "'\\t'" in message:
        return "a tab character; YAML indentation must use spaces, not tabs"
    if message.startswith("expected <block end>"):
        message = "this line is not indented like the lines above it"
    if message == "mapping values are not allowed here":
        message += " (put a value that contains ': ' in quotes)"
    if message == "but found another document":
        return "a recipe is one YAML document, but another one starts here"
    context, start, end = exc.context, exc.context_mark, exc.problem_mark
    what = _CONTEXTS.get(context or "")
    if what and start is not None and (end is None or start.line != end.line):
        return f"{message} ({what} that starts on line {start.line + 1})"
    if context:
        return f"{context}: {message}"
    return message


MAX_EXPANDED = 100_000
"""Values that YAML aliases may repeat in all: a recipe needs few; a 'billion laughs' many."""
MAX_NESTING = 32
"""No recipe setting is nested this deep; deeper is refused whatever the interpreter's recursion
limit (torch.compile raises it, which used to change the message a 1000-deep value got)."""


def too_large(value: Any) -> str | None:
    """Why ``value`` (an override's, parsed by PyYAML) cannot be a setting, or None: nested
    too deep, or more values than aliases may repeat (a 'billion laughs' in a short ``-o``
    value would otherwise be walked, and validated, for hours). Counted without recursion."""
    count, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, dict | list):
            continue
        if depth + 1 > MAX_NESTING:
            return "the value is nested too deeply"
        children = list(item.values()) if isinstance(item, dict) else item
        count += len(children)
        if count > MAX_EXPANDED:
            return f"the value holds more than {MAX_EXPANDED:,} values; a setting is small"
        stack.extend((child, depth + 1) for child in children)
    return None


STR_TAG = "tag:yaml.org,2002:str"
COLLECTION_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")
"""The tags of the mappings and lists a recipe holds: another (!!set, !!omap, a
!!python/object the safe loader would refuse) was dropped without a word."""


def tag_text(tag: str) -> str:
    """A tag as its author wrote it: ``!!int`` for YAML's own."""
    return tag.replace("tag:yaml.org,2002:", "!!")


def construct_scalar(loader: Any, node: yaml.Node, mark: Mark, path: KeyPath) -> Any:
    """The value of a scalar node; a tag that cannot read its text (``!!int one``,
    ``!!bool maybe``) is a located problem (PyYAML raised ValueError, KeyError, ...: an
    internal error)."""
    try:
        return loader.construct_object(node, deep=True)
    except yaml.YAMLError:
        raise
    except (ValueError, KeyError, AttributeError, TypeError, OverflowError):
        raise RecipeError([Problem(f"invalid YAML: {tag_text(node.tag)} cannot read "
                                   f"{node.value!r}", mark, path)]) from None


class _Converter:
    """Plain data from a node tree, recording the marks of every key path."""

    def __init__(self, loader: yaml.SafeLoader, out: Located, shown: str) -> None:
        self.loader, self.out, self.shown = loader, out, shown
        self.seen: set[int] = set()
        self.open: set[int] = set()  # nodes being converted: a node inside itself is a cycle
        self.repeated = 0

    def convert(self, node: yaml.Node, path: KeyPath) -> Any:
        shown = self.shown
        if id(node) in self.open:
            raise RecipeError([Problem("an alias refers to the value that contains it",
                                       _mark(shown, node.start_mark), path)])
        if id(node) in self.seen:
            self.repeated += 1
            if self.repeated > MAX_EXPANDED:
                raise RecipeError([Problem(f"aliases repeat more than {MAX_EXPANDED:,} values; "
                                           "a recipe is small", _mark(shown, node.start_mark),
                                           path)])
        if len(path) > MAX_NESTING:
            raise RecipeError([Problem(f"YAML nested too deeply (more than {MAX_NESTING} levels)",
                                       _mark(shown, node.start_mark))])
        self.seen.add(id(node))
        mark = self.out.values[path] = _mark(shown, node.start_mark)
        if not isinstance(node, yaml.MappingNode | yaml.SequenceNode):
            # plain only (libyaml's style is '', PyYAML's None): '1e3' in quotes is meant
            if node.tag == STR_TAG and not node.style and (hint := e_number_hint(node.value)):
                self.out.hints[mark] = hint
            return construct_scalar(self.loader, node, mark, path)
        if node.tag not in COLLECTION_TAGS:
            raise RecipeError([Problem(f"invalid YAML: {tag_text(node.tag)} is not a tag a "
                                       "recipe uses; remove it", mark, path)])
        self.open.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self.convert(item, (*path, i)) for i, item in enumerate(node.value)]
            return self._mapping(node, path)
        finally:
            self.open.discard(id(node))

    def _mapping(self, node: yaml.MappingNode, path: KeyPath) -> dict[Any, Any]:
        loader, shown = self.loader, self.shown
        own_keys: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                raise RecipeError([Problem("keys must be plain names, not a list or mapping",
                                           _mark(shown, key_node.start_mark), path)])
            key = construct_scalar(loader, key_node, _mark(shown, key_node.start_mark), path)
            if not isinstance(key, str | int | float | bool) or key is None:
                raise RecipeError([Problem(f"keys must be plain names, not {key!r}",
                                           _mark(shown, key_node.start_mark), path)])
            if key in own_keys:
                first = own_keys[key].start_mark.line + 1
                raise RecipeError([Problem(
                    f"duplicate key {key!r} (first defined on line {first})",
                    _mark(shown, key_node.start_mark), (*path, key))])
            own_keys[key] = key_node
        loader.flatten_mapping(node)  # YAML merge keys (<<): explicit keys come last and win
        pairs = [(loader.construct_object(k, deep=True), k, v) for k, v in node.value]
        winner = {key: i for i, (key, _, _) in enumerate(pairs)}
        result: dict[Any, Any] = {}
        for i, (key, key_node, value_node) in enumerate(pairs):
            if winner[key] != i:  # a merged value a later key replaces: converting it left
                continue  # its inner keys' places behind, blamed for what the winner lacks
            self.out.keys[(*path, key)] = _mark(shown, key_node.start_mark)
            result[key] = self.convert(value_node, (*path, key))
        return result
