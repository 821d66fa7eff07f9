"""emrun's large-volume chains as a lab runs them on a cluster (infer -> segment at scale ->
evaluate, on local or daisy workers, with pyramids, masks, ROIs, interruptions and resumes):
the stages agree on where every voxel lies and on every number, and a restart neither loses
nor redoes work. Small synthetic volumes made in code, a few blocks each."""

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
import torch
import yaml
import zarr
from test_segment import affinities, cells, noisy
from test_segment_scale import postgres_url  # noqa: F401  (a fixture: a throwaway server)
from typer.testing import CliRunner

from emrun.cli import app
from emrun.infer.run import run_inference
from emrun.io import VolumeError, open_volume, write_volume
from emrun.io.pyramid import downsample
from emrun.recipe import Recipe
from emrun.registry import models

runner = CliRunner()
NEAREST = ((-1, 0, 0), (0, -1, 0), (0, 0, -1))
SHAPE = (8, 48, 48)
VOXEL = (30.0, 6.0, 6.0)
BLOCK = ("--block", "4", "24", "24")


def emrun(*args: object) -> str:
    """Run one emrun command in this process; its standard output (it must succeed)."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (args, result.output)
    return result.stdout


def scores(seg: object, truth: object, *extra: object) -> dict:
    """`emrun evaluate --json`'s figures, without the names of the volumes."""
    got = json.loads(emrun("evaluate", seg, truth, "--json", *extra).strip().splitlines()[-1])
    return {k: v for k, v in got.items() if k not in ("seg", "truth", "mask")}


def error_line(output: str) -> str:
    """The one `error:` line of a refused command's output (warnings may come before)."""
    (line,) = [line for line in output.splitlines() if line.startswith("error:")]
    return line


def level(store: Path, name: str, at: int = 0) -> np.ndarray:
    """Level ``at`` of the label volume ``name`` of an output store."""
    return zarr.open_array(str(store / "labels" / name / str(at)), mode="r")[...]


def placements(group: Path) -> list[tuple[list[float], list[float]]]:
    """Each level's spatial (scale, translation) in nm, as the OME metadata states them."""
    datasets = zarr.open_group(str(group), mode="r").attrs["ome"]["multiscales"][0]["datasets"]
    return [tuple(t["scale" if t["type"] == "scale" else "translation"][-3:]  # type: ignore
                  for t in d["coordinateTransformations"]) for d in datasets]


def segment_scaled(affs: Path, out: Path, *extra: object, workers: int = 2) -> list[str]:
    """`emrun segment` at scale on local workers, as a subprocess command line."""
    return [sys.executable, "-m", "emrun", "segment", str(affs), str(out), "--scheduler",
            "local", "--workers", str(workers), *BLOCK, "--levels", "1", *map(str, extra)]


def segment_here(affs: Path, out: Path, *extra: object) -> str:
    """`segment_scaled`'s command run in this process on one worker (no worker processes to
    start: the steps, blocks and results are the same); its standard output."""
    return emrun(*segment_scaled(affs, out, *extra, workers=1)[3:])


def invoke_here(affs: Path, out: Path, *extra: object) -> object:
    """As `segment_here`, for a command that may be refused: the CliRunner's result."""
    return runner.invoke(app, segment_scaled(affs, out, *extra, workers=1)[3:])


@pytest.fixture(scope="module")
def cells_store(tmp_path_factory) -> Path:
    """Noisy uint8 nearest-neighbour affinities of 12 cells (8 blocks of 4 x 24 x 24) and
    the cells, placed at an offset, at an anisotropic voxel size."""
    tmp = tmp_path_factory.mktemp("cells")
    truth = cells(SHAPE, n=12, seed=3)
    affs = noisy(affinities(truth, NEAREST), 0.15, seed=1)
    place = {"voxel_size": VOXEL, "offset": (1, 3, 5)}
    write_volume(tmp / "in.zarr", "affinity", np.round(affs * 255).astype(np.uint8),
                 channel_axis=True, attrs={"offsets": [list(o) for o in NEAREST]}, **place)
    write_volume(tmp / "in.zarr", "truth", truth.astype(np.uint64), **place)
    return tmp


