"""Probe of the pyramid's block journal beyond what test_pyramid_journal and
test_pyramid_resume cover, end to end through `build_pyramid`: what a kill, a crash or a
hand can leave in the progress folder (a torn or NUL-filled journal tail, block numbers out
of range or repeated, a journal gone, a journal that is a folder or unreadable, an
unreadable build record, stray names in the previous release's marker folder, a finished
level removed or written over) and whether the next build still ends bit for bit as an
uninterrupted one, makes each block once, and fails, where it must, with one line for the
user rather than an internal error."""

from __future__ import annotations

import errno
import pathlib
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
import zarr
from test_pyramid_resume import Killed, _counting, _levels, _reference, _same_bits, _store, _volume

from emrun.errors import UserError
from emrun.io import pyramid
from emrun.io.pyramid import BlockJournal, journal_line, read_journal
from emrun.io.write import PYRAMID_PROGRESS, build_pyramid

LEVELS = 4


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of a few chunks, so that a small volume's levels have several blocks."""
    monkeypatch.setattr(pyramid, "BLOCK_ZYX", (2, 8, 8))


def _cut(tmp_path: Path, name: str, data: np.ndarray, options: dict[str, Any],
         kill: int, threads: int = 1) -> Path:
    """A store whose pyramid build was killed after `kill` blocks."""
    group = _store(tmp_path, name, data, options)
    with pytest.MonkeyPatch.context() as patch:
        _counting(patch, kill_after=kill)
        with pytest.raises(Killed):
            build_pyramid(group, LEVELS, threads=threads)
    return group


def _journal(group: Path) -> Path:
    """The journal of the level a cut build was in (the only one left)."""
    (journal,) = (group / PYRAMID_PROGRESS).glob("*.blocks")
    return journal


def _resume(group: Path, threads: int = 1) -> int:
    """Build again to the end; returns how many blocks were downsampled."""
    with pytest.MonkeyPatch.context() as patch:
        calls = _counting(patch)
        assert build_pyramid(group, LEVELS, threads=threads) == LEVELS
    assert not (group / PYRAMID_PROGRESS).exists()
    return len(calls)


def _blocks_per_level(data: np.ndarray, options: dict[str, Any], tmp_path: Path) -> list[int]:
    """How many blocks each level 1..LEVELS-1 has (the journal lines an uninterrupted
    build writes, per level)."""
    counts: dict[str, int] = {}
    real = BlockJournal.__call__

    def spy(self: BlockJournal, index: int) -> None:
        real(self, index)
        counts[self.path.name] = counts.get(self.path.name, 0) + 1

    group = _store(tmp_path, "count.zarr", data, options)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(BlockJournal, "__call__", spy)
        build_pyramid(group, LEVELS, threads=1)
    return [counts[f"{level}.blocks"] for level in range(1, LEVELS)]


# --- torn, NUL-filled and foreign journal tails, through two more cuts -------------------


def _tails(finished: list[int], unfinished: int) -> dict[str, bytes]:
    """What a kill, a crash or a failed write can leave after the journal's last whole
    line; none marks an unfinished block."""
    line = journal_line(unfinished)
    return {
        "partial digits": line[:1],
        "digits and space": line[: line.index(b" ") + 1],
        "half a check": line[:-4],
        "a line with only the number": str(unfinished).encode() + b"\n",
        "NULs, no newline": b"\0" * 4096,
        "NULs, then a newline": b"\0" * 100 + b"\n",
        "garbage bytes": b"\xff\xfe\x00garbage \x80\x81\n\x07",
        "a finished line without its newline": journal_line(finished[0])[:-1],
        "a check of another number": str(unfinished).encode() + b" "
                                     + journal_line(finished[0]).split(b" ")[1],
    }


TAILS = list(_tails([0], 1))


@pytest.mark.parametrize("tail", TAILS)
def test_a_damaged_journal_tail_resumed_and_cut_again_ends_bit_for_bit(
        tmp_path: Path, tail: str) -> None:
    """After each tail, a build cut short again (its journal appends after the tail) and a
    last one end as one uninterrupted build, each block made exactly once."""
    data, options = _volume("image")
    want, total = _reference(tmp_path, data, options, LEVELS)
    kill = total // 2
    group = _cut(tmp_path, "torn.zarr", data, options, kill)
    journal = _journal(group)
    finished = sorted(read_journal(journal))
    unfinished = min(set(range(max(finished) + 2)) - set(finished))
    with journal.open("ab") as file:
        file.write(_tails(finished, unfinished)[tail])
    assert read_journal(journal) == set(finished), tail  # the tail marks nothing
    with pytest.MonkeyPatch.context() as patch:
        _counting(patch, kill_after=2)
        with pytest.raises(Killed):
            build_pyramid(group, LEVELS, threads=1)
    assert _resume(group) == total - kill - 2, tail
    assert _same_bits(_levels(group), want)


