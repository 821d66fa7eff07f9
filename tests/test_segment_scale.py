"""Segmentation at scale (`emrun segment --scheduler`): fragments per block, the region graph
in a database, agglomeration, relabelling. Checked against the truth the affinities were
made from, against one block holding the whole volume, across block faces, after kill -9 at
any step, on SQLite and (when the machine has a PostgreSQL server) PostgreSQL, and on the
user's mistakes. Synthetic cells made in code."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zarr
from test_segment import affinities, arand, cells, noisy
from typer.testing import CliRunner

from emrun.cli import app
from emrun.io import VolumeError, open_volume, write_volume
from emrun.segment.graph import Edges
from emrun.segment.scale.agglomerate import (
    Merges,
    agglomerate,
    join_levels,
    merge_sequence,
    segments_from_levels,
)
from emrun.segment.scale.graphdb import GraphData
from emrun.segment.scale.rag import BINS, histogram_quantile
from emrun.segment.scale.steps import lookup

runner = CliRunner()
NEAREST = ((-1, 0, 0), (0, -1, 0), (0, 0, -1))
SHAPE = (24, 96, 96)


@pytest.fixture(scope="module")
def volume(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """Noisy uint8 affinities of 40 space-filling cells, and the cells."""
    tmp = tmp_path_factory.mktemp("scale")
    truth = cells(SHAPE, n=40, seed=3)
    affs = noisy(affinities(truth, NEAREST), 0.1, seed=1)
    write_volume(tmp / "in.zarr", "affinity", np.round(affs * 255).astype(np.uint8),
                 channel_axis=True, attrs={"offsets": [list(o) for o in NEAREST]})
    write_volume(tmp / "in.zarr", "truth", truth.astype(np.uint64))
    return tmp, truth


def segment(tmp: Path, out: str, *extra: str) -> tuple[Path, object]:
    path = tmp / out
    result = runner.invoke(app, ["segment", str(tmp / "in.zarr/affinity"), str(path),
                                 "--scheduler", "local", *extra])
    return path, result


def level0(store: Path, name: str) -> np.ndarray:
    return zarr.open_array(str(store / "labels" / name / "0"), mode="r")[...]


@pytest.mark.parametrize(("block", "workers"), [("24 96 96", "1"), ("8 32 32", "1"),
                                                ("6 40 24", "2")])
def test_blockwise_segmentation_finds_the_cells_whatever_the_blocks(volume, block, workers):
    tmp, truth = volume
    out, result = segment(tmp, f"b{block.replace(' ', '_')}.zarr", "--block", *block.split(),
                          "--workers", workers, "--threshold", "0.5")
    assert result.exit_code == 0, result.output
    seg = level0(out, "segmentation")
    assert arand(seg, truth) < 1e-3
    assert seg.min() > 0 and np.unique(seg).size == 40
    fragments = level0(out, "fragments")
    assert np.unique(fragments).size > 40  # agglomeration joined fragments


def test_no_segment_is_cut_along_a_block_face(volume):
    """Every face between blocks: voxel pairs of one cell on both sides keep one id."""
    tmp, truth = volume
    out, result = segment(tmp, "faces.zarr", "--block", "8", "32", "32")
    assert result.exit_code == 0, result.output
    seg = level0(out, "segmentation")
    cut = 0
    for axis, size in enumerate((8, 32, 32)):
        for face in range(size, SHAPE[axis], size):
            a = np.take(seg, face - 1, axis), np.take(seg, face, axis)
            t = np.take(truth, face - 1, axis), np.take(truth, face, axis)
            cut += int(((t[0] == t[1]) & (a[0] != a[1])).sum())
    assert cut == 0


def test_mutex_watershed_fragments_are_an_option(volume):
    tmp, truth = volume
    out, result = segment(tmp, "mwsfrag.zarr", "--block", "12", "48", "48", "--fragments",
                          "mws")
    assert result.exit_code == 0, result.output
    assert arand(level0(out, "segmentation"), truth) < 0.01
    fragments = level0(out, "fragments")
    assert fragments.min() > 0 and np.unique(fragments).size >= 40


def test_several_thresholds_come_from_one_graph(volume):
    tmp, _truth = volume
    out, result = segment(tmp, "many.zarr", "--block", "12", "48", "48", "--threshold",
                          "0.05,0.5,0.99")
    assert result.exit_code == 0, result.output
    counts = [np.unique(level0(out, f"segmentation_{t}")).size for t in ("0.05", "0.5", "0.99")]
    assert counts[0] > counts[1] == 40 > counts[2]  # fewer merges, right, everything merged


def test_agglomeration_follows_waterz_semantics():
    """Chain 0-1-2-3: edges of mean affinity 0.9, 0.35, 0.8. Merging 0-1 (score 0.1) and
    2-3 (0.2) happens below 0.5; 1-2 (score 0.65) only above it."""
    u, v = np.array([0, 1, 2]), np.array([1, 2, 3])
    graph = GraphData(np.arange(1, 5, dtype=np.uint64), np.full(4, 100), u, v,
                      np.array([90.0, 35.0, 80.0]), np.array([100, 100, 100]),
                      np.zeros((3, BINS), np.int64))
    low, mid, high = agglomerate(graph, [0.15, 0.5, 0.7], "mean")
    assert low.tolist() == [1, 1, 2, 3]
    assert mid.tolist() == [1, 1, 2, 2]
    assert high.tolist() == [1, 1, 1, 1]


def test_agglomeration_stops_at_the_first_merge_above_the_threshold():
    """Scores fall as regions grow: A-B (score 0.4) merges; then AB-C, whose summed edge
    scores 0.3, merges only because A-B merged first. At threshold 0.35 neither happens."""
    # edges: 0-1 mean 0.6 (score 0.4); 0-2 mean 0.5 (0.5) and 1-2 mean 0.9 (0.1) over few
    # voxels; 1-2 alone would merge first: make it small so the sum is what counts.
    u, v = np.array([0, 0, 1]), np.array([1, 2, 2])
    total, count = np.array([60.0, 2.0, 9.0]), np.array([100, 4, 10])  # 0.6, 0.5, 0.9
    graph = GraphData(np.arange(1, 4, dtype=np.uint64), np.full(3, 50), u, v, total, count,
                      np.zeros((3, BINS), np.int64))
    first, later = agglomerate(graph, [0.05, 0.5], "mean")
    assert first.tolist() == [1, 2, 3]
    assert later.tolist() == [1, 1, 1]


def _brute_force_agglomeration(graph: GraphData, threshold: float, scoring: str) -> np.ndarray:
    """The definition, slowly: regions as sets of nodes; each step scores every pair of
    touching regions from all original edges between them (summed affinities and counts,
    or summed histograms) and merges the lowest, until it scores the threshold or more."""
    region = np.arange(graph.ids.size)
    while True:
        best, pair = np.inf, None
        for a in np.unique(region):
            for b in np.unique(region):
                between = (region[graph.u] == a) & (region[graph.v] == b)
                between |= (region[graph.u] == b) & (region[graph.v] == a)
                if a >= b or not between.any():
                    continue
                if scoring == "mean":
                    score = 1 - graph.total[between].sum() / graph.count[between].sum()
                else:
                    score = 1 - histogram_quantile(graph.hist[between].sum(axis=0), 0.85)
                if score < best:
                    best, pair = score, (a, b)
        if pair is None or best >= threshold:
            return np.unique(region, return_inverse=True)[1].reshape(-1) + 1
        region[region == pair[1]] = pair[0]


@pytest.mark.parametrize("scoring", ["mean", "p85"])
@pytest.mark.parametrize("seed", [3, 4])
def test_agglomeration_matches_its_definition_on_random_graphs(scoring, seed):
    """The compiled agglomeration (linked edge lists, a heap with stale entries, regions
    named by a node) against a brute force that re-scores every pair of regions at each
    step; random scores, so no ties and one right answer at each threshold."""
    rng = np.random.default_rng(seed)
    graph = _random_graph(seed, n=30, m=90)
    hist = np.stack([np.bincount(np.minimum((rng.beta(*rng.uniform(0.5, 5, 2), rng.integers(
        5, 60)) * BINS).astype(int), BINS - 1), minlength=BINS) for _ in graph.u])
    graph = GraphData(graph.ids, graph.sizes, graph.u, graph.v, graph.total, graph.count, hist)
    segments = []
    for threshold in (0.1, 0.2, 0.3):
        (got,) = agglomerate(graph, [threshold], scoring)
        assert _same_partition(got, _brute_force_agglomeration(graph, threshold, scoring))
        segments.append(np.unique(got).size)
    assert graph.ids.size > segments[0] > segments[1] > segments[2]  # every step merges


def test_histogram_quantile_reads_the_85th_percentile():
    rng = np.random.default_rng(0)
    values = rng.beta(2, 5, size=(20, 500))
    hist = np.stack([np.bincount(np.minimum((v * BINS).astype(int), BINS - 1), minlength=BINS)
                     for v in values])
    got = histogram_quantile(hist, 0.85)
    assert np.abs(got - np.quantile(values, 0.85, axis=1)).max() < 1.0 / BINS


@pytest.mark.parametrize("scoring", ["mean", "p85"])
def test_blockwise_graph_agglomeration_matches_waterz_in_memory(volume, scoring):
    """The recipe's waterz section (here the request's spec) drives both paths; blockwise on
    the graph gives what waterz gives on the whole volume in memory (p85 merges two cells
    here, in both)."""
    pytest.importorskip("waterz")
    from emrun.recipe.run import Waterz
    from emrun.registry import segmenters
    from emrun.segment import segment_array
    from emrun.segment.job import run_segment
    from emrun.segment.request import SegmentRequest

    tmp, truth = volume
    spec = Waterz(thresholds=[0.5], scoring=scoring)
    out = tmp / f"{scoring}.zarr"
    request = SegmentRequest(affinities=str(tmp / "in.zarr/affinity"), output=out, spec=spec,
                             scheduler="local", block=(12, 48, 48))
    result = run_segment(request)
    assert result.parameters["scoring"] == scoring and result.mode == "graph (local)"
    affs = zarr.open_array(str(tmp / "in.zarr/affinity/0"))[...].astype(np.float32) / 255
    in_memory = segment_array(affs, NEAREST, segmenters.build(spec))
    assert arand(level0(out, "segmentation"), in_memory) < 1e-3
    assert arand(in_memory, truth) < (1e-3 if scoring == "mean" else 0.05)


def test_resume_agglomerates_the_same_graph_at_another_threshold(volume):
    tmp, _ = volume
    out, result = segment(tmp, "again.zarr", "--block", "12", "48", "48")
    assert result.exit_code == 0, result.output
    _, result = segment(tmp, "again.zarr", "--block", "12", "48", "48", "--threshold", "0.99",
                        "--name", "merged", "--resume")
    assert result.exit_code == 0, result.output
    assert "fragments: 0 of 8 blocks to do" in result.output
    assert "graph: 0 of 8 blocks to do" in result.output
    merged = level0(out, "merged")
    assert merged.min() > 0 and np.unique(merged).size == 1


# --- blockwise agglomeration ---------------------------------------------------------------

def _random_graph(seed: int, n: int = 120, m: int = 400) -> GraphData:
    rng = np.random.default_rng(seed)
    u, v = rng.integers(0, n, m), rng.integers(0, n, m)
    count = rng.integers(1, 50, m)
    total = rng.random(m) * count
    hist = rng.integers(0, 20, (m, BINS))
    edges = Edges.aggregate(u, v, total, count)
    keep = np.isin(np.minimum(u, v) * n + np.maximum(u, v), edges.u * n + edges.v)
    summed = np.zeros((edges.u.size, BINS), np.int64)
    pair = np.searchsorted(edges.u * n + edges.v,
                           (np.minimum(u, v) * n + np.maximum(u, v))[keep & (u != v)])
    np.add.at(summed, pair, hist[keep & (u != v)])
    return GraphData(np.arange(1, n + 1, dtype=np.uint64), rng.integers(1, 1000, n), edges.u,
                     edges.v, edges.total, edges.count, summed)


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = np.unique(np.stack([a, b]), axis=1)
    return np.unique(pairs[0]).size == pairs.shape[1] == np.unique(pairs[1]).size


@pytest.mark.parametrize("scoring", ["mean", "p85"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_join_levels_of_every_edge_give_the_global_agglomeration(scoring, seed):
    """The blockwise merge's principle: with one block holding the whole graph, the
    components of the edges joined below a threshold are the hierarchical agglomeration's
    segments at that threshold, for every threshold."""
    graph = _random_graph(seed)
    merges = merge_sequence(graph, 1.0, scoring)
    assert len(merges) > 50
    level = join_levels(graph.ids.size, merges, graph.u, graph.v)
    thresholds = [0.1, 0.3, 0.45, 0.5, 0.55, 0.7, 0.99]
    expected = agglomerate(graph, thresholds, scoring)
    got = segments_from_levels(graph, graph.u, graph.v, level, thresholds)
    for threshold, a, b in zip(thresholds, expected, got, strict=True):
        assert _same_partition(a, b), threshold


def test_join_levels_record_the_running_maximum():
    """Chain 0-1-2-3 with merges 0-1 at 0.4, then 2-3 at 0.2, then 1-2 at 0.6: 2-3 joined
    after a merge at 0.4, so a threshold of 0.3 must not take it; 0-3 is never an edge."""
    merges = Merges(np.array([0.4, 0.2, 0.6]), np.array([0, 3, 1]), np.array([1, 2, 3]))
    level = join_levels(4, merges, np.array([0, 2, 1, 0]), np.array([1, 3, 2, 2]))
    assert level.tolist() == [0.4, 0.4, 0.6, 0.6]
    once = Merges(np.array([0.1]), np.array([0]), np.array([1]))
    assert np.isinf(join_levels(3, once, np.array([1]), np.array([2]))).all()


@pytest.mark.parametrize("scoring", ["mean", "p85"])
def test_blockwise_agglomeration_in_one_block_is_the_global_one(volume, scoring):
    from emrun.recipe.run import Waterz
    from emrun.segment.job import run_segment
    from emrun.segment.request import SegmentRequest

    tmp, _ = volume
    outs = {}
    for kind in ("global", "blockwise"):
        outs[kind] = tmp / f"one-{kind}-{scoring}.zarr"
        run_segment(SegmentRequest(
            affinities=str(tmp / "in.zarr/affinity"), output=outs[kind], block=(24, 96, 96),
            spec=Waterz(thresholds=[0.3, 0.5, 0.8], scoring=scoring), scheduler="local",
            agglomeration=kind))
    for t in ("0.3", "0.5", "0.8"):
        a = level0(outs["global"], f"segmentation_{t}")
        b = level0(outs["blockwise"], f"segmentation_{t}")
        assert _same_partition(a.ravel(), b.ravel()), t


def test_blockwise_agglomeration_across_many_blocks_finds_the_cells(volume):
    """27 blocks on 2 workers, each agglomerating its neighbourhood: the cells, uncut at the
    block faces, and what the global agglomeration gives."""
    tmp, truth = volume
    out, result = segment(tmp, "bw.zarr", "--block", "8", "32", "32", "--workers", "2",
                          "--agglomeration", "blockwise", "--threshold", "0.5")
    assert result.exit_code == 0, result.output
    assert "agglomerate: 27 of 27 blocks to do" in result.output
    assert "merging the blocks' agglomerations" in result.output
    seg = level0(out, "segmentation")
    assert arand(seg, truth) < 1e-3 and np.unique(seg).size == 40
    glob, result = segment(tmp, "bw-global.zarr", "--block", "8", "32", "32",
                           "--threshold", "0.5")
    assert result.exit_code == 0, result.output
    assert arand(seg, level0(glob, "segmentation")) < 1e-3
    # the same graph, agglomerated again at another threshold: only the merge runs again
    _, result = segment(tmp, "bw.zarr", "--block", "8", "32", "32", "--agglomeration",
                        "blockwise", "--threshold", "0.99", "--name", "merged", "--resume")
    assert result.exit_code == 0, result.output
    assert "agglomerate: 0 of 27 blocks to do" in result.output
    merged = level0(out, "merged")
    assert merged.min() > 0 and np.unique(merged).size == 1


def _command(tmp: Path, out: Path, workers: str = "2", *extra: str) -> list[str]:
    return [sys.executable, "-m", "emrun", "segment", str(tmp / "in.zarr/affinity"), str(out),
            "--scheduler", "local", "--workers", workers, "--block", "6", "24", "24",
            "--threshold", "0.3,0.5", *extra]


def _in_process(command: list[str], workers: str = "1", *extra: str) -> None:
    """``command`` (a `_command` line) run in this process on ``workers`` workers, with
    ``extra`` options; it must succeed. Where the process boundary is not under test (a
    reference run, a resume after kill -9) this spares the interpreter's start."""
    args = command[command.index("segment"):]
    args[args.index("--workers") + 1] = workers
    result = runner.invoke(app, [*args, *extra])
    assert result.exit_code == 0, result.output


