"""Reference probe of SIGINT and SIGTERM at the stages of emrun's long commands: `data
convert`, `data synth`, `segment` (in memory with several values, and --block), `infer`
(one in-process worker and two worker processes), `evaluate --workers 2` and `demo`.

Each case sends a real signal to a real `python -m emrun ...` child (its own session, as a
terminal or SLURM makes one): a tiny wrapper counts the calls of one emrun function and
signals its own process, or its whole group, just before the N-th. The references are what
the README's "Failures and interruptions" promises: exit 130 / 143, one `stopped by SIG...`
line and no traceback, nothing half-written under a final name, no process of the session
left behind, and the same command (with --resume where it has one) ending with every voxel
of every level and the OME metadata of an uninterrupted run in another folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from typer.testing import CliRunner

from emrun.cli import app

TIMEOUT = 120

SIGNALLER = textwrap.dedent("""
    import importlib, os, signal, sys
    module, name, n, sig, to = sys.argv[1:6]
    owner = importlib.import_module(module)
    *path, attr = name.split(".")
    for part in path:
        owner = getattr(owner, part)
    real, calls = getattr(owner, attr), [0]
    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == int(n):
            number = signal.Signals[sig]
            if to == "group":
                os.killpg(os.getpgrp(), number)
            else:
                os.kill(os.getpid(), number)
        return real(*args, **kwargs)
    setattr(owner, attr, wrapped)
    sys.argv = ["emrun", *sys.argv[6:]]
    from emrun.cli import main
    main()
