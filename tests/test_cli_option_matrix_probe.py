"""Reference probe of option combinations on the command line: for each command, invalid or
conflicting options must end as the README promises for a user's mistake: exit code 2, one
`error:` line naming the option (or the value) at fault, nothing on stdout (--json too), no
traceback, and nothing written (no output store, run directory or work folder; the inputs
untouched). The reference is that contract, checked through the console entry point
(`emrun.cli.app.main`, the path a shell takes, Click's usage errors included) on tiny
synthetic inputs built once per module."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import emrun.models  # registers the model types
from emrun.cli.app import main
from emrun.io import write_volume
from emrun.recipe import Recipe
from emrun.registry import models

NEAREST = [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]
OFFS = "[[-1,0,0],[0,-1,0],[0,0,-1]]"
RECIPE = """\
name: p
data:
  sources:
    a: {type: synthetic, shape: [16, 64, 64], seed: 1}
model: {type: rsunet, widths: [4, 8]}
tasks:
  aff:
    target: {type: affinity}
train: {patch: [4, 16, 16], iterations: 2}
"""


def emrun(args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """Run `emrun ARGS` as the console script does; its exit code, stdout and stderr."""
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["emrun", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    got = capsys.readouterr()
    return code, got.out, got.err


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under root by relative path: a file's (size, mtime), a
    folder's (-1, 0) (a lock file made and removed again changes a folder's mtime only)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            if p.is_file() else (-1, 0) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """in.zarr: affinity (offsets attribute), labels, seg, image (8 x 32 x 32 uint8, 30 x 6 x
    6 nm), prob; affs.npy (no offsets); img.npy; a recipe, its checkpoint c.pt; a finished
    inference output done.zarr (block 4 16 16, no tta, no roi, no mask)."""
    d = tmp_path_factory.mktemp("matrix")
    rng = np.random.default_rng(0)
    truth = np.zeros((4, 16, 16), np.uint32)
    truth[:, :8], truth[:, 8:] = 1, 2
    affs = rng.random((3, 4, 16, 16)).astype(np.float32)
    write_volume(d / "in.zarr", "affinity", affs, channel_axis=True, levels=1,
                 attrs={"offsets": NEAREST})
    write_volume(d / "in.zarr", "labels", truth, label=True, levels=1)
    write_volume(d / "in.zarr", "seg", (np.arange(truth.size).reshape(truth.shape) // 40)
                 .astype(np.uint32), label=True, levels=1)
    write_volume(d / "in.zarr", "image", (rng.random((8, 32, 32)) * 255).astype(np.uint8),
                 voxel_size=(30, 6, 6), levels=1)
    write_volume(d / "in.zarr", "prob", rng.random((4, 16, 16)).astype(np.float32), levels=1)
    np.save(d / "affs.npy", affs)
    np.save(d / "img.npy", (rng.random((8, 32, 32)) * 255).astype(np.uint8))
    (d / "r.yaml").write_text(textwrap.dedent(RECIPE))
    recipe = Recipe.model_validate(yaml.safe_load(RECIPE))
    torch.manual_seed(0)
    model = models.build(recipe.model, head_channels=recipe.head_channels())
    torch.save({"model": model.state_dict(), "iteration": 1}, d / "c.pt")
    return d


@pytest.fixture(scope="module")
def finished(store, tmp_path_factory) -> Path:
    """A finished inference output (in the store's folder, so its tree is watched too)."""
    mp = pytest.MonkeyPatch()
    out = store / "done.zarr"
    mp.setattr(sys, "argv", ["emrun", "infer", "--input", f"{store}/in.zarr/image",
                             "--output", str(out), "--checkpoint", f"{store}/c.pt",
                             "--recipe", f"{store}/r.yaml", "--device", "cpu", "--levels", "1",
                             "--block", "4", "16", "16"])
    try:
        with pytest.raises(SystemExit) as done:
            main()
    finally:
        mp.undo()
    assert done.value.code in (0, None)
    assert (out / "aff" / "0").is_dir()
    return out


def _expand(args: list[str], store: Path, out: Path) -> list[str]:
    return [a.format(s=store, o=out) for a in args]


def assert_refused(args, says, store, out, capsys, monkeypatch) -> str:
    """`emrun ARGS` is a user's mistake: exit 2, one error line naming `says`, stdout empty,
    no traceback; nothing made under `out`, nothing changed under `store`."""
    before = tree(store)
    monkeypatch.chdir(out)  # a default output (runs/NAME, preview.png) would land here
    code, stdout, stderr = emrun(_expand(args, store, out), capsys, monkeypatch)
    assert code == 2, (args, code, stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr and "internal error" not in stderr
    assert stdout == "", stdout
    assert says in lines[0], (says, lines[0])
    assert list(out.iterdir()) == [], sorted(p.name for p in out.rglob("*"))
    assert tree(store) == before
    return lines[0]


SEG = ["segment", "{s}/in.zarr/affinity", "{o}/seg.zarr"]
NPY = ["segment", "{s}/affs.npy", "{o}/seg.zarr"]
SCALE = [*SEG, "--scheduler", "local", "--workers", "1", "--block", "2", "8", "8"]
TRUTH = ["--truth", "{s}/in.zarr/labels"]

SEGMENT_MISTAKES = {
    "sweep-without-truth": ([*SEG, "--sweep"], "--truth"),
    "truth-without-sweep": ([*SEG, *TRUTH], "--truth"),
    "connected-truth-without-sweep": ([*SEG, "--connected-truth"], "--connected-truth"),
    "sweep-with-scheduler": ([*SEG, "--sweep", *TRUTH, "--scheduler", "local"], "--scheduler"),
    "sweep-with-block": ([*SEG, "--sweep", *TRUTH, "--block", "2", "8", "8"], "--block"),
    "db-without-scheduler": ([*SEG, "--db", "sqlite:///{o}/g.db"], "--db"),
    "fragments-without-scheduler": ([*SEG, "--fragments", "mws"], "--fragments"),
    "default-fragments-without-scheduler": ([*SEG, "--fragments", "watershed"], "--fragments"),
    "agglomeration-without-scheduler": ([*SEG, "--agglomeration", "blockwise"],
                                        "--agglomeration"),
    "resume-without-scheduler": ([*SEG, "--resume"], "--resume"),
    "launch-without-scheduler": ([*SEG, "--launch", "srun"], "--launch"),
    "launch-with-local": ([*SEG, "--scheduler", "local", "--launch", "srun"], "--launch"),
    "launch-empty": ([*SEG, "--scheduler", "daisy", "--launch", ""], "--launch"),
    "workers-zero": ([*SEG, "--workers", "0"], "--workers"),
    "workers-negative-scheduler": ([*SEG, "--scheduler", "local", "--workers", "-1"],
                                   "--workers"),
    "workers-alone": ([*SEG, "--workers", "2"], "--workers"),
    "block-zero": ([*SEG, "--block", "0", "8", "8"], "--block"),
    "block-negative": ([*SEG, "--block", "-1", "8", "8"], "--block"),
    "block-zero-scheduler": ([*SEG, "--scheduler", "local", "--block", "2", "0", "8"],
                             "--block"),
    "waterz-with-block": ([*SEG, "--method", "waterz", "--threshold", "0.5", "--block", "2",
                           "8", "8"], "--block"),
    "threshold-with-mws": ([*SEG, "--method", "mws", "--threshold", "0.5"], "--threshold"),
    "bias-with-waterz": ([*SEG, "--method", "waterz", "--bias", "0.5"], "--bias"),
    "bias-with-cc": ([*SEG, "--method", "cc", "--bias", "0.5"], "--bias"),
    "bias-with-scheduler": ([*SCALE, "--bias", "0.3"], "--bias"),
    "threshold-not-a-number": ([*SEG, "--method", "cc", "--threshold", "abc"], "--threshold"),
    "threshold-nan": ([*SEG, "--method", "cc", "--threshold", "nan"], "threshold"),
    "threshold-above-one": ([*SEG, "--method", "cc", "--threshold", "1.5"], "threshold"),
    "threshold-zero-cc": ([*SEG, "--method", "cc", "--threshold", "0"], "threshold"),
    "bias-negative": ([*SEG, "--method", "mws", "--bias", "-3"], "bias"),
    "scheduler-threshold-negative": ([*SCALE, "--threshold", "-0.5"], "threshold"),
    "scheduler-values-same-name": ([*SCALE, "--threshold", "0.5,0.5000001"], "same output"),
    "offsets-garbage": ([*NPY, "--offsets", "garbage"], "--offsets"),
    "offsets-two-numbers": ([*NPY, "--offsets", "-1,0 0,-1,0 0,0,-1"], "--offsets"),
    "offsets-empty": ([*NPY, "--offsets", "[]"], "--offsets"),
    "offsets-fraction": ([*NPY, "--offsets", "[[-1,0,0],[0,-1,0],[0,0,-1.5]]"], "--offsets"),
    "offsets-self": ([*NPY, "--offsets", "[[0,0,0],[0,-1,0],[0,0,-1]]"], "--offsets"),
    "offsets-too-few": ([*NPY, "--offsets", "[[-1,0,0],[0,-1,0]]"], "offsets"),
    "offsets-no-nearest-x": ([*NPY, "--offsets", "[[-1,0,0],[0,-1,0],[0,0,-2]]"],
                             "nearest-neighbour"),
    "offsets-missing": ([*NPY, "--method", "cc"], "--offsets"),
    "level-unknown": ([*SEG, "--level", "7"], "level 7"),
    "level-of-a-npy": ([*NPY, "--offsets", OFFS, "--level", "0"], "--level 0"),
    "levels-zero": ([*SEG, "--levels", "0"], "--levels"),
    "levels-negative": ([*SEG, "--levels", "-1"], "--levels"),
    "levels-too-many": ([*SEG, "--method", "cc", "--levels", "9"], "--levels"),
    "levels-zero-scheduler": ([*SCALE, "--levels", "0"], "--levels"),
    "name-slash": ([*SEG, "--name", "a/b"], "--name"),
    "name-empty": ([*SEG, "--name", ""], "--name"),
    "name-dotdot": ([*SEG, "--name", ".."], "--name"),
    "name-hidden": ([*SEG, "--name", ".emrun-segment"], "--name"),
    "name-space": ([*SEG, "--name", "seg men"], "--name"),
    "name-zarr-own": ([*SEG, "--name", "zarr.json"], "zarr.json"),
    "name-slash-scheduler": ([*SCALE, "--name", "a/b"], "--name"),
    "method-unknown": ([*SEG, "--method", "foo"], "--method"),
    "min-size-negative": ([*SEG, "--min-size", "-1"], "--min-size"),
    "scheduler-unknown": ([*SEG, "--scheduler", "slurm"], "--scheduler"),
    "scheduler-fragments-unknown": ([*SCALE, "--fragments", "foo"], "--fragments"),
    "scheduler-agglomeration-unknown": ([*SCALE, "--agglomeration", "foo"], "--agglomeration"),
    "scheduler-with-mws": ([*SCALE, "--method", "mws"], "--scheduler"),
    "scheduler-with-cc": ([*SCALE, "--method", "cc"], "--scheduler"),
    "scheduler-memory-db": ([*SCALE, "--db", "sqlite://"], "--db"),
    "scheduler-resume-nothing": ([*SCALE, "--resume"], "--resume"),
    "output-inside-input-volume": (["segment", "{s}/in.zarr/affinity",
                                    "{s}/in.zarr/affinity/o.zarr"], "inside"),
    "output-not-zarr": (["segment", "{s}/in.zarr/affinity", "{o}/seg"], ".zarr"),
    "truth-missing": ([*SEG, "--sweep", "--truth", "{s}/none.zarr/labels"], "none.zarr"),
    "mask-missing": ([*SEG, "--mask", "{s}/none.zarr/m"], "none.zarr"),
    "json-still-one-line": ([*SEG, "--json", "--levels", "0"], "--levels"),
}


@pytest.mark.parametrize(("args", "says"), SEGMENT_MISTAKES.values(),
                         ids=SEGMENT_MISTAKES.keys())
def test_segment_mistakes_are_one_line_exit_2_and_nothing_written(store, tmp_path, capsys,
                                                                  monkeypatch, args, says):
    assert_refused(args, says, store, tmp_path, capsys, monkeypatch)


INFER = ["infer", "--input", "{s}/in.zarr/image", "--output", "{o}/pred.zarr",
         "--checkpoint", "{s}/c.pt", "--recipe", "{s}/r.yaml", "--device", "cpu"]
RESUME = ["infer", "--input", "{s}/in.zarr/image", "--output", "{s}/done.zarr",
          "--checkpoint", "{s}/c.pt", "--recipe", "{s}/r.yaml", "--device", "cpu",
          "--levels", "1", "--block", "4", "16", "16", "--resume"]

INFER_MISTAKES = {
    "launch-without-daisy": ([*INFER, "--launch", "srun"], "--launch"),
    "launch-empty": ([*INFER, "--scheduler", "daisy", "--launch", ""], "--launch"),
    "tta-3": ([*INFER, "--tta", "3"], "--tta"),
    "tta-0": ([*INFER, "--tta", "0"], "--tta"),
    "tta-override-3": ([*INFER, "-o", "infer.tta=3"], "infer.tta"),
    "roi-two-axes": ([*INFER, "--roi", "0,0/4,8,8"], "--roi"),
    "roi-words": ([*INFER, "--roi", "abc"], "--roi"),
    "roi-three-parts": ([*INFER, "--roi", "0,0,0/4,8,8/1"], "--roi"),
    "roi-outside": ([*INFER, "--roi", "0,0,0/100,8,8"], "--roi"),
    "roi-negative": ([*INFER, "--roi", "-1,0,0/4,8,8"], "--roi"),
    "roi-empty": ([*INFER, "--roi", "0,0,0/0,8,8"], "--roi"),
    "block-below-stride": ([*INFER, "--block", "1", "1", "1"], "--block"),
    "block-zero": ([*INFER, "--block", "0", "16", "16"], "--block"),
    "block-negative": ([*INFER, "--block", "-4", "16", "16"], "--block"),
    "level-of-single-scale": ([*INFER, "--level", "1"], "level 1"),
    "level-of-a-npy": (["infer", "--input", "{s}/img.npy", "--output", "{o}/pred.zarr",
                        "--checkpoint", "{s}/c.pt", "--recipe", "{s}/r.yaml", "--level", "1"],
                       "--level 1"),
    "levels-zero": ([*INFER, "--levels", "0"], "--levels"),
    "levels-too-many": ([*INFER, "--levels", "99"], "--levels"),
    "workers-zero": ([*INFER, "--workers", "0"], "--workers"),
    "workers-negative": ([*INFER, "--workers", "-2"], "--workers"),
    "scheduler-unknown": ([*INFER, "--scheduler", "slurm"], "--scheduler"),
    "checkpoint-and-model": ([*INFER, "--model", "{s}/c.pt"], "--model"),
    "no-network": (["infer", "--input", "{s}/in.zarr/image", "--output", "{o}/pred.zarr"],
                   "--checkpoint"),
    "output-is-input-store": (["infer", "--input", "{s}/in.zarr/image", "--output",
                               "{s}/in.zarr", "--checkpoint", "{s}/c.pt", "--recipe",
                               "{s}/r.yaml"], "--output"),
    "output-inside-input-store": (["infer", "--input", "{s}/in.zarr/image", "--output",
                                   "{s}/in.zarr/p.zarr", "--checkpoint", "{s}/c.pt",
                                   "--recipe", "{s}/r.yaml"], "--output"),
    "output-not-zarr": (["infer", "--input", "{s}/in.zarr/image", "--output", "{o}/pred",
                         "--checkpoint", "{s}/c.pt", "--recipe", "{s}/r.yaml", "--device",
                         "cpu"], ".zarr"),
    "device-unknown": ([*INFER, "--device", "tpu"], "--device"),
    "device-malformed": ([*INFER, "--device", "cuda:x"], "--device"),
    "resume-nothing": ([*INFER, "--resume"], "--resume"),
    "mask-missing": ([*INFER, "--mask", "{s}/none.zarr/m"], "none.zarr"),
    "mask-other-shape": ([*INFER, "--mask", "{s}/in.zarr/labels"], "mask shape"),
    "existing-output-without-resume": ([*RESUME[:-1]], "--resume"),
    "resume-other-tta": ([*RESUME, "--tta", "2"], "--tta"),
    "resume-other-roi": ([*RESUME, "--roi", "0,0,0/4,8,8"], "--roi"),
    "resume-other-mask": ([*RESUME, "--mask", "{s}/in.zarr/image"], "--mask"),
    "resume-other-block": ([*RESUME[:-4], "8", "16", "16", "--resume"], "layout"),
}


@pytest.mark.parametrize(("args", "says"), INFER_MISTAKES.values(), ids=INFER_MISTAKES.keys())
def test_infer_mistakes_are_one_line_exit_2_and_nothing_written(store, finished, tmp_path,
                                                                capsys, monkeypatch, args,
                                                                says):
    assert_refused(args, says, store, tmp_path, capsys, monkeypatch)


EVAL = ["evaluate", "{s}/in.zarr/seg", "{s}/in.zarr/labels/labels"]
BINARY = ["evaluate", "{s}/in.zarr/prob", "{s}/in.zarr/labels/labels", "--binary"]
EVALUATE_MISTAKES = {
    "binary-with-connected-truth": ([*BINARY, "--connected-truth"], "--connected-truth"),
    "threshold-without-binary": ([*EVAL, "--threshold", "0.5"], "--threshold"),
    "min-overlap-negative": ([*EVAL, "--min-overlap", "-1"], "--min-overlap"),
    "min-overlap-zero": ([*EVAL, "--min-overlap", "0"], "--min-overlap"),
    "min-overlap-with-binary": ([*BINARY, "--min-overlap", "5"], "--min-overlap"),
    "threshold-above-one": ([*BINARY, "--threshold", "1.5"], "--threshold"),
    "threshold-nan": ([*BINARY, "--threshold", "nan"], "--threshold"),
    "threshold-negative": ([*BINARY, "--threshold", "-0.1"], "--threshold"),
    "threshold-on-ids": (["evaluate", "{s}/in.zarr/seg", "{s}/in.zarr/labels/labels",
                          "--binary", "--threshold", "0.3"], "--threshold"),
    "block-zero-local": ([*EVAL, "--block", "0", "8", "8", "--scheduler", "local"], "--block"),
    "block-negative": ([*EVAL, "--block", "-2", "8", "8"], "--block"),
    "workers-zero": ([*EVAL, "--workers", "0", "--work-dir", "{o}/wd"], "--workers"),
    "workers-negative": ([*EVAL, "--workers", "-1"], "--workers"),
    "scheduler-unknown": ([*EVAL, "--scheduler", "slurm", "--work-dir", "{o}/wd"],
                          "--scheduler"),
    "launch-without-scheduler": ([*EVAL, "--launch", "srun"], "--launch"),
    "launch-with-local": ([*EVAL, "--scheduler", "local", "--launch", "srun"], "--launch"),
    "launch-empty": ([*EVAL, "--scheduler", "daisy", "--launch", ""], "--launch"),
    "mask-missing": ([*EVAL, "--mask", "{s}/none.zarr/m"], "none.zarr"),
    "mask-with-channels": ([*EVAL, "--mask", "{s}/in.zarr/affinity", "--work-dir", "{o}/wd",
                            "--block", "2", "8", "8"], "mask"),
    "json-still-one-line": ([*EVAL, "--json", "--threshold", "0.5"], "--threshold"),
}


@pytest.mark.parametrize(("args", "says"), EVALUATE_MISTAKES.values(),
                         ids=EVALUATE_MISTAKES.keys())
def test_evaluate_mistakes_are_one_line_exit_2_and_nothing_written(store, tmp_path, capsys,
                                                                   monkeypatch, args, says):
    assert_refused(args, says, store, tmp_path, capsys, monkeypatch)


CONVERT = ["data", "convert", "{s}/img.npy", "{o}/c.zarr"]
SYNTH = ["data", "synth", "{o}/y.zarr", "--shape", "8", "32", "32"]
DATA_MISTAKES = {
    "convert-chunks-zero": ([*CONVERT, "--chunks", "0", "8", "8"], "chunks"),
    "convert-chunks-negative": ([*CONVERT, "--chunks", "-1", "8", "8"], "chunks"),
    "convert-levels-zero": ([*CONVERT, "--levels", "0"], "--levels"),
    "convert-levels-negative": ([*CONVERT, "--levels", "-1"], "--levels"),
    "convert-levels-too-many": ([*CONVERT, "--levels", "99"], "--levels"),
    "convert-voxel-zero": ([*CONVERT, "--voxel-size", "0", "6", "6"], "--voxel-size"),
    "convert-voxel-negative": ([*CONVERT, "--voxel-size", "-1", "6", "6"], "--voxel-size"),
    "convert-voxel-nan": ([*CONVERT, "--voxel-size", "nan", "6", "6"], "--voxel-size"),
    "convert-voxel-inf": ([*CONVERT, "--voxel-size", "inf", "6", "6"], "--voxel-size"),
    "convert-voxel-metres": ([*CONVERT, "--voxel-size", "4e-9", "6", "6"], "--voxel-size"),
    "convert-level-of-a-npy": ([*CONVERT, "--level", "1"], "--level 1"),
    "convert-name-slash": ([*CONVERT, "--name", "a/b"], "a/b"),
    "convert-name-empty": ([*CONVERT, "--name", ""], "''"),
    "convert-name-hidden": ([*CONVERT, "--name", ".hidden"], ".hidden"),
    "convert-image-named-labels": ([*CONVERT, "--name", "labels", "--image"], "labels"),
    "convert-suffix-only": (["data", "convert", "{s}/img.npy", "{o}/.zarr"], "hidden"),
    "convert-not-zarr": (["data", "convert", "{s}/img.npy", "{o}/c"], ".zarr"),
    "convert-inside-a-volume": (["data", "convert", "{s}/img.npy",
                                 "{s}/in.zarr/image/c.zarr"], "inside"),
    "convert-name-taken": (["data", "convert", "{s}/img.npy", "{s}/in.zarr"], "--overwrite"),
    "synth-shape-zero": (["data", "synth", "{o}/y.zarr", "--shape", "0", "32", "32"],
                         "--shape"),
    "synth-shape-negative": (["data", "synth", "{o}/y.zarr", "--shape", "-4", "32", "32"],
                             "--shape"),
    "synth-levels-zero": ([*SYNTH, "--levels", "0"], "--levels"),
    "synth-levels-too-many": ([*SYNTH, "--levels", "99"], "--levels"),
    "synth-voxel-zero": ([*SYNTH, "--voxel-size", "0", "6", "6"], "--voxel-size"),
    "synth-voxel-nan": ([*SYNTH, "--voxel-size", "nan", "6", "6"], "--voxel-size"),
    "synth-voxel-anisotropic": ([*SYNTH, "--voxel-size", "2000", "1", "1"], "--voxel-size"),
    "synth-seed-negative": ([*SYNTH, "--seed", "-1"], "--seed"),
    "synth-suffix-only": (["data", "synth", "{o}/.zarr", "--shape", "8", "32", "32"],
                          "hidden"),
    "synth-not-zarr": (["data", "synth", "{o}/y", "--shape", "8", "32", "32"], ".zarr"),
    "synth-inside-a-volume": (["data", "synth", "{s}/in.zarr/image/y.zarr", "--shape", "8",
                               "32", "32"], "inside"),
    "preview-n-zero": (["data", "preview", "{s}/r.yaml", "--n", "0", "--out", "{o}/p.png"],
                       "--n"),
    "preview-not-png": (["data", "preview", "{s}/r.yaml", "--synthetic", "--out",
                         "{o}/p.jpg"], "--out"),
}


@pytest.mark.parametrize(("args", "says"), DATA_MISTAKES.values(), ids=DATA_MISTAKES.keys())
def test_data_mistakes_are_one_line_exit_2_and_nothing_written(store, tmp_path, capsys,
                                                               monkeypatch, args, says):
    assert_refused(args, says, store, tmp_path, capsys, monkeypatch)


TRAIN = ["train", "{s}/r.yaml", "--run-dir", "{o}/run"]
OTHER_MISTAKES = {
    "train-resume-with-init-from": ([*TRAIN, "--resume", "--init-from", "{s}/c.pt"],
                                    "--init-from"),
    "train-gpus-zero": ([*TRAIN, "--gpus", "0"], "--gpus"),
    "train-gpus-negative": ([*TRAIN, "--gpus", "-1"], "--gpus"),
    "train-resume-nothing": ([*TRAIN, "--resume"], "--resume"),
    "train-device-unknown": ([*TRAIN, "--device", "tpu"], "--device"),
    "train-init-from-missing": ([*TRAIN, "--init-from", "{s}/none.pt"], "--init-from"),
    "train-init-from-not-a-checkpoint": ([*TRAIN, "--init-from", "{s}/r.yaml"], "r.yaml"),
    "train-run-dir-is-a-file": (["train", "{s}/r.yaml", "--run-dir", "{s}/img.npy"],
                                "--run-dir"),
    "train-override-out-of-range": ([*TRAIN, "-o", "train.iterations=0"], "train.iterations"),
    "train-override-malformed": ([*TRAIN, "-o", "bogus"], "-o bogus"),
    "export-format-unknown": (["export", "{s}/c.pt", "{o}/e.emrun", "--format", "bogus"],
                              "--format"),
    "export-suffix-against-format": (["export", "{s}/c.pt", "{o}/e.onnx", "--format",
                                      "emrun"], "--format"),
    "bench-segment-block-zero": (["bench", "segment", "--block", "0", "32", "32", "--folder",
                                  "{o}/b"], "--block"),
    "bench-segment-agglomeration": (["bench", "segment", "--agglomeration", "foo",
                                     "--folder", "{o}/b"], "--agglomeration"),
    "bench-segment-workers-zero": (["bench", "segment", "--workers", "0", "--folder",
                                    "{o}/b"], "--workers"),
    "bench-segment-threshold-nan": (["bench", "segment", "--threshold", "nan", "--folder",
                                     "{o}/b"], "--threshold"),
    "bench-infer-workers-zero": (["bench", "infer", "{s}/r.yaml", "--device", "cpu",
                                  "--no-model", "--workers", "0"], "--workers"),
    "bench-infer-block-zero": (["bench", "infer", "{s}/r.yaml", "--device", "cpu",
                                "--no-model", "--block", "0", "32", "32"], "--block"),
    "bench-infer-configs-without-model": (["bench", "infer", "{s}/r.yaml", "--device", "cpu",
                                           "--no-model", "--configs"], "--configs"),
    "bench-infer-compile-without-configs": (["bench", "infer", "{s}/r.yaml", "--device",
                                             "cpu", "--compile"], "--configs"),
    "bench-codecs-chunks-zero": (["bench", "codecs", "{s}/img.npy", "--chunks", "0,16,16",
                                  "--workdir", "{o}/w"], "--chunks"),
    "bench-codecs-codec-unknown": (["bench", "codecs", "{s}/img.npy", "--codec", "bogus",
                                    "--workdir", "{o}/w"], "bogus"),
    "bench-codecs-max-mb-inf": (["bench", "codecs", "{s}/img.npy", "--max-mb", "inf",
                                 "--workdir", "{o}/w"], "--max-mb"),
    "bench-data-workers-negative": (["bench", "data", "{s}/r.yaml", "--synthetic",
                                     "--workers", "-1"], "--workers"),
    "bench-train-steps-zero": (["bench", "train", "{s}/r.yaml", "--steps", "0"], "--steps"),
    "bench-snemi3d-iterations-zero": (["bench", "snemi3d", "--iterations", "0", "--out",
                                       "{o}/sn"], "--iterations"),
    "bench-snemi3d-final-without-results": (["bench", "snemi3d", "--final", "--out",
                                             "{o}/sn"], "--final"),
    "view-port-out-of-range": (["view", "{s}/in.zarr/image", "--port", "70000"], "--port"),
}


@pytest.mark.parametrize(("args", "says"), OTHER_MISTAKES.values(), ids=OTHER_MISTAKES.keys())
def test_other_mistakes_are_one_line_exit_2_and_nothing_written(store, tmp_path, capsys,
                                                                monkeypatch, args, says):
    assert_refused(args, says, store, tmp_path, capsys, monkeypatch)


# ------------------------------------------------ controls: valid neighbours are accepted

ACCEPTED = {
    "segment-offsets-given": ([*NPY, "--offsets", OFFS, "--method", "cc", "--levels", "1"],
                              "seg.zarr/labels/segmentation"),
    "segment-sweep-connected-truth-workers": (
        [*NPY, "--offsets", OFFS, "--method", "cc", "--threshold", "0.3,0.7", "--sweep",
         *TRUTH, "--connected-truth", "--workers", "1", "--levels", "1"],
        "seg.zarr/labels/segmentation"),
    "segment-cc-block-min-size": ([*SEG, "--method", "cc", "--block", "2", "8", "8",
                                   "--min-size", "3", "--levels", "1"],
                                  "seg.zarr/labels/segmentation"),
    "segment-two-values-named": ([*SEG, "--method", "cc", "--threshold", "0.3,0.5", "--name",
                                  "x", "--levels", "1"], "seg.zarr/labels/x_0.5"),
    "evaluate-block-alone-scores-in-blocks": ([*EVAL, "--block", "2", "8", "8", "--work-dir",
                                               "{o}/wd", "--json"], None),
}


@pytest.mark.parametrize(("args", "made"), ACCEPTED.values(), ids=ACCEPTED.keys())
def test_valid_neighbours_of_the_mistakes_are_accepted(store, tmp_path, capsys, monkeypatch,
                                                       args, made):
    """The harness sees a write: the valid combination next to the refused ones exits 0,
    with no error line, and makes what it says."""
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = emrun(_expand(args, store, tmp_path), capsys, monkeypatch)
    assert code == 0, stderr
    assert "error:" not in stderr and "Traceback" not in stderr
    if made is not None:
        assert (tmp_path / made / "0").is_dir()
    else:
        assert json.loads(stdout)["arand"] == pytest.approx(0.8699297530024926)


# ------------------------------------------------------------------------------ bugs

def test_scheduler_name_fragments_is_refused_or_written(store, tmp_path, capsys, monkeypatch):
    """OUT/labels/fragments is where the graph pipeline keeps its fragments; a segmentation
    asked for under that name must be refused (naming --name, nothing written) or written
    for real (segments > 0), never reported as written with 0 segments."""
    args = [*SCALE, "--levels", "1", "--threshold", "0.5", "--name", "fragments", "--json"]
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = emrun(_expand(args, store, tmp_path), capsys, monkeypatch)
    if code == 2:
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and "--name" in lines[0] and stdout == ""
        assert list(tmp_path.iterdir()) == []
        return
    assert code == 0, stderr
    outputs = json.loads(stdout)["outputs"]
    assert outputs and all(item["segments"] > 0 for item in outputs), outputs


SUFFIX_ONLY = {
    "segment": ["segment", "{s}/in.zarr/affinity", "{o}/.zarr", "--method", "cc",
                "--levels", "1"],
    "infer": ["infer", "--input", "{s}/in.zarr/image", "--output", "{o}/.zarr",
              "--checkpoint", "{s}/c.pt", "--recipe", "{s}/r.yaml", "--device", "cpu",
              "--levels", "1"],
}


@pytest.mark.parametrize("args", SUFFIX_ONLY.values(), ids=SUFFIX_ONLY.keys())
def test_an_output_named_only_by_its_suffix_is_refused(store, tmp_path, capsys, monkeypatch,
                                                       args):
    assert_refused(args, "hidden", store, tmp_path, capsys, monkeypatch)
