"""Memory that grew with what emrun did, not with what it held at once: glibc's malloc
arenas (one per allocating thread) and `emrun data convert`'s list of every slab."""

from __future__ import annotations

import gc
import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import emrun.io.convert as convert_module
from emrun import memory
from emrun.geometry import Roi
from emrun.io.convert import convert

GLIBC = memory.glibc_mallopt() is not None
cli_app = importlib.import_module("emrun.cli.app")  # `emrun.cli.app` is also the typer app


class Recorder:
    """A stand-in for mallopt that records its calls."""

    def __init__(self, result: int = 1) -> None:
        self.calls: list[tuple[int, int]] = []
        self.result = result

    def __call__(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.result


def test_limit_sets_glibc_arena_max_to_one_per_core(monkeypatch) -> None:
    monkeypatch.setattr(memory.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5},
                        raising=False)
    mallopt = Recorder()
    assert memory.limit_malloc_arenas(environ={}, mallopt=mallopt) is True
    assert mallopt.calls == [(-8, 6)]  # M_ARENA_MAX in glibc's malloc.h


def test_the_limit_is_handed_to_child_processes_through_the_environment(monkeypatch) -> None:
    """Spawned workers never pass through the command's start: glibc reads the cap from
    the environment they inherit, marked as emrun's own."""
    monkeypatch.setattr(memory.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    environ: dict[str, str] = {}
    assert memory.limit_malloc_arenas(environ=environ, mallopt=Recorder())
    assert environ == {"MALLOC_ARENA_MAX": "3", "EMRUN_MALLOC_ARENA_MAX": "3"}


def test_an_emrun_started_from_another_counts_its_own_cores(monkeypatch) -> None:
    """A daisy worker started by srun on a larger node inherits the launching machine's
    count, marked as emrun's: it sets its own."""
    monkeypatch.setattr(memory.os, "sched_getaffinity", lambda pid: set(range(16)),
                        raising=False)
    environ = {"MALLOC_ARENA_MAX": "2", "EMRUN_MALLOC_ARENA_MAX": "2"}
    mallopt = Recorder()
    assert memory.limit_malloc_arenas(environ=environ, mallopt=mallopt)
    assert mallopt.calls == [(-8, 16)]
    assert environ == {"MALLOC_ARENA_MAX": "16", "EMRUN_MALLOC_ARENA_MAX": "16"}


def test_one_core_still_gets_two_arenas(monkeypatch) -> None:
    monkeypatch.setattr(memory.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert memory.default_arenas() == memory.MIN_ARENAS == 2


@pytest.mark.parametrize("environ", [
    {"MALLOC_ARENA_MAX": "8"},
    {"MALLOC_ARENA_MAX": ""},
    {"MALLOC_ARENA_MAX": "8", "EMRUN_MALLOC_ARENA_MAX": "2"},  # theirs, set after emrun's
    {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0:glibc.malloc.arena_max=4"},
])
def test_a_users_own_limit_is_left_alone(environ: dict[str, str]) -> None:
    mallopt = Recorder()
    before = dict(environ)
    assert memory.limit_malloc_arenas(environ=environ, mallopt=mallopt) is False
    assert mallopt.calls == [] and environ == before


def test_other_tunables_do_not_count_as_a_limit() -> None:
    mallopt = Recorder()
    assert memory.limit_malloc_arenas(environ={"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"},
                                      mallopt=mallopt) is True


def test_no_glibc_is_a_quiet_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_confstr(name: str) -> str:
        raise ValueError(f"unrecognized configuration name {name}")  # musl, macOS

    monkeypatch.setattr(memory.os, "confstr", no_confstr)
    assert memory.glibc_mallopt() is None
    assert memory.limit_malloc_arenas(environ={}) is False


def test_a_failing_mallopt_never_fails_the_command() -> None:
    def broken(param: int, value: int) -> int:
        raise OSError("no such symbol")

    assert memory.limit_malloc_arenas(environ={}, mallopt=broken) is False
    assert memory.limit_malloc_arenas(environ={}, mallopt=Recorder(result=0)) is False


def test_the_command_line_limits_arenas_before_its_command(
        monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []
    monkeypatch.setattr(cli_app, "limit_malloc_arenas", lambda: order.append("limit"))
    monkeypatch.setattr(cli_app, "app", lambda **_: order.append("command") or 0)
    with pytest.raises(SystemExit) as stop:
        cli_app.main()
    assert stop.value.code == 0
    assert order == ["limit", "command"]


ARENAS_AFTER_THREADS = """
import ctypes, os, sys, tempfile, threading
from emrun import memory
if sys.argv[1] in ("limit", "spawned"):
    assert memory.limit_malloc_arenas(2)
if sys.argv[1] == "spawned":  # a child started after the limit, as emrun's workers are
    import subprocess
    done = subprocess.run([sys.executable, "-c", sys.argv[2], "default"], check=True,
                          capture_output=True, text=True)
    print(done.stdout.split()[-1])
    sys.exit(0)
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = (ctypes.c_char_p, ctypes.c_char_p)
libc.malloc_info.argtypes = (ctypes.c_int, ctypes.c_void_p)
libc.fclose.argtypes = (ctypes.c_void_p,)
barrier = threading.Barrier(8)
def work():
    barrier.wait()  # all alive at once: none can take over an ended thread's arena
    for _ in range(50):
        libc.free(ctypes.c_void_p(libc.malloc(4096)))
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
path = os.path.join(tempfile.mkdtemp(), "info.xml")
f = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, f)
libc.fclose(f)
print(open(path).read().count("<heap nr="))
"""


def arenas_after_threads(mode: str) -> int:
    """How many malloc arenas a fresh process has after 8 threads allocated at once."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MALLOC_ARENA_MAX", "EMRUN_MALLOC_ARENA_MAX", "GLIBC_TUNABLES")}
    done = subprocess.run([sys.executable, "-c", ARENAS_AFTER_THREADS, mode,
                           ARENAS_AFTER_THREADS], env=env,
                          capture_output=True, text=True, timeout=60, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not GLIBC, reason="malloc arenas are glibc's")
def test_threads_share_two_arenas_once_limited() -> None:
    assert arenas_after_threads("limit") <= 2
    assert arenas_after_threads("spawned") <= 2  # a process started after the limit too
    assert arenas_after_threads("default") > 2  # the test can see arenas grow


def live_rois() -> int:
    gc.collect()
    return sum(isinstance(o, Roi) for o in gc.get_objects())


def rois_alive_at_first_slab(tmp_path: Path, depth: int,
                             monkeypatch: pytest.MonkeyPatch) -> int:
    """Live Roi objects when `convert` writes its first slab of a `depth`-section volume
    converted one section per slab, beyond those alive before it started (the tests run
    before this one in the same process, caches of layouts included, leave their own)."""
    source = tmp_path / f"v{depth}.npy"
    np.save(source, np.arange(depth * 8 * 8, dtype=np.uint8).reshape(depth, 8, 8))
    seen: list[int] = []
    write = convert_module.write_by_chunk

    def counting(array, roi, data) -> None:  # type: ignore[no-untyped-def]
        if not seen:
            seen.append(live_rois())
        write(array, roi, data)

    monkeypatch.setattr(convert_module, "write_by_chunk", counting)
    before = live_rois()
    convert(source, tmp_path / f"out{depth}.zarr", chunks=(1, 8, 8), levels=1, progress=False)
    return seen[0] - before


def test_convert_holds_slabs_one_at_a_time(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The slabs were listed up front (`BlockGrid.boxes`), so memory grew with the volume's
    slab count; made one at a time, what is alive is the same for 8 or 200 slabs."""
    small = rois_alive_at_first_slab(tmp_path, 8, monkeypatch)
    large = rois_alive_at_first_slab(tmp_path, 200, monkeypatch)
    assert large == small
    assert large < 50


def test_slabs_still_cover_the_volume_once() -> None:
    shape, chunks = (10, 40, 12), (4, 8, 12)
    seen = np.zeros(shape, dtype=np.int32)
    grid = convert_module.slab_grid(shape, chunks, 1, max_bytes=4 * 16 * 12)
    boxes = list(convert_module.slabs(shape, chunks, 1, max_bytes=4 * 16 * 12))
    assert len(boxes) == len(grid) == 3 * 3  # 3 z-slabs, y cut into bands of 16, 16, 8
    for box in boxes:
        seen[box.to_slices()] += 1
    assert (seen == 1).all()


def page_objects_for_first_section(tmp_path: Path, depth: int,
                                   monkeypatch: pytest.MonkeyPatch) -> int:
    """tifffile page objects made to read section 0 of a `depth`-page TIFF (zlib pages)."""
    import tifffile
    import tifffile.tifffile as inner

    from emrun.io.tiff_volume import open_tiff

    path = tmp_path / f"stack{depth}.tif"
    tifffile.imwrite(path, np.zeros((depth, 8, 8), np.uint8), compression="zlib")
    volume = open_tiff(str(path))
    made = [0]
    for cls in (inner.TiffPage, inner.TiffFrame):
        init = cls.__init__

        def counted(self, *args, _init=init, **kwargs) -> None:  # type: ignore[no-untyped-def]
            made[0] += 1
            _init(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", counted)
    volume.read(Roi((0, 0, 0), (1, 8, 8)))
    monkeypatch.undo()
    return made[0]


def test_reading_one_tiff_section_does_not_walk_every_page(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert (page_objects_for_first_section(tmp_path, 64, monkeypatch)
            == page_objects_for_first_section(tmp_path, 8, monkeypatch))


def test_a_worker_launched_on_another_node_sets_its_own_cap(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A daisy worker started through --launch (srun) runs `launched_main`, not the
    command's start: it inherited the launching machine's count, marked as emrun's, and
    sets its own machine's."""
    from emrun.devices import launched_main

    (tmp_path / "launched").mkdir()
    monkeypatch.setattr(sys, "argv", ["worker", "a", str(tmp_path / "launched" / "token")])
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    monkeypatch.setenv("EMRUN_MALLOC_ARENA_MAX", "2")
    monkeypatch.setattr(memory.os, "sched_getaffinity", lambda pid: set(range(12)),
                        raising=False)
    mallopt = Recorder()
    monkeypatch.setattr(memory, "glibc_mallopt", lambda: mallopt)
    seen: list[str] = []
    launched_main(lambda arg: seen.append(f"{arg} {os.environ['MALLOC_ARENA_MAX']}"))
    assert seen == ["a 12"]
    assert mallopt.calls == [(-8, 12)]
