"""The inference engine: block-size independence, resume, refusals, masks, small inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
import zarr
from typer.testing import CliRunner

from emrun.cli import app
from emrun.errors import UserError
from emrun.geometry import Roi
from emrun.infer.engine import reflect_index
from emrun.infer.plan import Layout
from emrun.infer.run import plan_inference, run_inference
from emrun.io import VolumeError, open_volume
from emrun.io.write import write_volume
from emrun.recipe import Recipe
from emrun.registry import blends, models

OFFSETS = [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [0, -5, 0]]


def make_recipe(**infer) -> Recipe:
    return Recipe.model_validate({
        "name": "i", "data": {"sources": {"a": {"type": "synthetic", "shape": [16, 64, 64]}}},
        "model": {"type": "rsunet", "widths": [4, 8]},
        "tasks": {"aff": {"target": {"type": "affinity", "offsets": OFFSETS}},
                  "mito": {"target": {"type": "binary", "volume": "mito"}}},
        "train": {"patch": [4, 16, 16], "iterations": 1},
        "infer": {"dtype": "float32", "overlap": [0.5, 0.25, 0.25], "batch_size": 3,
                  "precision": "fp32", **infer},
    })


def make_inputs(tmp_path, shape=(11, 37, 45), recipe=None):
    """A recipe (default `make_recipe`'s), a checkpoint (c.pt) with lively random weights and
    a random input volume (in.zarr/image)."""
    recipe = recipe or make_recipe()
    torch.manual_seed(0)
    model = models.build(recipe.model, head_channels=recipe.head_channels())
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    torch.save({"model": model.state_dict(), "iteration": 1}, tmp_path / "c.pt")
    volume = (np.random.default_rng(0).random(shape) * 255).astype(np.uint8)
    write_volume(tmp_path / "in.zarr", "image", volume, voxel_size=(30, 6, 6))
    return recipe, model.eval(), volume, tmp_path


@pytest.fixture
def setup(tmp_path):
    return make_inputs(tmp_path)


def read(path, task="aff"):
    return zarr.open_array(str(path / task / "0"))[...]


def reference(recipe, model, volume, roi=None):
    """Whole-volume (or whole-ROI: offset, shape) sliding window, written independently of
    the engine; context outside a ROI comes from the volume, reflected at its borders."""
    offset, shape = roi or ((0, 0, 0), volume.shape)
    layout = Layout(shape, (4, 16, 16), recipe.infer.resolved_stride((4, 16, 16)),
                    (1, 1, 1), (1, 1, 1))
    window = torch.from_numpy(blends.build(recipe.infer.blend, patch=(4, 16, 16)))
    starts = [layout.starts(a) for a in range(3)]
    lo = [s[0] for s in starts]
    hi = [s[-1] + p for s, p in zip(starts, (4, 16, 16), strict=True)]
    index = [reflect_index(np.arange(a, b) + o, n)
             for a, b, o, n in zip(lo, hi, offset, volume.shape, strict=True)]
    padded = torch.from_numpy(volume[np.ix_(*index)].astype(np.float32) / 255)
    acc = torch.zeros((len(OFFSETS), *padded.shape))
    weight = torch.zeros(padded.shape)
    with torch.no_grad():
        for z in starts[0]:
            for y in starts[1]:
                for x in starts[2]:
                    s = (slice(z - lo[0], z - lo[0] + 4), slice(y - lo[1], y - lo[1] + 16),
                         slice(x - lo[2], x - lo[2] + 16))
                    out = torch.sigmoid(model(padded[s][None, None])["aff"][0])
                    acc[(slice(None), *s)] += out * window
                    weight[s] += window
    core = tuple(slice(-a, -a + n) for a, n in zip(lo, shape, strict=True))
    return (acc[(slice(None), *core)] / weight[core]).numpy()


def test_output_does_not_depend_on_the_block_size(setup):
    recipe, model, volume, tmp = setup
    want = reference(recipe, model, volume)
    for i, block in enumerate([(4, 16, 16), (8, 32, 32), (12, 48, 48)]):
        out = tmp / f"o{i}.zarr"
        run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), out, block=block)
        np.testing.assert_allclose(read(out), want, atol=1e-5, rtol=0)
    written = open_volume(f"{tmp}/o0.zarr/aff")
    assert written.shape == (4, 11, 37, 45) and written.voxel_size == (30.0, 6.0, 6.0)
    assert zarr.open_group(str(tmp / "o0.zarr/aff")).attrs["offsets"] == OFFSETS


def test_roi_predicts_a_box_with_the_volume_around_it_as_context(setup):
    recipe, model, volume, tmp = setup
    roi = Roi((3, 10, 5), (6, 20, 33))
    want = reference(recipe, model, volume, (roi.offset, roi.shape))
    out = tmp / "roi.zarr"
    run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), out, block=(4, 16, 16),
                  roi=roi)
    np.testing.assert_allclose(read(out), want, atol=1e-5, rtol=0)
    written = open_volume(f"{out}/aff")
    assert written.shape == (4, 6, 20, 33) and written.offset[-3:] == (3, 10, 5)
    with pytest.raises(UserError, match="does not lie inside"):
        run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), tmp / "bad.zarr",
                      roi=Roi((0, 0, 0), (12, 1, 1)))
    for bad in ("1,2/3,4,5", "x"):
        result = CliRunner().invoke(app, ["infer", "--recipe", "r.yaml", "--checkpoint", "c.pt",
                                          "--input", "i", "--output", "o", "--roi", bad])
        assert result.exit_code == 2 and "--roi" in result.stderr


def test_uint8_output_is_rounded_probability(setup):
    _, model, volume, tmp = setup
    want = reference(make_recipe(), model, volume)
    run_inference(make_recipe(dtype="uint8"), tmp / "c.pt", str(tmp / "in.zarr/image"),
                  tmp / "u.zarr", block=(8, 32, 32))
    got = read(tmp / "u.zarr")
    assert got.dtype == np.uint8
    assert np.abs(got.astype(np.int16) - np.rint(want * 255)).max() <= 1


def test_interrupted_run_resumes_to_the_same_output(setup):
    recipe, _, volume, tmp = setup
    straight = tmp / "straight.zarr"
    run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), straight, block=(4, 16, 16))

    class Stop(Exception):
        pass

    def stop_after_five(progress):
        if progress.done == 5:
            raise Stop

    out = tmp / "resumed.zarr"
    with pytest.raises(Stop):
        run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), out, block=(4, 16, 16),
                      on_block=stop_after_five)
    with pytest.raises(VolumeError, match="is unfinished: emrun infer stopped"):
        open_volume(str(out / "aff"))  # segment, evaluate, convert: not as if it were done
    assert open_volume(str(out / "aff"), unfinished=True).shape[1:] == volume.shape  # view
    with pytest.raises(UserError, match="already exists; use --resume"):
        run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), out, block=(4, 16, 16))
    (tmp / "mine.zarr").mkdir()  # a user's folder: --resume would not help there
    (tmp / "mine.zarr/notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not an emrun inference output; give a new"):
        run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), tmp / "mine.zarr",
                      block=(4, 16, 16))
    for run in (run_inference, plan_inference):  # --plan checks it too (it said all was well)
        with pytest.raises(UserError, match=r"written with another block layout: block \[4, 16, "
                                            r"16\] \(now \[8, 32, 32\]\).*started with "
                                            r"\(--block 4 16 16\)"):
            run(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), out, block=(8, 32, 32),
                resume=True)
    other = {k: v + 1e-3 for k, v in torch.load(tmp / "c.pt")["model"].items()}
    torch.save({"model": other, "iteration": 2}, tmp / "other.pt")
    with pytest.raises(UserError, match="another checkpoint"):  # two networks in one output
        run_inference(recipe, tmp / "other.pt", str(tmp / "in.zarr/image"), out,
                      block=(4, 16, 16), resume=True)
    write_volume(tmp / "other.zarr", "image", 255 - open_volume(str(tmp / "in.zarr/image"))
                 .read(), voxel_size=(30, 6, 6))  # same shape, other data
    with pytest.raises(UserError, match=r"started from the input .*in\.zarr"):
        run_inference(recipe, tmp / "c.pt", str(tmp / "other.zarr/image"), out,
                      block=(4, 16, 16), resume=True)
    image = open_volume(str(tmp / "in.zarr/image")).read()
    edited = image.copy()
    edited[-1, -1, -1] ^= 1  # one voxel of the input rewritten in place, at a sampled corner
    write_volume(tmp / "in.zarr", "image", edited, voxel_size=(30, 6, 6), overwrite=True)
    with pytest.raises(UserError, match="started from other data than --input"):
        run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), out,
                      block=(4, 16, 16), resume=True)
    write_volume(tmp / "in.zarr", "image", image, voxel_size=(30, 6, 6), overwrite=True)
    progress = run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), out,
                             block=(4, 16, 16), resume=True)
    # a block written but not yet reported when the run stopped is done as well
    assert progress.skipped >= 5 and progress.done == progress.total - progress.skipped
    assert open_volume(str(out / "aff")).shape[1:] == volume.shape  # finished
    for task in ("aff", "mito"):
        np.testing.assert_array_equal(read(out, task), read(straight, task))


@pytest.mark.parametrize("outside", [0, np.nan], ids=["zero", "nan"])
def test_masked_and_empty_blocks_are_zero(setup, outside):
    """Outside the mask: 0, or NaN in a float mask (predicted before: NaN != 0)."""
    recipe, _, volume, tmp = setup
    mask = np.full(volume.shape, outside, np.float32 if np.isnan(outside) else np.uint8)
    mask[:4, :16, :16] = 1
    write_volume(tmp / "in.zarr", "mask", mask)
    out = tmp / "m.zarr"
    progress = run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), out,
                             block=(4, 16, 16), mask_path=str(tmp / "in.zarr/mask"))
    assert progress.empty == progress.done - 1  # only the first block is inside the mask
    got = read(out)
    assert got[:, :4, :16, :16].any() and not got[:, 4:].any() and not got[:, :, 16:].any()
    # blocks outside the mask store nothing (no chunk objects for masked-out space)
    stored = zarr.open_array(str(out / "aff" / "0"), mode="r")
    assert 0 < stored.nchunks_initialized < stored.nchunks
    with pytest.raises(UserError, match="same mask"):  # another mask would mix two jobs
        run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), out,
                      block=(4, 16, 16), resume=True)
    again = run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), out,
                          block=(4, 16, 16), resume=True, mask_path=str(tmp / "in.zarr/mask"))
    assert again.done == 0
    write_volume(tmp / "in.zarr", "zeros", np.zeros(volume.shape, np.uint8))
    zeros = run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/zeros"), tmp / "z.zarr")
    assert not read(tmp / "z.zarr").any() and zeros.empty == zeros.done > 0


def test_input_smaller_than_one_patch_works(setup):
    recipe, _, _, tmp = setup
    write_volume(tmp / "in.zarr", "tiny", np.full((2, 5, 7), 100, np.uint8))
    run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/tiny"), tmp / "t.zarr")
    got = read(tmp / "t.zarr")
    assert got.shape == (4, 2, 5, 7) and np.isfinite(got).all()


def test_user_mistakes_exit_2(setup, tmp_path):
    recipe, _, _, tmp = setup
    path = tmp / "r.yaml"
    path.write_text(yaml.safe_dump(recipe.resolved()))
    np.save(tmp / "flat.npy", np.zeros((20, 20), np.uint8))
    (tmp / "file.zarr").write_text("x")
    torch.save({"model": {}, "iteration": 1}, tmp / "empty.pt")
    base = ["infer", "--recipe", str(path), "--checkpoint", str(tmp / "c.pt")]
    cases = [
        (["--input", str(tmp / "flat.npy"), "--output", str(tmp / "a.zarr")], "3D"),
        (["--input", str(tmp / "in.zarr/image"), "--output", str(tmp / "file.zarr")], "is a file"),
        (["--input", str(tmp / "in.zarr/image"), "--output", str(tmp / "in.zarr")], "own"),
        (["--input", str(tmp / "in.zarr/image"), "--output", str(tmp / "in.zarr/p.zarr")],
         "lie one inside the other"),
        (["--input", str(tmp / "in.zarr/image"), "--output", str(tmp / "in.zarr/image/p.zarr")],
         "lie one inside the other"),
        (["--input", str(tmp / "in.zarr/image"), "--output", str(tmp / "b.zarr"), "--tta", "3"],
         "--tta"),
    ]
    runner = CliRunner()
    for args, text in cases:
        result = runner.invoke(app, base + args)
        assert result.exit_code == 2, (args, result.output)
        assert text in result.stderr and "Traceback" not in result.output
    (tmp / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 50)
    np.save(tmp / "strings.npy", np.full((8, 20, 20), "a"))
    result = runner.invoke(app, [*base, "--input", str(tmp / "strings.npy"), "--output",
                                 str(tmp / "s.zarr")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    for ckpt, text in ((tmp / "empty.pt", "do not match"), (tmp / "nope.pt", "nope.pt"),
                       (tmp / "garbage.pt", "garbage.pt")):
        result = runner.invoke(app, ["infer", "--recipe", str(path), "--checkpoint", str(ckpt),
                                     "--input", str(tmp / "in.zarr/image"), "--output",
                                     str(tmp / "c.zarr")])
        assert result.exit_code == 2 and text in result.stderr


def test_tta_needs_offsets_closed_under_its_transposes(setup):
    recipe, _, _, tmp = setup
    with pytest.raises(UserError, match=r"tasks.aff: .*\(0, 0, -5\)"):
        run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), tmp / "x.zarr", tta=8)


@pytest.mark.parametrize("tta", [2, 4])
def test_tta_runs_and_stays_a_probability(setup, tta):
    recipe, _, _, tmp = setup
    out = tmp / f"tta{tta}.zarr"
    run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), out, tta=tta,
                  block=(8, 32, 32))
    plain = tmp / "plain.zarr"
    if not plain.exists():
        run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), plain,
                      block=(8, 32, 32))
    got = read(out)
    assert np.isfinite(got).all() and got.min() >= 0 and got.max() <= 1
    assert not np.allclose(got, read(plain))  # the variants did change something


def test_compile_mode_reaches_torch_compile(monkeypatch):
    """`infer.compile_mode` is torch.compile's mode; CUDA graphs' outputs are copied out."""
    from emrun.infer import engine as engine_module

    seen = []

    def fake_compile(model, mode=None):
        seen.append(mode)
        return model

    monkeypatch.setattr(engine_module.torch, "compile", fake_compile)
    model = models.build(make_recipe().model, head_channels=make_recipe().head_channels())
    for mode, want in (("default", None), ("max-autotune", "max-autotune"),
                       ("reduce-overhead", "reduce-overhead")):
        recipe = make_recipe(compile=True, compile_mode=mode)
        built = engine_module.Engine(recipe, model, torch.device("cpu"))
        assert built.graphs == (mode == "reduce-overhead") and seen[-1] == want
    assert len(seen) == 3
    engine_module.Engine(make_recipe(compile_mode="max-autotune"), model, torch.device("cpu"))
    assert len(seen) == 3  # compile_mode alone compiles nothing


def test_the_checkpoint_s_own_recipe_is_the_default(setup):
    """A run trained with -o overrides is predicted with them, without --recipe; a recipe
    for another network is refused with the keys that differ."""
    from emrun.train.run_dir import recipe_text

    recipe, model, volume, tmp = setup
    state = torch.load(tmp / "c.pt")
    state["recipe"] = recipe_text(recipe)  # as `emrun train` saves it
    torch.save(state, tmp / "run.pt")
    runner = CliRunner()
    base = ["infer", "--checkpoint", str(tmp / "run.pt"), "--input", str(tmp / "in.zarr/image")]
    result = runner.invoke(app, [*base, "--output", str(tmp / "own.zarr")])
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(read(tmp / "own.zarr"), reference(recipe, model, volume),
                               atol=1e-5, rtol=0)
    import yaml

    other = recipe.resolved()
    other["model"]["widths"] = [4, 16]
    other["model"]["activation"] = "relu"
    path = tmp / "other.yaml"
    path.write_text(yaml.safe_dump(other))
    refused = runner.invoke(app, [*base, "--recipe", str(path), "--output", str(tmp / "o.zarr")])
    assert refused.exit_code == 2
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr  # scalars too
    assert "another network" in refused.stderr and "model.widths: [4, 16] in the recipe, " \
        "[4, 8] in the checkpoint" in refused.stderr
    assert "model.activation: relu in the recipe, elu in the checkpoint" in refused.stderr
    assert not (tmp / "o.zarr").exists()
    same = recipe.resolved()
    same["infer"]["batch_size"] = 2  # how to predict may change
    path.write_text(yaml.safe_dump(same))
    result = runner.invoke(app, [*base, "--recipe", str(path), "--output", str(tmp / "b.zarr")])
    assert result.exit_code == 0, result.output
    bare = runner.invoke(app, ["infer", "--checkpoint", str(tmp / "c.pt"), "--input",
                               str(tmp / "in.zarr/image"), "--output", str(tmp / "n.zarr")])
    assert bare.exit_code == 2 and "carries no recipe" in bare.stderr
    state["recipe"] = "name: [broken"  # damaged on disk
    torch.save(state, tmp / "damaged.pt")
    damaged = ["infer", "--checkpoint", str(tmp / "damaged.pt"), "--input",
               str(tmp / "in.zarr/image")]
    refused = runner.invoke(app, [*damaged, "--output", str(tmp / "d.zarr")])
    assert refused.exit_code == 2 and "its recipe is damaged" in refused.stderr
    assert len(refused.stderr.splitlines()) == 1, refused.stderr
    given = runner.invoke(app, [*damaged, "--recipe", str(path), "--output",
                                str(tmp / "g.zarr")])  # the user's recipe: not compared
    assert given.exit_code == 0, given.output


def test_a_checkpoint_of_an_older_emrun_takes_its_recipe(setup):
    """A checkpoint written before emrun had a model or task setting (its recipe lacks the
    key, which resolves to its default now) was refused as 'another network' with the same
    recipe; a real difference still is."""
    import yaml

    from emrun.train.run_dir import recipe_text

    recipe, _, _, tmp = setup
    state = torch.load(tmp / "c.pt")
    saved = yaml.safe_load(recipe_text(recipe))
    del saved["model"]["upsample"], saved["model"]["norm"]  # as set: their defaults
    state["recipe"] = yaml.safe_dump(saved)
    torch.save(state, tmp / "older.pt")
    path = tmp / "same.yaml"
    path.write_text(yaml.safe_dump(recipe.resolved()))
    base = ["infer", "--checkpoint", str(tmp / "older.pt"), "--input",
            str(tmp / "in.zarr/image"), "--recipe", str(path)]
    result = CliRunner().invoke(app, [*base, "--output", str(tmp / "same.zarr")])
    assert result.exit_code == 0, result.output
    other = recipe.resolved()
    other["model"]["upsample"] = "transpose" if other["model"]["upsample"] != "transpose" \
        else "trilinear"
    path.write_text(yaml.safe_dump(other))
    refused = CliRunner().invoke(app, [*base, "--output", str(tmp / "other.zarr")])
    assert refused.exit_code == 2 and "model.upsample" in refused.stderr


def test_off_a_terminal_progress_is_a_plain_line_now_and_then():
    """SLURM logs: no bar, no line per block, but the job visibly moving, with a rate and
    the time left."""
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from emrun.infer.progress import EVERY, FIRST, block_progress

    log = io.StringIO()
    now = [0.0]
    with block_progress(Console(file=log), clock=lambda: now[0]) as report:
        for done in range(1, 101):
            now[0] = done * 1.0  # a block a second
            report(SimpleNamespace(done=done, skipped=0, total=100, voxels=done * 10**6,
                                   seconds=now[0]))
    lines = log.getvalue().splitlines()
    assert 2 <= len(lines) <= 2 + 100 / EVERY and FIRST < 30
    assert lines[0] == "infer: 5/100 blocks, 1.00 Mvoxel/s, about 2 min left"
    assert lines[-1] == "infer: 100/100 blocks, 1.00 Mvoxel/s"


def test_inputs_that_used_to_crash_or_pass_silently_are_refused(setup):
    """An empty volume, a zero block, NaN voxels, a segmentation as the image, NaN weights:
    one line, exit 2."""
    recipe, _, volume, tmp = setup
    path = tmp / "r.yaml"
    import yaml

    path.write_text(yaml.safe_dump(recipe.resolved()))
    np.save(tmp / "empty.npy", np.zeros((0, 20, 20), np.uint8))
    nan = (volume / 255).astype(np.float32)
    nan[5, 10:13, 10:20] = np.nan  # 30 bad voxels
    np.save(tmp / "nan.npy", nan)
    write_volume(tmp / "in.zarr", "seg", (volume // 64).astype(np.uint8), label=True)
    np.save(tmp / "words.npy", np.full(volume.shape, "in"))
    state = torch.load(tmp / "c.pt")
    name = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][name] = state["model"][name] * float("nan")
    torch.save(state, tmp / "diverged.pt")
    runner = CliRunner()
    cases = [
        (["--input", str(tmp / "empty.npy")], "is empty"),
        (["--input", str(tmp / "in.zarr/image"), "--block", "0", "0", "0"], "at least 1"),
        (["--input", str(tmp / "in.zarr/image"), "--block", "1", "1", "1"],
         "smaller than one patch stride"),  # was a block and chunk files per voxel
        (["--input", str(tmp / "in.zarr/image"), "--block", "3", "16", "16", "-o",
          "infer.chunks=[2, 16, 16]"], "not a whole number of chunks"),
        (["--input", str(tmp / "nan.npy")], "30 NaN or infinite voxels"),
        (["--input", str(tmp / "in.zarr/seg")], "is a segmentation (OME-Zarr image-label)"),
        (["--input", str(tmp / "in.zarr/image"), "--mask", str(tmp / "words.npy")],
         "a mask holds numbers or booleans"),
        (["--input", str(tmp / "in.zarr/image"), "-o", "infer.patch=[2000, 2000, 2000]"],
         "need at least"),  # was a MemoryError, and an output the rerun refused
        (["--input", str(tmp / "in.zarr/image"), "--checkpoint", str(tmp / "diverged.pt")],
         "NaN or infinite values"),
    ]
    for i, (args, says) in enumerate(cases):
        base = ["infer", "--recipe", str(path), "--checkpoint", str(tmp / "c.pt"),
                "--output", str(tmp / f"bad{i}.zarr")]
        result = runner.invoke(app, [*base, *args])
        assert result.exit_code == 2, (args, result.output)
        errors = [line for line in result.stderr.strip().splitlines()
                  if not line.startswith("warning:")]  # a recipe warning may come first
        assert says in result.stderr and len(errors) == 1, args


@pytest.mark.parametrize(("extra", "counted"), [
    (["--workers", "3"], 3), ([], 1), (["--scheduler", "daisy", "--workers", "2"], 2),
    (["--scheduler", "daisy", "--workers", "2", "--launch", "env"], 1)])  # elsewhere
def test_the_memory_check_counts_the_local_cpu_workers(setup, monkeypatch, extra, counted):
    """Each CPU worker on this machine (local, or daisy's without --launch) holds its own
    block's working set: `check_memory` is told how many (it counted one whatever --workers
    said)."""
    from emrun.infer import job as job_module

    if "daisy" in extra:
        pytest.importorskip("daisy")
    recipe, _, _, tmp = setup
    path = tmp / "r.yaml"
    path.write_text(yaml.safe_dump(recipe.resolved()))
    told = []

    def recorded(recipe, layout, workers=1):
        told.append(workers)
        raise UserError("checked")

    monkeypatch.setattr(job_module, "check_memory", recorded)
    result = CliRunner().invoke(app, ["infer", "--recipe", str(path), "--checkpoint",
                                      str(tmp / "c.pt"), "--input", str(tmp / "in.zarr/image"),
                                      "--output", str(tmp / "o.zarr"), "--device", "cpu",
                                      *extra])
    assert result.exit_code == 2 and "checked" in result.stderr, result.output
    assert told == [counted]


def test_a_float_input_outside_zero_one_is_refused_and_another_resolution_cautioned(setup):
    """A float image in 0..255 was predicted as if saturated (affinities off by up to 204 of
    255); an input at another voxel size than the training's was predicted without a word."""
    from emrun.infer.cautions import input_cautions

    recipe, _, volume, tmp = setup
    write_volume(tmp / "in.zarr", "float255", volume.astype(np.float32), voxel_size=(30, 6, 6))
    with pytest.raises(UserError, match=r"read as intensities in \[0, 1\].*\[0, 25[45]\]"):
        run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/float255"), tmp / "f.zarr")
    assert not (tmp / "f.zarr").exists()
    write_volume(tmp / "in.zarr", "float", volume.astype(np.float32) / 255,
                 voxel_size=(8, 8, 8))
    run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/float"), tmp / "g.zarr")
    run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), tmp / "u.zarr")
    np.testing.assert_allclose(read(tmp / "g.zarr"), read(tmp / "u.zarr"), atol=1e-5)
    assert input_cautions(recipe, tmp / "c.pt", str(tmp / "in.zarr/image")) == []  # 30x6x6
    (said,) = input_cautions(recipe, tmp / "c.pt", str(tmp / "in.zarr/float"))
    assert "8x8x8 nm; the network was trained at 30x6x6 nm" in said


