"""Reference probe of sub-voxel placement: the half-voxel shift of coarser pyramid levels,
carried through every command that reads a level and writes a volume.

The reference is the closed form the README and `ome_image_attrs` state: a pyramid level of
cumulative factor f (z, y, x) over level 0 (voxel size v, offset o voxels) has its voxel 0
centred on the window it averages, at (o + (f - 1) / 2) * v nm; an output made from a level
lies where that level lies, so the output's level j, of factor g over its own level 0 (voxel
size V = the source level's), lies at T + (g - 1) / 2 * V, where T is the source level's
translation. No split of T into whole voxels and a shift is needed for that, so the
reference does not borrow emrun's rounding. Everything is read from the zarr attributes
directly (zarr.json), not through emrun's readers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from emrun.cli import app
from emrun.io.write import write_volume

V0 = (8.0, 4.0, 4.0)
SHAPE = (8, 32, 32)
OFFSETS = [(0, 0, 0), (1, 3, 5)]
NN = "-1,0,0 0,-1,0 0,0,-1"


# ---------------------------------------------------------------- references

def ome(group: Path) -> tuple[list[tuple[str, list[float], list[float]]], dict | None]:
    """(path, z/y/x scale, z/y/x translation) of each dataset of the multiscale at ``group``
    and its ``metadata``, read from zarr.json."""
    attrs = json.loads((Path(group) / "zarr.json").read_text())["attributes"]
    ms = attrs["ome"]["multiscales"][0]
    out = []
    for d in ms["datasets"]:
        t = {x["type"]: x[x["type"]] for x in d["coordinateTransformations"]}
        scale = t["scale"]
        out.append((d["path"], scale[-3:], t.get("translation", [0.0] * len(scale))[-3:]))
    return out, ms.get("metadata")


def factors(shape: tuple[int, ...], voxel: tuple[float, ...], count: int) -> list[tuple]:
    """The README's rule: y and x halved every level; z only while its size is at most half
    of y's at the new level (and there is more than one section per window left)."""
    fz, fyx = 1, 1
    out = [(1, 1, 1)]
    for _ in range(count - 1):
        if shape[0] > fz and voxel[0] * fz <= voxel[1] * fyx * 2 / 2:
            fz *= 2
        fyx *= 2
        out.append((fz, fyx, fyx))
    return out


def centre(offset, f, v) -> list[float]:
    """Voxel 0's centre of a level of factor f over a level 0 at ``offset`` voxels of v nm."""
    return [(o + (k - 1) / 2) * s for o, k, s in zip(offset, f, v, strict=True)]


def output_levels(source_translation, source_voxel, shape, count):
    """The (scale, translation) of each level of an output made from a source level."""
    out = []
    for g in factors(shape, source_voxel, count):
        out.append(([s * k for s, k in zip(source_voxel, g, strict=True)],
                    [t + (k - 1) / 2 * s for t, k, s in
                     zip(source_translation, g, source_voxel, strict=True)]))
    return out


