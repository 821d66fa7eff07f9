"""`emrun bench infer`: the stand-in network, duplicates, stage shares, worker scaling,
configuration search and bad input. Figures are checked for consistency, never for speed."""

from __future__ import annotations

import json
import math
import resource
import types
import typing

import numpy as np
import pytest
import torch
import zarr
from conftest import MINIMAL
from typer.testing import CliRunner

from emrun.bench import infer as bench
from emrun.bench import infer_configs, room, standin
from emrun.cli import app
from emrun.errors import UserError
from emrun.infer import schedule
from emrun.infer.job import prepare_job
from emrun.infer.worker import BlockWorker
from emrun.io.write import write_volume
from emrun.recipe import load_recipe
from emrun.recipe.recipe import Task
from emrun.registry import models
from emrun.synth import MEMORY_PER_VOXEL, peak_memory

runner = CliRunner()
FAST = ["--device", "cpu", "--repeats", "1", "-o", "infer.precision=fp32", "--json"]
SMALL = ["--shape", "8", "48", "48", "--block", "6", "24", "24"]  # 8 blocks (z: 6 + 2)
TINY = ["--shape", "4", "16", "16", "-o", "infer.patch=[4, 16, 16]"]  # quick forward passes

THREE_ACTIVATIONS = MINIMAL.replace("""\
    target: {type: affinity}
""", """\
    target: {type: affinity}
  edges:
    target: {type: boundary}
    activation: tanh
    loss: {type: mse}
  raw:
    target: {type: boundary}
    activation: none
    loss: {type: mse}
""")


def figures(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_no_model_reports_the_engines_own_rate_duplicates_and_stage_shares(write):
    result = runner.invoke(app, ["bench", "infer", str(write(MINIMAL)), "--no-model", *SMALL,
                                 *FAST])
    f = figures(result)
    assert f["no_model"] is True and f["blocks"] == 8
    for key in ("model_voxels_per_s", "efficiency", "monai_voxels_per_s", "engine_vs_monai"):
        assert f[key] is None
    assert f["engine_voxels_per_s"] > 0 and f["cpu_cores"] == schedule.cpu_cores()
    assert f["engine_voxels_per_s_per_core"] == pytest.approx(
        f["engine_voxels_per_s"] / f["cpu_cores"], abs=0.1)
    # duplicates: predicted against the lattice (2 x 2 x 2 patches of 8x32x32, stride 6x24x24)
    assert f["lattice_patches"] == 8 and f["predicted_patches"] >= f["lattice_patches"]
    assert f["duplicate_fraction"] == round(f["predicted_patches"] / 8 - 1, 4)
    # shares of the engine's wall time, and the stage that bounds it
    wall = f["engine_seconds"]
    assert set(f["stage_shares"]) == set(f["stage_seconds"])
    for stage, share in f["stage_shares"].items():
        assert share == round(f["stage_seconds"][stage] / wall, 3)
    assert f["bound"] in ("predict", "read", "write")
    out = result.stderr  # with --json, the text for people is on stderr
    assert "per CPU core" in out and "stand-in" in out and "bound by" in out
    assert "duplicates" in out and "model alone" not in out and "MONAI" not in out
    # the units, the budget they were chosen for; no device memory on a CPU
    assert f["units"] == 1 and f["handover_budget_bytes"] >= schedule.HANDOVER_BYTES
    assert f["handover_host_bytes"] == 0
    assert f["device_peak_bytes"] is None and f["device_memory_bytes"] is None
    assert "1 unit of blocks for a hand-over budget of" in out and "device memory" not in out


def test_on_a_gpu_the_memory_line_gives_the_devices_peak(monkeypatch):
    """The peak is torch's own count since the engine run began; the line says it beside
    the device's memory (a GPU-only path, checked here with torch's counters stubbed)."""
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 << 30)
    assert bench.device_peak(torch.device("cuda")) == 3 << 30
    assert bench.device_peak(torch.device("cpu")) is None
    figures = {"units": 4, "handover_budget_bytes": 10**10, "handover_host_bytes": 0,
               "device_peak_bytes": 3 * 10**9, "device_memory_bytes": 8 * 10**10}
    assert bench._memory_line(figures) == (
        "4 units of blocks for a hand-over budget of 10.0 GB; device memory at most 3.0 GB "
        "of 80.0 GB")
    assert bench._memory_line({**figures, "handover_host_bytes": 6 * 10**10}) == (
        "4 units of blocks for a hand-over budget of 10.0 GB and 60.0 GB of host memory; "
        "device memory at most 3.0 GB of 80.0 GB")


