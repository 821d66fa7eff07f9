"""Two emrun commands writing one place at once (a job submitted twice, a second terminal, a
rerun while the first still runs): the second is refused in one line while the first lives,
before it does any work, and a first killed outright (kill -9: no clean-up ran) leaves
nothing that blocks the next. "Another emrun" here is a child process holding the folder's
lock (`emrun.locks`), as a running command holds it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from test_infer import make_inputs
from test_segment import affinities, cells, write_prediction
from typer.testing import CliRunner

from emrun import locks
from emrun.cli import app
from emrun.errors import UserError
from emrun.io import open_volume
from emrun.io.convert import convert
from emrun.io.write import check_new_volume, create_volume, write_volume, write_volumes

HOLDER = """
import sys, time
from pathlib import Path
from emrun import locks
folder = Path(sys.argv[1])
folder.mkdir(parents=True, exist_ok=True)
locks.hold(folder, "x")
print("holding", flush=True)
time.sleep(120)
"""


@contextmanager
def another_emrun(folder: Path) -> Iterator[int]:
    """A process holding ``folder`` for the ``with`` block, then killed with SIGKILL (its
    lock file stays behind); yields its pid."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def in_use(pid: int, advice: str) -> str:
    return (
        rf"is in use by another emrun \(pid {pid} on .*; wait for it to end, or "
        rf"{re.escape(advice)}$"
    )


def one_line_refusal(result, pid: int, advice: str) -> None:
    """A command's refusal: exit 2, one line, no traceback."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(in_use(pid, advice), lines[0]), result.stderr


def test_no_volume_is_written_into_a_store_another_emrun_writes(tmp_path, monkeypatch):
    """Two writers of one volume: the second removed the first's `NAME.partial` as stale and
    both wrote it. Two `data synth` left one seed's image beside the other's labels, two
    `data convert` both ended in tracebacks, a benchmark trained on a copy a third zeros."""
    store = tmp_path / "out.zarr"
    data = np.arange(4 * 8 * 8, dtype=np.uint8).reshape(4, 8, 8)
    write_volume(store, "first", data)  # what the other has written so far
    np.save(tmp_path / "a.npy", data)
    advice = "give another output store"
    before = [locks.LOCK_NAME, "first", "zarr.json"]
    with another_emrun(store) as pid:
        writes = {
            "write_volume": lambda: write_volume(store, "image", data),
            "write_volumes": lambda: write_volumes(store, {"image": (data, False)}),
            "create_volume": lambda: create_volume(store, "image", data.shape, data.dtype),
            "convert": lambda: convert(tmp_path / "a.npy", store, progress=False),
            "check_new_volume": lambda: check_new_volume(store, "image", False),  # synth's
        }
        for name, write in writes.items():
            with pytest.raises(UserError, match=in_use(pid, advice)):
                write()
            assert sorted(p.name for p in store.iterdir()) == before, name
        runner = CliRunner()
        one_line_refusal(
            runner.invoke(app, ["data", "synth", str(store), "--shape", "4", "16", "16"]),
            pid,
            advice,
        )
        import emrun.synth

        def generated(*args, **kwargs):
            raise AssertionError("generated a volume for a store it may not write")

        monkeypatch.setattr(emrun.synth, "synthesize", generated)
        one_line_refusal(  # --overwrite skips the names' check, not the store's
            runner.invoke(app, ["data", "synth", str(store), "--shape", "4", "16", "16",
                                "--overwrite"]),
            pid,
            advice,
        )
        one_line_refusal(
            runner.invoke(app, ["data", "convert", str(tmp_path / "a.npy"), str(store)]),
            pid,
            advice,
        )
        assert sorted(p.name for p in store.iterdir()) == before
    write_volume(store, "image", data)  # the killed writer's lock file does not block
    np.testing.assert_array_equal(open_volume(store / "image").read(), data)
    assert sorted(p.name for p in store.iterdir()) == ["first", "image", "zarr.json"]
    fresh = tmp_path / "fresh.zarr"
    with another_emrun(fresh):
        pass  # killed before it wrote anything: its folder holds only its lock file
    write_volume(fresh, "image", data)
    assert sorted(p.name for p in fresh.iterdir()) == ["image", "zarr.json"]


def test_infer_refuses_an_output_another_emrun_writes_and_its_workers_are_not(tmp_path):
    """A second `infer` into one output (the same command twice, or the --resume its refusal
    advises) predicted every block again beside the first. Its own worker processes write
    the output by design and are not refused."""
    from emrun.infer.run import run_inference

    recipe, _, _, tmp = make_inputs(tmp_path)
    out = tmp / "pred.zarr"

    class Stop(Exception):
        pass

    def stop_after_two(progress):
        if progress.done == 2:
            raise Stop

    def infer(**options):
        return run_inference(
            recipe,
            tmp / "c.pt",
            str(tmp / "in.zarr/image"),
            out,
            block=(4, 16, 16),
            device="cpu",
            **options,
        )

    with pytest.raises(Stop):
        infer(on_block=stop_after_two)  # the other's blocks so far
    before = sorted(os.listdir(out))
    with another_emrun(out) as pid:  # ... and it goes on
        for resume in (True, False):  # --resume: what a rerun's refusal advised
            with pytest.raises(UserError, match=in_use(pid, "give another --output")):
                infer(resume=resume)
        assert sorted(os.listdir(out)) == sorted([*before, locks.LOCK_NAME])
    progress = infer(resume=True, workers=2)  # after its kill -9
    assert progress.skipped >= 2 and progress.done == progress.total - progress.skipped > 0
    assert sorted(os.listdir(out)) == before
    fresh = tmp / "fresh.zarr"
    with another_emrun(fresh):
        pass  # killed before it wrote anything: its folder holds only its lock file
    done = run_inference(
        recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), fresh, block=(4, 16, 16), device="cpu"
    )
    assert done.done == done.total and locks.LOCK_NAME not in os.listdir(fresh)


def test_segment_refuses_an_output_another_emrun_writes_before_any_work(tmp_path):
    """A second `segment` into one store removed the first's volume being written as stale:
    the survivor's volume was a mix of the two settings under one's metadata; at scale, the
    second rewrote the job file that the first's workers read, and the first crashed."""
    from emrun.segment.job import run_segment
    from emrun.segment.request import SegmentRequest

    truth = cells()
    affs = write_prediction(tmp_path, affinities(truth))
    out = tmp_path / "seg.zarr"
    run_segment(SegmentRequest(affs, out, name="first", method="cc"))  # the other's so far
    before = sorted(os.listdir(out))
    ways = [
        {},
        {"block": (8, 32, 32)},
        {"scheduler": "local"},
        {"scheduler": "local", "resume": True},
    ]
    with another_emrun(out) as pid:
        for way in ways:
            with pytest.raises(UserError, match=in_use(pid, "give another output store")):
                run_segment(SegmentRequest(affs, out, **way))
            assert sorted(os.listdir(out)) == sorted([*before, locks.LOCK_NAME]), way
    result = run_segment(SegmentRequest(affs, out, scheduler="local", workers=2))
    assert result.outputs[0]["segments"] > 1  # its workers were not refused
    assert locks.LOCK_NAME not in os.listdir(out)


