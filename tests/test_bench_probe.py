"""The figures `emrun validate` and `emrun bench ...` report, checked against independent
computations: parameters against the built module's tensors, FLOPs per voxel against a count
by forward hooks, receptive fields against which outputs change when one input voxel does,
and a bench's rates, shares and JSON against each other; plus the one-line refusals."""

from __future__ import annotations

import json
import math
import re
import time

import pytest
import torch
from conftest import ROOT
from torch import nn
from typer.testing import CliRunner

import emrun.models  # noqa: F401  (registers the implementations)
from emrun.bench import bench_device
from emrun.bench.segment import report_lines as segment_lines
from emrun.cli import app
from emrun.errors import UserError
from emrun.models.facts import model_facts
from emrun.recipe.model import RSUNet, UpDown
from emrun.recipe.unets import MedNeXt, ResEnc
from emrun.registry import models
from emrun.summary import flops_text

runner = CliRunner()
DEMO = str(ROOT / "recipes" / "demo.yaml")
TINY = ["-o", "model.widths=[1]", "-o", "model.groups=1",
        "-o", "tasks.affinity.target.offsets=[[-1, 0, 0]]"]
"""The demo recipe with a one-channel, one-level RSUNet: a few hundred FLOPs per voxel."""


def hook_flops_per_voxel(model: nn.Module, x: torch.Tensor) -> float:
    """Conv and transposed-conv FLOPs (multiply-add = 2) of one forward, per input voxel,
    counted from the layers' shapes as they run."""
    total = [0]

    def count(m: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        kernel = math.prod(m.kernel_size)  # type: ignore[arg-type]
        if isinstance(m, nn.ConvTranspose3d):  # each input voxel meets the whole kernel
            total[0] += (2 * inputs[0].shape[0] * m.in_channels * (m.out_channels // m.groups)
                         * kernel * math.prod(inputs[0].shape[2:]))
        else:
            total[0] += 2 * out.numel() * (m.in_channels // m.groups) * kernel  # type: ignore[operator]

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, nn.Conv3d | nn.ConvTranspose3d)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return total[0] / math.prod(x.shape[2:])


FACT_SPECS = [
    RSUNet(widths=[4, 8, 8]),
    RSUNet(widths=[2, 3], upsample="transpose", in_channels=2, downsample=[(2, 3, 2)]),
    UpDown(widths=[2, 4], factor=(2, 2, 1)),
    ResEnc(widths=[4, 8, 8]),
    ResEnc(widths=[2, 4], upsample="interp", blocks=[1, 2]),
    MedNeXt(widths=[4, 8, 8]),
    MedNeXt(widths=[2, 2], blocks=[1, 1], expansion=3),
]


@pytest.mark.parametrize("spec", FACT_SPECS, ids=lambda s: s.type)
def test_parameters_and_flops_match_counts_of_the_built_model(spec):
    torch.manual_seed(0)
    model = models.build(spec, head_channels={"a": 3, "b": 1}).eval()
    patch = tuple(2 * d for d in spec.divisor())
    facts = model_facts(model, spec, patch)
    assert facts.params == sum(p.numel() for p in model.parameters())
    if hasattr(spec, "parameter_count"):
        assert spec.parameter_count([3, 1]) == facts.params
    x = torch.rand((1, spec.input_channels(), *patch))
    assert facts.flops_per_voxel == pytest.approx(hook_flops_per_voxel(model, x), rel=1e-9)


def changed_outputs(model: nn.Module, spec, axis: int, n: int) -> torch.Tensor:
    """[i, o]: whether output o along ``axis`` changes when input voxel i along it does
    (every other position of the thin volume counted), in float64 on a random base image
    (no max-pool ties). One forward per input of one shape: the same computation for every
    unaffected output, so it is bitwise the same (a batch may round its samples apart)."""
    size = [2 * d for d in spec.divisor()]
    size[axis] = n
    base = torch.rand((1, 1, *size), dtype=torch.float64,
                      generator=torch.Generator().manual_seed(1))
    other = tuple(1 + a for a in range(3) if a != axis)  # of (1, z, y, x)
    changed = torch.zeros((n, n), dtype=torch.bool)
    with torch.no_grad():
        ref = model(base)["a"]
        for i in range(n):
            x = base.clone()
            index = [0, 0, slice(None), slice(None), slice(None)]
            index[2 + axis] = i
            x[tuple(index)] += 1.0
            changed[i] = (model(x)["a"] != ref).any(dim=1).amax(dim=other)[0]
    return changed


def perturbation_receptive_field(spec, stated: tuple[int, int, int]) -> tuple[int, ...]:
    """Per axis, the widest span of input voxels that change one output voxel, over the
    outputs whose span stays off the volume's ends."""
    torch.manual_seed(0)
    model = models.build(spec, head_channels={"a": 2}).double().eval()
    field = []
    for axis in range(3):
        d = spec.divisor()[axis]
        n = math.ceil((stated[axis] + 4 * d + 8) / d) * d  # room for a span or a wider one
        infl = changed_outputs(model, spec, axis, n)
        best = 0
        for o in range(n):
            hit = torch.nonzero(infl[:, o]).flatten()
            if len(hit) and int(hit.min()) > 0 and int(hit.max()) < n - 1:
                best = max(best, int(hit.max()) - int(hit.min()) + 1)
        field.append(best)
    return tuple(field)


RF_SPECS = [
    RSUNet(widths=[1, 1], norm="none", downsample=[(2, 3, 2)], kernel=(3, 5, 3),
           upsample="transpose", activation="leaky_relu"),
    RSUNet(widths=[1, 1], norm="none", anisotropic_levels=[0], input_kernel=(3, 3, 1),
           downsample=[(1, 3, 1)]),
    UpDown(widths=[1, 1], norm="none", factor=(2, 2, 1)),
    ResEnc(widths=[1, 1], blocks=[1, 2], norm="none", downsample=[(2, 3, 2)],
           anisotropic_levels=[], kernel=(3, 5, 3)),
    ResEnc(widths=[1, 1], blocks=[1, 1], norm="none", upsample="interp", activation="elu"),
    MedNeXt(widths=[1, 1], blocks=[1, 1], norm="none", downsample=[(2, 3, 2)],
            kernel=(3, 5, 3), expansion=1),
]


@pytest.fixture
def one_thread():
    """Hundreds of tiny forwards: one thread runs each in 2 ms, two on a busy machine in
    100 ms (they wait for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("spec", RF_SPECS, ids=lambda s: s.type)
def test_stated_receptive_field_is_what_a_one_voxel_change_reaches(spec, one_thread):
    stated = spec.receptive_field()
    assert perturbation_receptive_field(spec, stated) == stated


def model_line(output: str) -> str:
    return next(line for line in output.splitlines() if line.startswith("model "))


def test_validate_shows_a_small_models_flops_not_zero_kflop():
    result = runner.invoke(app, ["validate", DEMO, "--no-data", *TINY])
    assert result.exit_code == 0, result.output
    line = model_line(result.output)
    spec = RSUNet(widths=[1], norm="group", groups=1)
    torch.manual_seed(0)
    model = models.build(spec, head_channels={"affinity": 1})
    flops = hook_flops_per_voxel(model, torch.rand((1, 1, 12, 64, 64)))
    params = sum(p.numel() for p in model.parameters())
    assert "0 kFLOP" not in line
    assert f"{flops:,.0f} FLOP per output voxel" in line
    assert f"{params:,} parameters" in line
    assert f"receptive field {' x '.join(map(str, spec.receptive_field()))}" in line


def test_validate_shows_three_significant_figures_of_kflop():
    result = runner.invoke(app, ["validate", DEMO, "--no-data", "-o", "model.widths=[2, 2]",
                                 "-o", "model.groups=1"])
    assert result.exit_code == 0, result.output
    spec = RSUNet(widths=[2, 2], norm="group", groups=1)
    torch.manual_seed(0)
    model = models.build(spec, head_channels={"affinity": 6})
    flops = hook_flops_per_voxel(model, torch.rand((1, 1, 12, 64, 64)))
    assert f"{flops_text(flops)} per output voxel" in model_line(result.output)


@pytest.mark.parametrize("divisor", [(0, 1, 1), (2, 2), (1, -2, 1), None])
def test_a_specs_bad_divisor_is_one_located_line_naming_the_model(monkeypatch, divisor):
    monkeypatch.setattr(RSUNet, "divisor", lambda self: divisor)
    result = runner.invoke(app, ["validate", DEMO, "--no-data"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert "demo.yaml:" in lines[0] and "model.type" in lines[0]
    assert "'rsunet'" in lines[0] and "divisor()" in lines[0]


@pytest.mark.parametrize("name", ["mps", "meta", "xpu"])
def test_bench_device_other_than_cpu_or_cuda_is_refused(name):
    with pytest.raises(UserError, match=f"--device {name}: .*cpu or cuda"):
        bench_device(name)


def test_bench_model_with_an_unusable_device_exits_2_in_one_line():
    result = runner.invoke(app, ["bench", "model", DEMO, "--device", "mps", "--no-compile"])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_bench_model_figures_agree_with_the_model_and_each_other():
    result = runner.invoke(app, ["bench", "model", DEMO, *TINY, "-o", "train.patch=[4, 16, 16]",
                                 "-o", "infer.patch=[4, 16, 16]", "--steps", "3",
                                 "--no-compile", "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output.strip().splitlines()[-1])
    spec = RSUNet(widths=[1], norm="group", groups=1)
    model = models.build(spec, head_channels={"affinity": 1})
    assert figures["params"] == sum(p.numel() for p in model.parameters())
    assert figures["flops_per_voxel"] == pytest.approx(
        hook_flops_per_voxel(model, torch.rand((1, 1, 4, 16, 16))))
    assert figures["receptive_field"] == list(spec.receptive_field())
    voxels = figures["batch_size"] * math.prod(figures["patch"])
    for config in figures["configs"]:
        assert config["voxels_per_s"] == pytest.approx(voxels / (config["step_ms"] / 1e3),
                                                       rel=0.01, abs=0.5)
    assert figures["step_voxels_per_s"] == max(c["voxels_per_s"] for c in figures["configs"])


def test_bench_model_text_shows_a_small_models_flops():
    result = runner.invoke(app, ["bench", "model", DEMO, *TINY, "-o", "train.patch=[4, 16, 16]",
                                 "-o", "infer.patch=[4, 16, 16]", "--steps", "1",
                                 "--no-compile"])
    assert result.exit_code == 0, result.output
    assert " 0 kFLOP" not in result.output


def test_bench_infer_no_model_figures_agree_with_each_other_and_the_text():
    result = runner.invoke(app, ["bench", "infer", DEMO, "--shape", "24", "96", "96",
                                 "--block", "12", "48", "48", "--no-model", "--device", "cpu",
                                 "--json"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    r = json.loads(lines[-1])
    voxels = math.prod(r["volume"])
    assert r["volume"] == [24, 96, 96] and r["blocks"] == 2 * 2 * 2
    rounding = 0.0005 / r["engine_seconds"]  # engine_seconds is given to the millisecond
    assert r["engine_voxels_per_s"] == pytest.approx(voxels / r["engine_seconds"],
                                                     rel=rounding + 1e-4)
    assert r["engine_voxels_per_s_per_core"] == pytest.approx(
        r["engine_voxels_per_s"] / r["cpu_cores"], rel=1e-6)
    for stage, seconds in r["stage_seconds"].items():
        assert r["stage_shares"][stage] == pytest.approx(seconds / r["engine_seconds"],
                                                         abs=1e-3)
    # per axis, patches a stride apart must cover the volume, and need not pass it by a stride
    lattice = r["lattice_patches"]
    axes = list(zip(r["volume"], r["patch"], r["stride"], strict=True))
    assert math.prod(max(1, math.ceil((n - p) / s) + 1) for n, p, s in axes) <= lattice
    assert lattice <= math.prod(math.ceil(n / s) + 1 for n, p, s in axes)
    assert r["overlap"] == pytest.approx(lattice * math.prod(r["patch"]) / voxels, abs=1e-3)
    assert r["duplicate_fraction"] == pytest.approx(
        r["predicted_patches"] / r["lattice_patches"] - 1, abs=1e-4)
    assert r["model_voxels_per_s"] is None and r["efficiency"] is None
    text = "\n".join(lines[:-1])
    assert f"{r['engine_voxels_per_s'] / 1e6:.3f} Mvoxel/s" in text
    assert f"patches predicted {r['predicted_patches']:,} of {r['lattice_patches']:,}" in text


def test_bench_segment_report_shows_a_small_volumes_size():
    result = {"shape": [16, 64, 64], "block": [8, 32, 32], "threshold": 0.5,
              "agglomeration": "global", "voxels": 16 * 64 * 64, "machine": "m", "runs": []}
    first = segment_lines(result)[0]
    assert "(0 M voxels)" not in first
    assert re.search(r"\(0\.0655 M voxels\)", first)


def test_bench_infer_holds_one_output_on_disk_at_a_time(monkeypatch):
    """check_room counts the input and one output; the worker runs must not write theirs
    next to the engine run's, which would need twice the outputs' disk."""
    from emrun.bench import infer as bench

    seen: list[bool] = []
    real = bench._scaling

    def scaling(recipe, root, *args, **kwargs):
        seen.append((root / "out.zarr").exists())
        return real(recipe, root, *args, **kwargs)

    monkeypatch.setattr(bench, "_scaling", scaling)
    result = runner.invoke(app, ["bench", "infer", DEMO, "--shape", "12", "64", "64",
                                 "--no-model", "--device", "cpu", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert seen == [False]


def small_demo():
    from emrun.recipe import load_recipe

    # weighted, as `--synthetic` makes them: no source is read to weigh it
    return load_recipe(DEMO, [f"data.sources.{name}.{key}={value}"
                              for name in ("synth_a", "synth_b")
                              for key, value in (("shape", "[20, 100, 100]"), ("weight", 1))
                              ]).recipe


HOUR = 3600.0


class FakeClock:
    """time.perf_counter plus what `advance` added: a one-off cost the bench must leave
    out, made visible without waiting for it (and without asserting a real duration)."""

    def __init__(self) -> None:
        self.real, self.added = time.perf_counter, 0.0

    def __call__(self) -> float:
        return self.real() + self.added

    def advance(self, seconds: float) -> None:
        self.added += seconds


def fake_clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    clock = FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    return clock


def test_bench_data_stage_costs_leave_out_a_sources_one_off_generation(monkeypatch):
    """A synthetic source is generated on its first read, once; timed as one sample's read,
    it made the demo's mean read 1314 ms where the median sample took 2 ms."""
    import emrun.synth
    from emrun.bench.data import stage_costs
    from emrun.data import sources

    real = emrun.synth.synthesize
    clock = fake_clock(monkeypatch)

    def slow(*args, **kwargs):
        clock.advance(HOUR)  # a generation that costs an hour of the clock the bench reads
        return real(*args, **kwargs)

    sources._synthetic.cache_clear()
    monkeypatch.setattr(emrun.synth, "synthesize", slow)
    per_stage, totals = stage_costs(small_demo(), 4)
    sources._synthetic.cache_clear()
    assert len(totals) == 4
    # an hour over 4 samples when generation is timed; otherwise no trace of it
    assert per_stage["sample"] < HOUR * 1e3 / 100 and max(totals) < HOUR * 1e3 / 100


def test_bench_data_unpack_cost_is_not_the_first_calls(monkeypatch):
    """The first unpack pays torch's one-off set-up (40 ms against 0.3 ms per sample)."""
    from emrun.bench import data as bench

    calls = []
    real = bench.unpack

    clock = fake_clock(monkeypatch)

    def first_slow(batch, *args):
        if not calls:
            clock.advance(HOUR)  # the first call's set-up, an hour of the bench's clock
        calls.append(1)
        return real(batch, *args)

    monkeypatch.setattr(bench, "unpack", first_slow)
    recipe = small_demo()
    rate, unpack_ms = bench.throughput(recipe, 0, 2)
    assert rate > 0 and len(calls) > 1
    assert unpack_ms < HOUR * 1e3 / 100  # half an hour per sample when the first is timed


def test_bench_segment_rate_per_core_counts_the_cores_a_run_keeps_busy(tmp_path):
    """One block keeps one worker busy whatever --workers says: its rate per core is the
    voxels over the fragments + graph seconds, not a third of it for --workers 3."""
    from emrun.bench.segment import bench_segment

    result = bench_segment((8, 32, 32), (8, 32, 32), [3], folder=tmp_path)
    (run,) = result["runs"]
    assert run["workers"] == 3 and run["busy_cores"] == 1
    seconds = run["steps"]["fragments"] + run["steps"]["graph"]
    assert run["fragments_graph_mvox_per_s_per_core"] == pytest.approx(
        result["voxels"] / seconds / 1e6, rel=0.02, abs=1e-3)
    assert run["scaling"] == 1.0


def test_bench_infer_no_model_refuses_a_task_the_stand_in_cannot_produce(monkeypatch):
    from emrun.bench import standin

    monkeypatch.delitem(standin.PRE_ACTIVATIONS, "sigmoid")
    result = runner.invoke(app, ["bench", "infer", DEMO, "--no-model", "--device", "cpu"])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert "--no-model" in line and "'affinity'" in line and "sigmoid" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="refuses only where there is no GPU")
@pytest.mark.parametrize("command", [["infer", DEMO, "--no-model"], ["model", DEMO],
                                     ["train", DEMO]])
def test_bench_on_cuda_without_a_gpu_exits_2_in_one_line(command):
    result = runner.invoke(app, ["bench", *command, "--device", "cuda"])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: --device cuda")
