"""`emrun data convert`, `emrun data synth` and `emrun bench data` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import yaml
import zarr
from conftest import MINIMAL, sigterm_after_first_log
from typer.testing import CliRunner

from emrun.cli import app
from emrun.io import open_volume, write_volume

runner = CliRunner()


def test_convert_with_a_voxel_size_keeps_the_place_in_voxels(tmp_path):
    """--voxel-size restates the grid: a source at voxel offset (10, 2, 3) stays there, its
    translation in nm being that offset times the new size (as the README says)."""
    write_volume(tmp_path / "src.zarr", "image", np.zeros((4, 8, 8), np.uint8),
                 voxel_size=(30, 6, 6), offset=(10, 2, 3))
    out = tmp_path / "out.zarr"
    result = runner.invoke(app, ["data", "convert", f"{tmp_path}/src.zarr/image", str(out),
                                 "--voxel-size", "40", "8", "8"])
    assert result.exit_code == 0, result.output
    volume = open_volume(f"{out}/image")
    assert (volume.voxel_size, tuple(volume.offset)) == ((40.0, 8.0, 8.0), (10, 2, 3))
    meta = json.loads((out / "zarr.json").read_text())["attributes"]["ome"]["multiscales"][0]
    transforms = meta["datasets"][0]["coordinateTransformations"]
    assert {"type": "translation", "translation": [400.0, 16.0, 24.0]} in transforms


def test_convert_tiff_to_ome_zarr_round_trips(tmp_path):
    labels = np.random.default_rng(0).integers(0, 70000, (5, 20, 30)).astype(np.uint32)
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    out = tmp_path / "vol.zarr"
    args = ["data", "convert", str(tmp_path / "labels.tif"), str(out), "--voxel-size", "30",
            "6", "6", "--chunks", "2", "16", "16"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "vol.zarr/labels" in result.stdout  # name guessed from the dtype
    volume = open_volume(f"{out}/labels")
    np.testing.assert_array_equal(volume.read(), labels)
    assert volume.voxel_size == (30.0, 6.0, 6.0)
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "already exists" in again.stderr
    missing = runner.invoke(app, ["data", "convert", str(tmp_path / "nope.tif"), str(out)])
    assert missing.exit_code == 2 and "nope.tif" in missing.stderr


def test_synth_writes_image_labels_mito_deterministically(tmp_path):
    for name in ("a.zarr", "b.zarr"):
        result = runner.invoke(app, ["data", "synth", str(tmp_path / name), "--shape", "8", "64",
                                     "64", "--seed", "4"])
        assert result.exit_code == 0, result.output
    for key in ("image", "labels", "mito", "synapse"):
        a = open_volume(f"{tmp_path}/a.zarr/{key}").read()
        np.testing.assert_array_equal(a, open_volume(f"{tmp_path}/b.zarr/{key}").read())
    assert open_volume(f"{tmp_path}/a.zarr/image").dtype == np.uint8
    assert open_volume(f"{tmp_path}/a.zarr/labels").voxel_size == (30.0, 6.0, 6.0)
    huge = runner.invoke(app, ["data", "synth", str(tmp_path / "h.zarr"), "--shape", "100000",
                               "100000", "100000"])  # checked first: no MemoryError
    assert huge.exit_code == 2 and "PB of memory" in huge.stderr
    assert not (tmp_path / "h.zarr").exists()


def test_synth_writes_all_four_volumes_or_none(tmp_path, monkeypatch):
    """A failure at the third volume left image and labels, and the rerun then refused
    "already exists"; a taken name refuses before anything is made."""
    import emrun.io.write as write

    real = write.write_volume

    def fails_at_mito(path, name, *args, **kwargs):
        if name == "mito":
            raise OSError(28, "No space left on device")
        return real(path, name, *args, **kwargs)

    args = ["data", "synth", "--shape", "4", "32", "32"]
    out, kept = tmp_path / "new.zarr", tmp_path / "kept.zarr"
    write_volume(kept, "other", np.zeros((4, 8, 8), np.uint8))
    monkeypatch.setattr(write, "write_volume", fails_at_mito)
    for store in (out, kept):
        assert runner.invoke(app, [*args[:2], str(store), *args[2:]]).exit_code == 2
    monkeypatch.undo()
    assert not out.exists()
    assert {p.name for p in kept.iterdir()} <= {"other", "zarr.json", "labels"}
    assert not any((kept / "labels").glob("*/zarr.json"))  # no segmentation left either
    with pytest.raises(Exception, match="has no array 'image'"):
        open_volume(kept / "image")
    done = runner.invoke(app, [*args[:2], str(kept), *args[2:]])  # the rerun
    assert done.exit_code == 0, done.output
    assert open_volume(kept / "labels").shape == (4, 32, 32)
    again = runner.invoke(app, [*args[:2], str(kept), *args[2:]])
    assert again.exit_code == 2 and "image: already exists" in again.stderr
    assert "cells" not in again.stdout


@pytest.mark.parametrize("command", ["synth", "convert"])
def test_a_voxel_size_that_is_not_positive_is_one_line_and_exit_2(tmp_path, command):
    np.save(tmp_path / "img.npy", np.zeros((4, 16, 16), np.uint8))
    out = tmp_path / "out.zarr"
    args = (["synth", str(out), "--shape", "4", "16", "16"] if command == "synth"
            else ["convert", str(tmp_path / "img.npy"), str(out)])
    for size in (["0", "6", "6"], ["30", "-6", "6"], ["30", "6", "inf"]):
        result = runner.invoke(app, ["data", *args, "--voxel-size", *size])
        assert result.exit_code == 2, result.output
        assert result.stderr == (f"error: --voxel-size {' '.join(size)}: give three positive "
                                 "sizes in nm (z y x)\n")
        assert not out.exists()


def test_convert_clips_chunks_larger_than_the_volume(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (16, 96, 40), np.uint8)
    np.save(tmp_path / "img.npy", image)
    out = tmp_path / "c.zarr"
    result = runner.invoke(app, ["data", "convert", str(tmp_path / "img.npy"), str(out),
                                 "--chunks", "100000", "64", "100000"])
    assert result.exit_code == 0, result.output  # was a MemoryError: chunks allocated whole
    assert "chunks [16, 64, 40]" in result.stdout
    written = open_volume(f"{out}/image")
    assert written.chunks == (16, 64, 40)
    np.testing.assert_array_equal(written.read(), image)


@pytest.mark.parametrize("shape", [(0, 96, 96), (16, 0, 96), (2, 16, 96, 0)])
def test_convert_refuses_an_empty_volume_and_writes_nothing(tmp_path, shape):
    np.save(tmp_path / "empty.npy", np.zeros(shape, np.uint8))
    out = tmp_path / "j.zarr"
    result = runner.invoke(app, ["data", "convert", str(tmp_path / "empty.npy"), str(out)])
    assert result.exit_code == 2, result.output
    assert result.stderr == (f"error: {tmp_path / 'empty.npy'}: is empty (shape "
                             f"{list(shape)}); nothing to convert\n")
    assert not out.exists()


@pytest.mark.parametrize(("shape", "kwargs", "said"), [
    ((96, 96, 3), {"photometric": "rgb"}, "is a colour TIFF (3 samples per pixel, axes YXS)"),
    ((5, 96, 96, 3), {"photometric": "rgb"}, "is a colour TIFF (3 samples per pixel"),
    ((4, 2, 32, 32), {"imagej": True, "metadata": {"axes": "ZCYX"}},
     "holds channels after other axes (axes ZCYX"),
])
def test_convert_refuses_tiff_axes_it_would_misread(tmp_path, shape, kwargs, said):
    """An RGB export was converted as z, y, x = rows, columns, 3, and an ImageJ hyperstack's
    channels as z; as a file and as a folder of sections."""
    data = np.zeros(shape, np.uint8)
    tifffile.imwrite(tmp_path / "colour.tif", data, **kwargs)
    (tmp_path / "sections").mkdir()
    tifffile.imwrite(tmp_path / "sections" / "s0.tif", data, **kwargs)
    for source in (tmp_path / "colour.tif", tmp_path / "sections"):
        out = tmp_path / "o.zarr"
        result = runner.invoke(app, ["data", "convert", str(source), str(out)])
        assert result.exit_code == 2, result.output
        assert said in result.stderr and len(result.stderr.splitlines()) == 1
        assert not out.exists()


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_convert_of_a_truncated_tiff_is_one_line_and_leaves_nothing(tmp_path, write,
                                                                    compression):
    """tifffile's own log lines (two or three) must not reach the user, and the input is
    judged before the output store is made. A real process: pytest would catch the logs."""
    image = np.random.default_rng(0).integers(0, 255, (16, 96, 96), np.uint8)
    whole, cut = tmp_path / "whole.tif", tmp_path / "cut.tif"
    tifffile.imwrite(whole, image, compression=compression)
    cut.write_bytes(whole.read_bytes()[:500 if compression is None else 20000])
    out = tmp_path / "o.zarr"
    done = subprocess.run([sys.executable, "-m", "emrun", "data", "convert", str(cut),
                           str(out)], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stdout == "" and len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"error: {cut}: the TIFF file is cut short")
    assert not out.exists()
    labels = tmp_path / "labels.npy"
    np.save(labels, np.ones((16, 96, 96), np.uint32))
    recipe = write(MINIMAL.replace("a: {type: synthetic, shape: [16, 64, 64], seed: 1}",
                                   f"a: {{image: {cut}, labels: {labels}}}"))
    checked = runner.invoke(app, ["validate", str(recipe)])
    assert checked.exit_code == 2 and "the TIFF file is cut short" in checked.stderr


def test_bench_data_ends_with_a_json_line(write):
    result = runner.invoke(app, ["bench", "data", str(write(MINIMAL)), "--workers", "0",
                                 "--samples", "3", "--json", "-o", "augment=none"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("samples_per_s", "ms_per_sample", "workers", "per_augmentation_ms"):
        assert key in figures
    assert figures["workers"] == 0 and figures["samples_per_s"] > 0


@pytest.mark.slow
def test_multitask_runs_on_synthetic_data_with_stand_in_synapses():
    """--synthetic replaces the sources: the multi-task recipe's synapse task needs a
    'synapse' volume, which synthetic sources now have."""
    from emrun.shipped import RECIPES

    recipe = str(RECIPES / "multitask.yaml")
    result = runner.invoke(app, ["bench", "data", recipe, "--synthetic", "--workers", "0",
                                 "--samples", "2", "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["channels"] == {"affinity": 5, "mito": 1, "synapse": 1}


def test_preview_writes_a_png_grid(write, tmp_path):
    out = tmp_path / "sub" / "preview.png"
    result = runner.invoke(app, ["data", "preview", str(write(MINIMAL)), "--n", "2",
                                 "--out", str(out), "-o", "augment=none"])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.parent.glob(".*.tmp"))
    bad = runner.invoke(app, ["data", "preview", str(write(MINIMAL)), "--out", str(tmp_path)])
    assert bad.exit_code == 2
    jpeg = runner.invoke(app, ["data", "preview", str(write(MINIMAL)), "--out",
                               str(tmp_path / "p.jpg")])  # PNG bytes under a .jpg name
    assert jpeg.exit_code == 2 and "the preview is a PNG image" in jpeg.stderr
    assert not (tmp_path / "p.jpg").exists()
    again = runner.invoke(app, ["data", "preview", str(write(MINIMAL)), "--n", "2",
                                "--out", str(out), "-o", "augment=none"])
    assert again.exit_code == 0, again.output  # an earlier preview is replaced
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"\x89PNG\r\n\x1a\n a user's picture")
    kept = runner.invoke(app, ["data", "preview", str(write(MINIMAL)), "--n", "2",
                               "--out", str(mine), "-o", "augment=none"])
    assert kept.exit_code == 2 and "not an emrun preview" in kept.stderr
    assert mine.read_bytes().endswith(b"a user's picture")


def test_bench_model_reports_facts_and_configurations(write):
    result = runner.invoke(app, ["bench", "model", str(write(MINIMAL)), "--no-compile",
                                 "--steps", "1", "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["params"] == 9_851  # widths [4, 8], 3 affinity channels (the formula)
    assert figures["receptive_field"] == [25, 40, 40]
    assert figures["flops_per_voxel"] > 0 and figures["step_voxels_per_s"] > 0
    assert {(c["precision"], c["channels_last"]) for c in figures["configs"]} == {
        ("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)}


def test_bench_train_times_both_loops_with_the_recipes_compile_setting(write, monkeypatch):
    """`train.compile` reaches both the trainer and the bare loop (compiled in the warm-up,
    outside the timing), and the figures say which was measured."""
    import torch

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(model) or model)
    for setting, calls in (("false", 0), ("true", 2)):
        compiled.clear()
        result = runner.invoke(app, ["bench", "train", str(write(MINIMAL)), "--steps", "2",
                                     "--device", "cpu", "-o", f"train.compile={setting}",
                                     "--json"])
        assert result.exit_code == 0, result.output
        figures = json.loads(result.stdout.strip().splitlines()[-1])
        assert figures["compile"] is (setting == "true") and len(compiled) == calls
        assert figures["emrun_step_ms"] > 0 and figures["bare_step_ms"] > 0
        assert ("compiled" in result.stderr) is (setting == "true")


def test_bench_train_times_the_checkpoint_apart_from_the_loop(write, monkeypatch):
    """A slow checkpoint shows in checkpoint_ms, not in the time per iteration. The bench's
    clock is a fake one that only the checkpoint moves far (tests assert no wall time)."""
    import types

    from emrun.bench import train as bench_train
    from emrun.train.trainer import Trainer

    clock = [0.0]

    def perf_counter():
        clock[0] += 0.001  # every reading: 1 ms
        return clock[0]

    monkeypatch.setattr(bench_train, "time", types.SimpleNamespace(perf_counter=perf_counter))
    real = Trainer._checkpoint

    def slow(self, logger):
        clock[0] += 2.0
        real(self, logger)

    monkeypatch.setattr(Trainer, "_checkpoint", slow)
    result = runner.invoke(app, ["bench", "train", str(write(MINIMAL)), "--steps", "2",
                                 "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    slow_ms = 2000  # what the fake clock says the checkpoint took
    assert figures["checkpoint_ms"] >= slow_ms
    # inside the loop, the checkpoint would add slow_ms / 2 to each of the 2 steps
    assert figures["emrun_step_ms"] < slow_ms / 2


def test_demo_trains_and_draws_then_refuses_to_overwrite(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "-o", "train.iterations=3", "-o", "train.log_every=1",
            "-o", "train.validate_every=3", "-o", "train.checkpoint_every=3",
            # the demo's own model on smaller volumes: its test volume is twice the infer patch
            "-o", "data.sources.synth_a.shape=[16, 80, 80]",
            "-o", "data.sources.synth_b.shape=[16, 80, 80]",
            "-o", "data.validation.synth_val.shape=[16, 64, 64]", "-o", "infer.patch=[8, 32, 32]"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "demo.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "run" / "checkpoints" / "last.pt").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    for tag in ("trained", "untrained"):
        assert {"arand", "voi_split", "voi_merge"} <= set(metrics[tag])
        assert 0 <= metrics[tag]["arand"] <= 1
    assert "adapted Rand error" in result.stdout
    # each long step is announced with the time since the start (a log shows where it is)
    assert "] predicting the test volume with the trained network" in result.stdout
    assert "] segmenting its affinities" in result.stdout
    seg = zarr.open_array(str(out / "seg_trained.zarr" / "labels" / "segmentation" / "0"))
    assert seg.dtype == np.uint64 and seg.shape == (16, 64, 64) and seg[...].min() > 0
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "not empty" in again.stderr
    under = runner.invoke(app, ["demo", "--out", str(out / "metrics.json" / "d")])
    assert under.exit_code == 2  # the message named --run-dir, an option demo lacks
    assert under.stderr == (f"error: --out {out / 'metrics.json' / 'd'}: {out / 'metrics.json'}"
                            " is a file, not a folder; give another --out\n")


def snemi3d_stand_in(tmp_path):
    """SNEMI3D's two training TIFFs as a synthetic stand-in of 70 small sections."""
    from emrun.synth import synthesize

    data = tmp_path / "snemi"
    data.mkdir()
    vol = synthesize((70, 48, 48), 3)
    tifffile.imwrite(data / "train-input.tif", vol.image)
    tifffile.imwrite(data / "train-labels.tif", vol.labels.astype(np.uint16))
    return data, vol


