"""emrun's commands chained as a connectomics user chains them (train -> infer -> segment ->
evaluate, with data convert and view between): what one stage writes, the next
reads as meant; offsets, voxel sizes, boxes and masks agree from end to end, and the numbers
training reports are the numbers the commands reproduce."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import zarr
from typer.testing import CliRunner

from emrun.cli import app
from emrun.io import open_volume, write_volume
from emrun.synth import synthesize

runner = CliRunner()
CLIENT = "https://neuroglancer.example.org/"


def emrun(*args: object) -> str:
    """Run one emrun command in this process; its standard output (it must succeed)."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (args, result.output)
    return result.stdout


def scores(seg: object, truth: object, *extra: object) -> dict:
    """`emrun evaluate --json`'s figures."""
    return json.loads(emrun("evaluate", seg, truth, "--json", *extra).strip().splitlines()[-1])


def recipe_file(tmp: Path, text: str) -> Path:
    """A recipe file in ``tmp`` (dedented), as a user keeps one beside the data."""
    path = tmp / "recipe.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def validation_events(run: Path) -> dict:
    """The last validation record of a run's events.jsonl."""
    records = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    return [r["validation"] for r in records if "validation" in r][-1]


# ------------------------------------------------- training's validation, reproduced by hand

VALIDATED = """\
name: validated
data:
  sources:
    a: {{type: synthetic, shape: [16, 64, 64], seed: 1}}
  validation:
    b: {{image: {tmp}/v.zarr/image, labels: {tmp}/v.zarr/labels{roi}}}
model: {{type: rsunet, widths: [4, 8]}}
tasks:
  affinity:
    target: {{type: affinity}}
segment: {{type: cc}}
train:
  patch: [8, 32, 32]
  iterations: 2
  workers: 0
  validate_every: 2
  validate_in_background: false
"""


@pytest.mark.parametrize("box", [
    None,
    (4, 6),
])
def test_the_validation_score_is_what_infer_segment_and_evaluate_give(tmp_path, box):
    """The README: the validation box is 'predicted exactly as `emrun infer` would',
    segmented by `segment --sweep`'s function and scored as `evaluate --connected-truth`.
    So infer (the box, the checkpoint scored), segment (the recipe's segmenter at the logged
    value) and evaluate reproduce the logged adapted Rand error. With a validation `roi`
    (sections 4-9 here, as the shipped SNEMI3D recipe validates on sections 60-69) the box
    was predicted without the sections around it: 74 % of the affinities differed."""
    volume = synthesize((12, 48, 48), 5)
    write_volume(tmp_path / "v.zarr", "image", volume.image, voxel_size=(30, 6, 6))
    write_volume(tmp_path / "v.zarr", "labels", volume.labels, voxel_size=(30, 6, 6))
    roi = "" if box is None else f", roi: {{offset: [{box[0]}, 0, 0], shape: [{box[1]}, 48, 48]}}"
    recipe = recipe_file(tmp_path, VALIDATED.format(tmp=tmp_path, roi=roi))
    run = tmp_path / "run"
    emrun("train", recipe, "--run-dir", run, "--device", "cpu")
    logged = validation_events(run)
    infer_box = [] if box is None else ["--roi", f"{box[0]},0,0/{box[1]},48,48"]
    emrun("infer", "--checkpoint", run / "checkpoints/last.pt", "--input",
          tmp_path / "v.zarr/image", "--output", tmp_path / "p.zarr", "--device", "cpu",
          *infer_box)
    emrun("segment", tmp_path / "p.zarr/affinity", tmp_path / "s.zarr", "--threshold",
          logged["segment/threshold"])
    got = scores(tmp_path / "s.zarr/segmentation", tmp_path / "v.zarr/labels",
                 "--connected-truth")
    assert 0 < logged["arand"] < 1
    assert got["arand"] == pytest.approx(logged["arand"], rel=1e-9, abs=1e-12)
    assert got["voi_split"] == pytest.approx(logged["voi_split"], rel=1e-9, abs=1e-12)


