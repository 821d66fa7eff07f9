"""Validation by segmentation (emrun/train/seg_validation.py) against `emrun evaluate` and a
brute-force reference written here.

What training logs (``arand``, ``voi_split``, ``voi_merge``, ``cremi_score`` and
``segment/<parameter>``) must be what `emrun evaluate` gives for the segmentation the
logged value makes, and what a pair count over every voxel pair gives: adapted Rand error as
the code defines it (ordered pairs, self-pairs included, voxels with truth 0 or outside the
mask left out), VOI as the conditional entropies in bits. Checked with masks, several
sources (the documented plain mean over sources), large and negative truth ids, an
all-background truth, ties, and end to end with a training run whose validation sources
are smaller than ``train.patch`` and masked.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections import Counter
from itertools import product
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from emrun.cli import app
from emrun.errors import UserError
from emrun.evaluate import score
from emrun.evaluate.pieces import connected_pieces
from emrun.io import open_volume, write_volume
from emrun.recipe.run import ConnectedComponents, MutexWatershed
from emrun.registry import segmenters
from emrun.segment.pipeline import segment_array
from emrun.train import seg_validation
from emrun.train.seg_validation import SegmentationInput, score_validation

NEAREST = ((-1, 0, 0), (0, -1, 0), (0, 0, -1))
LONG = (*NEAREST, (-2, 0, 0), (0, -3, 0), (0, 0, -3))


# ------------------------------------------------------------------ brute-force references

def brute_scores(seg: np.ndarray, truth: np.ndarray,
                 mask: np.ndarray | None = None) -> dict[str, float]:
    """Adapted Rand error by counting every ordered voxel pair (self-pairs included) among
    the scored voxels (truth != 0, inside the mask: non-zero and not NaN); VOI split/merge
    as H(seg | truth) and H(truth | seg) in bits from the voxels' joint frequencies."""
    keep = truth.ravel() != 0
    if mask is not None:
        m = mask.ravel()
        keep &= (m != 0) & ~np.isnan(m.astype(np.float64))
    s = seg.ravel()[keep].astype(np.int64)
    t = truth.ravel()[keep].astype(np.int64)
    together_s = together_t = together_both = 0
    for i in range(0, s.size, 1000):  # every ordered pair (i, j), 1000 rows at a time
        same_s = s[i:i + 1000, None] == s[None, :]
        same_t = t[i:i + 1000, None] == t[None, :]
        together_s += int(same_s.sum())
        together_t += int(same_t.sum())
        together_both += int((same_s & same_t).sum())
    s, t = s.tolist(), t.tolist()
    arand = 1 - 2 * together_both / (together_s + together_t)
    n = len(s)
    joint, of_s, of_t = Counter(zip(s, t, strict=True)), Counter(s), Counter(t)
    voi_split = -sum(c / n * math.log2(c / of_t[b]) for (_, b), c in joint.items())
    voi_merge = -sum(c / n * math.log2(c / of_s[a]) for (a, _), c in joint.items())
    return {"arand": arand, "voi_split": voi_split + 0.0, "voi_merge": voi_merge + 0.0,
            "cremi_score": math.sqrt(max(arand, 0.0) * (voi_split + voi_merge))}


def brute_pieces(truth: np.ndarray) -> np.ndarray:
    """6-connected pieces of equal non-zero ids by flood fill, numbered 1..K in raster
    order of their first voxel."""
    out = np.zeros(truth.shape, np.int64)
    k = 0
    for start in np.ndindex(truth.shape):
        if truth[start] == 0 or out[start]:
            continue
        k += 1
        out[start] = k
        stack = [start]
        while stack:
            v = stack.pop()
            for axis, step in product(range(3), (-1, 1)):
                w = list(v)
                w[axis] += step
                w = tuple(w)
                if all(0 <= w[a] < truth.shape[a] for a in range(3)) and not out[w] \
                        and truth[w] == truth[v]:
                    out[w] = k
                    stack.append(w)
    return out


