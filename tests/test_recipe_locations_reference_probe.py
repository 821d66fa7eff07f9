"""Reference probe: where recipe problems point (file:line:col and key path).

The reference is a tiny YAML-subset scanner written here (block mappings and sequences, flow
`{}`/`[]` over several lines, comments, quoted keys, anchors, aliases and `<<` merges) that
owes nothing to PyYAML, which emrun's loader is built on. For a key path it gives the line
and column of the key and of its value; the documented rule is then: a problem about a value
points at the value, or at its key when the value starts on a later line (a block mapping or
list); an unknown key points at the key; a missing key at the mapping that lacks it. Bad
recipes are made by mutating a valid one (unknown keys in every mapping, wrong types at every
scalar, bad enums, out-of-range values, deletions of required keys), in the recipe file, in
files it `extends`, and through `-o` overrides, and every message is checked against it.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from emrun.cli import app
from emrun.recipe import RecipeError, load_recipe

Pos = tuple[int, int]  # 1-based line, column
KeyPath = tuple[str | int, ...]


# ------------------------------------------------------------------ the reference scanner


@dataclass
class RefMark:
    key: Pos | None  # where the key is written (None: a list item, or the root)
    value: Pos  # where the value starts
    copied: bool = False  # reached through an alias or a merge (written elsewhere)


class RefScan:
    """Key path -> RefMark for a YAML subset, by a hand-written character scan."""

    PLAIN_KEY = re.compile(r"""("[^"\n]*"|'[^'\n]*'|[^\s{}\[\],#&*!|>'"-][^:#\n{}\[\],]*?"""
                           r"""|-[^\s:#\n{}\[\],][^:#\n{}\[\],]*?)[ ]*:(?=[ \n]|$)""")

    def __init__(self, text: str) -> None:
        # comments become spaces: positions stay, and no '#' is ever read as content
        self.t = re.sub(r"(^|(?<=[ \t]))#[^\n]*", lambda m: " " * len(m.group(0)), text,
                        flags=re.M)
        self.marks: dict[KeyPath, RefMark] = {}
        self.anchors: dict[str, tuple[KeyPath, Pos]] = {}
        start = self._skip(0, newlines=True)
        self.root = self._node(start, (), None, 0)

    # positions
    def pos(self, i: int) -> Pos:
        line = self.t.count("\n", 0, i) + 1
        return line, i - (self.t.rfind("\n", 0, i) + 1) + 1

    def col(self, i: int) -> int:
        return self.pos(i)[1]

    def _skip(self, i: int, newlines: bool) -> int:
        spaces = " \t\n\r" if newlines else " \t"
        while i < len(self.t) and self.t[i] in spaces:
            i += 1
        return i

    def _eol(self, i: int) -> bool:
        return i >= len(self.t) or self.t[i] == "\n"

    # nodes
    def _node(self, i: int, path: KeyPath, key: Pos | None, indent: int) -> int:
        """Parse the node at i (block context); returns the index after it."""
        start = i
        if self.t.startswith("&", i):
            name = re.match(r"&(\S+)", self.t[i:]).group(1)
            i = self._skip(i + 1 + len(name), newlines=False)
            if self._eol(i):
                i = self._skip(i, newlines=True)
            self.anchors[name] = (path, self.pos(start))
        if self.t.startswith("*", i):
            return self._alias(i, path, key, start)
        self.marks[path] = RefMark(key, self.pos(start))
        if self.t[i] in "{[":
            return self._flow(i, path, key, start)
        if self.t.startswith("- ", i) or self.t.startswith("-\n", i):
            return self._block_seq(i, path)
        if self.PLAIN_KEY.match(self.t, i):
            return self._block_map(i, path)
        while not self._eol(i):
            i += 1
        return i

    def _alias(self, i: int, path: KeyPath, key: Pos | None, start: int) -> int:
        name = re.match(r"\*([^\s,\]}]+)", self.t[i:]).group(1)
        origin, at = self.anchors[name]
        for p, m in list(self.marks.items()):
            if p[: len(origin)] == origin:
                tail = p[len(origin):]
                self.marks[path + tail] = RefMark(key if not tail else m.key, m.value, True)
        self.marks[path] = RefMark(key, at, True)
        return i + 1 + len(name)

    def _next_line_start(self, i: int) -> int:
        """The first non-blank character at or after i, skipping the rest of this line."""
        while not self._eol(i):
            if self.t[i] not in " \t":
                return i
            i += 1
        return self._skip(i, newlines=True)

    def _block_map(self, i: int, path: KeyPath) -> int:
        indent = self.col(i)
        merges: list[tuple[str, Pos]] = []
        own: set[str] = set()
        while True:
            m = self.PLAIN_KEY.match(self.t, i)
            assert m, f"reference scan: no key at {self.pos(i)}"
            name = m.group(1).strip("'\"")
            key = self.pos(i)
            j = self._skip(m.end(), newlines=False)
            if name == "<<":
                alias = re.match(r"\*(\S+)", self.t[j:]).group(1)
                merges.append((alias, key))
                j += 1 + len(alias)
            else:
                own.add(name)
                if self._eol(j):
                    nxt = self._skip(j, newlines=True)
                    deeper = nxt < len(self.t) and (self.col(nxt) > indent or (
                        self.col(nxt) == indent and self.t.startswith("- ", nxt)))
                    if deeper:
                        j = self._node(nxt, (*path, name), key, indent)
                    else:
                        self.marks[(*path, name)] = RefMark(key, self.pos(j))
                else:
                    j = self._node(j, (*path, name), key, indent)
            i = self._next_line_start(j)
            if i >= len(self.t) or self.col(i) != indent or self.t.startswith("- ", i):
                break
        self._merge(path, [alias for alias, _ in merges], own)
        return i

    def _block_seq(self, i: int, path: KeyPath) -> int:
        indent = self.col(i)
        n = 0
        while True:
            j = self._skip(i + 1, newlines=False)
            if self._eol(j):
                j = self._skip(j, newlines=True)
            j = self._node(j, (*path, n), None, indent)
            n += 1
            i = self._next_line_start(j)
            if i >= len(self.t) or self.col(i) != indent or not self.t.startswith("- ", i):
                return i

    def _flow(self, i: int, path: KeyPath, key: Pos | None, start: int) -> int:
        opening = self.t[i]
        closing = "}" if opening == "{" else "]"
        i += 1
        n = 0
        merges: list[str] = []
        own: set[str] = set()
        while True:
            i = self._skip(i, newlines=True)
            if self.t[i] == closing:
                break
            if opening == "{":
                m = re.compile(r"""("[^"]*"|'[^']*'|[^:,{}\[\]\s][^:,{}\[\]]*?)\s*:(?=\s)"""
                               ).match(self.t, i)
                assert m, f"reference scan: no flow key at {self.pos(i)}"
                name = m.group(1).strip("'\"")
                kpos = self.pos(i)
                j = self._skip(m.end(), newlines=True)
                if name == "<<":
                    alias = re.match(r"\*([^\s,}]+)", self.t[j:]).group(1)
                    merges.append(alias)
                    i = j + 1 + len(alias)
                else:
                    own.add(name)
                    i = self._flow_value(j, (*path, name), kpos)
            else:
                i = self._flow_value(i, (*path, n), None)
                n += 1
            i = self._skip(i, newlines=True)
            if self.t[i] == ",":
                i += 1
        self._merge(path, merges, own)
        return i + 1

    def _merge(self, path: KeyPath, merges: list[str], own: set[str]) -> None:
        """Copy the marks of merged (``<<: *alias``) mappings; explicit keys win."""
        for alias in merges:
            origin, _at = self.anchors[alias]
            for p, mk in list(self.marks.items()):
                if len(p) > len(origin) and p[: len(origin)] == origin \
                        and p[len(origin)] not in own:
                    self.marks[path + p[len(origin):]] = RefMark(mk.key, mk.value, True)

    def _flow_value(self, i: int, path: KeyPath, key: Pos | None) -> int:
        start = i
        if self.t.startswith("&", i):
            name = re.match(r"&([^\s,\]}]+)", self.t[i:]).group(1)
            i = self._skip(i + 1 + len(name), newlines=True)
            self.anchors[name] = (path, self.pos(start))
        if self.t.startswith("*", i):
            return self._alias(i, path, key, start)
        self.marks[path] = RefMark(key, self.pos(start))
        if self.t[i] in "{[":
            return self._flow(i, path, key, start)
        if self.t[i] in "'\"":
            return self.t.index(self.t[i], i + 1) + 1
        while self.t[i] not in ",]}\n":
            i += 1
        return i