def test_tta_transposes_of_an_input_with_unequal_y_and_x_voxels_are_cautioned(setup):
    """TTA 8 and 16 transpose y and x: on voxels of 6 nm in y and 4 nm in x, half the
    variants showed the network the data at another resolution, without a word."""
    from emrun.infer.cautions import input_cautions

    recipe, _, volume, tmp = setup
    write_volume(tmp / "in.zarr", "yx", volume, voxel_size=(30, 6, 5))
    path = str(tmp / "in.zarr/yx")
    for tta in (1, 2, 4):
        assert not any("transposes" in line for line in input_cautions(
            recipe, tmp / "c.pt", path, tta))
    for tta in (8, 16):
        said = [line for line in input_cautions(recipe, tmp / "c.pt", path, tta)
                if "transposes" in line]
        assert said == [f"{path} has voxels of 6 nm in y and 5 nm in x; tta {tta} transposes "
                        "y and x, showing the network half its variants at another "
                        "resolution: use --tta 4 (flips only)"]
    assert input_cautions(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), 16) == []


def test_eight_bit_values_in_a_wider_integer_input_are_cautioned(setup):
    """A uint16 volume holding 0..255 (8-bit data, a common export) is scaled by 65535, so
    the network, trained on uint8 images, saw an input 257 times too dark, without a word."""
    from emrun.infer.cautions import input_cautions

    recipe, _, volume, tmp = setup
    write_volume(tmp / "in.zarr", "narrow", volume.astype(np.uint16), voxel_size=(30, 6, 6),
                 label=False)
    (said,) = input_cautions(recipe, tmp / "c.pt", str(tmp / "in.zarr/narrow"))
    assert "sampled values lie in [0, 25" in said and "[0, 65535]" in said and "[0, 255]" in said
    write_volume(tmp / "in.zarr", "signed", volume.astype(np.int16), voxel_size=(30, 6, 6),
                 label=False)
    (said,) = input_cautions(recipe, tmp / "c.pt", str(tmp / "in.zarr/signed"))
    assert "[-32768, 32767]" in said
    full = volume.astype(np.uint16) * 257  # the same image filling uint16's range
    write_volume(tmp / "in.zarr", "full", full, voxel_size=(30, 6, 6), label=False)
    assert input_cautions(recipe, tmp / "c.pt", str(tmp / "in.zarr/full")) == []
    run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/full"), tmp / "full.zarr")
    run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), tmp / "u8.zarr")
    np.testing.assert_allclose(read(tmp / "full.zarr"), read(tmp / "u8.zarr"), atol=1 / 255)
    (tmp / "r.yaml").write_text(yaml.safe_dump(recipe.resolved()))
    said = CliRunner().invoke(app, ["infer", "--recipe", str(tmp / "r.yaml"), "--checkpoint",
                                    str(tmp / "c.pt"), "--input",
                                    str(tmp / "in.zarr/narrow"), "--output", str(tmp / "n.zarr")])
    assert said.exit_code == 0 and "warning:" in said.stderr and "nearly flat" in said.stderr


