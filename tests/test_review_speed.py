"""Review of the speed work (segment's compiled loops, the inference engine's reused buffers,
the data pipeline's faster paths) and of the shared daisy stop: the cases its pinned tests
do not reach (odd and one-voxel shapes, strided inputs, non-finite and huge outputs, results
kept while the next block is predicted, ties and empty graphs, errors during a stop).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_data_speed_same import _plain_affinity
from test_infer_speed_same import Exact, make_recipe

from emrun.data.augment import Context
from emrun.data.samples import half, stack
from emrun.infer.array import predict_array
from emrun.infer.engine import Engine, reflected_source, spread
from emrun.segment import graph
from emrun.segment.graph import Edges, merge_small

# ----------------------------------------------------------------------------------------------
# infer: spread, reused buffers, the CPU weighting


def test_spread_is_the_fancy_index_on_odd_and_one_voxel_shapes() -> None:
    """`spread` skips the copy of identity axes: any mix of identity, repeated, reflected
    and empty indices, on C- and Fortran-ordered data, gives ``data[np.ix_(*index)]``."""
    rng = np.random.default_rng(3)
    for trial in range(300):
        shape = tuple(int(n) for n in rng.integers(1, 5, 3))
        data = rng.random(shape).astype(np.float32)
        if trial % 3 == 0:
            data = np.asfortranarray(data)
        index = [np.arange(n) if rng.random() < 0.5
                 else np.sort(rng.integers(0, n, int(rng.integers(0, 7)))) for n in shape]
        got, want = spread(data, index), data[np.ix_(*index)]
        assert got.shape == want.shape and np.array_equal(got, want), (shape, index)


def test_spread_reflects_a_one_voxel_volume_as_the_fancy_index() -> None:
    """A box reaching past every border of a volume one voxel thick along z."""

    class Tiny:
        shape = (1, 3, 5)

    data = np.arange(15, dtype=np.uint8).reshape(1, 3, 5)
    from emrun.geometry import Roi

    source, index = reflected_source(Tiny(), Roi((-2, -3, -1), (5, 9, 8)))  # type: ignore[arg-type]
    read = data[tuple(slice(b, e) for b, e in zip(source.begin, source.end, strict=True))]
    assert np.array_equal(spread(read, index), read[np.ix_(*index)])


def _engine() -> Engine:
    recipe = make_recipe()
    return Engine(recipe, Exact(recipe.head_channels()).eval(), torch.device("cpu"))


def test_predictions_kept_by_a_writer_outlive_the_next_blocks() -> None:
    """A block's float32 values travel to the writer thread as views (no copy on a CPU):
    the buffers the engine reuses must not be under them, so the next blocks (larger and
    smaller) leave them as they were."""
    engine = _engine()
    rng = np.random.default_rng(5)
    first = predict_array(engine, (rng.random((9, 30, 41)) * 255).astype(np.uint8),
                          (0.0, 255.0))
    kept = {name: values.copy() for name, values in first.items()}
    for shape in ((9, 30, 41), (5, 17, 20), (11, 40, 44)):
        predict_array(engine, (rng.random(shape) * 255).astype(np.uint8), (0.0, 255.0))
    for name, values in first.items():
        assert np.array_equal(values, kept[name]), name


@contextlib.contextmanager
def _device_branch(engine: Engine) -> Iterator[None]:
    """The engine taking its GPU branches (on CPU tensors: the same arithmetic)."""
    device = engine.device
    engine.device = torch.device("meta")
    try:
        yield
    finally:
        engine.device = device


@pytest.mark.parametrize("kind", ["finite", "nan_inf", "huge"])
def test_cpu_weighting_is_the_device_branchs(kind: str) -> None:
    """On a CPU the window product goes into a reused buffer and one sum decides whether
    to flag: the values and the non-finite count must be the GPU branch's (the old code),
    also for finite outputs whose sum overflows and for a short last batch."""
    engine = _engine()
    rng = np.random.default_rng(7)
    outputs = {name: torch.from_numpy(rng.standard_normal((3, n, *engine.patch))
                                      .astype(np.float32))
               for name, n in engine.channels.items()}
    first = next(iter(outputs.values()))
    if kind == "nan_inf":
        first[0, 0, 0, 0, :3] = torch.tensor([np.nan, np.inf, -np.inf])
        first[1, 0, 1, 2, 3] = np.nan
    elif kind == "huge":
        first[:2] = 3e38  # finite, but they sum to inf
    for count in (3, 2):
        got, got_flags = engine._weighted(outputs, count)
        got, got_flags = got.clone(), None if got_flags is None else got_flags.clone()
        with _device_branch(engine):
            want, want_flags = engine._weighted(outputs, count)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (kind, count)
        got_count = 0 if got_flags is None else int(torch.count_nonzero(got_flags))
        assert got_count == int(torch.count_nonzero(want_flags)), (kind, count)


# ----------------------------------------------------------------------------------------------
# data: half, a batch of one, warps of odd shapes, affinities of thin patches


def test_half_is_numpys_on_strided_subnormal_and_edge_values() -> None:
    """The compiled float16 packing on non-contiguous views (reversed, stepped,
    transposed), float16 subnormals, their rounding boundary, -0 and 1."""
    rng = np.random.default_rng(9)
    values = rng.random((6, 35, 9)).astype(np.float32)
    values[0, 0, :8] = [0.0, -0.0, 1.0, 2**-24, 2**-25, 3 * 2**-25, 2**-14, 2**-14 - 2**-26]
    values[1] = (rng.random((35, 9)) * 2**-13).astype(np.float32)
    bits = rng.integers(0, 0x3F800001, 200_000, dtype=np.uint32)  # all of [0, 1]
    for array in (values, values[:, ::-1, ::2], values.transpose(2, 0, 1),
                  bits.view(np.float32)):
        got = half(array)
        assert got.dtype == np.float16 and got.shape == array.shape
        assert np.array_equal(got.view(np.uint16), array.astype(np.float16).view(np.uint16))


def test_a_batch_of_one_of_a_reversed_sample_reaches_torch_as_np_stack() -> None:
    """A batch of one is a view of its sample: it must hold the same values as
    `np.stack` and keep a reversed (negative-stride) sample readable by torch."""
    sample = {"image": np.arange(24, dtype=np.float16).reshape(2, 3, 4)[:, ::-1]}
    batch = stack([sample])
    want = np.stack([sample["image"]])
    assert batch["image"].shape == want.shape and np.array_equal(batch["image"], want)
    from emrun.data.loader import to_tensors

    assert torch.equal(to_tensors(batch)["image"], torch.from_numpy(want))


@pytest.mark.parametrize("shape", [(1, 5, 7), (3, 1, 9), (2, 9, 1), (1, 2, 3)])
def test_a_warp_of_odd_shapes_maps_all_sections_as_one_by_one(
        monkeypatch: pytest.MonkeyPatch, shape: tuple[int, int, int]) -> None:
    """Sections as channels of one image (no twist): the same bits as each on its own,
    on one-section, one-row and one-column outputs (the vector kernel's tails)."""
    import emrun.data.augment.geometric as geometric
    from emrun.data.augment.geometric import WarpAugment
    from emrun.recipe.augment import Warp

    calls: list[tuple[torch.Tensor, torch.Tensor, np.ndarray]] = []
    real = geometric._bilinear

    def spy(source: torch.Tensor, sampling: torch.Tensor) -> np.ndarray:
        out = real(source, sampling)
        calls.append((source.clone(), sampling.clone(), out.copy()))
        return out

    monkeypatch.setattr(geometric, "_bilinear", spy)
    rng = np.random.default_rng(11)
    step = WarpAugment(Warp(type="warp", rot_max=30.0, twist_max=0.0)).plan(
        rng, shape, Context())
    step.apply.image(rng.random(step.in_shape, dtype=np.float32))
    (source, sampling, got), = calls
    assert source.shape[:2] == (1, step.in_shape[0])  # the sections as channels
    per_section = F.grid_sample(source[0][:, None], sampling.expand(source.shape[1], -1, -1, -1),
                                mode="bilinear", padding_mode="border", align_corners=True)
    assert np.array_equal(got[0], per_section.numpy()[:, 0])


@pytest.mark.parametrize("zero", ["mask", "boundary"])
@pytest.mark.parametrize("shape", [(1, 1, 6), (1, 5, 1), (4, 1, 1), (1, 1, 1), (2, 3, 1)])
def test_flat_affinities_of_thin_patches_are_the_sliced_ones(
        zero: str, shape: tuple[int, int, int]) -> None:
    """One-voxel-thick patches, where almost every flat pair wraps."""
    from emrun.data.targets import Affinity, Patch

    rng = np.random.default_rng(13)
    labels = rng.integers(0, 3, shape).astype(np.uint32)
    valid = (rng.random(shape) < 0.8).astype(np.uint8)
    offsets = ((-1, 0, 0), (0, -1, 0), (0, 0, -1), (0, 0, 1), (1, 1, 1), (0, 2, 0))
    for mask in (None, valid):
        made = Affinity(offsets, relabel=False, zero=zero)(Patch(labels, mask))
        want = _plain_affinity(labels, mask, offsets, zero)
        np.testing.assert_array_equal(made[0], want[0])
        np.testing.assert_array_equal(made[1], want[1])


# ----------------------------------------------------------------------------------------------
# segment: the compiled loops on the graphs the pinned cases do not make


@pytest.fixture(params=["numpy", "compiled"])
def loops(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(graph, "COMPILED_FROM", 0 if request.param == "compiled" else 10**15)
    return str(request.param)


def _both(monkeypatch: pytest.MonkeyPatch, call: Any) -> tuple[Any, Any]:
    monkeypatch.setattr(graph, "COMPILED_FROM", 10**15)
    plain = call()
    monkeypatch.setattr(graph, "COMPILED_FROM", 0)
    return plain, call()


@pytest.mark.parametrize("count_dtype", [None, np.bool_, np.uint8, np.int32, np.uint64])
def test_compiled_sums_take_any_integer_count(monkeypatch: pytest.MonkeyPatch,
                                               count_dtype: Any) -> None:
    """Repeated pairs both ways round, self pairs, a lone pair; counts of any integer
    dtype (bool included): the same pairs, sums and counts as numpy's."""
    rng = np.random.default_rng(17)
    u = rng.integers(0, 9, 400)
    v = rng.integers(0, 9, 400)
    u[:3], v[:3] = [5, 2, 7], [2, 5, 7]
    weight = rng.random(400).astype(np.float32)
    count = None if count_dtype is None else rng.integers(0, 2, 400).astype(count_dtype)
    plain, compiled = _both(monkeypatch, lambda: Edges.aggregate(u, v, weight, count))
    for field in ("u", "v", "total", "count"):
        a, b = getattr(plain, field), getattr(compiled, field)
        assert a.dtype == b.dtype and np.array_equal(a, b), field


def test_compiled_sums_of_no_pair_and_only_self_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    for u, v in ((np.zeros(0, np.int64), np.zeros(0, np.int64)), (np.arange(5), np.arange(5))):
        plain, compiled = _both(monkeypatch, lambda u=u, v=v: Edges.aggregate(u, v, np.ones(
            u.size)))
        assert plain.u.size == compiled.u.size == 0


def test_compiled_merges_break_all_ties_as_python(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every mean equal (uint8 affinities): the order is the ranks' alone, and a rank
    that reverses the ids must be followed by both loops alike; equal sizes keep the
    lower id."""
    rng = np.random.default_rng(19)
    n = 60
    u = rng.integers(1, n, 300)
    v = rng.integers(1, n, 300)
    edges = Edges.aggregate(u, v, np.full(300, 0.5), np.ones(300, np.int64))
    edges = Edges(edges.u, edges.v, edges.count * 0.5, edges.count)
    sizes = rng.integers(1, 6, n).astype(np.uint64)
    for rank in (None, np.arange(n)[::-1].copy()):
        plain, compiled = _both(monkeypatch, lambda rank=rank: merge_small(sizes, edges, 8,
                                                                          rank=rank))
        assert np.array_equal(plain, compiled)
        assert not np.array_equal(plain, np.arange(n))  # merges happened


def test_compiled_merges_of_edges_between_large_segments_only(loops: str) -> None:
    """No edge touches a small segment: nothing to merge, on either loop (the compiled
    one then gets empty arrays)."""
    sizes = np.array([0, 50, 60, 70, 2])
    edges = Edges(np.array([1, 2]), np.array([2, 3]), np.array([0.5, 0.9]),
                  np.array([1, 1]))
    assert np.array_equal(merge_small(sizes, edges, 10), np.arange(5))


# ----------------------------------------------------------------------------------------------
# the shared daisy stop (emrun.devices)


class _Client:
    """A daisy client stand-in handing out ``blocks``, then None."""

    def __init__(self, blocks: list[int]) -> None:
        self.blocks = list(blocks)

    @contextlib.contextmanager
    def acquire_block(self) -> Iterator[int | None]:
        yield self.blocks.pop(0) if self.blocks else None


@contextlib.contextmanager
def _signals_kept() -> Iterator[None]:
    """`BlockStops` installs SIGINT and SIGTERM handlers: put pytest's back after."""
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def test_block_stops_serve_raises_an_error_before_any_stop(tmp_path: Path) -> None:
    from emrun.devices import BlockStops

    def process(block: Any) -> None:
        raise RuntimeError("a bug in the block's work")

    with _signals_kept():
        stops = BlockStops(tmp_path / "stop", tmp_path)
        with pytest.raises(RuntimeError, match="a bug"):
            stops.serve(_Client([1, 2]), process)


def test_block_stops_serve_raises_a_blocks_own_error_during_a_stop(tmp_path: Path) -> None:
    from emrun.devices import BlockStops

    def process(block: Any) -> None:
        (tmp_path / "stop").touch()  # another worker's stop, noted meanwhile
        raise RuntimeError("a bug in the block's work")

    with _signals_kept():
        stops = BlockStops(tmp_path / "stop", tmp_path)
        with pytest.raises(RuntimeError, match="a bug"):
            stops.serve(_Client([1, 2]), process)
