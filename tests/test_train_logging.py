"""RunLogger: events.jsonl, TensorBoard event files, plain and live console output."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from emrun.train.logging import (
    EVENTS_FILE,
    TENSORBOARD_DIR,
    RunLogger,
    _fmt_duration,
    _image_for_tensorboard,
)

ANSI = re.compile(r"\x1b\[")


def plain_console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=False, width=80), buf


def records(run_dir: Path) -> list[dict]:
    lines = (run_dir / EVENTS_FILE).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def accumulator(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / TENSORBOARD_DIR),
                           size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_step_writes_one_json_line_per_call(tmp_path: Path) -> None:
    console, _ = plain_console()
    with RunLogger(tmp_path / "run", total=10, console=console) as log:
        for it in (1, 2, 3):
            log.step(it, {"loss/total": 0.5 / it, "loss/affinity": 0.5 / it, "lr": 1e-3,
                          "memory/allocated_bytes": np.int64(1234)})
        # flushed per line: readable while the run is still going
        assert len(records(tmp_path / "run")) == 3
    got = records(tmp_path / "run")
    assert [r["iteration"] for r in got] == [1, 2, 3]
    assert got[1]["loss/total"] == pytest.approx(0.25)
    assert got[2]["lr"] == 1e-3
    assert got[0]["memory/allocated_bytes"] == 1234
    assert all(isinstance(r["time"], float) for r in got)


def test_nonfinite_metrics_are_null_in_strict_json(tmp_path: Path) -> None:
    console, buf = plain_console()
    with RunLogger(tmp_path, total=10, console=console) as log:
        log.step(1, {"loss/total": float("nan"), "loss/affinity": float("inf")})
    text = (tmp_path / EVENTS_FILE).read_text()
    assert "NaN" not in text and "Infinity" not in text
    record = json.loads(text)
    assert record["loss/total"] is None and record["loss/affinity"] is None
    assert "loss nan (affinity inf)" in buf.getvalue()


def test_resumed_run_continues_the_same_file(tmp_path: Path) -> None:
    console, _ = plain_console()
    with RunLogger(tmp_path, total=4, console=console) as log:
        log.step(1, {"loss/total": 1.0})
        log.step(2, {"loss/total": 0.9})
    with (tmp_path / EVENTS_FILE).open("a") as f:
        f.write('{"iteration": 3, "ti')  # a run killed mid-write: the half line goes
    with RunLogger(tmp_path, total=4, console=console, start=2) as log:
        log.step(3, {"loss/total": 0.8})
        log.step(4, {"loss/total": 0.7})
    good = records(tmp_path)  # every line is JSON
    assert [r["iteration"] for r in good] == [1, 2, 3, 4]
    assert [r["loss/total"] for r in good] == [1.0, 0.9, 0.8, 0.7]


def test_validation_record_and_line(tmp_path: Path) -> None:
    console, buf = plain_console()
    with RunLogger(tmp_path, total=100, console=console) as log:
        log.step(50, {"loss/total": 0.4})
        log.validation(50, {"loss/total": 0.3, "rand_error": 0.125})
    got = records(tmp_path)
    assert got[1]["iteration"] == 50
    assert got[1]["validation"] == {"loss/total": 0.3, "rand_error": 0.125}
    assert "loss/total" not in got[1]
    last = buf.getvalue().splitlines()[-1]
    assert last == "validation iter 50/100  loss 0.3000  rand_error 0.1250"


def test_tensorboard_scalars_and_images(tmp_path: Path) -> None:
    console, _ = plain_console()
    with RunLogger(tmp_path, total=10, console=console) as log:
        for it in (1, 2):
            log.step(it, {"loss/total": 0.5 * it, "loss/affinity": 0.25, "lr": 1e-3,
                          "throughput/samples_per_s": 8.0})
        log.validation(2, {"loss/total": 0.75})
        panel = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
        panel[0, :4] = np.nan  # excluded voxels
        log.images(2, {"input": panel, "affinity/mask": np.full((8, 8), np.nan),
                       "affinity/prediction": np.zeros((8, 8, 3))})
    files = list((tmp_path / TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    assert len(files) == 1 and files[0].stat().st_size > 0

    acc = accumulator(tmp_path)
    tags = acc.Tags()
    assert {"loss/total", "loss/affinity", "lr", "throughput/samples_per_s",
            "validation/loss/total"} <= set(tags["scalars"])
    assert [(e.step, e.value) for e in acc.Scalars("loss/total")] == [(1, 0.5), (2, 1.0)]
    assert acc.Scalars("validation/loss/total")[0].value == 0.75
    assert set(tags["images"]) == {"input", "affinity/mask", "affinity/prediction"}
    image = acc.Images("input")[0]
    assert (image.step, image.width, image.height) == (2, 8, 8)
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)))
    assert pixels.shape == (8, 8) and (pixels[0, :4] == 128).all() and pixels[7, 7] == 255
    rgb = np.asarray(Image.open(io.BytesIO(acc.Images("affinity/prediction")[0]
                                           .encoded_image_string)))
    assert rgb.shape == (8, 8, 3) and not rgb.any()


def test_image_panels_nan_grey_and_shapes() -> None:
    image = _image_for_tensorboard("mask", np.full((4, 5), np.nan))
    assert image.shape == (4, 5) and image.dtype == np.uint8
    assert (image == 128).all()  # NaN (excluded) -> mid grey
    image = _image_for_tensorboard("x", np.array([[0.0, 1.0, 2.0, -np.inf]]))
    assert image.tolist() == [[0, 255, 255, 0]]
    assert _image_for_tensorboard("rgb", np.zeros((4, 5, 3))).shape == (4, 5, 3)
    assert _image_for_tensorboard("chw", np.zeros((3, 4, 5))).shape == (4, 5, 3)
    assert _image_for_tensorboard("one", np.zeros((1, 4, 5))).shape == (4, 5)
    assert _image_for_tensorboard("hw1", np.zeros((3, 5, 1))).shape == (3, 5)
    with pytest.raises(ValueError, match="'bad'"):
        _image_for_tensorboard("bad", np.zeros((2, 3, 4, 5)))


def test_plain_mode_prints_stable_lines_without_ansi(tmp_path: Path) -> None:
    console, buf = plain_console()
    with RunLogger(tmp_path, total=2000, console=console) as log:
        assert not log.live
        log.step(100, {"loss/total": 0.4123, "loss/affinity": 0.4123, "lr": 1e-3,
                       "throughput/samples_per_s": 3.0})
        log.step(200, {"loss/total": 0.3, "loss/affinity": 0.2, "loss/mito": 0.1, "lr": 5e-4})
        log.message("checkpoint [iter_0000200.pt] written to a/very/long/path/" + "x" * 80)
    out = buf.getvalue()
    assert not ANSI.search(out)
    lines = out.splitlines()
    assert len(lines) == 3  # never wrapped, one line per call
    assert re.fullmatch(r"iter 100/2000  loss 0\.4123 \(affinity 0\.4123\)  lr 1\.0e-03  "
                        r"\S+ it/s  ETA \S+", lines[0]), lines[0]
    assert lines[1].startswith("iter 200/2000  loss 0.3000 (affinity 0.2000, mito 0.1000)  "
                               "lr 5.0e-04  ")
    assert lines[2].startswith("checkpoint [iter_0000200.pt] written")


def test_live_mode_runs_and_keeps_messages(tmp_path: Path) -> None:
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=120)
    with RunLogger(tmp_path, total=5, console=console) as log:
        assert log.live
        log.step(1, {"loss/total": 0.5, "loss/affinity": 0.5})
        log.message("checkpoint iter_0000001.pt written")
        log.step(2, {"loss/total": 0.4, "loss/affinity": 0.4})
    out = buf.getvalue()
    assert "checkpoint iter_0000001.pt written" in out
    assert "2/5" in out and "loss 0.4000 (affinity 0.4000)" in out
    assert len(records(tmp_path)) == 2


def test_disabled_logger_writes_nothing(tmp_path: Path) -> None:
    console, buf = plain_console()
    run_dir = tmp_path / "run"
    log = RunLogger(run_dir, total=10, enabled=False, console=console)
    log.step(1, {"loss/total": 0.5})
    log.images(1, {"input": np.zeros((4, 4))})
    log.validation(1, {"loss/total": 0.5})
    log.message("hello")
    log.close()
    log.close()
    assert not run_dir.exists()
    assert buf.getvalue() == ""


def test_close_is_idempotent_and_final(tmp_path: Path) -> None:
    console, _ = plain_console()
    log = RunLogger(tmp_path, total=10, console=console)
    log.step(1, {"loss/total": 0.5})
    log.close()
    log.close()
    with pytest.raises(RuntimeError, match="closed"):
        log.step(2, {"loss/total": 0.4})
    assert len(records(tmp_path)) == 1


def test_reserved_metric_names_are_refused(tmp_path: Path) -> None:
    console, _ = plain_console()
    with RunLogger(tmp_path, total=10, console=console) as log, \
            pytest.raises(ValueError, match="reserved"):
        log.step(1, {"time": 3.0})


def test_resume_purges_tensorboard_steps_after_the_checkpoint(tmp_path: Path) -> None:
    console, _ = plain_console()
    with RunLogger(tmp_path, total=6, console=console) as log:
        for it in range(1, 6):  # crashed after iteration 5, last checkpoint at 3
            log.step(it, {"loss/total": float(it)})
    with RunLogger(tmp_path, total=6, console=console, start=3) as log:
        for it in (4, 5, 6):
            log.step(it, {"loss/total": 10.0 + it})
    got = [(e.step, e.value) for e in accumulator(tmp_path).Scalars("loss/total")]
    assert got == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0), (6, 16.0)]


@pytest.mark.parametrize(("seconds", "text"), [
    (0.4, "0s"), (45, "45s"), (594, "9m54s"), (3720, "1h02m"), (2 * 86400 + 3 * 3600, "2d03h"),
    (math.inf, "?"), (None, "?"),
])
def test_durations(seconds: float | None, text: str) -> None:
    assert _fmt_duration(seconds) == text


def test_tensorboard_fallbacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import emrun.train.logging as run_logging

    def broken(*args: object, **kwargs: object) -> None:
        raise ImportError("torch.utils.tensorboard is broken here")

    monkeypatch.setattr(run_logging, "_TensorBoard", broken)
    console, buf = plain_console()
    with RunLogger(tmp_path / "a", total=10, console=console) as log:
        log.step(1, {"loss/total": 0.5})
        log.images(1, {"input": np.zeros((4, 4))})  # accepted, not written
    assert "TensorBoard gets scalars only" in buf.getvalue()
    files = list((tmp_path / "a" / TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    assert len(files) == 1 and files[0].stat().st_size > 0

    monkeypatch.setattr(run_logging, "_ScalarOnlyTensorBoard", broken)
    console, buf = plain_console()
    with RunLogger(tmp_path / "b", total=10, console=console) as log:
        log.step(1, {"loss/total": 0.5})
    assert "metrics go to events.jsonl only" in buf.getvalue()
    assert len(records(tmp_path / "b")) == 1


def test_excluded_pause_leaves_rate_and_eta_alone(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # 10 it/s, then a 100 s validation: the rate after it must still read 10 it/s, not 5
    clock = [0.0]
    monkeypatch.setattr("emrun.train.logging.time.perf_counter", lambda: clock[0])
    console, buf = plain_console()
    with RunLogger(tmp_path, total=10_000, console=console) as log:
        for it in range(100, 1100, 100):
            clock[0] += 10.0
            log.step(it, {"loss/total": 0.1})
        clock[0] += 100.0
        log.exclude(100.0)
        clock[0] += 10.0
        log.step(1100, {"loss/total": 0.1})
        clock[0] += 100.0  # a pause not excluded shows in the rate
        clock[0] += 10.0
        log.step(1200, {"loss/total": 0.1})
    lines = buf.getvalue().splitlines()
    assert "10 it/s  ETA 14m50s" in lines[-2], lines[-2]
    assert "10 it/s" not in lines[-1], lines[-1]


def test_prediction_panels_show_each_task_after_its_own_activation() -> None:
    """A regression task (activation none, e.g. lsd) is drawn as predicted, not squashed
    by a sigmoid; a sigmoid task through its sigmoid; a signed distance over its -1 .. 1."""
    from types import SimpleNamespace

    import torch

    from emrun.recipe.tasks import AffinityTarget, DistanceTarget, LSDTarget
    from emrun.train.trainer import Trainer

    tasks = {"aff": SimpleNamespace(activation="sigmoid", target=AffinityTarget()),
             "lsd": SimpleNamespace(activation="none", target=LSDTarget()),
             "dist": SimpleNamespace(activation="tanh", target=DistanceTarget(signed=True))}
    trainer = SimpleNamespace(world=SimpleNamespace(main=True), losses=dict.fromkeys(tasks),
                              recipe=SimpleNamespace(tasks=tasks), iteration=7)
    raw = {"aff": torch.full((1, 3, 4, 5, 5), 2.0), "lsd": torch.full((1, 10, 4, 5, 5), 0.3),
           "dist": torch.full((1, 1, 4, 5, 5), -10.0)}
    batch = {"image": torch.zeros((1, 1, 4, 5, 5)), "outputs": raw,
             "target": {k: torch.zeros_like(v) for k, v in raw.items()},
             "mask": {k: torch.ones_like(v[:, :1]) for k, v in raw.items()}}
    shown: dict[str, np.ndarray] = {}
    logger = SimpleNamespace(images=lambda step, panels: shown.update(panels))
    Trainer._images(trainer, logger, batch)  # type: ignore[arg-type]
    np.testing.assert_allclose(shown["lsd/prediction"], 0.3, rtol=1e-6)
    np.testing.assert_allclose(shown["aff/prediction"], 1 / (1 + math.exp(-2.0)), rtol=1e-6)
    # a signed distance spans -1 .. 1: drawn black to white, its zero mid-grey
    np.testing.assert_allclose(shown["dist/prediction"], 0.0, atol=1e-6)
    np.testing.assert_allclose(shown["dist/target"], 0.5, rtol=1e-6)