def test_demo_and_bench_snemi3d_stop_when_training_is_stopped(tmp_path, monkeypatch):
    """A SIGTERM during training checkpoints and ends the command (exit 143): nothing goes on
    to score a partly trained network as trained."""
    from emrun.train.trainer import Trainer, TrainResult

    def stopped(self, batches=None):
        return TrainResult(self.iteration, self.run_path, "SIGTERM")

    monkeypatch.setattr(Trainer, "fit", stopped)
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--out", str(out), "-o", "train.iterations=3"])
    assert result.exit_code == 143, result.output
    assert "stopped by SIGTERM" in result.stderr and "again" in result.stderr
    assert not (out / "metrics.json").exists() and not (out / "test.zarr").exists()
    data, _ = snemi3d_stand_in(tmp_path)
    bench = tmp_path / "bench"
    result = runner.invoke(app, ["bench", "snemi3d", "--data", str(data), "--out", str(bench),
                                 "--iterations", "2", "--device", "cpu", *TINY_SNEMI,
                                 "-o", "segment={type: mws}"])
    assert result.exit_code == 143, result.output
    assert "continue" in result.stderr and not (bench / "pred.zarr").exists()


def test_bench_infer_reports_efficiency(write):
    result = runner.invoke(app, ["bench", "infer", str(write(MINIMAL)), "--shape", "8", "48",
                                 "48", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["monai_voxels_per_s"] is None or figures["monai_voxels_per_s"] > 0
    for key in ("engine_voxels_per_s", "model_voxels_per_s", "efficiency"):
        assert figures[key] > 0
    # the engine's seconds split into the main thread's stages, and the IO threads ran
    stages, seconds = figures["stage_seconds"], figures["engine_seconds"]
    main = stages["predict"] + stages["wait_read"] + stages["wait_write"]
    assert 0.3 * seconds <= main <= seconds + 2e-3  # figures are rounded to 1 ms
    assert stages["predict"] > 0 and stages["read"] > 0 and stages["write"] > 0
    assert stages["pin"] == 0.0  # page-locked copies are for a GPU only
    assert 8 * 48 * 48 / figures["engine_voxels_per_s"] == pytest.approx(seconds, abs=1e-3)
    assert "block" in result.stderr and "waiting for reads" in result.stderr
    assert len(result.stdout.strip().splitlines()) == 1  # stdout: the JSON line alone


TINY_SNEMI = ["-o", "model.widths=[4, 8]", "-o", "model.norm=group", "-o", "model.groups=2",
              "-o", "train.patch=[6, 32, 32]", "-o", "infer.patch=[6, 32, 32]",
              "-o", "augment=[]", "-o", "train.workers=0", "-o", "train.log_every=1",
              "-o", "infer.precision=fp32", "-o", "train.precision=fp32",
              "-o", "train.schedule.warmup=0"]


def test_bench_snemi3d_runs_the_pipeline_on_a_stand_in_volume(tmp_path, monkeypatch):
    """The real benchmark needs ../shared/data; its plumbing runs here on a synthetic
    stand-in with SNEMI3D's 70 sections, a tiny model and two iterations."""
    pytest.importorskip("waterz")  # the recipe's segmenter
    data, vol = snemi3d_stand_in(tmp_path)
    out = tmp_path / "bench"
    args = ["bench", "snemi3d", "--data", str(data), "--out", str(out), "--iterations", "2",
            "--device", "cpu", "--json", *TINY_SNEMI]
    with monkeypatch.context() as without:
        without.setitem(sys.modules, "waterz", None)
        early = runner.invoke(app, args)
    assert early.exit_code == 2 and "emrun[waterz]" in early.stderr
    assert not (out / "run").exists()  # refused before training
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["iterations"] == 2 and figures["validation_sections"] == [60, 69]
    for step in ("training", "predicting sections 60-69", "segmenting them",  # converted
                 "drawing the figures"):  # by the refused run above, so not announced
        assert f"] {step}" in result.stderr, step
    assert figures["train_seconds"] > 0 and figures["device"].startswith("cpu (")
    assert figures["segmenter"] == "waterz" and figures["parameter"] == "threshold"
    assert 0 <= figures["arand"] <= 1 and figures["chosen"] in [r["threshold"] for r in
                                                                 figures["sweep"]]
    assert min(r["arand"] for r in figures["sweep"]) == pytest.approx(figures["arand"], abs=1e-4)
    # scored against the truth's connected pieces (the recipe's default), the labels as given
    # beside it with the floor they set (their own pieces' score)
    assert figures["connected_truth"] is True
    assert set(figures["as_labelled"]) == {"arand", "voi_split", "voi_merge", "cremi_score"}
    from emrun.evaluate import score
    from emrun.evaluate.pieces import connected_pieces

    labels = vol.labels[60:].astype(np.uint16)
    floor = score(connected_pieces(labels), labels).arand
    assert figures["as_labelled_floor"] == pytest.approx(floor, abs=1e-4)
    assert "against the labels as given" in (out / "results.md").read_text()
    for name in ("input.png", "affinities.png", "segmentation.png", "training.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    seg = open_volume(f"{out}/seg.zarr/segmentation")
    assert seg.shape == (10, 48, 48) and seg.offset == (60, 0, 0)
    assert "adapted Rand error" in (out / "results.md").read_text()
    # the budget is on the record: every recipe override the run was given
    assert figures["overrides"] == TINY_SNEMI[1::2]
    assert "`infer.precision=fp32`" in (out / "results.md").read_text()
    assert "swept over 0.5 / 0.6 / 0.7 / 0.8 / 0.85 / 0.9" in (out / "results.md").read_text()
    assert figures["chosen_at_edge"] is (figures["chosen"] in (0.5, 0.9))
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "finished benchmark" in again.stderr
    missing = runner.invoke(app, ["bench", "snemi3d", "--data", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "train-input.tif" in missing.stderr

    # --final: the same settings on all 70 sections, as a package that infer predicts with
    final = ["bench", "snemi3d", "--data", str(data), "--out", str(out), "--final",
             "--device", "cpu"]
    refused = runner.invoke(app, [*final, "-o", "train.iterations=5"])
    assert refused.exit_code == 2 and "--iterations and -o" in refused.stderr
    early = runner.invoke(app, [*final[:5], str(tmp_path / "empty"), *final[6:]])
    assert early.exit_code == 2 and "run `emrun bench snemi3d --out" in early.stderr
    done = runner.invoke(app, [*final, "--json"])
    assert done.exit_code == 0, done.output
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert facts["iterations"] == 2 and facts["sections"] == [0, 69]
    assert facts["value"] == figures["chosen"] and facts["overrides"] == figures["overrides"]
    from emrun.io.package import read_package

    package = read_package(out / "snemi3d.emrun")
    recipe = yaml.safe_load(package.recipe)
    assert recipe["segment"]["thresholds"] == [figures["chosen"]]
    assert recipe["data"]["sources"]["snemi3d"]["roi"]["shape"][0] == 70
    assert recipe["data"]["validation"] == {} and recipe["model"]["widths"] == [4, 8]
    new = tmp_path / "new.zarr"
    write_volume(new, "image", vol.image[:10])
    predicted = runner.invoke(app, ["infer", "--model", str(out / "snemi3d.emrun"), "--input",
                                    f"{new}/image", "--output", str(tmp_path / "pred.zarr"),
                                    "--device", "cpu"])
    assert predicted.exit_code == 0, predicted.output
    assert open_volume(f"{tmp_path}/pred.zarr/affinity").shape == (12, 10, 48, 48)
    again = runner.invoke(app, final)
    assert again.exit_code == 2 and "nothing was overwritten" in again.stderr

    # stopped while scoring, then run again trained further: its predictions are stale
    (out / "results.json").unlink()
    longer = runner.invoke(app, [*args[:6], "--iterations", "3", *args[8:]])
    assert longer.exit_code == 0, longer.output
    assert "holds another checkpoint's predictions" in longer.stderr


@pytest.mark.parametrize("device", ["gpu", "cuda:99", "cuda:x"])  # :x: is no emoji
def test_train_on_a_device_that_is_not_there_is_a_user_error(write, tmp_path, device):
    result = runner.invoke(app, ["train", str(write(MINIMAL)), "--device", device,
                                 "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert f"--device {device}:" in result.stderr and "Traceback" not in result.output


def test_bench_infer_fills_large_volumes_by_mirroring_one_generated_block(monkeypatch):
    from emrun.bench import infer as bench

    monkeypatch.setattr(bench, "TILE", (4, 16, 16))
    image = bench.synthetic_image((10, 40, 24))
    tile = bench.synthesize((4, 16, 16), 0).image
    assert image.shape == (10, 40, 24) and image.dtype == tile.dtype
    np.testing.assert_array_equal(image[:4, :16, :16], tile)
    np.testing.assert_array_equal(image[4:8, :16, :16], tile[::-1])  # mirrored, no seam
    np.testing.assert_array_equal(image[:4, 16:32, :16], tile[:, ::-1])
    assert image.std() > 0
    small = bench.synthetic_image((3, 8, 8))
    np.testing.assert_array_equal(small, bench.synthesize((3, 8, 8), 0).image)


@pytest.mark.parametrize("device", ["gpu", "cuda:99"])
def test_infer_on_a_device_that_is_not_there_is_a_user_error(device):
    from emrun.errors import UserError
    from emrun.infer.schedule import worker_slots

    with pytest.raises(UserError, match=f"--device {device}:"):
        worker_slots(device, None)


def test_demo_stopped_by_sigterm_says_it_does_not_resume(tmp_path):
    """The real signal this time: the demo checkpoints, exits 143, and nothing it prints
    points to a --resume it does not have."""
    out = tmp_path / "demo"
    result = sigterm_after_first_log(
        ["demo", "--out", str(out), "-o", "train.iterations=100000", "-o",
         "train.log_every=1"], out / "run" / "events.jsonl", group=True)
    assert result.returncode == 143, result.stderr
    assert "--resume" not in result.stdout + result.stderr
    assert "does not resume" in result.stdout
    assert (out / "run" / "checkpoints" / "last.pt").exists()
    assert not (out / "metrics.json").exists()


def test_bench_snemi3d_recipe_must_exist_and_name_the_snemi3d_sources(tmp_path):
    data, _ = snemi3d_stand_in(tmp_path)
    base = ["bench", "snemi3d", "--data", str(data), "--out", str(tmp_path / "b")]
    unknown = runner.invoke(app, [*base, "--recipe", "snemi3d_nope"])
    assert unknown.exit_code == 2 and "snemi3d_aff" in unknown.stderr  # lists the shipped
    other = runner.invoke(app, [*base, "--recipe", "demo"])
    assert other.exit_code == 2 and "data.sources.snemi3d" in other.stderr
    assert not (tmp_path / "b").exists()  # refused before converting anything
    final = runner.invoke(app, [*base, "--final", "--recipe", "snemi3d_aff"])
    assert final.exit_code == 2 and "drop --recipe" in final.stderr


def test_a_batch_too_large_for_the_device_is_a_located_recipe_error(write, tmp_path,
                                                                      monkeypatch):
    """Out of device memory in the first step: the recipe asks too much of this GPU (exit 2,
    located at train.batch_size, with what was asked); later in the run, the command's
    guard still says it in one line, without the recipe's location. Simulated: CI has no
    GPU."""
    import torch

    from emrun.train.trainer import Trainer

    real_step, calls = Trainer.step, []

    def step(self, batches, fail_at=(1,)):
        calls.append(1)
        if len(calls) in fail_at:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.50 GiB. "
                                         "GPU 0 has a total capacity of 79.19 GiB")
        return real_step(self, batches)

    monkeypatch.setattr(Trainer, "step", step)
    recipe = write(MINIMAL)
    result = runner.invoke(app, ["train", str(recipe), "--device", "cpu", "--run-dir",
                                 str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert f"{recipe.name}:" in message and "train.batch_size" in message
    assert "batch 1 x patch 8x32x32" in message and "Tried to allocate 2.50 GiB" in message
    assert "Traceback" not in result.output and len(message.splitlines()) == 1
    assert not list((tmp_path / "run").glob("checkpoints/*.pt"))
    calls.clear()
    monkeypatch.setattr(Trainer, "step", lambda self, b: step(self, b, fail_at=(3,)))
    later = runner.invoke(app, ["train", str(recipe), "--device", "cpu", "--run-dir",
                                str(tmp_path / "run2")])
    assert later.exit_code == 2 and "ran out of memory" in later.stderr
    assert "train.batch_size:" not in later.stderr and "Traceback" not in later.output
    from multiprocessing import active_children

    assert not active_children()  # the failed runs' loader workers were stopped