def test_a_journal_of_zeros_only_makes_its_level_again(tmp_path: Path) -> None:
    """A crash where the file system kept the journal's size but not its data (zeros in
    place of every line): nothing of that level counts as finished, the level is made
    again, and nothing of the levels before it."""
    data, options = _volume("labels")
    want, total = _reference(tmp_path, data, options, LEVELS)
    per_level = _blocks_per_level(data, options, tmp_path)
    kill = per_level[0] + 2  # two blocks into level 2
    group = _cut(tmp_path, "zeros.zarr", data, options, kill)
    journal = _journal(group)
    assert journal.name == "2.blocks" and len(read_journal(journal)) == 2
    journal.write_bytes(b"\0" * journal.stat().st_size)
    assert _resume(group) == total - per_level[0]
    assert _same_bits(_levels(group), want)


def test_block_numbers_out_of_range_or_repeated_change_nothing(tmp_path: Path) -> None:
    """Well-formed lines of blocks the level does not have (a huge number, one past the
    last), and lines repeated, are no harm: the blocks it has are made as before."""
    data, options = _volume("channels")
    want, total = _reference(tmp_path, data, options, LEVELS)
    per_level = _blocks_per_level(data, options, tmp_path)
    kill = per_level[0] // 2
    group = _cut(tmp_path, "range.zarr", data, options, kill)
    journal = _journal(group)
    assert journal.name == "1.blocks"
    finished = sorted(read_journal(journal))
    with journal.open("ab") as file:
        for index in (per_level[0], per_level[0] + 1, 10**19, 2**64 + 5, *finished,
                      *finished):
            file.write(journal_line(index))
    assert _resume(group) == total - kill
    assert _same_bits(_levels(group), want)


def test_a_journal_of_only_foreign_numbers_keeps_the_level_and_makes_every_block(
        tmp_path: Path) -> None:
    """A journal whose only lines name blocks the level lacks marks none of its blocks:
    every block is made (none skipped for the journal being non-empty)."""
    data, options = _volume("image")
    want, total = _reference(tmp_path, data, options, LEVELS)
    per_level = _blocks_per_level(data, options, tmp_path)
    kill = per_level[0] + 3
    group = _cut(tmp_path, "foreign.zarr", data, options, kill)
    journal = _journal(group)
    assert journal.name == "2.blocks"
    journal.write_bytes(journal_line(per_level[1]) + journal_line(10**6))
    assert _resume(group) == total - per_level[0]
    assert _same_bits(_levels(group), want)


# --- the progress folder's files gone, unreadable or in the way --------------------------


def test_a_journal_gone_while_its_level_was_begun_makes_the_level_again(
        tmp_path: Path) -> None:
    data, options = _volume("image")
    want, total = _reference(tmp_path, data, options, LEVELS)
    per_level = _blocks_per_level(data, options, tmp_path)
    kill = per_level[0] + 3
    group = _cut(tmp_path, "gone.zarr", data, options, kill)
    _journal(group).unlink()
    assert (group / "2" / "zarr.json").is_file()  # the level's array was begun
    assert _resume(group) == total - per_level[0]  # level 1 kept, level 2 all made again
    assert _same_bits(_levels(group), want)


def test_an_unreadable_build_record_starts_over_and_ignores_the_old_journal(
        tmp_path: Path) -> None:
    """build.json cut short or garbled: no level or block of the build it described is
    trusted, and its journal does not outlive it."""
    data, options = _volume("image")
    want, total = _reference(tmp_path, data, options, LEVELS)
    kill = total // 2
    group = _cut(tmp_path, "record.zarr", data, options, kill)
    (group / PYRAMID_PROGRESS / "build.json").write_bytes(b'{"version": 1, "base"')
    assert _resume(group) == total
    assert _same_bits(_levels(group), want)