def test_ordinary_values_in_a_wide_integer_input_are_cautioned(setup):
    """An int64 volume of 12-bit values (scaled by int64's range: every value about 0.5)
    reached the network flat, without a word: its values do not fit the training images'
    0..255, so the 8-bit check above did not speak."""
    from emrun.infer.cautions import input_cautions

    recipe, _, volume, tmp = setup
    write_volume(tmp / "in.zarr", "wide", volume.astype(np.int64) * 16, voxel_size=(30, 6, 6),
                 label=False)
    (said,) = input_cautions(recipe, tmp / "c.pt", str(tmp / "in.zarr/wide"))
    assert "is int64" in said and "under one 256th of it" in said and "flat" in said
    write_volume(tmp / "in.zarr", "spread", volume.astype(np.int32) * 8_000_000,
                 voxel_size=(30, 6, 6), label=False)
    assert input_cautions(recipe, tmp / "c.pt", str(tmp / "in.zarr/spread")) == []


def test_an_input_with_one_channel_is_predicted_as_its_volume(setup):
    """(1, z, y, x) images (bioformats2raw writes EM so) were refused as not 3-d."""
    recipe, _, volume, tmp = setup
    write_volume(tmp / "in.zarr", "one", volume[None], voxel_size=(30, 6, 6), channel_axis=True)
    run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/one"), tmp / "one.zarr")
    run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), tmp / "three.zarr")
    np.testing.assert_array_equal(read(tmp / "one.zarr"), read(tmp / "three.zarr"))
    write_volume(tmp / "in.zarr", "two", np.stack([volume, volume]), channel_axis=True)
    with pytest.raises(UserError, match="needs a 3D"):
        run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/two"), tmp / "two.zarr")


