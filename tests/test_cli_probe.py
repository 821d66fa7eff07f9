"""The command line's contract under misuse: options that conflict or would be ignored, sizes
that are not finite, defaults that refuse themselves; each one line, exit 2, nothing made."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import MINIMAL
from typer.testing import CliRunner

from emrun.cli import app
from emrun.io import open_volume, write_volume

runner = CliRunner()


def _one_error_line(result) -> str:
    """The single `error:` line a user's mistake prints (and nothing on stdout)."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert result.stdout == ""
    return lines[0]


@pytest.mark.parametrize("source", ["ids.npy", "seg.zarr/seg"])
def test_convert_image_flag_without_name_writes_image(tmp_path, source):
    """`data convert IDS OUT --image` (uint16 ids, or an OME label image, as an image) took
    the dtype's default name 'labels' and then refused it as the OME labels group."""
    ids = np.random.default_rng(0).integers(0, 500, (4, 16, 16)).astype(np.uint16)
    np.save(tmp_path / "ids.npy", ids)
    write_volume(tmp_path / "seg.zarr", "seg", ids, label=True)
    out = tmp_path / "out.zarr"
    result = runner.invoke(app, ["data", "convert", str(tmp_path / source), str(out),
                                 "--image", "--levels", "1"])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}/image" in result.stdout
    written = open_volume(f"{out}/image")
    assert not written.segmentation
    np.testing.assert_array_equal(written.read(), ids)


@pytest.mark.parametrize("option", ["--max-mb", "--sample-mb"])
def test_bench_codecs_infinite_size_is_the_users_mistake(tmp_path, option):
    """`--max-mb inf` passed the range check and ended as 'internal error: ValueError:
    cannot convert float NaN to integer' (exit 1)."""
    np.save(tmp_path / "v.npy", np.zeros((4, 16, 16), np.uint8))
    result = runner.invoke(app, ["bench", "codecs", str(tmp_path / "v.npy"), option, "inf",
                                 "--passes", "1", "--json"])
    assert option in _one_error_line(result)


def test_segment_scheduler_refuses_bias_it_would_ignore(tmp_path):
    """`segment --scheduler local --bias 0.3` agglomerated at waterz's default threshold 0.5
    and said nothing of the --bias given (without --scheduler, a value flag of another
    method is refused)."""
    np.save(tmp_path / "affs.npy", np.full((3, 4, 16, 16), 0.9, np.float32))
    out = tmp_path / "seg.zarr"
    result = runner.invoke(app, ["segment", str(tmp_path / "affs.npy"), str(out),
                                 "--offsets", "-1,0,0 0,-1,0 0,0,-1", "--scheduler", "local",
                                 "--bias", "0.3", "--json"])
    assert "--bias" in _one_error_line(result)
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--compile", "--no-compile"])
def test_bench_infer_compile_without_configs_is_refused(write, flag):
    """`bench infer --compile` (help: 'With --configs: search torch.compile too') without
    --configs ran eager only and reported it as if the flag had been honoured."""
    result = runner.invoke(app, ["bench", "infer", str(write(MINIMAL)), flag,
                                 "--device", "cpu", "--json"])
    assert "--configs" in _one_error_line(result)


@pytest.mark.parametrize("args", [["schema", "--output", "-"], ["recipes"],
                                  ["evaluate", "{d}/seg.npy", "{d}/seg.npy", "--json"]])
def test_a_reader_that_goes_away_is_not_an_internal_error(tmp_path, args):
    """`emrun evaluate ... --json | head -c 0` ended 'internal error: BrokenPipeError ... This
    is a bug in emrun' (exit 1), and rich's lines (`recipes | head -0`) a silent exit 1: a
    reader closing the pipe is neither; exit as SIGPIPE does, quietly."""
    np.save(tmp_path / "seg.npy", np.arange(4 * 8 * 8, dtype=np.uint32).reshape(4, 8, 8) // 7)
    process = subprocess.Popen([sys.executable, "-m", "emrun",
                                *(a.format(d=tmp_path) for a in args)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # before the child writes: its first write finds no reader
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == 141, stderr
    assert "internal error" not in stderr and "Traceback" not in stderr
    assert "Exception ignored" not in stderr


def test_export_from_a_named_pipe_says_what_it_is(tmp_path):
    """`export FIFO out.emrun` said 'FIFO is a directory without checkpoints/best.pt'."""
    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    result = runner.invoke(app, ["export", str(fifo), str(tmp_path / "out.emrun")])
    assert "named pipe" in _one_error_line(result)


INTERRUPTED_IMPORT = """
import sys

class CtrlC:  # the user's Ctrl-C lands while emrun imports its command-line library
    def find_spec(self, name, path=None, target=None):
        if name == "typer":
            raise KeyboardInterrupt

sys.meta_path.insert(0, CtrlC())
from emrun.cli import main
main()
"""


def test_ctrl_c_while_emrun_starts_is_one_line_and_exit_130():
    """Ctrl-C in emrun's first ~0.3 s (importing typer) printed a KeyboardInterrupt
    traceback: the guard that makes it one line was not there yet."""
    done = subprocess.run([sys.executable, "-c", INTERRUPTED_IMPORT, "recipes"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 130, done.stderr
    assert done.stderr.startswith("stopped by SIGINT (Ctrl-C)")
    assert len(done.stderr.splitlines()) == 1 and done.stdout == ""


def test_ctrl_c_while_arguments_are_parsed_says_so(monkeypatch, capsys):
    """Ctrl-C before a command ran (click's Abort) ended with exit 130 and no word."""
    import click

    cli_app = sys.modules["emrun.cli.app"]  # `emrun.cli.app` the attribute is the Typer app

    def aborted(**_: object) -> None:
        raise click.exceptions.Abort()

    monkeypatch.setattr(cli_app, "app", aborted)
    with pytest.raises(SystemExit) as stop:
        cli_app.main()
    assert stop.value.code == 130
    assert capsys.readouterr().err.startswith("stopped by SIGINT (Ctrl-C)")