def expected(ref: RefScan, path: KeyPath, at_key: bool = False) -> Pos:
    """Where the README says a problem about ``path`` is reported (see the module docstring)."""
    n = len(path)
    while path[:n] not in ref.marks:
        n -= 1
    mark = ref.marks[path[:n]]
    if at_key and n == len(path) and mark.key is not None:
        return mark.key
    if mark.key is not None and mark.key[0] < mark.value[0]:
        return mark.key
    return mark.value


# ------------------------------------------------------------------ a valid recipe to mutate

BASE = """\
# a valid recipe: block and flow style, comments, blank lines, anchors, aliases, a merge

name: probe   # the run's name
seed: 3
data:

  sources:
    vol_a: &synth
      type: synthetic
      shape: [24, 96, 96]
      seed: 5
    vol_b: {<<: *synth, seed: 6}
    "vol_c": {type: synthetic,
              shape: [24, 96, 96],   # spans two lines
              seed: 7}
  validation:
    val_a:
      <<: *synth
      seed: 9
augment:
  - {type: grayscale, p: 0.5, contrast: 0.3, brightness: 0.3}
  # a comment between items
  - type: one_of
    of:
      - {type: missing_section, max_sections: 1}
      - type: misalign
        displacement: [2, 4]
    probs: [0.3, 0.3]
  - type: flip_rotate
    p: 0.5

model:
  type: rsunet
  widths: [8, 16, 32]
  norm: group
  groups: 4
  activation: elu
tasks:
  affinity:
    target:
      type: affinity
      zero: boundary
      offsets:
        - [-1, 0, 0]
        - [0, -1, 0]
        - [0, 0, -1]
        - [0, -4, 0]
    loss: {type: bce, balance: true}
    weight: 1.0
train:
  patch: [12, 64, 64]
  batch_size: 2
  iterations: 100
  optimizer: &opt {type: adam, lr: 0.002}
  schedule:
    type: cosine
    warmup: 5
  workers: 0
infer:
  patch: [12, 64, 64]
  blend: {type: bump}
  batch_size: 4
  precision: fp32
segment: {type: mws, bias: 0.5, min_size: 20}
"""