@pytest.fixture(scope="module")
def straight(cells_store) -> Path:
    """The uninterrupted scaled segmentation at thresholds 0.2 and 0.5."""
    out = cells_store / "straight.zarr"
    segment_here(cells_store / "in.zarr/affinity", out, "--threshold", "0.2,0.5")
    return out


# ------------------------------------------------------ several thresholds, one graph

def test_thresholds_together_at_scale_are_each_threshold_alone_and_score_alike(cells_store):
    """`--threshold 0.2,0.5,0.8 --min-size 20` on the blockwise agglomeration: each volume
    is, bit for bit (ids too), what a run at that threshold alone writes, and blockwise
    evaluate on two workers with odd blocks scores it as the streamed evaluate scores the
    lone run's."""
    affs = cells_store / "in.zarr/affinity"
    common = ("--min-size", "20", "--agglomeration", "blockwise")
    together = cells_store / "together.zarr"
    segment_here(affs, together, "--threshold", "0.2,0.5,0.8", *common)
    for t in ("0.2", "0.8"):
        alone = cells_store / f"alone-{t}.zarr"
        segment_here(affs, alone, "--threshold", t, *common)
        assert np.array_equal(level(together, f"segmentation_{t}"),
                              level(alone, "segmentation")), t
    counts = [np.unique(level(together, f"segmentation_{t}")).size for t in ("0.2", "0.5",
                                                                                "0.8")]
    assert counts[0] > counts[1] > counts[2]
    blockwise = scores(together / "labels/segmentation_0.2", cells_store / "in.zarr/truth",
                       "--workers", "2", "--block", "3", "17", "19", "--connected-truth")
    streamed = scores(cells_store / "alone-0.2.zarr/labels/segmentation",
                      cells_store / "in.zarr/truth", "--connected-truth")
    assert blockwise == streamed and streamed["voxels"] > 0


# ------------------------------------------------------------ interruptions and resumes

def _stop_at_relabel(out: Path, cells_store: Path, thresholds: list[float]) -> None:
    """A scaled segmentation stopped in its relabelling (a time limit's way: every earlier
    step done, one block relabelled)."""
    from emrun.segment.job import run_segment
    from emrun.segment.request import SegmentRequest

    class Stop(Exception):
        pass

    def stop(step: str, done: int, total: int) -> None:
        if step == "relabel" and done == 1:
            raise Stop

    request = SegmentRequest(affinities=str(cells_store / "in.zarr/affinity"), output=out,
                             values={"threshold": thresholds}, block=(4, 24, 24),
                             scheduler="local", workers=1, levels=1)
    with pytest.raises(Stop):
        run_segment(request, on_block=stop)


def test_a_plain_resume_finishes_the_thresholds_the_job_started(cells_store, straight):
    """The unfinished volumes say 'run it again with --resume'; doing just that (a SLURM
    requeue repeats the command's options, a user retyping it may not) must finish them,
    bit for bit, not start another agglomeration beside them."""
    out = cells_store / "plain-resume.zarr"
    _stop_at_relabel(out, cells_store, [0.2, 0.5])
    with pytest.raises(VolumeError, match="run it again with --resume"):
        open_volume(str(out / "labels/segmentation_0.2"))
    result = invoke_here(cells_store / "in.zarr/affinity", out, "--resume")
    assert result.exit_code == 0, result.output
    assert not (out / "labels/segmentation").exists(), "a volume nobody asked for"
    for name in ("segmentation_0.2", "segmentation_0.5"):
        assert np.array_equal(open_volume(str(out / "labels" / name)).read(),
                              level(straight, name)), name


def test_a_resume_with_other_thresholds_says_how_to_finish_the_started_ones(cells_store):
    """A resume with other values makes what it says and names the volumes it leaves
    unfinished with the options that finish them; those options do."""
    out = cells_store / "other-resume.zarr"
    _stop_at_relabel(out, cells_store, [0.2, 0.5])
    result = invoke_here(cells_store / "in.zarr/affinity", out, "--threshold", "0.8",
                         "--name", "more", "--resume")
    assert result.exit_code == 0, result.output
    said = " ".join(result.stderr.split())
    assert "segmentation_0.2 (--resume --threshold 0.2,0.5 --min-size 0)" in said, said
    segment_here(cells_store / "in.zarr/affinity", out, "--resume", "--threshold", "0.2,0.5",
                 "--min-size", "0")
    open_volume(str(out / "labels/segmentation_0.2"))  # finished now


