"""Paths that are not files: a named pipe or device (reading it would wait forever) and loops
of symbolic links are refused in one line (exit 2) wherever emrun reads or writes."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from emrun.cli import app
from emrun.io.write import write_volume

runner = CliRunner()
pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")


class Hung(BaseException):
    """Raised by the guard: not an Exception, so neither emrun nor CliRunner catch it."""


@contextmanager
def unblocked_after(seconds: int, pipes: list[Path]) -> Iterator[None]:
    """A regression that opens a pipe to read it waits forever: after ``seconds``, open each
    pipe's other end (the waiting open returns) and fail the test, rather than hang the suite
    (cheaper than a process of its own per command, which costs the imports each time)."""

    def give_up(signum: int, frame: object) -> None:
        for pipe in pipes:
            with suppress(OSError):  # nobody reading it
                os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
        raise Hung(f"a command waited on a named pipe for {seconds} s")

    before = signal.signal(signal.SIGALRM, give_up)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)


def test_named_pipes_are_refused_not_read(tmp_path):
    for name in ("r.yaml", "c.pt", "v.tif"):
        os.mkfifo(tmp_path / name)
    (tmp_path / "child.yaml").write_text(f"extends: {tmp_path / 'r.yaml'}\nname: x\n")
    write_volume(tmp_path / "in.zarr", "image", np.zeros((4, 8, 8), np.uint8))
    pipes = [tmp_path / name for name in ("r.yaml", "c.pt", "v.tif")]
    results = {}
    for args in (["validate", str(tmp_path / "r.yaml")],
                 ["validate", str(tmp_path / "child.yaml")],
                 ["data", "convert", str(tmp_path / "v.tif"), str(tmp_path / "o.zarr")],
                 ["infer", "--checkpoint", str(tmp_path / "c.pt"), "--input",
                  str(tmp_path / "in.zarr/image"), "--output", str(tmp_path / "p.zarr")]):
        with unblocked_after(60, pipes):
            result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert "named pipe" in result.stderr and "Traceback" not in result.output
        results[args[1]] = result
    child = results[str(tmp_path / "child.yaml")]
    assert "child.yaml:1" in child.stderr  # located at the extends line


def test_loops_of_symbolic_links_are_named(tmp_path):
    loop, store = tmp_path / "loop.yaml", tmp_path / "loop.zarr"
    loop.symlink_to(loop)
    store.symlink_to(store)
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {loop}\nname: x\n")
    rng = np.random.default_rng(0)
    write_volume(tmp_path / "a.zarr", "affinity", rng.random((3, 4, 16, 16), np.float32),
                 channel_axis=True, attrs={"offsets": [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]})
    write_volume(tmp_path / "in.zarr", "image", np.zeros((4, 8, 8), np.uint8))
    for args in (["validate", str(loop)], ["validate", str(child)],
                 ["data", "convert", str(tmp_path / "in.zarr/image"), str(store)],
                 ["segment", str(tmp_path / "a.zarr/affinity"), str(store)],
                 ["infer", "--checkpoint", str(loop), "--input",
                  str(tmp_path / "in.zarr/image"), "--output", str(tmp_path / "p.zarr")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert "loop of symbolic links" in result.stderr