NAMED = {("data", "sources"), ("data", "validation"), ("tasks",)}
"""Mappings whose keys are the author's names (a stray key there is a new source or task)."""


def load(tmp_path: Path, text: str, overrides: tuple[str, ...] = (), name: str = "r.yaml",
         files: dict[str, str] | None = None) -> list[tuple[str, int, int, KeyPath, str]]:
    """The problems of a recipe as (file, line, col, key path, message); [] when valid."""
    for other, body in (files or {}).items():
        (tmp_path / other).write_text(body, encoding="utf-8")
    (tmp_path / name).write_text(text, encoding="utf-8")
    try:
        load_recipe(name, list(overrides))
    except RecipeError as exc:
        return [(p.mark.file if p.mark else "", p.mark.line if p.mark else 0,
                 p.mark.col if p.mark else 0, p.path, p.message) for p in exc.problems]
    return []


@pytest.fixture(autouse=True)
def _cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # messages name files as the user wrote them


def test_the_reference_scan_agrees_with_hand_counted_positions():
    ref = RefScan(BASE)
    m = ref.marks
    assert m[("name",)] == RefMark((3, 1), (3, 7))
    assert m[("data",)].key == (5, 1) and m[("data",)].value == (7, 3)
    assert m[("data", "sources", "vol_a")] == RefMark((8, 5), (8, 12))
    assert m[("data", "sources", "vol_a", "shape", 2)].value == (10, 23)
    assert m[("data", "sources", "vol_b", "seed")] == RefMark((12, 25), (12, 31))
    assert m[("data", "sources", "vol_b", "shape")].copied
    assert m[("data", "sources", "vol_c", "seed")] == RefMark((15, 15), (15, 21))
    assert m[("data", "validation", "val_a", "type")] == RefMark((9, 7), (9, 13), True)
    assert m[("augment", 1, "of", 1, "displacement", 1)].value == (27, 27)
    assert m[("augment", 1)] == RefMark(None, (23, 5))
    assert m[("tasks", "affinity", "target", "offsets", 3, 1)].value == (47, 15)
    assert m[("train", "optimizer", "lr")] == RefMark((54, 32), (54, 36))
    assert expected(ref, ("train", "schedule", "type")) == (56, 11)
    assert expected(ref, ("train", "schedule")) == (55, 3)  # a block value: its key
    assert expected(ref, ("train", "nope"), at_key=True) == (50, 1)  # train's key


def test_the_base_recipe_is_valid(tmp_path: Path):
    assert load(tmp_path, BASE) == []


# ------------------------------------------------------------------ mutations


def children(ref: RefScan, path: KeyPath) -> list[KeyPath]:
    return [q for q in ref.marks if len(q) == len(path) + 1 and q[: len(path)] == path]


def offset(text: str, pos: Pos) -> int:
    lines = text.split("\n")
    return sum(len(line) + 1 for line in lines[: pos[0] - 1]) + pos[1] - 1


@dataclass(frozen=True)
class Mutation:
    """Replace ``length`` characters at ``at`` by ``text``; a problem at ``path`` results
    (at its key when ``at_key``: an unknown key)."""

    at: int
    length: int
    text: str
    path: KeyPath
    at_key: bool


def unknown_key_mutations(source: str) -> list[Mutation]:
    """A stray key `zzz: 1` put first into every mapping the recipe writes (block or flow)."""
    ref = RefScan(source)
    found = []
    for path, mark in ref.marks.items():
        own = [q for q in children(ref, path) if isinstance(q[-1], str)
               and not ref.marks[q].copied]
        if not own or mark.copied or path in NAMED:
            continue
        first = min(ref.marks[q].key for q in own)
        i = offset(source, first)
        flow = "{" in source[offset(source, mark.value): i]
        text = "zzz: 1, " if flow else "zzz: 1\n" + " " * (first[1] - 1)
        found.append(Mutation(i, 0, text, (*path, "zzz"), True))
    return found


def value_mutations(source: str, value: str = "{q: 1}") -> list[Mutation]:
    """Every scalar the recipe writes replaced by ``value``."""
    ref = RefScan(source)
    found = []
    for path, mark in ref.marks.items():
        if children(ref, path) or mark.copied:
            continue
        i = offset(source, mark.value)
        length = re.match(r"[^\s,\]}]+", source[i:]).end()
        found.append(Mutation(i, length, value, path, False))
    return found


def mutate(source: str, mutations: list[Mutation]) -> str:
    for m in sorted(mutations, key=lambda m: -m.at):
        source = source[: m.at] + m.text + source[m.at + m.length:]
    return source


