"""The inference engine's host work per block, made lighter, must not change one bit.

Block planning (owners, read box, owned box) is found per axis by arithmetic, the engine's
per-owner and per-patch box arithmetic uses plain ints instead of funlib's ``Roi`` and
``Coordinate``, the geometry helpers build no ``Coordinate`` per call, and the forward-pass
threads are kept from block to block. Pinned here: outputs of the paths
`test_infer_speed_same` does not cover (digests taken from the engine before this work),
and each rewritten helper against its former definition.
"""

from __future__ import annotations

import itertools
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from funlib.geometry import Coordinate, Roi
from test_infer_speed_same import Exact, inputs, make_recipe, run

from emrun import geometry
from emrun.geometry import BlockGrid, box_of, clip, local_slices, slices, zyx
from emrun.infer import engine as engine_module
from emrun.infer.array import predict_array
from emrun.infer.engine import Engine, PatchSource
from emrun.infer.plan import Layout

__all__ = ["inputs"]  # the shared module-scoped input volumes (a fixture)

RUNS: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    # name: (infer settings, run options, digest from the engine before this work)
    "gauss_roi_units": ({"blend": {"type": "gaussian", "sigma": 0.2}},
                        {"block": (4, 16, 16), "roi": Roi((1, 3, 2), (9, 31, 40)),
                         "single_units": True}, "7ae811cd1ab766e8"),
    "tta4_f16_units": ({"tta": 4, "dtype": "float16"},
                       {"block": (8, 32, 32), "single_units": True}, "667651e76d5c4c99"),
    "mask_nan_units": ({}, {"block": (4, 16, 16), "source": "floats", "mask_path": "MASK",
                            "nan_above": 0.9, "single_units": True}, "85724c166e2ca8c5"),
    "dense_overlap_units": ({"overlap": [0.75, 0.5, 0.5], "batch_size": 4},
                            {"block": (4, 16, 16), "single_units": True}, "63c69267f5dcbbc5"),
    "dense_overlap": ({"overlap": [0.75, 0.5, 0.5], "batch_size": 4},
                      {"block": (4, 16, 16)}, "63c69267f5dcbbc5"),
    "abutting_uint8": ({"overlap": [0, 0, 0], "dtype": "uint8"}, {"block": (4, 16, 16)},
                       "9a1eb9b9798850d0"),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_outputs_are_the_pinned_bits(inputs: Path, name: str) -> None:
    """ROI with recomputation at every block's faces, TTA 4 across units, a mask with
    non-finite outputs recomputed, owners several blocks back (dense overlap), abutting
    patches: each as the engine wrote it before."""
    settings, options, want = RUNS[name]
    options = dict(options)
    if options.get("mask_path") == "MASK":
        options["mask_path"] = str(inputs / "in.zarr" / "mask")
    got = run(inputs, f"host_{name}", make_recipe(**settings), **options)
    assert got == want, f"{name}: outputs changed ({got})"


# --- plan: per-axis arithmetic against the lists it replaced ---------------------------------


def layouts(count: int, seed: int) -> list[Layout]:
    """Random small layouts: odd shapes, strides from 1 to the patch, blocks thinner than a
    stride at the volume's end, one-block axes."""
    rng = random.Random(seed)
    found: list[Layout] = []
    while len(found) < count:
        patch = tuple(rng.randint(1, 9) for _ in range(3))
        stride = tuple(rng.randint(1, p) for p in patch)
        block = tuple(rng.randint(1, 12) for _ in range(3))
        shape = tuple(rng.randint(1, 30) for _ in range(3))
        found.append(Layout(shape, patch, stride, block, block))  # type: ignore[arg-type]
    return found


def former_owners(layout: Layout, block: tuple[int, int, int]) -> list[tuple[int, ...]]:
    return sorted({layout.owner(p) for p in layout.patches(block)})


def former_read_box(layout: Layout, block: tuple[int, int, int]) -> Roi:
    patches = layout.patches(block)
    start = Coordinate(min(p[a] for p in patches) for a in range(3))
    return Roi(start, Coordinate(max(p[a] for p in patches) for a in range(3))
               - start + Coordinate(layout.patch))


