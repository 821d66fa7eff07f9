"""Reference probe of emrun's memory bounds and capacity checks against small references
written here: closed forms for the disk and block-count checks, this machine's own mount
table for pseudo file systems, child processes for the malloc settings, and a plain
simulation of the hand-over (partial sums a worker keeps) for infer's in-flight estimate."""

from __future__ import annotations

import ctypes
import math
import os
import subprocess
import sys
import textwrap
import tracemalloc
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from test_infer import make_inputs, make_recipe

from emrun import capacity, memory
from emrun.data import memory as data_memory
from emrun.errors import UserError
from emrun.infer import job as job_module
from emrun.infer import schedule
from emrun.infer import worker as worker_module
from emrun.infer.job import check_memory, prepare_job
from emrun.infer.plan import Layout, Tiling, _in_flight, best_order, choose_tiling, units
from emrun.infer.worker import PREFETCH, WRITES_IN_FLIGHT, BlockWorker
from emrun.io.write import write_volume
from emrun.registry import models

GLIBC = memory.glibc_mallopt() is not None


# ---------------------------------------------------------------- capacity: size_text


def reference_size_text(n: int) -> str:
    """Decimal units (1 GB = 10^9 bytes, as the docstring's "340 MB, 1.2 GB" are), the
    largest unit whose *rounded* value is at least 1, as people write sizes."""
    n = Fraction(n)
    if round(n / 10**15, 1) >= 1000:
        return f"{float(n):.0e} bytes"  # a thousand petabytes and more: a power of ten
    for unit, scale, digits in (("PB", 10**15, 1), ("TB", 10**12, 1), ("GB", 10**9, 1),
                                ("MB", 10**6, 0), ("kB", 10**3, 0)):
        if round(n / scale, digits) >= 1:
            return f"{float(round(n / scale, digits)):.{digits}f} {unit}"
    return f"{n} bytes"


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 bytes"), (340 * 10**6, "340 MB"), (1023, "1 kB"), (1024**2, "1 MB"),
    (499_999, "500 kB"), (12, "12 bytes"),
    (1024**3, "1.1 GB"),  # decimal units: a GiB is 1.07 GB, not "1.0 GB"
    (10**9, "1.0 GB"),
    (1_200_000_000, "1.2 GB"), (4 * 10**12, "4.0 TB"), (10**15, "1.0 PB"),
    (10**18 - 10**15 * 60, "940.0 PB"),
])
def test_size_text_uses_decimal_units(n: int, text: str) -> None:
    assert capacity.size_text(n) == text
    assert reference_size_text(n) == text


@pytest.mark.parametrize(("n", "text"), [(10**18, "1e+18 bytes"), (7 * 10**28, "7e+28 bytes"),
                                         (1.5e19, "2e+19 bytes")])
def test_size_text_beyond_a_thousand_petabytes_is_a_power_of_ten(n: float, text: str) -> None:
    assert capacity.size_text(n) == text


@pytest.mark.parametrize("n", [999_500_000, 999_999_999, 999_950_000_000, 999_960 * 10**12])
def test_size_text_never_shows_a_thousand_of_a_unit(n: int) -> None:
    assert capacity.size_text(n) == reference_size_text(n)
    assert not capacity.size_text(n).startswith("1000")


# ------------------------------------------------------- capacity: check_output_fits


@pytest.mark.parametrize("free", [1, 999, 4_000_000, 10**12])
def test_check_output_fits_refuses_exactly_past_best_ratio_times_the_free_disk(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, free: int) -> None:
    monkeypatch.setattr(capacity, "free_disk", lambda path: free)
    out = tmp_path / "o.zarr"
    capacity.check_output_fits(out, 200 * free, "writing it")  # exactly fits compressed 200x
    capacity.check_output_fits(out, 0, "writing it")
    with pytest.raises(UserError) as refused:
        capacity.check_output_fits(out, 200 * free + 1, "writing it", hint="give less")
    said = str(refused.value)
    assert said.startswith(f"{out}: writing it is {capacity.size_text(200 * free + 1)} ")
    assert f"{capacity.size_text(free)} is free there" in said and said.endswith("give less")
    assert not out.exists()


def test_free_disk_reads_the_nearest_existing_folder(tmp_path: Path) -> None:
    deep = tmp_path / "a" / "b" / "c.zarr"
    want = os.statvfs(tmp_path)
    got = capacity.free_disk(deep)
    assert abs(got - want.f_bavail * want.f_frsize) <= 64 << 20  # other writers meanwhile
    assert not (tmp_path / "a").exists()