def test_a_resume_adding_a_threshold_keeps_the_one_it_shares(cells_store):
    out = cells_store / "extended.zarr"
    segment_here(cells_store / "in.zarr/affinity", out, "--threshold", "0.2,0.5")
    kept = level(out, "segmentation_0.5")
    result = invoke_here(cells_store / "in.zarr/affinity", out, "--threshold", "0.5,0.8",
                         "--resume")
    assert result.exit_code == 0, result.output
    assert "graph: 0 of 8 blocks to do" in result.output
    assert np.array_equal(level(out, "segmentation_0.5"), kept)
    alone = cells_store / "plain-0.8.zarr"  # alone-0.8.zarr: min size 20, blockwise
    if not alone.exists():
        segment_here(cells_store / "in.zarr/affinity", alone, "--threshold", "0.8")
    assert np.array_equal(level(out, "segmentation_0.8"), level(alone, "segmentation"))


def test_a_moved_output_resumes_on_the_graph_it_carries(cells_store, tmp_path):
    first = tmp_path / "scratch.zarr"
    segment_here(cells_store / "in.zarr/affinity", first, "--threshold", "0.5")
    moved = tmp_path / "project" / "seg.zarr"
    moved.parent.mkdir()
    first.rename(moved)
    result = invoke_here(cells_store / "in.zarr/affinity", moved, "--threshold", "0.8",
                         "--name", "more", "--resume")
    assert result.exit_code == 0, result.output
    assert "graph: 0 of 8 blocks to do" in result.output
    assert not first.exists(), "nothing may be written at the old place"
    alone = tmp_path / "alone.zarr"
    segment_here(cells_store / "in.zarr/affinity", alone, "--threshold", "0.8")
    assert np.array_equal(level(moved, "more"), level(alone, "segmentation"))


SLOW = """\
import os, time
if os.environ.get("EMRUN_PROBE_SLOW"):
    from emrun.segment.scale import steps as _steps
    _real = _steps._fragments

    def _fragments(job, index):
        time.sleep(float(os.environ["EMRUN_PROBE_SLOW"]))  # a long block
        return _real(job, index)

    _steps._fragments = _fragments
"""