def wanted(text: str, mutations: list[Mutation], file: str = "r.yaml") -> set:
    """The problems the reference expects: each mutation's path, and every path an alias or
    a merge copies it to (one written mistake, reached at each of those settings)."""
    ref = RefScan(text)
    out = set()
    for m in mutations:
        mark = ref.marks[m.path]
        for q, other in ref.marks.items():
            if (len(q) == len(m.path) and q[-1] == m.path[-1] and other.value == mark.value
                    and other.key == mark.key):
                out.add((file, *expected(ref, q, m.at_key), q))
    return out


def located(problems: list) -> set:
    return {p[:4] for p in problems}


UNKNOWN = unknown_key_mutations(BASE)
WRONG_TYPE = value_mutations(BASE)


def test_the_mutations_cover_every_mapping_and_scalar_at_every_depth():
    depths = {len(m.path) for m in UNKNOWN}
    assert len(UNKNOWN) >= 20 and depths >= {1, 2, 3, 4, 5}
    assert len(WRONG_TYPE) >= 60 and max(len(m.path) for m in WRONG_TYPE) >= 6
    assert any(m.text.endswith(", ") for m in UNKNOWN)  # flow mappings too


@pytest.mark.parametrize("mutation", UNKNOWN, ids=lambda m: ".".join(map(str, m.path)))
def test_an_unknown_key_is_one_problem_at_that_key(tmp_path: Path, mutation: Mutation):
    text = mutate(BASE, [mutation])
    problems = load(tmp_path, text)
    assert located(problems) == wanted(text, [mutation])
    assert all("unknown key 'zzz'" in p[4] for p in problems)


@pytest.mark.parametrize("mutation", WRONG_TYPE, ids=lambda m: ".".join(map(str, m.path)))
def test_a_mapping_where_a_scalar_belongs_is_one_problem_at_that_value(tmp_path: Path,
                                                                     mutation: Mutation):
    text = mutate(BASE, [mutation])
    assert located(load(tmp_path, text)) == wanted(text, [mutation])


def _independent(a: Mutation, b: Mutation) -> bool:
    """Neither inside the other, and neither breaks a `type:` the other's mapping needs
    (a mapping whose type is unknown cannot have its other keys judged)."""
    pa, pb = a.path, b.path
    if pa[: len(pb)] == pb or pb[: len(pa)] == pa or a.at == b.at:
        return False
    for x, y in ((a, b), (b, a)):
        if x.path[-1] == "type" and not x.at_key and y.path[: len(x.path) - 1] == x.path[:-1]:
            return False
        if x.path[-1] == "type" and "vol_a" in x.path:  # merged into vol_b and val_a
            return False
    return True


def test_several_mistakes_are_all_reported_each_at_its_own_place(tmp_path: Path):
    rng = random.Random(7)
    pool = UNKNOWN + WRONG_TYPE
    checked = 0
    while checked < 120:
        chosen = rng.sample(pool, rng.choice([2, 3, 4]))
        if not all(_independent(a, b) for i, a in enumerate(chosen) for b in chosen[i + 1:]):
            continue
        text = mutate(BASE, chosen)
        assert located(load(tmp_path, text)) == wanted(text, chosen), [m.path for m in chosen]
        checked += 1


VALUES = ["0", "-1", "1000000", "x", "[]", "null", "true", "1.5", "[1, 2]", "1e3"]


def test_whatever_a_scalar_is_changed_to_each_problem_is_located_at_its_own_path(
        tmp_path: Path):
    """The mark of every problem is the reference's for the key path it names (value, or
    key for a key-level problem), whatever goes wrong and wherever it is reported."""
    count = 0
    for value in VALUES:
        for m in value_mutations(BASE, value):
            text = mutate(BASE, [m])
            ref = RefScan(text)
            for file, line, col, path, message in load(tmp_path, text):
                count += 1
                assert file == "r.yaml" and path, (m.path, value, message)
                assert (line, col) in (expected(ref, path), expected(ref, path, True)), (
                    m.path, value, path, line, col, message)
    assert count > 300


# ------------------------------------------------------------------ curated mistakes

CURATED = [  # (key path, replacement value, words the message has)
    (("model", "norm"), "batchh", "did you mean 'batch'"),
    (("model", "activation"), "elux", "did you mean 'elu'"),
    (("train", "schedule", "type"), "cosin", "cosine"),
    (("train", "optimizer", "type"), "adamm", "adam"),
    (("tasks", "affinity", "target", "zero"), "boundry", "boundary"),
    (("tasks", "affinity", "loss", "type"), "bcee", "bce"),
    (("augment", 1, "of", 0, "type"), "missing_sectoin", "missing_section"),
    (("augment", 0, "type"), "grayscal", "grayscale"),
    (("infer", "precision"), "fp33", "did you mean 'fp32'"),
    (("infer", "blend", "type"), "bumpp", "bump"),
    (("segment", "type"), "mwss", "mws"),
    (("data", "sources", "vol_c", "type"), "synthetc", "synthetic"),
    (("train", "batch_size"), "0", "greater than 0"),
    (("train", "optimizer", "lr"), "-0.1", "greater than 0"),
    (("augment", 0, "p"), "1.5", "less than or equal to 1"),
    (("augment", 2, "p"), "-0.5", "greater than or equal to 0"),
    (("augment", 1, "of", 0, "max_sections"), "0", "greater than 0"),
    (("segment", "min_size"), "-20", "greater than or equal to 0"),
    (("data", "sources", "vol_c", "seed"), "-7", "greater than or equal to 0"),
    (("data", "sources", "vol_b", "seed"), "-6", "greater than or equal to 0"),
    (("data", "validation", "val_a", "seed"), "-9", "greater than or equal to 0"),
    (("name",), "'bad name!'", "must start with a letter"),
    (("train", "iterations"), "1e3", "write 1000"),
    (("infer", "batch_size"), "yes", "should be a valid integer"),
    (("tasks", "affinity", "weight"), "-1", "greater than or equal to 0"),
]


