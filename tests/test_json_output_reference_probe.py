"""Reference probe: `--json` output stays machine-readable.

README: "`--json`: stdout then holds one JSON line and nothing else (the text for people goes
to stderr)"; a binary ratio with a zero denominator is `null` in `--json`. Each command is run
as a user runs it (`python -m emrun`, a real process: file descriptor 1 is what a script
reads) on tiny volumes made here, with every warning it gives provoked, and its line is
compared with references computed here by plain loops and Fractions.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import urllib.parse
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from emrun.io import open_volume, write_volume

VOXEL = (40, 4, 4)
NN = [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]

# The keys the README documents for evaluate's line: the volumes, the mode, and every figure
# of "## Evaluation" (arand, Rand split/merge, VOI split/merge, CREMI score, splits, merges,
# truth_objects, segments; min_overlap and voxels are what the text also states).
EVALUATE_KEYS = ["seg", "truth", "mask", "mode", "connected_truth", "arand", "rand_split",
                 "rand_merge", "voi_split", "voi_merge", "voi", "cremi_score", "splits",
                 "merges", "min_overlap", "voxels", "truth_objects", "segments"]
FLOAT_KEYS = ["arand", "rand_split", "rand_merge", "voi_split", "voi_merge", "voi",
              "cremi_score"]
INT_KEYS = ["splits", "merges", "min_overlap", "voxels", "truth_objects", "segments"]
BINARY_KEYS = ["seg", "truth", "mask", "mode", "precision", "recall", "f1", "iou", "tp", "fp",
               "fn", "tn", "voxels", "threshold"]


def emrun(cwd: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "emrun", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _refuse(name: str) -> None:
    raise AssertionError(f"bare {name} in the JSON line: not JSON")


def one_json_line(stdout: str) -> dict:
    """stdout is exactly one newline-ended line of strict JSON (no NaN/Infinity)."""
    assert stdout.endswith("\n"), repr(stdout[-200:])
    lines = stdout.splitlines()
    assert len(lines) == 1, stdout[:2000]
    value = json.loads(lines[0], parse_constant=_refuse)
    assert isinstance(value, dict)
    return value


def user_error(done: subprocess.CompletedProcess[str]) -> str:
    """A user's mistake: exit 2, nothing on stdout, one `error:` line on stderr."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert done.stdout == "", done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    assert "Traceback" not in done.stderr
    return errors[0]


# --- references -------------------------------------------------------------------------


def ref_scores(seg: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None,
               min_overlap: int = 100) -> dict:
    """README's definitions by plain counting: truth 0 and mask 0 not scored."""
    n: Counter = Counter()
    for s, t, m in zip(seg.ravel().tolist(), truth.ravel().tolist(),
                       (mask.ravel().tolist() if mask is not None else [1] * seg.size),
                       strict=True):
        if t != 0 and m != 0:
            n[(s, t)] += 1
    sizes_s: Counter = Counter()
    sizes_t: Counter = Counter()
    for (s, t), c in n.items():
        sizes_s[s] += c
        sizes_t[t] += c
    total = sum(n.values())
    sum_n2 = sum(c * c for c in n.values())
    sum_s2 = sum(c * c for c in sizes_s.values())
    sum_t2 = sum(c * c for c in sizes_t.values())
    arand = 1 - Fraction(2 * sum_n2, sum_s2 + sum_t2)
    voi_split = -sum(c / total * math.log2(c / sizes_t[t]) for (s, t), c in n.items())
    voi_merge = -sum(c / total * math.log2(c / sizes_s[s]) for (s, t), c in n.items())
    big = [(s, t) for (s, t), c in n.items() if c >= min_overlap]
    splits = sum(1 for t in sizes_t if sum(1 for _, tt in big if tt == t) > 1)
    merges = sum(1 for s in sizes_s if sum(1 for ss, _ in big if ss == s) > 1)
    return {"arand": float(arand), "rand_split": float(Fraction(sum_n2, sum_t2)),
            "rand_merge": float(Fraction(sum_n2, sum_s2)), "voi_split": abs(voi_split),
            "voi_merge": abs(voi_merge), "voi": abs(voi_split) + abs(voi_merge),
            "cremi_score": math.sqrt(float(arand) * (abs(voi_split) + abs(voi_merge))),
            "splits": splits, "merges": merges, "min_overlap": min_overlap, "voxels": total,
            "truth_objects": len(sizes_t), "segments": len(sizes_s)}


