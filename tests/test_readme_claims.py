"""The README as a stranger reads it: every `emrun` command it shows names a real command and
options that command takes, every `-o key.path=` a real recipe key, every shipped recipe it
names exists and validates, and the outputs and printed lines it quotes are what emrun makes.
The README is parsed, so a README that drifts from the code fails here."""

from __future__ import annotations

import importlib
import json
import re
import shlex
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from conftest import MINIMAL, ROOT
from typer.testing import CliRunner

from emrun.cli import app
from emrun.io import open_volume, write_volume
from emrun.recipe import load_recipe

runner = CliRunner()
README = (ROOT / "README.md").read_text(encoding="utf-8")
SCHEMA = json.loads((ROOT / "emrun" / "schemas" / "recipe.schema.json").read_text("utf-8"))
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SHELL_STOPS = ("|", ">", "&&", ";")
PLACEHOLDER_OVERRIDES = {"k=v", "key.path=value"}


# --- the app's commands and options ---------------------------------------------------------

def _walk(group: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Every command path of the typer app (``("bench", "data")``, ...) with its command."""
    found: dict[tuple[str, ...], Any] = {}
    for name, command in group.commands.items():
        if hasattr(command, "commands"):  # a group (typer keeps its own copy of click)
            found |= _walk(command, (*prefix, name))
        else:
            found[(*prefix, name)] = command
    return found


COMMANDS = _walk(typer.main.get_command(app))
GROUPS = {path[0] for path in COMMANDS if len(path) > 1}


def options(path: tuple[str, ...]) -> set[str]:
    """The option names (long, short and `--no-` forms) a command takes."""
    found = {"--help"}
    for param in COMMANDS[path].params:
        if param.param_type_name == "option":
            found |= set(param.opts) | set(param.secondary_opts)
    return found


# --- the README's commands --------------------------------------------------------------------

@dataclass(frozen=True)
class Invocation:
    """One `emrun ...` the README shows: where, as written, and as parsed."""

    line: int
    text: str
    path: tuple[str, ...]
    args: tuple[str, ...]

    def overrides(self) -> list[str]:
        return [self.args[i + 1] for i, arg in enumerate(self.args[:-1])
                if arg in ("-o", "--override")]


def _line_of(offset: int) -> int:
    return README.count("\n", 0, offset) + 1


def bash_lines() -> list[tuple[int, str]]:
    """Each line of the README's bash blocks (continuations joined), with its line number."""
    found = []
    for block in FENCE.finditer(README):
        if block.group(1) == "bash":
            first = _line_of(block.start(2))
            found += [(first + i, line) for i, line in
                      enumerate(block.group(2).replace("\\\n", " ").splitlines())]
    return found


def inline_code() -> list[tuple[int, str]]:
    """The README's inline code spans outside fenced blocks, whitespace collapsed."""
    text = FENCE.sub(lambda block: "\n" * block.group(0).count("\n"), README)
    return [(_line_of(span.start()), " ".join(span.group(1).split()))
            for span in re.finditer(r"(?<!`)`([^`]+)`(?!`)", text)]


def _tokens(text: str, comments: bool) -> list[str]:
    """Shell words up to a pipe or redirection; synopsis brackets and `a|b` alternatives of
    options (``[--labels\\|--image]``) undone."""
    text = text.replace("\\|", "|")
    try:
        words = shlex.split(text, comments=comments)
    except ValueError:  # an unbalanced quote in prose: words are enough
        words = text.split()
    for stop in SHELL_STOPS:
        words = words[:words.index(stop)] if stop in words else words
    found: list[str] = []
    for word in words:
        while word.startswith("[-"):
            word = word[1:]
        while word.endswith("]") and word.count("]") > word.count("["):
            word = word[:-1]
        if word.startswith("-") or "|-" in word:
            found += [part for part in word.split("|") if part]
        elif word:
            found.append(word)
    return found


def _invocations(line: int, text: str, words: list[str]) -> list[Invocation]:
    """`emrun GROUP a|b ...` as one invocation per alternative command."""
    if words[:3] == ["python", "-m", "emrun"]:
        words = ["emrun", *words[3:]]
    words = words[1:] if words[:1] == ["emrun"] else words
    if not words or words[0] == "...":
        return []
    if words[0].startswith("-"):
        return [Invocation(line, text, (), tuple(words))]
    if words[0] in GROUPS and len(words) > 1 and not words[1].startswith("-"):
        return [Invocation(line, text, (words[0], sub), tuple(words[2:]))
                for sub in words[1].split("|")]
    return [Invocation(line, text, (name,), tuple(words[1:])) for name in words[0].split("|")]


@cache
def readme_invocations() -> tuple[Invocation, ...]:
    """Every emrun command line in a bash block, and every inline span that is one
    (`emrun ...`, or a command followed by an option: `infer --mask`)."""
    found: list[Invocation] = []
    for line, text in bash_lines():
        words = _tokens(text, comments=True)
        if words[:1] == ["emrun"] or words[:3] == ["python", "-m", "emrun"]:
            found += _invocations(line, text, words)
    names = {path[0] for path in COMMANDS}
    for line, text in inline_code():
        words = _tokens(text, comments=False)
        is_command = (words[:1] == ["emrun"] or words[:3] == ["python", "-m", "emrun"]
                      or (len(words) > 1 and words[0] in names and words[1].startswith("-"))
                      or (len(words) > 2 and tuple(words[:2]) in COMMANDS
                          and words[2].startswith("-")))
        if is_command:
            found += _invocations(line, text, words)
    return tuple(found)


def _given_options(invocation: Invocation) -> list[str]:
    return [arg for arg in invocation.args
            if arg.startswith("--") or re.fullmatch(r"-[A-Za-z]", arg)]


def test_the_parser_finds_the_readmes_commands():
    """A parser that finds nothing would pass every test below."""
    found = readme_invocations()
    assert sum(1 for i in found if i.text.lstrip().startswith(("emrun", "python"))) >= 60
    assert {i.path for i in found} >= set(COMMANDS)
    assert ("data", "convert") in {i.path for i in found if i.line in dict(bash_lines())}


def test_every_command_the_readme_shows_exists():
    unknown = [f"README.md:{i.line}: emrun {' '.join(i.path)}: {i.text}"
               for i in readme_invocations() if i.path and i.path not in COMMANDS]
    assert unknown == []


def test_every_option_the_readme_gives_a_command_is_one_it_takes():
    """`emrun segment ... --agglomeration blockwise` must be an option `segment --help` lists."""
    wrong = []
    for invocation in readme_invocations():
        taken = options(invocation.path) if invocation.path in COMMANDS else {"--help"}
        wrong += [f"README.md:{invocation.line}: emrun {' '.join(invocation.path)} {option}"
                  for option in _given_options(invocation) if option not in taken]
    assert wrong == []


def test_an_option_named_alone_in_prose_is_some_commands_option():
    """`--connected-truth` (on `emrun evaluate` and `emrun segment --sweep`), `--level 1`..."""
    every = set().union(*(options(path) for path in COMMANDS))
    named = [(line, option) for line, text in inline_code() if text.startswith("--")
             for option in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text)]
    assert len(named) >= 10
    assert [f"README.md:{line}: {option}" for line, option in named if option not in every] == []