@pytest.mark.parametrize(("path", "value", "words"), CURATED,
                         ids=[".".join(map(str, c[0])) + "=" + c[1] for c in CURATED])
def test_a_bad_enum_or_out_of_range_value_is_one_problem_at_its_value(
        tmp_path: Path, path: KeyPath, value: str, words: str):
    ref = RefScan(BASE)
    i = offset(BASE, ref.marks[path].value)
    mutation = Mutation(i, re.match(r"[^\s,\]}]+", BASE[i:]).end(), value, path, False)
    text = mutate(BASE, [mutation])
    problems = load(tmp_path, text)
    assert located(problems) == wanted(text, [mutation])
    assert len(problems) == 1 and words in problems[0][4], problems


def delete_key(source: str, path: KeyPath) -> str:
    """The recipe without the block-style key at ``path`` (and everything under it)."""
    lines = source.split("\n")
    line, col = RefScan(source).marks[path].key
    end = line
    while end < len(lines) and (not lines[end].strip() or lines[end].lstrip().startswith("#")
                                or len(lines[end]) - len(lines[end].lstrip()) >= col):
        end += 1
    return "\n".join(lines[: line - 1] + lines[end:])


@pytest.mark.parametrize("path", [("name",), ("model",), ("tasks",), ("train", "patch"),
                                  ("train", "iterations"), ("augment", 1, "of")],
                         ids=lambda p: ".".join(map(str, p)))
def test_a_missing_required_key_points_at_the_mapping_that_lacks_it(tmp_path: Path,
                                                                    path: KeyPath):
    text = delete_key(BASE, path)
    problems = load(tmp_path, text)
    where = expected(RefScan(text), path)  # the nearest ancestor the text still has
    assert ("r.yaml", *where, path, "required key is missing") in problems, problems
    assert len(problems) == 1


@pytest.mark.parametrize("path", [("model", "type"), ("train", "schedule", "type"),
                                  ("tasks", "affinity", "target", "type")],
                         ids=lambda p: ".".join(map(str, p)))
def test_a_missing_type_points_at_the_mapping_that_lacks_it(tmp_path: Path, path: KeyPath):
    text = delete_key(BASE, path)
    problems = load(tmp_path, text)
    assert located(problems) == {("r.yaml", *expected(RefScan(text), path[:-1]), path[:-1])}
    assert "missing `type:`" in problems[0][4]


def test_a_duplicate_key_points_at_its_second_occurrence(tmp_path: Path):
    text = BASE.replace("  groups: 4\n", "  groups: 4\n  widths: [8]\n")
    ref = RefScan(BASE)
    first = ref.marks[("model", "widths")].key[0]
    groups = ref.marks[("model", "groups")].key[0]
    assert load(tmp_path, text) == [("r.yaml", groups + 1, 3, ("model", "widths"),
                                     f"duplicate key 'widths' (first defined on line {first})")]
    flow = BASE.replace("{type: bump}", "{type: bump, type: gaussian}")
    line, col = RefScan(BASE).marks[("infer", "blend", "type")].key
    assert located(load(tmp_path, flow)) == {("r.yaml", line, col + 12,
                                              ("infer", "blend", "type"))}


def test_a_key_yaml_reads_as_a_boolean_or_number_points_at_that_key(tmp_path: Path):
    text = BASE.replace("  groups: 4\n", "  groups: 4\n  on: 3\n")
    line = RefScan(BASE).marks[("model", "groups")].key[0] + 1
    assert located(load(tmp_path, text)) == {("r.yaml", line, 3, ("model",))}
    flow = BASE.replace("{type: bump}", "{type: bump, 1.5: 2}")
    line, col = RefScan(BASE).marks[("infer", "blend", "type")].key
    problems = load(tmp_path, flow)
    assert located(problems) == {("r.yaml", line, col + 12, ("infer", "blend"))}
    assert "the number 1.5" in problems[0][4]


BAD = BASE.replace("batch_size: 2", "batch_size: 0")
BAD_AT = expected(RefScan(BASE), ("train", "batch_size"))