def test_the_bound_is_what_the_main_thread_spends_most_on():
    seconds = {"read": 9.0, "predict": 2.0, "write": 9.0, "wait_read": 0.1, "wait_write": 0.2}
    assert bench.bound_by(seconds) == "predict"  # busy IO threads that never hold it up
    assert bench.bound_by({**seconds, "wait_write": 3.0}) == "write"
    assert bench.bound_by({**seconds, "wait_read": 3.0}) == "read"
    assert bench.stage_shares({"predict": 1.0}, 4.0) == {"predict": 0.25}


def test_the_stand_in_has_the_recipes_heads_channels_and_dtype(write):
    recipe = load_recipe(write(THREE_ACTIVATIONS)).recipe
    net = standin.stand_in(recipe)
    x = torch.rand(2, 1, 8, 32, 32)
    out = net(x)
    assert list(out) == list(recipe.tasks)
    for name, task in recipe.tasks.items():
        assert out[name].shape == (2, task.channels(), 8, 32, 32)
        assert out[name].dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert all(t.dtype == torch.bfloat16 for t in net(x).values())  # as a network's would


def test_every_activation_a_recipe_allows_has_a_stand_in_and_others_are_refused(write):
    allowed = typing.get_args(Task.model_fields["activation"].annotation)
    assert set(allowed) <= set(standin.PRE_ACTIVATIONS)
    recipe = load_recipe(write(MINIMAL)).recipe
    task = recipe.tasks["affinity"].model_copy(update={"activation": "softmax"})
    with pytest.raises(UserError, match="'softmax'"):
        standin.stand_in(recipe.model_copy(update={"tasks": {"affinity": task}}))


@pytest.mark.parametrize(("dtype", "precision", "levels"), [
    ("uint8", "fp32", 1), ("uint8", "bf16", 2), ("float16", "fp32", 1e-3),
    ("float32", "fp32", 1e-5)])
def test_the_stand_in_output_is_the_activated_input_in_every_dtype(
        write, tmp_path, dtype, precision, levels):
    """Blending equal values gives the value: the engine's output with the stand-in is the
    activated input itself, a valid probability that survives quantisation (and varies)."""
    recipe = load_recipe(write(THREE_ACTIVATIONS), [f"infer.dtype={dtype}",
                                                    f"infer.precision={precision}"]).recipe
    image = bench.synthetic_image((6, 40, 48))
    write_volume(tmp_path / "in.zarr", "image", image)
    model = models.build(recipe.model, head_channels=recipe.head_channels())
    torch.save({"model": model.state_dict(), "iteration": 0}, tmp_path / "m.pt")
    job = prepare_job(recipe, tmp_path / "m.pt", str(tmp_path / "in.zarr/image"),
                      tmp_path / "out.zarr", block=(6, 24, 24))
    BlockWorker(job, torch.device("cpu"), model=standin.stand_in(recipe)).run(job.pending())
    low, high = job.scale
    x = torch.from_numpy(((image.astype(np.float32) - low) / (high - low)).clip(0, 1))
    activation = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "none": lambda t: t}
    for name, task in recipe.tasks.items():
        p = activation[task.activation](standin.PRE_ACTIVATIONS[task.activation](x)).numpy()
        assert p.min() >= 0 and p.max() <= 1
        want = np.round(p * 255) if dtype == "uint8" else p
        got = zarr.open_array(str(tmp_path / "out.zarr" / name / "0"))[...]
        assert got.shape == (task.channels(), *image.shape) and got.dtype == dtype
        for channel in got:
            np.testing.assert_allclose(channel.astype(np.float64), want, atol=levels, rtol=0)
        assert got.std() > 0