def _table_rows() -> dict[tuple[str, ...], set[str]]:
    """The `## Commands` table: each command's synopsis options."""
    section = README.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[tuple[str, ...], set[str]] = {}
    for row in re.findall(r"^\| `(emrun [^`]+)` \|", section, flags=re.M):
        for invocation in _invocations(0, row, _tokens(row, comments=False)):
            rows.setdefault(invocation.path, set()).update(_given_options(invocation))
    return rows


def _unpaired(names: set[str]) -> set[str]:
    """Option names with each boolean pair (`--compile`/`--no-compile`) counted once."""
    return {name.removeprefix("--no-") if name.startswith("--no-") else name.lstrip("-")
            for name in names}


def test_the_command_table_lists_every_command_and_its_options():
    """A command or option added to the CLI and not to the README's table is one a reader
    never learns of; `--override` is `-o`'s long form, a `--no-X` is `--X`'s pair."""
    rows = _table_rows()
    assert set(rows) == set(COMMANDS)
    missing = {" ".join(path): sorted(_unpaired(options(path) - {"--help", "--override"})
                                      - _unpaired(rows[path]))
               for path in COMMANDS}
    assert {path: names for path, names in missing.items() if names} == {}


def test_the_alternatives_a_synopsis_gives_are_the_ones_the_help_shows():
    """`--method mws|waterz|cc`, `--scheduler local|daisy`, `--format emrun|bioimageio|onnx`."""
    section = README.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    compared = []
    for row in re.findall(r"^\| `(emrun [^`]+)` \|", section, flags=re.M):
        for invocation in _invocations(0, row, _tokens(row, comments=False)):
            params = {name: param for param in COMMANDS[invocation.path].params
                      if param.param_type_name == "option" for name in param.opts}
            args = invocation.args
            compared += [(" ".join(invocation.path), arg, args[i + 1], params[arg].metavar)
                         for i, arg in enumerate(args[:-1])
                         if arg in params and "|" in args[i + 1]]
    assert len(compared) >= 8
    assert [shown for shown in compared if shown[2] != shown[3]] == []


