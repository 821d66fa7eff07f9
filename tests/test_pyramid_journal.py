"""A pyramid build records its finished blocks in one append-only journal per level (one
file per block was ~10^6 files in one folder on a large volume): lines are taken only whole
and checked, so a line torn by a kill never reads as another block; a folder of marker
files that the previous release left is still honoured; a build cut short resumes bit for
bit and makes again only the blocks it had not finished; the journal's descriptor does not
outlive its level."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
from test_pyramid_resume import Killed, _counting, _levels, _reference, _same_bits, _store, _volume

from emrun.io import pyramid
from emrun.io.pyramid import BlockJournal, Progress, _whole_lines, journal_line, read_journal
from emrun.io.write import PYRAMID_PROGRESS, build_pyramid


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of a few chunks, so that a small volume's levels have several blocks."""
    monkeypatch.setattr(pyramid, "BLOCK_ZYX", (2, 8, 8))


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def _marked(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Record each block marked finished, as (journal name, block)."""
    marked: list[tuple[str, int]] = []
    real = BlockJournal.__call__

    def spy(self: BlockJournal, index: int) -> None:
        real(self, index)
        marked.append((self.path.name, index))

    monkeypatch.setattr(BlockJournal, "__call__", spy)
    return marked


def test_a_journal_reads_back_what_threads_wrote(tmp_path: Path) -> None:
    path = tmp_path / "1.blocks"
    with BlockJournal(path) as mark:
        workers = [threading.Thread(target=lambda t=t: [mark(i) for i in range(t, 4000, 8)])
                   for t in range(8)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    assert read_journal(path) == set(range(4000))
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 4001  # one whole line per block, none mixed
    with BlockJournal(path) as mark:  # reopened: appends
        mark(123456789)
    assert read_journal(path) == set(range(4000)) | {123456789}
    assert read_journal(tmp_path / "absent.blocks") == set()


def test_a_torn_last_line_is_never_read_as_a_block(tmp_path: Path) -> None:
    """Each prefix of the line of 123 that a kill could leave ("12" included) is ignored;
    the next build's line after it stands on its own. (The line that lacks only its
    newline may count once the next build ends it: 123 was finished before its line
    began.)"""
    whole = journal_line(123)
    for cut in range(1, len(whole)):
        path = tmp_path / f"{cut}.blocks"
        path.write_bytes(journal_line(7) + whole[:cut])
        assert read_journal(path) == {7}, whole[:cut]
        with BlockJournal(path) as mark:  # a resumed build appends after the torn line
            mark(45)
        complete = {7, 45, 123} if cut == len(whole) - 1 else {7, 45}
        assert read_journal(path) == complete, whole[:cut]


def test_lines_that_do_not_check_out_are_ignored(tmp_path: Path) -> None:
    """A line run together with the next (a failed write: "12" then "45 <check>") reads as
    neither 1245 nor 45; nor do zeros, other text or digits without their check count."""
    path = tmp_path / "1.blocks"
    path.write_bytes(b"12" + journal_line(45) + b"\0\0\0\n" + b"99\n" + b"hello 0\n"
                     + "\u00b2 00000000\n".encode() + b"0" + journal_line(8)
                     + journal_line(3) + journal_line(3)[:-1])
    assert read_journal(path) == {3}


def test_lines_cut_by_the_reading_chunks_are_whole_again(tmp_path: Path) -> None:
    """The journal is read a chunk at a time: a line across two chunks is one line, and a
    long stretch of zeros (what a crash can leave) neither counts nor joins the next."""
    path = tmp_path / "1.blocks"
    zeros = b"\0" * 520  # 8 times 65: a cut by one-byte reads falls at its end
    text = b"".join(journal_line(i) for i in range(300)) + zeros + journal_line(999)
    path.write_bytes(text + journal_line(300) + b"\0" * 100 + journal_line(301)[:-1])
    for chunk in (1, 7, 64, 1 << 20):
        lines = list(_whole_lines(path, chunk))
        assert lines[:300] == [journal_line(i)[:-1] for i in range(300)], chunk
        assert lines[300].endswith(journal_line(999)[:-1]), chunk
        assert lines[300] != journal_line(999)[:-1], chunk  # the zeros' line, not 999's
        assert lines[301:] == [journal_line(300)[:-1]], chunk
    assert read_journal(path) == set(range(301))


def test_a_closed_journal_refuses_to_mark(tmp_path: Path) -> None:
    mark = BlockJournal(tmp_path / "1.blocks")
    mark(1)
    mark.close()
    mark.close()  # twice is harmless
    with pytest.raises(ValueError, match="closed"):
        mark(2)
    assert read_journal(tmp_path / "1.blocks") == {1}


def test_the_progress_folder_does_not_grow_with_the_blocks(tmp_path: Path) -> None:
    """One file per level, whatever its number of blocks (it was one file per block)."""
    counts = []
    for blocks in (1, 3000):
        progress = Progress(tmp_path / str(blocks))
        progress.start({"version": 1}, stamps=[], resumed=False)
        with progress.journal(1) as mark:
            for index in range(blocks):
                mark(index)
        counts.append(len(_files(progress.folder)))
        assert progress.blocks(1) == set(range(blocks))
        progress.finish_level(1, "1:stamp")
        assert sorted(p.name for p in _files(progress.folder)) == ["1.done", "build.json"]
    assert counts == [2, 2]


def test_start_keeps_only_the_journal_of_the_level_it_goes_on_with(tmp_path: Path) -> None:
    """Nothing of an old build outlives it: journals and old-layout folders of the levels
    not kept go; those of the level resumed stay."""
    progress = Progress(tmp_path / "p")
    progress.start({"version": 1, "n": 1}, stamps=[], resumed=False)
    for level in (2, 3):
        with progress.journal(level) as mark:
            mark(5)
        (progress.folder / str(level)).mkdir()
        (progress.folder / str(level) / "6").touch()
    progress.start({"version": 1, "n": 2}, stamps=["1:a"], resumed=True)
    assert progress.blocks(2) == {5, 6} and progress.blocks(3) == set()
    assert not (progress.folder / "3.blocks").exists() and not (progress.folder / "3").exists()
    progress.start({"version": 1, "n": 3}, stamps=["1:a"], resumed=False)
    assert progress.blocks(2) == set()
    assert sorted(p.name for p in _files(progress.folder)) == ["1.done", "build.json"]
    assert progress.level_stamp(1) == "1:a" and progress.level_stamp(2) is None


def _to_old_layout(progress: Path, keep_in_journal: int = 0) -> int:
    """Move the journal's blocks of the level in progress into a folder of marker files,
    as the previous release kept them (the first `keep_in_journal` stay in the journal);
    returns the level."""
    (journal,) = progress.glob("*.blocks")
    level = journal.name.split(".")[0]
    found = sorted(read_journal(journal))
    (progress / level).mkdir()
    for index in found[keep_in_journal:]:
        (progress / level / str(index)).touch()
    journal.write_bytes(b"".join(journal_line(i) for i in found[:keep_in_journal]))
    return int(level)


@pytest.mark.parametrize("keep_in_journal", [0, 3])
def test_a_build_the_previous_release_left_resumes_with_its_blocks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keep_in_journal: int) -> None:
    """An upgrade mid-build loses no work: the old folder of marker files is read (with
    the journal of a build resumed and cut short again since) and goes once its level is
    done."""
    data, options = _volume("labels")
    want, total = _reference(tmp_path, data, options, 4)
    group = _store(tmp_path, "old.zarr", data, options)
    kill = total // 2
    with monkeypatch.context() as patch:
        _counting(patch, kill_after=kill)
        with pytest.raises(Killed):
            build_pyramid(group, 4, threads=1)
    level = _to_old_layout(group / PYRAMID_PROGRESS, keep_in_journal)
    assert len(list((group / PYRAMID_PROGRESS / str(level)).iterdir())) > 0
    with monkeypatch.context() as patch:
        _counting(patch, kill_after=1)  # cut short again in the old layout's level
        with pytest.raises(Killed):
            build_pyramid(group, 4, threads=1)
    assert (group / PYRAMID_PROGRESS / str(level)).is_dir()
    with monkeypatch.context() as patch:
        resumed = _counting(patch)
        assert build_pyramid(group, 4, threads=1) == 4
    assert len(resumed) == total - kill - 1  # every finished block, of either layout, kept
    assert _same_bits(_levels(group), want)
    assert not (group / PYRAMID_PROGRESS).exists()


@pytest.mark.parametrize("threads", [1, 2])
def test_a_cut_build_rewrites_only_its_unfinished_blocks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: int) -> None:
    data, options = _volume("image")
    want, total = _reference(tmp_path, data, options, 3)
    group = _store(tmp_path, "cut.zarr", data, options)
    kill = total // 2 + 1
    with monkeypatch.context() as patch:
        first = _marked(patch)
        _counting(patch, kill_after=kill)
        with pytest.raises(Killed):
            build_pyramid(group, 3, threads=threads)
    left = _files(group / PYRAMID_PROGRESS)
    assert {p.name for p in left} <= {"build.json", "1.done", "1.blocks", "2.blocks"}
    assert [p.suffix for p in left].count(".blocks") == 1  # the level cut short's alone
    with monkeypatch.context() as patch:
        second = _marked(patch)
        calls = _counting(patch)
        assert build_pyramid(group, 3, threads=threads) == 3
    assert not set(first) & set(second)  # no finished block made again
    assert len(first) + len(second) == len(calls) + len(first) == total
    assert _same_bits(_levels(group), want)


def _open_journals() -> list[str]:
    names = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.endswith(".blocks"):
            names.append(target)
    return names


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_the_journal_is_closed_when_a_build_fails_or_ends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, options = _volume("channels")
    group = _store(tmp_path, "fds.zarr", data, options)
    opened: list[BlockJournal] = []
    real_init = BlockJournal.__init__

    def spy(self: BlockJournal, *args: Any) -> None:
        real_init(self, *args)
        opened.append(self)

    monkeypatch.setattr(BlockJournal, "__init__", spy)
    with monkeypatch.context() as patch:
        _counting(patch, kill_after=5)
        with pytest.raises(Killed):
            build_pyramid(group, 3, threads=2)
    assert opened and _open_journals() == []
    build_pyramid(group, 3, threads=2)
    assert len(opened) >= 3 and _open_journals() == []  # one per level built
    assert all(journal._fd is None for journal in opened)
    assert len(_levels(group)) == 3