def test_a_validation_source_of_another_intensity_scale_is_a_located_warning(tmp_path):
    """Validation predicts each source at its own `intensity` (seg_validation: source.low,
    source.high); `emrun infer` scales every input by the first training source's. A
    validation source of another scale therefore scores a prediction `emrun infer` never
    makes of it; two training sources of different scales are warned of, this was not."""
    recipe = recipe_file(tmp_path, """\
        name: scales
        data:
          sources:
            a: {image: a.npy, labels: l.npy, intensity: {low: 0, high: 4095}}
          validation:
            b: {image: b.npy, labels: l.npy, intensity: {low: 0, high: 255}}
        model: {type: rsunet, widths: [4, 8]}
        tasks:
          affinity:
            target: {type: affinity}
        train:
          patch: [8, 32, 32]
          iterations: 10
          validate_every: 5
        """)
    result = runner.invoke(app, ["validate", str(recipe), "--no-data"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert any("intensity" in line and "[0, 255]" in line for line in warnings), warnings


# ----------------------------------- offsets and voxel sizes through infer, segment, evaluate

ROI = ((2, 8, 4), (6, 32, 40))
VOXEL = (40.0, 4.0, 4.0)
OFFSET = (5, 10, 20)  # voxels


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint as `emrun train` leaves it (three iterations of a tiny recipe)."""
    tmp = tmp_path_factory.mktemp("trained")
    recipe = recipe_file(tmp, """\
        name: tiny
        data:
          sources:
            a: {type: synthetic, shape: [16, 64, 64], seed: 1}
        model: {type: rsunet, widths: [4, 8]}
        tasks:
          affinity:
            target: {type: affinity}
        segment: {type: cc}
        train:
          patch: [8, 32, 32]
          iterations: 3
          workers: 0
        infer: {dtype: float32}
        """)
    emrun("train", recipe, "--run-dir", tmp / "run", "--device", "cpu")
    return tmp / "run/checkpoints/last.pt"


def write_inputs(tmp: Path, form: str) -> tuple[str, str, tuple | None, tuple]:
    """An image and its truth in one format: (image, truth, voxel size, offset) as the
    format's metadata states them (TIFF states neither)."""
    volume = synthesize((12, 48, 48), 2)
    if form == "ome-zarr":
        write_volume(tmp / "v.zarr", "image", volume.image, voxel_size=VOXEL, offset=OFFSET)
        write_volume(tmp / "v.zarr", "labels", volume.labels, voxel_size=VOXEL, offset=OFFSET)
        return f"{tmp}/v.zarr/image", f"{tmp}/v.zarr/labels", VOXEL, OFFSET
    if form == "hdf5":  # the funlib convention: resolution and offset in nm
        with h5py.File(tmp / "v.h5", "w") as f:
            for name, data in (("raw", volume.image), ("gt", volume.labels)):
                dataset = f.create_dataset(name, data=data, chunks=(4, 16, 16))
                dataset.attrs["resolution"] = list(VOXEL)
                dataset.attrs["offset"] = [o * v for o, v in zip(OFFSET, VOXEL, strict=True)]
        return f"{tmp}/v.h5/raw", f"{tmp}/v.h5/gt", VOXEL, OFFSET
    tifffile.imwrite(tmp / "raw.tif", volume.image)
    tifffile.imwrite(tmp / "gt.tif", volume.labels)
    return f"{tmp}/raw.tif", f"{tmp}/gt.tif", None, (0, 0, 0)


@pytest.mark.parametrize("form", ["ome-zarr", "hdf5", "tiff"])
def test_a_roi_keeps_its_place_from_infer_to_evaluate(checkpoint, tmp_path, form):
    """infer --roi on an input placed by its metadata: the affinities and the segmentation
    lie at the input's offset plus the ROI's, at its voxel size; evaluate against the whole
    truth scores the truth's box under the ROI, the same figures as a truth cut to it by
    hand; `data convert` of the input changes no prediction."""
    image, truth, voxel, offset = write_inputs(tmp_path, form)
    (start, shape) = ROI
    roi = f"{','.join(map(str, start))}/{','.join(map(str, shape))}"
    emrun("infer", "--checkpoint", checkpoint, "--input", image, "--output",
          tmp_path / "p.zarr", "--roi", roi, "--device", "cpu")
    emrun("segment", tmp_path / "p.zarr/affinity", tmp_path / "s.zarr")
    placed = tuple(o + s for o, s in zip(offset, start, strict=True))
    affinities = open_volume(f"{tmp_path}/p.zarr/affinity")
    segmentation = open_volume(f"{tmp_path}/s.zarr/segmentation")
    for written in (affinities, segmentation):
        assert written.shape[-3:] == shape
        assert written.offset[-3:] == placed
        assert written.voxel_size is None if voxel is None else \
            tuple(written.voxel_size[-3:]) == voxel
    whole = scores(tmp_path / "s.zarr/segmentation", truth)
    cut = open_volume(truth).read()[tuple(slice(a, a + n) for a, n in zip(start, shape,
                                                                           strict=True))]
    np.save(tmp_path / "cut.npy", cut)
    by_hand = scores(tmp_path / "s.zarr/segmentation", tmp_path / "cut.npy")
    assert whole["voxels"] == int((cut != 0).sum()) > 0
    assert {k: whole[k] for k in ("arand", "voi", "segments", "truth_objects")} == \
        {k: by_hand[k] for k in ("arand", "voi", "segments", "truth_objects")}
    emrun("data", "convert", image, tmp_path / "c.zarr", "--image", "--levels", "1")
    emrun("infer", "--checkpoint", checkpoint, "--input", tmp_path / "c.zarr/image",
          "--output", tmp_path / "pc.zarr", "--roi", roi, "--device", "cpu")
    converted = open_volume(f"{tmp_path}/pc.zarr/affinity")
    assert np.array_equal(converted.read(), affinities.read())
    assert converted.offset == affinities.offset and converted.voxel_size == affinities.voxel_size


def affinities_of(labels: np.ndarray) -> np.ndarray:
    """uint8 nearest-neighbour affinities (z, y, x channels) of ``labels``, 0 on label 0
    and at the first voxel of each axis."""
    affs = np.zeros((3, *labels.shape), np.uint8)
    for axis in range(3):
        same = (labels == np.roll(labels, 1, axis=axis)) & (labels != 0)
        first = [slice(None)] * 3
        first[axis] = 0
        same[tuple(first)] = False
        affs[axis] = np.where(same, 230, 20)
    return affs


def test_affinities_converted_to_ome_zarr_segment_as_their_source_does(tmp_path):
    """Affinities from another tool (HDF5 with the `offsets` attribute segment reads), and
    an `emrun infer` output, converted with `data convert` (4-d sources are taken, all
    channels in each chunk): the converted volume segmented as its source was; it said
    "no 'offsets' attribute ... pass --offsets" instead."""
    labels = synthesize((8, 32, 32), 4).labels
    affs = affinities_of(labels)
    nearest = [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]
    with h5py.File(tmp_path / "a.h5", "w") as f:
        dataset = f.create_dataset("affs", data=affs)
        dataset.attrs["offsets"] = nearest
        dataset.attrs["resolution"] = [30, 6, 6]
    write_volume(tmp_path / "pred.zarr", "affinity", affs, channel_axis=True,
                 voxel_size=(30, 6, 6), attrs={"offsets": nearest})
    for source, out in ((tmp_path / "a.h5/affs", "h5"), (tmp_path / "pred.zarr/affinity",
                                                          "zarr")):
        emrun("segment", source, tmp_path / f"{out}-s.zarr", "--method", "cc")
        emrun("data", "convert", source, tmp_path / f"{out}-c.zarr", "--name", "affinity")
        converted = runner.invoke(app, ["segment", str(tmp_path / f"{out}-c.zarr/affinity"),
                                        str(tmp_path / f"{out}-cs.zarr"), "--method", "cc"])
        assert converted.exit_code == 0, converted.output
        assert np.array_equal(
            open_volume(f"{tmp_path}/{out}-cs.zarr/segmentation").read(),
            open_volume(f"{tmp_path}/{out}-s.zarr/segmentation").read())


# ---------------------------------------------------------------------- a mask, end to end

def test_a_larger_mask_means_one_box_in_infer_segment_and_evaluate(checkpoint, tmp_path):
    """A mask of the whole annotated region (larger than the image, placed by offsets):
    infer predicts only ROI blocks holding masked voxels, segment leaves 0 outside the mask,
    evaluate counts the labelled voxels inside it, each reading the mask at the same place."""
    volume = synthesize((12, 48, 48), 2)
    write_volume(tmp_path / "v.zarr", "image", volume.image[2:10, 4:44, 4:44],
                 voxel_size=(30, 6, 6), offset=(2, 4, 4))
    write_volume(tmp_path / "v.zarr", "labels", volume.labels, voxel_size=(30, 6, 6))
    mask = np.zeros((12, 48, 48), np.uint8)
    mask[:, :30, :] = 1  # rows 0-29 of the region: the ROI's first block of rows only
    write_volume(tmp_path / "v.zarr", "mask", mask, voxel_size=(30, 6, 6), label=False)
    emrun("infer", "--checkpoint", checkpoint, "--input", tmp_path / "v.zarr/image",
          "--output", tmp_path / "p.zarr", "--mask", tmp_path / "v.zarr/mask", "--roi",
          "1,2,2/6,36,36", "--block", "6", "24", "24", "--device", "cpu")
    affinities = open_volume(f"{tmp_path}/p.zarr/affinity")
    assert affinities.offset[-3:] == (3, 6, 6)
    rows = np.flatnonzero(affinities.read().any(axis=(0, 1, 3)))
    assert rows.tolist() == list(range(24))  # region rows 6-29; the block of 30-41 skipped
    emrun("segment", tmp_path / "p.zarr/affinity", tmp_path / "s.zarr", "--mask",
          tmp_path / "v.zarr/mask")
    seg = open_volume(f"{tmp_path}/s.zarr/segmentation").read()
    box = (slice(3, 9), slice(6, 42), slice(6, 42))
    assert np.array_equal(seg != 0, mask[box] != 0)
    got = scores(tmp_path / "s.zarr/segmentation", tmp_path / "v.zarr/labels", "--mask",
                 tmp_path / "v.zarr/mask")
    assert got["voxels"] == int(((volume.labels[box] != 0) & (mask[box] != 0)).sum())


def test_a_mask_of_the_roi_box_serves_infer_as_it_serves_segment_and_evaluate(
        checkpoint, tmp_path):
    """A mask made for the box being predicted (its OME offset places it exactly over the
    ROI): segment and evaluate take it for the ROI's affinities and segmentation; infer
    --roi refused it ('mask shape [6, 32, 40] differs from the input's [12, 48, 48]'),
    though it reads the mask only over the ROI's blocks (and, for non-finite input, their
    context: outside the mask is 0 there)."""
    image, truth, voxel, offset = write_inputs(tmp_path, "ome-zarr")
    (start, shape) = ROI
    placed = tuple(o + s for o, s in zip(offset, start, strict=True))
    write_volume(tmp_path / "m.zarr", "mask", np.ones(shape, np.uint8), voxel_size=voxel,
                 offset=placed, label=False)
    roi = f"{','.join(map(str, start))}/{','.join(map(str, shape))}"
    emrun("infer", "--checkpoint", checkpoint, "--input", image, "--output",
          tmp_path / "p.zarr", "--roi", roi, "--device", "cpu")
    emrun("segment", tmp_path / "p.zarr/affinity", tmp_path / "s.zarr", "--mask",
          tmp_path / "m.zarr/mask")
    assert scores(tmp_path / "s.zarr/segmentation", truth, "--mask",
                  tmp_path / "m.zarr/mask")["voxels"] > 0
    masked = runner.invoke(app, [str(a) for a in (
        "infer", "--checkpoint", checkpoint, "--input", image, "--output",
        tmp_path / "pm.zarr", "--roi", roi, "--mask", tmp_path / "m.zarr/mask", "--device",
        "cpu")])
    assert masked.exit_code == 0, masked.output
    assert np.array_equal(open_volume(f"{tmp_path}/pm.zarr/affinity").read(),
                          open_volume(f"{tmp_path}/p.zarr/affinity").read())


@pytest.mark.parametrize("fragments", ["watershed", "mws"])
def test_at_scale_a_larger_mask_is_read_where_the_affinities_lie(tmp_path, fragments):
    """Affinities of a ROI (offset 3, 6, 6) and a mask of the whole region (placed by the
    offsets): in memory and block by block the output is 0 exactly outside the mask; with
    --scheduler local 1,296 voxels outside it (rows 24-29 of the ROI, the mask's rows 24-29
    instead of 30-35) were segmented."""
    volume = synthesize((12, 48, 48), 2)
    mask = np.zeros((12, 48, 48), np.uint8)
    mask[:, :30, :] = 1
    write_volume(tmp_path / "v.zarr", "mask", mask, voxel_size=(30, 6, 6), label=False)
    box = (slice(3, 9), slice(6, 42), slice(6, 42))
    write_volume(tmp_path / "p.zarr", "affinity", affinities_of(volume.labels)[(slice(None),
                                                                                *box)],
                 channel_axis=True, voxel_size=(30, 6, 6), offset=(3, 6, 6),
                 attrs={"offsets": [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]})
    inside = mask[box] != 0
    emrun("segment", tmp_path / "p.zarr/affinity", tmp_path / "m.zarr", "--method", "cc",
          "--mask", tmp_path / "v.zarr/mask")
    assert np.array_equal(open_volume(f"{tmp_path}/m.zarr/segmentation").read() != 0, inside)
    emrun("segment", tmp_path / "p.zarr/affinity", tmp_path / "g.zarr", "--scheduler",
          "local", "--workers", "1", "--threshold", "0.5", "--fragments", fragments,
          "--mask", tmp_path / "v.zarr/mask")
    for name in ("fragments", "segmentation"):
        at_scale = open_volume(f"{tmp_path}/g.zarr/labels/{name}").read()
        assert np.array_equal(at_scale != 0, inside), name


# -------------------------------------------------------------------- 2-d data, end to end

def test_one_section_data_trains_infers_segments_and_scores(tmp_path):
    """z = 1 throughout: a 2-d recipe (patch one section deep, offsets in y and x only)
    trains, predicts two channels, segments in memory and at scale, and is scored."""
    volume = synthesize((3, 96, 96), 2)
    np.save(tmp_path / "image.npy", volume.image[1:2])
    np.save(tmp_path / "labels.npy", volume.labels[1:2])
    recipe = recipe_file(tmp_path, f"""\
        name: flat
        data:
          sources:
            a: {{image: {tmp_path}/image.npy, labels: {tmp_path}/labels.npy}}
        model: {{type: rsunet, widths: [4, 8], downsample: [[1, 2, 2]]}}
        tasks:
          affinity:
            target: {{type: affinity, offsets: [[0, -1, 0], [0, 0, -1]]}}
        segment: {{type: cc}}
        train:
          patch: [1, 32, 32]
          iterations: 2
          workers: 0
        """)
    emrun("train", recipe, "--run-dir", tmp_path / "run", "--device", "cpu")
    emrun("infer", "--checkpoint", tmp_path / "run/checkpoints/last.pt", "--input",
          tmp_path / "image.npy", "--output", tmp_path / "p.zarr", "--device", "cpu")
    assert open_volume(f"{tmp_path}/p.zarr/affinity").shape == (2, 1, 96, 96)
    emrun("segment", tmp_path / "p.zarr/affinity", tmp_path / "s.zarr")
    emrun("segment", tmp_path / "p.zarr/affinity", tmp_path / "s.zarr", "--scheduler",
          "local", "--workers", "1", "--threshold", "0.5", "--name", "graph")
    labelled = int((volume.labels[1] != 0).sum())
    for name in ("segmentation", "graph"):
        seg = open_volume(f"{tmp_path}/s.zarr/labels/{name}")
        assert seg.shape == (1, 96, 96)
        assert scores(tmp_path / f"s.zarr/labels/{name}", tmp_path / "labels.npy")[
            "voxels"] == labelled


# ------------------------------------------------------------------ view of every stage

def test_view_shows_each_stage_s_output_where_the_chain_put_it(checkpoint, tmp_path):
    """The input, its affinities over a ROI, the in-memory segmentation and the at-scale
    fragments and segmentation: one layer each, of the right kind, at the input's voxel
    size (neuroglancer reads the offsets from the OME metadata the stages wrote)."""
    from emrun.view import view

    image, _, voxel, _ = write_inputs(tmp_path, "ome-zarr")
    emrun("infer", "--checkpoint", checkpoint, "--input", image, "--output",
          tmp_path / "p.zarr", "--roi", "2,8,4/6,32,40", "--device", "cpu")
    emrun("segment", tmp_path / "p.zarr/affinity", tmp_path / "s.zarr")
    emrun("segment", tmp_path / "p.zarr/affinity", tmp_path / "g.zarr", "--scheduler",
          "local", "--workers", "1", "--threshold", "0.5")
    paths = [image, f"{tmp_path}/p.zarr/affinity", f"{tmp_path}/s.zarr/segmentation",
             f"{tmp_path}/g.zarr/labels/fragments", f"{tmp_path}/g.zarr/labels/segmentation"]
    shown = view(paths, client=CLIENT)
    try:
        assert [layer.kind for layer in shown.layers] == [
            "image", "channels", "segmentation", "segmentation", "segmentation"]
        assert {layer.voxel_size for layer in shown.layers} == {voxel}
        for layer in shown.layers:
            translation = zarr.open_group(str(layer.store / layer.inner)).attrs["ome"][
                "multiscales"][0]["datasets"][0]["coordinateTransformations"][1]["translation"]
            want = [(o + s) * v for o, s, v in zip(OFFSET, (2, 8, 4), VOXEL, strict=True)] \
                if layer.kind != "image" else [o * v for o, v in zip(OFFSET, VOXEL,
                                                                      strict=True)]
            assert translation[-3:] == pytest.approx(want)
    finally:
        shown.close()