def test_an_output_under_proc_is_refused_as_no_disk() -> None:
    with pytest.raises(UserError, match=r"^/proc/emrun-probe\.zarr: cannot be written: /proc "
                                        r"is a pseudo file system \(proc\), not a disk"):
        capacity.check_output_fits("/proc/emrun-probe.zarr", 1, "writing it")


# ---------------------------------------------------------- capacity: block counts


@pytest.mark.parametrize(("shape", "block"), [
    ((100, 100, 100), (1, 1, 1)),  # exactly MAX_BLOCKS: allowed
    ((100, 100, 101), (1, 1, 1)),  # one row past it
    ((1000, 1000, 1000), (10, 10, 10)), ((1000, 1000, 1000), (9, 10, 10)),
    ((7, 11, 13), (2, 3, 5)), ((5, 5, 5), (0, 0, 0)), ((5, 5, 5), (-3, 7, 9)),
    ((2001, 2000, 251), (2, 2, 1)), ((64, 64, 64), (64, 64, 64)),
])
def test_check_block_count_against_the_ceil_division_count(shape, block) -> None:
    count = 1
    for n, b in zip(shape, block, strict=True):
        b = max(1, b)  # a block below 1 counts as 1 (the CLI refuses it elsewhere)
        count *= math.ceil(Fraction(n, b))
    if count <= capacity.MAX_BLOCKS:
        capacity.check_block_count(shape, block)
        return
    with pytest.raises(UserError) as refused:
        capacity.check_block_count(shape, block, "--blk")
    assert f"makes {count:,} blocks of the {'x'.join(map(str, shape))} volume" in \
        str(refused.value)
    assert str(refused.value).startswith(f"--blk {' '.join(map(str, block))}: ")


# -------------------------------------------------------- capacity: work folders


def test_work_folder_makes_the_folder_and_none_is_the_system_default(tmp_path: Path) -> None:
    assert capacity.work_folder(None, "--tmp") is None
    capacity.check_work_folder(None, "--tmp")
    deep = tmp_path / "x" / "y"
    capacity.check_work_folder(deep, "--tmp")
    assert not (tmp_path / "x").exists()  # the check alone leaves nothing behind
    assert capacity.work_folder(deep, "--tmp") == os.fspath(deep) and deep.is_dir()
    assert capacity.work_folder(deep, "--tmp") == os.fspath(deep)  # again: already there


def test_a_file_in_the_way_of_a_work_folder_is_named(tmp_path: Path) -> None:
    afile = tmp_path / "f"
    afile.write_text("x")
    with pytest.raises(UserError, match=r"^--tmp .*/f: cannot make a folder there \(it is not "
                                        r"a folder but a file\)$"):
        capacity.work_folder(afile, "--tmp")
    with pytest.raises(UserError) as refused:
        capacity.work_folder(afile / "sub" / "deeper", "--tmp")
    assert str(refused.value) == (f"--tmp {afile / 'sub' / 'deeper'}: cannot make a folder "
                                  f"there ({afile} is not a folder but a file)")


@pytest.mark.parametrize("path", ["/proc/emrun-probe", "/proc/self/emrun/x", "/sys/emrun"])
def test_a_work_folder_on_a_pseudo_file_system_is_refused(path: str) -> None:
    with pytest.raises(UserError, match=r"pseudo file system .*not a disk; give a folder on "
                                        r"a disk"):
        capacity.work_folder(path, "--tmp")
    assert not os.path.lexists(path)


# ------------------------------------------------- capacity: pseudo file systems


def mount_table() -> list[tuple[str, str]]:
    lines = Path("/proc/self/mounts").read_text().splitlines()
    return [(f[1].replace("\\040", " "), f[2]) for f in map(str.split, lines) if len(f) >= 3]


def reference_pseudo(path: str) -> str | None:
    """The mount holding the real (links followed) nearest existing path, when it reports
    no blocks and is no FUSE mount."""
    where = os.path.abspath(path)
    while not os.path.lexists(where):
        where = os.path.dirname(where)
    if os.statvfs(where).f_blocks != 0:
        return None
    real = os.path.realpath(where)
    best = ("", "")
    for point, kind in mount_table():
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            best = (point, kind)
    if best[1].startswith("fuse"):
        return None
    return f"{best[0]} is a pseudo file system ({best[1]})"