""")


def emrun(*args: object) -> tuple[int, str]:
    """`emrun ARGS` in this process (the runs nothing stops): exit code, stdout + stderr."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def session_processes(sid: int) -> list[int]:
    """The live processes of session ``sid`` (from /proc: field 6 of stat)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def sigint_as_at_a_terminal() -> None:
    """In the child before it starts: SIGINT as a terminal's process has it. A shell's
    background job (CI run with `&`, nohup) starts with SIGINT ignored, which its children
    inherit, and Python then installs no KeyboardInterrupt: Ctrl-C tests exited 0."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def signalled(at: str, sig: str, to: str, *args: object, env: dict[str, str] | None = None
              ) -> tuple[int, str]:
    """`emrun ARGS` in its own session, sent ``sig`` (to itself, or to its ``group``) just
    before the N-th call of ``at`` ("module:attribute.path:N"); its exit code and stderr,
    once every process of its session is gone (none may outlive it for long)."""
    module, name, n = at.split(":")
    process = subprocess.Popen(
        [sys.executable, "-c", SIGNALLER, module, name, n, sig, to, *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env=env, preexec_fn=sigint_as_at_a_terminal)
    try:
        _, stderr = process.communicate(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    deadline = time.monotonic() + 10
    while session_processes(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = session_processes(process.pid)
    for pid in left:  # clean up before failing: no stray workers for the next test
        os.kill(pid, signal.SIGKILL)
    assert left == [], f"processes left behind: {left}\n{stderr[-2000:]}"
    return process.returncode, stderr


def assert_clean_stop(code: int, stderr: str, sig: str) -> None:
    """Exit 128 + the signal's number, one `stopped by SIG...` line, no traceback."""
    number = int(signal.Signals[sig])
    assert code == 128 + number, (code, stderr[-3000:])
    said = [line for line in stderr.splitlines() if "stopped by" in line]
    assert len(said) == 1 and said[0].startswith(f"stopped by {sig}"), stderr[-3000:]
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr[-3000:]


def _group_attrs(folder: Path) -> dict:
    attrs = json.loads((folder / "zarr.json").read_text())["attributes"]
    attrs.pop("emrun-pyramid", None)  # its stamps hold file modification times
    return attrs


def assert_same_store(mine: Path, reference: Path) -> None:
    """Every array of ``reference`` (every level of every volume) is in ``mine`` with the
    same shape, dtype, chunks and voxels; every group's attributes are the same."""
    arrays = groups = 0
    for meta in sorted(reference.rglob("zarr.json")):
        rel = meta.parent.relative_to(reference)
        doc = json.loads(meta.read_text())
        assert (mine / rel / "zarr.json").is_file(), f"{rel} missing"
        if doc.get("node_type") == "array":
            a = zarr.open_array(str(mine / rel), mode="r")
            b = zarr.open_array(str(reference / rel), mode="r")
            assert (a.shape, a.dtype, a.chunks) == (b.shape, b.dtype, b.chunks), rel
            np.testing.assert_array_equal(a[...], b[...], err_msg=str(rel))
            arrays += 1
        else:
            assert _group_attrs(mine / rel) == _group_attrs(reference / rel), rel
            groups += 1
    assert arrays >= 2 and groups >= 1


def leftovers(store: Path) -> list[str]:
    return sorted(str(p.relative_to(store)) for p in store.rglob("*")
                  if p.name.endswith((".partial", ".tmp")) or "adding" in p.name)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from test_infer import make_inputs

    tmp = tmp_path_factory.mktemp("inputs")
    recipe, _, _, _ = make_inputs(tmp, shape=(8, 32, 64))
    (tmp / "r.yaml").write_text(yaml.safe_dump(recipe.resolved()))
    rng = np.random.default_rng(3)
    np.save(tmp / "img.npy", rng.integers(0, 256, (20, 64, 64), dtype=np.uint8))
    return {"tmp": tmp}


def _infer_args(tmp: Path, out: Path, workers: int) -> list[object]:
    return ["infer", "--recipe", tmp / "r.yaml", "--checkpoint", tmp / "c.pt", "--input",
            tmp / "in.zarr/image", "--device", "cpu", "--levels", "2", "--block", 4, 16, 16,
            "--workers", workers, "--output", out]


@pytest.fixture(scope="module")
def infer_reference(inputs: dict[str, Path]) -> Path:
    """An uninterrupted `infer` (affinities `aff` and `mito`, two levels each)."""
    tmp = inputs["tmp"]
    code, said = emrun(*_infer_args(tmp, tmp / "ref.zarr", 1))
    assert code == 0, said
    return tmp / "ref.zarr"


# --- data convert and data synth ----------------------------------------------------------


CONVERT = ("--chunks", 4, 16, 16, "--levels", 2)


@pytest.mark.parametrize("at", ["emrun.io.convert:write_by_chunk:3",  # mid-way in the slabs
                                "emrun.io.write:write_level:1"])      # in the pyramid
def test_convert_ctrl_c_leaves_nothing_and_the_rerun_is_a_straight_runs(tmp_path, inputs, at):
    src = inputs["tmp"] / "img.npy"
    ref, out = tmp_path / "ref.zarr", tmp_path / "o.zarr"
    assert emrun("data", "convert", src, ref, *CONVERT)[0] == 0
    code, stderr = signalled(at, "SIGINT", "group", "data", "convert", src, out, *CONVERT)
    assert_clean_stop(code, stderr, "SIGINT")
    assert not (out / "image").exists()
    again, said = emrun("data", "convert", src, out, *CONVERT)
    assert again == 0, said
    assert_same_store(out, ref)
    assert leftovers(out) == []


def test_convert_sigterm_ends_it_in_one_line_and_the_rerun_is_a_straight_runs(tmp_path,
                                                                               inputs):
    """SIGTERM to `data convert`, which has no stop of its own (no resume): it ends as
    Ctrl-C does, its clean-up run and one line said, exit 143 (it was killed on the spot,
    without a word); the rerun makes the straight run's store."""
    src = inputs["tmp"] / "img.npy"
    ref, out = tmp_path / "ref.zarr", tmp_path / "o.zarr"
    assert emrun("data", "convert", src, ref, *CONVERT)[0] == 0
    code, stderr = signalled("emrun.io.convert:write_by_chunk:3", "SIGTERM", "self",
                             "data", "convert", src, out, *CONVERT)
    assert_clean_stop(code, stderr, "SIGTERM")
    assert "nothing half-written" in stderr
    assert not (out / "image").exists()
    again, said = emrun("data", "convert", src, out, *CONVERT)
    assert again == 0, said
    assert_same_store(out, ref)
    assert leftovers(out) == []


def test_synth_ctrl_c_in_a_later_volumes_pyramid_and_the_rerun(tmp_path):
    """Ctrl-C while the third level write (the second volume's pyramid) runs: the volumes
    written before go too, and the rerun is the straight run's store."""
    synth = ("--shape", 8, 64, 64, "--seed", 3, "--levels", 2)
    ref, out = tmp_path / "ref.zarr", tmp_path / "y.zarr"
    assert emrun("data", "synth", ref, *synth)[0] == 0
    code, stderr = signalled("emrun.io.write:write_level:3", "SIGINT", "group",
                             "data", "synth", out, *synth)
    assert_clean_stop(code, stderr, "SIGINT")
    assert not (out / "image").exists() and not (out / "labels" / "labels").exists()
    again, said = emrun("data", "synth", out, *synth)
    assert again == 0, said
    assert_same_store(out, ref)
    assert leftovers(out) == []


# --- segment --------------------------------------------------------------------------------


@pytest.mark.parametrize("at, extra, sig", [
    ("emrun.io:write_volume:2", ("--threshold", "0.3,0.5,0.7"), "SIGINT"),  # the 2nd value's
    ("emrun.io.write:build_pyramid:2", ("--threshold", "0.3,0.5,0.7"), "SIGTERM"),  # pyramid
    ("emrun.segment.blockwise:_report:3", ("--threshold", "0.5", "--block", 4, 32, 32),
     "SIGTERM"),
])
def test_segment_stopped_and_the_rerun_is_a_straight_runs(tmp_path, infer_reference, at,
                                                          extra, sig):
    """Ctrl-C or SIGTERM (which segment in memory takes as Ctrl-C) to its process group."""
    args = ("segment", infer_reference / "aff", "--method", "cc", "--levels", 2, *extra)
    ref, out = tmp_path / "ref.zarr", tmp_path / "s.zarr"
    code, said = emrun(*args[:2], ref, *args[2:])
    assert code == 0, said
    code, stderr = signalled(at, sig, "group", *args[:2], out, *args[2:])
    assert_clean_stop(code, stderr, sig)
    assert not any((out / "labels").glob("segmentation*")) if out.exists() else True
    code, said = emrun(*args[:2], out, *args[2:])
    assert code == 0, said
    assert_same_store(out, ref)
    assert leftovers(out) == []


# --- infer ------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers, at, sig", [
    (1, "emrun.infer.job:build_pyramid:2", "SIGTERM"),      # the second task's pyramid
    (1, "emrun.infer.job:mark_finished:2", "SIGINT"),       # right before the end
])
def test_infer_stopped_resumes_to_the_uninterrupted_output(tmp_path, inputs, infer_reference,
                                                           workers, at, sig):
    tmp, out = inputs["tmp"], tmp_path / "p.zarr"
    code, stderr = signalled(at, sig, "group", *_infer_args(tmp, out, workers))
    assert_clean_stop(code, stderr, sig)
    assert "--resume" in stderr.splitlines()[-1]
    from emrun.io import VolumeError, open_volume

    with pytest.raises(VolumeError):  # marked unfinished until the end
        open_volume(f"{out}/mito")
    code, said = emrun(*_infer_args(tmp, out, 1), "--resume")
    assert code == 0, said
    assert_same_store(out, infer_reference)


# --- evaluate ---------------------------------------------------------------------------------


@pytest.mark.parametrize("at, sig", [("emrun.evaluate.schedule:save_work:1", "SIGINT"),
                                     ("emrun.evaluate.schedule:merge_blocks:1", "SIGTERM")])
def test_evaluate_workers_stopped_leaves_no_work_and_scores_again(tmp_path, infer_reference,
                                                                  at, sig):
    seg = tmp_path / "seg.zarr"
    for threshold in ("0.3", "0.5"):
        code, said = emrun("segment", infer_reference / "aff", seg, "--method", "cc",
                           "--threshold", threshold, "--name", f"t{threshold}", "--levels", 1)
        assert code == 0, said
    work = tmp_path / "work"
    work.mkdir()
    args = ("evaluate", seg / "t0.5", seg / "t0.3", "--workers", 2, "--block", 4, 32, 32,
            "--work-dir", work, "--json")
    code, stderr = signalled(at, sig, "group", *args)
    assert_clean_stop(code, stderr, sig)
    assert list(work.iterdir()) == []
    code, said = emrun(*args)
    assert code == 0, said
    code, whole = emrun(*args[:3], "--json")  # streamed in this process: the reference
    assert code == 0, whole
    got = json.loads(said.strip().splitlines()[-1])
    want = json.loads(whole.strip().splitlines()[-1])
    for key in ("arand", "voi_split", "voi_merge"):
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


# --- demo -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_stopped_while_it_predicts_says_so_and_exits_143(tmp_path):
    code, stderr = signalled("emrun.infer.schedule:Progress.add:1", "SIGTERM", "group",
                             "demo", "--out", tmp_path / "d", "-o", "train.iterations=1",
                             "-o", "train.workers=0")
    assert_clean_stop(code, stderr, "SIGTERM")