def test_workers_scale_the_stand_in_over_the_same_volume(write):
    result = runner.invoke(app, ["bench", "infer", str(write(MINIMAL)), "--no-model", *SMALL,
                                 "--workers", "2", *FAST])
    rows = figures(result)["workers"]
    assert [r["workers"] for r in rows] == [1, 2]  # 1 always: the speed-ups' baseline
    for row in rows:  # seconds are rounded to 1 ms, voxels/s to 0.1: within both roundings
        voxels, seconds = 8 * 48 * 48, row["seconds"]
        assert voxels / (seconds + 6e-4) - 0.06 <= row["voxels_per_s"] <= \
            voxels / max(seconds - 6e-4, 1e-6) + 0.06
        assert row["speedup"] == round(row["voxels_per_s"] / rows[0]["voxels_per_s"], 3)
        assert 0 < row["first_block_seconds"] <= row["seconds"]
        assert row["predicted_patches"] >= 8  # the lattice's patches; more across units
        assert row["duplicate_fraction"] == round(row["predicted_patches"] / 8 - 1, 4)
    assert rows[0]["duplicate_fraction"] == 0  # one worker: one unit, each patch once
    assert "local worker processes" in result.stderr and "first block" in result.stderr


def test_host_memory_beside_no_device_budget_keeps_one_unit_without_duplicates(write):
    """`bench infer --handover-host-memory`: as infer's, the units are chosen for both
    budgets together, and the figures say the host memory beside the budget."""
    args = ["bench", "infer", str(write(MINIMAL)), "--no-model", *SMALL, *FAST,
            "--handover-memory", "0"]
    alone = figures(runner.invoke(app, args))
    hosted = runner.invoke(app, [*args, "--handover-host-memory", "1GiB"])
    f = figures(hosted)
    assert alone["units"] == 8 and alone["duplicate_fraction"] > 0
    assert f["units"] == 1 and f["duplicate_fraction"] == 0
    assert f["handover_budget_bytes"] == 0 and f["handover_host_bytes"] == 1 << 30
    assert "hand-over budget of 0 bytes and 1.1 GB of host memory" in hosted.stderr


def test_workers_with_the_model_go_through_run_local(write, monkeypatch):
    calls = []
    real = schedule.run_local

    def recorded(job, slots, **kwargs):
        calls.append(slots)
        return real(job, slots, **kwargs)

    monkeypatch.setattr(schedule, "run_local", recorded)
    result = runner.invoke(app, ["bench", "infer", str(write(MINIMAL)), *SMALL,
                                 "--workers", "1", *FAST])
    assert [r["workers"] for r in figures(result)["workers"]] == [1]
    assert calls == [schedule.worker_slots("cpu", 1)]


def test_worker_counts_and_a_default_volume_with_blocks_for_every_worker(write):
    assert bench.worker_counts(["4,2", "2"]) == [1, 2, 4]
    assert bench.worker_counts(None) == []
    for bad in (["0"], ["1,x"], ["-2"]):
        with pytest.raises(UserError, match="--workers"):
            bench.worker_counts(bad)
    recipe = load_recipe(write(MINIMAL)).recipe
    assert bench.default_shape(recipe, None, 1) == (24, 96, 96)  # three patches, as before
    for workers in (2, 3, 8):
        shape = bench.default_shape(recipe, None, workers)
        assert bench.block_count(bench.bench_layout(recipe, shape, None)) >= 2 * workers