def test_demo_refuses_an_out_another_emrun_writes(tmp_path, monkeypatch):
    """Two demos into one --out: the second was refused by its training, told to give a
    --run-dir that `demo` does not have."""
    from emrun import demo

    class Started(Exception):
        pass

    def trainer(*args, **kwargs):
        raise Started

    monkeypatch.setattr(demo, "Trainer", trainer)
    out = tmp_path / "demo"
    with (
        another_emrun(out) as pid,
        pytest.raises(UserError, match=in_use(pid, "give another --out")),
    ):
        demo.run_demo(out)
    with pytest.raises(Started):  # a killed demo's lock file alone is an empty --out
        demo.run_demo(out)


def test_bench_snemi3d_refuses_an_out_another_emrun_writes(tmp_path):
    """Two benchmarks into one --out converted SNEMI3D into one volume at once: one ended in
    a traceback, the other trained on a copy with a third of its voxels zero."""
    from emrun.bench.snemi3d import FILES, run_snemi3d

    data = tmp_path / "snemi3d"
    data.mkdir()
    for name in FILES.values():
        (data / name).write_bytes(b"")  # found: never read before the refusal
    out = tmp_path / "bench"
    with another_emrun(out) as pid:
        with pytest.raises(UserError, match=in_use(pid, "give another --out")):
            run_snemi3d(data, out, iterations=1)
        assert [p.name for p in out.iterdir()] == [locks.LOCK_NAME]


def test_an_export_never_replaces_a_file_that_appeared_while_it_was_written(tmp_path, monkeypatch):
    """Two exports to one name, started together, both found it free; the later rename
    replaced the earlier's file, and both said they had written it."""
    import torch
    from test_export import RECIPE

    from emrun.export import export
    from emrun.export import package as package_format
    from emrun.models import build_model
    from emrun.recipe import Recipe
    from emrun.train.run_dir import recipe_text

    recipe = Recipe.model_validate(RECIPE)
    checkpoint = tmp_path / "last.pt"
    torch.save(
        {"model": build_model(recipe).state_dict(), "iteration": 1, "recipe": recipe_text(recipe)},
        checkpoint,
    )
    output = tmp_path / "net.emrun"
    write = package_format.write_package

    def and_another_export_finishes(path, *args, **kwargs):
        staged = write(path, *args, **kwargs)
        output.write_bytes(b"the other export's package")
        return staged

    monkeypatch.setattr(package_format, "write_package", and_another_export_finishes)
    with pytest.raises(UserError, match="appeared while this export was being written"):
        export(checkpoint, output)
    assert output.read_bytes() == b"the other export's package"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "net.emrun"]


RACER = """
import sys
from pathlib import Path
from emrun import locks
try:
    locks.hold(Path(sys.argv[1]), "x")
    print("held")
except Exception as exc:
    print("refused" if "in use" in str(exc) else repr(exc))
"""


def test_a_lock_file_released_while_being_taken_is_not_the_one_held(tmp_path, monkeypatch):
    """`release` removes the lock file. A process that opened it just before and locks it
    just after holds a file no other process will open: it must take the folder's new one,
    or two processes would hold the folder."""
    folder = tmp_path / "store.zarr"
    folder.mkdir()
    real_open = os.open
    opened: list[int] = []

    def open_then_released(path, flags, mode=0o777):
        fd = real_open(path, flags, mode)
        if not opened and Path(path).name == locks.LOCK_NAME:
            opened.append(fd)
            os.unlink(path)  # its holder released it between our open and our lock
        return fd

    monkeypatch.setattr(locks.os, "open", open_then_released)
    locks.hold(folder, "x")
    monkeypatch.undo()
    try:
        assert opened and (folder / locks.LOCK_NAME).is_file()
        other = subprocess.run(
            [sys.executable, "-c", RACER, str(folder)], text=True, capture_output=True, check=True
        )
        assert other.stdout.strip() == "refused"
    finally:
        locks.release(folder)
    assert not (folder / locks.LOCK_NAME).exists()
