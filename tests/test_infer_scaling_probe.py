"""Inference at scale: the process-wide thread count under overlapping engines, a stop while
the pyramid is built, and per-block costs that must not grow with the block count."""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_infer import make_inputs
from test_infer_probe import Lopsided, probe_recipe
from typer.testing import CliRunner

from emrun.cli import app
from emrun.infer import job as job_module
from emrun.infer.engine import Engine, _pass_threads
from emrun.infer.job import Job
from emrun.infer.plan import Layout

# --- Engine.host_threads: overlapping users restore the process's count ---------------------


def test_overlapping_engines_leave_the_thread_count_as_it_was():
    """Engine A enters host_threads, engine B (another thread) enters, A leaves, B leaves:
    the count must be the one from before A, and B's forward passes must get it too (B
    found A's 1, kept it for its passes and restored 1 after both were done)."""
    recipe = probe_recipe()
    first, second = (Engine(recipe, Lopsided(), torch.device("cpu")) for _ in range(2))
    before = torch.get_num_threads()
    wanted = 3 if before != 3 else 2
    torch.set_num_threads(wanted)
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, int] = {}

    def use_a() -> None:
        with first.host_threads():
            seen["a inside"] = torch.get_num_threads()
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def use_b() -> None:
        a_in.wait(5)
        with second.host_threads():
            b_in.set()
            a_out.wait(5)
            seen["b passes"] = _pass_threads()
            seen["b inside"] = torch.get_num_threads()

    try:
        threads = [threading.Thread(target=use_a), threading.Thread(target=use_b)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert seen == {"a inside": 1, "b inside": 1, "b passes": wanted}
    assert after == wanted


def test_nested_host_threads_keep_the_passes_count():
    """The worker's host_threads around the engine's own (nested, one thread): the forward
    passes still see the count from before the outer one, and it is back after."""
    engine = Engine(probe_recipe(), Lopsided(), torch.device("cpu"))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with engine.host_threads():
            with engine.host_threads():
                inner = torch.get_num_threads(), _pass_threads()
            middle = torch.get_num_threads()
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert inner == (1, 2) and middle == 1 and after == 2


# --- a stop while the pyramid is built: infer's own stop line, exit 130 ---------------------


def test_ctrl_c_while_the_pyramid_is_built_says_resume(tmp_path, monkeypatch):
    """SIGINT after the last block, in the pyramid build: the stop line every other infer
    stop prints (all blocks kept, --resume only finishes), exit 130; it was the generic
    'stopped by SIGINT (Ctrl-C): ... run the command again'. The resumption finishes it."""
    recipe, _, _, tmp = make_inputs(tmp_path, shape=(6, 20, 24))
    (tmp / "r.yaml").write_text(yaml.safe_dump(recipe.resolved()))
    real = job_module.build_pyramid
    calls: list[str] = []

    def interrupted(path, levels=None, **options):  # type: ignore[no-untyped-def]
        calls.append(str(path))
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)  # the handler runs on the next bytecode: not the whole sleep
        return real(path, levels, **options)

    monkeypatch.setattr(job_module, "build_pyramid", interrupted)
    args = ["infer", "--recipe", str(tmp / "r.yaml"), "--checkpoint", str(tmp / "c.pt"),
            "--input", str(tmp / "in.zarr/image"), "--output", str(tmp / "o.zarr"),
            "--device", "cpu"]
    try:
        stopped = CliRunner().invoke(app, args)
    except BaseException as exc:  # a KeyboardInterrupt: fail the test, not the session
        pytest.fail(f"the stop escaped the command: {exc!r}")
    assert stopped.exit_code == 130, stopped.output
    assert "stopped by SIGINT: the one block is done" in stopped.stderr
    assert "--resume" in stopped.stderr
    assert "run the command again" not in stopped.stderr
    assert len(calls) == 1  # the second task's pyramid was not started
    resumed = CliRunner().invoke(app, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "0 blocks predicted" in resumed.stdout and len(calls) == 3


# --- per-block planning: no work in proportion to the volume's length -----------------------


def brute_patches(layout: Layout, block: tuple[int, int, int]) -> list[tuple[int, ...]]:
    """`Layout.patches` by filtering each axis's whole lattice (the definition)."""
    box = layout.write_box(block)
    return list(itertools.product(*(
        [s for s in layout.starts(a) if s < box.end[a] and s + layout.patch[a] > box.begin[a]]
        for a in range(3))))


def brute_owned(layout: Layout, block: tuple[int, int, int]) -> list[tuple[int, ...]]:
    return list(itertools.product(*(
        [s for s in layout.starts(a) if max(s, 0) // layout.block[a] == block[a]]
        for a in range(3))))


@pytest.mark.parametrize(("shape", "patch", "stride", "block"), [
    ((9, 20, 17), (3, 7, 5), (2, 3, 4), (2, 5, 4)),
    ((5, 7, 9), (4, 6, 6), (3, 4, 4), (1, 2, 3)),
    ((3, 4, 5), (1, 1, 1), (1, 1, 1), (2, 2, 2)),
    ((2, 31, 3), (4, 8, 8), (2, 4, 4), (2, 4, 3)),
])
def test_block_queries_match_the_lattice_filtered(shape, patch, stride, block):
    """The arithmetic start ranges give the patches and owned patches of every block that
    filtering the whole lattice gives, in lattice order."""
    layout = Layout(shape, patch, stride, block, block)
    for index in layout.block_grid():
        assert layout.patches(index) == brute_patches(layout, index)
        assert layout.owned_patches(index) == brute_owned(layout, index)


def test_a_block_query_never_walks_the_whole_lattice(monkeypatch):
    """A block of an axis with a million lattice starts: its patches, owners, owned box,
    batches and reach are found without listing the axis's starts (each block's planning
    took time in proportion to the volume's length)."""
    layout = Layout((40, 48, 48_000_000), (12, 64, 64), (9, 48, 48), (36, 192, 192),
                    (36, 192, 192))
    block = (0, 0, 123_456)
    want = [(z, y, x) for z, y, x in brute_patches(
        Layout((40, 48, 23_704_000), layout.patch, layout.stride, layout.chunks,
               layout.block), block)]
    listed: list[int] = []
    real = Layout.starts
    monkeypatch.setattr(Layout, "starts", lambda self, axis: listed.append(axis) or
                        real(self, axis))
    got = layout.patches(block)
    layout.owners(block), layout.owned_box(block), layout.batches(block, 4)
    layout.read_box(block), layout.reached(block)
    engine = Engine(probe_recipe((12, 64, 64), stride=(9, 48, 48)), Lopsided(),
                    torch.device("cpu"))
    weight = engine._weight(layout, block)
    assert listed == [] and got == want
    assert tuple(weight.shape) == (36, 48, 192)


# --- the done-marker scan: one listing, one layout hash ---------------------------------------


def test_the_resume_scan_hashes_once_and_lists_once(tmp_path, monkeypatch):
    """`Job.pending` over 1,200 blocks with all but three marked: the layout is hashed once
    (it was a JSON dump and a hash per block's marker path) and no marker is looked up on
    its own (the folder is listed once)."""
    layout = Layout((30, 400, 400), (4, 8, 8), (2, 4, 4), (3, 20, 20), (3, 20, 20))
    job = Job(recipe=probe_recipe(), checkpoint=tmp_path / "c.pt", input_path="in",
              output=tmp_path / "o.zarr", mask_path=None, layout=layout, scale=(0.0, 1.0))
    grid = layout.block_grid()
    job.done_dir.mkdir(parents=True)
    left = {grid[0], grid[517], grid[-1]}
    for block in grid:
        if block not in left:
            job.mark_done(block)
    hashed: list[int] = []
    looked_up: list[str] = []
    real_digest = Layout.digest
    monkeypatch.setattr(Layout, "digest", lambda self: hashed.append(1) or real_digest(self))
    for name in ("exists", "stat", "is_file"):
        real = getattr(Path, name)
        monkeypatch.setattr(Path, name, lambda self, *a, _real=real, _name=name, **k:
                            looked_up.append(_name) or _real(self, *a, **k))
    fresh = Job.from_json(job.to_json())
    assert fresh.pending() == sorted(left) and fresh.pending() == sorted(left)
    assert looked_up == []
    assert fresh.is_done(grid[1]) and not fresh.is_done(grid[517]) and len(hashed) == 1
