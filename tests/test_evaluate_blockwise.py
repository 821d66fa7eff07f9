"""Scoring in blocks (`emrun evaluate --scheduler/--workers/--block`): every block size and
worker count gives the single-process contingency table exactly, --connected-truth
included (pieces joined across block faces), in worker processes and with daisy."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from emrun.cli import app
from emrun.evaluate import (
    Parallel,
    binary_scores,
    binary_scores_volumes,
    count_pairs,
    score,
    score_volumes,
)
from emrun.evaluate.blockwise import default_block, merge_blocks, prepare, write_block
from emrun.evaluate.pieces import connected_pieces
from emrun.io import open_volume, write_volume

runner = CliRunner()
SHAPE = (16, 64, 64)
CHUNKS = (4, 16, 16)


def _arrays(seed: int = 5) -> dict[str, np.ndarray]:
    """Blocky truth ids with noise (objects and many small pieces crossing every block
    face), a segmentation that splits and merges them, a mask and a probability map."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 7, (4, 8, 8))
    truth = coarse.repeat(4, 0).repeat(8, 1).repeat(8, 2).astype(np.uint32)
    flip = rng.random(SHAPE) < 0.15
    truth[flip] = rng.integers(0, 7, int(flip.sum()))
    seg = (truth.astype(np.uint64) * 3 + (rng.random(SHAPE) < 0.2)) % 11
    seg[:, 20:40, :] = 5  # a merge across objects
    return {"truth": truth, "seg": seg.astype(np.uint64),
            "mask": (rng.random(SHAPE) < 0.9).astype(np.uint8),
            "pred": rng.integers(0, 256, SHAPE).astype(np.uint8)}


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    folder = tmp_path_factory.mktemp("blockwise")
    arrays = _arrays()
    paths = {}
    for name, array in arrays.items():
        write_volume(folder / "v.zarr", name, array, chunks=CHUNKS)
        paths[name] = str(folder / "v.zarr" / name)
    return arrays, paths


def _opened(paths: dict[str, str], *names: str):
    return [open_volume(paths[name]) for name in names]


def _table_in_blocks(volumes, block, tmp_path: Path, connected_truth: bool = False):
    """The merged table of every block, scored one by one here (what each worker does)."""
    work = prepare(volumes, block, connected_truth=connected_truth)
    folder = tmp_path / f"blocks-{'-'.join(map(str, work.block))}-{connected_truth}"
    folder.mkdir()
    for index in range(len(work.grid)):
        write_block(folder, work, index)
    return merge_blocks(folder, work), len(work.grid)


