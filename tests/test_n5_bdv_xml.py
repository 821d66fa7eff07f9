"""A BigDataViewer N5 export (Fiji's "Export current image as XML/N5", BigStitcher) keeps its
voxel size only in the XML beside the container: its levels read it from there (setup N's
`voxelSize`, x y z in its unit), and the N5's own attributes win where they give one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from n5_writing import n5_attrs, n5_dataset

from emrun.io import VolumeError, choose_level, n5_volume, open_volume

IMAGE = np.random.default_rng(5).integers(0, 255, (4, 8, 8), dtype=np.uint8)  # z, y, x
LEVELS = (IMAGE, IMAGE[:, ::2, ::2].copy())
FACTORS = [[1, 1, 1], [2, 2, 1]]  # x, y, z


def _export(container: Path, setups: int = 1) -> None:
    """What the export writes into the container: setupN/timepoint0/sK, the factors on the
    setup, no voxel size anywhere in the N5."""
    for setup in range(setups):
        for index, data in enumerate(LEVELS):
            n5_dataset(container / f"setup{setup}" / "timepoint0" / f"s{index}", data)
        n5_attrs(container / f"setup{setup}", downsamplingFactors=FACTORS, dataType="uint8")


def _setup(index: int, unit: str, size: str) -> str:
    return (f"<ViewSetup><id>{index}</id><name>{index}</name><size>8 8 4</size>"
            f"<voxelSize><unit>{unit}</unit><size>{size}</size></voxelSize></ViewSetup>")


def _xml(path: Path, n5: str, setups: str, *, n5_type: str = "relative",
         base: str = '<BasePath type="relative">.</BasePath>', after: str = "") -> Path:
    """A BigDataViewer XML whose image loader reads the N5 container `n5`."""
    path.write_text(
        f'<?xml version="1.0" encoding="UTF-8"?>\n<SpimData version="0.2">{base}'
        f'<SequenceDescription><ImageLoader format="bdv.n5" version="1.0">'
        f'<n5 type="{n5_type}">{n5}</n5></ImageLoader><ViewSetups>{setups}</ViewSetups>'
        '<Timepoints type="range"><first>0</first><last>0</last></Timepoints>'
        f"</SequenceDescription>{after}<ViewRegistrations/></SpimData>\n", encoding="utf-8")
    return path


def _sizes(group: Path) -> list[tuple[float, ...] | None]:
    return [lv.voxel_size for lv in open_volume(group).levels()]


def test_the_levels_take_setup_n_voxel_size_from_the_xml_beside_the_container(
        tmp_path: Path) -> None:
    """They listed as 'voxel size unknown'; µm, x y z, become nm, z y x, times the factors,
    and each setup takes its own."""
    container = tmp_path / "dataset.n5"
    _export(container, setups=2)
    _xml(tmp_path / "dataset.xml", "dataset.n5",
         _setup(0, "µm", "0.004 0.005 0.03") + _setup(1, "nm", "6 6 40"))
    group = container / "setup0" / "timepoint0"
    whole = open_volume(group)
    assert whole.voxel_size == pytest.approx((30.0, 5.0, 4.0))
    assert _sizes(group) == [pytest.approx((30.0, 5.0, 4.0)), pytest.approx((30.0, 10.0, 8.0))]
    assert _sizes(container / "setup1" / "timepoint0") == [(40.0, 6.0, 6.0), (40.0, 12.0, 12.0)]
    coarse = open_volume(choose_level(str(group), "s1"))  # a level named directly agrees
    assert coarse.voxel_size == pytest.approx((30.0, 10.0, 8.0))
    assert coarse.shift_nm == pytest.approx((0.0, 2.5, 2.0))  # half a level-0 voxel per factor
    np.testing.assert_array_equal(coarse.read(), LEVELS[1])


def test_the_n5_attributes_win_over_the_xml(tmp_path: Path) -> None:
    """The group's or the levels' own voxel size is taken, and the XML is then not even
    read (a damaged one does not stop a volume that does not need it)."""
    container = tmp_path / "dataset.n5"
    _export(container)
    xml = _xml(tmp_path / "dataset.xml", "dataset.n5", _setup(0, "nm", "9 9 9"))
    group = container / "setup0" / "timepoint0"
    n5_attrs(group, multiScale=True, resolution=[4, 4, 30])
    assert _sizes(group) == [(30.0, 4.0, 4.0), (30.0, 8.0, 8.0)]
    xml.write_text("<SpimData><cut")
    (group / "attributes.json").write_text("{}")
    for level, factors in (("s0", [1, 1, 1]), ("s1", [2, 2, 1])):
        n5_attrs(group / level, downsamplingFactors=factors,
               pixelResolution={"dimensions": [5, 5, 40], "unit": "nm"})
    assert _sizes(group) == [(40.0, 5.0, 5.0), (40.0, 10.0, 10.0)]


def test_another_xml_in_the_folder_that_names_the_container_is_found(tmp_path: Path) -> None:
    """BigStitcher names its XML as the user likes; only one whose loader reads this
    container counts, and XML about anything else (damaged or not) is passed over."""
    container = tmp_path / "dataset.n5"
    _export(container)
    (tmp_path / "a_notes.xml").write_text("<notes><unclosed></notes>")
    _xml(tmp_path / "b_other.xml", "other.n5", _setup(0, "nm", "1 1 1"))
    group = container / "setup0" / "timepoint0"
    assert _sizes(group) == [None, None]
    _xml(tmp_path / "c_stitched.xml", "dataset.n5", _setup(0, "micrometer", "0.008 0.008 0.05"))
    assert _sizes(group) == [pytest.approx((50.0, 8.0, 8.0)), pytest.approx((50.0, 16.0, 16.0))]


def test_the_loader_path_is_resolved_from_the_base_path_or_taken_as_absolute(
        tmp_path: Path) -> None:
    container = tmp_path / "data" / "dataset.n5"
    _export(container)
    xml = _xml(tmp_path / "data" / "project.xml", "dataset.n5", _setup(0, "nm", "4 4 30"),
               base='<BasePath type="relative">sub</BasePath>')  # sub/dataset.n5: not it
    group = container / "setup0" / "timepoint0"
    assert _sizes(group)[0] is None
    _xml(xml, str(container), _setup(0, "nm", "4 4 30"), n5_type="absolute")
    assert _sizes(group)[0] == (30.0, 4.0, 4.0)


def test_an_uncalibrated_export_keeps_its_voxel_size_unknown(tmp_path: Path) -> None:
    """Fiji writes unit "pixel" and size 1 1 1 for an image without calibration."""
    container = tmp_path / "dataset.n5"
    _export(container)
    _xml(tmp_path / "dataset.xml", "dataset.n5", _setup(0, "pixel", "1 1 1"))
    assert _sizes(container / "setup0" / "timepoint0") == [None, None]


@pytest.mark.parametrize("text", [
    '<?xml version="1.0"?>\n<SpimData><SequenceDescription><ImageLoader format="bdv.n5">',
    '<?xml version="1.0"?><!DOCTYPE SpimData [<!ENTITY a "aaaa">]><SpimData>&a;</SpimData>',
])
def test_a_damaged_xml_of_the_container_is_named(tmp_path: Path, text: str) -> None:
    """dataset.xml is the export's own XML for dataset.n5: cut short (or with entity
    declarations, which it never has) it is named, not read as 'no voxel size'."""
    container = tmp_path / "dataset.n5"
    _export(container)
    (tmp_path / "dataset.xml").write_text(text)
    with pytest.raises(VolumeError, match=r"dataset\.xml: not valid XML.*BigDataViewer XML "
                                          r"of .*dataset\.n5"):
        open_volume(container / "setup0" / "timepoint0")


def test_a_voxel_size_that_is_not_three_numbers_is_named(tmp_path: Path) -> None:
    container = tmp_path / "dataset.n5"
    _export(container)
    _xml(tmp_path / "dataset.xml", "dataset.n5", _setup(0, "nm", "4 4"))
    with pytest.raises(VolumeError, match=r"dataset\.xml: ViewSetup 0's voxelSize: size "
                                          r"'4 4' is not three positive numbers"):
        open_volume(container / "setup0" / "timepoint0")


def test_only_the_head_of_a_huge_xml_is_read(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The setups come before the registrations, which grow with the views: those past the
    limit are never read; an XML whose setups lie past it is named."""
    monkeypatch.setattr(n5_volume, "XML_READ_LIMIT", 4096)
    container = tmp_path / "dataset.n5"
    _export(container)
    padding = "<!-- " + "x" * 20000 + " -->"
    xml = _xml(tmp_path / "dataset.xml", "dataset.n5", _setup(0, "nm", "4 4 30"), after=padding)
    assert _sizes(container / "setup0" / "timepoint0")[0] == (30.0, 4.0, 4.0)
    _xml(xml, "dataset.n5", _setup(0, "nm", "4 4 30"), base=padding)
    with pytest.raises(VolumeError, match="no SequenceDescription in its first"):
        open_volume(container / "setup0" / "timepoint0")