def check_output(group: Path, source: tuple[list[float], list[float]], shape, count):
    """Every level of the output at ``group`` where `output_levels` puts it; its stated
    shift consistent with level 0's translation."""
    got, meta = ome(group)
    want = output_levels(source[1], source[0], shape, count)
    assert len(got) == len(want)
    for (path, scale, tr), (w_scale, w_tr) in zip(got, want, strict=True):
        assert scale == pytest.approx(w_scale), (group, path)
        assert tr == pytest.approx(w_tr, abs=1e-6), (group, path, tr, w_tr)
    if meta and "emrun_shift_nm" in meta:  # level 0 = whole voxels + the stated shift
        whole = [(t - s) / v for t, s, v in
                 zip(got[0][2], meta["emrun_shift_nm"], got[0][1], strict=True)]
        assert whole == pytest.approx([round(w) for w in whole], abs=1e-6)


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def level_shape(k: int) -> tuple[int, ...]:
    f = factors(SHAPE, V0, 3)[k]
    return tuple(-(-n // g) for n, g in zip(SHAPE, f, strict=True))


# ---------------------------------------------------------------- sources

@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """in.zarr with three-level pyramids at each offset: a 3-d image, a (1, z, y, x) one, 3
    affinity channels, labels and a mask."""
    tmp = tmp_path_factory.mktemp("shift")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, SHAPE, dtype=np.uint8)
    aff = rng.random((3, *SHAPE)).astype(np.float32)
    labels = (np.arange(SHAPE[2])[None, None, :] // 8 + 1 + 4 * (np.arange(SHAPE[1])[
        None, :, None] // 16)).astype(np.uint64) * np.ones((SHAPE[0], 1, 1), np.uint64)
    for off in OFFSETS:
        tag = "".join(map(str, off))
        kw = {"voxel_size": V0, "offset": off, "levels": 3}
        write_volume(tmp / "in.zarr", f"img{tag}", image, **kw)
        write_volume(tmp / "in.zarr", f"one{tag}", image[None], channel_axis=True, **kw)
        write_volume(tmp / "in.zarr", f"aff{tag}", aff, channel_axis=True, **kw)
        write_volume(tmp / "in.zarr", f"lab{tag}", labels, label=True, **kw)
        write_volume(tmp / "in.zarr", f"mask{tag}", np.ones(SHAPE, np.uint8), label=False, **kw)
    return tmp


def group(store: Path, name: str) -> Path:
    return store / "in.zarr" / ("labels/" if name.startswith("lab") else "") / name


def source_level(store: Path, name: str, k: int) -> tuple[list[float], list[float]]:
    levels, _ = ome(group(store, name))
    return levels[k][1], levels[k][2]


@pytest.mark.parametrize("off", OFFSETS)
@pytest.mark.parametrize("kind", ["img", "one", "aff", "lab"])
def test_written_pyramid_levels_lie_on_the_centres_of_their_windows(store, kind, off):
    """The writer itself (the reference's starting point): level k at (o + (f-1)/2) * v."""
    levels, meta = ome(group(store, kind + "".join(map(str, off))))
    assert meta is None  # level 0 on whole voxels: nothing to state
    for (_, scale, tr), f in zip(levels, factors(SHAPE, V0, 3), strict=True):
        assert scale == pytest.approx([v * k for v, k in zip(V0, f, strict=True)])
        assert tr == pytest.approx(centre(off, f, V0), abs=1e-9)


# ---------------------------------------------------------------- data convert --level

@pytest.mark.parametrize("off", OFFSETS)
@pytest.mark.parametrize("kind", ["img", "one", "aff", "lab"])
def test_convert_a_coarser_level_keeps_its_translation_in_every_output_level(
        store, tmp_path, kind, off):
    name = kind + "".join(map(str, off))
    for k in (1, 2):
        out = tmp_path / f"c{k}.zarr"
        invoke("data", "convert", group(store, name), out, "--level", str(k), "--levels", "2")
        (written,) = [p.parent for p in out.rglob("zarr.json")
                      if p.parent != out and "multiscales" in json.loads(p.read_text())
                      .get("attributes", {}).get("ome", {})]
        check_output(written, source_level(store, name, k), level_shape(k), 2)
        np.testing.assert_array_equal(  # the data are the level's, unmoved
            zarr.open_array(str(written / "0"))[...],
            zarr.open_array(str(group(store, name) / str(k)))[...])
        root, _ = ome(out)  # the store's root names the image's levels where they lie
        assert root[0][2] == pytest.approx(ome(written)[0][0][2], abs=1e-9)


# ---------------------------------------------------------------- segment --level

SEGMENT_MODES = {
    "memory": ["--method", "cc", "--threshold", "0.5"],
    "block": ["--method", "cc", "--threshold", "0.5", "--block", "4", "8", "8"],
    "mws-block": ["--method", "mws", "--block", "4", "8", "8"],
    "waterz-two": ["--method", "waterz", "--threshold", "0.3", "--threshold", "0.6"],
    "scale": ["--method", "waterz", "--threshold", "0.5", "--scheduler", "local",
              "--workers", "1", "--block", "4", "8", "8"],
}


@pytest.mark.parametrize("off", OFFSETS)
@pytest.mark.parametrize("mode", list(SEGMENT_MODES))
def test_segment_a_coarser_level_writes_where_the_level_lies(store, tmp_path, mode, off):
    name = "aff" + "".join(map(str, off))
    out = tmp_path / "seg.zarr"
    invoke("segment", group(store, name), out, "--level", "1", "--levels", "2", "--offsets",
           NN, *SEGMENT_MODES[mode])
    source = source_level(store, name, 1)
    written = sorted(p.parent for p in (out / "labels").glob("*/zarr.json"))
    assert written and (mode != "scale" or {p.name for p in written} ==
                        {"fragments", "segmentation"})
    for volume in written:
        check_output(volume, source, level_shape(1), 2)
    root, _ = ome(out)
    assert root[0][2] == pytest.approx(source[1], abs=1e-9)


def test_segment_sweep_writes_its_best_where_the_level_lies(store, tmp_path):
    out = tmp_path / "sweep.zarr"
    invoke("segment", group(store, "aff135"), out, "--level", "1", "--levels", "2",
           "--offsets", NN, "--method", "waterz", "--sweep", "--truth",
           group(store, "lab135") / "1", "--threshold", "0.3,0.6", "--workers", "1")
    check_output(out / "labels/segmentation", source_level(store, "aff135", 1),
                 level_shape(1), 2)


def test_segment_mask_and_evaluate_at_the_same_coarser_level_are_accepted(store, tmp_path):
    """A mask and a truth of the affinities' level (the same shift) are on its grid: used,
    and the score counts the level's voxels; the output lies where the level lies."""
    out = tmp_path / "m.zarr"
    invoke("segment", group(store, "aff135"), out, "--level", "1", "--levels", "1",
           "--offsets", NN, "--method", "cc", "--threshold", "0.5",
           "--mask", group(store, "mask135") / "1")
    check_output(out / "labels/segmentation", source_level(store, "aff135", 1),
                 level_shape(1), 1)
    text = invoke("evaluate", out / "segmentation", group(store, "lab135") / "1", "--json")
    assert json.loads(text[text.index("{"):])["voxels"] == int(np.prod(level_shape(1)))


def unshifted_copy(store: Path, name: str, k: int, new: str) -> None:
    """Level k of ``name`` written again at its voxel size and whole-voxel offset, without
    its half-voxel shift: the same voxels lie half a level-0 voxel away (2 nm in y, x)."""
    from emrun.io import open_volume

    level = open_volume(str(group(store, name) / str(k)))
    assert level.shift_nm is not None and any(level.shift_nm)
    write_volume(store / "in.zarr", new, level.read(), voxel_size=level.voxel_size,
                 offset=level.offset, levels=1, label=name.startswith("lab"))
    moved, _ = ome(group(store, new) if not name.startswith("lab")
                   else store / "in.zarr/labels" / new)
    assert moved[0][2] != pytest.approx(source_level(store, name, k)[1])


def test_evaluate_warns_of_a_truth_whose_sub_voxel_shift_differs(store, tmp_path):
    """A truth a fraction of a voxel off the segmentation's grid (a pyramid level written
    without its half-voxel translation, as many tools write them) was scored voxel by voxel
    unsaid; it still is (the intent is ambiguous), with a warning naming both shifts."""
    unshifted_copy(store, "lab135", 1, "labflat")
    out = tmp_path / "s.zarr"
    invoke("segment", group(store, "aff135"), out, "--level", "1", "--levels", "1",
           "--offsets", NN, "--method", "cc", "--threshold", "0.5")
    result = CliRunner().invoke(app, ["evaluate", str(out / "segmentation"),
                                      str(store / "in.zarr/labels/labflat"), "--json"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.stderr.split())
    assert "warning:" in said and "a fraction of a voxel off the grid" in said
    same = CliRunner().invoke(app, ["evaluate", str(out / "segmentation"),
                                    str(group(store, "lab135")) + "/1", "--json"])
    assert same.exit_code == 0 and "fraction of a voxel" not in same.stderr, same.output


def test_segment_warns_of_a_mask_whose_sub_voxel_shift_differs(store, tmp_path):
    unshifted_copy(store, "mask135", 1, "maskflat")
    result = CliRunner().invoke(app, [
        "segment", str(group(store, "aff135")), str(tmp_path / "m.zarr"), "--level", "1",
        "--levels", "1", "--offsets", NN, "--method", "cc", "--threshold", "0.5",
        "--mask", str(store / "in.zarr/maskflat")])
    assert result.exit_code == 0, result.output
    assert "a fraction of a voxel off the grid" in " ".join(result.stderr.split())


# ---------------------------------------------------------------- view

def test_view_layer_of_a_coarser_level_shows_the_group_and_bounds_it_where_it_lies(store):
    from emrun.view import layer_for

    layer = layer_for(str(group(store, "img135") / "2"), set())
    assert layer.inner == "img135" and layer.voxel_size == V0  # the whole group, level 0's
    scale, translation = source_level(store, "img135", 2)
    assert list(layer.bounds_nm[0]) == pytest.approx(translation, abs=1e-9)
    assert [b - a for a, b in zip(*layer.bounds_nm, strict=True)] == pytest.approx(
        [n * s for n, s in zip(level_shape(2), scale, strict=True)])


# ---------------------------------------------------------------- precomputed scales

def write_precomputed(folder: Path, image: np.ndarray) -> None:
    """Two scales as neuroglancer / igneous make them: 4 x 4 x 40 nm at voxel_offset
    (x, y, z) 6, 4, 1, and its 2 x 2 in-plane mean at 8 x 8 x 40 nm, voxel_offset 3, 2, 1:
    voxel corners at voxel_offset * resolution, the same corner for both scales."""
    ts = pytest.importorskip("tensorstore")
    coarse = image.reshape(image.shape[0], image.shape[1] // 2, 2, image.shape[2] // 2, 2
                           ).mean(axis=(2, 4)).astype(np.uint8)
    for i, (data, vo) in enumerate([(image, [6, 4, 1]), (coarse, [3, 2, 1])]):
        store = ts.open({
            "driver": "neuroglancer_precomputed",
            "kvstore": {"driver": "file", "path": str(folder)},
            "multiscale_metadata": {"type": "image", "data_type": "uint8", "num_channels": 1},
            "scale_metadata": {"size": list(data.shape[::-1]), "resolution": [4 * 2**i] * 2
                               + [40], "voxel_offset": vo, "chunk_size": [8, 8, 4],
                               "encoding": "raw"},
            "create": True}).result()
        store[ts.d[:].translate_to[0]][...] = data.T[..., None]


def test_a_converted_precomputed_finest_scale_lies_at_its_voxel_offset(tmp_path):
    """Control: scale 0 converts to voxel_offset * resolution (emrun's voxel centre)."""
    image = np.random.default_rng(2).integers(0, 255, (4, 16, 16), dtype=np.uint8)
    write_precomputed(tmp_path / "pc", image)
    invoke("data", "convert", tmp_path / "pc/4_4_40", tmp_path / "fine.zarr", "--levels", "1")
    (level,), _ = ome(tmp_path / "fine.zarr/image")
    assert level[2] == pytest.approx([40.0, 16.0, 24.0])


def test_a_converted_coarser_precomputed_scale_keeps_its_half_voxel_shift(tmp_path):
    """Scale 1's voxel 0 spans scale 0's voxels 0-1 (same corner), so its centre lies half a
    scale-0 voxel past scale 0's voxel 0 centre: in emrun's frame (scale 0's centre at
    voxel_offset * resolution: 16, 24 nm in y, x) at 16 + 2 and 24 + 2 nm."""
    image = np.random.default_rng(3).integers(0, 255, (4, 16, 16), dtype=np.uint8)
    write_precomputed(tmp_path / "pc", image)
    invoke("data", "convert", tmp_path / "pc", tmp_path / "coarse.zarr", "--level", "40,8,8",
           "--levels", "1")
    (level,), _ = ome(tmp_path / "coarse.zarr/image")
    assert level[1] == pytest.approx([40.0, 8.0, 8.0])
    assert level[2] == pytest.approx([40.0, 18.0, 26.0])