@pytest.mark.parametrize(("label", "text", "shift"), [
    ("crlf", BAD.replace("\n", "\r\n"), 0),
    ("cr", BAD.replace("\n", "\r"), 0),
    ("bom", "\ufeff" + BAD, 0),
    ("document markers", "---\n" + BAD + "...\n", 1),
    ("directive", "%YAML 1.1\n---\n" + BAD, 2),
    ("literal block", BAD.replace("seed: 3\n", "seed: 3\ndescription: |\n  one\n\n  two\n"), 4),
    ("folded block", BAD.replace("seed: 3\n", "seed: 3\ndescription: >-\n  one\n  two\n"), 3),
    ("quoted multi-line", BAD.replace("seed: 3\n", 'seed: 3\ndescription: "one\n  two"\n'), 2),
    ("comment-only lines", BAD.replace("train:\n", "train:\n  # a\n\n  # b\n"), 3),
    ("unicode before", BAD.replace("# the run's name", "# é😀 ☃ the run's name"), 0),
])
def test_line_breaks_markers_and_block_scalars_keep_lines_right(tmp_path: Path, label: str,
                                                                text: str, shift: int):
    assert located(load(tmp_path, text)) == {
        ("r.yaml", BAD_AT[0] + shift, BAD_AT[1], ("train", "batch_size"))}


def test_columns_count_characters_not_bytes(tmp_path: Path):
    text = BASE.replace("{type: bump}", '{"é😀☃": 1, type: bump, size: 3}')
    ref = RefScan(text)
    assert located(load(tmp_path, text)) == {
        ("r.yaml", *ref.marks[("infer", "blend", p)].key, ("infer", "blend", p))
        for p in ("é😀☃", "size")}


# ------------------------------------------------------------------ extends

CHILD = """\
# a child recipe
extends: base.yaml

train:
  batch_size: 3   # the child's own setting
  optimizer: {lr: 0.001}
"""


def test_mistakes_in_an_extended_file_name_that_file_and_its_line(tmp_path: Path):
    """Every scalar of the base (but those the child sets) made wrong: the base's line."""
    count = 0
    for m in WRONG_TYPE:
        if m.path in (("train", "batch_size"), ("train", "optimizer", "lr")):
            continue
        base = mutate(BASE, [m])
        problems = load(tmp_path, CHILD, files={"base.yaml": base})
        assert located(problems) == wanted(base, [m], "base.yaml"), m.path
        count += 1
    for m in UNKNOWN[:8]:
        base = mutate(BASE, [m])
        problems = load(tmp_path, CHILD, files={"base.yaml": base})
        assert located(problems) == wanted(base, [m], "base.yaml"), m.path
    assert count > 60


def test_a_base_value_the_child_replaces_is_no_problem_and_the_childs_own_is_located(
        tmp_path: Path):
    base = BASE.replace("lr: 0.002}", "lr: -5}").replace("batch_size: 2", "batch_size: 0")
    assert load(tmp_path, CHILD, files={"base.yaml": base}) == []
    child = CHILD.replace("batch_size: 3", "batch_size: -3")
    ref = RefScan(child)
    assert located(load(tmp_path, child, files={"base.yaml": BASE})) == {
        ("r.yaml", *ref.marks[("train", "batch_size")].value, ("train", "batch_size"))}
    # a list replaces the base's whole: its bad item is gone; a retyped mapping too
    base = BASE.replace("    p: 0.5\n", "    p: 5\n").replace("lr: 0.002", "lr: -1")
    assert load(tmp_path, CHILD, files={"base.yaml": base}) != []
    child = CHILD.replace("  optimizer: {lr: 0.001}\n", "  optimizer: {type: sgd, lr: 0.1}\n")
    assert load(tmp_path, child + "augment: [{type: flip_rotate}]\n",
                files={"base.yaml": base}) == []