# ------------------------------------------------------------------ synthetic volumes

def blocks_truth(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """A few box-shaped objects with an unlabelled (0) seam here and there."""
    rng = np.random.default_rng(seed)
    _, y, x = shape
    truth = np.zeros(shape, np.int64)
    ys = sorted(rng.choice(np.arange(2, y - 1), 2, replace=False))
    xs = sorted(rng.choice(np.arange(2, x - 1), 2, replace=False))
    label = 1
    for (y0, y1), (x0, x1) in product(zip([0, *ys], [*ys, y], strict=True),
                                      zip([0, *xs], [*xs, x], strict=True)):
        truth[:, y0:y1, x0:x1] = label
        label += 1
    truth[:, ys[0], : x // 2] = 0  # a seam of unlabelled voxels
    return truth


def noisy_affinities(truth: np.ndarray, offsets: Any, seed: int,
                     noise: int = 90) -> np.ndarray:
    """uint8 affinities (255 = 1): high between voxels of one object, low across, noisy."""
    rng = np.random.default_rng(seed)
    affs = np.zeros((len(offsets), *truth.shape), np.int64)
    for c, off in enumerate(offsets):
        here = tuple(slice(max(0, -o), n) for o, n in zip(off, truth.shape, strict=True))
        there = tuple(slice(max(0, -o) + o, n + o) for o, n in
                      zip(off, truth.shape, strict=True))
        same = np.zeros(truth.shape, bool)
        same[here] = (truth[here] == truth[there]) & (truth[here] != 0)
        affs[c] = np.where(same, 190, 60)
    affs += rng.integers(-noise, noise + 1, affs.shape)
    return np.clip(affs, 0, 255).astype(np.uint8)


def by_hand(spec: Any, affs: np.ndarray, offsets: Any, value: float, truth: np.ndarray,
            mask: np.ndarray | None) -> tuple[dict[str, float], dict[str, float]]:
    """The segmentation at ``value`` (`emrun segment`'s in-memory function), scored by
    `emrun.evaluate.score` and by the brute-force reference."""
    seg = segment_array(affs, offsets, segmenters.build(spec).with_value(value), mask)
    evaluated = score(seg, truth, mask).as_dict()
    return {k: evaluated[k] for k in seg_validation.SCORES}, brute_scores(seg, truth, mask)


def close(got: dict[str, float], want: dict[str, float]) -> bool:
    return all(math.isclose(got[k], want[k], rel_tol=1e-9, abs_tol=1e-12)
               for k in seg_validation.SCORES)


# ------------------------------------------------------------------ one source

@pytest.mark.parametrize("mask_kind", [None, "bool", "uint8", "float_nan"])
@pytest.mark.parametrize(("spec", "offsets", "values"), [
    (ConnectedComponents(), NEAREST, (0.3, 0.5, 0.7, 0.8)),
    (MutexWatershed(), LONG, (0.2, 0.5, 0.7)),
])
def test_one_source_scores_are_evaluate_s_and_the_pair_count_s(spec, offsets, values,
                                                                 mask_kind):
    """The logged scores and value for one source equal `emrun.evaluate.score` of the
    segmentation at the logged value, and the brute-force pair count; the logged value is
    the one with the lowest adapted Rand error of all tried."""
    truth = blocks_truth((3, 9, 9), seed=1)
    affs = noisy_affinities(truth, offsets, seed=2)
    mask = None
    if mask_kind is not None:
        inside = np.ones(truth.shape, bool)
        inside[:, :, 6:] = False  # a slab of x out of the mask
        inside[1, 0:3, 0:3] = False
        mask = {"bool": inside, "uint8": inside.astype(np.uint8) * 255,
                "float_nan": np.where(inside, 0.5, np.nan).astype(np.float32)}[mask_kind]
    got = score_validation(spec, [SegmentationInput(affs, truth, mask, offsets)], values)
    assert got is not None
    parameter = f"segment/{segmenters.build(spec).value_name}"
    per_value = [by_hand(spec, affs, offsets, v, truth, mask) for v in values]
    for evaluated, brute in per_value:
        assert close(evaluated, brute), (evaluated, brute)
    arands = [e["arand"] for e, _ in per_value]
    assert len(set(np.round(arands, 12))) > 1  # the values do segment differently
    best = int(np.argmin(arands))
    assert got[parameter] == values[best]
    assert close(got, per_value[best][0]) and close(got, per_value[best][1])


def test_one_source_scores_equal_the_evaluate_command_json(tmp_path):
    """The same, through `emrun evaluate SEG TRUTH --mask M --json` on zarr volumes."""
    truth = blocks_truth((3, 9, 9), seed=3)
    affs = noisy_affinities(truth, NEAREST, seed=4)
    mask = np.ones(truth.shape, np.uint8)
    mask[:, 7:, :] = 0
    spec, values = ConnectedComponents(), (0.3, 0.5, 0.7)
    got = score_validation(spec, [SegmentationInput(affs, truth, mask, NEAREST)], values)
    assert got is not None
    seg = segment_array(affs, NEAREST, segmenters.build(spec).with_value(
        got["segment/threshold"]), mask)
    write_volume(tmp_path / "v.zarr", "seg", seg)
    write_volume(tmp_path / "v.zarr", "truth", truth)
    write_volume(tmp_path / "v.zarr", "mask", mask)
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "v.zarr/seg"),
                                      str(tmp_path / "v.zarr/truth"), "--mask",
                                      str(tmp_path / "v.zarr/mask"), "--json"])
    assert result.exit_code == 0, result.output
    cli = json.loads(result.stdout.strip().splitlines()[-1])
    assert close(got, cli), (got, cli)
    assert close(got, brute_scores(seg, truth, mask))


