"""Opening a TIFF volume parses each page header once (`emrun.io.tiff_volume.open_tiff`).

Finding the series and checking where the pages' data ends each parsed every page, so a
20,000-page stack took about a second longer to open than it needed, on every open. The
page parses are counted here (a spy on tifffile's page classes), not timed."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import tifffile.tifffile as inner

from emrun.io import VolumeError
from emrun.io.tiff_volume import open_tiff


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> Counter[int]:
    """How often each page header (by its offset in the file) is parsed from the file."""
    seen: Counter[int] = Counter()
    page_init, frame_init = inner.TiffPage.__init__, inner.TiffFrame.__init__

    def page(self: Any, parent: Any, *args: Any, **kwargs: Any) -> None:
        seen[parent.filehandle.tell()] += 1
        page_init(self, parent, *args, **kwargs)

    def frame(self: Any, parent: Any, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("dataoffsets") is None:  # virtual frames are computed, not read
            where = kwargs.get("offset")
            seen[parent.filehandle.tell() if where is None else where] += 1
        frame_init(self, parent, *args, **kwargs)

    monkeypatch.setattr(inner.TiffPage, "__init__", page)
    monkeypatch.setattr(inner.TiffFrame, "__init__", frame)
    return seen


def _page_offsets(path: Path) -> list[int]:
    with tifffile.TiffFile(path) as tif:
        return [int(p.offset) for p in tif.pages]


STACK = np.arange(40 * 8 * 8, dtype=np.uint16).reshape(40, 8, 8)


@pytest.mark.parametrize("layout", ["zlib", "plain", "imagej", "one call per section"])
def test_each_page_header_is_parsed_once_on_opening(
        tmp_path: Path, layout: str, parses: Counter[int]) -> None:
    path = tmp_path / "stack.tif"
    if layout == "one call per section":
        with tifffile.TiffWriter(path) as writer:
            for section in STACK:
                writer.write(section)
    else:
        tifffile.imwrite(path, STACK, imagej=layout == "imagej",
                         compression="zlib" if layout == "zlib" else None)
    offsets = _page_offsets(path)
    parses.clear()
    volume = open_tiff(str(path))
    assert volume.shape == STACK.shape and volume.dtype == STACK.dtype
    twice = {offset: n for offset, n in parses.items() if n > 1}
    assert not twice, f"page headers parsed more than once: {twice}"
    assert set(parses) <= set(offsets)
    parses.clear()
    np.testing.assert_array_equal(volume.read(), STACK)


def test_a_stack_cut_short_is_still_refused(tmp_path: Path, parses: Counter[int]) -> None:
    """The cache of parsed pages keeps the check of where their data ends: a file cut in
    its last page's data is refused on opening."""
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, STACK, compression="zlib")
    with tifffile.TiffFile(path) as tif:
        last = tif.pages[-1]
        end = int(last.dataoffsets[-1]) + int(last.databytecounts[-1])
    data = path.read_bytes()
    if end != len(data):  # headers after the data: cut the data of the last page instead
        pytest.skip("tifffile wrote the pages' headers after their data")
    path.write_bytes(data[:end - 10])
    with pytest.raises(VolumeError, match="cut short"):
        open_tiff(str(path))
