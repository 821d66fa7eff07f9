"""Probe of the engine's weight sums and blockwise blending (`Engine._weight`, `_span`,
`WEIGHTS`, `Layout`), against brute force that shares nothing with the code under test but
the window tensor: the lattice is listed from its definition (``origin + k * stride`` until
the volume's end is covered) and every patch's window is added over the whole volume.

Weights are compared bit for bit with a float32 sum in lattice order (the engine's own
definition: the same operands added in the same order, so numpy and torch agree to the last
bit) and, as a check of the lattice itself, with a float64 sum within float32 rounding.
Blocks are visited shuffled, twice, and interleaved across layouts on one engine, so the
cache of shared sums cannot hand one block another's sum unseen.
"""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
import zarr
from test_infer_speed_same import Exact, make_recipe

from emrun.geometry import Coordinate, Roi, box_of, zyx
from emrun.infer.array import ArrayVolume, predict_array, predict_box
from emrun.infer.engine import ACTIVATIONS, WEIGHTS, Engine, _span, read_reflected
from emrun.infer.job import prepare_job
from emrun.infer.plan import Layout
from emrun.infer.schedule import run_local
from emrun.infer.worker import BlockWorker
from emrun.io.write import write_volume
from emrun.models import build_model

# --- brute force ------------------------------------------------------------------------------