# ------------------------------------------------------------------ several sources

def test_several_sources_log_the_plain_mean_at_the_best_mean_value():
    """README and module docstring: the scores are averaged over the sources per value (a
    plain mean, each source counting once whatever its size) and the value with the lowest
    mean adapted Rand error is logged with those means, each the mean of what evaluate
    gives per source."""
    spec, values = ConnectedComponents(), (0.3, 0.5, 0.7, 0.8)
    sources = []
    for i, shape in enumerate([(2, 6, 6), (4, 12, 12), (3, 8, 10)]):
        truth = blocks_truth(shape, seed=10 + i)
        sources.append(SegmentationInput(noisy_affinities(truth, NEAREST, seed=20 + i),
                                         truth, None, NEAREST))
    got = score_validation(spec, sources, values)
    assert got is not None
    table = [[by_hand(spec, s.affinities, s.offsets, v, s.truth, None)[1] for s in sources]
             for v in values]
    means = [{k: float(np.mean([row[k] for row in per_source]))
              for k in seg_validation.SCORES} for per_source in table]
    best = int(np.argmin([m["arand"] for m in means]))
    assert got["segment/threshold"] == values[best]
    assert close(got, means[best]), (got, means[best])
    # not the pooled score of all sources' voxels (the sizes differ 5-fold)
    pooled = [by_hand(spec, s.affinities, s.offsets, values[best], s.truth, None)
              for s in sources]
    assert not math.isclose(got["arand"], np.average(
        [p[1]["arand"] for p in pooled], weights=[s.truth.size for s in sources]))