def _straight(tmp: Path, *extra: str) -> Path:
    """The uninterrupted run of `_command` (one worker) with ``extra``, made once."""
    straight = tmp / f"straight{'-'.join(extra)}.zarr"
    if not straight.exists():
        _in_process(_command(tmp, straight, "1", *extra))
    return straight


def _graph_blocks(out: Path, table: str = "blocks") -> int:
    db = out / ".emrun-segment" / "graph.sqlite"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=1) as conn:
            return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    except sqlite3.Error:
        return 0


def _markers(out: Path, step: str) -> int:
    folder = out / ".emrun-segment"
    return sum(len(list(d.glob("*_*_*"))) for d in folder.glob(f"{step}*")) if folder.exists() \
        else 0


@pytest.mark.parametrize("moment", ["fragments", "graph", "agglomerate", "relabel"])
def test_kill_9_at_any_step_then_resume_gives_the_same_segmentation_bit_for_bit(volume, moment):
    tmp, _ = volume
    extra = ("--agglomeration", "blockwise") if moment in ("agglomerate", "relabel") else ()
    straight = _straight(tmp, *extra)
    out = tmp / f"killed-{moment}.zarr"
    process = subprocess.Popen(_command(tmp, out, "2", *extra), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    reached = {"fragments": lambda: _markers(out, "fragments") >= 10,
               "graph": lambda: _graph_blocks(out) >= 10,
               "agglomerate": lambda: _graph_blocks(out, "agglomerated") >= 10,
               "relabel": lambda: _markers(out, "relabel") >= 10}[moment]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None and not reached():
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run must be killed midway"
    with pytest.raises(VolumeError, match="is unfinished: emrun segment stopped"):
        open_volume(str(out / "segmentation_0.5"))  # half zeros: not to be scored as it is
    if moment == "fragments":  # the fragments too, until their last block is in
        with pytest.raises(VolumeError, match="is unfinished"):
            open_volume(str(out / "fragments"))
    else:
        assert open_volume(str(out / "fragments")).shape == SHAPE
    _in_process(_command(tmp, out, "2", *extra), "1", "--resume")
    for name in ("fragments", "segmentation_0.3", "segmentation_0.5"):
        assert np.array_equal(level0(out, name), level0(straight, name)), name
    assert open_volume(str(out / "segmentation_0.5")).shape == SHAPE


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_worker_killed_mid_block_fails_the_run_and_resume_finishes_it(volume):
    """kill -9 of one worker (the OOM killer's way): the run stops with one line and exit 2
    naming what happened, and --resume gives the uninterrupted segmentation."""
    from test_infer_scheduling import _spawned_children

    tmp, _ = volume
    straight = _straight(tmp)
    out = tmp / "worker-killed.zarr"
    process = subprocess.Popen(_command(tmp, out), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    workers: list[int] = []
    while time.monotonic() < deadline and process.poll() is None and \
            (_markers(out, "fragments") < 5 or not workers):
        workers = _spawned_children(process.pid)
        time.sleep(0.002)
    assert workers, "worker processes must have started"
    os.kill(workers[0], signal.SIGKILL)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2, stderr
    assert "worker died" in stderr and "--resume" in stderr
    _in_process(_command(tmp, out), "1", "--resume")
    for name in ("fragments", "segmentation_0.3", "segmentation_0.5"):
        assert np.array_equal(level0(out, name), level0(straight, name)), name


@pytest.mark.slow
def test_daisy_workers_started_through_launch_give_what_local_workers_give(volume,
                                                                            monkeypatch):
    pytest.importorskip("daisy")
    tmp, _ = volume
    blockwise = ("--agglomeration", "blockwise")  # every block step on daisy
    local, result = segment(tmp, "local.zarr", "--block", "12", "48", "48", *blockwise)
    assert result.exit_code == 0, result.output
    out = tmp / "daisy.zarr"
    monkeypatch.chdir(tmp)  # the workers, started by a command, run elsewhere than the tests
    result = runner.invoke(app, ["segment", str(tmp / "in.zarr/affinity"), str(out),
                                 "--scheduler", "daisy", "--workers", "2", "--block", "12",
                                 "48", "48", *blockwise, "--launch", "env EMRUN_LAUNCHED=1"])
    assert result.exit_code == 0, result.output
    for name in ("fragments", "segmentation"):
        assert np.array_equal(level0(out, name), level0(local, name)), name


# --- PostgreSQL -----------------------------------------------------------------------------

def _postgres_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


@contextlib.contextmanager
def throwaway_postgres(password: str | None = None) -> Iterator[str]:
    """A throwaway PostgreSQL server on a free local port (as user postgres when root): the
    URL of its database for the role emrun, without the password; with ``password`` the
    server asks for it (scram-sha-256), else it trusts local connections."""
    initdb, pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("no PostgreSQL server on this machine (initdb/pg_ctl not found; .ci/run "
                    "installs one)")
    pytest.importorskip("psycopg", reason="psycopg missing: pip install 'emrun[postgres]'")
    folder = Path(tempfile.mkdtemp(prefix="emrun-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        try:
            import pwd

            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server")
        os.chmod(folder, 0o755)
        os.chown(folder, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    auth = ["-A", "trust"]
    if password is not None:
        secret = folder / "password"
        secret.write_text(f"{password}\n")
        os.chmod(secret, 0o644)
        auth = ["-A", "scram-sha-256", f"--pwfile={secret}"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = folder / "data"
    subprocess.run([*prefix, initdb, "-D", str(data), *auth, "-U", "emrun"],
                   check=True, capture_output=True)
    subprocess.run([*prefix, pg_ctl, "-D", str(data), "-l", str(folder / "log"), "-w", "-o",
                    f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql://emrun@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL server that trusts local connections: its database's URL."""
    with throwaway_postgres() as url:
        yield url


def test_postgresql_holds_the_graph_and_gives_what_sqlite_gives(volume, postgres_url):
    tmp, _truth = volume
    blockwise = ("--agglomeration", "blockwise")  # reads regions and levels back, too
    lite, result = segment(tmp, "lite.zarr", "--block", "12", "48", "48", *blockwise)
    assert result.exit_code == 0, result.output
    pg, result = segment(tmp, "pg.zarr", "--block", "12", "48", "48", "--workers", "2",
                         "--db", postgres_url, *blockwise)
    assert result.exit_code == 0, result.output
    assert not (pg / ".emrun-segment" / "graph.sqlite").exists()
    assert np.array_equal(level0(pg, "segmentation"), level0(lite, "segmentation"))
    # the same database for other fragments is refused, not mixed
    _, result = segment(tmp, "pg2.zarr", "--block", "8", "48", "48", "--db", postgres_url)
    assert result.exit_code == 2 and "holds the graph of other fragments" in result.output


def test_postgresql_role_without_rights_is_one_line_and_exit_2(volume, postgres_url):
    """A role that may connect but not create tables (PostgreSQL 15's default on the public
    schema): the database's own reason, one line, exit 2, no output volume started."""
    import psycopg

    tmp, _ = volume
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("CREATE ROLE visitor LOGIN")
        conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")  # as 15 has it, for 14-
    out, result = segment(tmp, "visitor.zarr", "--db",
                          postgres_url.replace("//emrun@", "//visitor@"))
    assert result.exit_code == 2, result.output
    assert "permission denied" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (out / "labels").exists()


@pytest.mark.slow
def test_postgresql_kill_9_then_resume(volume, postgres_url):
    """kill -9 mid-run with the graph in PostgreSQL; resumed, the same as SQLite's run."""
    import sqlalchemy as sa

    tmp, _ = volume
    with sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT").connect() as conn:
        conn.execute(sa.text("CREATE DATABASE killed"))
    db = postgres_url.rsplit("/", 1)[0] + "/killed"
    out = tmp / "pg-killed.zarr"
    command = [*_command(tmp, out), "--db", db]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None and \
            _markers(out, "fragments") < 40:
        time.sleep(0.002)
    time.sleep(0.3)  # into the graph step, mid-transaction on some block
    process.send_signal(signal.SIGKILL)
    process.wait()
    _in_process(command, "1", "--resume")
    reference = _straight(tmp)
    for name in ("fragments", "segmentation_0.3", "segmentation_0.5"):
        assert np.array_equal(level0(out, name), level0(reference, name)), name


# --- mistakes -------------------------------------------------------------------------------

@pytest.mark.parametrize(("extra", "message"), [
    (["--db", "postgresql://nobody@127.0.0.1:1/none"], "cannot create the graph tables"),
    (["--db", "mysql://x@y/z"], "give sqlite:///FILE or postgresql://"),
    (["--threshold", "1.5"], "--threshold: segmenter waterz: thresholds.0: input should be less"),
    (["--method", "mws"], "use --method waterz"),
    (["--fragments", "slic"], "choose watershed or mws"),
    (["--agglomeration", "local"], "choose global or blockwise"),
    (["--launch", "srun"], "add --scheduler daisy"),
])
def test_mistakes_are_one_line_and_exit_2(volume, extra, message):
    tmp, _ = volume
    out, result = segment(tmp, "bad.zarr", *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (out / "labels").exists(), "nothing half-written"


def test_a_block_beyond_the_watersheds_index_is_refused_before_any_work(tmp_path):
    """Blocks (with their context) are indexed as int32 by the watershed: a larger --block
    on a volume that large is one line and exit 2 (metadata only: nothing is read)."""
    from emrun.io.write import create_volume

    create_volume(tmp_path / "big.zarr", "affinity", (3, 1100, 2100, 2100), np.uint8,
                  chunks=(3, 32, 256, 256), channel_axis=True,
                  attrs={"offsets": [list(o) for o in NEAREST]})
    out = tmp_path / "out.zarr"
    result = runner.invoke(app, ["segment", str(tmp_path / "big.zarr/affinity"), str(out),
                                 "--scheduler", "local", "--block", "1024", "2048", "2048"])
    assert result.exit_code == 2, result.output
    assert "too large" in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_a_recorded_mws_recipe_does_not_stop_the_graph_pipeline(volume, tmp_path):
    """Inference outputs record their recipe's segmenter (the demo's: mws); --scheduler then
    agglomerates with waterz's settings and says so, instead of refusing."""
    tmp, truth = volume
    store = zarr.open_group(str(tmp / "in.zarr"), mode="r+")
    saved = dict(store.attrs)
    store.attrs["emrun"] = {"recipe": {"name": "demo", "segment": {"type": "mws", "bias": 0.5,
                                                                   "min_size": 0}}}
    try:
        out, result = segment(tmp, "recorded.zarr", "--block", "12", "48", "48")
    finally:
        store.attrs.clear()
        store.attrs.update(saved)
    assert result.exit_code == 0, result.output
    assert "segments with mws, which has no graph pipeline" in result.output
    assert arand(level0(out, "segmentation"), truth) < 1e-3


def test_pipeline_options_without_a_scheduler_are_refused(volume):
    tmp, _ = volume
    result = runner.invoke(app, ["segment", str(tmp / "in.zarr/affinity"), str(tmp / "x.zarr"),
                                 "--agglomeration", "blockwise"])
    assert result.exit_code == 2 and "--agglomeration: only with --scheduler" in result.output


def test_affinities_without_nearest_neighbours_are_refused(volume):
    tmp, _ = volume
    _, result = segment(tmp, "far.zarr", "--offsets", "-2,0,0 0,-2,0 0,0,-2")
    assert result.exit_code == 2
    assert "no nearest-neighbour affinity" in result.output


def test_resume_refuses_fragments_of_another_layout_and_an_unasked_resume(volume):
    tmp, _ = volume
    _out, result = segment(tmp, "layout.zarr", "--block", "12", "48", "48")
    assert result.exit_code == 0, result.output
    _, result = segment(tmp, "layout.zarr", "--block", "12", "48", "48")
    assert result.exit_code == 2 and "use --resume" in result.output
    _, result = segment(tmp, "layout.zarr", "--block", "8", "48", "48", "--resume")
    assert result.exit_code == 2 and "fragments were made with another block" in result.output


def test_resume_refuses_other_affinities_and_affinities_rewritten_since(volume, tmp_path):
    """Other affinities ended in an internal error (AttributeError) while the message was
    made; affinities rewritten under the same name resumed to a segmentation of both."""
    tmp, _ = volume
    affs = zarr.open_array(str(tmp / "in.zarr/affinity/0"), mode="r")[...]
    attrs = {"offsets": [list(o) for o in NEAREST]}
    write_volume(tmp_path / "copy.zarr", "affinity", affs, channel_axis=True, attrs=attrs)
    args = ["segment", str(tmp_path / "copy.zarr/affinity"), str(tmp_path / "o.zarr"),
            "--scheduler", "local", "--block", "12", "48", "48"]
    assert runner.invoke(app, args).exit_code == 0
    result = runner.invoke(app, [*args, "--resume", "--threshold", "0.3", "--name", "b"])
    assert result.exit_code == 0, result.output  # the same affinities: resumes
    other = [*args[:1], str(tmp / "in.zarr/affinity"), *args[2:], "--resume"]
    result = runner.invoke(app, other)
    assert result.exit_code == 2 and "fragments were made with another input" in result.stderr
    assert "internal error" not in result.output
    write_volume(tmp_path / "copy.zarr", "affinity", 255 - affs, channel_axis=True,
                 attrs=attrs, overwrite=True)
    result = runner.invoke(app, [*args, "--resume", "--threshold", "0.4", "--name", "c"])
    assert result.exit_code == 2 and "holds other data than when" in result.stderr


def _expected_region(around, nodes: dict[str, np.ndarray], whole: GraphData
                     ) -> tuple[np.ndarray, set[tuple[int, int]]]:
    """A block's neighbourhood by its definition, from the whole graph: its own nodes, those
    whose centre lies in its box, those an edge joins to its own; the edges among them."""
    centre = np.stack([nodes["z"], nodes["y"], nodes["x"]], axis=1)
    in_box = ((centre >= around.begin) & (centre < around.end)).all(1)
    taken = set(nodes["id"][(nodes["block"] == around.block) | in_box].tolist())
    pairs = set(zip(whole.ids[whole.u].tolist(), whole.ids[whole.v].tolist(), strict=True))
    for u, v in pairs:
        if around.first <= u <= around.last:
            taken.add(v)
        if around.first <= v <= around.last:
            taken.add(u)
    return np.array(sorted(taken)), {(u, v) for u, v in pairs if u in taken and v in taken}


def test_block_neighbourhoods_are_read_as_defined_whatever_the_cache_holds(volume,
                                                                          monkeypatch):
    """Blockwise agglomeration reads each block's neighbourhood from rows a worker keeps
    between blocks: in any order, with the cache evicting all it can, the graph read is the
    definition's; histograms asked later are read, not taken from rows read without; a
    database replaced by another graph is read anew."""
    from emrun.segment.scale import graphdb
    from emrun.segment.scale.job import ScaleJob
    from emrun.segment.scale.steps import neighbourhood

    tmp, _ = volume
    out, result = segment(tmp, "region.zarr", "--block", "8", "32", "32", "--agglomeration",
                          "blockwise", "--threshold", "0.5")
    assert result.exit_code == 0, result.output
    job = ScaleJob.load(out / ".emrun-segment" / "job.json")
    with sqlite3.connect(out / ".emrun-segment" / "graph.sqlite") as conn:
        rows = conn.execute("SELECT id, block, z, y, x FROM nodes").fetchall()
    nodes = {k: np.array([r[i] for r in rows]) for i, k in enumerate(("id", "block", "z", "y",
                                                                        "x"))}
    whole = graphdb.GraphStore(job.db).read(histograms=True)
    by_pair = {(int(whole.ids[a]), int(whole.ids[b])): i
               for i, (a, b) in enumerate(zip(whole.u, whole.v, strict=True))}
    monkeypatch.setattr(graphdb, "REGION_CACHE_BYTES", 1)  # keep only the current blocks
    kept = graphdb.GraphStore(job.db)
    indices = list(job.grid.indices())
    for index in [*indices, *indices[::-1]]:
        around = neighbourhood(job, index)
        graph = kept.read_region(around, histograms=False).graph
        ids, pairs = _expected_region(around, nodes, whole)
        assert graph.ids.tolist() == ids.tolist(), index
        got = list(zip(graph.ids[graph.u].tolist(), graph.ids[graph.v].tolist(), strict=True))
        assert set(got) == pairs and len(got) == len(pairs), index
        rows_of = [by_pair[p] for p in got]
        assert np.array_equal(graph.total, whole.total[rows_of])
        assert np.array_equal(graph.count, whole.count[rows_of])
        assert graph.hist.shape == (len(got), 0)
    with_hist = kept.read_region(around, histograms=True).graph
    assert np.array_equal(with_hist.hist, whole.hist[rows_of]) and with_hist.hist.sum() > 0

    other, result = segment(tmp, "region-other.zarr", "--block", "12", "48", "48",
                            "--agglomeration", "blockwise", "--threshold", "0.5")
    assert result.exit_code == 0, result.output
    with sqlite3.connect(other / ".emrun-segment" / "graph.sqlite") as source, \
            sqlite3.connect(out / ".emrun-segment" / "graph.sqlite") as target:
        source.backup(target)
    fresh = graphdb.GraphStore(job.db).read_region(around, histograms=True).graph
    again = kept.read_region(around, histograms=True).graph
    assert not np.array_equal(fresh.ids, with_hist.ids)
    assert np.array_equal(again.ids, fresh.ids) and np.array_equal(again.hist, fresh.hist)


def test_edges_aggregate_like_the_database_reads_them():
    """Two blocks seeing one fragment pair: their statistics add up."""
    merged = Edges.aggregate(np.array([3, 5, 3]), np.array([5, 3, 4]),
                             np.array([1.0, 2.0, 0.5]), np.array([2, 3, 1]))
    assert merged.u.tolist() == [3, 3] and merged.v.tolist() == [4, 5]
    assert merged.total.tolist() == [0.5, 3.0] and merged.count.tolist() == [1, 5]


@pytest.mark.parametrize("margin", [np.array([0, 7, 3, 7]), np.array([900, 0, 12]),
                                    np.array([], np.int64)])
def test_dense_ids_number_voxels_as_a_sort_would(margin):
    """A block's contiguous ids map by subtraction, the margin's by a small sort; the result
    is what one sort of everything gives, whichever side of the block's ids the margin is."""
    from emrun.segment.scale.rag import dense_ids

    rng = np.random.default_rng(0)
    core = rng.integers(100, 140, (4, 5, 6)).astype(np.uint64)
    core.ravel()[:40] = np.arange(100, 140)  # every id of the range present
    labels = np.concatenate([core.ravel(), margin.astype(np.uint64)])
    ids, dense = dense_ids(labels, labels[:core.size])
    expected_ids, inverse = np.unique(labels, return_inverse=True)
    assert np.array_equal(ids, expected_ids) and np.array_equal(dense, inverse.reshape(-1))
    gappy = core.copy()
    gappy[gappy == 120] = 121  # not contiguous: falls back to one sort, same answer
    ids, dense = dense_ids(gappy, gappy)
    expected_ids, inverse = np.unique(gappy, return_inverse=True)
    assert np.array_equal(ids, expected_ids)
    assert np.array_equal(dense, inverse.reshape(gappy.shape))


@pytest.mark.parametrize("spread", [3, 1000])  # a block's near-consecutive ids; sparser ones
def test_relabelling_lookup_maps_known_ids_and_zeroes_the_rest(spread):
    """Known ids take their segment; 0, ids the table lacks (between, below and above its
    ids, and far beyond) become 0."""
    rng = np.random.default_rng(spread)
    first = np.uint64(7 * 2**32)
    ids = first + np.unique(rng.integers(1, 200 * spread, 200)).astype(np.uint64)
    segments = rng.integers(1, 50, ids.size).astype(np.uint64)
    missing = np.setdiff1d(ids + np.uint64(1), ids)
    values = np.concatenate([ids, missing, [0, 1, int(first), int(ids[-1]) + 1, 2**63 + 5]])
    fragments = rng.permutation(np.repeat(values.astype(np.uint64), 3)).reshape(3, -1)
    known = dict(zip(ids.tolist(), segments.tolist(), strict=True))
    expected = np.vectorize(lambda i: known.get(int(i), 0), otypes=[np.uint64])(fragments)
    assert np.array_equal(lookup(fragments, ids, segments), expected)


def _kruskal_from_seeds(affs: np.ndarray, offsets, seeds: np.ndarray,
                        mask: np.ndarray) -> np.ndarray:
    """The seeded watershed by its definition, in plain Python: every nearest-neighbour edge
    with both ends in the mask, strongest first (ranked at 16 bits, ties in channel then
    voxel order), joins two trees unless both hold a seed; a voxel takes its tree's seed.
    Before the first edge of rank 32768 or less (affinity 0.5 or less), each tree of more
    than one voxel without a seed gets a new one, in order of its first voxel."""
    shape = seeds.shape
    edges = []
    for c, offset in enumerate(offsets):
        for v in np.ndindex(shape):
            w = tuple(a + d for a, d in zip(v, offset, strict=True))
            if all(0 <= a < n for a, n in zip(w, shape, strict=True)) and mask[v] and mask[w]:
                rank = int(np.float64(np.clip(affs[c][v], 0, 1)) * 65535 + 0.5)
                edges.append((-rank, len(edges), np.ravel_multi_index(v, shape),
                              np.ravel_multi_index(w, shape)))
    parent = list(range(seeds.size))
    label = [int(s) for s in seeds.ravel()]

    def root(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    top, seeded_the_strong = max(label), False
    for minus_rank, _, u, w in sorted(edges):
        if -minus_rank <= 32768 and not seeded_the_strong:
            seeded_the_strong = True
            for v in range(seeds.size):
                r = root(v)
                size = sum(root(x) == r for x in range(seeds.size))
                if label[r] == 0 and size > 1:
                    top += 1
                    label[r] = top
        a, b = root(u), root(w)
        if a != b and not (label[a] and label[b]):
            if label[a] == 0:
                a, b = b, a
            parent[b] = a
    return np.array([label[root(v)] for v in range(seeds.size)]).reshape(shape)


@pytest.mark.parametrize("masked", [False, True])
def test_fragments_flood_is_the_seeded_spanning_forest_by_definition(masked):
    """The compiled flood gives what the definition gives on random affinities (ties
    included: uint8 values), with and without a mask cutting voxels off every seed."""
    from emrun.segment.scale.fragments import _flood

    rng = np.random.default_rng(5)
    shape = (4, 7, 9)
    affs = (rng.integers(0, 8, (3, *shape)) / 7).astype(np.float32)
    mask = rng.random(shape) > 0.25 if masked else np.ones(shape, bool)
    seeds = np.zeros(shape, np.uint64)
    for k, at in enumerate(rng.choice(seeds.size, 6, replace=False)):
        seeds.ravel()[at] = k + 1
    seeds[~mask] = 0
    got = _flood(affs, NEAREST, seeds, mask if masked else None)
    assert np.array_equal(got, _kruskal_from_seeds(affs, NEAREST, seeds, mask))
    assert not got[~mask].any()


def test_every_piece_of_object_gets_a_fragment():
    """A slab the mask cuts off one voxel thick, beside a deeper region, holds no maximum of
    the distance over the seed window; it still gets a seed (its deepest voxel) and so a
    fragment of its own, and every voxel inside the mask gets a fragment, 0 only outside."""
    from emrun.segment.scale.fragments import SEED_WINDOW, watershed_fragments

    shape = (6, 20, 24)
    affs = np.full((3, *shape), 0.9, np.float32)  # one object
    mask = np.ones(shape, bool)
    mask[:, :, 13] = mask[:, :, 15] = False  # the slab x = 14, 2 voxels from x = 11
    assert SEED_WINDOW[2] // 2 >= 3  # so that x = 11 (distance 2 > 1) is in its window
    frags = watershed_fragments(affs, NEAREST, mask)
    assert frags[mask].min() > 0 and not frags[~mask].any()
    slab = np.unique(frags[:, :, 14])
    assert slab.size == 1
    assert not np.isin(slab, frags[:, :, :13]).any() and not np.isin(slab, frags[:, :, 16:]).any()


def test_block_graph_counts_each_edge_of_the_block_once_by_definition():
    """Nodes and edges of a block with a margin, against a loop over every voxel pair:
    sizes, centres, summed affinities, counts and histograms; id 0 takes no part."""
    from emrun.geometry import Roi
    from emrun.segment.scale.rag import block_graph

    rng = np.random.default_rng(2)
    region = Roi((3, 10, 20), (5, 8, 9))
    core = Roi((3, 11, 21), (4, 6, 7))  # a margin before it in y and x, after it in z
    labels = rng.choice(np.array([0, 7, 8, 9, 40, 41], np.uint64), region.shape)  # both sides
    inner = tuple(slice(c - r, c - r + n) for c, r, n in zip(core.offset, region.offset,
                                                           core.shape, strict=True))
    labels[inner] = rng.choice(np.array([0, 20, 21, 22, 23], np.uint64), core.shape)
    affs = rng.random((3, *core.shape)).astype(np.float32)
    graph = block_graph(labels, region, core, affs, NEAREST)

    expected: dict[tuple[int, int], list] = {}
    low = [c - r for c, r in zip(core.offset, region.offset, strict=True)]
    for c, offset in enumerate(NEAREST):
        for v in np.ndindex(core.shape):
            here = tuple(a + b for a, b in zip(v, low, strict=True))
            there = tuple(a + d for a, d in zip(here, offset, strict=True))
            if not all(0 <= a < n for a, n in zip(there, region.shape, strict=True)):
                continue
            a, b = int(labels[here]), int(labels[there])
            if a == b or not a or not b:
                continue
            entry = expected.setdefault((min(a, b), max(a, b)), [0.0, 0, np.zeros(BINS)])
            p = float(affs[c][v])
            entry[0] += p
            entry[1] += 1
            entry[2][min(int(p * BINS), BINS - 1)] += 1
    pairs = sorted(expected)
    assert list(zip(graph.u.tolist(), graph.v.tolist(), strict=True)) == pairs
    assert np.allclose(graph.total, [expected[p][0] for p in pairs], rtol=0, atol=1e-9)
    assert graph.count.tolist() == [expected[p][1] for p in pairs]
    assert np.array_equal(graph.hist, np.array([expected[p][2] for p in pairs]))
    core_labels = labels[inner]
    ids = sorted(set(core_labels.ravel().tolist()) - {0})
    assert graph.ids.tolist() == ids
    assert graph.sizes.tolist() == [int((core_labels == i).sum()) for i in ids]
    for i, centre in zip(ids, graph.centres, strict=True):
        expected_centre = np.argwhere(core_labels == i).mean(0) + np.asarray(core.offset)
        assert np.allclose(centre, expected_centre)