def ref_components(affs: np.ndarray, threshold: float, mask: np.ndarray | None = None
                   ) -> np.ndarray:
    """Connected components by flood fill: (z,y,x) joins (z,y,x)+offset of channel c where
    affs[c, z, y, x] > threshold; voxels outside the mask are 0. Ids in scan order."""
    shape = affs.shape[1:]
    out = np.zeros(shape, np.int64)
    inside = np.ones(shape, bool) if mask is None else mask != 0
    neighbours: dict[tuple, list[tuple]] = {}
    for c, off in enumerate(NN):
        for z, y, x in np.ndindex(*shape):
            q = (z + off[0], y + off[1], x + off[2])
            if min(q) < 0 or affs[c, z, y, x] <= threshold:
                continue
            neighbours.setdefault((z, y, x), []).append(q)
            neighbours.setdefault(q, []).append((z, y, x))
    label = 0
    for start in np.ndindex(*shape):
        if not inside[start] or out[start]:
            continue
        label += 1
        stack = [start]
        out[start] = label
        while stack:
            v = stack.pop()
            for q in neighbours.get(v, []):
                if inside[q] and not out[q]:
                    out[q] = label
                    stack.append(q)
    return out


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to renumbering (0 kept as 0)."""
    pairs = set(zip(a.ravel().tolist(), b.ravel().tolist(), strict=True))
    forward = {x for x, _ in pairs}
    backward = {y for _, y in pairs}
    return (len(pairs) == len(forward) == len(backward)
            and all((x == 0) == (y == 0) for x, y in pairs))


# --- data -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vols(tmp_path_factory) -> Path:
    """Small volumes in one store: a random segmentation and truth with negative ids, a
    truth a fraction of a voxel off the grid, an empty truth, masks, affinities."""
    root = tmp_path_factory.mktemp("json")
    rng = np.random.default_rng(7)
    shape = (4, 12, 12)
    coarse = rng.integers(-2, 4, (2, 3, 3))
    truth = np.kron(coarse, np.ones((2, 4, 4), np.int64)).astype(np.int32)
    seg = np.kron(rng.integers(1, 5, (2, 3, 3)), np.ones((2, 4, 4), np.int64))
    flip = rng.random(shape) < 0.15
    seg[flip] = rng.integers(0, 6, int(flip.sum()))
    seg = seg.astype(np.uint32)
    mask = (rng.random(shape) < 0.8).astype(np.uint8)
    store = root / "v.zarr"
    write_volume(store, "seg", seg, voxel_size=VOXEL)
    write_volume(store, "truth", truth, voxel_size=VOXEL)
    write_volume(store, "shifted", truth, voxel_size=VOXEL, shift_nm=(0, 1, 1))
    write_volume(store, "empty", np.zeros(shape, np.uint32), voxel_size=VOXEL)
    write_volume(store, "coarse", truth, voxel_size=(40, 8, 8))
    write_volume(store, "mask", mask, voxel_size=VOXEL)
    write_volume(store, "zeros", np.zeros(shape, np.uint8), voxel_size=VOXEL)
    affs = rng.random((3, *shape)).astype(np.float32)
    write_volume(store, "affs", affs, voxel_size=VOXEL, channel_axis=True,
                 attrs={"offsets": NN})
    # two halves in y; 0.3 inside each, 0 across: cc at 0.2 is perfect, above it singletons
    halves = np.ones(shape, np.uint32)
    halves[:, 6:] = 2
    step = np.full((3, *shape), 0.3, np.float32)
    step[1, :, 6, :] = 0.0
    write_volume(store, "halves", halves, voxel_size=VOXEL)
    write_volume(store, "step", step, voxel_size=VOXEL, channel_axis=True,
                 attrs={"offsets": NN})
    bad = affs.copy()
    bad[0, 1, 2, 3] = np.nan
    write_volume(store, "nan_affs", bad, voxel_size=VOXEL, channel_axis=True,
                 attrs={"offsets": NN})
    prob = rng.random(shape).astype(np.float32)
    write_volume(store, "prob", prob, voxel_size=VOXEL)
    np.savez(root / "arrays.npz", seg=seg, truth=truth, mask=mask, affs=affs, halves=halves,
             step=step, prob=prob)
    return root


def arrays(root: Path) -> dict[str, np.ndarray]:
    with np.load(root / "arrays.npz") as f:
        return {k: f[k] for k in f.files}


# --- evaluate -----------------------------------------------------------------------------


@pytest.mark.parametrize("truth_name", ["truth", "shifted"])
def test_evaluate_one_strict_line_with_warnings_and_reference_figures(vols, truth_name):
    a = arrays(vols)
    done = emrun(vols, "evaluate", "v.zarr/seg", f"v.zarr/{truth_name}", "--mask",
                 "v.zarr/mask", "--min-overlap", "5", "--json")
    assert done.returncode == 0, done.stderr
    line = one_json_line(done.stdout)
    # the warnings were given, on stderr
    assert "negative ids" in done.stderr
    if truth_name == "shifted":
        assert "fraction of a voxel off the grid" in done.stderr
    assert "warning" not in done.stdout and "adapted Rand" in done.stderr
    assert list(line) == EVALUATE_KEYS
    assert line["mode"] == "segmentation" and line["connected_truth"] is False
    assert line["seg"] == "v.zarr/seg" and line["truth"] == f"v.zarr/{truth_name}"
    assert line["mask"] == "v.zarr/mask"
    assert all(type(line[k]) is float for k in FLOAT_KEYS)
    assert all(type(line[k]) is int for k in INT_KEYS)
    ref = ref_scores(a["seg"], a["truth"], a["mask"], min_overlap=5)
    for key in FLOAT_KEYS:
        assert line[key] == pytest.approx(ref[key], rel=1e-12, abs=1e-12), key
    for key in INT_KEYS:
        assert line[key] == ref[key], key


def test_evaluate_blocks_give_the_same_line(vols):
    a = arrays(vols)
    done = emrun(vols, "evaluate", "v.zarr/seg", "v.zarr/truth", "--workers", "2", "--block",
                 "2", "5", "7", "--min-overlap", "3", "--json")
    assert done.returncode == 0, done.stderr
    line = one_json_line(done.stdout)
    ref = ref_scores(a["seg"], a["truth"], None, min_overlap=3)
    for key in FLOAT_KEYS:
        assert line[key] == pytest.approx(ref[key], rel=1e-12, abs=1e-12), key
    assert {k: line[k] for k in INT_KEYS} == {k: ref[k] for k in INT_KEYS}
    assert line["mask"] is None


def _ref_binary(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray | None
                ) -> dict[str, float | int | None]:
    inside = np.ones(pred.shape, bool) if mask is None else mask != 0
    p, t = pred[inside], truth[inside] != 0
    tp = int(np.sum(p & t))
    fp = int(np.sum(p & ~t))
    fn = int(np.sum(~p & t))
    tn = int(np.sum(~p & ~t))

    def ratio(a: int, b: int) -> float | None:
        return None if b == 0 else float(Fraction(a, b))

    return {"precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn),
            "f1": ratio(2 * tp, 2 * tp + fp + fn), "iou": ratio(tp, tp + fp + fn), "tp": tp,
            "fp": fp, "fn": fn, "tn": tn, "voxels": int(inside.sum())}


@pytest.mark.parametrize(("pred", "truth", "mask", "threshold"), [
    ("prob", "truth", "mask", "0.3"),
    ("prob", "empty", None, "0.3"),     # no truth foreground: recall null
    ("zeros", "empty", None, None),     # neither has any: all four null
    ("zeros", "truth", None, None),     # nothing predicted: precision null
])
def test_evaluate_binary_line_nulls_not_nan(vols, pred, truth, mask, threshold):
    a = arrays(vols)
    args = ["evaluate", f"v.zarr/{pred}", f"v.zarr/{truth}", "--binary", "--json"]
    args += ["--mask", f"v.zarr/{mask}"] if mask else []
    args += ["--threshold", threshold] if threshold else []
    done = emrun(vols, *args)
    assert done.returncode == 0, done.stderr
    line = one_json_line(done.stdout)
    assert list(line) == BINARY_KEYS and line["mode"] == "binary"
    p = {"prob": a["prob"] > float(threshold or 0.5),
         "zeros": np.zeros(a["seg"].shape, bool)}[pred]
    t = {"truth": a["truth"], "empty": np.zeros(a["seg"].shape, np.int32)}[truth]
    ref = _ref_binary(p, t, a["mask"] if mask else None)
    for key, value in ref.items():
        if value is None or isinstance(value, int):
            assert line[key] == value, key
        else:
            assert line[key] == pytest.approx(value, rel=1e-12), key
    if None in ref.values():
        assert "n/a" in done.stderr and "null" in done.stdout


@pytest.mark.parametrize("args", [
    ["v.zarr/seg", "v.zarr/empty"],                       # nothing to score
    ["v.zarr/seg", "v.zarr/truth", "--mask", "v.zarr/zeros"],  # an all-zero mask
    ["v.zarr/seg", "v.zarr/coarse"],                      # another voxel size
    ["v.zarr/seg", "v.zarr/truth", "--threshold", "0.5"],  # an option of the other mode
    ["v.zarr/seg", "v.zarr/nothing"],                     # no such volume
    ["v.zarr/prob", "v.zarr/truth", "--binary", "--threshold", "nan"],
])
def test_evaluate_user_errors_leave_stdout_empty(vols, args):
    user_error(emrun(vols, "evaluate", *args, "--json"))


# --- segment ------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [None, "mask"])
def test_segment_cc_line_matches_flood_fill(vols, tmp_path, mask):
    a = arrays(vols)
    out = tmp_path / "s.zarr"
    args = ["segment", str(vols / "v.zarr/affs"), str(out), "--method", "cc", "--threshold",
            "0.55", "--json"]
    args += ["--mask", str(vols / "v.zarr/mask")] if mask else []
    done = emrun(tmp_path, *args)
    assert done.returncode == 0, done.stderr
    line = one_json_line(done.stdout)
    assert "wrote" in done.stderr and "wrote" not in done.stdout
    ref = ref_components(a["affs"], 0.55, a["mask"] if mask else None)
    written = np.asarray(open_volume(str(out / "segmentation")).read())
    assert same_partition(written, ref)
    assert line["method"] == "cc" and line["output"] == str(out)
    assert line["outputs"] == [{"name": "segmentation", "threshold": 0.55,
                                "segments": int(ref.max())}]
    assert line["mask"] == (str(vols / "v.zarr/mask") if mask else None)
    assert line["sweep"] is None and isinstance(line["seconds"], float)


def test_segment_several_values_one_line(vols, tmp_path):
    a = arrays(vols)
    out = tmp_path / "s.zarr"
    done = emrun(tmp_path, "segment", str(vols / "v.zarr/affs"), str(out), "--method", "cc",
                 "--threshold", "0.3,0.7", "--json")
    assert done.returncode == 0, done.stderr
    line = one_json_line(done.stdout)
    got = {(o["name"], o["threshold"], o["segments"]) for o in line["outputs"]}
    want = {(f"segmentation_{t}", t, int(ref_components(a["affs"], t).max()))
            for t in (0.3, 0.7)}
    assert got == want


def test_segment_waterz_values_line_names_only_what_ran(vols, tmp_path):
    pytest.importorskip("waterz")
    done = emrun(tmp_path, "segment", str(vols / "v.zarr/affs"), str(tmp_path / "s.zarr"),
                 "--method", "waterz", "--threshold", "0.3,0.6", "--json")
    assert done.returncode == 0, done.stderr
    line = one_json_line(done.stdout)
    assert [o["threshold"] for o in line["outputs"]] == [0.3, 0.6]
    ran = [0.3, 0.6]
    # the graph scheduler's line says {"thresholds": [0.3, 0.6]}; either name, but only
    # the values that were run
    stated = [v for k in ("threshold", "thresholds") if k in line["parameters"]
              for v in line["parameters"][k]]
    assert sorted(set(stated)) == ran, line["parameters"]


def test_segment_all_zero_mask_warns_on_stderr_only(vols, tmp_path):
    done = emrun(tmp_path, "segment", str(vols / "v.zarr/affs"), str(tmp_path / "s.zarr"),
                 "--method", "cc", "--mask", str(vols / "v.zarr/zeros"), "--json")
    assert done.returncode == 0, done.stderr
    line = one_json_line(done.stdout)
    assert "holds zeros only" in done.stderr
    assert line["outputs"][0]["segments"] == 0


def test_segment_sweep_at_edge_table_and_note(vols, tmp_path):
    """The best value alone at the low edge: note on stderr, `at_edge` true, each row the
    reference's scores of that value's components; the sweep's table for people on stderr."""
    a = arrays(vols)
    out = tmp_path / "s.zarr"
    done = emrun(tmp_path, "segment", str(vols / "v.zarr/step"), str(out), "--method", "cc",
                 "--sweep", "--truth", str(vols / "v.zarr/shifted"), "--threshold",
                 "0.2,0.5,0.8", "--json")
    assert done.returncode == 0, done.stderr
    line = one_json_line(done.stdout)
    assert "at the edge" in done.stderr and "negative ids" in done.stderr
    assert "fraction of a voxel" in done.stderr and "best threshold" in done.stderr
    sweep = line["sweep"]
    assert sweep["parameter"] == "threshold" and sweep["chosen"] == 0.2
    assert sweep["at_edge"] is True
    assert [row["threshold"] for row in sweep["table"]] == [0.2, 0.5, 0.8]
    for row in sweep["table"]:
        ref = ref_scores(ref_components(a["step"], row["threshold"]), a["truth"])
        for key in FLOAT_KEYS:
            assert row[key] == pytest.approx(ref[key], rel=1e-12, abs=1e-12), key
        for key in INT_KEYS:
            assert row[key] == ref[key], key
    assert sweep["best"] == {k: v for k, v in sweep["table"][0].items() if k != "threshold"}
    assert line["outputs"][0]["segments"] == 2