REAL_PATHS = [p for p in ("/proc", "/proc/self/status", "/proc/emrun/missing", "/sys",
                          "/sys/kernel", "/dev/pts", "/dev/shm", "/dev/shm/emrun-missing",
                          "/dev", "/tmp", "/", "/run", "/sys/fs/cgroup")
              if os.path.lexists(p) or os.path.lexists(os.path.dirname(p))]


@pytest.mark.skipif(not os.path.exists("/proc/self/mounts"), reason="needs Linux /proc")
@pytest.mark.parametrize("path", REAL_PATHS)
def test_pseudo_file_system_on_this_machines_paths(path: str) -> None:
    assert capacity.pseudo_file_system(path) == reference_pseudo(path)


@pytest.mark.skipif(not os.path.exists("/proc/self/mounts"), reason="needs Linux /proc")
def test_proc_and_sys_are_pseudo_and_a_tmp_folder_is_not(tmp_path: Path) -> None:
    assert capacity.pseudo_file_system("/proc") == "/proc is a pseudo file system (proc)"
    assert capacity.pseudo_file_system("/sys/emrun/a/b") == "/sys is a pseudo file system (sysfs)"
    assert capacity.pseudo_file_system(tmp_path / "new" / "o.zarr") is None


@pytest.mark.skipif(not os.path.exists("/proc/self/mounts"), reason="needs Linux /proc")
def test_a_link_into_proc_is_named_as_proc(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to("/proc")
    assert capacity.pseudo_file_system(tmp_path / "link" / "o.zarr") == \
        "/proc is a pseudo file system (proc)"


# ------------------------------------------------------------- memory.py: arenas


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1


@pytest.mark.parametrize(("environ", "ours"), [
    ({}, True),
    ({"EMRUN_MALLOC_ARENA_MAX": "4"}, True),  # the user dropped MALLOC_ARENA_MAX: not theirs
    ({"MALLOC_ARENA_MAX": "4", "EMRUN_MALLOC_ARENA_MAX": "4"}, True),  # an emrun's, recounted
    ({"MALLOC_ARENA_MAX": "5", "EMRUN_MALLOC_ARENA_MAX": "4"}, False),  # theirs, over ours
    ({"MALLOC_ARENA_MAX": "1"}, False),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=3"}, False),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_test=3"}, True),
])
def test_whose_arena_limit_it_is(monkeypatch, environ: dict[str, str], ours: bool) -> None:
    monkeypatch.setattr(memory.os, "sched_getaffinity", lambda pid: set(range(7)), raising=False)
    before = dict(environ)
    mallopt = Recorder()
    assert memory.limit_malloc_arenas(environ=environ, mallopt=mallopt) is ours
    if ours:
        assert mallopt.calls == [(-8, 7)]
        assert environ == {**before, "MALLOC_ARENA_MAX": "7", "EMRUN_MALLOC_ARENA_MAX": "7"}
    else:
        assert mallopt.calls == [] and environ == before


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs sched_getaffinity")
def test_default_arenas_is_this_processs_cores_at_least_two() -> None:
    assert memory.default_arenas() == max(2, len(os.sched_getaffinity(0)))


CHILD = textwrap.dedent("""
    import os, subprocess, sys
    from emrun import memory
    print(memory.limit_malloc_arenas(int(sys.argv[1])))
    grandchild = "import os; print(os.environ.get('MALLOC_ARENA_MAX'), " \\
                 "os.environ.get('EMRUN_MALLOC_ARENA_MAX'))"
    print(subprocess.run([sys.executable, "-c", grandchild], capture_output=True, text=True,
                         check=True).stdout.strip())
""")