def test_mistakes_along_a_chain_of_bases_each_name_their_own_file(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    mid = "# the middle\nextends: ../base.yaml\nmodel:\n  norm: batchh\n"
    child = "extends: sub/mid.yaml\n\nsegment: {type: mws, bias: 2}\n"
    base = BASE.replace("warmup: 5", "warmup: -5")
    problems = load(tmp_path, child, files={"sub/mid.yaml": mid, "base.yaml": base})
    ref_base, ref_mid, ref_child = RefScan(base), RefScan(mid), RefScan(child)
    assert located(problems) == {
        ("base.yaml", *ref_base.marks[("train", "schedule", "warmup")].value,
         ("train", "schedule", "warmup")),
        ("sub/mid.yaml", *ref_mid.marks[("model", "norm")].value, ("model", "norm")),
        ("r.yaml", *ref_child.marks[("segment", "bias")].value, ("segment", "bias"))}


def test_a_missing_key_in_a_mapping_both_files_write_points_at_the_childs(tmp_path: Path):
    base = BASE.replace("  iterations: 100\n", "")
    problems = load(tmp_path, CHILD, files={"base.yaml": base})
    assert located(problems) == {("r.yaml", *expected(RefScan(CHILD), ("train",)),
                                  ("train", "iterations"))}


def test_a_missing_base_in_a_flow_list_of_bases_is_located_at_its_item(tmp_path: Path):
    child = "extends: [a.yaml,\n          missing.yaml]\n"
    problems = load(tmp_path, child, files={"a.yaml": BASE})
    assert located(problems) == {("r.yaml", 2, 11, ("extends",))}
    assert "'missing.yaml': no such file" in problems[0][4]


@pytest.mark.parametrize(("second", "files", "words"), [
    ("missing.yaml", {}, "no such file"),
    ("b.yaml", {"b.yaml": "foo: 1\n"}, "is not a recipe"),
    ("3", {}, "must be a file name or a list of file names"),
], ids=["missing", "not-a-recipe", "not-a-name"])
def test_a_bad_base_in_a_block_list_of_bases_is_located_at_its_item_or_the_key(
        tmp_path: Path, second: str, files: dict[str, str], words: str):
    child = f"extends:\n  - a.yaml\n  - {second}\n"
    problems = load(tmp_path, child, files={"a.yaml": BASE, **files})
    assert len(problems) == 1 and words in problems[0][4]
    assert problems[0][:4] == ("r.yaml", 3, 5, ("extends",)), problems  # the item's line


def test_an_extends_cycle_names_the_extends_key(tmp_path: Path):
    problems = load(tmp_path, "# loop\nextends: b.yaml\n",
                    files={"b.yaml": "extends: r.yaml\nname: b\n"})
    assert len(problems) == 1 and "cycle" in problems[0][4]
    assert problems[0][:4] == ("b.yaml", 1, 10, ("extends",)), problems


# ------------------------------------------------------------------ YAML merges


@pytest.mark.parametrize("style", ["flow", "block"])
def test_a_key_missing_from_a_mapping_that_replaces_a_merged_one_points_at_it(
        tmp_path: Path, style: str):
    text = BASE.replace("      seed: 5\n",
                        "      seed: 5\n      roi: {offset: [0, 0, 0], shape: [24, 96, 96]}\n")
    if style == "flow":
        text = text.replace("vol_b: {<<: *synth, seed: 6}",
                            "vol_b: {<<: *synth, seed: 6, roi: {offset: [0, 0, 0]}}")
    else:
        text = text.replace("vol_b: {<<: *synth, seed: 6}",
                            "vol_b:\n      <<: *synth\n      seed: 6\n      roi:\n"
                            "        offset: [0, 0, 0]")
    path = ("data", "sources", "vol_b", "roi", "shape")
    ref = RefScan(text)
    assert ref.marks[path[:-1]].copied is False and path not in ref.marks
    assert load(tmp_path, text) == [("r.yaml", *expected(ref, path), path,
                                     "required key is missing")]


def test_a_mistake_in_an_anchor_is_reported_at_the_anchor_for_every_copy(tmp_path: Path):
    text = BASE.replace("      seed: 5\n", "      seed: 5\n      sead: 1\n")
    line = RefScan(BASE).marks[("data", "sources", "vol_a", "seed")].key[0] + 1
    assert located(load(tmp_path, text)) == {
        ("r.yaml", line, 7, (*p, "sead"))
        for p in (("data", "sources", "vol_a"), ("data", "sources", "vol_b"),
                  ("data", "validation", "val_a"))}
    explicit = BASE.replace("vol_b: {<<: *synth, seed: 6}", "vol_b: {<<: *synth, seed: x}")
    ref = RefScan(explicit)
    assert located(load(tmp_path, explicit)) == {
        ("r.yaml", *ref.marks[("data", "sources", "vol_b", "seed")].value,
         ("data", "sources", "vol_b", "seed"))}


# ------------------------------------------------------------------ -o overrides

OVERRIDDEN = [  # (override, the key path its problem names)
    ("train.batch_size=0", ("train", "batch_size")),
    ("train.optimizer={type: adam, lrr: 1}", ("train", "optimizer", "lrr")),
    ("augment.1.of.0.max_sections=0", ("augment", 1, "of", 0, "max_sections")),
    ("augment.-1.p=5", ("augment", 2, "p")),
    ("model.widths.1=x", ("model", "widths", 1)),
    ("train.schedule.type=step", ("train", "schedule", "milestones")),
    ("infer.tta=yes", ("infer", "tta")),
    ("data.sources.vol_a.zzz=1", ("data", "sources", "vol_a", "zzz")),
    ("data.sources.vol_b.seed=-1", ("data", "sources", "vol_b", "seed")),
    ("segment.bias=2", ("segment", "bias")),
    ("infer.blend.sigma=-1", ("infer", "blend", "sigma")),
    ("tasks.affinity.target.offsets.0.0=0", ("tasks", "affinity", "target", "offsets")),
    ("train.patch.1=4096", ("data", "sources", "vol_a", "shape")),
    ("model.groups=3", ("model", "groups")),  # the key the override wrote
    ("name=bad name", ("name",)),
]


@pytest.mark.parametrize(("override", "path"), OVERRIDDEN, ids=[o for o, _ in OVERRIDDEN])
def test_a_mistake_an_override_brings_is_located_at_that_override(tmp_path: Path,
                                                                  override: str, path: KeyPath):
    problems = load(tmp_path, BASE, (override,))
    assert problems, override
    assert {p[0] for p in problems} == {f"override -o {override}"}, problems
    assert path in {p[3] for p in problems}
    assert all(p[1:3] == (0, 0) for p in problems)


def test_file_mistakes_stay_at_their_lines_beside_override_mistakes(tmp_path: Path):
    text = BASE.replace("norm: group", "normm: group").replace("warmup: 5", "warmup: -5")
    ref = RefScan(text)
    problems = load(tmp_path, text, ("train.batch_size=0", "infer.precision=fp33"))
    assert located(problems) == {
        ("r.yaml", *ref.marks[("model", "normm")].key, ("model", "normm")),
        ("r.yaml", *ref.marks[("train", "schedule", "warmup")].value,
         ("train", "schedule", "warmup")),
        ("override -o train.batch_size=0", 0, 0, ("train", "batch_size")),
        ("override -o infer.precision=fp33", 0, 0, ("infer", "precision"))}
    # an override that fixes the file's mistake leaves none; the last of two wins
    fixed = ("model.norm=group", "model.normm=", "train.schedule.warmup=5")
    assert [p[3] for p in load(tmp_path, text, fixed)] == [("model", "normm")]
    assert load(tmp_path, BASE, ("train.batch_size=0", "train.batch_size=2")) == []
    assert located(load(tmp_path, BASE, ("train.batch_size=2", "train.batch_size=0"))) == {
        ("override -o train.batch_size=0", 0, 0, ("train", "batch_size"))}


def test_an_override_of_an_extended_recipe_is_blamed_and_the_bases_mistake_is_not(
        tmp_path: Path):
    base = BASE.replace("activation: elu", "activation: eluu")
    ref = RefScan(base)
    problems = load(tmp_path, CHILD, ("train.optimizer.lr=-1",), files={"base.yaml": base})
    assert located(problems) == {
        ("base.yaml", *ref.marks[("model", "activation")].value, ("model", "activation")),
        ("override -o train.optimizer.lr=-1", 0, 0, ("train", "optimizer", "lr"))}


@pytest.mark.parametrize(("override", "words"), [
    ("train.batch_size", "an override is written key.path=value"),
    ("train..batch_size=1", "is not a key path one can override"),
    ("extends=x.yaml", "is not a key path one can override"),
    ("augment.7.p=1", "is a list of 3"),
    ("name.x=1", "not a mapping"),
    ("train.patch=[1, 2", "the value is not valid YAML"),
    ("model={type: rsunet, type: updown}", "the key 'type' twice"),
])
def test_a_malformed_override_is_one_problem_named_by_the_override(tmp_path: Path,
                                                                   override: str, words: str):
    problems = load(tmp_path, BASE, (override,))
    assert len(problems) == 1
    assert problems[0][:3] == (f"override -o {override}", 0, 0) and words in problems[0][4]


# ------------------------------------------------------------------ the command line

runner = CliRunner()


@pytest.mark.parametrize("command", ["validate", "train"])
def test_the_command_line_prints_one_located_line_per_problem_and_exits_2(
        tmp_path: Path, command: str):
    base = BASE.replace("norm: group", "normm: group")
    (tmp_path / "base.yaml").write_text(base, encoding="utf-8")
    child = CHILD.replace("batch_size: 3", "batch_size: -3")
    (tmp_path / "r.yaml").write_text(child, encoding="utf-8")
    args = ["validate", "r.yaml", "--no-data"] if command == "validate" else [
        "train", "r.yaml", "--run-dir", "run"]
    result = runner.invoke(app, [*args, "-o", "infer.tta=3"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.stdout == ""
    b, c = RefScan(base).marks, RefScan(child).marks
    assert result.stderr.splitlines() == sorted([
        "error: base.yaml:{}:{}: model.normm: unknown key 'normm'; did you mean 'norm'?".format(
            *b[("model", "normm")].key),
        "error: r.yaml:{}:{}: train.batch_size: input should be greater than 0 (got -3)".format(
            *c[("train", "batch_size")].value),
        "error: override -o infer.tta=3: infer.tta: " + result.stderr.split(
            "override -o infer.tta=3: infer.tta: ")[1].splitlines()[0],
    ], key=result.stderr.index)
    assert not (tmp_path / "run").exists()


def test_a_boolean_in_a_list_of_numbers_is_said_before_checks_that_read_it_as_one(
        tmp_path: Path):
    """`probs: [true, 0.3]` was refused as "probs sum to 1.3" and `displacement: [2, true]`
    as "(got [2, 1])": each boolean is now named where it is, and nothing else about it."""
    text = ("name: b\ndata:\n  sources:\n    a: {type: synthetic, shape: [16, 64, 64], "
            "seed: 1}\naugment:\n  - one_of: {of: [{type: noise}, {type: grayscale}], "
            "probs: [true, 0.3]}\n  - {type: misalign, displacement: [2, true]}\n"
            "model: {type: rsunet, widths: [4, 8]}\ntasks:\n  affinity: {}\n"
            "train: {patch: [4, 16, 16], iterations: 2}\n")
    problems = load(tmp_path, text)
    assert located(problems) == {
        ("r.yaml", 6, 62, ("augment", 0, "one_of", "probs", 0)),
        ("r.yaml", 7, 40, ("augment", 1, "displacement", 1))}
    assert {p[4] for p in problems} == {"should be a number, not true"}
