"""Reference probe of `emrun bench snemi3d` on a synthetic stand-in of SNEMI3D's 70 sections.

The benchmark runs once (tiny model, two iterations, CPU); its written segmentation is then
scored here with brute-force references (plain dicts, a plain BFS for the truth's 6-connected
pieces) against the stand-in's sections 60-69, and the reported figures, sections, iterations,
results.md and the rerun behaviour are checked against the README's "SNEMI3D benchmark".
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter, deque

import numpy as np
import pytest
import tifffile
import yaml
from typer.testing import CliRunner

from emrun.cli import app
from emrun.io import open_volume, write_volume

runner = CliRunner()

TINY = ["-o", "model.widths=[4, 8]", "-o", "model.norm=group", "-o", "model.groups=2",
        "-o", "train.patch=[6, 32, 32]", "-o", "infer.patch=[6, 32, 32]",
        "-o", "augment=[]", "-o", "train.workers=0", "-o", "train.log_every=1",
        "-o", "infer.precision=fp32", "-o", "train.precision=fp32",
        "-o", "train.schedule.warmup=0"]


# ---------------------------------------------------------------- brute-force references

def ref_pieces(labels: np.ndarray) -> np.ndarray:
    """Each non-zero id's 6-connected pieces, numbered 1, 2, ... (0 stays 0): a plain BFS."""
    out = np.zeros(labels.shape, dtype=np.int64)
    nz, ny, nx = labels.shape
    n = 0
    for start in zip(*np.nonzero(labels), strict=True):
        if out[start]:
            continue
        n += 1
        want = labels[start]
        out[start] = n
        queue = deque([start])
        while queue:
            z, y, x = queue.popleft()
            for dz, dy, dx in ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1),
                               (0, 0, -1)):
                p = (z + dz, y + dy, x + dx)
                if 0 <= p[0] < nz and 0 <= p[1] < ny and 0 <= p[2] < nx and not out[p] \
                        and labels[p] == want:
                    out[p] = n
                    queue.append(p)
    return out