def test_the_config_grid(write):
    recipe = load_recipe(write(MINIMAL)).recipe  # batch 4
    eager = infer_configs.config_grid(recipe, False)
    assert {(c.batch_size, c.channels_last, c.compile) for c in eager} == {
        (b, layout, None) for b in (4, 8, 16) for layout in (True, False)}
    searched = infer_configs.config_grid(recipe, True)
    assert len(searched) == 3 * 2 * 2 and {c.compile for c in searched} == {None, "default"}
    best = infer_configs.Config(8, False, "default")
    assert [c.compile for c in infer_configs.extra_configs(best, "cuda", True)] == [
        "max-autotune", "reduce-overhead"]
    assert infer_configs.extra_configs(best, "cpu", True) == []
    assert infer_configs.extra_configs(best, "cuda", False) == []
    big = load_recipe(write(MINIMAL), ["infer.batch_size=512"]).recipe
    assert [c.batch_size for c in infer_configs.config_grid(big, False)] == [512, 512, 1024, 1024]
    row = {"batch_size": 8, "channels_last": False, "compile": "default"}
    assert infer_configs.config_overrides(recipe, row, True) == [
        "infer.batch_size=8", "infer.channels_last=false", "infer.compile=true"]
    assert infer_configs.config_overrides(recipe, row, False) == [
        "infer.batch_size=8", "infer.channels_last=false"]
    graphs = {"batch_size": 4, "channels_last": None, "compile": "reduce-overhead"}
    assert infer_configs.config_overrides(recipe, graphs, True) == [
        "infer.compile=true", "infer.compile_mode=reduce-overhead"]
    compiled = load_recipe(write(MINIMAL), ["infer.compile=true"]).recipe
    assert infer_configs.config_overrides(compiled, {**graphs, "compile": None}, True) == [
        "infer.compile=false"]
    assert infer_configs.recipe_config(compiled) == infer_configs.Config(4, True, "default")


def test_configs_on_a_cpu_leave_compile_out_unless_asked(write, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(kw) or model)
    monkeypatch.setattr(bench, "_monai_rate", lambda *a: None)
    args = ["bench", "infer", str(write(MINIMAL)), *TINY, "--configs"]
    f = figures(runner.invoke(app, [*args, *FAST]))
    assert compiled == [] and {r["compile"] for r in f["configs"]} == {None}
    assert {r["batch_size"] for r in f["configs"]} == {4, 8, 16}
    assert {r["channels_last"] for r in f["configs"]} == {True, False}
    best = f["best_config"]
    assert best["voxels_per_s"] == max(r["voxels_per_s"] for r in f["configs"])
    assert best["overrides"] == (
        ([] if best["batch_size"] == 4 else [f"infer.batch_size={best['batch_size']}"])
        + ([] if best["channels_last"] else ["infer.channels_last=false"]))
    assert any("--compile" in note for note in f["notes"])
    result = runner.invoke(app, [*args, "--compile", *FAST])
    f = figures(result)
    assert len(compiled) == 6 and all(kw.get("mode") in (None, "default") for kw in compiled)
    assert {(r["batch_size"], r["channels_last"], r["compile"]) for r in f["configs"]} == {
        (b, layout, c) for b in (4, 8, 16) for layout in (True, False)
        for c in (None, "default")}
    assert "model alone by configuration" in result.stderr and "best:" in result.stderr


def test_a_config_that_fails_is_recorded_and_the_search_goes_on(write, monkeypatch):
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("no C++ compiler\nsecond line")

    monkeypatch.setattr(torch, "compile", lambda model, **kw: Broken())
    monkeypatch.setattr(bench, "_monai_rate", lambda *a: None)
    f = figures(runner.invoke(app, ["bench", "infer", str(write(MINIMAL)), *TINY, "--configs",
                                    "--compile", *FAST]))
    failed = [r for r in f["configs"] if r["compile"] == "default"]
    assert failed and all(r["error"] == "RuntimeError: no C++ compiler" for r in failed)
    assert f["best_config"]["compile"] is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["infer", "model", "train"])