def test_the_defaults_the_readme_quotes_are_the_commands_defaults():
    """"`--repeats N` (default 15)", "(`--sample-mb`, 32)", "`--passes` (3)"."""
    text = " ".join(README.split())
    pattern = (r"\(`(--[a-z-]+)`, (\d+)\)|`(--[a-z-]+)` \((\d+)\)"
               r"|`(--[a-z-]+) [A-Z]+` \(default (\d+)\)")
    quoted = [tuple(part for part in match.groups() if part)
              for match in re.finditer(pattern, text)]
    assert len(quoted) >= 4
    for option, default in quoted:
        having = [param for command in COMMANDS.values() for param in command.params
                  if param.param_type_name == "option" and option in param.opts]
        assert having, option
        assert all(param.default == float(default) for param in having), option


# --- recipe keys -------------------------------------------------------------------------------

def _deref(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = SCHEMA["$defs"][node["$ref"].rsplit("/", 1)[1]]
    return node


def _branches(node: dict[str, Any]) -> list[dict[str, Any]]:
    """A schema node's alternatives (anyOf/oneOf/allOf, refs followed), flattened."""
    node = _deref(node)
    subs = [sub for key in ("anyOf", "oneOf", "allOf") for sub in node.get(key, [])]
    own = [node] if not subs or "properties" in node else []
    return own + [branch for sub in subs for branch in _branches(sub)]


def _children(node: dict[str, Any], part: str) -> list[dict[str, Any]]:
    found = []
    for branch in _branches(node):
        if part in branch.get("properties", {}):
            found.append(branch["properties"][part])
        elif part.isdigit() and isinstance(branch.get("items"), dict):
            found.append(branch["items"])
        found += [sub for pattern, sub in branch.get("patternProperties", {}).items()
                  if re.match(pattern, part)]
    return found


def key_exists(path: str) -> bool:
    """Whether a dotted recipe key (`augment.2.p`, `data.sources.NAME.intensity`) is one
    the recipe schema has: list indices and source or task names included."""
    nodes = [SCHEMA]
    for part in path.split("."):
        nodes = [child for node in nodes for child in _children(node, part)]
        if not nodes:
            return False
    return True


def test_the_key_resolver_tells_real_keys_from_typos():
    assert key_exists("augment.2.p") and key_exists("data.sources.NAME.intensity")
    assert key_exists("tasks.affinity.loss.margin0") and key_exists("infer.stride")
    assert not key_exists("model.normm") and not key_exists("train.batchsize")
    assert not key_exists("data.sources.a.intensity.middle")


def _named_keys() -> list[tuple[int, str]]:
    """Every recipe key the README names: `-o` overrides of its commands and inline spans
    such as `infer.tta_reduce`, `-o infer.compile=true`, `train.deterministic: true`."""
    found = [(i.line, expr.split("=", 1)[0]) for i in readme_invocations()
             for expr in i.overrides() if expr not in PLACEHOLDER_OVERRIDES]
    sections = "|".join(SCHEMA["properties"])
    pattern = rf"(?:^|-o |--override )'?((?:{sections})(?:\.[A-Za-z0-9_]+)+)(?=[=: ]|$)"
    for line, text in inline_code():
        found += [(line, key.group(1)) for key in re.finditer(pattern, text)]
    return found


def test_every_recipe_key_the_readme_names_is_a_recipe_key():
    named = _named_keys()
    assert len(named) >= 30
    assert [f"README.md:{line}: {key}" for line, key in named if not key_exists(key)] == []


def _recipe_of(invocation: Invocation) -> Path | None:
    """The recipe a README command runs with: its RECIPE argument, `--recipe`, or (for
    `bench snemi3d`) the shipped default."""
    args = invocation.args
    if "--recipe" in args:
        return ROOT / args[args.index("--recipe") + 1]
    first = next((arg for arg in args if arg.endswith(".yaml")), None)
    if first is not None:
        return ROOT / first
    if invocation.path == ("bench", "snemi3d"):
        return ROOT / "recipes" / "snemi3d_aff.yaml"
    return None


def test_the_readmes_overridden_commands_validate():
    """`emrun validate recipes/demo.yaml -o train.batch_size=4 -o 'model.widths=[8, 16, 32,
    64]'`, the SNEMI3D benchmark's `-o 'train.patch=[20, 128, 128]'`...: each recipe with its
    overrides is a valid recipe, not just real keys."""
    checked = 0
    for invocation in readme_invocations():
        given = [expr for expr in invocation.overrides() if expr not in PLACEHOLDER_OVERRIDES
                 and "..." not in expr]
        recipe = _recipe_of(invocation)
        if given and recipe is not None:
            load_recipe(recipe, given)
            checked += 1
    assert checked >= 5


# --- shipped recipes ---------------------------------------------------------------------------

SHIPPED = sorted(path.name for path in (ROOT / "emrun" / "recipes").glob("*.yaml"))


def _shipped_table() -> dict[str, str]:
    section = README.split("\n## Shipped recipes\n", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| `recipes/([\w.]+)` \| (.*) \|$", section, flags=re.M))


def test_the_recipes_the_readme_names_exist_and_validate():
    """The error example's `recipes/x.yaml` is in a text block, on purpose not a recipe."""
    spans = [text for _, text in [*bash_lines(), *inline_code()]]
    named = {name for text in spans for name in re.findall(r"recipes/([\w-]+\.yaml)", text)}
    assert named and named <= set(SHIPPED)
    for name in named:
        load_recipe(ROOT / "recipes" / name)


def test_the_shipped_recipes_table_is_what_emrun_recipes_lists():
    listed = runner.invoke(app, ["recipes"])
    assert listed.exit_code == 0, listed.output
    printed = re.findall(r"^(\S+\.yaml)\s", listed.stdout, flags=re.M)
    assert sorted(_shipped_table()) == SHIPPED == sorted(printed)
    said = re.search(r"Each starts with `([^`]+)`", README)
    assert said is not None
    for name in SHIPPED:
        first = (ROOT / "recipes" / name).read_text("utf-8").splitlines()[0]
        assert first == said.group(1), name


def test_what_the_table_says_of_the_snemi3d_and_cremi_recipes():
    """Widths, patch, segmenter and TTA as the table states them."""
    table = _shipped_table()
    snemi = load_recipe(ROOT / "recipes" / "snemi3d_aff.yaml").recipe
    row = table["snemi3d_aff.yaml"]
    widths = re.search(r"RSUNet \[([\d, ]+)\]", row)
    patch = re.search(r"patch (\d+)x(\d+)x(\d+)", row)
    assert widths and patch and "waterz" in row
    assert list(snemi.model.widths) == [int(w) for w in widths.group(1).split(",")]
    assert tuple(snemi.train.patch) == tuple(int(p) for p in patch.groups())
    assert snemi.segment.type == "waterz"
    tta = re.search(r"(\d+)x TTA", table["cremi_aff.yaml"])
    assert tta and load_recipe(ROOT / "recipes" / "cremi_aff.yaml").recipe.infer.tta == int(
        tta.group(1))


def test_the_snemi3d_settings_the_readme_quotes():
    """"segments with waterz mean, threshold 0.85, min_size 50" and `data/snemi3d.zarr/{image,
    labels}`, which the README's two convert commands write."""
    recipe = load_recipe(ROOT / "recipes" / "snemi3d_aff.yaml").recipe
    quoted = re.findall(r"waterz\s+mean, threshold ([\d.]+),\s+min_size (\d+)", README)
    assert quoted
    for threshold, min_size in quoted:
        assert recipe.segment.thresholds == [float(threshold)]
        assert recipe.segment.min_size == int(min_size)
    reads = re.search(r"`snemi3d_aff.yaml` reads `([^`{]+)/\{(\w+),(\w+)\}`", README)
    assert reads is not None
    store, image, labels = reads.groups()
    written = {f"{i.args[1]}/{i.args[i.args.index('--name') + 1]}"
               for i in readme_invocations()
               if i.path == ("data", "convert") and "--name" in i.args and "$S" in i.text}
    assert written == {f"{store}/{image}", f"{store}/{labels}"}
    for source in [*recipe.data.sources.values(), *recipe.data.validation.values()]:
        assert (source.image, source.labels) == (f"{store}/{image}", f"{store}/{labels}")


def _model_facts() -> list[tuple[str, ...]]:
    """"rsunet [16, 32, 64, 128] with 3 outputs: 2,655,747 parameters, 370 kFLOP per voxel,
    receptive field 57 x 204 x 204", and the SNEMI3D recipe's."""
    pattern = (r"\[([\d, ]+)\] with (\d+) outputs[^:]*: ([\d,]+) parameters, (\d+) kFLOP per"
               r" voxel,\s+receptive field (\d+ x \d+ x \d+)")
    return re.findall(pattern, " ".join(README.split()))


def test_the_readme_quotes_model_facts():
    assert len(_model_facts()) >= 2


@pytest.mark.parametrize("widths, outputs, parameters, kflop, field", _model_facts())
def test_model_facts_the_readme_quotes_are_what_validate_prints(widths, outputs, parameters,
                                                                kflop, field):
    snemi = load_recipe(ROOT / "recipes" / "snemi3d_aff.yaml").recipe
    offsets = [list(o) for o in snemi.tasks["affinity"].target.offsets][:int(outputs)]
    result = runner.invoke(app, [
        "validate", str(ROOT / "recipes" / "snemi3d_aff.yaml"), "--no-data",
        "-o", f"model.widths=[{widths}]", "-o", f"tasks.affinity.target.offsets={offsets}"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.stdout.split())
    assert f"{parameters} parameters" in said
    assert f"{kflop} kFLOP per output voxel" in said and f"receptive field {field}" in said


# --- what options every command of a kind takes ------------------------------------------------

def _commands_named(sentence: str) -> set[tuple[str, ...]]:
    """The commands a sentence names in backticks; "every `bench`" names the whole group."""
    found: set[tuple[str, ...]] = set()
    for name in re.findall(r"`(?:emrun )?([a-z][a-z ]*)`", sentence):
        words = tuple(name.split())
        found |= {path for path in COMMANDS if path[:len(words)] == words}
    return found


def _sentence(start: str, end: str) -> str:
    text = " ".join(README.split())
    return text.split(start, 1)[1].split(end, 1)[0]


def test_the_commands_said_to_take_json_are_those_that_do():
    """"The commands that report figures (`segment`, `evaluate` and every `bench`) and `view`
    take `--json`"; no other does."""
    named = _commands_named(_sentence("The commands that report figures", "take `--json`"))
    assert named == {path for path in COMMANDS if "--json" in options(path)}
    assert ("bench", "codecs") in named


def test_the_commands_said_to_take_levels_and_level_do():
    """"`--levels N` on `infer`, `segment`, `data convert` and `data synth`"; `--level` on
    `emrun infer`, `emrun segment` and `emrun data convert`."""
    levels = _commands_named(_sentence("`--levels N` on", ";"))
    level = _commands_named(_sentence("`--level 40,8,8`) on", "chooses a level"))
    assert len(levels) == 4 and len(level) == 3
    assert levels == {path for path in COMMANDS if "--levels" in options(path)}
    assert level == {path for path in COMMANDS if "--level" in options(path)}


def test_every_command_that_takes_a_recipe_takes_o():
    """"`-o key.path=value` (repeatable, on every command that takes a recipe)"."""
    assert "on every command that takes a recipe" in " ".join(README.split())
    with_recipe = {path for path, command in COMMANDS.items()
                   if any(param.name == "recipe" for param in command.params)}
    assert ("infer",) in with_recipe and ("bench", "snemi3d") in with_recipe
    assert [path for path in with_recipe if "-o" not in options(path)] == []


# --- what a mistake looks like -----------------------------------------------------------------

X_RECIPE = """\
# a recipe with two mistakes where the README's example has them
name: tiny
data:
  sources:
    a: {type: synthetic, shape: [16, 64, 64], seed: 1}
tasks:
  affinity:
    target: {type: affinity}
model:
  type: rsunet
  widths: [4, 8]
  kernel: [3, 3, 3]
  normm: batch
# line 14
# line 15
# line 16
train:
  patch: [8, 32, 32]
  iterations: 10
  batch_size: 1
  precision: fp33
"""


def _mistake_example() -> tuple[list[str], list[str]]:
    """The README's "What a mistake looks like": the command's words and the lines shown."""
    block = README.split("What a mistake looks like:", 1)[1].split("```text\n", 1)[1]
    lines = block.split("```", 1)[0].strip().splitlines()
    assert lines[0].startswith("$ emrun ")
    return shlex.split(lines[0][len("$ emrun "):]), lines[1:]


def _run_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, words: list[str]) -> Any:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "x.yaml").write_text(X_RECIPE, encoding="utf-8")
    return runner.invoke(app, words)


def test_every_mistake_line_the_readme_shows_is_one_validate_prints(tmp_path, monkeypatch):
    """Each quoted line, word for word, from `emrun validate` on a recipe with those
    mistakes (and the override a quoted line names)."""
    words, shown = _mistake_example()
    named = [m[1] for line in shown if (m := re.match(r"error: override -o (\S+):", line))]
    given = [word for expr in named if expr not in words for word in ("-o", expr)]
    result = _run_in(tmp_path, monkeypatch, [*words, *given])
    assert result.exit_code == 2
    printed = result.stderr.splitlines()
    assert [line for line in shown if line not in printed] == []


def test_the_mistake_example_prints_what_the_readme_shows(tmp_path, monkeypatch):
    words, shown = _mistake_example()
    result = _run_in(tmp_path, monkeypatch, words)
    assert result.stderr.splitlines() == shown


# --- outputs the examples promise --------------------------------------------------------------

def _example(start: str) -> Invocation:
    """The Examples block's command line that starts with `emrun START`."""
    return next(i for i in readme_invocations()
                if i.text.startswith(f"emrun {start}") and i.line in dict(bash_lines()))


def _comment(invocation: Invocation) -> str:
    return invocation.text.split("#", 1)[1].strip()


def test_data_synth_writes_the_volumes_the_example_names(tmp_path, monkeypatch):
    """`emrun data synth synth.zarr --shape 64 256 256 --seed 1  # synth.zarr/{image,labels,
    mito,synapse}` (smaller here)."""
    example = _example("data synth")
    store, names = re.fullmatch(r"(\S+)/\{([\w,]+)\}", _comment(example)).groups()
    args = list(example.args)
    at = args.index("--shape")
    args[at + 1:at + 4] = ["8", "64", "64"]
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, [*example.path, *args])
    assert result.exit_code == 0, result.output
    for name in names.split(","):
        assert open_volume(f"{store}/{name}").shape == (8, 64, 64), name


