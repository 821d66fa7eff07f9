"""`emrun evaluate` at its edges: how it stops on SIGTERM and SIGINT (streamed, in blocks
here, in local worker processes, under daisy), and what a new user's odd inputs get (one
clear line and exit 2, or a right answer checked by hand)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from emrun.cli import app
from emrun.io import write_volume

runner = CliRunner()
STOPPED = ("evaluate stopped while scoring; it keeps no partial scores and left nothing "
           "behind: run the same command again to score")


def evaluate(*args: object):
    return runner.invoke(app, ["evaluate", *map(str, args)])


@pytest.fixture
def pair(tmp_path: Path) -> tuple[str, str, np.ndarray, np.ndarray]:
    """A small segmentation and truth in 8 chunks (blocks of 4 x 16 x 16)."""
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 5, (8, 32, 32)).astype(np.uint32)
    seg = (truth.astype(np.uint64) * 2 + (rng.random(truth.shape) < 0.1)) % 7
    write_volume(tmp_path / "v.zarr", "truth", truth, chunks=(4, 16, 16))
    write_volume(tmp_path / "v.zarr", "seg", seg, chunks=(4, 16, 16))
    return str(tmp_path / "v.zarr/seg"), str(tmp_path / "v.zarr/truth"), seg, truth


# ------------------------------------------------------------------------------- stops


@pytest.fixture
def signals_reach_the_test() -> Iterator[None]:
    """SIGTERM and SIGINT to this process fail the test instead of ending pytest: before
    evaluate handled them, the one it was sent reached this handler (an internal error)."""

    def handler(number: int, frame: object) -> None:
        raise RuntimeError(f"{signal.Signals(number).name} was not evaluate's")

    previous = {n: signal.signal(n, handler) for n in (signal.SIGTERM, signal.SIGINT)}
    yield
    for number, old in previous.items():
        assert signal.getsignal(number) is handler, "evaluate left its handler installed"
        signal.signal(number, old)


def _signal_self_on_call(monkeypatch: pytest.MonkeyPatch, module: object, name: str,
                         number: signal.Signals, on: int = 2) -> None:
    """Replace ``module.name`` by a call that sends ``number`` to this process on its
    ``on``-th call (mid-scoring), then does the real work."""
    real = getattr(module, name)
    calls = []

    def wrapped(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == on:
            os.kill(os.getpid(), number)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


@pytest.mark.usefixtures("signals_reach_the_test")
@pytest.mark.parametrize("number, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_while_streaming_stops_in_one_line(pair, monkeypatch, number, code):
    """Streamed in one process (no --scheduler): SIGTERM ended evaluate on the spot without
    a word (exit -15); SIGINT's line spoke of a --resume that evaluate does not have."""
    import emrun.evaluate.volumes as volumes

    seg, truth, *_ = pair
    _signal_self_on_call(monkeypatch, volumes, "count_pairs", number, on=1)
    result = runner.invoke(app, ["evaluate", seg, truth, "--json"], catch_exceptions=False)
    assert result.exit_code == code, result.output
    assert f"stopped by {number.name}: {STOPPED}" in result.stderr
    assert result.stdout == ""  # no JSON line of a part of the volume


@pytest.mark.usefixtures("signals_reach_the_test")
def test_sigterm_while_blocks_are_scored_here_leaves_no_work_folder(pair, tmp_path,
                                                                     monkeypatch):
    import emrun.evaluate.blockwise as blockwise

    seg, truth, *_ = pair
    work = tmp_path / "work"
    _signal_self_on_call(monkeypatch, blockwise, "score_block", signal.SIGTERM)
    result = runner.invoke(app, ["evaluate", seg, truth, "--workers", "1", "--block", "4",
                                 "16", "16", "--work-dir", str(work)], catch_exceptions=False)
    assert result.exit_code == 143, result.output
    assert result.stderr.strip() == f"stopped by SIGTERM: {STOPPED}"
    assert list(work.iterdir()) == []


SLOW = """\
import os, time
if os.environ.get("EMRUN_TEST_SLOW_BLOCK"):
    from emrun.evaluate import blockwise as _blockwise
    _real = _blockwise.score_block
    _marks = os.environ.get("EMRUN_TEST_BLOCK_MARKS")

    def score_block(work, index):
        if _marks:
            open(os.path.join(_marks, f"started-{index}"), "w").close()
        time.sleep(float(os.environ["EMRUN_TEST_SLOW_BLOCK"]))  # a long block
        if _marks:
            open(os.path.join(_marks, f"ended-{index}"), "w").close()
        return _real(work, index)

    _blockwise.score_block = score_block
"""