def test_the_value_logged_is_one_for_all_sources_not_each_source_s_own_best():
    """Two sources whose own best thresholds differ: the logged value is the best mean, and
    the logged arand is that value's mean (not the mean of the per-source minima)."""
    spec, values = ConnectedComponents(), (0.3, 0.5, 0.7, 0.8)
    truth = blocks_truth((3, 9, 9), seed=5)
    clean = noisy_affinities(truth, NEAREST, seed=6, noise=10)
    weak = (clean.astype(np.int64) * 0.55).astype(np.uint8)  # best at a low threshold
    sources = [SegmentationInput(clean, truth, None, NEAREST),
               SegmentationInput(weak, truth, None, NEAREST)]
    got = score_validation(spec, sources, values)
    assert got is not None
    per = [[by_hand(spec, s.affinities, NEAREST, v, truth, None)[1]["arand"] for v in values]
           for s in sources]
    mean = np.mean(per, axis=0)
    assert got["segment/threshold"] == values[int(np.argmin(mean))]
    assert got["arand"] == pytest.approx(float(mean.min()), abs=1e-12)


# ------------------------------------------------------------------ ids

@pytest.mark.parametrize("form", ["negative_int64", "negative_int16", "huge_uint64"])
def test_truth_ids_large_or_negative_score_as_their_dense_relabelling(form):
    """Ids are objects whatever their value (only 0 is unlabelled): a truth with negative
    or near-2^64 ids scores as the same truth relabelled 1..K, in the validation and in
    evaluate, and so do its connected pieces."""
    truth = blocks_truth((3, 9, 9), seed=7)
    affs = noisy_affinities(truth, NEAREST, seed=8)
    mapping = {"negative_int64": (np.int64, lambda t: -t * 1_000_003),
               "negative_int16": (np.int16, lambda t: -t),
               "huge_uint64": (np.uint64, lambda t: np.uint64(2**64 - 1) - t.astype(np.uint64)
                               + np.uint64(1))}
    dtype, relabel = mapping[form]
    odd = np.where(truth == 0, 0, relabel(truth)).astype(dtype)
    assert (odd != 0).sum() == (truth != 0).sum()
    spec, values = ConnectedComponents(), (0.3, 0.5, 0.7)
    plain = score_validation(spec, [SegmentationInput(affs, truth, None, NEAREST)], values)
    got = score_validation(spec, [SegmentationInput(affs, odd, None, NEAREST)], values)
    assert got == plain
    pieces = connected_pieces(odd)  # what predict_validation scores by default
    np.testing.assert_array_equal(pieces, brute_pieces(truth))
    seg = segment_array(affs, NEAREST, segmenters.build(spec).with_value(
        got["segment/threshold"]))
    assert close(score(seg, odd, connected_truth=True).as_dict(),
                 brute_scores(seg, brute_pieces(truth)))


# ------------------------------------------------------------------ nothing to score

@pytest.mark.parametrize("where", ["all_background", "outside_the_mask", "empty_mask"])
def test_a_source_with_nothing_to_score_is_refused_not_scored_as_perfect(where):
    """A source with no labelled voxel to score is refused (UserError), never averaged in
    as 0 (a perfect score) or NaN (which min() would pass over or pick arbitrarily)."""
    truth = blocks_truth((2, 6, 6), seed=9)
    affs = noisy_affinities(truth, NEAREST, seed=9)
    mask = None
    if where == "all_background":
        truth = np.zeros_like(truth)
    elif where == "outside_the_mask":
        mask = truth == 0
    else:
        mask = np.zeros(truth.shape, np.uint8)
    good = SegmentationInput(affs, blocks_truth((2, 6, 6), seed=9), None, NEAREST)
    with pytest.raises(UserError, match=r"no labelled voxel|mask is 0 everywhere"):
        score_validation(ConnectedComponents(), [good, SegmentationInput(
            affs, truth, mask, NEAREST)], (0.5,))


# ------------------------------------------------------------------ ties

def _fake_sweep(table: dict[int, list[float]]):
    from emrun.segment.sweep import SweepResult

    def fake(affs: Any, offsets: Any, spec: Any, values: Any, truth: Any,
             mask: Any) -> SweepResult:
        arand = table[int(affs.flat[0])]
        scores = tuple({"arand": a, "voi_split": a, "voi_merge": a, "cremi_score": a}
                       for a in arand)
        return SweepResult("cc", "threshold", tuple(values), scores, 0, truth)

    return fake