def test_a_journal_that_is_a_folder_is_rebuilt_or_refused_in_one_line(
        tmp_path: Path) -> None:
    data, options = _volume("image")
    want, total = _reference(tmp_path, data, options, LEVELS)
    group = _cut(tmp_path, "dir.zarr", data, options, total // 2)
    journal = _journal(group)
    journal.unlink()
    journal.mkdir()
    try:
        _resume(group)
    except UserError:
        return
    assert _same_bits(_levels(group), want)


def _denied(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading or opening a journal is refused, as for a file of another user (the tests
    run as root, where chmod refuses nothing)."""
    real_open = pathlib.Path.open
    real_os_open = pyramid.os.open

    def path_open(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self.name.endswith(".blocks"):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    def os_open(path: Any, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith(".blocks"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_os_open(path, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", path_open)
    monkeypatch.setattr(pyramid.os, "open", os_open)


def test_an_unreadable_journal_is_one_line_for_the_user_and_exit_2(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A journal this user may not read (or a progress folder it may not write) goes
    through the CLI's guard as one `error:` line naming the journal, exit 2."""
    from emrun.cli.app import guarded

    data, options = _volume("image")
    _, total = _reference(tmp_path, data, options, LEVELS)
    for name, kill in (("resumed.zarr", total // 2), ("fresh.zarr", None)):
        if kill is None:
            group = _store(tmp_path, name, data, options)
        else:
            group = _cut(tmp_path, name, data, options, kill)
        journal = _journal(group) if kill is not None else None
        with monkeypatch.context() as patch:
            _denied(patch)
            with pytest.raises(typer.Exit) as exit_info:
                guarded(lambda g=group: build_pyramid(g, LEVELS, threads=1))()
        assert exit_info.value.exit_code == 2, name
        said = capsys.readouterr().err
        assert "internal error" not in said and "Traceback" not in said, said
        assert said.count("error:") == 1 and ".blocks" in said, said
        if journal is not None:
            assert journal.is_file()  # nothing of the finished work was thrown away


# --- the previous release's folder of markers ----------------------------------------------


def test_stray_names_in_the_old_marker_folder_are_not_blocks(tmp_path: Path) -> None:
    """The previous release's `<level>/` folder of empty files, partly written by a kill:
    besides block numbers it may hold an NFS silly-rename, a temporary, other text; none
    counts, and the blocks named there are kept."""
    data, options = _volume("labels")
    want, total = _reference(tmp_path, data, options, LEVELS)
    kill = total // 2
    group = _cut(tmp_path, "old.zarr", data, options, kill)
    journal = _journal(group)
    level = journal.name.split(".")[0]
    finished = sorted(read_journal(journal))
    folder = group / PYRAMID_PROGRESS / level
    folder.mkdir()
    for index in finished:
        (folder / str(index)).touch()
    journal.unlink()
    unfinished = min(set(range(max(finished) + 2)) - set(finished))
    for stray in (".nfs0000000000123", f"{unfinished}.tmp", f"{unfinished}x", "abc",
                  "\u0661\u0662", f"-{unfinished}"):
        (folder / stray).touch()
    assert pyramid.Progress(group / PYRAMID_PROGRESS).blocks(int(level)) == set(finished)
    assert _resume(group) == total - kill
    assert _same_bits(_levels(group), want)


def test_an_old_marker_folder_whose_level_array_is_gone_makes_the_level_again(
        tmp_path: Path) -> None:
    data, options = _volume("image")
    want, total = _reference(tmp_path, data, options, LEVELS)
    per_level = _blocks_per_level(data, options, tmp_path)
    kill = per_level[0] + 3
    group = _cut(tmp_path, "oldgone.zarr", data, options, kill)
    journal = _journal(group)
    folder = group / PYRAMID_PROGRESS / "2"
    folder.mkdir()
    for index in read_journal(journal):
        (folder / str(index)).touch()
    journal.unlink()
    shutil.rmtree(group / "2")
    assert _resume(group) == total - per_level[0]
    assert _same_bits(_levels(group), want)


# --- the levels a build in progress marks finished -----------------------------------------


def test_a_finished_level_removed_before_the_resume_is_made_again(tmp_path: Path) -> None:
    data, options = _volume("image")
    want, _ = _reference(tmp_path, data, options, LEVELS)
    per_level = _blocks_per_level(data, options, tmp_path)
    group = _cut(tmp_path, "removed.zarr", data, options, per_level[0] + 2)
    assert (group / PYRAMID_PROGRESS / "1.done").is_file()
    shutil.rmtree(group / "1")
    try:
        _resume(group)
    except UserError:
        return
    assert _same_bits(_levels(group), want)


def test_a_finished_level_written_over_before_the_resume_is_made_again(
        tmp_path: Path) -> None:
    data, options = _volume("image")
    want, _ = _reference(tmp_path, data, options, LEVELS)
    per_level = _blocks_per_level(data, options, tmp_path)
    group = _cut(tmp_path, "over.zarr", data, options, per_level[0] + 2)
    assert (group / PYRAMID_PROGRESS / "1.done").is_file()
    zarr.open_array(str(group / "1"), mode="r+")[...] = 7
    _resume(group)
    assert _same_bits(_levels(group), want)


def test_a_finished_level_marked_by_the_previous_release_is_kept(tmp_path: Path) -> None:
    """The previous release marked a finished level with an empty file: a build it left
    unfinished keeps that level while its array is there as recorded, and goes on."""
    data, options = _volume("image")
    want, total = _reference(tmp_path, data, options, LEVELS)
    per_level = _blocks_per_level(data, options, tmp_path)
    kill = per_level[0] + 2
    group = _cut(tmp_path, "legacy.zarr", data, options, kill)
    (group / PYRAMID_PROGRESS / "1.done").write_bytes(b"")
    assert _resume(group) == total - kill
    assert _same_bits(_levels(group), want)


def test_a_finished_level_is_marked_with_its_stamp(tmp_path: Path) -> None:
    data, options = _volume("image")
    per_level = _blocks_per_level(data, options, tmp_path)
    group = _cut(tmp_path, "stamped.zarr", data, options, per_level[0] + 2)
    marked = (group / PYRAMID_PROGRESS / "1.done").read_text()
    assert marked == pyramid.files_stamp(group / "1")