def _slow_blocks(tmp: Path, seconds: float) -> dict[str, str]:
    """Environment variables under which every Python process started takes ``seconds``
    more for each block it scores (a sitecustomize module on its path), and marks in
    ``tmp``/marks when it starts and ends each block."""
    folder = tmp / "slow"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(textwrap.dedent(SLOW))
    (tmp / "marks").mkdir(exist_ok=True)
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "EMRUN_TEST_SLOW_BLOCK": str(seconds),
            "EMRUN_TEST_BLOCK_MARKS": str(tmp / "marks")}


def _marks(tmp: Path, what: str) -> int:
    return len(list((tmp / "marks").glob(f"{what}-*")))


def _blocks_in(work: Path) -> int:
    return len(list(work.glob("*/block-*.npz"))) if work.exists() else 0


def _when(count: object, at_least: int, action: object) -> threading.Thread:
    """Call ``action`` once ``count()`` is ``at_least``."""

    def watch() -> None:
        deadline = time.monotonic() + 60
        while count() < at_least and time.monotonic() < deadline:  # type: ignore[operator]
            time.sleep(0.01)
        action()  # type: ignore[operator]

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.usefixtures("signals_reach_the_test")
def test_sigterm_stops_local_workers_at_once(pair, tmp_path, monkeypatch):
    """The local pool under SIGTERM: the command ended without a word (exit -15) and left
    its work folder, with every scored block, to the next run; its workers now die with it
    instead of finishing their blocks (nothing of them is kept)."""
    seg, truth, *_ = pair
    for name, value in _slow_blocks(tmp_path, 2.0).items():
        monkeypatch.setenv(name, value)  # the spawned workers read it
    work = tmp_path / "work"
    watcher = _when(lambda: _marks(tmp_path, "started"), 3,  # a worker's second block
                    lambda: os.kill(os.getpid(), signal.SIGTERM))
    result = runner.invoke(app, ["evaluate", seg, truth, "--workers", "2", "--block", "4",
                                 "16", "16", "--work-dir", str(work)], catch_exceptions=False)
    watcher.join()
    assert result.exit_code == 143, result.output
    assert result.stderr.strip() == f"stopped by SIGTERM: {STOPPED}"
    assert list(work.iterdir()) == []
    assert multiprocessing.active_children() == []
    assert _marks(tmp_path, "ended") < _marks(tmp_path, "started")  # not waited for


def _evaluate_process(pair, work: Path, env: dict[str, str], *extra: str) -> subprocess.Popen:
    seg, truth, *_ = pair
    return subprocess.Popen(
        [sys.executable, "-m", "emrun", "evaluate", seg, truth, "--scheduler", "daisy",
         "--workers", "2", "--block", "4", "16", "16", "--work-dir", str(work), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **env}, start_new_session=True)


def _group_gone(group: int) -> bool:
    """Whether no process of ``group`` is left (daisy's workers die with the scheduler)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_sigterm_to_a_daisy_run_stops_its_workers_in_one_line(pair, tmp_path):
    """A cluster's time limit signals the whole group: evaluate ended without a word (exit
    -15), and its daisy workers died mid-block, leaving half-written files in the work
    folder, which stayed behind."""
    pytest.importorskip("daisy")
    work = tmp_path / "work"
    process = _evaluate_process(pair, work, _slow_blocks(tmp_path, 1.0))
    _when(lambda: _blocks_in(work), 1, lambda: os.killpg(process.pid, signal.SIGTERM)).join()
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert stderr.strip() == f"stopped by SIGTERM: {STOPPED}"
    assert stdout == ""
    assert list(work.iterdir()) == []
    assert _group_gone(process.pid)


def test_ctrl_c_to_launched_daisy_workers_is_one_stop_without_tracebacks(pair, tmp_path):
    """Ctrl-C to a run whose daisy workers wait on a --launch command: each waiting worker
    died of it with a KeyboardInterrupt traceback that daisy printed, and the command ended
    with the generic line offering a --resume evaluate does not have."""
    pytest.importorskip("daisy")
    work = tmp_path / "work"
    process = _evaluate_process(pair, work, _slow_blocks(tmp_path, 1.0), "--launch",
                                "env EMRUN_LAUNCHED=1")
    _when(lambda: _blocks_in(work), 1, lambda: os.killpg(process.pid, signal.SIGINT)).join()
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == f"stopped by SIGINT: {STOPPED}"
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert list(work.iterdir()) == []
    assert _group_gone(process.pid)


def test_a_stop_file_stops_daisy_handing_out_blocks(tmp_path):
    """The stop file a stopped run leaves is one of the work folder's (a killed run's
    folder holding it is still removed) and stops daisy's check before each block."""
    from emrun.evaluate.schedule import STOP, _only_ours, _stopped

    assert not _stopped(str(tmp_path), None)
    (tmp_path / STOP).touch()
    assert _stopped(str(tmp_path), None)
    assert _only_ours(tmp_path)