@pytest.mark.skipif(not GLIBC, reason="glibc only")
@pytest.mark.parametrize(("given", "want"), [
    ({}, "True\n3 3"),
    ({"MALLOC_ARENA_MAX": "5"}, "False\n5 None"),  # the user's stands, unmarked
    ({"MALLOC_ARENA_MAX": "2", "EMRUN_MALLOC_ARENA_MAX": "2"}, "True\n3 3"),  # an emrun's
])
def test_the_limit_reaches_a_process_started_after_it(given: dict[str, str], want: str) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MALLOC_ARENA_MAX", "EMRUN_MALLOC_ARENA_MAX", "GLIBC_TUNABLES")}
    done = subprocess.run([sys.executable, "-c", CHILD, "3"], env={**env, **given},
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == want


# ----------------------------------------------------- data/memory.py: kept freed memory


def test_keep_freed_memory_asks_glibc_for_the_mmap_threshold_first(monkeypatch) -> None:
    mallopt = Recorder()
    monkeypatch.setattr(data_memory, "glibc_mallopt", lambda: mallopt)
    data_memory.keep_freed_memory.cache_clear()
    try:
        assert data_memory.keep_freed_memory() is True
        assert data_memory.keep_freed_memory() is True  # once per process
    finally:
        data_memory.keep_freed_memory.cache_clear()
    # malloc.h: M_TRIM_THRESHOLD -1, M_MMAP_THRESHOLD -3; DEFAULT_MMAP_THRESHOLD_MAX is
    # 4 MiB x sizeof(long) on 64-bit
    assert mallopt.calls == [(-3, 4 * 2**20 * ctypes.sizeof(ctypes.c_long)), (-1, 256 * 2**20)]
    monkeypatch.setattr(data_memory, "glibc_mallopt", lambda: None)
    try:
        assert data_memory.keep_freed_memory() is False
    finally:
        data_memory.keep_freed_memory.cache_clear()


KEPT = textwrap.dedent("""
    import ctypes, sys
    import numpy as np
    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                    "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = Info
    def mapped(mb):
        a = np.ones(mb << 20, np.uint8)
        n = libc.mallinfo2().hblkhd
        del a
        return n >> 20
    if sys.argv[1] == "keep":
        from emrun.data.memory import keep_freed_memory
        assert keep_freed_memory()
    print(mapped(16), mapped(40))
""")


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_kept_memory_serves_sample_sized_arrays_from_the_heap_and_larger_ones_by_mmap() -> None:
    """A 16 MB array is mapped by default and comes from the heap once the setting is taken;
    a 40 MB one (past the 32 MiB threshold) is mapped either way."""
    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("glibc before 2.33")
    out = {how: subprocess.run([sys.executable, "-c", KEPT, how], capture_output=True,
                               text=True, check=True).stdout.split()
           for how in ("default", "keep")}
    small, large = map(int, out["default"])
    assert small >= 16 and large >= 40
    small, large = map(int, out["keep"])
    assert small < 16 and large >= 40


# --------------------------------------------------- infer: partial sums in flight


def reference_held(layout: Layout, tiling: Tiling, channels: int) -> int:
    """The most bytes of float32 partial sums a worker keeps between blocks, by running the
    worker's bookkeeping by hand: before a block, the sums handed to it are taken; after it,
    one sum per later block of its unit that its own patches reach, over their common box."""
    peak = 0
    for unit in units(layout, layout.block_grid(), tiling):
        rank = {b: i for i, b in enumerate(unit)}
        held: dict[tuple, int] = {}
        for i, block in enumerate(unit):
            for owner in layout.owners(block):
                held.pop((block, owner), None)
            owned = layout.owned_box(block)
            if owned is None:
                continue
            for target in layout.reached(block):
                if rank.get(target, -1) <= i:
                    continue
                begin, end = layout.write_bounds(target)
                size = [min(e, oe) - max(b, ob) for b, e, ob, oe in
                        zip(begin, end, owned.begin, owned.end, strict=True)]
                if all(s > 0 for s in size):
                    held[(target, block)] = 4 * channels * math.prod(size)
            peak = max(peak, sum(held.values()))
    return peak


SPLIT = Layout((16, 64, 64), (4, 16, 16), (2, 12, 12), (4, 16, 16), (4, 16, 16))
"""The layout of `make_inputs(shape=(16, 64, 64))` with blocks of (4, 16, 16)."""

OVER = [
    SPLIT,  # 4 x 4 x 4 blocks, half-patch overlap in z
    Layout((40, 40, 40), (16, 16, 16), (4, 4, 4), (4, 4, 4), (4, 4, 4)),  # blocks < patch
    Layout((40, 40, 40), (16, 16, 16), (8, 8, 8), (8, 8, 8), (8, 8, 8)),
    Layout((16, 64, 64), (4, 16, 16), (2, 12, 12), (2, 16, 16), (2, 16, 16)),
]

UNDER = [
    Layout((11, 37, 45), (4, 16, 16), (2, 12, 12), (4, 16, 16), (4, 16, 16)),
    Layout((48, 384, 384), (12, 64, 64), (9, 48, 48), (36, 64, 64), (36, 192, 192)),
    Layout((7, 50, 9), (5, 20, 20), (5, 10, 20), (1, 10, 3), (3, 10, 3)),
    Layout((3, 5, 7), (4, 16, 16), (3, 12, 12), (3, 5, 7), (3, 5, 7)),
]


@pytest.mark.parametrize("layout", UNDER)
def test_in_flight_bounds_the_partial_sums_held_where_blocks_are_large(layout: Layout) -> None:
    unit = layout.grid()
    order = best_order(layout, unit)
    held = reference_held(layout, Tiling(unit, order), 3)
    assert held <= _in_flight(layout, unit, 3, order)
    tiling = choose_tiling(layout, 3, 1, max(held, 1))
    assert reference_held(layout, tiling, 3) <= max(held, 1)


@pytest.mark.parametrize("layout", OVER)
def test_units_chosen_for_a_budget_hold_no_more_than_it(layout: Layout) -> None:
    unit = layout.grid()
    budget = _in_flight(layout, unit, 5, best_order(layout, unit))  # the whole grid fits it
    tiling = choose_tiling(layout, 5, 1, budget)
    assert reference_held(layout, tiling, 5) <= budget


@pytest.fixture(scope="module")
def split_inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("split"), shape=(16, 64, 64))