def _inputs(n: int) -> list[SegmentationInput]:
    return [SegmentationInput(np.full((3, 1, 1, 1), i, np.uint8), np.ones((1, 1, 1), np.int64),
                              None, NEAREST) for i in range(n)]


def test_a_tie_of_mean_scores_picks_the_first_value_in_the_order_tried(monkeypatch):
    """Ties go to the first value tried (as `sweep`: 'the first such value on ties'),
    whatever the order of the values."""
    monkeypatch.setattr(seg_validation, "sweep", _fake_sweep({0: [0.4, 0.2, 0.2, 0.3],
                                                              1: [0.4, 0.3, 0.3, 0.3]}))
    got = score_validation(ConnectedComponents(), _inputs(2), (0.8, 0.6, 0.3, 0.5))
    assert got is not None and got["segment/threshold"] == 0.6
    assert got["arand"] == pytest.approx(0.25)


def test_a_perfect_segmentation_at_every_value_reports_the_first_value():
    """Every value segments the truth exactly (clean affinities): all score 0, the first
    value is logged (not the lowest or the highest)."""
    truth = blocks_truth((2, 6, 6), seed=11)
    truth[truth == 0] = 99  # no seam: every voxel labelled
    affs = noisy_affinities(truth, NEAREST, seed=11, noise=0)
    values = (0.5, 0.3, 0.7)
    got = score_validation(ConnectedComponents(),
                           [SegmentationInput(affs, truth, None, NEAREST)], values)
    assert got == {"arand": 0.0, "voi_split": 0.0, "voi_merge": 0.0, "cremi_score": 0.0,
                   "segment/threshold": 0.5}


# ------------------------------------------------------------------ end to end

RECIPE = """\
name: seg_validation_probe
data:
  sources:
    a: {{type: synthetic, shape: [12, 40, 40], seed: 1}}
  validation:
    small: {{image: {tmp}/small.zarr/image, labels: {tmp}/small.zarr/labels,
             mask: {tmp}/small.zarr/mask}}
    other: {{image: {tmp}/other.zarr/image, labels: {tmp}/other.zarr/labels}}
model: {{type: rsunet, widths: [4, 8]}}
tasks:
  affinity:
    target: {{type: affinity}}
segment: {{type: cc}}
train:
  patch: [8, 32, 32]
  iterations: 2
  workers: 0
  validate_every: 2
  image_every: 0
  validate_in_background: false
  validate_connected_truth: {connected}
  ema: {ema}
"""


def _cli(*args: object) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (args, result.output)
    return result.stdout


