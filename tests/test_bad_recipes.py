"""The malformed-recipe corpus: every broken recipe exits 2 with a located message, no traceback.

Each ``tests/bad_recipes/*.yaml`` (except the ``_*.yaml`` bases that ``extends`` cases use)
is a near-valid recipe with one deliberate problem, and says on its first line what
``emrun validate`` must report::

    # expect: LINE: SUBSTRING
    # expect: OTHER_FILE:LINE: SUBSTRING     (the problem lies in a file it extends)

LINE is the 1-based line the message must point at, or ``-`` when the problem has no line
(an empty file). Cases that cannot be static files (a directory, binary bytes, a huge file,
malformed ``-o`` overrides) are made in code below.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from conftest import ROOT
from typer.testing import CliRunner, Result

from emrun.cli import app

CORPUS = ROOT / "tests" / "bad_recipes"
CASES = sorted(p for p in CORPUS.glob("*.yaml") if not p.name.startswith("_"))
BASE = CORPUS / "_base.yaml"  # a valid recipe
EXPECT = re.compile(r"^# expect: (?:(?P<file>[\w.\-]+\.yaml):)?(?P<line>\d+|-): (?P<text>.+)$")

runner = CliRunner()


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    # messages name files relative to the working directory, as the user typed them
    monkeypatch.chdir(ROOT)


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def validate(*args: str) -> Result:
    return runner.invoke(app, ["validate", *args, "--no-data"])


def assert_user_error(result: Result) -> str:
    """Exit 2 with `error: ` lines on stderr, nothing on stdout, and no traceback."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output and "internal error" not in result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), result.stderr
    return result.stderr


def test_corpus_is_large_enough_and_every_case_says_what_to_expect():
    assert len(CASES) >= 45
    for path in CASES:
        first = path.read_text(encoding="utf-8").split("\n", 1)[0]
        assert EXPECT.match(first), f"{path.name}: first line must be '# expect: LINE: TEXT'"


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_bad_recipe_gives_exit_2_and_a_located_message(path: Path):
    match = EXPECT.match(path.read_text(encoding="utf-8").split("\n", 1)[0])
    assert match, f"{path.name}: no '# expect:' line"
    shown = rel(CORPUS / match["file"]) if match["file"] else rel(path)
    stderr = assert_user_error(validate(rel(path)))
    if match["line"] == "-":
        assert f"error: {shown}: " in stderr
    else:
        assert f"error: {shown}:{match['line']}:" in stderr
    assert match["text"] in stderr


@pytest.mark.parametrize("name", ["unknown_key_train", "yaml_unclosed_bracket",
                                  "patch_not_divisible", "tab_indent"])
def test_lines_are_right_with_windows_line_endings(name: str, tmp_path: Path):
    text = (CORPUS / f"{name}.yaml").read_text(encoding="utf-8")
    match = EXPECT.match(text.split("\n", 1)[0])
    assert match
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(text.replace("\n", "\r\n").encode())
    stderr = assert_user_error(validate(str(path)))
    assert f"{path}:{match['line']}:" in stderr  # outside the working directory: absolute
    assert match["text"] in stderr


def test_several_problems_are_all_reported_each_at_its_line(tmp_path: Path):
    text = BASE.read_text(encoding="utf-8")
    for old, new in [("seed: 1}", "seed: 1, sead: 2}"),          # line 5
                     ("type: rsunet", "type: rsunet\n  norm: batchnorm"),  # line 8
                     ("target: {type: affinity}", "target: {type: affinity}\n    weight: -1"),
                     ("iterations: 100", "iterations: lots")]:
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / "several.yaml"
    path.write_text(text, encoding="utf-8")
    lines = assert_user_error(validate(str(path))).splitlines()
    expected = [(5, "data.sources.a.sead: unknown key 'sead'; did you mean 'seed'?"),
                (8, "model.norm: input should be"),
                (13, "tasks.aff.weight: input should be greater than or equal to 0"),
                (16, "train.iterations: input should be a valid integer")]
    for line, text in expected:
        assert any(f"{path}:{line}:" in m and text in m for m in lines), (line, lines)
    assert len(lines) == len(expected)


def test_cross_section_problems_are_all_reported(tmp_path: Path):
    text = BASE.read_text(encoding="utf-8").replace("patch: [8, 36, 36]", "patch: [8, 30, 36]")
    text = text.replace("target: {type: affinity}",
                        "target: {type: affinity, offsets: [[-9, 0, 0]]}\n    weight: 0")
    path = tmp_path / "cross.yaml"
    path.write_text(text, encoding="utf-8")
    stderr = assert_user_error(validate(str(path)))
    assert f"{path}:11:" in stderr and "offsets reach [9, 0, 0] voxels" in stderr
    assert f"{path}:9:" in stderr and "tasks: at least one task needs a weight" in stderr
    assert f"{path}:14:" in stderr and "train.patch: y and x must be divisible by 4" in stderr


# ------------------------------------------------------------------ cases made in code


def test_directory_instead_of_a_file(tmp_path: Path):
    assert "error: tests/bad_recipes: is a directory" in assert_user_error(
        validate("tests/bad_recipes"))
    assert f"error: {tmp_path}: is a directory" in assert_user_error(validate(str(tmp_path)))


def test_missing_file(tmp_path: Path):
    stderr = assert_user_error(validate("tests/bad_recipes/no_such_recipe.yaml"))
    assert "error: tests/bad_recipes/no_such_recipe.yaml: no such file" in stderr