def spy_on_held(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    held: list[int] = []
    predict = worker_module.BlockWorker._predict

    def spy(self, step, raw, carries):
        out = predict(self, step, raw, carries)
        held.append(sum(t.numel() * t.element_size() for t in carries.sums.values()))
        return out

    monkeypatch.setattr(worker_module.BlockWorker, "_predict", spy)
    return held


def test_the_reference_holds_what_the_worker_holds(split_inputs, tmp_path, monkeypatch) -> None:
    """The hand simulation above is the worker's own bookkeeping: the same peak, to the byte,
    on a real CPU run over the whole grid as one unit."""
    recipe, _, _, tmp = split_inputs
    held = spy_on_held(monkeypatch)
    job = prepare_job(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), tmp_path / "a.zarr",
                      block=(4, 16, 16))
    assert job.layout == SPLIT
    channels = sum(recipe.head_channels().values())
    BlockWorker(job, torch.device("cpu")).run(job.pending())
    unit = SPLIT.grid()
    assert max(held) == reference_held(SPLIT, Tiling(unit, (0, 1, 2)), channels) == 502_080


def test_a_real_run_holds_no_more_than_the_hand_over_budget(split_inputs, tmp_path,
                                                            monkeypatch) -> None:
    recipe, _, _, tmp = split_inputs
    channels = sum(recipe.head_channels().values())
    budget = _in_flight(SPLIT, SPLIT.grid(), channels, best_order(SPLIT, SPLIT.grid()))
    monkeypatch.setattr(schedule, "HANDOVER_BYTES", budget)
    monkeypatch.setattr(schedule, "available_memory", lambda: 0)  # the floor decides
    held = spy_on_held(monkeypatch)
    job = prepare_job(recipe, tmp / "c.pt", str(tmp / "in.zarr/image"), tmp_path / "b.zarr",
                      block=(4, 16, 16))
    assert schedule.handover_budget(job) == budget
    BlockWorker(job, torch.device("cpu")).run_units(schedule.job_units(job, job.pending(), 1),
                                                     budget=budget)
    assert 0 < max(held) <= budget


# --------------------------------------------------------- infer: check_memory


SHAPE, SIZE, STRIDE = (64, 256, 256), (4, 16, 16), (2, 12, 12)


