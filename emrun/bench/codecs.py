"""`emrun bench codecs`: what each candidate codec and chunk shape costs on a real volume.

For a volume (e.g. `pred.zarr/affinity`) and each chunk shape, a fixed sample of whole
chunks is taken from the benchmarked region (the volume's start, at most `max_mb`), and
every candidate codec is measured two ways:

- per chunk, single-threaded, with the same numcodecs codec and configuration zarr 3 uses for
  that codec (the bytes are the ones zarr would store): encode and decode MB per CPU second
  of the thread (uncompressed bytes over the median of `passes` timed passes over the
  sample; on an idle core, MB/s). This is the cost a writer thread pays, so it tells how
  many writer threads a target rate needs.
- end to end through zarr: an array with that codec and chunk shape is created in a
  temporary folder and the whole region is written (then read back) with zarr's default
  thread and concurrency settings, median of `passes`: MB/s of wall clock, and MB per CPU
  second of the whole process (all zarr's threads: copies, encoding, file system calls);
  the compression ratio is the region's bytes over the chunk files' bytes on disk.

Every encoded chunk is decoded and compared with the original, and the region read back
through zarr is compared with what was written: `lossless` says whether all of it matched.

Passes go round the candidates, so a load that changes during the run (a shared machine)
weighs on all of them alike; CPU-second rates are not slowed by other processes at all.

The choice (`RULE`): speed first, because writing predictions is on inference's critical
path: the codec whose zarr write costs the fewest CPU seconds per MB (the writer threads'
cost: on a machine with many cores, their throughput is cores x this rate), among those
whose ratio is at least 90 % of the ratio of emrun's own codec for the dtype
(`compressor`), so files grow by at most about 11 %. Without emrun's codec among those
measured, the reference is the best ratio.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from ..errors import Interrupted, UserError
from ..geometry import box_of
from ..io import open_volume
from ..io.write import compressor
from .workdir import made_folder, remove_tree, terminated_as_interrupt

RULE = ("the cheapest write (most MB per CPU second through zarr) whose ratio is at least "
        "90 % of emrun's codec's")
RATIO_TOLERANCE = 0.10
DEFAULT_CHUNKS = ("C,16,256,256", "C,32,256,256", "C,8,512,512", "1,16,256,256")
MB = 1e6  # MB/s are decimal megabytes of uncompressed data per second
MAX_CHUNKS = 10_000
"""The most chunks a chunk shape may cut the measured region into: each is a file that every
codec writes and reads back on every pass (1x1x1 chunks of a 8x64x64 region ran for hours)."""


@dataclass(frozen=True)
class Candidate:
    """One codec as zarr 3 writes it: a name for the table and its zarr v3 codec."""

    name: str
    codec: BloscCodec | ZstdCodec


def candidates(dtype: Any) -> list[Candidate]:
    """The codecs measured for a dtype.

    Blosc zstd levels 1, 3, 5, lz4 levels 1, 5 and lz4hc level 1, each with byte shuffle
    (for 1-byte types blosc does not shuffle at all); bitshuffle for zstd 1
    and lz4 1; no shuffle for zstd 1 and lz4 1 where the type is wider than a byte (for one
    byte it equals byte shuffle); and zarr's plain zstd codec, levels 1, 2 and 3.
    """
    size = np.dtype(dtype).itemsize
    out = []
    blosc = [("zstd", 1), ("zstd", 3), ("zstd", 5), ("lz4", 1), ("lz4", 5), ("lz4hc", 1)]
    for cname, level in blosc:
        out.append(_blosc(cname, level, "shuffle", size))
    for cname in ("zstd", "lz4"):
        out.append(_blosc(cname, 1, "bitshuffle", size))
        if size > 1:
            out.append(_blosc(cname, 1, "noshuffle", size))
    for level in (1, 2, 3):
        out.append(Candidate(f"zstd-{level}", ZstdCodec(level=level)))
    return out


def _blosc(cname: str, level: int, shuffle: str, typesize: int) -> Candidate:
    short = {"shuffle": "byte", "bitshuffle": "bit", "noshuffle": "none"}[shuffle]
    # the typesize zarr would set from the array's dtype when left unset
    codec = BloscCodec(cname=cname, clevel=level, shuffle=shuffle, typesize=typesize)
    return Candidate(f"blosc-{cname}-{level}-{short}", codec)


def chunk_codec(candidate: Candidate, dtype: Any) -> numcodecs.abc.Codec:
    """The numcodecs codec zarr 3 runs for `candidate` on chunks of `dtype` (built from the
    codec's public configuration: same compressor, level, shuffle and block size; the type
    size of `dtype`, as zarr uses for the arrays it writes)."""
    config = candidate.codec.to_dict()["configuration"]
    if isinstance(candidate.codec, ZstdCodec):
        return numcodecs.Zstd(level=config["level"], checksum=config["checksum"])
    shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[config["shuffle"]]
    return numcodecs.Blosc(cname=config["cname"], clevel=config["clevel"], shuffle=shuffle,
                           blocksize=config["blocksize"], typesize=np.dtype(dtype).itemsize)


def is_emrun_compressor(candidate: Candidate, dtype: Any) -> bool:
    """Whether the candidate is the codec emrun writes ``dtype`` with
    (`emrun.io.write.compressor`; the type size, which zarr sets from the dtype, aside)."""
    return _settings(candidate.codec) == _settings(compressor(dtype))


def _settings(codec: Any) -> tuple[str, dict[str, Any]]:
    doc = codec.to_dict()
    config = {k: v for k, v in doc.get("configuration", {}).items() if k != "typesize"}
    return doc["name"], config


def parse_chunks(specs: Sequence[str], shape: Sequence[int]) -> list[tuple[int, ...]]:
    """Chunk shapes from "C,16,256,256"-style strings ("C": all channels), clipped to the
    shape and without duplicates; a wrong string is a UserError."""
    out: list[tuple[int, ...]] = []
    for spec in specs:
        parts = [p.strip() for p in str(spec).replace("x", ",").split(",") if p.strip()]
        if len(parts) != len(shape):
            example = "C,16,256,256" if len(shape) == 4 else "16,256,256"
            raise UserError(f"--chunks {spec!r}: give {len(shape)} sizes for a volume of shape "
                            f"{list(shape)} (e.g. {example})")
        sizes = []
        for axis, (part, size) in enumerate(zip(parts, shape, strict=True)):
            if part.upper() == "C" and axis == 0 and len(shape) == 4:
                sizes.append(size)
                continue
            try:
                value = int(part)
            except ValueError:
                value = 0
            if value < 1:
                raise UserError(f"--chunks {spec!r}: {part!r} is not a positive integer"
                                + (" or C" if axis == 0 and len(shape) == 4 else ""))
            sizes.append(min(value, max(1, size)))
        if tuple(sizes) not in out:
            out.append(tuple(sizes))
    return out


def check_chunk_counts(chunk_shapes: Sequence[tuple[int, ...]], region: Sequence[int]) -> None:
    """Refuse a chunk shape that cuts the region into more than `MAX_CHUNKS` chunks, before
    anything is read or written."""
    for chunk_shape in chunk_shapes:
        count = math.prod(-(-n // c) for n, c in zip(region, chunk_shape, strict=True))
        if count > MAX_CHUNKS:
            given = ",".join(str(c) for c in chunk_shape)
            raise UserError(f"--chunks {given}: cuts the measured region "
                            f"{'x'.join(str(n) for n in region)} into {count:,} chunks (a file "
                            f"each, written and read per codec and pass); give larger chunks "
                            f"(at most {MAX_CHUNKS:,} in the region) or a smaller --max-mb")


def default_chunk_specs(ndim: int) -> tuple[str, ...]:
    """The chunk shapes tried by default (without the channel axis for a 3-d volume)."""
    return DEFAULT_CHUNKS if ndim == 4 else tuple(s.split(",", 1)[1] for s in DEFAULT_CHUNKS)


def region_shape(shape: Sequence[int], itemsize: int, max_mb: float) -> tuple[int, ...]:
    """The volume's start, cut in z (then y) to at most `max_mb` MB."""
    shape = list(shape)
    z_axis = len(shape) - 3
    for axis in (z_axis, z_axis + 1):
        other = math.prod(n for i, n in enumerate(shape) if i != axis) * itemsize
        limit = max(1, int(max_mb * MB // max(other, 1)))
        shape[axis] = min(shape[axis], limit)
    return tuple(shape)


def sample_chunks(data: np.ndarray, chunks: Sequence[int], sample_mb: float) -> list[np.ndarray]:
    """Whole chunks of the grid, evenly spaced in grid order, at most `sample_mb` MB (at
    least one chunk); copies, C-contiguous, as zarr hands them to the codec."""
    grid = [n // c for n, c in zip(data.shape, chunks, strict=True)]
    count = math.prod(grid)
    if count == 0:  # a chunk larger than the region: zarr pads it; sample the region itself
        return [np.ascontiguousarray(data)]
    chunk_bytes = math.prod(chunks) * data.itemsize
    wanted = max(1, min(count, int(sample_mb * MB // chunk_bytes)))
    picks = sorted({int(i) for i in np.rint(np.linspace(0, count - 1, wanted))})
    out = []
    for flat in picks:
        index = np.unravel_index(flat, grid)
        roi = tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, chunks, strict=True))
        out.append(np.ascontiguousarray(data[roi]))
    return out


def _clocked(fn: Any, cpu_clock: Any) -> tuple[float, float, Any]:
    """Run fn; its wall and CPU seconds (cpu_clock: time.thread_time or time.process_time)
    and its result."""
    wall, cpu = time.perf_counter(), cpu_clock()
    result = fn()
    return time.perf_counter() - wall, cpu_clock() - cpu, result


def _rate(nbytes: int, seconds: list[float]) -> float:
    return nbytes / MB / max(statistics.median(seconds), 1e-9)


def measure_chunks(chosen: Sequence[Candidate], sample: list[np.ndarray], passes: int
                   ) -> list[dict[str, Any]]:
    """Per candidate: single-threaded encode and decode MB/s over the sample, its ratio,
    and whether every chunk decoded to itself.

    Passes go round the candidates (pass 1 of each, then pass 2 of each, ...), so a load
    that changes during the run weighs on all of them alike. The rates are MB per CPU second
    of this one thread (what a writer thread pays, undisturbed by other processes on the
    machine); the wall-clock rates are kept too.
    """
    codecs = [chunk_codec(c, sample[0].dtype) for c in chosen]
    previous = numcodecs.blosc.use_threads
    numcodecs.blosc.use_threads = False  # blosc's own threads off: one core, like zarr's
    try:
        encoded = [[codec.encode(c) for c in sample] for codec in codecs]  # also warms up
        lossless = [
            all(same_bits(np.frombuffer(codec.decode(e), dtype=c.dtype).reshape(c.shape), c)
                for c, e in zip(sample, packed, strict=True))
            for codec, packed in zip(codecs, encoded, strict=True)]
        times: list[dict[str, list[float]]] = [
            {"enc": [], "enc_wall": [], "dec": [], "dec_wall": []} for _ in codecs]
        for _ in range(passes):
            for codec, packed, t in zip(codecs, encoded, times, strict=True):
                wall, cpu, _ = _clocked(lambda c=codec: [c.encode(x) for x in sample],
                                        time.thread_time)
                t["enc"].append(cpu)
                t["enc_wall"].append(wall)
                wall, cpu, _ = _clocked(lambda c=codec, p=packed: [c.decode(x) for x in p],
                                        time.thread_time)
                t["dec"].append(cpu)
                t["dec_wall"].append(wall)
    finally:
        numcodecs.blosc.use_threads = previous
    raw = sum(c.nbytes for c in sample)
    return [{
        "sample_chunks": len(sample),
        "sample_ratio": raw / sum(len(e) for e in packed),
        "encode_mb_s": _rate(raw, t["enc"]),
        "decode_mb_s": _rate(raw, t["dec"]),
        "encode_wall_mb_s": _rate(raw, t["enc_wall"]),
        "decode_wall_mb_s": _rate(raw, t["dec_wall"]),
        "chunks_lossless": bool(ok),
    } for packed, t, ok in zip(encoded, times, lossless, strict=True)]


def write_through_zarr(path: Path, data: np.ndarray, chunks: Sequence[int],
                       candidate: Candidate) -> zarr.Array:
    """Create a zarr v3 array at `path` with the candidate codec and chunks, write `data`."""
    array = zarr.create_array(str(path), shape=data.shape, dtype=data.dtype,
                              chunks=tuple(chunks), compressors=[candidate.codec],
                              zarr_format=3, overwrite=True)
    array[...] = data
    return array


def stored_bytes(path: Path) -> int:
    """Bytes of the chunk files under an array folder (metadata excluded)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != "zarr.json")


def measure_zarr(chosen: Sequence[Candidate], data: np.ndarray, chunks: Sequence[int],
                 passes: int, work: Path) -> list[dict[str, Any]]:
    """Per candidate: write and read MB/s of the region through zarr (its default threads
    and concurrency; wall clock, and per CPU second of the whole process: the write's cost
    in cores), the ratio on disk, and whether the region read back equals what was written.

    Pass 0 warms up and checks; the timed passes go round the candidates, as in
    `measure_chunks`. Only one array is on disk at a time.
    """
    path = work / "array.zarr"
    times = [{"write": [], "write_cpu": [], "read": [], "read_cpu": []} for _ in chosen]
    packed = [0] * len(chosen)
    lossless = [True] * len(chosen)
    for index in range(passes + 1):
        for i, candidate in enumerate(chosen):
            shutil.rmtree(path, ignore_errors=True)
            *write, array = _clocked(lambda c=candidate: write_through_zarr(
                path, data, chunks, c), time.process_time)
            *read, back = _clocked(lambda a=array: a[...], time.process_time)
            if index == 0:
                lossless[i] = same_bits(back, data)
                packed[i] = stored_bytes(path)
            else:
                for key, (wall, cpu) in (("write", write), ("read", read)):
                    times[i][key].append(wall)
                    times[i][f"{key}_cpu"].append(cpu)
            del array, back
    shutil.rmtree(path, ignore_errors=True)
    return [{
        "ratio": data.nbytes / max(size, 1),
        "stored_mb": size / MB,
        "write_mb_s": _rate(data.nbytes, t["write"]),
        "write_cpu_mb_s": _rate(data.nbytes, t["write_cpu"]),
        "read_mb_s": _rate(data.nbytes, t["read"]),
        "read_cpu_mb_s": _rate(data.nbytes, t["read_cpu"]),
        "zarr_lossless": ok,
    } for size, t, ok in zip(packed, times, lossless, strict=True)]


def choose(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The row `RULE` picks: the cheapest write (most MB per CPU second through zarr) among
    rows whose ratio is at least (1 - RATIO_TOLERANCE) times the reference ratio: emrun's
    own codec's best ratio among the rows, or the best ratio when emrun's codec is not
    among them."""
    own = [r["ratio"] for r in rows if r["emrun_default"]]
    reference = max(own) if own else max(r["ratio"] for r in rows)
    eligible = [r for r in rows if r["ratio"] >= (1 - RATIO_TOLERANCE) * reference]
    return max(eligible, key=lambda r: r["write_cpu_mb_s"])


def bench_codecs(volume: str, *, chunks: Sequence[str] | None = None, passes: int = 3,
                 sample_mb: float = 32.0, max_mb: float = 256.0,
                 codecs: Sequence[str] | None = None, workdir: str | None = None,
                 progress: Any = None) -> dict[str, Any]:
    """Measure every candidate codec (or those named in `codecs`) at every chunk shape on
    the volume's start (at most `max_mb` MB); returns the rows, the choice and the context."""
    if passes < 1 or sample_mb <= 0 or max_mb <= 0:
        raise UserError("--passes, --sample-mb and --max-mb must be positive")
    vol = open_volume(volume)
    if vol.ndim not in (3, 4):
        raise UserError(f"{vol}: shape {list(vol.shape)}; expected (z, y, x) or (c, z, y, x)")
    if 0 in vol.shape:
        raise UserError(f"{vol}: shape {list(vol.shape)} holds no voxels: there is nothing "
                        "to compress; give a volume with data")
    shape = region_shape(vol.shape, vol.dtype.itemsize, max_mb)
    chunk_shapes = parse_chunks(chunks or default_chunk_specs(vol.ndim), shape)
    check_chunk_counts(chunk_shapes, shape)
    known = candidates(vol.dtype)
    if codecs:
        names = {c.name for c in known}
        unknown = [n for n in codecs if n not in names]
        if unknown:
            raise UserError(f"unknown codec(s) {', '.join(unknown)}; known for {vol.dtype}: "
                            f"{', '.join(sorted(names))}")
        known = [c for c in known if c.name in codecs]
    rows: list[dict[str, Any]] = []
    left: list[Path] = []  # a temporary folder that could not be removed
    signals: list[str] = []
    try:
        data = np.ascontiguousarray(vol.read(box_of(shape)))
        with terminated_as_interrupt() as signals, made_folder(workdir, "--workdir") as folder:
            tmp = Path(tempfile.mkdtemp(prefix="emrun-bench-codecs-", dir=folder))
            stopped = False
            try:
                for chunk_shape in chunk_shapes:
                    _measure_at(known, data, chunk_shape, passes, sample_mb, tmp, rows,
                                progress)
            except KeyboardInterrupt:
                stopped = True
                raise
            finally:
                if not remove_tree(tmp, interrupted=stopped):
                    left.append(tmp)
    except KeyboardInterrupt:
        total = len(known) * len(chunk_shapes)
        removed = (f"remove {left[0]}, which is still being written" if left
                   else "its temporary arrays were removed")
        raise Interrupted((signals or ["SIGINT"])[0], f"bench codecs measured {len(rows)} "
                          f"of {total} codec and chunk pairs; {removed}") from None
    best = choose(rows)
    current = [r for r in rows if r["emrun_default"]]
    return {
        "volume": str(vol),
        "shape": list(vol.shape),
        "region": list(shape),
        "dtype": str(vol.dtype),
        "region_mb": data.nbytes / MB,
        "passes": passes,
        "sample_mb": sample_mb,
        "rule": RULE,
        "best": {"codec": best["codec"], "chunks": best["chunks"], "config": best["config"]},
        "best_per_chunks": [
            {"chunks": list(c), "codec": choose([r for r in rows if r["chunks"] == list(c)])
             ["codec"]} for c in chunk_shapes],
        "emrun_default": current[0]["codec"] if current else None,
        "lossless": all(r["lossless"] for r in rows),
        "rows": rows,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "zarr": zarr.__version__,
                    "numcodecs": numcodecs.__version__,
                    "zarr_async_concurrency": zarr.config.get("async.concurrency"),
                    "zarr_threads": zarr.config.get("threading.max_workers")},
    }


def _measure_at(known: Sequence[Candidate], data: np.ndarray, chunk_shape: tuple[int, ...],
                passes: int, sample_mb: float, tmp: Path, rows: list[dict[str, Any]],
                progress: Any) -> None:
    """Add the rows of every candidate at one chunk shape to ``rows`` (each handed to
    ``progress`` as it comes)."""
    sample = sample_chunks(data, chunk_shape, sample_mb)
    per_chunk = measure_chunks(known, sample, passes)
    del sample
    end_to_end = measure_zarr(known, data, chunk_shape, passes, tmp)
    for candidate, chunk_row, zarr_row in zip(known, per_chunk, end_to_end, strict=True):
        row: dict[str, Any] = {"codec": candidate.name, "chunks": list(chunk_shape),
                               "config": candidate.codec.to_dict(),
                               "emrun_default": is_emrun_compressor(candidate, data.dtype),
                               **chunk_row, **zarr_row}
        row["lossless"] = row["chunks_lossless"] and row["zarr_lossless"]
        rows.append(row)
        if progress is not None:
            progress(row)


def format_row(row: dict[str, Any]) -> str:
    """One line of the table `emrun bench codecs` prints."""
    mark = "*" if row["emrun_default"] else " "
    chunks = "x".join(str(c) for c in row["chunks"])
    rates = (row["encode_mb_s"], row["decode_mb_s"], row["write_mb_s"], row["write_cpu_mb_s"],
             row["read_mb_s"])
    return (f"{mark}{row['codec']:<19} {chunks:<15} {row['ratio']:>5.2f} "
            + " ".join(f"{r:>9.0f}" for r in rates)
            + f"  {'yes' if row['lossless'] else 'NO'}")


TABLE_HEADER = (f" {'codec':<19} {'chunks':<15} {'ratio':>5} "
                + " ".join(f"{h:>9}" for h in ("enc", "dec", "write", "write/cpu", "read"))
                + "  lossless")
TABLE_NOTE = ("ratio: region bytes / bytes on disk; enc, dec: MB per CPU second, one thread, "
              "on the sampled chunks; write, read: MB/s through zarr (default threads), "
              "write/cpu: MB per CPU second of the whole write; * emrun's codec")


def same_bits(back: np.ndarray, data: np.ndarray) -> bool:
    """Whether a round trip gave back exactly what went in, bit for bit: NaN (a masked voxel
    many tools export) equals itself and -0.0 differs from 0.0, as lossless storage means."""
    if back.shape != data.shape or back.dtype.newbyteorder("=") != data.dtype.newbyteorder("="):
        return False
    back = np.ascontiguousarray(back, dtype=data.dtype)  # a store's own byte order is no loss
    return back.tobytes() == np.ascontiguousarray(data).tobytes()