def test_data_convert_guesses_the_name_the_example_gives(tmp_path, monkeypatch):
    """`emrun data convert stack.tif vol.zarr --voxel-size 30 6 6  # vol.zarr/image (guessed
    name)`."""
    import tifffile

    example = _example("data convert stack.tif")
    written = _comment(example).split()[0]
    monkeypatch.chdir(tmp_path)
    tifffile.imwrite(example.args[0], np.arange(4 * 16 * 16, dtype=np.uint8).reshape(4, 16, 16))
    result = runner.invoke(app, [*example.path, *example.args])
    assert result.exit_code == 0, result.output
    at = example.args.index("--voxel-size")
    assert open_volume(written).voxel_size == tuple(float(v) for v in example.args[at + 1:at + 4])


def _affinities(path: Path) -> None:
    """Two cells side by side in x: affinity 1 inside each, 0 across the boundary."""
    affs = np.full((3, 4, 16, 16), 255, np.uint8)
    affs[2, :, :, 8] = 0
    write_volume(path.parent, path.name, affs, channel_axis=True, levels=1,
                 attrs={"offsets": [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]})


def test_segment_writes_the_names_the_examples_give(tmp_path, monkeypatch):
    """`emrun segment pred.zarr/affinity seg.zarr  # ... -> seg.zarr/segmentation` and `...
    --method cc --threshold 0.3,0.5,0.7  # one per value` (`NAME_0.3`, ...)."""
    default = _example("segment pred.zarr/affinity seg.zarr ")
    per_value = _example("segment pred.zarr/affinity seg.zarr --method cc")
    monkeypatch.chdir(tmp_path)
    _affinities(tmp_path / default.args[0])
    result = runner.invoke(app, [*default.path, *default.args])
    assert result.exit_code == 0, result.output
    segmentation = open_volume(_comment(default).split("->")[1].strip()).read()
    assert len(np.unique(segmentation)) == 2
    result = runner.invoke(app, [*per_value.path, *per_value.args])
    assert result.exit_code == 0, result.output
    values = per_value.args[per_value.args.index("--threshold") + 1].split(",")
    for value in values:
        assert open_volume(f"{per_value.args[1]}/segmentation_{value}").shape == (4, 16, 16)


