"""Probes of inference planning and writing against references written here.

The block plan (`emrun.infer.plan.Layout`) is checked against brute force over the lattice;
whole jobs (`prepare_job` + `run_local`, one in-process worker, stand-in networks from
`test_infer_probe`) on odd shapes, unaligned ROIs, masks that empty whole blocks and parts
of blocks, blocks that divide nothing, anisotropic patches, one-section inputs and placed
inputs are compared voxel by voxel with an independent sliding window, each chunk's writes
are counted, the output's place is read back from its metadata, and a run stopped after a
few blocks and resumed is compared bit for bit with one that was not.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from test_infer_probe import (
    Lopsided,
    make_network,
    make_pointwise,
    probe_recipe,
    read,
    sliding_window,
    window_of,
)

from emrun.errors import UserError
from emrun.geometry import Roi
from emrun.infer import worker as worker_module
from emrun.infer.job import Job, finish_job, prepare_job, release_job
from emrun.infer.plan import Layout, choose_chunks_and_block
from emrun.infer.schedule import run_local
from emrun.io import open_volume
from emrun.io.write import write_volume
from emrun.registry import models

# ---------------------------------------------------------------------------------------
# helpers


def weights(recipe, folder: Path) -> Path:
    """One checkpoint per folder (a resumption refuses another checkpoint's digest)."""
    path = folder / "c.pt"
    if not path.exists():
        torch.manual_seed(0)
        model = models.build(recipe.model, head_channels=recipe.head_channels())
        torch.save({"model": model.state_dict(), "iteration": 1}, path)
    return path


class Stop(Exception):
    pass


def run(recipe, folder: Path, source: str, output: Path, *, factory=make_network,
        stop_after: int | None = None, **options):
    """A whole job with one in-process worker; ``stop_after``: raise after that many blocks
    are reported done (as an interrupted run), leaving the output unfinished."""
    def on_block(progress):
        if stop_after is not None and progress.done >= stop_after:
            raise Stop

    job = prepare_job(recipe, weights(recipe, folder), source, output, **options)
    try:
        progress = run_local(job, [("cpu", 1)], on_block=on_block, model=factory)
        finish_job(job)
    finally:
        release_job(job)
    return job, progress


class Recording:
    """An output array that records each region written into it."""

    def __init__(self, name, array, writes):
        self.name, self.array, self.writes = name, array, writes
        self.shape = array.shape

    def __setitem__(self, key, value):
        self.writes.append((self.name, tuple((k.start, k.stop) for k in key[1:])))
        self.array[key] = value


def record_writes(monkeypatch) -> list:
    writes: list = []
    opened = worker_module.open_output_arrays
    monkeypatch.setattr(worker_module, "open_output_arrays", lambda job: {
        n: Recording(n, a, writes) for n, a in opened(job).items()})
    return writes


def block_boxes(shape, block):
    """(index, slices) of each write block, z-major, the last cut short at the end."""
    counts = [math.ceil(n / b) for n, b in zip(shape, block, strict=True)]
    for index in itertools.product(*(range(c) for c in counts)):
        yield index, tuple(slice(i * b, min((i + 1) * b, n))
                           for i, b, n in zip(index, block, shape, strict=True))


def diagonal_mask(shape, cut: float) -> np.ndarray:
    """1 where z/shape_z + y/shape_y + x/shape_x < cut: whole blocks inside near the origin,
    whole blocks outside at the far corner, blocks cut by the plane between."""
    grid = np.meshgrid(*(np.arange(n) / n for n in shape), indexing="ij")
    return (sum(grid) < cut).astype(np.uint8)


def cutting_mask(shape, block, cuts) -> np.ndarray:
    """The first `diagonal_mask` of ``cuts`` that empties some blocks and cuts others."""
    for cut in cuts:
        mask = diagonal_mask(shape, cut)
        inside = [mask[s].any() for _, s in block_boxes(shape, block)]
        whole = [mask[s].all() for _, s in block_boxes(shape, block)]
        if not all(inside) and any(i and not w for i, w in zip(inside, whole, strict=True)):
            return mask
    raise AssertionError(f"no cut of {cuts} suits {shape} in blocks of {block}")


def translation_and_scale(group: Path, level: int = 0):
    attrs = json.loads((group / "zarr.json").read_text())["attributes"]["ome"]
    dataset = attrs["multiscales"][0]["datasets"][level]
    found = {t["type"]: t[t["type"]] for t in dataset["coordinateTransformations"]}
    return found.get("translation"), found["scale"]


# ---------------------------------------------------------------------------------------
# the plan against brute force

def random_layouts(count: int, seed: int):
    rng = np.random.default_rng(seed)
    made = 0
    while made < count:
        shape = tuple(int(v) for v in rng.integers(1, 30, 3))
        patch = tuple(int(v) for v in rng.integers(1, 12, 3))
        stride = tuple(int(rng.integers(1, p + 1)) for p in patch)
        chunks = tuple(int(v) for v in rng.integers(1, 8, 3))
        block = tuple(c * int(rng.integers(1, 4)) for c in chunks)
        made += 1
        yield Layout(shape, patch, stride, chunks, block)


def brute_starts(layout: Layout, axis: int) -> list[int]:
    """From the origin in steps of the stride until the axis is covered (as documented)."""
    p, s, n = layout.patch[axis], layout.stride[axis], layout.shape[axis]
    starts = [-((p - s) // 2)]
    while starts[-1] + p < n:
        starts.append(starts[-1] + s)
    return starts


@pytest.mark.parametrize("seed", range(4))
def test_the_plan_agrees_with_brute_force_over_the_lattice(seed):
    """Starts, covering patches, write and read boxes, owners, owned boxes and the blocks
    reached, for random layouts (blocks smaller and larger than patches and volumes)."""
    for layout in random_layouts(8, seed):
        lattice = [brute_starts(layout, a) for a in range(3)]
        assert [layout.starts(a) for a in range(3)] == lattice
        # starts_within, fractional bounds included
        for a in range(3):
            for low, high in itertools.product(
                    (-math.inf, -3.5, -1, 0, 0.5, 2, 2.5, 7), (-1, 0, 1.5, 3, 9, 40, math.inf)):
                want = [s for s in lattice[a] if low <= s < high]
                assert list(layout.starts_within(a, low, high)) == want, (layout, a, low, high)
        covered = np.zeros(layout.shape, np.int32)
        owned_all = []
        grid = layout.block_grid()
        boxes = {b: layout.write_box(b) for b in grid}
        for block in layout.block_grid():
            box = layout.write_box(block)
            cut = tuple(slice(b, e) for b, e in zip(box.begin, box.end, strict=True))
            covered[cut] += 1
            assert all(b % c == 0 for b, c in zip(box.begin, layout.chunks, strict=True))
            patches = [p for p in itertools.product(*lattice)
                       if all(s < e and s + q > b for s, q, b, e in zip(
                           p, layout.patch, box.begin, box.end, strict=True))]
            assert layout.patches(block) == patches
            read = layout.read_box(block)
            assert tuple(read.begin) == tuple(min(p[a] for p in patches) for a in range(3))
            assert tuple(read.end) == tuple(max(p[a] for p in patches) + layout.patch[a]
                                            for a in range(3))
            assert layout.owners(block) == sorted({layout.owner(p) for p in patches})
            owned = layout.owned_patches(block)
            owned_all += owned
            assert all(layout.owner(p) == block for p in owned)
            owned_box = layout.owned_box(block)
            if not owned:
                assert owned_box is None
                continue
            low = [max(0, min(p[a] for p in owned)) for a in range(3)]
            high = [min(n, max(p[a] for p in owned) + layout.patch[a])
                    for a, n in enumerate(layout.shape)]
            assert (tuple(owned_box.begin), tuple(owned_box.end)) == (tuple(low), tuple(high))
            reached = {b for b in grid if any(_touches(layout, p, boxes[b]) for p in owned)}
            assert layout.reached(block) == sorted(reached - {block})
        assert (covered == 1).all()  # write boxes tile the volume once
        assert sorted(owned_all) == sorted(itertools.product(*lattice))  # one owner each


def _touches(layout, patch, box) -> bool:
    return all(s < e and s + q > b for s, q, b, e in zip(patch, layout.patch, box.begin,
                                                          box.end, strict=True))


@pytest.mark.parametrize("seed", range(3))
def test_chosen_chunks_and_blocks_always_make_a_layout(seed):
    """Any shape, patch and stride with default chunks and a default or user block (one
    that divides nothing, one larger than the volume): chunks tile the block, no chunk is
    longer than its axis, and a user's block is kept where it does not span its axis."""
    rng = np.random.default_rng(10 + seed)
    for _ in range(300):
        shape = tuple(int(v) for v in rng.integers(1, 700, 3))
        patch = tuple(int(v) for v in rng.integers(1, 80, 3))
        stride = tuple(int(rng.integers(1, p + 1)) for p in patch)
        given = None if rng.random() < 0.3 else tuple(
            int(rng.integers(min(s, n), 2 * n + 2)) for s, n in zip(stride, shape, strict=True))
        chunks, block = choose_chunks_and_block(shape, patch, stride, None, given)
        Layout(shape, patch, stride, chunks, block)
        assert all(c <= n for c, n in zip(chunks, shape, strict=True)), (shape, given, chunks)
        if given is not None:
            assert all(b == g for b, g, n in zip(block, given, shape, strict=True) if g < n)


# ---------------------------------------------------------------------------------------
# whole jobs against the sliding window

CASES = {
    # name: shape, patch, stride, block, roi (offset, shape) or None, input offset, voxel size
    "odd-shape": ((7, 23, 19), (3, 7, 5), (2, 5, 4), (3, 10, 7), None, (2, 3, 4),
                  (40.0, 4.0, 4.0)),
    "unaligned-roi": ((9, 31, 26), (4, 8, 8), (3, 6, 5), (3, 6, 8),
                      ((2, 5, 3), (5, 17, 21)), (1, 0, 7), (30.0, 6.0, 6.0)),
    "one-section": ((1, 29, 33), (1, 8, 8), (1, 6, 5), (1, 9, 11), None, (5, 1, 2),
                    (50.0, 5.0, 5.0)),
    "one-section-thick-patch": ((1, 29, 33), (4, 8, 8), (3, 6, 5), (1, 9, 11),
                                ((0, 3, 4), (1, 20, 27)), (0, 0, 0), (50.0, 5.0, 5.0)),
    "anisotropic-patch": ((5, 25, 14), (1, 12, 4), (1, 7, 3), (2, 13, 5), None, (0, 0, 0),
                          (40.0, 4.0, 8.0)),
    "one-voxel-last-blocks": ((5, 25, 17), (3, 8, 8), (2, 6, 5), (2, 6, 8),
                              ((0, 0, 0), (5, 25, 17)), (0, 4, 0), (30.0, 6.0, 6.0)),
    "block-beyond-volume": ((5, 25, 14), (4, 6, 6), (3, 4, 4), (16, 8, 64),
                            ((1, 2, 1), (4, 21, 13)), (3, 3, 3), (8.0, 8.0, 8.0)),
}


@pytest.fixture(params=sorted(CASES))
def case(request, tmp_path):
    shape, patch, stride, block, roi, offset, voxel = CASES[request.param]
    image = (0.05 + 0.9 * np.random.default_rng(len(request.param)).random(shape)
             ).astype(np.float32)  # no voxel at 0: no blank block
    write_volume(tmp_path / "in.zarr", "image", image, voxel_size=voxel, offset=offset)
    return dict(name=request.param, image=image, patch=patch, stride=stride, block=block,
                roi=roi, offset=offset, voxel=voxel, tmp=tmp_path)


def _reference(case, network):
    roi = case["roi"] or ((0, 0, 0), case["image"].shape)
    recipe = probe_recipe(case["patch"], stride=case["stride"])
    return sliding_window(case["image"], network, case["patch"], case["stride"],
                          window_of(recipe), offset=roi[0], shape=roi[1]), roi


def test_every_voxel_is_written_once_with_the_reference_value(case, monkeypatch):
    """No mask: every block is predicted, every voxel written by exactly one write of one
    block, chunk-aligned, and equal to the sliding window; the output lies where the
    input (or its ROI) lies, on the input's voxel size."""
    tmp = case["tmp"]
    recipe = probe_recipe(case["patch"], stride=case["stride"])
    writes = record_writes(monkeypatch)
    roi = Roi(*case["roi"]) if case["roi"] else None
    out = tmp / "o.zarr"
    job, progress = run(recipe, tmp, str(tmp / "in.zarr/image"), out, block=case["block"],
                        roi=roi)
    want, (roi_offset, roi_shape) = _reference(case, Lopsided())
    for task in ("aff", "dist"):
        got = read(out, task)
        assert got.shape[1:] == tuple(roi_shape)
        np.testing.assert_allclose(got, want[task], atol=2e-6, rtol=0)
        regions = [r for n, r in writes if n == task]
        assert len(regions) == len(set(regions)) == len(job.layout.block_grid())
        count = np.zeros(roi_shape, np.int32)
        for region in regions:
            count[tuple(slice(a, b) for a, b in region)] += 1
            assert all(a % c == 0 for (a, _), c in zip(region, job.layout.chunks, strict=True))
        assert (count == 1).all()
    lattice_patches = math.prod(len(brute_starts(job.layout, a)) for a in range(3))
    assert progress.patches == lattice_patches and progress.empty == 0
    assert progress.voxels == math.prod(roi_shape)
    placed = tuple(o + r for o, r in zip(case["offset"], roi_offset, strict=True))
    for task in ("aff", "dist"):
        written = open_volume(str(out / task))
        assert written.offset[-3:] == placed and written.voxel_size == case["voxel"]
        translation, scale = translation_and_scale(out / task)
        assert scale[-3:] == list(case["voxel"])
        want = [p * v for p, v in zip(placed, case["voxel"], strict=True)]
        assert (translation or [0, 0, 0, 0])[-3:] == want


def test_a_mask_that_empties_whole_and_part_blocks(case, monkeypatch):
    """Blocks with no mask voxel store nothing and read 0; blocks the mask cuts are
    predicted whole (inside and outside the mask), with the blocks beside skipped owners
    still getting those owners' patches: every predicted voxel equals the sliding window."""
    tmp, image = case["tmp"], case["image"]
    roi_offset, roi_shape = case["roi"] or ((0, 0, 0), image.shape)
    mask = np.zeros(image.shape, np.uint8)
    cut = tuple(slice(o, o + n) for o, n in zip(roi_offset, roi_shape, strict=True))
    mask[cut] = cutting_mask(roi_shape, case["block"], (1.2, 0.9, 0.7, 0.5))
    write_volume(tmp / "in.zarr", "mask", mask, voxel_size=case["voxel"],
                 offset=case["offset"])
    recipe = probe_recipe(case["patch"], stride=case["stride"])
    writes = record_writes(monkeypatch)
    out = tmp / "m.zarr"
    job, progress = run(recipe, tmp, str(tmp / "in.zarr/image"), out, block=case["block"],
                        roi=Roi(*case["roi"]) if case["roi"] else None,
                        mask_path=str(tmp / "in.zarr/mask"))
    block = job.layout.block
    inside_box = mask[cut]
    empty = [i for i, s in block_boxes(roi_shape, block) if not inside_box[s].any()]
    cut_blocks = [i for i, s in block_boxes(roi_shape, block)
                  if inside_box[s].any() and not inside_box[s].all()]
    assert empty and cut_blocks  # as `cutting_mask` chose it
    assert progress.empty == len(empty)
    assert sorted(b for b in job.layout.block_grid() if job.is_empty(b)) == sorted(empty)
    want, _ = _reference(case, Lopsided())
    for task in ("aff", "dist"):
        expected = want[task].copy()
        for index, s in block_boxes(roi_shape, block):
            if index in empty:
                expected[(slice(None), *s)] = 0
        np.testing.assert_allclose(read(out, task), expected, atol=2e-6, rtol=0)
        regions = [r for n, r in writes if n == task]
        assert len(regions) == len(set(regions)) == \
            len(job.layout.block_grid()) - len(empty)
    stored = zarr.open_array(str(out / "dist" / "0"), mode="r")
    assert stored.nchunks_initialized < stored.nchunks


@pytest.mark.parametrize("stops", [(1,), (2, 3)], ids=["once", "twice"])
def test_a_resumed_run_is_the_uninterrupted_one_bit_for_bit(case, stops):
    """Stopped after a few blocks (once, or twice), then resumed: the same bits as a run
    that was not stopped, under a ROI and a mask that cuts blocks."""
    tmp, image = case["tmp"], case["image"]
    roi_offset, roi_shape = case["roi"] or ((0, 0, 0), image.shape)
    mask = np.zeros(image.shape, np.uint8)
    cut = tuple(slice(o, o + n) for o, n in zip(roi_offset, roi_shape, strict=True))
    mask[cut] = cutting_mask(roi_shape, case["block"], (1.6, 1.1, 0.9, 0.7))
    write_volume(tmp / "in.zarr", "mask", mask, voxel_size=case["voxel"],
                 offset=case["offset"])
    recipe = probe_recipe(case["patch"], stride=case["stride"])
    options = dict(block=case["block"], roi=Roi(*case["roi"]) if case["roi"] else None,
                   mask_path=str(tmp / "in.zarr/mask"))
    source = str(tmp / "in.zarr/image")
    job, _ = run(recipe, tmp, source, tmp / "straight.zarr", **options)
    total = len(job.layout.block_grid())
    out = tmp / "stopped.zarr"
    done = 0
    for i, after in enumerate(stops):
        if done + after >= total:
            break
        with pytest.raises(Stop):
            run(recipe, tmp, source, out, stop_after=after, resume=i > 0, **options)
        done += after
    _, last = run(recipe, tmp, source, out, resume=True, **options)
    assert last.skipped >= min(done, total - 1) and last.done + last.skipped == total
    for task in ("aff", "dist"):
        a, b = read(out, task), read(tmp / "straight.zarr", task)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), task
    assert open_volume(str(out / "dist")).shape[1:] == tuple(roi_shape)  # finished


def test_a_pointwise_network_is_its_own_function_everywhere(case):
    """A network of each voxel alone: blending changes nothing, at any border, in any
    block, at any ROI (a check that needs no sliding window)."""
    tmp, image = case["tmp"], case["image"]
    recipe = probe_recipe(case["patch"], stride=case["stride"])
    out = tmp / "p.zarr"
    run(recipe, tmp, str(tmp / "in.zarr/image"), out, block=case["block"],
        roi=Roi(*case["roi"]) if case["roi"] else None, factory=make_pointwise)
    roi_offset, roi_shape = case["roi"] or ((0, 0, 0), image.shape)
    box = image[tuple(slice(o, o + n) for o, n in zip(roi_offset, roi_shape, strict=True))]
    np.testing.assert_allclose(read(out, "dist")[0], 1.5 * box - 0.25, atol=2e-6, rtol=0)
    shift = np.arange(3).reshape(3, 1, 1, 1) / 10
    np.testing.assert_allclose(read(out, "aff"), box[None] + shift, atol=2e-6, rtol=0)


# ---------------------------------------------------------------------------------------
# single cases


def test_a_two_dimensional_array_is_refused_in_one_line(tmp_path):
    """A (y, x) image (one section stored without its z axis: a .npy, a one-page TIFF) is
    named as such before any output exists (the input must be z, y, x, as documented)."""
    tifffile = pytest.importorskip("tifffile")
    np.save(tmp_path / "flat.npy", np.full((13, 17), 0.5, np.float32))
    tifffile.imwrite(tmp_path / "flat.tif", np.full((13, 17), 100, np.uint8))
    recipe = probe_recipe((1, 8, 8), stride=(1, 6, 5))
    for name in ("flat.npy", "flat.tif"):
        with pytest.raises(UserError, match=r"needs a 3D \(z, y, x\) volume, got shape "
                           r"\[13, 17\]"):
            run(recipe, tmp_path, str(tmp_path / name), tmp_path / "o.zarr")
        assert not (tmp_path / "o.zarr").exists()


def test_a_job_description_keeps_the_roi_and_levels(tmp_path):
    """What a remote worker gets: the ROI's place and the pyramid's levels survive JSON,
    and so does the done-marker folder (keyed by the ROI)."""
    image = (0.1 + 0.8 * np.random.default_rng(4).random((6, 21, 17))).astype(np.float32)
    write_volume(tmp_path / "in.zarr", "image", image, voxel_size=(30, 6, 6), offset=(1, 2, 3))
    recipe = probe_recipe((4, 8, 8), stride=(3, 6, 5))
    job = prepare_job(recipe, weights(recipe, tmp_path), str(tmp_path / "in.zarr/image"),
                      tmp_path / "o.zarr", block=(3, 6, 10), roi=Roi((1, 4, 2), (5, 15, 13)),
                      levels=2)
    try:
        again = Job.from_json(job.to_json())
        assert again.roi_offset == (1, 4, 2) and again.levels == 2
        assert again.layout == job.layout and again.done_dir == job.done_dir
        assert again.pending() == job.layout.block_grid()
    finally:
        release_job(job)


def test_the_pyramid_of_a_placed_output_lies_over_its_full_resolution(tmp_path):
    """Level 1 of an output made from a placed input: its voxel size is level 0's times
    the factor, and its translation puts its voxels' centres at the middle of the level-0
    voxels each averages (OME-Zarr: translation + scale x index)."""
    image = (0.1 + 0.8 * np.random.default_rng(5).random((6, 24, 20))).astype(np.float32)
    write_volume(tmp_path / "in.zarr", "image", image, voxel_size=(40, 4, 4), offset=(2, 3, 5))
    recipe = probe_recipe((4, 8, 8), stride=(3, 6, 5))
    out = tmp_path / "o.zarr"
    run(recipe, tmp_path, str(tmp_path / "in.zarr/image"), out, factory=make_pointwise,
        roi=Roi((1, 1, 3), (5, 22, 16)), levels=2)
    t0, s0 = translation_and_scale(out / "dist", 0)
    t1, s1 = translation_and_scale(out / "dist", 1)
    assert t0[-3:] == [3 * 40, 4 * 4, 8 * 4]
    factor = [b / a for a, b in zip(s0[-3:], s1[-3:], strict=True)]
    assert all(f in (1, 2) for f in factor) and factor != [1, 1, 1]
    for a in range(3):
        assert t1[-3 + a] == pytest.approx(t0[-3 + a] + (factor[a] - 1) * s0[-3 + a] / 2)


@pytest.mark.parametrize("seed", range(3))
def test_random_jobs_match_the_sliding_window(tmp_path, seed):
    """Random small volumes, patches, strides, blocks, ROIs and masks (placed over the ROI
    box by their offset): the output equals the sliding window where blocks hold a mask
    voxel, and 0 in the others."""
    rng = np.random.default_rng(100 + seed)
    for trial in range(3):
        shape = tuple(int(v) for v in rng.integers(1, 20, 3))
        patch = tuple(int(v) for v in rng.integers(1, 9, 3))
        stride = tuple(int(rng.integers(1, p + 1)) for p in patch)
        roi_offset = tuple(int(rng.integers(0, n)) for n in shape)
        roi_shape = tuple(int(rng.integers(1, n - o + 1)) for o, n in zip(roi_offset, shape,
                                                                         strict=True))
        block = tuple(int(rng.integers(min(s, n), n + 3)) for s, n in zip(stride, roi_shape,
                                                                         strict=True))
        offset = tuple(int(v) for v in rng.integers(0, 5, 3))
        image = (0.05 + 0.9 * rng.random(shape)).astype(np.float32)
        folder = tmp_path / str(trial)
        folder.mkdir()
        write_volume(folder / "in.zarr", "image", image, voxel_size=(40, 4, 4), offset=offset)
        mask = (rng.random(roi_shape) < 0.02).astype(np.uint8)
        write_volume(folder / "in.zarr", "mask", mask, voxel_size=(40, 4, 4),
                     offset=tuple(o + r for o, r in zip(offset, roi_offset, strict=True)))
        recipe = probe_recipe(patch, stride=stride)
        what = (shape, patch, stride, roi_offset, roi_shape, block, offset)
        try:
            job, _ = run(recipe, folder, str(folder / "in.zarr/image"), folder / "o.zarr",
                         block=block, roi=Roi(roi_offset, roi_shape),
                         mask_path=str(folder / "in.zarr/mask"))
        except UserError as exc:  # a chosen layout refused: say which
            raise AssertionError(f"{what}: {exc}") from None
        want = sliding_window(image, Lopsided(), patch, stride, window_of(recipe),
                              offset=roi_offset, shape=roi_shape)
        for _, cut in block_boxes(roi_shape, job.layout.block):
            if not mask[cut].any():
                for task in want:
                    want[task][(slice(None), *cut)] = 0
        for task in ("aff", "dist"):
            np.testing.assert_allclose(read(folder / "o.zarr", task), want[task], atol=2e-6,
                                       rtol=0, err_msg=str(what))


def test_a_level_of_an_input_under_a_roi_keeps_the_level_s_place(tmp_path):
    """--level with --roi: the output lies at the level's offset plus the box's, on the
    level's voxel size, keeping the level's sub-voxel shift, and holds the level's voxels."""
    from emrun.io import choose_level

    image = (0.1 + 0.8 * np.random.default_rng(8).random((6, 26, 30))).astype(np.float32)
    write_volume(tmp_path / "ms.zarr", "image", image, voxel_size=(30, 6, 6), offset=(1, 3, 5),
                 levels=2)
    path = choose_level(str(tmp_path / "ms.zarr/image"), "30,12,12")
    level = open_volume(path)
    recipe = probe_recipe((4, 8, 8), stride=(3, 6, 5))
    roi = Roi((1, 2, 3), (4, 9, 11))
    run(recipe, tmp_path, path, tmp_path / "o.zarr", factory=make_pointwise, roi=roi,
        block=(3, 6, 5))
    written = open_volume(str(tmp_path / "o.zarr/dist"))
    assert written.voxel_size == level.voxel_size
    assert written.offset[-3:] == tuple(o + r for o, r in zip(level.offset[-3:], roi.offset,
                                                               strict=True))
    assert written.shift_nm == level.shift_nm
    box = level.read()[1:5, 2:11, 3:14]
    np.testing.assert_allclose(read(tmp_path / "o.zarr", "dist")[0], 1.5 * box - 0.25,
                               atol=2e-6, rtol=0)
