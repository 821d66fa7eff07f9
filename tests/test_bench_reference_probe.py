"""Reference probe of what the `emrun bench` commands report: each figure recomputed from
what the bench wrote or from first principles (plain loops, brute force, closed forms) on
tiny synthetic inputs. Relations between reported numbers only; never wall times."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import MINIMAL, ROOT
from typer.testing import CliRunner

from emrun.bench import codecs as bench_codecs_module
from emrun.bench import segment
from emrun.cli import app
from emrun.geometry import Roi
from emrun.infer import schedule

runner = CliRunner()
DEMO = str(ROOT / "recipes" / "demo.yaml")
MASK64 = (1 << 64) - 1


# --- bench segment: the generated cells --------------------------------------------------------


def splitmix_finaliser(value: int) -> int:
    """splitmix64's finaliser of ``value + golden``, in Python integers."""
    x = (value + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def reference_cells(shape: tuple[int, int, int]) -> np.ndarray:
    """`synthetic_cells` as its docstring says, by brute force over every seed: each voxel
    (its centre, in units of CELL) takes the nearest seed of the boxes within one box of its
    own on every axis (boxes inside the volume's grid only; a tie to the first in raster
    order); a box's seed is its corner + 0.25 + hash % 1000 / 2000 per axis, its id the
    box's raster index + 1."""
    cell = segment.CELL
    counts = [math.ceil(n / c) for n, c in zip(shape, cell, strict=True)]
    position = np.stack(np.meshgrid(*[(np.arange(n) + 0.5) / c for n, c in
                                      zip(shape, cell, strict=True)], indexing="ij"))
    home = np.floor(position)
    best = np.full(shape, np.inf)
    label = np.zeros(shape, np.uint64)
    for index, box in enumerate(itertools.product(*(range(c) for c in counts))):
        seed = [g + 0.25 + (splitmix_finaliser(index * 3 + a) % 1000) / 2000.0
                for a, g in enumerate(box)]
        near = np.all([np.abs(home[a] - box[a]) <= 1 for a in range(3)], axis=0)
        distance = sum((position[a] - seed[a]) ** 2 for a in range(3))
        closer = near & (distance < best)
        best[closer] = distance[closer]
        label[closer] = index + 1
    return label


@pytest.mark.parametrize("shape", [(20, 60, 50), (33, 100, 150), (17, 49, 97)])
def test_synthetic_cells_are_the_nearest_seed_among_the_27_boxes(shape):
    ref = reference_cells(shape)
    got = segment.synthetic_cells(Roi((0, 0, 0), shape), shape)
    assert got.dtype == np.uint64
    assert np.array_equal(got, ref)
    # a voxel's id depends on its position alone, whichever block computes it
    for begin, size in (((3, 10, 7), (9, 30, 20)), ((0, 48, 48), (17, 1, 2))):
        size = tuple(min(s, n - b) for s, n, b in zip(size, shape, begin, strict=True))
        part = segment.synthetic_cells(Roi(begin, size), shape)
        box = tuple(slice(b, b + s) for b, s in zip(begin, size, strict=True))
        assert np.array_equal(part, ref[box])


def test_generated_affinities_follow_the_cells_whatever_the_block(tmp_path):
    """0.8 within a cell, 0.2 across (and off the volume), plus noise of sigma 0.1: rounding
    to the nearer of the two is wrong for about 0.3 % of the edges (noise past 0.3)."""
    shape = (12, 40, 56)
    cells = reference_cells(shape)
    clean = np.zeros((3, *shape), np.float32)
    for axis in range(3):
        here = [slice(None)] * 3
        prev = [slice(None)] * 3
        here[axis], prev[axis] = slice(1, None), slice(0, -1)
        clean[axis][tuple(here)] = cells[tuple(here)] == cells[tuple(prev)]
    expected = 0.2 + 0.6 * clean
    for i, block in enumerate([(12, 40, 56), (5, 16, 24)]):
        folder = tmp_path / f"b{i}"
        folder.mkdir()
        path = segment.make_affinities(folder, shape, block, 1)
        affs = zarr.open_array(str(Path(path) / "0"), mode="r")[...]
        assert affs.shape == (3, *shape) and affs.dtype == np.uint8
        values = affs.astype(np.float64) / 255
        wrong = (values > 0.5) != (clean > 0.5)
        assert wrong.mean() < 0.01
        noise = values - expected
        assert abs(noise.mean()) < 0.01 and 0.08 < noise.std() < 0.12


# --- bench segment: what each run reports ------------------------------------------------------


def brute_arand(seg: np.ndarray, truth: np.ndarray) -> float:
    """1 - 2 sum n_st^2 / (sum S_s^2 + sum T_t^2), truth 0 dropped (none here), exactly."""
    keep = truth != 0
    pairs = Counter(zip(seg[keep].tolist(), truth[keep].tolist(), strict=True))
    s = Counter(seg[keep].tolist())
    t = Counter(truth[keep].tolist())
    both = sum(n * n for n in pairs.values())
    return float(1 - Fraction(2 * both, sum(n * n for n in s.values())
                              + sum(n * n for n in t.values())))


@pytest.fixture(scope="module")
def segment_runs(tmp_path_factory):
    """bench_segment on 20x100x150 in 2x3x4 blocks: threshold 0.5 with 1 and 2 workers,
    threshold 0.9 with 1; each run's segmentation, fragments and timings kept before the
    bench removes them."""
    kept: dict = {"seg": [], "fragments": [], "timings": []}
    real_remove, real_figures = segment.remove_tree, segment._run_figures

    def remove(path, *args, **kwargs):
        path = Path(path)
        if path.name.startswith("workers"):
            kept["seg"].append(zarr.open_array(str(path / "labels" / "segmentation" / "0"),
                                               mode="r")[...])
            frag = path / "labels" / "fragments" / "0"
            kept["fragments"].append(zarr.open_array(str(frag), mode="r")[...]
                                     if frag.exists() else None)
        return real_remove(path, *args, **kwargs)

    def figures(result, *args):
        kept["timings"].append(result.timings)
        return real_figures(result, *args)

    mp = pytest.MonkeyPatch()
    mp.setattr(segment, "remove_tree", remove)
    mp.setattr(segment, "_run_figures", figures)
    try:
        shape, block = (20, 100, 150), (12, 40, 40)
        reports = [segment.bench_segment(shape, block, workers, threshold=t,
                                         folder=tmp_path_factory.mktemp(f"seg{t}"))
                   for t, workers in ((0.5, [1, 2]), (0.9, [1]))]
    finally:
        mp.undo()
    return shape, block, reports, kept


@pytest.mark.slow
def test_bench_segment_arand_and_counts_are_those_of_the_segmentation_it_made(segment_runs):
    shape, _, reports, kept = segment_runs
    truth = reference_cells(shape)
    runs = [run for report in reports for run in report["runs"]]
    assert len(runs) == len(kept["seg"]) == 3
    scores = []
    for run, seg in zip(runs, kept["seg"], strict=True):
        assert seg.shape == shape
        ours = brute_arand(seg, truth)
        scores.append(ours)
        assert run["arand"] == pytest.approx(round(ours, 4), abs=1e-12)
        assert run["segments"] == len(np.unique(seg[seg != 0]))
    # the same affinities and threshold give the same segmentation with 1 or 2 workers
    assert np.array_equal(kept["seg"][0], kept["seg"][1])
    assert scores[0] == 0.0  # threshold 0.5 finds the generated cells exactly
    assert scores[2] > 0.0, "threshold 0.9 must split cells (a probe that could not fail)"


def test_bench_segment_nodes_are_the_fragments_it_wrote(segment_runs):
    _, _, reports, kept = segment_runs
    runs = [run for report in reports for run in report["runs"]]
    for run, fragments in zip(runs, kept["fragments"], strict=True):
        if fragments is None:
            pytest.skip("the run wrote no fragments volume to count")
        assert run["nodes"] == len(np.unique(fragments[fragments != 0]))


def test_bench_segment_rates_shares_and_scaling_follow_from_its_own_timings(segment_runs):
    shape, block, reports, kept = segment_runs
    voxels = math.prod(shape)
    blocks = math.prod(math.ceil(n / b) for n, b in zip(shape, block, strict=True))
    timings = iter(kept["timings"])
    for report in reports:
        assert report["voxels"] == voxels and blocks == 24
        rates = []
        for run in report["runs"]:
            t = next(timings)
            cores = min(run["workers"], blocks, segment.cpu_cores())
            assert run["busy_cores"] == max(1, cores)
            seconds = t["fragments"]["seconds"] + t["graph"]["seconds"]
            assert run["steps"]["fragments"] == t["fragments"]["seconds"]
            assert run["steps"]["graph"] == t["graph"]["seconds"]
            rate = voxels / seconds / run["busy_cores"] / 1e6
            rates.append(rate)
            assert run["fragments_graph_mvox_per_s_per_core"] == round(rate, 3)
            work = sum(v for s in ("fragments", "graph") for k, v in t[s].items()
                       if k not in ("seconds", "blocks"))
            assert run["database_share"] == round(t["graph"]["database"] / work, 3)
            assert 0 < run["database_share"] < 1
            assert run["database_bytes_per_voxel"] == round(t["database_bytes"] / voxels, 3)
            assert run["edges"] == t["agglomerate"]["edges"]
        for run, rate in zip(report["runs"], rates, strict=True):
            assert run["scaling"] == round(rate / rates[0], 3)


def test_bench_segment_text_prints_the_json_figures(segment_runs):
    _, _, reports, _ = segment_runs
    for report in reports:
        lines = segment.report_lines(report)
        assert len(lines) == 1 + len(report["runs"])
        for run, line in zip(report["runs"], lines[1:], strict=True):
            assert f"{run['fragments_graph_mvox_per_s_per_core']:.2f} M voxels/s" in line
            assert f"scaling {run['scaling']:.2f}" in line
            assert f"{run['segments']} segments" in line and f"arand {run['arand']:.4f}" in line
            assert f"{100 * run['database_share']:.0f} % of the workers' time" in line


# --- bench infer: the lattice and the patches predicted ------------------------------------------


def lattice_starts(n: int, patch: int, stride: int) -> list[int]:
    """Starts ``-((patch - stride) // 2) + k * stride`` until a patch reaches the end."""
    start = -((patch - stride) // 2)
    starts = [start]
    while starts[-1] + patch < n:
        starts.append(starts[-1] + stride)
    return starts


def reference_predictions(shape, patch, stride, block, groups) -> int:
    """Forward passes when each patch is predicted by its owner's unit (the owner: the block
    holding its first voxel in the volume) and once more for each other unit it reaches
    (README, 'Only patches that straddle a unit border are predicted again')."""
    unit_of = {tuple(b): u for u, group in enumerate(groups) for b in group}
    total = 0
    for start in itertools.product(*(lattice_starts(n, p, s)
                                     for n, p, s in zip(shape, patch, stride, strict=True))):
        owner = tuple(max(0, a) // b for a, b in zip(start, block, strict=True))
        reached = itertools.product(*(
            range(max(0, a) // b, (min(n, a + p) - 1) // b + 1)
            for a, p, b, n in zip(start, patch, block, shape, strict=True)))
        total += 1 + len({unit_of[r] for r in reached} - {unit_of[owner]})
    return total


@pytest.fixture(scope="module")
def infer_figures(tmp_path_factory):
    """`bench infer --no-model` on 8x72x120 in 6x24x24 blocks with 1 and 2 workers, batches
    of one patch (a recomputed owner's batch-mates are predicted again too: README, 'from its
    owner's batches'); the units each worker count was given, recorded."""
    recipe = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    recipe.write_text(MINIMAL)
    seen: list = []
    real = schedule.job_units

    def recorded(job, blocks, workers, *args, **kwargs):
        groups = real(job, blocks, workers, *args, **kwargs)
        seen.append((workers, [list(map(tuple, g)) for g in groups]))
        return groups

    mp = pytest.MonkeyPatch()
    mp.setattr(schedule, "job_units", recorded)
    try:
        result = runner.invoke(app, ["bench", "infer", str(recipe), "--no-model", "--shape",
                                     "8", "72", "120", "--block", "6", "24", "24",
                                     "--workers", "2", "--device", "cpu", "--repeats", "1",
                                     "-o", "infer.precision=fp32", "-o", "infer.batch_size=1",
                                     "--json"])
    finally:
        mp.undo()
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr, seen


def test_bench_infer_lattice_is_the_documented_lattice(infer_figures):
    f, _, _ = infer_figures
    shape, patch, stride, block = f["volume"], f["patch"], f["stride"], f["block"]
    assert shape == [8, 72, 120] and block == [6, 24, 24]
    counts = [len(lattice_starts(n, p, s)) for n, p, s in zip(shape, patch, stride,
                                                             strict=True)]
    assert f["lattice_patches"] == math.prod(counts)
    assert f["blocks"] == math.prod(math.ceil(n / b) for n, b in zip(shape, block,
                                                                    strict=True))
    assert f["overlap"] == round(math.prod(counts) * math.prod(patch) / math.prod(shape), 3)


def test_bench_infer_predicted_patches_are_the_lattice_plus_unit_border_repeats(
        infer_figures):
    f, text, seen = infer_figures
    shape, patch, stride, block = f["volume"], f["patch"], f["stride"], f["block"]
    lattice = f["lattice_patches"]
    assert f["predicted_patches"] == lattice and f["duplicate_fraction"] == 0.0
    rows = f["workers"]
    assert [r["workers"] for r in rows] == [1, 2]
    units = {}
    for workers, groups in seen:
        units.setdefault(workers, groups)
    for row in rows:
        groups = units[row["workers"]]
        assert sorted(b for g in groups for b in g) == sorted(
            itertools.product(*(range(math.ceil(n / b)) for n, b in zip(shape, block,
                                                                      strict=True))))
        expected = reference_predictions(shape, patch, stride, block, groups)
        assert row["predicted_patches"] == expected, (row["workers"], len(groups))
        assert row["duplicate_fraction"] == round(expected / lattice - 1, 4)
        assert f"duplicates {100 * row['duplicate_fraction']:+.1f} % at unit borders" in text
    assert rows[0]["duplicate_fraction"] == 0.0
    assert any(r["duplicate_fraction"] > 0 for r in rows[1:]), "no unit border was crossed"


def test_bench_infer_rates_and_speedups_follow_from_its_own_seconds(infer_figures):
    f, text, _ = infer_figures
    voxels = math.prod(f["volume"])
    assert f["engine_voxels_per_s"] == pytest.approx(voxels / f["engine_seconds"],
                                                     rel=0.0006 / f["engine_seconds"] + 1e-6)
    for row in f["workers"]:
        assert row["voxels_per_s"] == pytest.approx(voxels / row["seconds"],
                                                    rel=0.0006 / row["seconds"] + 1e-6)
        assert row["voxels_per_s_per_core"] == pytest.approx(
            row["voxels_per_s"] / f["cpu_cores"], abs=0.1)
        assert row["speedup"] == pytest.approx(
            row["voxels_per_s"] / f["workers"][0]["voxels_per_s"], abs=6e-4)
    for stage, seconds in f["stage_seconds"].items():
        assert f["stage_shares"][stage] == round(seconds / f["engine_seconds"], 3)
    waits = {"predict": f["stage_seconds"]["predict"], "read": f["stage_seconds"]["wait_read"],
             "write": f["stage_seconds"]["wait_write"]}
    assert waits[f["bound"]] == max(waits.values())
    assert (f"patches predicted {f['predicted_patches']:,} of {f['lattice_patches']:,}"
            in text)


# --- bench data: stage costs and rates -----------------------------------------------------------


def test_bench_data_figures_are_its_stage_timings_and_rate(monkeypatch):
    """Every timed stage is reported (each augmentation by its name), the stages are disjoint
    parts of a sample (their means sum to at most the mean sample), and ms per sample is the
    reciprocal of samples/s."""
    from emrun.bench import data
    from emrun.recipe import load_recipe

    kept = {}
    real = data.stage_costs

    def recorded(*args, **kwargs):
        kept["per_stage"], kept["totals"] = real(*args, **kwargs)
        return kept["per_stage"], kept["totals"]

    monkeypatch.setattr(data, "stage_costs", recorded)
    small = [f"data.sources.{name}.{key}={value}" for name in ("synth_a", "synth_b")
             for key, value in (("shape", "[20, 100, 100]"), ("weight", 1))]
    recipe = load_recipe(DEMO, ["train.patch=[8, 48, 48]", *small]).recipe
    f = data.bench_data(recipe, synthetic=False, workers=0, samples=4)
    per_stage, totals = kept["per_stage"], kept["totals"]
    assert len(totals) == 4 and f["samples"] == 4 and f["workers"] == 0
    batch = recipe.train.batch_size  # the loader's rate is timed over whole batches
    assert f["loader_samples"] == max(1, 4 // batch) * batch
    assert f["read_ms"] == round(per_stage["sample"], 3)
    assert f["targets_ms"] == round(per_stage["targets"], 3)
    assert f["per_target_ms"] == {n: round(per_stage[f"target:{n}"], 3) for n in recipe.tasks}
    steps = {k: v for k, v in per_stage.items()
             if k not in ("sample", "targets") and not k.startswith("target:")}
    assert steps, "the demo's augmentations were not timed"
    assert f["per_augmentation_ms"] == {k: round(v, 3) for k, v in steps.items()}
    assert per_stage["sample"] + per_stage["targets"] + sum(steps.values()) <= \
        np.mean(totals) * 1.001 + 1e-3
    assert sum(f["per_target_ms"].values()) <= f["targets_ms"] + 1e-3
    assert f["median_ms_per_sample_one_core"] == round(float(np.median(totals)), 3)
    assert f["ms_per_sample"] == pytest.approx(1e3 / f["samples_per_s"], rel=1e-3)
    assert f["channels"] == recipe.head_channels()


# --- bench codecs: the ratio on disk -------------------------------------------------------------


def test_bench_codecs_ratios_are_the_region_over_its_encoded_chunks(tmp_path):
    """With chunks that tile the region and a sample of every chunk, the per-chunk ratio and
    the ratio on disk are the same bytes: zarr stores each chunk as the codec encodes it
    (the module: 'the bytes are the ones zarr would store'). Also against numcodecs' own
    Blosc, configured by hand, chunk by chunk."""
    import numcodecs

    from emrun.io.write import write_volume

    rng = np.random.default_rng(3)
    smooth = np.cumsum(rng.integers(0, 3, (2, 16, 64, 64)), axis=-1).astype(np.uint8)
    write_volume(tmp_path / "v.zarr", "affinity", smooth, channel_axis=True)
    result = bench_codecs_module.bench_codecs(
        str(tmp_path / "v.zarr" / "affinity"), chunks=["2,8,32,32"], passes=1,
        codecs=["blosc-zstd-1-byte", "blosc-lz4-1-byte"], workdir=str(tmp_path / "work"))
    assert result["region"] == [2, 16, 64, 64] and result["lossless"]
    assert result["region_mb"] == smooth.nbytes / 1e6
    for row in result["rows"]:
        assert row["sample_chunks"] == 8
        assert row["ratio"] == pytest.approx(row["sample_ratio"], rel=1e-12)
        assert row["stored_mb"] == pytest.approx(smooth.nbytes / row["ratio"] / 1e6)
        cname = row["codec"].split("-")[1]
        blosc = numcodecs.Blosc(cname=cname, clevel=1, shuffle=numcodecs.Blosc.NOSHUFFLE)
        encoded = sum(len(blosc.encode(np.ascontiguousarray(
            smooth[:, z:z + 8, y:y + 32, x:x + 32])))
            for z in (0, 8) for y in (0, 32) for x in (0, 32))
        assert row["ratio"] == pytest.approx(smooth.nbytes / encoded, rel=0.02)
    assert result["best"]["codec"] == bench_codecs_module.choose(result["rows"])["codec"]


# --- bench train and bench model: the figures from their own counts ------------------------------


def test_bench_train_times_the_steps_it_says_and_its_figures_agree(tmp_path, monkeypatch):
    """The trainer's loop runs warm-up + --steps iterations in all (the timed run exactly
    --steps), and overhead, voxels/s and parameters follow from the reported figures."""
    from emrun.bench import train
    from emrun.models import build_model
    from emrun.recipe import load_recipe
    from emrun.train.trainer import Trainer

    calls = []
    real = Trainer.step

    def counted(self, source):
        calls.append(self.iteration)
        return real(self, source)

    monkeypatch.setattr(Trainer, "step", counted)
    path = tmp_path / "tiny.yaml"
    path.write_text(MINIMAL)
    loaded = load_recipe(path, ["model.widths=[1, 2]", "model.groups=1"])
    # the recipe's own source is a small synthetic one: the bench's 64x512x512 stand-ins
    # (synthetic=True) take seconds to generate
    f = train.bench_train(loaded, device="cpu", steps=4, warmup=2, synthetic=False)
    assert calls == list(range(6)), calls  # 2 warm-up iterations, then 4 timed ones
    assert f["steps"] == 4
    assert f["overhead"] == pytest.approx(f["emrun_step_ms"] / f["bare_step_ms"] - 1,
                                          abs=2e-4 + 0.01 / f["bare_step_ms"])
    voxels = f["batch_size"] * math.prod(f["patch"])
    assert f["voxels_per_s"] == pytest.approx(voxels / (f["emrun_step_ms"] / 1e3), rel=1e-3)
    model = build_model(loaded.recipe)
    assert f["params"] == sum(p.numel() for p in model.parameters())


def test_bench_train_accumulates_in_the_bare_loop_as_the_trainer_does(tmp_path, monkeypatch):
    """With train.accumulate 3 the bare loop ran one batch per step against the trainer's
    three (reported as +120 % overhead), and voxels/s left out two batches of three."""
    from emrun.bench import train
    from emrun.recipe import load_recipe

    unpacked = []
    real = train.unpack
    monkeypatch.setattr(train, "unpack", lambda *a, **k: unpacked.append(1) or real(*a, **k))
    path = tmp_path / "tiny.yaml"
    path.write_text(MINIMAL)
    loaded = load_recipe(path, ["model.widths=[1, 2]", "model.groups=1", "train.accumulate=3"])
    f = train.bench_train(loaded, device="cpu", steps=2, warmup=1, synthetic=False)
    assert len(unpacked) == 3 * (2 + 1) and f["accumulate"] == 3
    voxels = 3 * f["batch_size"] * math.prod(f["patch"])
    assert f["voxels_per_s"] == pytest.approx(voxels / (f["emrun_step_ms"] / 1e3), rel=1e-3)


def test_bench_model_counts_a_resenc_and_the_batch(tmp_path):
    """Parameters = sum(numel), FLOPs per voxel = 2 x multiply-adds of every conv by forward
    hooks, and each configuration's voxels/s = batch x patch voxels / its step."""
    from test_bench_probe import hook_flops_per_voxel

    from emrun.models import build_model
    from emrun.recipe import load_recipe

    path = tmp_path / "tiny.yaml"
    path.write_text(MINIMAL)
    overrides = ["-o", "model.type=resenc", "-o", "model.widths=[2, 4]",
                 "-o", "train.batch_size=3", "-o", "train.patch=[4, 16, 16]"]
    result = runner.invoke(app, ["bench", "model", str(path), *overrides, "--steps", "1",
                                 "--no-compile", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    f = json.loads(result.stdout.strip().splitlines()[-1])
    recipe = load_recipe(path, [o for o in overrides if o != "-o"]).recipe
    torch.manual_seed(0)
    model = build_model(recipe).eval()
    assert f["model"] == "resenc" and f["batch_size"] == 3
    assert f["params"] == sum(p.numel() for p in model.parameters())
    assert f["flops_per_voxel"] == pytest.approx(
        hook_flops_per_voxel(model, torch.rand((1, 1, 4, 16, 16))), rel=1e-9)
    voxels = 3 * 4 * 16 * 16
    assert len(f["configs"]) == 4
    for config in f["configs"]:
        assert config["voxels_per_s"] == pytest.approx(voxels / (config["step_ms"] / 1e3),
                                                       rel=0.01, abs=0.5)
    best = max(f["configs"], key=lambda c: c["voxels_per_s"])
    assert f["step_voxels_per_s"] == best["voxels_per_s"]
    assert f["best"] == {k: best[k] for k in ("precision", "compiled", "channels_last")}