def _evaluation_keys() -> list[str]:
    """The figures the README's Evaluation section names (`rand_split` = ..., `splits`: ...)."""
    section = README.split("\n## Evaluation\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"`([a-z_]+)`(?= =|:| and `)", section)


def test_evaluate_json_is_one_line_with_the_figures_the_readme_names(tmp_path):
    """`emrun evaluate seg truth --json | jq .arand` works: stdout is one JSON line holding
    arand, rand_split, ..., truth_objects and segments."""
    keys = _evaluation_keys()
    assert {"arand", "voi_split", "cremi_score", "splits", "truth_objects"} <= set(keys)
    truth = np.zeros((2, 8, 8), np.uint32)
    truth[:, :, 4:] = 1
    truth[:, :, :4] = 2
    seg = truth.copy()
    seg[:, :4, :4] = 3
    write_volume(tmp_path / "seg.zarr", "segmentation", seg, levels=1)
    write_volume(tmp_path / "vol.zarr", "labels", truth, levels=1)
    result = runner.invoke(app, ["evaluate", str(tmp_path / "seg.zarr" / "segmentation"),
                                 str(tmp_path / "vol.zarr" / "labels"), "--json"])
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 1
    figures = json.loads(result.stdout)
    assert [key for key in keys if key not in figures] == []
    assert figures["arand"] > 0 and figures["splits"] == 0


# --- the code the README points into -----------------------------------------------------------

def test_the_layout_names_files_that_exist():
    """The `## Layout` block's folders and modules and the files its lines name (`app.py`,
    `run.py`, `blockwise.py`, ...); every `emrun/...`, `tests/...` path in inline code."""
    block = next(b.group(2) for b in FENCE.finditer(README)
                 if not b.group(1) and "emrun/cli/" in b.group(2))
    missing: list[str] = []
    folder = ROOT
    for line in block.splitlines():
        if (head := re.match(r"^(\S+)\s", line)) and "/" in head.group(1):
            named = ROOT / head.group(1)
            folder = named if head.group(1).endswith("/") else named.parent
            missing += [] if named.exists() else [head.group(1)]
        missing += [f"{folder.relative_to(ROOT)}/{name}"
                    for name in re.findall(r"(?<![\w/.])(\w+\.py)\b", line[20:])
                    if not (folder / name).exists()]
    spans = " ".join(text for _, text in inline_code())
    named_paths = set(re.findall(r"(?<![\w/.])((?:emrun|tests|tools)/[\w/.-]*\w)", spans))
    assert len(named_paths) >= 4
    missing += sorted(path for path in named_paths if not (ROOT / path).exists())
    assert missing == []


def _resolve(name: str) -> Any:
    """`emrun.geometry.BlockGrid`: the longest importable module, then its attributes."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        try:
            found: Any = importlib.import_module(".".join(parts[:end]))
        except ModuleNotFoundError:
            continue
        for part in parts[end:]:
            found = getattr(found, part)
        return found
    raise ModuleNotFoundError(name)


def test_the_python_names_the_readme_gives_exist():
    """`emrun.data.loader.unpack(batch, device)`, `emrun.segment.base.Segmenter`, `ModelBase`
    (`emrun.recipe.model`), the plugin example's imports; `emrun.plugins` is the entry-point
    group the registry loads."""
    names = set(re.findall(r"`(emrun(?:\.[A-Za-z_]\w*)+)[`(]", README)) - {"emrun.plugins"}
    names |= {f"{module}.{name}" for name, module in
              re.findall(r"`([A-Z]\w+)` \(`(emrun[\w.]*)`\)", " ".join(README.split()))}
    for code in re.findall(r"```python\n(.*?)```", README, flags=re.S):
        names |= {f"{m[1]}.{m[2]}" for m in re.finditer(r"^from (emrun[\w.]*) import (\w+)",
                                                          code, flags=re.M)}
    assert len(names) >= 12
    for name in sorted(names):
        _resolve(name)
    assert '"emrun.plugins"' in (ROOT / "emrun" / "registry.py").read_text("utf-8")


def test_the_plugin_example_registers_an_augmentation_that_runs(monkeypatch):
    """The README's `my_plugin.py`, run as written: `sparkle` registers, builds from its spec
    and brightens about `amount` of the voxels, passing the pipeline's output checks."""
    from emrun.data.augment.base import Context, Pipeline, Sample
    from emrun.registry import augmentations

    monkeypatch.setattr(augmentations, "_entries", dict(augmentations._entries))
    example = next(block for block in re.findall(r"```python\n(.*?)```", README, flags=re.S)
                   if ".register(" in block)
    namespace: dict[str, Any] = {"__name__": "my_plugin"}
    exec(compile(example, "README.md (my_plugin.py)", "exec", dont_inherit=True), namespace)
    assert "sparkle" in augmentations
    pipeline = Pipeline([namespace["Sparkle"](amount=0.5)])
    steps, shape = pipeline.prepare(np.random.default_rng(0), (4, 16, 16), Context())
    out = Pipeline.apply(steps, Sample(np.zeros(shape, np.float32), None, None, {}))
    assert 0.35 < float(out.image.mean()) < 0.65


def test_a_run_goes_where_the_readme_says(tmp_path, monkeypatch):
    """`emrun train recipes/snemi3d_aff.yaml  # -> runs/snemi3d_aff/` ("runs go to
    runs/<name>"): the run directory is named after the recipe's `name`."""
    import emrun.train.trainer

    example = _example("train recipes/snemi3d_aff.yaml ")
    promised = re.fullmatch(r"-> (\S+)/", _comment(example))
    assert promised is not None
    assert f"runs/{load_recipe(ROOT / example.args[0]).recipe.name}" == promised.group(1)
    started: list[Path] = []

    class Stopped(Exception):
        """Raised where training would start."""

    def trainer(loaded: Any, path: Path, **_: Any) -> None:
        started.append(path)
        raise Stopped

    monkeypatch.setattr(emrun.train.trainer, "Trainer", trainer)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(MINIMAL, encoding="utf-8")
    runner.invoke(app, ["train", "tiny.yaml"])
    assert started == [Path("runs") / "tiny"]