def former_owned_box(layout: Layout, block: tuple[int, int, int]) -> Roi | None:
    owned = layout.owned_patches(block)
    if not owned:
        return None
    start = Coordinate(min(p[a] for p in owned) for a in range(3))
    stop = Coordinate(max(p[a] for p in owned) for a in range(3)) + Coordinate(layout.patch)
    return Roi(start, stop - start).intersect(box_of(layout.shape))


def test_block_planning_is_what_the_patch_lists_gave() -> None:
    for layout in layouts(30, seed=3):
        for block in layout.block_grid():
            assert layout.owners(block) == former_owners(layout, block), (layout, block)
            assert layout.read_box(block) == former_read_box(layout, block), (layout, block)
            assert layout.owned_box(block) == former_owned_box(layout, block), (layout, block)
            box = layout.write_box(block)
            assert layout.write_bounds(block) == (tuple(box.begin), tuple(box.end))


def test_a_thin_last_block_owns_nothing_and_reaches_nothing() -> None:
    layout = Layout((9, 37, 20), (4, 16, 16), (2, 12, 12), (4, 16, 16), (4, 16, 16))
    thin = (0, 2, 0)  # y 32..37: thinner than the stride, no lattice start in it
    assert layout.owned_box(thin) is None and layout.reached(thin) == []
    assert thin not in layout.owners(thin) and layout.owners(thin)


# --- geometry: plain-int helpers against funlib's arithmetic ---------------------------------


def random_roi(rng: random.Random) -> Roi:
    return Roi([rng.randint(-20, 20) for _ in range(3)], [rng.randint(0, 15) for _ in range(3)])


def test_geometry_helpers_are_what_funlib_gave() -> None:
    rng = random.Random(7)
    for _ in range(400):
        roi, total = random_roi(rng), random_roi(rng)
        begin = [min(max(b, lo), hi) for b, lo, hi in zip(roi.begin, total.begin, total.end,
                                                           strict=True)]
        end = [max(s, min(e, hi)) for s, e, hi in zip(begin, roi.end, total.end, strict=True)]
        assert clip(roi, total) == Roi(begin, Coordinate(end) - Coordinate(begin))
        assert slices(roi) == tuple(slice(b, e) for b, e in zip(roi.begin, roi.end,
                                                                strict=True))
        origin = tuple(rng.randint(-5, 5) for _ in range(3))
        assert local_slices(roi, origin) == slices(roi.shift(-Coordinate(origin)))


def test_block_boxes_are_what_funlib_gave() -> None:
    rng = random.Random(11)
    for _ in range(100):
        total = Roi([rng.randint(-10, 10) for _ in range(3)],
                    [rng.randint(1, 30) for _ in range(3)])
        grid = BlockGrid(total, [rng.randint(1, 12) for _ in range(3)])
        every = list(itertools.product(*(range(-1, c + 2) for c in grid.counts)))
        for index in rng.sample(every, min(len(every), 40)):  # some outside the grid
            start = total.offset + Coordinate(index) * grid.block
            want = clip(Roi(start, grid.block), total)
            assert grid.box(index) == want, (total, grid.block, index)
            context = rng.randint(0, 3)
            assert grid.box(index, context) == (
                geometry.grow_within(want, context, total) if context else want)


def test_unbounded_boxes_slice_as_before() -> None:
    roi = Roi((None, 2, 3), (None, 4, 5))
    assert slices(roi) == (slice(None, None), slice(2, 6), slice(3, 8))
    assert local_slices(roi, (1, 1, 1)) == (slice(None, None), slice(1, 5), slice(2, 7))


# --- the engine: no per-patch geometry, one pass pool ----------------------------------------