@pytest.fixture
def handlers_kept() -> Iterator[None]:
    """A daisy worker's loop installs its own SIGTERM and SIGINT handlers: not this one's."""
    previous = {n: signal.getsignal(n) for n in (signal.SIGTERM, signal.SIGINT)}
    yield
    for number, old in previous.items():
        signal.signal(number, old)


@pytest.mark.usefixtures("handlers_kept")
@pytest.mark.parametrize("stopped", [False, True])
def test_a_daisy_server_gone_with_a_stop_ends_a_worker_quietly(pair, tmp_path, monkeypatch,
                                                               stopped):
    """On SIGINT daisy ends its run at once, and a worker asking for its next block met
    'Broken pipe': a traceback, exit 1, and '--launch ... exited with code 1' printed after
    the stop. Once the run is stopped that is the stop; before, it is still an error."""
    from types import SimpleNamespace

    import emrun.evaluate.schedule as schedule
    from emrun.evaluate.blockwise import prepare, save_work
    from emrun.io import open_volume

    seg, truth, *_ = pair
    save_work(tmp_path, prepare([open_volume(seg), open_volume(truth)], (4, 16, 16)))

    class Client:
        def acquire_block(self) -> object:
            raise RuntimeError("Broken pipe (os error 32)")

    monkeypatch.setattr(schedule, "daisy_package", lambda: SimpleNamespace(Client=Client))
    if stopped:
        (tmp_path / schedule.STOP).touch()
        schedule.serve(str(tmp_path))
    else:
        with pytest.raises(RuntimeError, match="Broken pipe"):
            schedule.serve(str(tmp_path))


def test_the_json_line_is_unchanged_when_no_signal_comes(pair):
    seg, truth, *_ = pair
    result = evaluate(seg, truth, "--json", "--workers", "1", "--block", "4", "16", "16")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["arand"] >= 0
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# ------------------------------------------------------------------- a new user's inputs


def _npy(tmp: Path, name: str, array: np.ndarray) -> Path:
    np.save(tmp / f"{name}.npy", array)
    return tmp / f"{name}.npy"


@pytest.mark.parametrize("dtype", [np.int32, np.uint16, np.bool_])
def test_a_threshold_that_a_prediction_would_ignore_is_refused(tmp_path, dtype):
    """bool and integer predictions (other than uint8) are foreground where non-zero:
    --threshold 0.9 was ignored without a word, and the text said 'foreground above 0.9'."""
    pred = _npy(tmp_path, "pred", np.array([[[0, 1, 1, 0]]]).astype(dtype))
    truth = _npy(tmp_path, "truth", np.array([[[0, 1, 0, 1]]], np.uint8))
    result = evaluate(pred, truth, "--binary", "--threshold", "0.9")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        f"error: {pred}: --threshold is for probabilities (float or uint8), but this "
        f"prediction is {np.dtype(dtype)}, whose foreground is its non-zero voxels: drop "
        "--threshold"]
    scored = evaluate(pred, truth, "--binary")
    assert scored.exit_code == 0, scored.output
    assert "4 voxels scored, foreground non-zero" in scored.stdout
    assert "true positives 1, false positives 1, false negatives 1" in scored.stdout


@pytest.mark.parametrize("dtype, said", [(np.uint8, "foreground above 0.25 x 255"),
                                         (np.float32, "foreground above 0.25")])