def documented_need(block: tuple[int, int, int], batch: int) -> int:
    """The docstring's lower bound, by hand: the window as float64 (8 bytes a voxel), one
    batch of float32 input patches with the first level's activations (two tensors of
    ``width`` channels) and the outputs, and a block in the middle of the volume: its input
    as float32, from the first lattice patch reaching into it to the last one's end (the
    lattice starts half the patches' overlap before voxel 0), and its float32 sums and
    weights over its own voxels."""
    patch = 4 * 16 * 16
    channels = 4 + 1  # four affinities, one binary
    width = 4
    read = 1
    for n, p, s, b in zip(SHAPE, SIZE, STRIDE, block, strict=True):
        begin = (n // b // 2) * b  # the middle block, an interior one on every axis here
        starts = [-((p - s) // 2)]  # the lattice's first start
        while starts[-1] + p < n:  # until the volume is covered
            starts.append(starts[-1] + s)
        covering = [x for x in starts if x + p > begin and x < begin + b]
        read *= covering[-1] + p - covering[0]
    return (8 * patch + batch * 4 * patch * (1 + 2 * width + channels) + 4 * read
            + 4 * (channels + 1) * math.prod(block))


@pytest.mark.parametrize(("block", "batch"), [((4, 16, 16), 3), ((8, 32, 32), 1),
                                              ((16, 64, 64), 7)])
def test_check_memory_refuses_exactly_past_its_documented_working_set(
        monkeypatch: pytest.MonkeyPatch, block, batch: int) -> None:
    recipe = make_recipe(batch_size=batch)
    layout = Layout(SHAPE, SIZE, STRIDE, block, block)
    need = documented_need(block, batch)
    monkeypatch.setattr(job_module, "available_memory", lambda: need)
    check_memory(recipe, layout)
    monkeypatch.setattr(job_module, "available_memory", lambda: need - 1)
    with pytest.raises(UserError, match=rf"need at least {capacity.size_text(need)} of memory"):
        check_memory(recipe, layout)


def test_check_memory_counts_each_local_worker_s_working_set(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Three CPU workers on one machine hold three blocks' working sets; one was counted,
    and a job that fit one worker's memory ran the machine out of it."""
    recipe = make_recipe(batch_size=2)
    layout = Layout(SHAPE, SIZE, STRIDE, (8, 32, 32), (8, 32, 32))
    one = documented_need((8, 32, 32), 2)
    need = 3 * one
    monkeypatch.setattr(job_module, "available_memory", lambda: need)
    check_memory(recipe, layout, workers=3)
    monkeypatch.setattr(job_module, "available_memory", lambda: need - 1)
    said = (rf"need at least {capacity.size_text(need)} of memory "
            rf"\({capacity.size_text(one)} in each of 3 workers\), .* or fewer --workers\)$")
    with pytest.raises(UserError, match=said):
        check_memory(recipe, layout, workers=3)


# ----------------------------------------------- infer: host memory bounded by the block


def test_traced_host_memory_of_a_run_is_bounded_by_the_block(tmp_path: Path) -> None:
    """tracemalloc sees every numpy array (and Python object) the host makes; torch's own
    CPU tensors it does not. The worker's queues bound what is in flight: PREFETCH inputs
    read ahead plus the one predicted (uint8, the block's read box), and WRITES_IN_FLIGHT + 1
    blocks being written, each a float32 output that zarr copies and compresses (two
    copies). The bound below is that, plus 256 kB for the run's own Python bookkeeping
    (futures, done-markers, zarr's metadata; measured 0.1-0.2 MB): an engine that kept the
    whole output of the 8x volume (5.2 MB) or its input would pass it."""
    recipe = make_recipe(overlap=[0, 0, 0], batch_size=2)
    torch.manual_seed(0)
    model = models.build(recipe.model, head_channels=recipe.head_channels())
    torch.save({"model": model.state_dict(), "iteration": 1}, tmp_path / "c.pt")
    rng = np.random.default_rng(0)
    block = (8, 32, 32)
    channels = sum(recipe.head_channels().values())
    peaks = {}
    for name, shape in (("warm", (8, 32, 32)), ("small", (8, 64, 64)), ("large", (16, 128, 128))):
        write_volume(tmp_path / f"{name}.zarr", "image",
                     rng.integers(1, 255, shape, dtype=np.uint8), chunks=block)
        job = prepare_job(recipe, tmp_path / "c.pt", str(tmp_path / f"{name}.zarr/image"),
                          tmp_path / f"{name}-out.zarr", block=block)
        worker = BlockWorker(job, torch.device("cpu"))
        blocks = job.pending()
        tracemalloc.start()
        try:
            worker.run(blocks)
            peaks[name] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    read_box = math.prod(block)  # no overlap: a block reads its own voxels (uint8)
    output = 4 * channels * math.prod(block)
    bound = (PREFETCH + 1) * read_box + (WRITES_IN_FLIGHT + 1) * 2 * output + (256 << 10)
    whole = 4 * channels * 16 * 128 * 128
    assert bound < whole
    assert peaks["small"] <= bound and peaks["large"] <= bound, (peaks, bound)