def test_a_block_builds_no_coordinate_per_patch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A block of over a thousand patches: its planning, patch cuts and blending build a
    bounded number of funlib ``Coordinate``s (they cost a type check per value; per patch
    they were a quarter of the engine's host time)."""
    recipe = make_recipe(overlap=[0.5, 0.5, 0.5])
    engine = Engine(recipe, Exact(recipe.head_channels()).eval(), torch.device("cpu"))
    built = [0]
    new = Coordinate.__new__

    def counting(cls: type, *args: Any, **kwargs: Any) -> Coordinate:
        built[0] += 1
        return new(cls, *args, **kwargs)

    image = (np.random.default_rng(5).random((24, 96, 96)) * 255).astype(np.uint8)
    monkeypatch.setattr(Coordinate, "__new__", counting)
    predict_array(engine, image, (0.0, 255.0))
    assert engine.predicted_patches > 1000
    assert built[0] < 100


def test_forward_pass_threads_are_kept_from_block_to_block(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With two threads for forward passes, an engine starts its pass pool once, not once
    per block (starting threads each block was a tenth of a small-block run's host time);
    blocks predicted on the kept pool are the same bits."""
    recipe = make_recipe()
    started: list[int] = []
    real = engine_module._pass_pool
    monkeypatch.setattr(engine_module, "_pass_pool",
                        lambda threads: started.append(threads) or real(threads))
    threads = torch.get_num_threads()
    image = (np.random.default_rng(6).random((9, 30, 41)) * 255).astype(np.uint8)
    try:
        torch.set_num_threads(2)
        kept = Engine(recipe, Exact(recipe.head_channels()).eval(), torch.device("cpu"))
        results = [predict_array(kept, image, (0.0, 255.0)) for _ in range(3)]
    finally:
        torch.set_num_threads(threads)
    assert started == [2]
    for again in results[1:]:
        for name in results[0]:
            assert np.array_equal(again[name], results[0][name])


def test_a_pass_stopped_early_leaves_no_pass_running() -> None:
    """A consumer that stops reading a block's passes (an error downstream) lets go of them
    only once none is running (as the per-block pool's exit waited for them): the kept pool
    is never left busy with a block that is over."""
    recipe = make_recipe()
    engine = Engine(recipe, Exact(recipe.head_channels()).eval(), torch.device("cpu"))
    layout = Layout((8, 32, 32), engine.patch, engine.stride, (8, 32, 32), (8, 32, 32))
    running = [0]
    forward = engine._forward

    def slow(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        running[0] += 1
        time.sleep(0.05)
        try:
            return forward(batch)
        finally:
            running[0] -= 1

    engine._forward = slow  # type: ignore[method-assign]
    start = zyx(layout.read_box((0, 0, 0)).offset)
    source = PatchSource(torch.rand(12, 40, 40), start, engine.patch, None, lambda t: t)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        passes = engine._forwards(source, layout.batches((0, 0, 0), 1))
        next(passes)
        passes.close()
        assert running[0] == 0
    finally:
        torch.set_num_threads(threads)


def test_a_forked_process_starts_its_own_pass_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forked child has none of its parent's pass threads: an engine it inherited would
    wait for ever on the kept pool, so it starts a pool of its own (the parent's is left to
    the parent)."""
    recipe = make_recipe()
    started: list[int] = []
    real = engine_module._pass_pool
    monkeypatch.setattr(engine_module, "_pass_pool",
                        lambda threads: started.append(threads) or real(threads))
    engine = Engine(recipe, Exact(recipe.head_channels()).eval(), torch.device("cpu"))
    image = (np.random.default_rng(8).random((9, 30, 41)) * 255).astype(np.uint8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        want = predict_array(engine, image, (0.0, 255.0))
        parent = engine._pass_pool(2)
        monkeypatch.setattr(engine_module.os, "getpid", lambda: -1)  # as in a forked child
        got = predict_array(engine, image, (0.0, 255.0))
    finally:
        torch.set_num_threads(threads)
    assert started == [2, 2] and engine._pass_pool(2) is not parent
    assert not parent._shutdown  # type: ignore[attr-defined]
    for name in want:
        assert np.array_equal(got[name], want[name])
