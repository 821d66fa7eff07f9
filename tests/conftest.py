"""Shared fixtures: the repository root and a writer for small recipe files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# pytest-xdist starts its workers with COLUMNS=80 (and LINES) set; emrun's consoles, made at
# import, would keep that width for good and cut the tables a test reads (a plain run, and
# emrun itself, take the width from the terminal, or from COLUMNS when a test sets it).
for _name in ("COLUMNS", "LINES"):
    os.environ.pop(_name, None)

MINIMAL = """\
name: tiny
data:
  sources:
    a: {type: synthetic, shape: [16, 64, 64], seed: 1}
model: {type: rsunet, widths: [4, 8]}
tasks:
  affinity:
    target: {type: affinity}
train:
  patch: [8, 32, 32]
  iterations: 10
"""


@pytest.fixture
def write(tmp_path: Path) -> Callable[..., Path]:
    """Write a (dedented) recipe file into tmp_path and return its path."""

    def _write(text: str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return _write


def sigterm_after_first_log(args: list[str], events: Path, group: bool = False
                            ) -> subprocess.CompletedProcess:
    """Run ``emrun ARGS`` until ``events`` (its run's events.jsonl) has a line, then send
    SIGTERM, to the process or (``group``, as SLURM and GNU timeout do) to its whole group;
    what it printed and its exit code."""
    process = subprocess.Popen([sys.executable, "-m", "emrun", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=group)
    deadline = time.time() + 120
    while time.time() < deadline and not (events.exists() and events.read_text().strip()):
        time.sleep(0.2)
    if group:
        os.killpg(process.pid, signal.SIGTERM)
    else:
        process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