@pytest.mark.parametrize(("connected", "ema"), [(True, "null"), (False, 0.9)])
def test_a_training_run_logs_what_infer_segment_and_evaluate_give_per_source_mean(
        tmp_path, connected, ema):
    """Two validation sources, one smaller than train.patch (padded when predicted) and
    masked, the other with negative int64 ids: the logged scores are the mean over the
    sources of `emrun evaluate --json` of `emrun segment` at the logged threshold of
    `emrun infer`'s affinities (of last.pt: with train.ema its averaged weights, which
    validation scored), and equal the brute-force reference."""
    from emrun.synth import synthesize

    small = synthesize((4, 20, 20), 3)
    other = synthesize((10, 36, 36), 4)
    mask = np.ones(small.labels.shape, np.uint8)
    mask[:, :, 15:] = 0
    write_volume(tmp_path / "small.zarr", "image", small.image)
    write_volume(tmp_path / "small.zarr", "labels", small.labels.astype(np.uint32))
    write_volume(tmp_path / "small.zarr", "mask", mask)
    labels = other.labels.astype(np.int64)
    labels = np.where(labels == 0, 0, -labels)  # negative ids
    write_volume(tmp_path / "other.zarr", "image", other.image)
    write_volume(tmp_path / "other.zarr", "labels", labels)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent(RECIPE.format(tmp=tmp_path, ema=ema,
                                                    connected=str(connected).lower())))
    run = tmp_path / "run"
    _cli("train", recipe, "--run-dir", run, "--device", "cpu")
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    [logged] = [e["validation"] for e in events if "validation" in e]
    threshold = logged["segment/threshold"]
    assert 0 < logged["arand"] < 1 and logged["voi_split"] + logged["voi_merge"] > 0
    per_source, brute = [], []
    for name, extra in (("small", ["--mask", tmp_path / "small.zarr/mask"]), ("other", [])):
        _cli("infer", "--checkpoint", run / "checkpoints/last.pt", "--input",
             tmp_path / f"{name}.zarr/image", "--output", tmp_path / f"{name}_p.zarr",
             "--device", "cpu")
        _cli("segment", tmp_path / f"{name}_p.zarr/affinity", tmp_path / f"{name}_s.zarr",
             "--threshold", threshold, *extra)
        connected_flag = ["--connected-truth"] if connected else []
        out = _cli("evaluate", tmp_path / f"{name}_s.zarr/segmentation",
                   tmp_path / f"{name}.zarr/labels", "--json", *extra, *connected_flag)
        per_source.append(json.loads(out.strip().splitlines()[-1]))
        seg = open_volume(f"{tmp_path}/{name}_s.zarr/segmentation").read()
        truth = open_volume(f"{tmp_path}/{name}.zarr/labels").read()
        if connected:
            truth = brute_pieces(truth)
        brute.append(brute_scores(seg, truth, mask if name == "small" else None))
    want = {k: float(np.mean([s[k] for s in per_source])) for k in seg_validation.SCORES}
    assert close(logged, want), (logged, want)
    want_brute = {k: float(np.mean([s[k] for s in brute])) for k in seg_validation.SCORES}
    assert close(logged, want_brute), (logged, want_brute)


# ------------------------------------------------------------------ scored in the background

def score_as_on_a_large_box(spec: Any, inputs: list[SegmentationInput],
                            values: tuple[float, ...]) -> dict[str, float] | None:
    """`score_validation` as the trainer's helper process runs it for a validation box of a
    million voxels or more on a machine of several cores (sweep's MIN_VOXELS and the core
    count scaled down in the helper, so that a tiny box takes the same path)."""
    import importlib

    sweep_module = importlib.import_module("emrun.segment.sweep")  # not the function
    parallel = importlib.import_module("emrun.segment.parallel")
    sweep_module.MIN_VOXELS = 1
    parallel.cpu_cores = lambda: 4
    return score_validation(spec, inputs, values)


def test_a_large_box_scored_in_the_background_scores_as_in_the_trainer():
    """On a GPU (validate_in_background: null) or with validate_in_background: true, the
    helper process scores what the trainer would. For a validation box of >= 2^20 voxels
    and a segmenter that does not share work between values (mws, the default, and cc),
    sweep segments the values in a process pool, which a daemonic process may not start:
    'AssertionError: daemonic processes are not allowed to have children', raised in the
    trainer as RuntimeError('validation scoring failed: ...'). Unscaled, a 4 x 512 x 512
    box fails the same way, and a training run (cc, synthetic validation 8 x 384 x 384,
    validate_in_background: true) stops at its first validation without a checkpoint."""
    from emrun.train.background import Scoring

    truth = blocks_truth((2, 8, 8), seed=12)
    inputs = [SegmentationInput(noisy_affinities(truth, NEAREST, seed=12), truth, None,
                                NEAREST)]
    values = (0.3, 0.5, 0.7)
    here = score_validation(ConnectedComponents(), inputs, values)
    scoring = Scoring(score_as_on_a_large_box, (ConnectedComponents(), inputs, values))
    assert scoring.get() == here