def test_bench_on_a_gpu_that_is_not_there_is_a_user_error(write, command):
    result = runner.invoke(app, ["bench", command, str(write(MINIMAL)), "--device", "cuda"])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: --device cuda:") and "internal" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [
    ["--shape", "0", "48", "48"], ["--shape", "8", "-1", "48"], ["--block", "0", "8", "8"],
    ["--workers", "0"], ["--no-model", "--configs"],
    ["--block", "4", "24", "24"]])  # under one patch stride: refused before generating
def test_bad_options_are_one_line_and_exit_2(write, args, monkeypatch):
    monkeypatch.setattr(bench, "synthetic_image", lambda shape: pytest.fail("generated"))
    result = runner.invoke(app, ["bench", "infer", str(write(MINIMAL)), *args, *FAST])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(("where", "says"), [("free_disk", "of disk"),
                                             ("available_memory", "of memory")])
def test_a_volume_that_does_not_fit_is_refused_before_anything_is_generated(
        write, monkeypatch, where, says):
    monkeypatch.setattr(room, where, lambda *a: 10**6)  # where check_room looks
    monkeypatch.setattr(bench, "synthetic_image", lambda shape: pytest.fail("generated"))
    result = runner.invoke(app, ["bench", "infer", str(write(MINIMAL)), "--shape", "64",
                                 "512", "512", *FAST])
    assert result.exit_code == 2, result.output
    assert says in result.stderr and "1 MB is free" in result.stderr
    assert "17 MB uint8" in result.stderr  # the input: 64 x 512 x 512 voxels of one byte


def test_the_estimate_counts_input_outputs_and_a_block_per_worker(write):
    recipe = load_recipe(write(MINIMAL), ["infer.dtype=float16"]).recipe
    layout = bench.bench_layout(recipe, (8, 48, 48), (6, 24, 24))
    needs = room.estimate_needs(recipe, layout, 2, on_gpu=False)
    voxels = 8 * 48 * 48
    assert needs.input == voxels and needs.output == 3 * voxels * 2  # 3 affinities, float16
    assert needs.disk == needs.input + needs.output
    block = 2 * math.prod((6 + 8, 24 + 32, 24 + 32)) * 4 * (3 + 2)
    assert needs.memory == voxels + block and needs.device == 0
    on_gpu = room.estimate_needs(recipe, layout, 2, on_gpu=True)
    assert on_gpu.memory == voxels and on_gpu.device == block


def test_monai_is_skipped_with_a_note_when_it_would_not_fit(write, monkeypatch):
    recipe = load_recipe(write(MINIMAL)).recipe
    monkeypatch.setattr(bench, "available_memory", lambda: 10**3)
    monkeypatch.setattr(bench, "_monai_rate", lambda *a: pytest.fail("ran MONAI"))
    notes: list[str] = []
    image = np.zeros((8, 48, 48), np.uint8)
    assert bench._monai_if_room(recipe, None, image, torch.device("cpu"), notes) is None
    assert notes and notes[0].startswith("MONAI skipped")


def test_each_config_runs_a_contiguous_copy_of_the_model(write):
    """The bench's own engine may have made the model channels_last_3d (in place, on a GPU):
    a contiguous config must not inherit that, nor change the model it copies."""
    recipe = load_recipe(write(MINIMAL)).recipe
    model = models.build(recipe.model, head_channels=recipe.head_channels())
    model = model.to(memory_format=torch.channels_last_3d)
    config = infer_configs.Config(8, False, None)
    engine = infer_configs._config_engine(recipe, model, torch.device("cpu"), config)
    conv = [p for p in engine.model.parameters() if p.dim() == 5]
    assert conv and all(p.is_contiguous() for p in conv) and engine.batch_size == 8
    assert not all(p.is_contiguous() for p in model.parameters() if p.dim() == 5)