@pytest.mark.parametrize("args", [
    ["v.zarr/nan_affs", "s.zarr", "--method", "cc"],                  # non-finite affinities
    ["v.zarr/affs", "s.zarr", "--method", "cc", "--bias", "0.3"],      # a value of mws
    ["v.zarr/affs", "s.zarr", "--sweep", "--truth", "v.zarr/empty"],    # nothing to score
    ["v.zarr/affs", "s.zarr", "--method", "cc", "--threshold", "x"],   # not a number
    ["v.zarr/affs", "s.zarr", "--sweep", "--truth", "v.zarr/coarse"],  # another grid
])
def test_segment_user_errors_leave_stdout_empty(vols, args):
    user_error(emrun(vols, "segment", *args, "--json"))


# --- bench --------------------------------------------------------------------------------


def _strictly_finite(value, where="") -> None:
    if isinstance(value, float):
        assert math.isfinite(value), where
    elif isinstance(value, dict):
        for k, v in value.items():
            _strictly_finite(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _strictly_finite(v, f"{where}[{i}]")


def test_bench_codecs_line(vols):
    done = emrun(vols, "bench", "codecs", "v.zarr/affs", "--chunks", "C,4,12,12", "--codec",
                 "zstd-1", "--passes", "1", "--sample-mb", "0.01", "--max-mb", "0.01",
                 "--json")
    assert done.returncode == 0, done.stderr
    line = one_json_line(done.stdout)
    _strictly_finite(line)
    assert "best" in done.stderr and "ratio" in done.stderr
    assert line["lossless"] is True and line["best"]["codec"] == "zstd-1"
    assert line["shape"] == [3, 4, 12, 12] and line["dtype"] == "float32"
    (row,) = line["rows"]
    assert row["chunks"] == [3, 4, 12, 12]
    assert line["region_mb"] == pytest.approx(3 * 4 * 12 * 12 * 4 / 1e6)


def test_bench_segment_line(tmp_path):
    done = emrun(tmp_path, "bench", "segment", "--shape", "8", "32", "32", "--block", "8", "16",
                 "16", "--workers", "1", "--folder", str(tmp_path), "--json", timeout=120)
    assert done.returncode == 0, done.stderr
    line = one_json_line(done.stdout)
    _strictly_finite(line)
    assert line["shape"] == [8, 32, 32] and line["voxels"] == 8 * 32 * 32
    assert [r["workers"] for r in line["runs"]] == [1]
    assert "segment:" in done.stderr


@pytest.mark.parametrize("args", [  # the rest of bench's mistakes: tests/test_bench_probe.py
    ["segment", "--agglomeration", "nope"],
    ["codecs", "v.zarr/affs", "--sample-mb", "inf"],
])
def test_bench_user_errors_leave_stdout_empty(vols, args):
    user_error(emrun(vols, "bench", *args, "--json"))


# --- view ---------------------------------------------------------------------------------


def test_view_line_is_json_and_its_link_holds_its_state(vols):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "emrun", "view", "v.zarr/seg", "v.zarr/affs", "--client",
         "https://example.org", "--json"], cwd=vols, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a background
    # job's children start with SIGINT ignored (CI run with `&`): as at a terminal instead
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(30)
    try:
        assert got and got[0].endswith("\n"), "no line on stdout"
        line = json.loads(got[0], parse_constant=_refuse)
    finally:
        proc.send_signal(signal.SIGINT)
        rest, stderr = proc.communicate(timeout=30)
    assert rest == "", rest  # nothing after the JSON line
    assert set(line) == {"link", "data", "state"}
    assert line["data"].startswith("http://127.0.0.1:")
    base, _, fragment = line["link"].partition("#!")
    assert base == "https://example.org"
    assert json.loads(urllib.parse.unquote(fragment)) == line["state"]
    assert [layer["type"] for layer in line["state"]["layers"]] == ["segmentation", "image"]
    assert "data served at" in stderr and "segmentation layer" in stderr


def test_evaluate_threshold_nan_is_said_as_not_a_probability(vols):
    """click's range check read NaN as 'should be less than or equal to 1'."""
    done = emrun(vols, "evaluate", "v.zarr/prob", "v.zarr/truth", "--binary", "--threshold",
                 "nan", "--json")
    assert done.returncode == 2 and "--threshold nan: a probability in [0, 1]" in done.stderr
