"""Signals to a whole process group (a cluster's time limit, `scancel`, Ctrl-C in a terminal)
during `segment --scheduler local`: the local workers leave them to the scheduler, which
stops between blocks and says how to go on."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import test_workflows_scale_probe as probe
from test_workflows_scale_probe import _fragment_markers, _slow_blocks, segment_scaled

cells_store = probe.cells_store  # a fixture: noisy affinities of 12 cells, 8 blocks


def test_sigterm_to_the_group_stops_local_workers_between_blocks(cells_store, tmp_path):
    """The workers died of the group's SIGTERM mid-block: 'a fragments worker died (killed,
    or out of memory ...)', exit 2, where it is a stop that finished its blocks in flight."""
    out = tmp_path / "group.zarr"
    command = segment_scaled(cells_store / "in.zarr/affinity", out, "--threshold", "0.5")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=_slow_blocks(tmp_path, 0.5),
                               start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None and \
            _fragment_markers(out) < 2:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert "stopped by SIGTERM" in stderr and "--resume" in stderr
    done = int(stderr.split("step stopped between blocks; ")[1].split(" of ")[0])
    assert done == _fragment_markers(out) >= 2, stderr
    assert not Path(out, ".emrun-segment", "stop").exists()