def ref_scores(seg: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Adapted Rand error (SNEMI3D's, self-pairs included) and VOI in bits, over truth != 0;
    predicted 0 is an ordinary segment."""
    joint: Counter = Counter()
    for s, t in zip(seg.ravel().tolist(), truth.ravel().tolist(), strict=True):
        if t != 0:
            joint[(s, t)] += 1
    sizes_s: Counter = Counter()
    sizes_t: Counter = Counter()
    for (s, t), c in joint.items():
        sizes_s[s] += c
        sizes_t[t] += c
    total = sum(joint.values())
    sum_n2 = sum(c * c for c in joint.values())
    sum_s2 = sum(c * c for c in sizes_s.values())
    sum_t2 = sum(c * c for c in sizes_t.values())
    arand = 1 - 2 * sum_n2 / (sum_s2 + sum_t2)

    def entropy(counts) -> float:
        return -sum(c / total * math.log2(c / total) for c in counts)

    h_joint, h_s, h_t = entropy(joint.values()), entropy(sizes_s.values()), \
        entropy(sizes_t.values())
    voi_split, voi_merge = h_joint - h_t, h_joint - h_s
    return {"arand": arand, "voi_split": voi_split, "voi_merge": voi_merge,
            "cremi_score": math.sqrt(arand * (voi_split + voi_merge))}


def ref_counts(seg: np.ndarray, truth: np.ndarray, min_overlap: int = 100) -> dict[str, float]:
    """The rest of a score row: Rand split / merge, voxels, objects, segments, and the
    objects (segments) overlapping two or more segments (objects) by min_overlap voxels."""
    joint = Counter((s, t) for s, t in zip(seg.ravel().tolist(), truth.ravel().tolist(),
                                            strict=True) if t != 0)
    sizes_s: Counter = Counter()
    sizes_t: Counter = Counter()
    for (s, t), c in joint.items():
        sizes_s[s] += c
        sizes_t[t] += c
    sum_n2 = sum(c * c for c in joint.values())
    big_t = Counter(t for (_, t), c in joint.items() if c >= min_overlap)
    big_s = Counter(s for (s, _), c in joint.items() if c >= min_overlap)
    return {"rand_split": sum_n2 / sum(c * c for c in sizes_t.values()),
            "rand_merge": sum_n2 / sum(c * c for c in sizes_s.values()),
            "voxels": sum(joint.values()), "truth_objects": len(sizes_t),
            "segments": len(sizes_s), "splits": sum(1 for n in big_t.values() if n >= 2),
            "merges": sum(1 for n in big_s.values() if n >= 2)}


def test_references_on_hand_worked_cases():
    """The references themselves, on cases worked by hand."""
    truth = np.array([[[1, 1, 2, 2]]])
    same = ref_scores(truth, truth)
    assert same["arand"] == 0 and same["voi_split"] == 0 and same["voi_merge"] == 0
    merged = ref_scores(np.array([[[5, 5, 5, 5]]]), truth)
    # n: 2, 2 -> 8; T: 8; S: 16 -> 1 - 16/24 = 1/3; VOI merge 1 bit, split 0
    assert merged["arand"] == pytest.approx(1 / 3) and merged["voi_merge"] == pytest.approx(1)
    assert merged["voi_split"] == pytest.approx(0)
    # truth 0 is not scored; predicted 0 is a segment
    assert ref_scores(np.array([[[0, 0, 9, 3]]]), np.array([[[1, 1, 0, 0]]]))["arand"] == 0
    ring = np.array([[[1, 1, 1], [0, 0, 1], [1, 0, 1]]])
    pieces = ref_pieces(ring)
    assert pieces[0, 2, 0] != pieces[0, 0, 0] and pieces[0, 2, 2] == pieces[0, 0, 0]
    assert len(np.unique(pieces[pieces > 0])) == 2
    diagonal = np.array([[[1, 0], [0, 1]]])  # 6-connectivity: corners do not connect
    assert len(np.unique(ref_pieces(diagonal)[diagonal > 0])) == 2


# ---------------------------------------------------------------- the benchmark, once

@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    pytest.importorskip("waterz")  # the recipe's segmenter
    from emrun.synth import synthesize

    tmp = tmp_path_factory.mktemp("snemi_probe")
    data = tmp / "snemi"
    data.mkdir()
    vol = synthesize((70, 48, 48), 3)
    labels = vol.labels.astype(np.uint16)
    # an object that leaves the validation box and comes back: one id, two pieces inside it
    labels[60:70, 0:4, 0:4] = 4321
    labels[60:70, 0:4, 8:12] = 4321
    labels[60:70, 0:4, 4:8] = 4322
    labels[50:60, 0:4, 0:12] = 4321
    tifffile.imwrite(data / "train-input.tif", vol.image)
    tifffile.imwrite(data / "train-labels.tif", labels)
    out = tmp / "bench"
    args = ["bench", "snemi3d", "--data", str(data), "--out", str(out), "--iterations", "2",
            "--device", "cpu", "--json", *TINY]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    return {"tmp": tmp, "data": data, "out": out, "args": args, "labels": labels,
            "figures": figures, "result": result}


def written_segmentation(out):
    seg = open_volume(f"{out}/seg.zarr/segmentation")
    return seg, seg.read()


def test_written_segmentation_sits_on_sections_60_to_69(bench):
    seg, array = written_segmentation(bench["out"])
    assert seg.shape == (10, 48, 48) and tuple(seg.offset) == (60, 0, 0)
    assert array.dtype == np.uint64
    figures = bench["figures"]
    assert figures["train_sections"] == [0, 59] and figures["validation_sections"] == [60, 69]
    assert figures["iterations"] == 2
    with open(bench["out"] / "results.json", encoding="utf-8") as f:
        assert json.load(f) == figures  # --json prints what results.json holds


def test_reported_scores_equal_brute_force_against_connected_pieces(bench):
    figures = bench["figures"]
    assert figures["connected_truth"] is True  # the recipe's default
    _, seg = written_segmentation(bench["out"])
    truth = bench["labels"][60:70]
    ref = ref_scores(seg, ref_pieces(truth))
    for key in ("arand", "voi_split", "voi_merge", "cremi_score"):
        assert figures[key] == pytest.approx(ref[key], abs=1e-4), key
    counts = ref_counts(seg, ref_pieces(truth))
    assert figures["min_overlap"] == 100
    for key, value in counts.items():
        assert figures[key] == pytest.approx(value, abs=1e-4), key
    assert figures["voi"] == pytest.approx(ref["voi_split"] + ref["voi_merge"], abs=2e-4)
    # the chosen row of the sweep is the segmentation written and scored
    row = next(r for r in figures["sweep"] if r[figures["parameter"]] == figures["chosen"])
    for key, value in {**ref, **counts}.items():
        assert row[key] == pytest.approx(value, abs=1e-9), key


def test_reported_scores_equal_brute_force_against_labels_as_given(bench):
    figures = bench["figures"]
    _, seg = written_segmentation(bench["out"])
    truth = bench["labels"][60:70]
    ref = ref_scores(seg, truth)
    assert set(figures["as_labelled"]) == {"arand", "voi_split", "voi_merge", "cremi_score"}
    for key, value in figures["as_labelled"].items():
        assert value == pytest.approx(ref[key], abs=1e-4), key
    floor = ref_scores(ref_pieces(truth), truth)["arand"]
    assert floor > 0  # the object made to leave the box and come back is split by its crop
    assert figures["as_labelled_floor"] == pytest.approx(floor, abs=1e-4)


@pytest.mark.parametrize("connected", [True, False])
def test_emrun_evaluate_on_the_written_files_gives_the_reported_figures(bench, connected):
    """README: `emrun evaluate seg.zarr/segmentation snemi3d.zarr/labels [--connected-truth]`
    reads sections 60-69 of the whole labels where the segmentation sits."""
    out, figures = bench["out"], bench["figures"]
    args = ["evaluate", f"{out}/seg.zarr/segmentation", f"{out}/snemi3d.zarr/labels", "--json"]
    result = runner.invoke(app, [*args, *(["--connected-truth"] if connected else [])])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    expected = figures if connected else figures["as_labelled"]
    for key in ("arand", "voi_split", "voi_merge", "cremi_score"):
        assert scores[key] == pytest.approx(expected[key], abs=1e-4), key


def test_a_volume_that_is_not_70_sections_is_refused_before_training(bench):
    data = bench["tmp"] / "snemi_69"
    data.mkdir()
    tifffile.imwrite(data / "train-input.tif", np.zeros((69, 16, 16), np.uint8))
    tifffile.imwrite(data / "train-labels.tif", np.ones((69, 16, 16), np.uint16))
    args = [*bench["args"]]
    args[args.index("--data") + 1] = str(data)
    out = bench["tmp"] / "short"
    args[args.index("--out") + 1] = str(out)
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "expected the 70" in result.stderr
    assert "[69, 16, 16]" in result.stderr and not (out / "run").exists()


def test_sweep_table_chooses_its_lowest_error_and_reports_it(bench):
    figures = bench["figures"]
    rows = figures["sweep"]
    parameter = figures["parameter"]
    assert parameter == "threshold" and figures["segmenter"] == "waterz"
    assert [r[parameter] for r in rows] == [0.5, 0.6, 0.7, 0.8, 0.85, 0.9]
    check_sweep_choice(figures, [0.5, 0.9])


def check_sweep_choice(figures, edges):
    """The first value with the lowest error is chosen; at the edge only when that edge alone
    scores best (sweep.py); the reported error is that row's."""
    rows, parameter = figures["sweep"], figures["parameter"]
    lowest = min(r["arand"] for r in rows)
    ties = [r[parameter] for r in rows if r["arand"] == lowest]
    assert figures["chosen"] == ties[0]
    assert lowest == pytest.approx(figures["arand"], abs=1e-4)
    assert figures["chosen_at_edge"] is (len(ties) == 1 and ties[0] in edges)


def test_results_md_prints_the_reported_numbers(bench):
    figures = bench["figures"]
    md = (bench["out"] / "results.md").read_text(encoding="utf-8")
    plain = figures["as_labelled"]
    assert f"| adapted Rand error | {figures['arand']:.4f} (truth: each truth object's " \
           "connected pieces in these sections) |" in md
    assert f"| VOI split / merge (bits) | {figures['voi_split']:.3f} / " \
           f"{figures['voi_merge']:.3f} |" in md
    assert f"| CREMI score | {figures['cremi_score']:.4f} |" in md
    assert f"adapted Rand error {plain['arand']:.4f}, VOI {plain['voi_split']:.3f} / " \
           f"{plain['voi_merge']:.3f}" in md
    assert f"score {figures['as_labelled_floor']:.4f}" in md
    assert "| sections | train 0-59, validate 60-69 |" in md
    assert f"| training | 2 iterations, {figures['train_seconds'] / 60:.1f} min on " in md
    assert f"threshold {figures['chosen']:g} (swept over 0.5 / 0.6 / 0.7 / 0.8 / 0.85 / 0.9" \
        in md
    assert md.startswith("| SNEMI3D validation | |\n|---|---|\n")


def test_a_finished_benchmark_is_refused_and_left_as_it_is(bench):
    before = (bench["out"] / "results.json").read_bytes()
    again = runner.invoke(app, bench["args"])
    assert again.exit_code == 2 and "finished benchmark" in again.stderr
    assert (bench["out"] / "results.json").read_bytes() == before


def test_rerun_after_a_stop_while_scoring_resumes_without_training_again(bench):
    """results.json gone (stopped after training and inference): the same command trains
    nothing more, keeps the prediction, and reports the same figures."""
    out = bench["out"]  # in place: a prediction records its checkpoint's absolute path
    (out / "results.json").unlink()
    args = [*bench["args"]]
    pred_before = sorted(p.name for p in (out / "pred.zarr").iterdir())
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "holds another checkpoint's predictions" not in result.stderr
    assert "continuing" in result.stderr and "converting" not in result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    first = bench["figures"]
    assert figures["iterations"] == 2
    for key in ("arand", "voi_split", "voi_merge", "cremi_score", "chosen", "as_labelled",
                "as_labelled_floor", "sweep", "device", "infer_device", "iterations"):
        assert figures[key] == first[key], key
    assert sorted(p.name for p in (out / "pred.zarr").iterdir()) == pred_before
    _, seg = written_segmentation(out)
    ref = ref_scores(seg, ref_pieces(bench["labels"][60:70]))
    assert figures["arand"] == pytest.approx(ref["arand"], abs=1e-4)


@pytest.mark.parametrize(("store", "name", "mine", "words"), [
    ("seg.zarr", "segmentation", np.arange(8, dtype=np.uint64).reshape(2, 2, 2),
     "no segmentation of this benchmark"),
    ("pred.zarr", "affinity", np.ones((2, 2, 2), dtype=np.float32),
     "no prediction of this benchmark"),
], ids=["segmentation", "prediction"])
def test_a_foreign_volume_in_out_is_refused_before_training(bench, store, name, mine, words):
    out = bench["tmp"] / f"foreign_{name}"
    write_volume(out / store, name, mine, label=name == "segmentation")
    args = [*bench["args"]]
    args[args.index("--out") + 1] = str(out)
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and words in result.stderr
    assert not (out / "run").exists()
    np.testing.assert_array_equal(open_volume(f"{out}/{store}/{name}").read(), mine)


def test_more_iterations_on_the_same_out_train_further_and_predict_again(bench):
    out = bench["out"]  # after the resumed run above (tests of this file run in order)
    (out / "results.json").unlink()
    args = [*bench["args"]]
    args[args.index("--iterations") + 1] = "3"
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "holds another checkpoint's predictions" in result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["iterations"] == 3
    import torch

    state = torch.load(out / "run" / "checkpoints" / "last.pt", map_location="cpu",
                       weights_only=False)
    assert state["iteration"] == 3
    assert figures["device"] == ", ".join(state["devices"])
    _, seg = written_segmentation(out)
    truth = bench["labels"][60:70]
    ref = ref_scores(seg, ref_pieces(truth))
    assert figures["arand"] == pytest.approx(ref["arand"], abs=1e-4)
    assert figures["as_labelled"]["arand"] == pytest.approx(ref_scores(seg, truth)["arand"],
                                                            abs=1e-4)


def run_variant(bench, name, *extra):
    out = bench["tmp"] / name
    args = [*bench["args"], *extra]
    args[args.index("--out") + 1] = str(out)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout.strip().splitlines()[-1])


def test_labels_as_given_when_the_recipe_does_not_connect_its_truth(bench):
    out, figures = run_variant(bench, "as_given", "-o", "train.validate_connected_truth=false")
    assert figures["connected_truth"] is False
    _, seg = written_segmentation(out)
    truth = bench["labels"][60:70]
    ref = ref_scores(seg, truth)
    for key in ("arand", "voi_split", "voi_merge", "cremi_score"):
        assert figures[key] == pytest.approx(ref[key], abs=1e-4), key
        assert figures["as_labelled"][key] == pytest.approx(ref[key], abs=1e-4), key
    floor = ref_scores(ref_pieces(truth), truth)["arand"]
    assert figures["as_labelled_floor"] == pytest.approx(floor, abs=1e-4)
    md = (out / "results.md").read_text(encoding="utf-8")
    assert f"{figures['arand']:.4f} (truth: the labels as given)" in md


def test_mws_segmenter_sweeps_its_bias_and_scores_what_it_wrote(bench):
    out, figures = run_variant(bench, "mws", "-o", "segment={type: mws}")
    assert figures["segmenter"] == "mws" and figures["parameter"] == "bias"
    values = [r["bias"] for r in figures["sweep"]]
    assert values == [0.2, 0.3, 0.4, 0.5, 0.6, 0.7]  # README: mws: bias 0.2 ... 0.7
    check_sweep_choice(figures, [0.2, 0.7])
    _, seg = written_segmentation(out)
    truth = bench["labels"][60:70]
    ref = ref_scores(seg, ref_pieces(truth))
    for key in ("arand", "voi_split", "voi_merge", "cremi_score"):
        assert figures[key] == pytest.approx(ref[key], abs=1e-4), key
    for key, value in ref_scores(seg, truth).items():
        assert figures["as_labelled"][key] == pytest.approx(value, abs=1e-4), key


def test_large_uint32_truth_ids_score_as_their_brute_force(bench):
    """Truth ids above 2**16 (and near 2**32) in a uint32 TIFF: the same objects, the same
    scores as a brute force on the ids as written."""
    data = bench["tmp"] / "snemi_big_ids"
    data.mkdir()
    shutil.copy(bench["data"] / "train-input.tif", data / "train-input.tif")
    labels = bench["labels"].astype(np.uint32)
    labels[labels > 0] += np.uint32(4_000_000_000)
    labels[labels == 4_000_000_000 + 4322] = 70_000  # and one just above 2**16
    tifffile.imwrite(data / "train-labels.tif", labels)
    args = [*bench["args"]]
    args[args.index("--data") + 1] = str(data)
    args[args.index("--out") + 1] = str(bench["tmp"] / "big_ids")
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    _, seg = written_segmentation(bench["tmp"] / "big_ids")
    truth = labels[60:70]
    ref = ref_scores(seg, ref_pieces(truth))
    for key in ("arand", "voi_split", "voi_merge", "cremi_score"):
        assert figures[key] == pytest.approx(ref[key], abs=1e-4), key
    for key, value in ref_scores(seg, truth).items():
        assert figures["as_labelled"][key] == pytest.approx(value, abs=1e-4), key
    assert figures["as_labelled_floor"] == pytest.approx(
        ref_scores(ref_pieces(truth), truth)["arand"], abs=1e-4)


def test_final_trains_the_chosen_settings_on_all_sections(bench):
    """--final repeats the benchmark's iterations (3 after the runs above, run in this file's
    order) and overrides on sections 0-69 and ships the chosen value."""
    from emrun.io.package import read_package

    out = bench["out"]
    chosen = json.loads((out / "results.json").read_text(encoding="utf-8"))
    final = ["bench", "snemi3d", "--data", str(bench["data"]), "--out", str(out), "--final",
             "--device", "cpu", "--json"]
    result = runner.invoke(app, final)
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    assert facts["iterations"] == chosen["iterations"] and facts["sections"] == [0, 69]
    assert facts["value"] == chosen["chosen"] and facts["overrides"] == chosen["overrides"]
    assert json.loads((out / "final.json").read_text(encoding="utf-8")) == facts
    recipe = yaml.safe_load(read_package(out / "snemi3d.emrun").recipe)
    assert recipe["segment"]["thresholds"] == [chosen["chosen"]]
    assert recipe["train"]["iterations"] == chosen["iterations"]
    assert recipe["data"]["sources"]["snemi3d"]["roi"]["shape"] == [70, 48, 48]


def test_final_trains_with_the_schedule_of_the_scored_run(bench):
    """README: --final trains "the same recipe, overrides and iterations"; a budget given as
    an override instead of --iterations must give both runs the same warm-up."""
    from emrun.io.package import read_package

    out = bench["tmp"] / "budget_as_override"
    args = [a for a in bench["args"] if a not in ("--iterations", "2")]
    args[args.index("--out") + 1] = str(out)
    args = [a for i, a in enumerate(args)  # the budget as an override, the warm-up left alone
            if a != "train.schedule.warmup=0" and args[i + 1:i + 2] != ["train.schedule.warmup=0"]]
    result = runner.invoke(app, [*args, "-o", "train.iterations=2"])
    assert result.exit_code == 0, result.output
    scored = yaml.safe_load((out / "run" / "recipe.yaml").read_text(encoding="utf-8"))
    final = ["bench", "snemi3d", "--data", str(bench["data"]), "--out", str(out), "--final",
             "--device", "cpu"]
    done = runner.invoke(app, final)
    assert done.exit_code == 0, done.output
    shipped = yaml.safe_load(read_package(out / "snemi3d.emrun").recipe)
    assert shipped["train"]["iterations"] == scored["train"]["iterations"] == 2
    assert shipped["train"]["schedule"] == scored["train"]["schedule"]


def test_final_after_an_mws_benchmark_ships_the_chosen_bias(bench):
    from emrun.io.package import read_package

    out = bench["tmp"] / "mws"  # written by the mws test above
    chosen = json.loads((out / "results.json").read_text(encoding="utf-8"))
    final = ["bench", "snemi3d", "--data", str(bench["data"]), "--out", str(out), "--final",
             "--device", "cpu", "--json"]
    result = runner.invoke(app, final)
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    assert facts["segmenter"] == "mws" and facts["parameter"] == "bias"
    assert facts["value"] == chosen["chosen"]
    recipe = yaml.safe_load(read_package(out / "snemi3d.emrun").recipe)
    assert recipe["segment"]["type"] == "mws"
    assert recipe["segment"]["bias"] == chosen["chosen"]


def test_loss_curves_pass_over_what_they_cannot_read(tmp_path):
    from emrun.bench.snemi3d import loss_curves

    lines = ['{"iteration": 1, "loss/total": 0.5}',
             '{"iteration": 2, "loss/total": null}',
             '{"iteration": true, "loss/total": 0.4}',
             '{"iteration": 3, "loss/total": NaN}',
             '{"iteration": 4, "loss/total": 0.3, "validation": {"loss/total": 0.35}}',
             '{"iteration": 5, "validation": [1, 2]}',
             '[1, 2]',
             '{"iteration": 6, "loss/total": 0.2, "validation": {"loss/total": "x"}}',
             '{"iteration": 7, "loss/tot']
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    steps, vals = loss_curves(path)
    assert steps == [(1, 0.5), (4, 0.3), (6, 0.2)]
    assert vals == [(4, 0.35)]
    assert loss_curves(tmp_path / "missing.jsonl") == ([], [])


# ---------------------------------------------------------------- workdir.made_folder

def listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_made_folder_leaves_the_file_system_as_it_found_it(tmp_path, monkeypatch):
    from emrun.bench.workdir import made_folder

    monkeypatch.chdir(tmp_path)
    with made_folder(None, "--workdir") as folder:
        assert folder is None
    with made_folder("a/b", "--workdir") as folder:  # relative, two levels made
        assert folder == "a/b" and (tmp_path / "a" / "b").is_dir()
    assert listing(tmp_path) == []
    with made_folder(tmp_path / "a" / "b", "--workdir") as folder:  # left something
        (tmp_path / "a" / "b" / "kept").write_text("x")
    assert listing(tmp_path) == ["a", "a/b", "a/b/kept"]
    with made_folder(tmp_path / "a" / "c" / "d", "--workdir"):  # another's file above
        (tmp_path / "a" / "c" / "theirs").write_text("x")
    assert listing(tmp_path) == ["a", "a/b", "a/b/kept", "a/c", "a/c/theirs"]
    with made_folder(tmp_path / "a", "--workdir"):  # there already: stays as it is
        pass
    assert listing(tmp_path) == ["a", "a/b", "a/b/kept", "a/c", "a/c/theirs"]
    with pytest.raises(RuntimeError), made_folder(tmp_path / "n" / "m", "--workdir"):
        (tmp_path / "n" / "m" / "partial").write_text("x")
        raise RuntimeError  # a failure: what it made goes, with what is in it
    assert not (tmp_path / "n").exists()
    with pytest.raises(KeyboardInterrupt), made_folder(tmp_path / "a" / "b", "--workdir"):
        raise KeyboardInterrupt  # there already: nothing removed
    assert listing(tmp_path) == ["a", "a/b", "a/b/kept", "a/c", "a/c/theirs"]


def test_made_folder_with_dot_dot_removes_what_it_made(tmp_path, monkeypatch):
    from emrun.bench.workdir import made_folder

    monkeypatch.chdir(tmp_path)
    with made_folder("a/b/../c", "--workdir"):
        assert (tmp_path / "a" / "c").is_dir()
    assert listing(tmp_path) == []



@pytest.mark.parametrize("spelling", ["absolute", "other_cwd"])
def test_the_same_out_spelled_otherwise_resumes(bench, monkeypatch, spelling):
    """README: run again with the same --out, it continues where it stopped. The folder is
    the same; only its spelling differs."""
    home = bench["tmp"] / f"cwd_{spelling}"
    (home / "sub").mkdir(parents=True)
    args = [*bench["args"]]
    monkeypatch.chdir(home)
    args[args.index("--out") + 1] = "rel"
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    (home / "rel" / "results.json").unlink()
    if spelling == "absolute":
        args[args.index("--out") + 1] = str(home / "rel")
    else:
        monkeypatch.chdir(home / "sub")
        args[args.index("--out") + 1] = "../rel"
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    figures = json.loads(again.stdout.strip().splitlines()[-1])
    assert figures["iterations"] == 2