def test_generating_the_input_counts_against_the_memory(write, monkeypatch):
    """The synthesizer's working memory for the generated block (70 bytes a voxel and its
    matrices: `synth.peak_memory`) is checked up front, not only the finished uint8 input and
    the blocks."""
    recipe = load_recipe(write(MINIMAL)).recipe
    shape = (64, 512, 512)
    layout = bench.bench_layout(recipe, shape, None)
    without = room.estimate_needs(recipe, layout, 1, on_gpu=False)
    needs = room.estimate_needs(recipe, layout, 1, on_gpu=False,
                                tile=bench.synthetic_tile(shape))
    assert needs.generate == peak_memory(shape) >= math.prod(shape) * MEMORY_PER_VOXEL
    assert needs.memory > without.memory + 10**6
    monkeypatch.setattr(room, "available_memory", lambda: without.memory + 10**6)
    monkeypatch.setattr(bench, "synthetic_image", lambda shape: pytest.fail("generated"))
    result = runner.invoke(app, ["bench", "infer", str(write(MINIMAL)), "--shape", "64",
                                 "512", "512", *FAST])
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert "of memory" in result.stderr and "generating it 1.4 GB" in result.stderr


def test_an_address_space_limit_counts_as_the_memory_free(write, monkeypatch):
    """Under `ulimit -v` the machine's free memory is not what this process can allocate:
    the room left under the limit is."""
    import emrun.devices as devices

    mapped = devices._mapped()
    assert mapped > 0  # Linux: /proc/self/status
    limits = types.SimpleNamespace(RLIMIT_AS=resource.RLIMIT_AS,
                                   RLIM_INFINITY=resource.RLIM_INFINITY,
                                   getrlimit=lambda which: (mapped + 5 * 10**6,
                                                            resource.RLIM_INFINITY))
    monkeypatch.setattr(devices, "resource", limits)
    assert devices.available_memory() < 6 * 10**6
    monkeypatch.setattr(bench, "synthetic_image", lambda shape: pytest.fail("generated"))
    result = runner.invoke(app, ["bench", "infer", str(write(MINIMAL)), "--shape", "64",
                                 "512", "512", *FAST])
    assert result.exit_code == 2, result.output
    assert "of memory" in result.stderr  # infer's own check or the benchmark's, up front


def test_a_container_s_memory_limit_counts_as_the_memory_free(tmp_path, monkeypatch):
    """In a container the machine's MemAvailable is not what this process may use: its
    cgroup's limit less its usage is; 'max' (v2) means no limit."""
    import emrun.devices as devices

    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    limit.write_text("3000000000\n")
    usage.write_text("1000000000\n")
    monkeypatch.setattr(devices, "CGROUP_MEMORY", ((str(limit), str(usage)),))
    monkeypatch.setattr(devices, "_machine_memory", lambda: 20 * 10**9)
    assert devices.available_memory() == 2 * 10**9
    limit.write_text("max\n")
    assert devices.available_memory() == 20 * 10**9


def test_a_default_volume_for_workers_takes_any_block_infer_takes(write):
    """The default shape is sized on a deep stand-in volume, which is no job: the block
    count limit is not applied to it (a small --block with --workers was refused)."""
    recipe = load_recipe(write(MINIMAL)).recipe
    shape = bench.default_shape(recipe, (6, 24, 24), 2)
    assert bench.block_count(bench.bench_layout(recipe, shape, (6, 24, 24))) >= 4


def test_the_first_block_time_is_a_blocks_not_the_plans():
    """`run_local` reports its plan before any block: bench's clock of completions (the
    worker runs' `first_block_seconds`) takes no time for it."""
    from emrun.bench.infer import Completions
    from emrun.infer.schedule import Progress
    from emrun.infer.worker import BlockDone

    clock = Completions()
    clock.mark(Progress(total=4, unit=(1, 1, 1)))
    assert clock.times == []
    clock.mark(Progress(total=4, done=1))
    clock.mark(BlockDone((0, 0, 1), 10, 2))
    assert len(clock.times) == 2