def lattice_starts(n: int, patch: int, stride: int) -> list[int]:
    """The lattice's starts along one axis, from the definition: the first at
    -((patch - stride) // 2), then one stride on until a patch reaches the volume's end."""
    starts = [-((patch - stride) // 2)]
    while starts[-1] + patch < n:
        starts.append(starts[-1] + stride)
    return starts


def brute_weight(shape: tuple[int, ...], patch: tuple[int, ...], stride: tuple[int, ...],
                 window: np.ndarray, dtype: type) -> np.ndarray:
    """The window of every lattice patch added over the whole volume, patch by patch in
    lattice order (z, then y, then x starts), in ``dtype``."""
    total = np.zeros(shape, dtype)
    window = window.astype(dtype)
    for start in itertools.product(*(lattice_starts(n, p, s)
                                     for n, p, s in zip(shape, patch, stride, strict=True))):
        into, within = [], []
        for s, p, n in zip(start, patch, shape, strict=True):
            low, high = max(s, 0), min(s + p, n)
            assert low < high  # every lattice patch reaches into the volume
            into.append(slice(low, high))
            within.append(slice(low - s, high - s))
        total[tuple(into)] += window[tuple(within)]
    return total


def engine_for(patch: tuple[int, int, int], stride: tuple[int, int, int]) -> Engine:
    recipe = make_recipe(patch=list(patch), stride=list(stride), overlap=None)
    engine = Engine(recipe, Exact(recipe.head_channels()).eval(), torch.device("cpu"))
    assert engine.patch == patch and engine.stride == stride
    return engine


def random_layout(rng: random.Random, patch: tuple[int, int, int],
                  stride: tuple[int, int, int]) -> Layout:
    """A volume and a block size (off the stride, thinner than a patch or a stride, or a
    whole number of strides), the last block cut at the volume's end."""
    block = []
    for p, s in zip(patch, stride, strict=True):
        kind = rng.choice(["thin", "off", "whole", "wide"])
        size = {"thin": rng.randint(1, max(1, s - 1)), "off": rng.randint(1, 2 * p),
                "whole": s * rng.randint(1, 3), "wide": rng.randint(p, 3 * p)}[kind]
        block.append(size)
    shape = tuple(rng.randint(1, 4 * b + p) for b, p in zip(block, patch, strict=True))
    return Layout(zyx(shape), patch, stride, zyx(block), zyx(block))


def block_slices(layout: Layout, block: tuple[int, int, int]) -> tuple[slice, ...]:
    begin, end = layout.write_bounds(block)
    return tuple(slice(b, e) for b, e in zip(begin, end, strict=True))


# --- Layout against the definition ------------------------------------------------------------


def test_layout_lattice_and_covering_match_the_definition():
    """`Layout.starts` and `covering` are the definition's lattice, and the blocks tile the
    volume, each a whole block but the last, which is cut at the volume's end."""
    rng = random.Random(11)
    for _ in range(300):
        patch = zyx(rng.randint(1, 12) for _ in range(3))
        stride = zyx(rng.randint(1, p) for p in patch)
        layout = random_layout(rng, patch, stride)
        for axis in range(3):
            want = lattice_starts(layout.shape[axis], patch[axis], stride[axis])
            assert layout.starts(axis) == want, (layout, axis)
        seen = np.zeros(layout.shape, np.int32)
        for block in layout.block_grid():
            begin, end = layout.write_bounds(block)
            for a in range(3):
                assert begin[a] == block[a] * layout.block[a]
                assert end[a] == min(begin[a] + layout.block[a], layout.shape[a])
                want = [s for s in lattice_starts(layout.shape[a], patch[a], stride[a])
                        if s < end[a] and s + patch[a] > begin[a]]
                assert list(layout.covering(a, begin[a], end[a])) == want, (layout, block, a)
            seen[block_slices(layout, block)] += 1
        assert (seen == 1).all(), layout


# --- weights against brute force --------------------------------------------------------------

LATTICES = [  # (patch, stride): strides dividing the patch or not, stride == patch, stride 1
    ((4, 16, 16), (3, 12, 12)),
    ((5, 9, 7), (2, 4, 5)),
    ((3, 8, 6), (3, 5, 1)),
    ((6, 7, 10), (4, 7, 3)),
]


@pytest.mark.parametrize("patch,stride", LATTICES)
def test_weights_are_the_brute_force_lattice_sums_in_any_block_order(patch, stride):
    """Random layouts on one engine, their blocks shuffled and visited twice, layouts
    interleaved: every weight equals the float32 lattice sum over the whole volume, cut at
    the block, bit for bit; and the float64 sum within float32 rounding (a few adds of
    positive numbers: relative 1e-6)."""
    rng = random.Random(hash((patch, stride)) & 0xFFFF)
    engine = engine_for(patch, stride)
    window = engine.window.numpy()
    layouts = [random_layout(rng, patch, stride) for _ in range(6)]
    wanted = {layout: (brute_weight(layout.shape, patch, stride, window, np.float32),
                       brute_weight(layout.shape, patch, stride, window, np.float64))
              for layout in layouts}
    visits = [(layout, block) for layout in layouts for block in layout.block_grid()] * 2
    rng.shuffle(visits)
    kept = []
    for layout, block in visits:
        got = engine._weight(layout, block)
        exact, wide = wanted[layout]
        where = block_slices(layout, block)
        assert tuple(got.shape) == exact[where].shape, (layout, block)
        assert np.array_equal(got.numpy(), exact[where]), (layout, block)
        np.testing.assert_allclose(got.numpy(), wide[where], rtol=1e-6, atol=0)
        kept.append((layout, block, got))
    assert len(engine._weights) <= WEIGHTS
    for layout, block, got in kept:  # later sums did not write into one handed out before
        assert np.array_equal(got.numpy(), wanted[layout][0][block_slices(layout, block)])


def test_spans_hold_exactly_the_covering_starts_of_the_block():
    """`_span`'s box, cut at the block's place in it, holds the covering starts of the
    block and no other start that reaches the block: so the cut sum is the block's."""
    rng = random.Random(5)
    for _ in range(400):
        patch = zyx(rng.randint(1, 12) for _ in range(3))
        stride = zyx(rng.randint(1, p) for p in patch)
        layout = random_layout(rng, patch, stride)
        for block in layout.block_grid():
            begin, end = layout.write_bounds(block)
            for a in range(3):
                length, starts, cut = _span(layout, a, begin[a], end[a])
                assert cut >= 0 and cut + end[a] - begin[a] <= length
                assert list(starts) == sorted(set(starts))
                reaching = [s - cut + begin[a] for s in starts
                            if s < cut + end[a] - begin[a] and s + patch[a] > cut]
                assert reaching == list(layout.covering(a, begin[a], end[a])), \
                    (layout, block, a, length, starts, cut)
                assert all(-patch[a] < s < length for s in starts)  # each reaches the box


def test_an_engine_shares_one_cache_across_layouts_without_mixing_them():
    """Two layouts of one engine whose blocks have the same size but another lattice end
    (the volume is one voxel longer): each block's weight is its own layout's sum, with
    the cache kept full by a third layout between them."""
    patch, stride = (4, 16, 16), (3, 12, 12)
    engine = engine_for(patch, stride)
    window = engine.window.numpy()
    layouts = [Layout(zyx(shape), patch, stride, (4, 10, 25), (4, 10, 25))
               for shape in ((9, 31, 101), (9, 31, 100), (10, 32, 99), (5, 9, 76))]
    wanted = {layout: brute_weight(layout.shape, patch, stride, window, np.float32)
              for layout in layouts}
    for _ in range(2):
        for block in itertools.zip_longest(*(layout.block_grid() for layout in layouts)):
            for layout, index in zip(layouts, block, strict=True):
                if index is None:
                    continue
                got = engine._weight(layout, index)
                assert np.array_equal(got.numpy(),
                                      wanted[layout][block_slices(layout, index)]), \
                    (layout, index)


# --- blockwise prediction against one block ---------------------------------------------------


def blockwise(engine: Engine, image: np.ndarray, block: tuple[int, int, int], *,
              hand_over: bool, order: list | None = None, roi: Roi | None = None
              ) -> dict[str, np.ndarray]:
    """The blocks of ``image`` (of its ``roi``, when given: the layout's origin at the
    ROI's offset, the input around it as context) predicted one by one and put together.
    ``hand_over``: blocks in block order, each owner's partial sums handed to the later
    blocks it reaches (as a worker does within a unit); otherwise each block recomputes its
    other owners (a unit per block), in ``order``."""
    volume = ArrayVolume.of(image)
    roi = roi if roi is not None else box_of(image.shape)
    shape, offset = zyx(roi.shape), zyx(roi.offset)
    layout = Layout(shape, engine.patch, engine.stride, block, block)
    channels = engine.recipe.head_channels()
    out = {n: np.full((c, *shape), np.nan, np.float32) for n, c in channels.items()}
    grid = layout.block_grid()
    carried: dict = {}
    for index in (grid if hand_over or order is None else order):
        raw = engine.read_input(volume, layout, index, origin=offset)
        assert raw is not None
        keep = layout.reached(index) if hand_over else ()
        mine = {o: carried[(o, index)] for o in layout.owners(index)
                if (o, index) in carried} if hand_over else None
        prediction = engine.predict(raw, layout, index, (0.0, 255.0), carried=mine, keep=keep,
                                    read=lambda box: read_reflected(
                                        volume, box.shift(Coordinate(offset))))
        if hand_over:
            for target, piece in prediction.carries.items():
                carried[(index, target)] = piece
        for name, tensor in prediction.values.items():
            out[name][(slice(None), *block_slices(layout, index))] = tensor.numpy()
    return out


BLOCKWISE = [  # (overlap, shape, block)
    ([0.5, 0.25, 0.25], (11, 37, 45), (4, 16, 16)),
    ([0.25, 0.25, 0.25], (9, 30, 41), (3, 10, 7)),    # off the stride, thinner than a patch
    ([0.5, 0.5, 0.5], (7, 26, 33), (5, 9, 20)),
    ([0.4, 0.3, 0.6], (10, 21, 50), (2, 21, 11)),
]


def _image(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    image = (np.random.default_rng(seed).random(shape) * 254 + 1).astype(np.uint8)
    return image  # no blank block: every block is predicted


@pytest.mark.parametrize("overlap_,shape,block", BLOCKWISE)
def test_blockwise_recomputed_and_handed_over_are_the_same_bits(overlap_, shape, block):
    """Each block its own unit (other owners recomputed, blocks in shuffled order) and one
    unit handing partial sums over: the same bits (the engine's promise for resumption and
    unit borders)."""
    recipe = make_recipe(overlap=overlap_)
    engine = Engine(recipe, Exact(recipe.head_channels()).eval(), torch.device("cpu"))
    image = _image(shape, sum(shape))
    grid = Layout(zyx(shape), engine.patch, engine.stride, block, block).block_grid()
    order = list(grid)
    random.Random(3).shuffle(order)
    handed = blockwise(engine, image, block, hand_over=True)
    alone = blockwise(engine, image, block, hand_over=False, order=order)
    for name in handed:
        assert not np.isnan(handed[name]).any()
        assert np.array_equal(handed[name], alone[name]), name


@pytest.mark.parametrize("overlap_,shape,block", BLOCKWISE)
def test_blockwise_matches_one_block_within_float32_summation_order(overlap_, shape, block):
    """Blocks against `predict_array` (one block): the same voxels and weights, the same
    patches; only the order of the numerator's float32 adds differs (a block adds its
    owners' partial sums in block order, one block adds every patch in lattice order), so
    the values agree to a few float32 ulps (the README's 1e-5), not necessarily bit for
    bit. The weight is the same bits either way (see the weight tests)."""
    recipe = make_recipe(overlap=overlap_)
    engine = Engine(recipe, Exact(recipe.head_channels()).eval(), torch.device("cpu"))
    image = _image(shape, sum(shape))
    whole = predict_array(engine, image, (0.0, 255.0))
    parts = blockwise(engine, image, block, hand_over=True)
    for name in whole:
        np.testing.assert_allclose(parts[name], whole[name], rtol=0, atol=1e-5)


@pytest.mark.parametrize("roi,block", [(Roi((2, 5, 7), (7, 22, 30)), (3, 10, 7)),
                                       (Roi((0, 11, 3), (11, 19, 41)), (4, 16, 16)),
                                       (Roi((5, 0, 20), (3, 37, 25)), (2, 5, 9))])
def test_blockwise_in_a_roi_matches_its_one_block_prediction(roi, block):
    """A ROI (the layout's origin moved into the volume, context read around it): hand-over
    and recomputation the same bits, and both within float32 summation order of
    `predict_box` (one block of the same ROI; see above)."""
    recipe = make_recipe(overlap=[0.25, 0.25, 0.25])
    engine = Engine(recipe, Exact(recipe.head_channels()).eval(), torch.device("cpu"))
    image = _image((11, 37, 45), 21)
    whole = predict_box(engine, ArrayVolume.of(image), roi, (0.0, 255.0))
    handed = blockwise(engine, image, block, hand_over=True, roi=roi)
    grid = Layout(zyx(roi.shape), engine.patch, engine.stride, block, block).block_grid()
    order = list(reversed(grid))
    alone = blockwise(engine, image, block, hand_over=False, order=order, roi=roi)
    for name in whole:
        assert np.array_equal(handed[name], alone[name]), name
        np.testing.assert_allclose(handed[name], whole[name], rtol=0, atol=1e-5)


@pytest.mark.parametrize("block,single_units", [((4, 17, 25), False), ((4, 17, 25), True),
                                                ((9, 13, 19), False)])
def test_a_job_with_a_block_off_the_stride_writes_the_engine_blocks(tmp_path, block,
                                                                     single_units):
    """`emrun infer --block` through the job and its worker (one unit handing over, or a unit
    per block): the same bits as the blocks predicted here with hand-over, and within
    float32 summation order of one block."""
    recipe = make_recipe(overlap=[0.25, 0.25, 0.25])
    torch.save({"model": build_model(recipe).state_dict(), "iteration": 1}, tmp_path / "c.pt")
    image = _image((9, 30, 41), 17)
    write_volume(tmp_path / "in.zarr", "image", image, voxel_size=(30, 6, 6))
    out = tmp_path / "out.zarr"
    job = prepare_job(recipe, tmp_path / "c.pt", str(tmp_path / "in.zarr" / "image"), out,
                      block=block)
    assert job.layout.block == block
    model = Exact(recipe.head_channels()).eval()
    if single_units:
        BlockWorker(job, torch.device("cpu"), model=model).run_units(
            [[b] for b in job.pending()])
    else:
        run_local(job, [("cpu", 1)], model=lambda r: Exact(r.head_channels()).eval())
    engine = Engine(recipe, Exact(recipe.head_channels()).eval(), torch.device("cpu"))
    mine = blockwise(engine, image, block, hand_over=True)
    whole = predict_array(engine, image, (0.0, 255.0))
    for name in recipe.tasks:
        written = zarr.open_array(str(out / name / "0"), mode="r")[...]
        assert np.array_equal(written, mine[name]), name
        np.testing.assert_allclose(written, whole[name], rtol=0, atol=1e-5)


def test_one_block_prediction_is_the_brute_force_weighted_mean():
    """`predict_array` against a float64 sliding window of the same stand-in network over
    the reflected input: each voxel the window-weighted mean of the lattice's patches."""
    recipe = make_recipe(overlap=[0.25, 0.25, 0.25])
    model = Exact(recipe.head_channels()).eval()
    engine = Engine(recipe, model, torch.device("cpu"))
    shape = (7, 23, 29)
    image = _image(shape, 9)
    got = predict_array(engine, image, (0.0, 255.0))
    patch, stride = engine.patch, engine.stride
    window = engine.window.numpy().astype(np.float64)
    scaled = image.astype(np.float64) / 255.0
    margin = max(patch)
    padded = np.pad(scaled, margin, mode="reflect")
    channels = sum(recipe.head_channels().values())
    num = np.zeros((channels, *shape))
    den = np.zeros(shape)
    for start in itertools.product(*(lattice_starts(n, p, s)
                                     for n, p, s in zip(shape, patch, stride, strict=True))):
        # reflected about the borders by numpy itself (not the engine's index folding)
        index = tuple(slice(s + margin, s + p + margin) for s, p in zip(start, patch,
                                                                           strict=True))
        x = torch.from_numpy(padded[index].astype(np.float32))[None, None]
        with torch.no_grad():
            out = model(x)
        values = np.concatenate([ACTIVATIONS[recipe.tasks[n].activation](out[n][0])
                                 .numpy().astype(np.float64) for n in recipe.head_channels()])
        into, within = [], []
        for s, p, n in zip(start, patch, shape, strict=True):
            low, high = max(s, 0), min(s + p, n)
            into.append(slice(low, high))
            within.append(slice(low - s, high - s))
        num[(slice(None), *into)] += (values * window)[(slice(None), *within)]
        den[tuple(into)] += window[tuple(within)]
    want = num / den
    first = 0
    for name, c in recipe.head_channels().items():
        np.testing.assert_allclose(got[name], want[first:first + c], rtol=0, atol=1e-5)
        first += c
