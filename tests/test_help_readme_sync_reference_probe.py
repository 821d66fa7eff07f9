"""Reference probe: the README's command table and each command's `--help` say the same.

The table rows (`| `emrun ...` |`) are parsed into options with their value placeholders;
the click command objects (typer.main.get_command) give what each command really takes. Beyond
tests/test_readme_claims.py (names, metavar alternatives, a few quoted defaults) this checks:
short forms, the number of values each option takes, repeatable options, positional
arguments, the alternatives a row or metavar gives against the values the command's own
validation accepts (its refusal message lists them), help text on every option, the
defaults the help states against the code's constants and against what the command does on
small synthetic volumes, that options nested in a row's bracket group are refused without
the option that opens it, and options that prose attributes to a command."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
import zarr
from conftest import ROOT
from typer.testing import CliRunner

from emrun.cli import app
from emrun.io import write_volume

runner = CliRunner()
README = (ROOT / "README.md").read_text(encoding="utf-8")
OFFSETS = [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]


# --- the app ---------------------------------------------------------------------------------

def _walk(group: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    found: dict[tuple[str, ...], Any] = {}
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            found |= _walk(command, (*prefix, name))
        else:
            found[(*prefix, name)] = command
    return found


COMMANDS = _walk(typer.main.get_command(app))


def _options(path: tuple[str, ...]) -> list[Any]:
    return [p for p in COMMANDS[path].params if p.param_type_name == "option"]


def _param(path: tuple[str, ...], name: str) -> Any:
    for param in _options(path):
        if name in param.opts or name in param.secondary_opts:
            return param
    raise KeyError(f"{' '.join(path)} {name}")


# --- the README's table ----------------------------------------------------------------------

@dataclass
class Row:
    """One table row: positionals, and each option with the words that follow it."""

    path: tuple[str, ...]
    text: str
    positionals: list[str] = field(default_factory=list)
    values: dict[str, list[str]] = field(default_factory=dict)
    parent: dict[str, str | None] = field(default_factory=dict)


def _rows_text() -> list[str]:
    section = README.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    return [row.replace("\\|", "|")
            for row in re.findall(r"^\| `(emrun [^`]+)` \|", section, flags=re.M)]


def _parse_row(text: str) -> Row:
    words = text.split()[1:]
    path = tuple(words[:2]) if tuple(words[:2]) in COMMANDS else (words[0],)
    row = Row(path, text)
    current: str | None = None
    stack: list[str | None] = []  # the option that opened each open bracket
    for word in words[len(path):]:
        opens = len(word) - len(word.lstrip("["))
        core = word.lstrip("[")
        closes = len(core) - len(core.rstrip("]"))
        core = core.rstrip("]")
        parts = core.split("|")
        first_option = next((i for i, p in enumerate(parts) if p.startswith("-")), None)
        if first_option is None:  # a value (or a positional before any option)
            if current is None:
                row.positionals.append(core)
            else:
                row.values[current].append(core)
        else:
            if first_option and current is not None:  # `C|RUN_DIR|--model`: C|RUN_DIR is a value
                row.values[current].append("|".join(parts[:first_option]))
            for _ in range(opens):
                stack.append(None)
            outer = next((o for o in reversed(stack[:-1] if opens else stack) if o), None)
            for part in parts[first_option:]:
                row.values[part] = []  # shown twice (segment's --workers): alike each time
                row.parent.setdefault(part, outer)
                current = part
            if opens:
                stack[-1] = current
        for _ in range(closes):
            if stack:
                stack.pop()
            current = None
    return row


@cache
def rows() -> dict[tuple[str, ...], Row]:
    return {row.path: row for row in map(_parse_row, _rows_text())}


def test_the_table_parses_into_every_command():
    parsed = rows()
    assert set(parsed) == set(COMMANDS)
    assert parsed[("segment",)].values["--block"] == ["Z", "Y", "X"]
    assert parsed[("segment",)].parent["--truth"] == "--sweep"
    assert parsed[("segment",)].parent["--db"] == "--scheduler"
    assert parsed[("evaluate",)].parent["--threshold"] == "--binary"
    assert parsed[("infer",)].values["--checkpoint"] == ["C|RUN_DIR"]
    assert parsed[("data", "convert")].positionals == ["IN", "OUT.zarr"]


def test_every_option_in_a_row_exists_and_short_forms_agree():
    """Each option word of a row is one of the command's (long, short or --no- form), and the
    short forms a command takes (-o) are the ones its row shows."""
    unknown, shorts = [], []
    for path, row in rows().items():
        names = {n for p in _options(path) for n in (*p.opts, *p.secondary_opts)}
        unknown += [f"{' '.join(path)} {o}" for o in row.values if o not in names]
        real = {n for p in _options(path) for n in p.opts if re.fullmatch(r"-[A-Za-z]", n)}
        shown = {o for o in row.values if re.fullmatch(r"-[A-Za-z]", o)}
        if real != shown:
            shorts.append((" ".join(path), sorted(real), sorted(shown)))
    assert unknown == []
    assert shorts == []
    assert any("-o" in row.values for row in rows().values())


def test_each_option_shows_as_many_values_as_it_takes():
    """A flag shows no value; `--block Z Y X` three; every other option one."""
    wrong = []
    for path, row in rows().items():
        for option, values in row.values.items():
            param = _param(path, option)
            shown = [v for v in values if v != "..."]
            want = 0 if param.is_flag else param.nargs
            if len(shown) != want:
                wrong.append((" ".join(path), option, values, want))
    assert wrong == []


def test_repeatable_options_are_the_ones_marked_repeatable():
    """`--bias B ...`, `--workers N,...`: a `...` exactly where the option is repeatable.
    (-o is repeatable everywhere; only `validate`'s row marks it, so it is left out here.)"""
    wrong = []
    for path, row in rows().items():
        for option, values in row.values.items():
            param = _param(path, option)
            if "-o" in param.opts:
                continue
            marked = "..." in values or any(v.endswith(",...") for v in values)
            if marked != bool(param.multiple):
                wrong.append((" ".join(path), option, values, param.multiple))
    assert wrong == []


def test_positional_arguments_are_the_ones_the_command_takes():
    wrong = []
    for path, row in rows().items():
        arguments = [p for p in COMMANDS[path].params if p.param_type_name == "argument"]
        if len(arguments) != len(row.positionals):
            wrong.append((" ".join(path), row.positionals, [a.name for a in arguments]))
        for argument, shown in zip(arguments, row.positionals, strict=False):
            if argument.nargs == -1 and not shown.endswith("..."):
                wrong.append((" ".join(path), shown, "takes many"))
    assert wrong == []


# --- alternatives against validation -----------------------------------------------------------

@pytest.fixture(scope="module")
def affs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny float affinity volume (two cells split at x = 8) and its labels."""
    folder = tmp_path_factory.mktemp("affs")
    values = np.full((3, 4, 16, 16), 0.9, np.float32)
    values[2, :, :, 8] = 0.05
    write_volume(folder / "a.zarr", "affinity", values, channel_axis=True,
                 attrs={"offsets": OFFSETS})
    labels = np.ones((4, 16, 16), np.uint32)
    labels[:, :, 8:] = 2
    write_volume(folder / "a.zarr", "truth", labels)
    return folder


CHOICE = re.compile(r"^[a-z0-9]+(?:\|[a-z0-9]+)+$")


def _shown_choices() -> dict[tuple[tuple[str, ...], str], set[str]]:
    """Every option's alternatives, from its row (`local|daisy`) or metavar (`1|2|4|8|16`)."""
    found: dict[tuple[tuple[str, ...], str], set[str]] = {}
    for path, row in rows().items():
        for option, values in row.values.items():
            for value in values:
                if CHOICE.fullmatch(value):
                    found[(path, option)] = set(value.split("|"))
        for param in _options(path):
            if param.metavar and CHOICE.fullmatch(param.metavar):
                key = (path, param.opts[0])
                assert found.get(key, set(param.metavar.split("|"))) == \
                    set(param.metavar.split("|")), key
                found[key] = set(param.metavar.split("|"))
    return found


def _refusal_choices(message: str) -> set[str]:
    """The values a refusal lists: `must be 1, 2, 4, 8 or 16 (got 3)`, `choose local or
    daisy`, `one of emrun, bioimageio, onnx`, `(known: cc, mws, waterz)`."""
    match = re.search(r"(?:must be one of|must be|choose|known:)\s+([^();]+)", message)
    assert match, message
    words = re.split(r",\s*|\s+or\s+", match.group(1).strip())
    return {w.strip() for w in words if w.strip()}


def _invocation(path: tuple[str, ...], option: str, bogus: str, affs: Path,
                out: Path) -> list[str]:
    a = str(affs / "a.zarr/affinity")
    if path == ("infer",):
        return ["infer", "--input", a, "--output", str(out), "--checkpoint", "none.pt",
                option, bogus]
    if path == ("segment",):
        extra = ["--scheduler", "local"] if option in ("--fragments", "--agglomeration") else []
        return ["segment", a, str(out), *extra, option, bogus]
    if path == ("evaluate",):
        return ["evaluate", a, a, option, bogus]
    if path == ("export",):
        return ["export", str(out / "none"), str(out / "x.emrun"), option, bogus]
    return [*path, option, bogus]


def test_the_alternatives_shown_are_the_values_the_command_accepts(affs, tmp_path):
    """Each option with alternatives, given a value outside them, is refused in one line
    (exit 2, nothing written) that lists exactly the alternatives the README and --help show."""
    choices = _shown_choices()
    assert {(("segment",), "--method"), (("infer",), "--tta"), (("export",), "--format"),
            (("segment",), "--fragments"),
            (("bench", "segment"), "--agglomeration")} <= set(choices)
    wrong = []
    for (path, option), shown in sorted(choices.items()):
        out = tmp_path / f"{'-'.join(path)}{option}.zarr"
        bogus = "3" if shown <= {str(2**i) for i in range(8)} else "bogus"
        result = runner.invoke(app, _invocation(path, option, bogus, affs, out))
        assert result.exit_code == 2, (path, option, result.output)
        assert not out.exists(), (path, option)
        accepted = _refusal_choices(result.output)
        if accepted != shown:
            wrong.append((" ".join(path), option, sorted(shown), sorted(accepted)))
    assert wrong == []


# --- help text ---------------------------------------------------------------------------------

def test_every_option_and_argument_has_help_and_help_lists_it():
    """Every parameter has a sentence of help, and `COMMAND --help` (wide terminal) lists
    each option's names and the start of its help."""
    missing, unlisted = [], []
    for path, command in COMMANDS.items():
        assert (command.help or "").strip(), path
        shown = runner.invoke(app, [*path, "--help"], terminal_width=400,
                              env={"COLUMNS": "400"})
        assert shown.exit_code == 0, path
        text = " ".join(shown.output.split())
        for param in command.params:
            helptext = " ".join((getattr(param, "help", None) or "").split())
            if len(helptext) < 10:
                missing.append((" ".join(path), param.name))
                continue
            names = [*param.opts, *param.secondary_opts] if param.param_type_name == "option" \
                else [param.metavar or param.name.upper()]
            if not all(n in text for n in names) or helptext[:40] not in text:
                unlisted.append((" ".join(path), param.name))
    assert missing == []
    assert unlisted == []


def _help(path: tuple[str, ...], option: str) -> str:
    return " ".join(_param(path, option).help.split())


def test_the_defaults_the_help_states_are_the_codes_constants():
    from emrun.bench.codecs import DEFAULT_CHUNKS
    from emrun.bench.snemi3d import DEFAULT_RECIPE
    from emrun.evaluate.blockwise import BLOCK_VOXELS
    from emrun.evaluate.metrics import MIN_OVERLAP
    from emrun.io.pyramid import MAX_LEVELS, SMALLEST_YX
    from emrun.io.write import CHUNK_ZYX
    from emrun.recipe.run import SWEEP_VALUES
    from emrun.segment import job
    from emrun.segment.request import SegmentRequest
    from emrun.segment.scale import command as scale

    request = SegmentRequest.__dataclass_fields__
    seg = ("segment",)
    stated = {
        (seg, "--block", f"at most {' '.join(map(str, job.DEFAULT_BLOCK))}"),
        (seg, "--block", f"--scheduler: {' '.join(map(str, scale.DEFAULT_BLOCK))}"),
        (seg, "--block", f"beyond {job.MEMORY_BYTES // 2**30} GiB"),
        (seg, "--sweep", f"default {min(SWEEP_VALUES):g} ... {max(SWEEP_VALUES):g}"),
        (seg, "--name", f"default: {request['name'].default}"),
        (seg, "--fragments", f"default: {request['fragments'].default}"),
        (seg, "--agglomeration", f"Default: {request['agglomeration'].default}"),
        (("evaluate",), "--min-overlap", f"default: {MIN_OVERLAP}"),
        (("evaluate",), "--block", f"about {BLOCK_VOXELS // 1_000_000} million voxels"),
        (("data", "convert"), "--chunks", f"up to {' x '.join(map(str, CHUNK_ZYX))}"),
        (("bench", "codecs"), "--chunks", f"default: {' '.join(DEFAULT_CHUNKS)}"),
        (("bench", "snemi3d"), "--recipe", f"default {DEFAULT_RECIPE}"),
    }
    for path in (seg, ("infer",), ("data", "convert"), ("data", "synth")):
        stated.add((path, "--levels", f"at most {SMALLEST_YX}, at most {MAX_LEVELS}"))
    wrong = [(" ".join(path), option, phrase) for path, option, phrase in sorted(stated)
             if phrase not in _help(path, option)]
    assert wrong == []
    from emrun.registry import segmenters

    assert {segmenters.entry(n).spec.sweep_values for n in ("mws", "cc", "waterz")} == \
        {SWEEP_VALUES}


def test_the_values_a_row_spells_out_are_the_defaults():
    """`[--n 8] [--out preview.png]`, schema's `default schemas/recipe.schema.json`, the
    demo's `emrun-demo/metrics.json`: a literal in the table is the default."""
    preview = rows()[("data", "preview")].values
    assert int(preview["--n"][0]) == _param(("data", "preview"), "--n").default
    assert Path(preview["--out"][0]) == _param(("data", "preview"), "--out").default
    schema_default = _param(("schema",), "--output").default
    assert f"(default `{schema_default}`" in README
    assert f"`{_param(('demo',), '--out').default}/metrics.json`" in README
    shown = runner.invoke(app, ["view", "--help"], terminal_width=400).output
    assert f"[default: {_param(('view',), '--bind').default}]" in shown


# --- the stated defaults, as the commands behave ------------------------------------------------

def _invoke_json(args: list[str]) -> dict[str, Any]:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_evaluate_defaults_min_overlap_100_and_binary_threshold_half(tmp_path):
    """One truth object of 300 voxels cut 200 + 100: split at a minimum overlap of 100, not at
    101; a prediction of 0.4 and 0.6 halves: foreground above 0.5 only."""
    truth = np.ones((1, 10, 30), np.uint32)
    seg = np.ones((1, 10, 30), np.uint32)
    seg[..., 20:] = 2
    pred = np.full((1, 10, 30), 0.4, np.float32)
    pred[..., 15:] = 0.6
    for name, array in (("truth", truth), ("seg", seg), ("pred", pred)):
        write_volume(tmp_path / "e.zarr", name, array)
    s, t, p = (str(tmp_path / "e.zarr" / n) for n in ("seg", "truth", "pred"))
    default = _invoke_json(["evaluate", s, t])
    assert default["splits"] == 1 and default["min_overlap"] == 100
    assert _invoke_json(["evaluate", s, t, "--min-overlap", "101"])["splits"] == 0
    binary = _invoke_json(["evaluate", p, t, "--binary"])
    assert binary["threshold"] == 0.5 and binary["tp"] == 150 and binary["fn"] == 150
    assert _invoke_json(["evaluate", p, t, "--binary", "--threshold", "0.3"])["tp"] == 300


def test_segment_defaults_mws_bias_half_and_sweep_values(affs, tmp_path):
    """Affinities that record no recipe: mws, bias 0.5, min_size 0 (README's mws bullet and
    --method's help); --sweep without values tries 0.1 ... 0.9 (--sweep's help)."""
    a = str(affs / "a.zarr/affinity")
    plain = _invoke_json(["segment", a, str(tmp_path / "o.zarr")])
    assert plain["method"] == "mws"
    assert plain["parameters"] == {"type": "mws", "bias": 0.5, "min_size": 0}
    assert [o["name"] for o in plain["outputs"]] == ["segmentation"]
    for method, parameter in (("mws", "bias"), ("cc", "threshold")):
        swept = _invoke_json(["segment", a, str(tmp_path / f"{method}.zarr"), "--method",
                              method, "--sweep", "--truth", str(affs / "a.zarr/truth")])
        tried = [row[parameter] for row in swept["sweep"]["table"]]
        assert tried == pytest.approx([i / 10 for i in range(1, 10)]), method


def _levels(folder: Path, name: str) -> list[tuple[int, ...]]:
    group = zarr.open_group(str(folder))[name]
    return [group[k].shape for k in sorted(group.keys(), key=int)]


@pytest.mark.parametrize(("shape", "levels"), [
    ((1, 256, 8), 1), ((1, 512, 8), 2), ((1, 520, 8), 3), ((1, 8, 600), 3),
    ((1, 33000, 256), 8),
])
def test_convert_default_levels_and_chunks(tmp_path, shape, levels):
    """--levels' default: halve until y and x are at most 256, at most 8 levels (brute force:
    count the halvings); --chunks' default: up to 16 x 256 x 256."""
    np.save(tmp_path / "v.npy", np.zeros(shape, np.uint8))
    result = runner.invoke(app, ["data", "convert", str(tmp_path / "v.npy"),
                                 str(tmp_path / "v.zarr")])
    assert result.exit_code == 0, result.output
    want, y, x = 1, shape[1], shape[2]
    while max(y, x) > 256 and want < 8:
        y, x, want = -(-y // 2), -(-x // 2), want + 1
    assert want == levels
    assert len(_levels(tmp_path / "v.zarr", "image")) == levels
    chunks = zarr.open_group(str(tmp_path / "v.zarr"))["image"]["0"].chunks
    assert chunks == tuple(min(s, c) for s, c in zip(shape, (16, 256, 256), strict=True))


@pytest.mark.parametrize(("dtype", "flag", "name", "label"), [
    (np.uint8, None, "image", False), (np.float32, None, "image", False),
    (np.uint16, None, "labels", True), (np.int64, None, "labels", True),
    (np.bool_, None, "mask", False), (np.uint16, "--image", "image", False),
    (np.uint8, "--labels", "labels", True),
])
def test_convert_default_name_and_kind(tmp_path, dtype, flag, name, label):
    """--name's default: image with --image; else labels for a segmentation or integers wider
    than 8 bits, mask for booleans, image otherwise; --labels/--image's default: labels for
    integers wider than 8 bits (under OUT/labels)."""
    np.save(tmp_path / "v.npy", np.ones((2, 8, 8), dtype))
    result = runner.invoke(app, ["data", "convert", str(tmp_path / "v.npy"),
                                 str(tmp_path / "v.zarr"), *([flag] if flag else [])])
    assert result.exit_code == 0, result.output
    under_labels = (tmp_path / "v.zarr" / "labels" / name).is_dir()
    assert under_labels == label
    assert (tmp_path / "v.zarr" / ("labels" if label else "") / name).is_dir()


# --- nesting in a row: an inner option needs the one that opens its bracket --------------------

def _nested_cases(affs: Path, out: Path) -> list[tuple[str, list[str]]]:
    a = str(affs / "a.zarr/affinity")
    t = str(affs / "a.zarr/truth")
    cases: list[tuple[str, list[str]]] = []
    segment_values = {"--truth": [t], "--workers": ["2"], "--launch": ["srun"],
                      "--db": ["sqlite:///x.db"], "--fragments": ["mws"],
                      "--agglomeration": ["blockwise"], "--resume": []}
    for option, parent in rows()[("segment",)].parent.items():
        if parent is not None and option in segment_values:
            cases.append((f"segment {option} without {parent}",
                          ["segment", a, str(out), option, *segment_values[option]]))
    cases.append(("segment --connected-truth without --sweep",
                  ["segment", a, str(out), "--connected-truth"]))
    assert rows()[("evaluate",)].parent["--threshold"] == "--binary"
    cases.append(("evaluate --threshold without --binary",
                  ["evaluate", a, t, "--threshold", "0.5"]))
    assert rows()[("bench", "infer")].parent["--compile"] == "--configs"
    cases.append(("bench infer --compile without --configs",
                  ["bench", "infer", str(ROOT / "recipes/demo.yaml"), "--compile"]))
    return cases


def test_options_nested_in_a_bracket_are_refused_without_its_opener(affs, tmp_path):
    """`[--sweep --truth T [--connected-truth] [--workers N]]`, `[--scheduler local|daisy
    [--launch CMD] [--db URL] ...]`, `[--binary [--threshold T]]`, `[--configs [--compile]]`:
    given alone, each inner option is one line, exit 2, nothing written."""
    out = tmp_path / "o.zarr"
    cases = _nested_cases(affs, out)
    assert len(cases) >= 9
    wrong = []
    for label, args in cases:
        result = runner.invoke(app, args)
        lines = [line for line in result.output.splitlines() if line.strip()]
        if result.exit_code != 2 or out.exists() or len(lines) != 1:
            wrong.append((label, result.exit_code, result.output[-200:]))
    assert wrong == []


# --- prose that gives an option to commands ----------------------------------------------------

def test_options_prose_gives_to_commands_are_theirs():
    """"`--level NAME` or `--level Z,Y,X` ... on `emrun infer` (the input), `emrun segment`
    (the affinities) and `emrun data convert`", "`--connected-truth` (on `emrun evaluate` and
    `emrun segment --sweep`)", "`--levels N` on `infer`, `segment`, `data convert` and `data
    synth`": every command such a sentence names takes the option."""
    text = " ".join(re.sub(r"^```.*?^```", "", README, flags=re.S | re.M).split())
    pattern = re.compile(r"`(--[a-z][a-z0-9-]*)[^`]*`[^.;:`]{0,60}?\bon ((?:`[^`]+`[^`.;]*?)+)"
                         r"(?=[.;:]|$)")
    found = []
    for match in pattern.finditer(text):
        option = match.group(1)
        for span in re.findall(r"`([^`]+)`", match.group(2)):
            words = span.removeprefix("emrun ").split()
            path = tuple(words[:2]) if tuple(words[:2]) in COMMANDS else tuple(words[:1])
            if path in COMMANDS:
                found.append((option, path))
    assert ("--level", ("data", "convert")) in found
    assert ("--connected-truth", ("segment",)) in found
    assert ("--levels", ("data", "synth")) in found
    wrong = [(o, " ".join(p)) for o, p in found
             if o not in {n for q in _options(p) for n in (*q.opts, *q.secondary_opts)}]
    assert wrong == []
