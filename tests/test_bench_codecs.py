"""`emrun bench codecs`: it runs, every candidate codec is lossless, the JSON says it all.

No timing is asserted: speed is what the command measures, not what a test checks.
"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner
from zarr.core import sync as zarr_sync

from emrun.bench import codecs
from emrun.bench.codecs import (
    RATIO_TOLERANCE,
    candidates,
    choose,
    chunk_codec,
    is_emrun_compressor,
    parse_chunks,
    region_shape,
    sample_chunks,
    write_through_zarr,
)
from emrun.cli import app
from emrun.errors import UserError
from emrun.io import write_volume

runner = CliRunner()


def _affinities(shape=(12, 8, 64, 64), seed=0) -> np.ndarray:
    """Smooth uint8 'affinities' with noise: high inside blobs, low on their borders."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape[1:]), indexing="ij")
    field = np.sin(x / 7.0) * np.cos(y / 5.0) + 0.3 * np.sin(z / 2.0)
    channels = [np.roll(field, c, axis=c % 3) for c in range(shape[0])]
    data = 0.5 + 0.5 * np.stack(channels) + rng.normal(0, 0.05, shape)
    return (np.clip(data, 0, 1) * 255).astype(np.uint8)


def _labels(shape=(8, 64, 64)) -> np.ndarray:
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return (1 + (y // 16) * 4 + x // 16 + (z // 4) * 1000).astype(np.uint64) * 7919


@pytest.fixture
def affinity_volume(tmp_path):
    write_volume(tmp_path / "pred.zarr", "affinity", _affinities(), channel_axis=True)
    return str(tmp_path / "pred.zarr" / "affinity")


@pytest.mark.parametrize("data", [_affinities(), _labels(), _labels().astype(np.uint16)],
                         ids=["uint8", "uint64", "uint16"])
def test_every_candidate_round_trips_losslessly(tmp_path, data):
    chunks = (data.shape[0], 4, 32, 32) if data.ndim == 4 else (4, 32, 32)
    chunk = np.ascontiguousarray(data[tuple(slice(0, c) for c in chunks)])
    for candidate in candidates(data.dtype):
        codec = chunk_codec(candidate, data.dtype)
        decoded = np.frombuffer(codec.decode(codec.encode(chunk)), dtype=data.dtype)
        assert np.array_equal(decoded.reshape(chunk.shape), chunk), candidate.name
        path = tmp_path / f"{candidate.name}.zarr"
        write_through_zarr(path, data, chunks, candidate)
        reopened = zarr.open_array(str(path), mode="r")
        assert reopened.metadata.to_dict()["codecs"][-1] == candidate.codec.to_dict()
        assert np.array_equal(reopened[...], data), candidate.name


def test_candidates_cover_the_brief_and_mark_emrun_s_codec():
    names = [c.name for c in candidates(np.uint8)]
    for wanted in ("blosc-zstd-1-byte", "blosc-zstd-3-byte", "blosc-zstd-5-byte",
                   "blosc-lz4-1-byte", "blosc-lz4-5-byte", "blosc-lz4hc-1-byte",
                   "blosc-zstd-1-bit", "blosc-lz4-1-bit", "zstd-1", "zstd-2", "zstd-3"):
        assert wanted in names
    assert len(set(names)) == len(names)
    assert [c.name for c in candidates(np.uint8) if is_emrun_compressor(c, np.uint8)] == [
        "zstd-1"]
    assert [c.name for c in candidates(np.uint64) if is_emrun_compressor(c, np.uint64)] == [
        "blosc-zstd-1-byte"]
    wide = [c.name for c in candidates(np.uint64)]
    assert "blosc-zstd-1-none" in wide and "blosc-zstd-1-none" not in names  # same as byte


def test_bench_codecs_command_json(affinity_volume):
    result = runner.invoke(app, ["bench", "codecs", affinity_volume, "--chunks", "C,4,32,32",
                                 "--chunks", "1,8,64,64", "--passes", "1", "--sample-mb",
                                 "0.1", "--json"])
    assert result.exit_code == 0, result.output
    assert "best (the cheapest write" in result.output
    doc = json.loads(result.output.strip().splitlines()[-1])
    for key in ("volume", "shape", "region", "dtype", "region_mb", "passes", "rule", "best",
                "best_per_chunks", "emrun_default", "lossless", "rows", "machine"):
        assert key in doc
    assert doc["shape"] == [12, 8, 64, 64] and doc["dtype"] == "uint8"
    assert doc["lossless"] is True
    assert doc["emrun_default"] == next(c.name for c in candidates(np.uint8)
                                        if is_emrun_compressor(c, np.uint8))
    assert len(doc["rows"]) == 2 * len(candidates(np.uint8))
    assert {tuple(r["chunks"]) for r in doc["rows"]} == {(12, 4, 32, 32), (1, 8, 64, 64)}
    for row in doc["rows"]:
        for key in ("codec", "chunks", "config", "ratio", "sample_ratio", "encode_mb_s",
                    "decode_mb_s", "encode_wall_mb_s", "decode_wall_mb_s", "write_mb_s",
                    "write_cpu_mb_s", "read_mb_s", "read_cpu_mb_s", "stored_mb"):
            assert key in row
        assert row["lossless"] and row["ratio"] > 1.0 and row["encode_mb_s"] > 0
    best = next(r for r in doc["rows"] if r["codec"] == doc["best"]["codec"]
                and r["chunks"] == doc["best"]["chunks"])
    reference = max(r["ratio"] for r in doc["rows"] if r["emrun_default"])
    assert best["ratio"] >= (1 - RATIO_TOLERANCE) * reference
    assert doc["machine"]["zarr"] == zarr.__version__


def test_bench_codecs_on_a_3d_volume_with_one_codec(tmp_path):
    write_volume(tmp_path / "seg.zarr", "seg", _labels())
    result = runner.invoke(app, ["bench", "codecs", str(tmp_path / "seg.zarr" / "seg"),
                                 "--codec", "blosc-lz4-1-none", "--passes", "1", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output.strip().splitlines()[-1])
    assert {r["codec"] for r in doc["rows"]} == {"blosc-lz4-1-none"}
    assert doc["rows"][0]["chunks"] == [8, 64, 64]  # default shapes clipped, duplicates gone
    assert doc["lossless"] and doc["emrun_default"] is None


@pytest.mark.parametrize("args", [["--chunks", "16,256,256"], ["--chunks", "C,0,8,8"],
                                  ["--codec", "snappy"]])
def test_bench_codecs_user_mistakes_exit_2(affinity_volume, args):
    result = runner.invoke(app, ["bench", "codecs", affinity_volume, *args])
    assert result.exit_code == 2, result.output


def test_bench_codecs_workdir_is_made_or_refused(affinity_volume, tmp_path):
    (tmp_path / "file").write_text("")
    result = runner.invoke(app, ["bench", "codecs", affinity_volume, "--workdir",
                                 str(tmp_path / "file" / "x")])
    assert result.exit_code == 2 and "--workdir" in result.output, result.output
    result = runner.invoke(app, ["bench", "codecs", affinity_volume, "--chunks", "C,4,32,32",
                                 "--codec", "zstd-1", "--passes", "1", "--sample-mb", "0.1",
                                 "--workdir", str(tmp_path / "new" / "scratch")])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "new").exists(), "the folders it made are removed"


def test_the_rule_takes_the_cheapest_write_near_emrun_s_ratio():
    rows = [{"codec": "a", "ratio": 2.2, "write_cpu_mb_s": 80, "emrun_default": False},
            {"codec": "now", "ratio": 2.0, "write_cpu_mb_s": 240, "emrun_default": True},
            {"codec": "b", "ratio": 1.8, "write_cpu_mb_s": 400, "emrun_default": False},  # 90 %
            {"codec": "c", "ratio": 1.7, "write_cpu_mb_s": 900, "emrun_default": False}]
    assert choose(rows)["codec"] == "b"
    others = [r for r in rows if not r["emrun_default"]]  # reference: the best ratio, 2.2
    assert choose(others)["codec"] == "a"
    assert choose(others[1:])["codec"] == "c"  # 1.7 >= 0.9 x 1.8


def test_chunks_regions_and_samples():
    assert parse_chunks(["C,16,256,256", "12,16,256,256", "1x8x512x512"], (12, 10, 300, 300)) \
        == [(12, 10, 256, 256), (1, 8, 300, 300)]
    with pytest.raises(UserError):
        parse_chunks(["C,16,256"], (12, 10, 300, 300))
    with pytest.raises(UserError):
        parse_chunks(["16,C,256"], (10, 300, 300))
    assert region_shape((12, 100, 1024, 1024), 1, 126) == (12, 10, 1024, 1024)
    assert region_shape((12, 100, 1024, 1024), 1, 1) == (12, 1, 81, 1024)
    data = _affinities((2, 8, 64, 64))
    sample = sample_chunks(data, (2, 4, 32, 32), sample_mb=3 * 2 * 4 * 32 * 32 / 1e6)
    assert len(sample) == 3 and all(s.shape == (2, 4, 32, 32) for s in sample)
    assert np.array_equal(sample[0], data[:, :4, :32, :32])
    assert np.array_equal(sample[-1], data[:, 4:, 32:, 32:])


def test_bench_codecs_refuses_an_empty_volume(tmp_path):
    np.save(tmp_path / "empty.npy", np.zeros((0, 64, 64), np.uint32))
    result = runner.invoke(app, ["bench", "codecs", str(tmp_path / "empty.npy")])
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "no voxels" in result.stderr


def test_an_interrupt_stops_zarr_s_writes_and_removes_the_temporary_folder(
        affinity_volume, tmp_path, monkeypatch):
    """Ctrl-C while zarr writes: its IO thread goes on writing the queued chunks into the
    temporary folder while it is removed. Exit 130 in one line; the temporary folder, and
    the --workdir the run made, are gone."""
    started = []

    def interrupted(chosen, data, chunks, passes, work):
        array = zarr.create_array(str(work / "array.zarr"), shape=(16, 16, 16), dtype="u1",
                                  chunks=(1, 1, 1), compressors=None)  # 4096 writes: their
        # cancelling ends within remove_tree's wait on a busy 2-core machine (32^3 did not)
        writing = array._async_array.setitem(..., np.ones((16, 16, 16), np.uint8))
        started.append(asyncio.run_coroutine_threadsafe(writing, zarr_sync._get_loop()))
        while not any((work / "array.zarr").rglob("c")):  # chunks are being written
            time.sleep(0.01)
        raise KeyboardInterrupt

    monkeypatch.setattr(codecs, "measure_zarr", interrupted)
    workdir = tmp_path / "new" / "scratch"
    result = runner.invoke(app, ["bench", "codecs", affinity_volume, "--chunks", "C,4,32,32",
                                 "--codec", "zstd-1", "--passes", "1", "--sample-mb", "0.1",
                                 "--workdir", str(workdir)])
    assert result.exit_code == 130, result.output
    assert result.stderr.startswith("stopped by SIGINT: bench codecs measured 0 of 1 ")
    assert len(result.stderr.strip().splitlines()) == 1
    assert started and started[0].done()  # the writes were stopped, not left running
    time.sleep(0.2)
    assert not (tmp_path / "new").exists()
