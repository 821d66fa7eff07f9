"""A folder of TIFF sections with a damaged file: the file is named, first or not."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from emrun.io import open_volume
from emrun.io.volume import VolumeError


@pytest.mark.parametrize("damaged", [0, 2])
def test_a_damaged_section_is_named_wherever_it_lies(tmp_path, damaged):
    """The first file was opened to learn the shape, and its damage said only 'cannot
    open as a folder of TIFF sections', naming no file (a later one was named)."""
    folder = tmp_path / "stack"
    folder.mkdir()
    for z in range(4):
        tifffile.imwrite(folder / f"s{z:03d}.tif", np.full((8, 8), z, np.uint8))
    (folder / f"s{damaged:03d}.tif").write_bytes(b"junk" * 10)
    with pytest.raises(VolumeError, match=rf"stack: cannot read section s{damaged:03d}\.tif: "
                                          r"TiffFileError"):
        open_volume(str(folder)).read()