def test_the_output_lies_where_its_input_lies(setup):
    """An input's own offset was dropped: the output sat at 0, 0, 0 (or at the ROI's offset
    alone), so infer -> segment -> evaluate against labels stored with the image refused."""
    recipe, _, volume, tmp = setup
    write_volume(tmp / "in.zarr", "placed", volume, voxel_size=(30, 6, 6), offset=(2, 10, 10))
    run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/placed"), tmp / "p.zarr")
    assert open_volume(str(tmp / "p.zarr/aff")).offset[-3:] == (2, 10, 10)
    run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/placed"), tmp / "r.zarr",
                  roi=Roi((1, 0, 4), (4, 16, 16)))
    assert open_volume(str(tmp / "r.zarr/aff")).offset[-3:] == (3, 10, 14)


def test_a_start_that_fails_reading_leaves_no_output_and_no_record_means_no_resume(setup):
    """The input's sample was read after the arrays were made: a damaged chunk there left an
    output without its record, which --resume then finished from any input and network."""
    recipe, _, volume, tmp = setup
    write_volume(tmp / "in.zarr", "damaged", volume, voxel_size=(30, 6, 6), chunks=(4, 16, 16))
    (tmp / "in.zarr/damaged/0/c/0/0/0").write_bytes(b"garbage")  # a corner the sample reads
    with pytest.raises(VolumeError, match="damaged"):
        run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/damaged"), tmp / "d.zarr")
    assert not (tmp / "d.zarr").exists()
    run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), tmp / "o.zarr")
    group = zarr.open_group(str(tmp / "o.zarr"), mode="r+")
    del group.attrs["emrun"]  # as a start stopped between its arrays and its record left it
    with pytest.raises(UserError, match="holds no record of the run that started it"):
        run_inference(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), tmp / "o.zarr",
                      resume=True)


def test_a_resume_after_the_checkpoint_changed_at_its_path_says_so(setup):
    """It said "started with another checkpoint (X) than X"."""
    recipe, _, _, tmp = setup
    state = torch.load(tmp / "c.pt")
    torch.save(state, tmp / "x.pt")
    run_inference(recipe, tmp / "x.pt", str(tmp / "in.zarr/image"), tmp / "x.zarr")
    state["model"] = {k: v + 1e-3 for k, v in state["model"].items()}
    torch.save(state, tmp / "x.pt")  # trained further, say
    with pytest.raises(UserError, match=r"x\.pt, which has changed since \(sha256"):
        run_inference(recipe, tmp / "x.pt", str(tmp / "in.zarr/image"), tmp / "x.zarr",
                      resume=True)
