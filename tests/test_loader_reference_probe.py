"""Reference probe of the training data stream: `train_batches` (worker processes, the order
batches come in, ``start=`` where a resumed run continues, ``rank=``), `SampleMaker` (which
source, where each patch) against references written here.

The reference stream is the documented definition (README, Loader): batch k of rank r is
``SampleMaker(recipe).batch(seed, r, k)``, a pure function of (seed, rank, k), made in this
process by a fresh maker. The loader, with 0, 2 or 3 workers and any ``start``, must yield
exactly those arrays, in that order. Mixture shares and patch positions are counted over many
samples drawn by the real sample path, on volumes whose voxels say which source and where
they come from; seeds are fixed and bounds loose (5 sigma), so nothing can flake.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from emrun.data.loader import to_tensors, train_batches
from emrun.data.samples import SampleMaker, batch_rng
from emrun.data.sources import mixture_weights, open_sources
from emrun.recipe import Recipe

SEED = 3

SYNTHETIC = {
    "a": {"type": "synthetic", "shape": [8, 72, 72], "seed": 1, "weight": 1.0},
    "b": {"type": "synthetic", "shape": [8, 72, 72], "seed": 2, "weight": 3.0},
}
AFFINITY = {"target": {"type": "affinity", "offsets": [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]}}


def recipe_of(sources: dict, *, augment: Any = "none", tasks: dict | None = None,
              patch: tuple[int, int, int] = (4, 16, 16), batch_size: int = 2,
              workers: int = 0, seed: int = SEED) -> Recipe:
    return Recipe.model_validate({
        "name": "loaderprobe", "seed": seed, "data": {"sources": sources},
        "model": {"type": "rsunet", "widths": [4, 8]},
        "augment": augment,
        "tasks": tasks or {"aff": AFFINITY},
        "train": {"patch": list(patch), "iterations": 1, "batch_size": batch_size,
                  "workers": workers},
    })


def full_recipe(workers: int = 0) -> Recipe:
    """Two weighted synthetic sources, every deepem augmentation, affinity and lsd targets:
    every random draw the sample path makes takes part."""
    return recipe_of(SYNTHETIC, augment="deepem", workers=workers,
                     tasks={"aff": AFFINITY, "lsd": {"target": {"type": "lsd"}}})


def flat(batch: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """A (nested) batch of numpy arrays or tensors as {path: numpy array}."""
    if isinstance(batch, dict):
        out: dict[str, np.ndarray] = {}
        for key, value in batch.items():
            out.update(flat(value, f"{prefix}/{key}"))
        return out
    return {prefix: batch.numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch)}


def same(got: Any, want: Any) -> bool:
    """Bit for bit the same arrays under the same keys, dtypes and shapes."""
    g, w = flat(got), flat(want)
    return g.keys() == w.keys() and all(
        g[k].dtype == w[k].dtype and g[k].shape == w[k].shape and
        np.array_equal(g[k].view(np.uint8), w[k].view(np.uint8)) for k in g)


def reference(recipe: Recipe, rank: int, indices: range) -> list[dict]:
    """The documented stream: batch k = SampleMaker(recipe).batch(seed, rank, k), each by a
    maker that has made no other batch."""
    return [SampleMaker(recipe, keep_memory=False).batch(recipe.seed, rank, k)
            for k in indices]


def first(stream, n: int) -> list[dict]:
    try:
        return [next(stream) for _ in range(n)]
    finally:
        stream.close()


@pytest.fixture(scope="module")
def full() -> tuple[Recipe, list[dict]]:
    recipe = full_recipe()
    return recipe, reference(recipe, 0, range(8))


# ---------------------------------------------------------------- workers, start, rank


def test_reference_batches_differ_from_index_to_index(full):
    """The reference itself: 8 distinct batches (the comparisons below would otherwise pass
    for a stream stuck on one batch or shifted by one)."""
    _, ref = full
    for i, j in itertools.combinations(range(len(ref)), 2):
        assert not np.array_equal(ref[i]["image"], ref[j]["image"]), (i, j)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_stream_is_the_reference_batch_for_batch(full, workers):
    """workers 0 and 2: the first 8 batches are the reference's 0..7, every array (image,
    packed targets and masks, x) bit for bit, in order."""
    recipe, ref = full
    got = first(train_batches(recipe, workers=workers, pin_memory=False), len(ref))
    for k, (g, w) in enumerate(zip(got, ref, strict=True)):
        assert same(g, to_tensors(w)), f"batch {k} with {workers} workers"


@pytest.mark.parametrize(("workers", "start"), [(0, 3), (0, 1), (2, 3), (2, 4), (3, 5)])
def test_a_stream_started_at_n_continues_the_reference_from_n(full, workers, start):
    """start=N (a resumed run) yields the reference's batches N, N+1, ...: with 2 or 3
    workers too, for N not a multiple of the worker count."""
    recipe, ref = full
    got = first(train_batches(recipe, workers=workers, start=start, pin_memory=False),
                len(ref) - start)
    for k, g in enumerate(got, start):
        assert same(g, to_tensors(ref[k])), f"batch {k} of a stream started at {start}"


def test_train_workers_of_the_recipe_is_the_default_and_gives_the_same_stream(full):
    """train.workers: 2 in the recipe (no workers= argument): the same reference stream."""
    _, ref = full
    got = first(train_batches(full_recipe(workers=2), start=2, pin_memory=False), 4)
    for k, g in enumerate(got, 2):
        assert same(g, to_tensors(ref[k])), k


def test_rank_1_draws_its_own_stream_no_shift_of_rank_0s(full):
    """Rank 1 (through 2 workers, from start 1) is the reference of rank 1; none of its
    batches is any of rank 0's first 8 (a rank folded into the index, k + rank, would make
    rank 1's stream rank 0's shifted by one)."""
    recipe, ref0 = full
    ref1 = reference(recipe, 1, range(1, 6))
    got = first(train_batches(recipe, rank=1, workers=2, start=1, pin_memory=False), 5)
    for k, (g, w) in enumerate(zip(got, ref1, strict=True), 1):
        assert same(g, to_tensors(w)), f"rank 1 batch {k}"
    for one, zero in itertools.product(ref1, ref0):
        assert not np.array_equal(one["image"], zero["image"])


def test_batches_are_a_pure_function_of_seed_rank_and_index(full):
    """The same recipe built again (from its dump), one maker making batches 7..0 backwards after
    a detour through rank 1 and other indices, gives the reference's arrays; another seed
    gives other batches."""
    recipe, ref = full
    loaded = Recipe.model_validate_json(recipe.model_dump_json())
    assert loaded is not recipe
    assert loaded.seed == SEED
    maker = SampleMaker(loaded, keep_memory=False)
    for k in (40, 3, 3):
        maker.batch(SEED, 1, k)
    for k in reversed(range(len(ref))):
        assert same(maker.batch(SEED, 0, k), ref[k]), k
    other = SampleMaker(full_recipe(), keep_memory=False).batch(SEED + 1, 0, 0)
    assert not np.array_equal(other["image"], ref[0]["image"])


def test_different_seeds_never_share_a_batch_stream():
    """Seeds up to 2**63 are valid. Seed 2**32 = words [0, 1]: its (rank 0, batch 0) random
    stream was [0, 1, 0, 0], and seed 0's (rank 1, batch 0) is [0, 1, 0], zero-padded by
    SeedSequence to the same pool: two runs with different seeds drew the same batch."""
    keys = [(seed, rank, index) for seed in (0, 1, 2, 2**32, 2**32 + 1, 2**33, 2**63 - 1)
            for rank in (0, 1, 2) for index in (0, 1, 2)]
    streams = {tuple(batch_rng(*key).integers(0, 2**63, 4)) for key in keys}
    assert len(streams) == len(keys)
    assert np.array_equal(batch_rng(5, 1, 2).random(4),  # seeds below 2**32 kept theirs
                          np.random.default_rng([5, 1, 2]).random(4))


# ---------------------------------------------------------------- which source


def constant_source(tmp_path: Path, name: str, value: int, labelled: int,
                    shape: tuple[int, int, int] = (4, 8, 12), **extra: Any) -> dict:
    """A source whose image is ``value`` everywhere (so a sample names its source) and whose
    first ``labelled`` voxels (C order) are labelled."""
    image = np.full(shape, value, np.uint8)
    labels = np.zeros(int(np.prod(shape)), np.uint32)
    labels[:labelled] = 1
    np.save(tmp_path / f"{name}_i.npy", image)
    np.save(tmp_path / f"{name}_l.npy", labels.reshape(shape))
    return {"image": str(tmp_path / f"{name}_i.npy"),
            "labels": str(tmp_path / f"{name}_l.npy"), **extra}


VALUES = {"a": 40, "b": 120, "c": 200}


def source_shares(recipe: Recipe, batches: int) -> dict[str, int]:
    """How many samples of the stream's batches 0..batches-1 came from each source, told
    by the image value (float16 in the batch)."""
    maker = SampleMaker(recipe, keep_memory=False)
    found = {name: 0 for name in VALUES}
    for k in range(batches):
        image = maker.batch(recipe.seed, 0, k)["image"].astype(np.float32)
        for sample in image:
            (value,) = np.unique(np.rint(sample * 255).astype(int))
            (name,) = [n for n, v in VALUES.items() if v == value]
            found[name] += 1
    return found


def assert_shares(found: dict[str, int], want: dict[str, float]) -> None:
    """Each count within 5 binomial sigma of its share, and a chi-square within dof + 6
    sqrt(2 dof)."""
    n = sum(found.values())
    chi2 = 0.0
    for name, p in want.items():
        expect = n * p
        if p == 0:
            assert found[name] == 0, (name, found)
            continue
        assert abs(found[name] - expect) < 5 * np.sqrt(n * p * (1 - p)), (name, found, want)
        chi2 += (found[name] - expect) ** 2 / expect
    dof = sum(p > 0 for p in want.values()) - 1
    assert chi2 < dof + 6 * np.sqrt(2 * dof), (chi2, found, want)


def test_source_shares_follow_the_recipe_weights(tmp_path):
    """Weights 1 : 2 : 5 (labelled fractions not in that ratio): over 1,600 samples of the
    stream, shares 1/8, 2/8, 5/8."""
    sources = {name: constant_source(tmp_path, name, VALUES[name], labelled=n, weight=w)
               for name, n, w in (("a", 384, 1.0), ("b", 10, 2.0), ("c", 200, 5.0))}
    recipe = recipe_of(sources, patch=(2, 4, 4), batch_size=8)
    found = source_shares(recipe, 200)
    assert_shares(found, {"a": 1 / 8, "b": 2 / 8, "c": 5 / 8})


def test_default_shares_are_the_exact_labelled_voxel_counts(tmp_path):
    """No weights: shares proportional to the labelled voxels, counted exactly here (4
    sections: every one is read), different box sizes, a roi and a mask included."""
    shape_c = (4, 8, 16)
    mask = np.zeros(shape_c, np.uint8)
    mask[:, :, :8] = 1  # half the box; labels everywhere
    np.save(tmp_path / "m.npy", mask)
    sources = {
        "a": constant_source(tmp_path, "a", VALUES["a"], labelled=96),
        "b": constant_source(tmp_path, "b", VALUES["b"], labelled=384, shape=(4, 12, 12),
                             roi={"offset": [0, 0, 0], "shape": [4, 8, 12]}),
        "c": constant_source(tmp_path, "c", VALUES["c"], labelled=512, shape=shape_c,
                             mask=str(tmp_path / "m.npy")),
    }
    # counted here: a's 96; b's labels (its first 384 voxels: z 0-1 whole, z 2 rows 0-7)
    # inside its roi's rows 0-7; c labelled everywhere, inside the mask
    labels_b = (np.arange(4 * 12 * 12) < 384).reshape(4, 12, 12)
    counts = {"a": 96, "b": int(labels_b[:, :8, :].sum()), "c": int(mask.sum())}
    assert counts == {"a": 96, "b": 288, "c": 256}
    total = sum(counts.values())
    want = {name: count / total for name, count in counts.items()}
    recipe = recipe_of(sources, patch=(2, 4, 4), batch_size=8)
    np.testing.assert_allclose(mixture_weights(open_sources(recipe.data.sources)),
                               [want["a"], want["b"], want["c"]], rtol=1e-12)
    assert_shares(source_shares(recipe, 200), want)


# ---------------------------------------------------------------- where in the source


SCALE = 65535


def coded_source(tmp_path: Path, shape: tuple[int, int, int], **extra: Any) -> dict:
    """Image voxel (z, y, x) holds z * 1024 + y * 32 + x (uint16, read back exactly from the
    float32 sample through `intensity` 0..65535); labels all 1."""
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    np.save(tmp_path / "ci.npy", (z * 1024 + y * 32 + x).astype(np.uint16))
    np.save(tmp_path / "cl.npy", np.ones(shape, np.uint32))
    return {"image": str(tmp_path / "ci.npy"), "labels": str(tmp_path / "cl.npy"),
            "intensity": {"low": 0, "high": SCALE}, **extra}


def drawn_corners(recipe: Recipe, samples: int, patch: tuple[int, int, int]) -> list[tuple]:
    """The corner of each sample the real sample path makes (SampleMaker.sample with each
    batch's random stream), checked to be one whole unaugmented crop of the coded image."""
    maker = SampleMaker(recipe, keep_memory=False)
    corners = []
    for k in range(samples):
        image = np.rint(maker.sample(batch_rng(recipe.seed, 0, k))["image"][0] * SCALE)
        code = image.astype(np.int64)
        corner = (int(code[0, 0, 0]) // 1024, int(code[0, 0, 0]) // 32 % 32,
                  int(code[0, 0, 0]) % 32)
        z, y, x = np.meshgrid(*(np.arange(c, c + p) for c, p in zip(corner, patch,
                                                                      strict=True)),
                              indexing="ij")
        assert np.array_equal(code, z * 1024 + y * 32 + x), corner
        corners.append(corner)
    return corners


def test_every_corner_of_the_roi_is_drawn_and_none_outside(tmp_path):
    """A roi with an offset in a 6x12x14 volume, patch 2x4x4: the 3 x 4 x 6 corners at which
    the patch fits in the roi are each drawn (25 draws each on average, at least 5), no
    other corner; counts within 5 sigma of uniform."""
    patch = (2, 4, 4)
    roi = {"offset": [1, 2, 3], "shape": [4, 7, 9]}
    recipe = recipe_of({"s": coded_source(tmp_path, (6, 12, 14), roi=roi)}, patch=patch,
                       batch_size=1)
    room = tuple(s - p + 1 for s, p in zip(roi["shape"], patch, strict=True))
    allowed = {tuple(o + r for o, r in zip(roi["offset"], rel, strict=True))
               for rel in itertools.product(*(range(n) for n in room))}
    draws = 25 * len(allowed)
    corners = drawn_corners(recipe, draws, patch)
    outside = set(corners) - allowed
    assert not outside, sorted(outside)[:5]
    counts = np.array([corners.count(c) for c in sorted(allowed)])
    assert counts.min() >= 5, (counts.min(), int((counts == 0).sum()))
    assert np.all(np.abs(counts - 25) < 5 * 5 + 1), (counts.min(), counts.max())


def test_with_a_mask_every_fitting_masked_centre_and_no_other_is_drawn(tmp_path):
    """A sparse mask (incl. voxels so near the edge that no patch fits around them): every
    sample's centre (corner + patch // 2) is a masked voxel around which the patch fits,
    and every such voxel is drawn, about equally often."""
    shape, patch = (6, 12, 14), (2, 4, 4)
    mask = np.zeros(shape, np.uint8)
    rng = np.random.default_rng(5)
    mask[rng.random(shape) < 0.12] = 1
    mask[0, 0, 0] = mask[5, 11, 13] = mask[3, 0, 7] = 1  # centres no patch fits around
    np.save(tmp_path / "cm.npy", mask)
    recipe = recipe_of({"s": coded_source(tmp_path, shape, mask=str(tmp_path / "cm.npy"))},
                       patch=patch, batch_size=1)
    half = tuple(p // 2 for p in patch)
    fits = np.zeros(shape, bool)
    fits[tuple(slice(h, n - (p - h) + 1) for h, n, p in zip(half, shape, patch,
                                                              strict=True))] = True
    allowed = {tuple(int(v) for v in c) for c in np.argwhere(mask.astype(bool) & fits)}
    assert 20 < len(allowed) < 100
    draws = 20 * len(allowed)
    centres = [tuple(c + h for c, h in zip(corner, half, strict=True))
               for corner in drawn_corners(recipe, draws, patch)]
    wrong = set(centres) - allowed
    assert not wrong, sorted(wrong)[:5]
    counts = np.array([centres.count(c) for c in sorted(allowed)])
    assert counts.min() >= 2, int((counts == 0).sum())
    assert np.all(np.abs(counts - 20) < 5 * np.sqrt(20) + 1), (counts.min(), counts.max())


def test_the_loader_stream_carries_the_sample_paths_positions(tmp_path):
    """Through 2 workers from start 2: batch k's samples are those SampleMaker draws for
    (seed, 0, k), the crops of a coded volume (float16 in the batch: compared with the
    float16 of the reference sample)."""
    patch = (2, 4, 4)
    recipe = recipe_of({"s": coded_source(tmp_path, (6, 12, 14))}, patch=patch,
                       batch_size=3)
    ref = reference(recipe, 0, range(2, 6))
    got = first(train_batches(recipe, workers=2, start=2, pin_memory=False), 4)
    for k, (g, w) in enumerate(zip(got, ref, strict=True), 2):
        assert same(g, to_tensors(w)), k
        maker = SampleMaker(recipe, keep_memory=False)
        rng = batch_rng(SEED, 0, k)
        for s in range(3):
            want = maker.sample(rng)["image"].astype(np.float16)
            assert np.array_equal(g["image"][s].numpy(), want), (k, s)


def test_a_user_error_in_a_worker_is_the_same_user_error_as_without_workers(tmp_path):
    """A source no patch of which passes min_labelled: with 2 workers the trainer's stream
    raises the UserError naming the source that workers 0 raises, not torch's wrapped
    worker traceback."""
    from emrun.errors import UserError

    spec = constant_source(tmp_path, "a", 40, labelled=0, min_labelled=0.5)
    spec["labels"] = constant_source(tmp_path, "l", 40, labelled=3)["labels"]
    recipe = recipe_of({"a": spec}, patch=(2, 4, 4))
    messages = []
    for workers in (0, 2):
        with pytest.raises(UserError) as caught:
            first(train_batches(recipe, workers=workers, pin_memory=False), 1)
        messages.append(str(caught.value))
    assert messages[0] == messages[1]
    assert "data.sources.a" in messages[0] and "min_labelled" in messages[0]


# ---------------------------------------------------------------- the trainer's position


TRAIN = """\
name: loaderprobe
seed: 3
data:
  sources:
    a: {type: synthetic, shape: [8, 40, 40], seed: 1}
augment: [{type: flip_rotate}]
model: {type: rsunet, widths: [4, 8], norm: group, groups: 2}
tasks:
  affinity: {target: {type: affinity}}
train:
  patch: [4, 16, 16]
  batch_size: 1
  accumulate: 2
  iterations: 2
  optimizer: {type: adam, lr: 0.01}
  checkpoint_every: 100
  validate_every: 0
  image_every: 0
  log_every: 1
  workers: 0
"""


def test_a_resumed_run_draws_exactly_the_batches_the_straight_run_drew(tmp_path, monkeypatch):
    """accumulate 2, stopped by SIGTERM after 1 iteration (2 batches) and resumed with
    train.workers 2: the resumed stream starts at batch 2, and the batches the two sessions
    drew are, in order, those of the uninterrupted run: 4 batches, each the reference's."""
    import signal

    import emrun.train.trainer as trainer_module
    from emrun.recipe import load_recipe
    from emrun.train.trainer import Trainer

    path = tmp_path / "r.yaml"
    path.write_text(TRAIN, encoding="utf-8")
    real = trainer_module.train_batches
    drawn: list[tuple[int, int, list[np.ndarray]]] = []

    def recording(recipe, *, rank=0, start=0, **kwargs):
        drawn.append((rank, start, []))
        for batch in real(recipe, rank=rank, start=start, pin_memory=False, **kwargs):
            drawn[-1][2].append(batch["image"].numpy().copy())
            yield batch

    monkeypatch.setattr(trainer_module, "train_batches", recording)
    Trainer(load_recipe(path), tmp_path / "straight").fit()
    straight = drawn.pop()
    assert straight[:2] == (0, 0) and len(straight[2]) >= 4

    first_session = Trainer(load_recipe(path), tmp_path / "stopped")
    real_step, steps = first_session.step, {"n": 0}

    def step(batches):
        result = real_step(batches)
        steps["n"] += 1
        if steps["n"] == 1:
            signal.raise_signal(signal.SIGTERM)
        return result

    monkeypatch.setattr(first_session, "step", step)
    assert first_session.fit().interrupted == "SIGTERM"
    Trainer(load_recipe(path, ["train.workers=2"]), tmp_path / "stopped", resume=True).fit()
    (rank_a, start_a, a), (rank_b, start_b, b) = drawn
    assert (rank_a, start_a, rank_b, start_b) == (0, 0, 0, 2)
    consumed = a[:2] + b[:2]  # a generator may have fetched ahead; the steps took these
    ref = reference(load_recipe(path).recipe, 0, range(4))
    for k in range(4):
        assert np.array_equal(consumed[k], straight[2][k]), k
        assert np.array_equal(consumed[k], ref[k]["image"]), k