def test_probabilities_say_where_they_are_cut(tmp_path, dtype, said):
    """By hand: 0.9 and 0.3 are above 0.25 (uint8: 229 and 76 above 63.75), 0.2 is not."""
    values = np.array([[[0.9, 0.3, 0.2, 0.0]]])
    pred = values * 255 if dtype == np.uint8 else values
    result = evaluate(_npy(tmp_path, "pred", pred.astype(dtype)),
                      _npy(tmp_path, "truth", np.array([[[1, 0, 1, 0]]], np.uint8)),
                      "--binary", "--threshold", "0.25", "--json")
    assert result.exit_code == 0, result.output
    assert said in result.stderr
    scores = json.loads(result.stdout)
    assert (scores["tp"], scores["fp"], scores["fn"], scores["tn"]) == (1, 1, 1, 1)
    assert scores["precision"] == scores["recall"] == scores["f1"] == 0.5
    assert scores["iou"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("binary", [False, True])
def test_volumes_of_different_axes_are_said_to_be_so(tmp_path, binary):
    """A 2-d segmentation with a 3-d truth (or a 2-d mask with 3-d volumes) was refused
    as though their offsets were at fault ('their offsets do not place it inside')."""
    flat = _npy(tmp_path, "flat", np.ones((8, 8), np.uint8))
    deep = _npy(tmp_path, "deep", np.ones((2, 8, 8), np.uint8))
    mode = ["--binary"] if binary else []
    truth = evaluate(flat, deep, *mode)
    mask = evaluate(deep, deep, "--mask", flat, *mode)
    for result, name, this, other in ((truth, deep, "truth has shape [2, 8, 8] (3-d)",
                                       f"{flat} has shape [8, 8] (2-d)"),
                                      (mask, flat, "mask has shape [8, 8] (2-d)",
                                       f"{deep} has shape [2, 8, 8] (3-d)")):
        assert result.exit_code == 2, result.output
        assert result.stderr.strip().splitlines() == [
            f"error: {name}: {this} but {other}; give volumes with the same axes (2-d with "
            "2-d, 3-d with 3-d)"]


def test_affinities_given_as_the_segmentation_say_to_segment_them_first(tmp_path):
    affinities = _npy(tmp_path, "aff", np.random.default_rng(0).random((3, 2, 8, 8)))
    truth = _npy(tmp_path, "truth", np.ones((2, 8, 8), np.uint8))
    result = evaluate(affinities, truth)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {affinities}: segmentation has 4 axes")
    assert lines[0].endswith("its 3 channels look like a prediction (affinities, say): "
                             "segment it first (emrun segment) and evaluate the segmentation")


HAND = [
    # one segment over two truth objects of 2 voxels: rand merge (2^2 + 2^2) / 4^2, 1 bit
    ([1, 1, 1, 1], [1, 1, 2, 2], {"rand_split": 1.0, "rand_merge": 0.5, "arand": 1 / 3,
                                  "voi_split": 0.0, "voi_merge": 1.0, "merges": 1}),
    # truth 0 is not scored; the rest is a perfect relabelling
    ([5, 5, 5, 6], [0, 1, 1, 2], {"arand": 0.0, "voi": 0.0, "voxels": 3, "segments": 2}),
    # ids at the top of uint64: n = 1 each, truth sizes 2 and 2, segments 2, 1 and 1
    ([2**64 - 1, 2**64 - 2, 2**64 - 1, 0], [2**64 - 1, 2**64 - 1, 2**63, 2**63],
     {"rand_split": 4 / 8, "rand_merge": 4 / 6, "arand": 1 - 8 / 14, "voi_split": 1.0,
      "voi_merge": 0.5, "splits": 2, "merges": 1}),
]


@pytest.mark.parametrize("seg, truth, expected", HAND)
def test_scores_of_tiny_volumes_match_a_hand_computation(tmp_path, seg, truth, expected):
    result = evaluate(_npy(tmp_path, "seg", np.array([[seg]], np.uint64)),
                      _npy(tmp_path, "truth", np.array([[truth]], np.uint64)),
                      "--min-overlap", "1", "--json")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    for name, value in expected.items():
        assert scores[name] == pytest.approx(value), name


@pytest.mark.parametrize("infinity", [np.inf, -np.inf])
def test_an_infinite_probability_is_refused_as_a_logit(infinity: float) -> None:
    """+inf counted as foreground and -inf as background: both passed the [0, 1] check."""
    from emrun.errors import UserError
    from emrun.evaluate.binary import foreground

    pred = np.array([[[0.2, 0.9, infinity, np.nan]]], np.float32)
    with pytest.raises(UserError, match=r"outside \[0, 1\]"):
        foreground(pred, name="p.zarr/mito")
    assert foreground(np.array([0.2, 0.9, np.nan], np.float32)).tolist() == [False, True, False]