def test_random_binary_bytes(tmp_path: Path):
    path = tmp_path / "garbage.yaml"
    path.write_bytes(random.Random(1234).randbytes(4096))
    stderr = assert_user_error(validate(str(path)))
    assert f"error: {path}: is not a UTF-8 text file" in stderr


def test_random_control_characters(tmp_path: Path):
    rng = random.Random(99)
    path = tmp_path / "controls.yaml"
    path.write_bytes(b"name: x\nseed: 1\n" + bytes(rng.choice(range(1, 9)) for _ in range(200)))
    stderr = assert_user_error(validate(str(path)))
    assert f"error: {path}:3:1: invalid YAML: character U+000" in stderr


def test_nul_byte(tmp_path: Path):
    path = tmp_path / "nul.yaml"
    path.write_text(BASE.read_text(encoding="utf-8").replace("name: base", "name: ba\0se"),
                    encoding="utf-8")
    stderr = assert_user_error(validate(str(path)))
    assert f"error: {path}:2:9: invalid YAML: character U+0000 is not allowed" in stderr


def test_huge_file(tmp_path: Path):
    path = tmp_path / "huge.yaml"
    line = b"# " + b"x" * 97 + b"\n"
    path.write_bytes(BASE.read_bytes() + line * (20 * 1024 * 1024 // len(line)))
    stderr = assert_user_error(validate(str(path)))
    assert f"error: {path}: is larger than 10 MiB" in stderr


def test_extends_a_binary_file(tmp_path: Path):
    (tmp_path / "blob.bin").write_bytes(random.Random(7).randbytes(512))
    path = tmp_path / "child.yaml"
    path.write_text("name: child\nextends: blob.bin\n", encoding="utf-8")
    stderr = assert_user_error(validate(str(path)))
    assert f"error: {path}:2:10: extends: " in stderr and "is not a UTF-8 text file" in stderr


@pytest.mark.parametrize(("override", "text"), [
    ("train.patch", "an override is written key.path=value"),
    ("=3", "an override is written key.path=value"),
    ("train..patch=[8, 32, 32]", "'train..patch' is not a key path one can override"),
    ("extends=x.yaml", "'extends' is not a key path one can override"),
    ("train.patch=[1,2", "the value is not valid YAML: expected ',' or ']'"),
    ("data.sources.a.type.deep=1",
     "cannot set data.sources.a.type.deep: data.sources.a.type is 'synthetic', not a mapping"),
    ("name.x=1", "cannot set name.x: name is 'base', not a mapping"),
    ("model.widths.7=4", "model.widths is a list of 3; '7' is not an index in it"),
    ("train.patch=[8, 30, 32]", "train.patch: y and x must be divisible by 4"),
    ("train.batchsize=2", "train.batchsize: unknown key 'batchsize'; did you mean 'batch_size'?"),
    ("model.type=rsunett", "unknown model type 'rsunett'; did you mean 'rsunet'?"),
    # made or changed by the override, so blamed on it, not on the line of `train:` or `tasks:`
    ("train.optimzer.lr=1", "train.optimzer: unknown key 'optimzer'; did you mean 'optimizer'?"),
    ("train.schedule.type=step", "train.schedule.milestones: required key is missing"),
    ("train.patch.1=30", "train.patch: y and x must be divisible by 4"),
    ("tasks.aff.weight=0", "tasks: at least one task needs a weight above 0"),
    ("model.norm=off", "(got false); YAML reads off as false; write 'off' in quotes"),
    ("seed=!!int x", "the value is not valid YAML: a tag (!!...) cannot read '!!int x'"),
])
def test_malformed_overrides(override: str, text: str):
    stderr = assert_user_error(validate(rel(BASE), "-o", override))
    assert f"error: override -o {override}: " in stderr
    assert text in stderr
    assert len(stderr.splitlines()) == 1


def test_markup_like_text_in_a_value_is_printed_verbatim(tmp_path: Path):
    path = tmp_path / "markup.yaml"
    path.write_text(BASE.read_text(encoding="utf-8").replace("name: base", 'name: "[/x] [b]"'),
                    encoding="utf-8")
    stderr = assert_user_error(validate(str(path)))
    assert "[/x] [b]" in stderr


def test_a_divisor_that_differs_by_axis_says_which_axis_needs_which():
    """'(2, 4, 4)' was said as 'z, y and x must be divisible by 2 / 4'."""
    from emrun.recipe.checks import _divisibility

    said = _divisibility((3, 30, 32), (2, 4, 4), "rsunet with 3 levels")
    assert said == "z must be divisible by 2, y and x by 4 for rsunet with 3 levels " \
        "(got [3, 30, 32])"
    assert _divisibility((4, 32, 32), (2, 4, 4), "rsunet") is None


def test_an_override_changing_a_type_says_which_keys_are_left_from_the_old_one():
    """`-o data.sources.a.type=volume` on a synthetic source said "unknown key 'shape'"
    (and 'seed') alone: the keys are the old type's, which the override kept."""
    stderr = assert_user_error(validate(rel(BASE), "-o", "data.sources.a.type=volume"))
    lines = [line for line in stderr.splitlines() if "unknown key" in line]
    assert lines and all(line.endswith(
        "a key of this mapping before -o changed its type; to replace the whole mapping, "
        "give -o 'data.sources.a={type: ...}'") for line in lines), stderr
    assert "required key is missing" in stderr  # the new type's own needs, as before