def _slow_blocks(tmp: Path, seconds: float) -> dict[str, str]:
    """An environment whose Python processes take ``seconds`` more for each fragments
    block (a sitecustomize module on their PYTHONPATH): workers are caught mid-step."""
    folder = tmp / "slow"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(textwrap.dedent(SLOW))
    path = os.pathsep.join([str(folder), str(Path(__file__).parent),
                            os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "EMRUN_PROBE_SLOW": str(seconds)}


def _fragment_markers(out: Path) -> int:
    folder = out / ".emrun-segment" / "fragments"
    return len(list(folder.glob("*_*_*"))) if folder.is_dir() else 0


def _sigterm_after_two_blocks(command: list[str], out: Path, env: dict[str, str]
                              ) -> tuple[int, str]:
    """Run ``command``; SIGTERM it (a time limit, `scancel`) once two fragments blocks are
    done; its exit code and standard error."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None and \
            _fragment_markers(out) < 2:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    return process.returncode, stderr


@pytest.mark.slow
def test_sigterm_stops_scaled_daisy_workers_between_blocks_and_says_so(cells_store, tmp_path):
    pytest.importorskip("daisy")
    out = tmp_path / "daisy.zarr"
    command = segment_scaled(cells_store / "in.zarr/affinity", out, "--threshold", "0.5")
    command[command.index("local")] = "daisy"
    code, stderr = _sigterm_after_two_blocks(command, out, _slow_blocks(tmp_path, 1.0))
    left = _fragment_markers(out)
    time.sleep(2.5)
    assert _fragment_markers(out) == left, "blocks written after the scheduler had exited"
    assert code == 143, stderr
    assert "SIGTERM" in stderr and "--resume" in stderr


def test_sigterm_to_a_local_scaled_segment_says_how_to_go_on(cells_store, tmp_path):
    out = tmp_path / "local.zarr"
    command = segment_scaled(cells_store / "in.zarr/affinity", out, "--threshold", "0.5")
    code, stderr = _sigterm_after_two_blocks(command, out, _slow_blocks(tmp_path, 0.5))
    assert code == 143, stderr
    assert "SIGTERM" in stderr and "--resume" in stderr


# ------------------------------------------------------------ inference into the chain

RECIPE = {
    "name": "probe", "data": {"sources": {"a": {"type": "synthetic", "shape": [16, 64, 64]}}},
    "model": {"type": "rsunet", "widths": [4, 8]},
    "tasks": {"affinity": {"target": {"type": "affinity"}}},
    "segment": {"type": "waterz", "thresholds": [0.5]},
    "train": {"patch": [4, 16, 16], "iterations": 1},
    "infer": {"precision": "fp32", "batch_size": 4},
}


@pytest.fixture(scope="module")
def network(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A recipe file (its segmenter: waterz), a checkpoint of lively random weights, and
    an EM-like image with its cells: each a pyramid of three levels at an odd offset, so
    that every coarser level lies half a finer voxel further on."""
    from emrun.synth import synthesize

    tmp = tmp_path_factory.mktemp("network")
    recipe = Recipe.model_validate(RECIPE)
    (tmp / "r.yaml").write_text(yaml.safe_dump(recipe.resolved()))
    torch.manual_seed(0)
    model = models.build(recipe.model, head_channels=recipe.head_channels())
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    torch.save({"model": model.state_dict(), "iteration": 1}, tmp / "c.pt")
    volume = synthesize((8, 48, 48), 3)
    place = {"voxel_size": VOXEL, "offset": (2, 5, 7), "levels": 3}
    write_volume(tmp / "v.zarr", "image", volume.image, **place)
    write_volume(tmp / "v.zarr", "labels", volume.labels, **place)
    return tmp / "r.yaml", tmp / "c.pt", tmp / "v.zarr"


def infer_args(network: tuple[Path, Path, Path], out: Path, *extra: object) -> list[str]:
    recipe, checkpoint, store = network
    return [str(a) for a in ("infer", "--recipe", recipe, "--checkpoint", checkpoint,
                             "--input", store / "image", "--output", out, "--device", "cpu",
                             *extra)]


@pytest.fixture(scope="module")
def coarse_prediction(network, tmp_path_factory) -> Path:
    """`infer --level 1 --levels 2`: affinities of the image's level 1 (8 blocks), with a
    pyramid of their own."""
    out = tmp_path_factory.mktemp("coarse") / "pred.zarr"
    emrun(*infer_args(network, out, "--level", "1", "--levels", "2", "--block", "4", "12",
                      "12"))
    return out


def test_pyramids_of_each_stage_lie_where_the_image_pyramid_lies(network, coarse_prediction,
                                                                 tmp_path):
    """infer of the image's level 1, segmented at scale with a pyramid of its own: level k
    of the affinities and of each segmentation lies exactly on level k + 1 of the image
    (voxel size, and a translation half a finer voxel on per halving); the label pyramid
    keeps level 0's ids (the most frequent of each window) and scores against the truth's
    level on the same grid, while the full-resolution truth is refused as another grid."""
    *_, store = network
    out = tmp_path / "seg.zarr"
    segment_here(coarse_prediction / "affinity", out, "--threshold", "0.3,0.5", "--block",
                 "4", "12", "12", "--levels", "2")
    image = placements(store / "image")
    assert placements(coarse_prediction / "affinity") == image[1:]
    for name in ("segmentation_0.3", "segmentation_0.5"):
        assert placements(out / "labels" / name) == image[1:], name
        fine, coarse = level(out, name, 0), level(out, name, 1)
        assert np.array_equal(coarse, downsample(fine, (1, 2, 2), labels=True)), name
        assert set(np.unique(coarse)) <= set(np.unique(fine)), name
    assert placements(out / "labels/fragments") == image[1:]  # the same pyramid
    truth = open_volume(str(store / "labels/2")).read()
    got = scores(out / "labels/segmentation_0.3/1", store / "labels/2")
    assert got["voxels"] == int((truth != 0).sum()) > 0
    refused = runner.invoke(app, ["evaluate", str(out / "labels/segmentation_0.3"),
                                  str(store / "labels")])
    assert refused.exit_code == 2 and "not on the same grid" in refused.output


def test_an_inference_output_store_names_its_affinities_at_a_level_too(coarse_prediction,
                                                                        tmp_path):
    emrun("segment", coarse_prediction, tmp_path / "whole.zarr", "--threshold", "0.3",
          "--levels", "1")
    result = runner.invoke(app, ["segment", str(coarse_prediction), str(tmp_path / "l.zarr"),
                                 "--level", "1", "--threshold", "0.3", "--levels", "1"])
    assert result.exit_code == 0, result.output
    by_path = tmp_path / "by-path.zarr"
    emrun("segment", coarse_prediction / "affinity/1", by_path, "--threshold", "0.3",
          "--levels", "1")
    assert np.array_equal(level(tmp_path / "l.zarr", "segmentation"),
                          level(by_path, "segmentation"))


def test_segment_of_an_unfinished_inference_says_it_is_unfinished(network, tmp_path):
    """A lab starts segment while infer of the same output is still running (or was killed):
    the refusal must name the real problem, for the command as the user would give it."""
    _, checkpoint, store = network

    class Stop(Exception):
        pass

    def stop(progress) -> None:
        if progress.done == 1:
            raise Stop

    out = tmp_path / "pred.zarr"
    with pytest.raises(Stop):
        run_inference(Recipe.model_validate(RECIPE), checkpoint, str(store / "image/1"), out,
                      block=(4, 12, 12), levels=1, on_block=stop)
    for extra in ((), ("--scheduler", "local")):
        result = runner.invoke(app, ["segment", str(out / "affinity"), str(tmp_path / "s.zarr"),
                                     "--threshold", "0.3", *extra])
        assert result.exit_code == 2, result.output
        assert "is unfinished" in result.output and "--resume" in result.output, extra
    assert not (tmp_path / "s.zarr").exists()


ROI = ("--roi", "1,3,5/6,30,29")


@pytest.fixture(scope="module")
def masked_roi(network, tmp_path_factory) -> tuple[Path, list[str]]:
    """A mask of the whole image (placed by its offset, inside only rows 0-19 and columns
    10 on), and the infer options of a lab's run over a box of it with TTA; the folder."""
    tmp = tmp_path_factory.mktemp("masked")
    mask = np.zeros((8, 48, 48), np.uint8)
    mask[:, :20, 10:] = 1
    write_volume(tmp / "m.zarr", "mask", mask, voxel_size=VOXEL, offset=(2, 5, 7), label=False)
    options = [*ROI, "--mask", str(tmp / "m.zarr/mask"), "--tta", "2", "--block", "4", "24",
               "24", "--levels", "2"]
    emrun(*infer_args(network, tmp / "local.zarr", *options))
    return tmp, options


def test_daisy_predicts_a_masked_box_with_tta_as_local_workers_do(network, masked_roi):
    """ROI + larger mask + TTA on two daisy workers: the same bits at every level, placed
    alike, as one local process."""
    pytest.importorskip("daisy")
    tmp, options = masked_roi
    emrun(*infer_args(network, tmp / "daisy.zarr", *options, "--scheduler", "daisy",
                      "--workers", "2"))
    local = open_volume(str(tmp / "local.zarr/affinity/0"))
    assert local.offset[-3:] == (3, 8, 12) and local.shape[-3:] == (6, 30, 29)
    for at in ("0", "1"):
        a = zarr.open_array(str(tmp / "local.zarr/affinity" / at), mode="r")[...]
        b = zarr.open_array(str(tmp / "daisy.zarr/affinity" / at), mode="r")[...]
        assert np.array_equal(a, b), at
    assert placements(tmp / "daisy.zarr/affinity") == placements(tmp / "local.zarr/affinity")


def test_blockwise_evaluate_of_a_masked_scaled_segmentation_in_odd_blocks(network, masked_roi):
    """The box's affinities segmented at scale with the larger mask in odd blocks (3 x 10 x
    11): 0 exactly outside the mask; blockwise evaluate with the mask and --connected-truth
    on two workers with other odd blocks gives the streamed evaluate's figures, over the
    truth's part under the box."""
    *_, store = network
    tmp, _ = masked_roi
    out = tmp / "seg.zarr"
    segment_here(tmp / "local.zarr/affinity", out, "--threshold", "0.3", "--mask",
                 tmp / "m.zarr/mask", "--block", "3", "10", "11")
    seg = level(out, "segmentation")
    inside = zarr.open_array(str(tmp / "m.zarr/mask/0"), mode="r")[1:7, 3:33, 5:34] != 0
    assert np.array_equal(seg != 0, inside)
    args = (out / "labels/segmentation", store / "labels", "--mask", tmp / "m.zarr/mask",
            "--connected-truth")
    streamed = scores(*args)
    assert scores(*args, "--workers", "2", "--block", "5", "7", "9") == streamed
    truth = open_volume(str(store / "labels/0")).read()[1:7, 3:33, 5:34]
    assert streamed["voxels"] == int(((truth != 0) & inside).sum()) > 0


@pytest.mark.slow
def test_daisy_workers_on_postgresql_give_the_local_sqlite_segmentation(
        cells_store, straight, postgres_url):  # noqa: F811
    """The cluster's set-up (daisy workers, the graph in PostgreSQL) and one machine's
    (local workers, SQLite): the same fragments and segmentations, bit for bit, and the
    same figures from evaluate."""
    pytest.importorskip("daisy")
    out = cells_store / "daisy-pg.zarr"
    command = segment_scaled(cells_store / "in.zarr/affinity", out, "--threshold", "0.2,0.5",
                             "--db", postgres_url)
    command[command.index("local")] = "daisy"
    emrun(*command[3:])  # in this process: the daisy workers are processes of their own
    assert not (out / ".emrun-segment/graph.sqlite").exists()
    for name in ("fragments", "segmentation_0.2", "segmentation_0.5"):
        assert np.array_equal(level(out, name), level(straight, name)), name
    truth = cells_store / "in.zarr/truth"
    assert scores(out / "labels/segmentation_0.5", truth) == \
        scores(straight / "labels/segmentation_0.5", truth)


@pytest.fixture(scope="module")
def full_resolution_mask(network) -> Path:
    """A mask of the image's full resolution holding every coarser level's box in voxels
    (offset 0; 14 x 60 x 60 of 30 x 6 x 6 nm): on level 1's grid it is another box."""
    *_, store = network
    write_volume(store.parent / "fm.zarr", "mask", np.ones((14, 60, 60), np.uint8),
                 voxel_size=VOXEL, label=False, levels=1)
    return store.parent / "fm.zarr/mask"


def test_a_full_resolution_mask_for_coarser_affinities_is_named_another_grid_by_segment(
        coarse_prediction, full_resolution_mask, tmp_path):
    for extra in ((), ("--scheduler", "local")):
        result = runner.invoke(app, ["segment", str(coarse_prediction / "affinity"),
                                     str(tmp_path / "s.zarr"), "--mask",
                                     str(full_resolution_mask), "--threshold", "0.3", *extra])
        assert result.exit_code == 2, result.output
        assert "voxel size" in error_line(result.output), extra


def test_a_full_resolution_mask_for_a_coarser_level_is_named_another_grid_by_infer(
        network, full_resolution_mask, tmp_path):
    result = runner.invoke(app, infer_args(network, tmp_path / "p.zarr", "--level", "1",
                                           "--mask", full_resolution_mask))
    assert result.exit_code == 2, result.output
    assert "voxel size" in error_line(result.output)
    assert not (tmp_path / "p.zarr").exists()