def _assert_same_table(a, b):
    for field in ("seg", "truth", "counts"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


@pytest.mark.parametrize("block", [(16, 64, 64), (4, 16, 16), (5, 24, 20), (16, 3, 64),
                                   (1, 64, 64), (3, 64, 7)])
@pytest.mark.parametrize("connected_truth", [False, True])
def test_merged_block_tables_equal_the_whole_volume_table(volumes, tmp_path, block,
                                                          connected_truth):
    arrays, paths = volumes
    truth = connected_pieces(arrays["truth"]) if connected_truth else arrays["truth"]
    for names, mask in ((("seg", "truth"), None), (("seg", "truth", "mask"), arrays["mask"])):
        folder = tmp_path / str(len(names))
        folder.mkdir()
        merged, blocks = _table_in_blocks(_opened(paths, *names), block, folder,
                                          connected_truth)
        _assert_same_table(merged, count_pairs(arrays["seg"], truth, mask))
        assert blocks == np.prod([-(-n // b) for n, b in zip(SHAPE, block, strict=True)])


def test_pieces_are_joined_across_block_faces_and_corners(tmp_path):
    # a U whose arms meet only in the last section, four blocks away; a ring around the
    # edge where four blocks meet; id 8 around both, cut in two by a row of 0
    truth = np.full((8, 8, 8), 8, np.uint32)
    truth[:, 1, 1] = truth[:, 1, 6] = 3
    truth[-1, 1, 1:7] = 3
    truth[3:5, 2:6, 2:6] = 4
    truth[3:5, 3:5, 3:5] = 8
    truth[:, 6, :] = 0
    seg = np.where(truth == 3, 1, 2).astype(np.uint32)
    write_volume(tmp_path / "v.zarr", "truth", truth, chunks=(2, 2, 2))
    write_volume(tmp_path / "v.zarr", "seg", seg, chunks=(2, 2, 2))
    volumes = [open_volume(tmp_path / "v.zarr/seg"), open_volume(tmp_path / "v.zarr/truth")]
    expected = count_pairs(seg, connected_pieces(truth))
    assert len(np.unique(expected.truth)) == 4  # the U, the ring, 8 on either side of the 0s
    for block in ((2, 2, 2), (1, 8, 3), (3, 3, 3)):
        merged, _ = _table_in_blocks(volumes, block, tmp_path, connected_truth=True)
        _assert_same_table(merged, expected)


def test_worker_processes_score_like_one_process(volumes, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the work folder goes
    arrays, paths = volumes
    seg, truth, mask, pred = _opened(paths, "seg", "truth", "mask", "pred")
    parallel = Parallel(workers=2, block=(8, 32, 24))
    expected = score(arrays["seg"], arrays["truth"], arrays["mask"], min_overlap=5,
                     connected_truth=True)
    assert score_volumes(seg, truth, mask, min_overlap=5, connected_truth=True) == expected
    assert score_volumes(seg, truth, mask, min_overlap=5, connected_truth=True,
                         parallel=parallel) == expected
    assert binary_scores_volumes(pred, truth, mask, threshold=0.3, parallel=parallel) == \
        binary_scores(arrays["pred"], arrays["truth"], arrays["mask"], threshold=0.3)
    assert list(tmp_path.iterdir()) == []  # each run's work folder is removed


def test_progress_counts_blocks_and_one_worker_runs_here(volumes):
    _, paths = volumes
    seen: list[tuple[int, int]] = []
    scores = score_volumes(*_opened(paths, "seg", "truth"), parallel=Parallel(
        workers=1, block=(8, 64, 64)), on_slab=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 2), (2, 2)]
    assert scores == score_volumes(*_opened(paths, "seg", "truth"))


def test_two_dimensional_images_in_blocks(tmp_path):
    arrays = _arrays(8)
    truth, seg = arrays["truth"][3], arrays["seg"][3]
    np.save(tmp_path / "truth.npy", truth)
    np.save(tmp_path / "seg.npy", seg)
    volumes = [open_volume(tmp_path / "seg.npy"), open_volume(tmp_path / "truth.npy")]
    for connected_truth in (False, True):
        expected = score(seg, truth, min_overlap=3, connected_truth=connected_truth)
        assert score_volumes(*volumes, min_overlap=3, connected_truth=connected_truth,
                             parallel=Parallel(workers=1, block=(1, 10, 9))) == expected


def test_default_block_is_whole_chunks_of_about_the_budget(volumes):
    _, paths = volumes
    opened = _opened(paths, "seg", "truth")
    block = default_block(opened, voxels=20_000)
    assert all(b % c == 0 for b, c in zip(block, CHUNKS, strict=True))
    assert 10_000 < np.prod(block) <= 20_000
    assert default_block(opened) == SHAPE  # small volumes: one block


def test_a_worker_that_cannot_read_a_chunk_reports_a_user_error(tmp_path):
    arrays = _arrays(9)
    write_volume(tmp_path / "v.zarr", "truth", arrays["truth"], chunks=CHUNKS)
    write_volume(tmp_path / "v.zarr", "seg", arrays["seg"], chunks=CHUNKS)
    chunk = next(p for p in sorted((tmp_path / "v.zarr").rglob("*"))
                 if p.is_file() and "seg" in p.parts and "c" in p.parts)
    chunk.write_bytes(b"not a chunk")
    result = runner.invoke(app, ["evaluate", str(tmp_path / "v.zarr/seg"),
                                 str(tmp_path / "v.zarr/truth"), "--workers", "2", "--block",
                                 "8", "32", "32"])
    assert result.exit_code == 2, result.output
    assert "v.zarr/seg" in result.stderr and "Traceback" not in result.output


def _json(result) -> dict:
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    return json.loads(lines[0])


def test_cli_workers_give_the_same_json_as_one_process(volumes):
    _, paths = volumes
    base = ["evaluate", paths["seg"], paths["truth"], "--mask", paths["mask"], "--json"]
    for extra in ([], ["--connected-truth"]):
        one = runner.invoke(app, [*base, *extra])
        assert one.exit_code == 0, one.output
        blocks = runner.invoke(app, [*base, *extra, "--scheduler", "local", "--workers", "1",
                                     "--block", "5", "24", "20"])
        assert blocks.exit_code == 0, blocks.output
        assert _json(blocks) == _json(one)
    binary = ["evaluate", paths["pred"], paths["truth"], "--binary", "--json"]
    assert _json(runner.invoke(app, [*binary, "--block", "4", "64", "9"])) == \
        _json(runner.invoke(app, binary))


@pytest.mark.parametrize(("options", "message"), [
    (["--workers", "0"], "--workers must be at least 1 (got 0)"),
    (["--scheduler", "local", "--workers", "-2"], "--workers must be at least 1"),
    (["--block", "0", "16", "16"], "--block takes three sizes of at least 1 voxel"),
    (["--workers", "2", "--block", "4", "-1", "16"], "--block takes three sizes"),
    (["--launch", "srun -c 4"], "--launch is for --scheduler daisy"),
    (["--scheduler", "local", "--launch", "srun"], "--launch is for --scheduler daisy"),
    (["--scheduler", "slurm"], "--scheduler must be local or daisy"),
    (["--scheduler", "daisy", "--launch", '"srun'], "--launch '\"srun': No closing quotation"),
    (["--scheduler", "daisy", "--launch", "no-such-launcher -c 4"],
     "no command 'no-such-launcher' on this machine's PATH"),
    (["--scheduler", "daisy", "--launch", " "], "--launch is empty"),
])
def test_cli_bad_parallel_options_exit_2_in_one_line(volumes, options, message):
    _, paths = volumes
    result = runner.invoke(app, ["evaluate", paths["seg"], paths["truth"], *options])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output and len(result.stderr.splitlines()) == 1


def test_cli_work_dir_holds_the_blocks_while_scoring_and_is_emptied(volumes, tmp_path,
                                                                    monkeypatch):
    """--work-dir (made if missing) holds the run's folder of block results, emptied after;
    a file in its way is one line and exit 2."""
    from emrun.evaluate import blockwise

    _, paths = volumes
    work = tmp_path / "scratch" / "eval"
    base = ["evaluate", paths["seg"], paths["truth"], "--json"]
    seen: list[Path] = []

    def spy(folder, work_, index):  # where the block files go
        seen.append(folder.parent)
        return blockwise.write_block(folder, work_, index)

    monkeypatch.setattr("emrun.evaluate.schedule.write_block", spy)
    result = runner.invoke(app, [*base, "--workers", "1", "--block", "5", "24", "20",
                                 "--work-dir", str(work)])
    assert result.exit_code == 0, result.output
    assert _json(result) == _json(runner.invoke(app, base))
    assert seen and set(seen) == {work}
    assert work.is_dir() and list(work.iterdir()) == []
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = runner.invoke(app, [*base, "--work-dir", str(blocker / "sub")])
    assert result.exit_code == 2, result.output
    assert f"--work-dir {blocker / 'sub'}: cannot make a folder there" in result.stderr
    assert "Traceback" not in result.output and len(result.stderr.splitlines()) == 1


def test_a_full_work_folder_and_an_empty_truth_are_named(volumes, tmp_path, monkeypatch):
    """A full disk under the work folder said only "the disk is full" (evaluate writes no
    output, so which disk?); an empty truth (shape [0, 16, 16]) was "all 0"."""
    import errno
    import os

    _, paths = volumes

    def full(folder, work_, index):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / "block"))

    monkeypatch.setattr("emrun.evaluate.schedule.write_block", full)
    result = runner.invoke(app, ["evaluate", paths["seg"], paths["truth"], "--workers", "1",
                                 "--block", "8", "32", "32", "--work-dir", str(tmp_path / "w")])
    assert result.exit_code == 2
    assert f"the disk of the work folder {tmp_path / 'w'} is full" in result.stderr
    np.save(tmp_path / "empty.npy", np.zeros((0, 16, 16), np.uint32))
    result = runner.invoke(app, ["evaluate", str(tmp_path / "empty.npy"),
                                 str(tmp_path / "empty.npy")])
    assert result.exit_code == 2 and "is empty (shape [0, 16, 16])" in result.stderr


def test_cli_daisy_scheduler_without_daisy_says_how_to_install(volumes, monkeypatch):
    _, paths = volumes
    monkeypatch.setitem(sys.modules, "daisy", None)  # import daisy raises ImportError
    result = runner.invoke(app, ["evaluate", paths["seg"], paths["truth"], "--scheduler",
                                 "daisy", "--workers", "2"])
    assert result.exit_code == 2, result.output
    assert "pip install 'emrun[daisy]'" in result.stderr
    assert "Traceback" not in result.output and len(result.stderr.splitlines()) == 1


def test_a_launch_command_that_fails_is_one_error_and_exit_2(volumes, tmp_path):
    """`--launch false` printed a traceback per worker restart and ended as 'a bug in
    emrun' (exit 1), then daisy's warning with a traceback per restart before one error;
    now the command's failure before any worker started is the run's user error: daisy
    starts no other worker, and that error is all stderr says."""
    pytest.importorskip("daisy")
    _, paths = volumes
    done = subprocess.run([sys.executable, "-m", "emrun", "evaluate", paths["seg"],
                           paths["truth"], "--scheduler", "daisy", "--workers", "1",
                           "--launch", "false", "--work-dir", str(tmp_path / "w")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        "error: the workers started through --launch 'false' failed (the --launch command "
        "'false' exited with code 1); finished blocks are kept: fix the command and run again "
        "(with --resume where it has one)"]
    assert "Traceback (most recent call last):\n  File \"<frozen runpy>\"" not in done.stderr
    assert "subprocess.CalledProcessError" not in done.stderr


def test_daisy_workers_score_like_one_process(volumes, tmp_path):
    """End to end, as on a cluster: `python -m emrun evaluate --scheduler daisy`, workers
    started through a launch command (as `srun ...` would) that connect back to daisy."""
    pytest.importorskip("daisy")
    _, paths = volumes
    scratch = tmp_path / "shared" / "scratch"  # made by the run: the nodes' shared folder
    command = [sys.executable, "-m", "emrun", "evaluate", paths["seg"], paths["truth"],
               "--mask", paths["mask"], "--connected-truth", "--min-overlap", "5", "--json"]
    daisy = subprocess.run([*command, "--scheduler", "daisy", "--workers", "2", "--block",
                            "8", "32", "24", "--launch", "env EMRUN_LAUNCHED=1",
                            "--work-dir", str(scratch)],
                           capture_output=True, text=True, timeout=120)
    assert daisy.returncode == 0, daisy.stderr
    lines = daisy.stdout.strip().splitlines()
    assert len(lines) == 1, daisy.stdout  # nothing of daisy's on stdout
    result = runner.invoke(app, command[3:])
    assert json.loads(lines[0]) == _json(result)
    assert list(scratch.iterdir()) == []  # the work folder is gone


def test_pieces_of_ids_past_two_to_the_63_in_faces_one_voxel_wide(tmp_path):
    """Negative signed ids (2^64 - k as uint64) in a block one voxel wide: cc3d overflowed
    ("Python int too large to convert to C long", an internal error)."""
    truth = np.random.default_rng(1).integers(-2, 3, (9, 16, 17)).astype(np.int64)
    seg = np.abs(truth).astype(np.uint64)
    write_volume(tmp_path / "v.zarr", "truth", truth, chunks=(8, 16, 16))
    write_volume(tmp_path / "v.zarr", "seg", seg, chunks=(8, 16, 16))
    volumes = [open_volume(str(tmp_path / "v.zarr" / name)) for name in ("seg", "truth")]
    merged, blocks = _table_in_blocks(volumes, (8, 16, 16), tmp_path, connected_truth=True)
    assert blocks == 4
    _assert_same_table(merged, count_pairs(seg, connected_pieces(truth)))
    column = np.full((5, 1, 1), 2**64 - 1, np.uint64)
    column[0] = 5
    assert connected_pieces(column).ravel().tolist() == [1, 2, 2, 2, 2]


def test_cli_a_killed_evaluations_work_folder_goes_with_the_next_run(volumes, tmp_path):
    """kill -9 left emrun-evaluate-*/ with every block's table in --work-dir, never removed;
    the next run removes a folder nobody holds once it is a minute old, and leaves a new one
    (a run just starting) and one another evaluation holds."""
    import os
    import time

    _, paths = volumes
    work = tmp_path / "eval"
    stale, fresh, running = (work / f"emrun-evaluate-{n}" for n in ("old", "new", "busy"))
    for folder in (stale, fresh, running):
        folder.mkdir(parents=True)
        (folder / "block-0.npz").write_bytes(b"")
    long_ago = time.time() - 3600
    for folder in (stale, running):
        os.utime(folder, (long_ago, long_ago))
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from emrun import locks; "
        f"locks.hold(Path({str(running)!r}), ''); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        os.utime(running, (long_ago, long_ago))  # the lock file touched it
        result = runner.invoke(app, ["evaluate", paths["seg"], paths["truth"], "--workers",
                                     "1", "--block", "5", "24", "20", "--work-dir", str(work)])
        assert result.exit_code == 0, result.output
        assert not stale.exists() and fresh.is_dir() and running.is_dir()
    finally:
        holder.kill()
        holder.wait()
