"""Constrained MALIS: per-edge pair counts against a brute-force reference, the loss's
gradients, the recipe check and a short training run through the CLI."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import emrun.losses.malis
from emrun.cli import app
from emrun.losses import Malis, malis_weights
from emrun.losses.malis import nearest_channels
from emrun.recipe.tasks import NEAREST, AffinityTarget, MalisLoss
from emrun.registry import losses


def affinity_target(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(target, valid) of the nearest-neighbour channels, emrun's convention with
    ``zero: mask``: channel c at v links v and v + NEAREST[c]."""
    shape = (3, *labels.shape)
    target, valid = np.zeros(shape, bool), np.zeros(shape, bool)
    for c, off in enumerate(NEAREST):
        for v in itertools.product(*map(range, labels.shape)):
            o = tuple(a + b for a, b in zip(v, off, strict=True))
            if min(o) < 0:
                continue
            if labels[v] and labels[o]:
                valid[(c, *v)] = True
                target[(c, *v)] = labels[v] == labels[o]
    return target, valid


def brute_force(aff: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pair counts by definition: for each pair of labelled voxels, add edges in decreasing
    affinity until the two are connected; that edge is their maximin edge. Positive pass: only
    edges inside one object; negative pass: edges inside objects first (affinity 1), then
    the others between labelled voxels."""
    shape = labels.shape
    voxels = list(itertools.product(*map(range, shape)))
    edges = []  # (channel, v, other)
    for c, off in enumerate(NEAREST):
        for v in voxels:
            o = tuple(a + b for a, b in zip(v, off, strict=True))
            if min(o) >= 0 and labels[v] and labels[o]:
                edges.append((c, v, o))
    pos, neg = np.zeros(aff.shape), np.zeros(aff.shape)
    for out, same in ((pos, True), (neg, False)):
        def strength(e: tuple, same: bool = same) -> float:
            inside = labels[e[1]] == labels[e[2]]
            return -1.0 if same and not inside else (1.0 if inside and not same else
                                                     float(aff[(e[0], *e[1])]))
        ranked = sorted((e for e in edges if strength(e) >= 0), key=strength, reverse=True)
        for p, q in itertools.combinations([v for v in voxels if labels[v]], 2):
            if (labels[p] == labels[q]) != same:
                continue
            group = {p}
            for k in range(len(ranked)):  # grow the graph edge by edge, flood from p
                reached, frontier = {p}, [p]
                adj = ranked[:k + 1]
                while frontier:
                    x = frontier.pop()
                    for _, a, b in adj:
                        for s, t in ((a, b), (b, a)):
                            if s == x and t not in reached:
                                reached.add(t)
                                frontier.append(t)
                group = reached
                if q in group:
                    c, v, _ = ranked[k]
                    out[(c, *v)] += 1
                    break
    return pos, neg


def test_weights_equal_the_brute_force_pair_counts():
    rng = np.random.default_rng(0)
    for trial in range(4):
        labels = rng.integers(0, 3, size=(2, 3, 3))
        labels[0, 0, 0] = 1
        aff = rng.random((3, 2, 3, 3))
        target, valid = affinity_target(labels)
        # objects are connected pieces: relabel so both sides agree on what an object is
        from scipy.ndimage import label as cc
        pieces = np.zeros_like(labels)
        nxt = 1
        for value in np.unique(labels[labels > 0]):
            lab, k = cc(labels == value)
            pieces[lab > 0] = lab[lab > 0] + nxt - 1
            nxt += k
        pos, neg = malis_weights(aff, target, valid)
        want_pos, want_neg = brute_force(aff, pieces)
        np.testing.assert_array_equal(pos, want_pos, err_msg=f"trial {trial}")
        np.testing.assert_array_equal(neg, want_neg, err_msg=f"trial {trial}")
        n = int((pieces > 0).sum())
        assert pos.sum() + neg.sum() <= n * (n - 1) // 2


def test_two_objects_on_a_line():
    # 1 1 2 2 along x: one negative edge between them carries all 2 * 2 pairs
    labels = np.array([[[1, 1, 2, 2]]])
    target, valid = affinity_target(labels)
    aff = np.full((3, 1, 1, 4), 0.5)
    aff[2, 0, 0, 1], aff[2, 0, 0, 2], aff[2, 0, 0, 3] = 0.9, 0.3, 0.8
    pos, neg = malis_weights(aff, target, valid)
    assert pos[2, 0, 0].tolist() == [0, 1, 0, 1]
    assert neg[2, 0, 0].tolist() == [0, 0, 4, 0]


def test_every_pair_is_counted_once_on_a_patch_of_many_objects():
    # 4 x 128 x 128 voxels: 2 x 2 x 2 cubes, a fifth kept as objects, the rest cut into lone
    # voxels: more than 46341 components (once an int32 overflow in the negative pass)
    rng = np.random.default_rng(5)
    shape = (4, 128, 128)
    cube = np.arange(2 * 64 * 64).reshape(2, 64, 64).repeat(2, 0).repeat(2, 1).repeat(2, 2)
    kept = rng.random(cube.max() + 1) < 0.2
    labels = np.where(kept[cube], cube + 1, 0).astype(np.int64)
    lone = labels == 0
    labels[lone] = cube.max() + 2 + np.arange(lone.sum())
    assert len(np.unique(labels)) > 46341
    target = np.zeros((3, *shape), bool)
    valid = np.zeros((3, *shape), bool)
    for c in range(3):
        here = [slice(None)] * 3
        there = [slice(None)] * 3
        here[c], there[c] = slice(1, None), slice(None, -1)
        valid[c][tuple(here)] = True
        target[c][tuple(here)] = labels[tuple(here)] == labels[tuple(there)]
    pos, neg = malis_weights(rng.random((3, *shape)), target, valid)
    sizes = np.bincount(np.unique(labels, return_inverse=True)[1].ravel()).astype(np.int64)
    same = int((sizes * (sizes - 1) // 2).sum())  # objects are connected inside
    n = labels.size
    assert pos.sum() == same and neg.sum() == n * (n - 1) // 2 - same


def logits_of(aff: np.ndarray) -> torch.Tensor:
    return torch.logit(torch.tensor(aff, dtype=torch.float32).clamp(1e-6, 1 - 1e-6))[None]


def test_perfect_affinities_give_zero_loss_and_gradient():
    labels = np.array([[[1, 1, 0, 2], [1, 1, 2, 2], [3, 3, 3, 2]]] * 2)
    target, valid = affinity_target(labels)
    logits = torch.tensor(np.where(target, 30.0, -30.0), dtype=torch.float32)[None]
    logits.requires_grad_()
    loss = Malis(nearest=(0, 1, 2))(logits, torch.tensor(target[None], dtype=torch.float32),
                                     torch.tensor(valid[None], dtype=torch.float32))
    (grad,) = torch.autograd.grad(loss.loss, logits)
    assert loss.loss.item() < 1e-10
    assert grad.abs().max().item() < 1e-10


def test_lowering_a_wrong_merge_edge_lowers_the_loss():
    labels = np.array([[[1, 1, 2, 2], [1, 1, 2, 2]]])
    target, valid = affinity_target(labels)
    aff = np.where(target, 0.9, 0.1)
    aff[2, 0, 0, 2] = 0.95  # a wrong merge between the objects
    t = torch.tensor(target[None], dtype=torch.float32)
    m = torch.tensor(valid[None], dtype=torch.float32)
    malis = Malis(nearest=(0, 1, 2))
    x = logits_of(aff).requires_grad_()
    before = malis(x, t, m).loss
    (grad,) = torch.autograd.grad(before, x)
    assert grad[0, 2, 0, 0, 2] > 0  # gradient descent lowers the wrong edge
    assert grad[0, 2, 0, 1, 2] == 0  # the other boundary edge is not the maximin edge
    aff[2, 0, 0, 2] = 0.5
    after = malis(logits_of(aff), t, m).loss
    assert after.item() < before.item()


def test_long_range_channels_get_plain_bce():
    labels = np.array([[[1, 1, 2, 2]]] * 2)
    target, valid = affinity_target(labels)
    t = torch.tensor(target[None], dtype=torch.float32)
    m = torch.tensor(valid[None], dtype=torch.float32)
    logits = torch.zeros(1, 4, 2, 1, 4)
    full_t = torch.cat([t, torch.ones(1, 1, 2, 1, 4)], 1)
    full_m = torch.cat([m, torch.ones(1, 1, 2, 1, 4)], 1)
    nn_only = Malis(nearest=(0, 1, 2))(logits[:, :3], t, m).loss
    with_lr = Malis(nearest=(0, 1, 2), long_range=0.5)(logits, full_t, full_m).loss
    assert with_lr.item() == pytest.approx(nn_only.item() + 0.5 * np.log(2), rel=1e-5)


def test_builder_finds_the_nearest_channels_in_the_target():
    target = AffinityTarget(offsets=[(0, 0, -3), (0, 0, -1), (-1, 0, 0), (0, -1, 0)])
    assert losses.build(MalisLoss(), target=target) == Malis(nearest=(2, 3, 1))
    with pytest.raises(ValueError, match="nearest-neighbour"):
        nearest_channels([(0, 0, -1), (0, -1, 0)])
    with pytest.raises(ValueError, match="affinity target"):
        losses.build(MalisLoss())


RECIPE = """\
name: tiny
data:
  sources:
    a: {type: synthetic, shape: [16, 64, 64], seed: 1}
model: {type: rsunet, widths: [4, 8]}
tasks:
  affinity:
    target: {type: affinity, offsets: [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [0, 0, -3]]}
    loss: {type: malis}
train:
  patch: [8, 32, 32]
  iterations: 2
"""


def test_a_malis_recipe_trains_through_the_cli(write, tmp_path, monkeypatch):
    calls = []

    def counted(*args: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        calls.append(args[0].shape)
        return malis_weights(*args)

    monkeypatch.setattr(emrun.losses.malis, "malis_weights", counted)
    recipe = write(RECIPE)
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(recipe), "--run-dir", str(run),
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert len(calls) >= 2 and calls[0][0] == 3  # one patch per step, nn channels only
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    losses_seen = [e["loss/affinity"] for e in events if "loss/affinity" in e]
    assert losses_seen and all(math.isfinite(v) and v > 0 for v in losses_seen)


def test_a_batch_gets_each_patch_s_own_weights_in_order():
    # the patches of a batch run on threads: each must still get its own counts, in order
    rng = np.random.default_rng(4)
    patches = []
    for labels in rng.integers(1, 4, size=(3, 2, 6, 6)):
        target, valid = affinity_target(labels)
        patches.append((rng.random((3, *labels.shape)).astype(np.float32), target, valid))
    batch = emrun.losses.malis._each_patch(*(np.stack(part) for part in zip(*patches,
                                                                             strict=True)))
    assert len(batch) == 3
    for (pos, neg), patch in zip(batch, patches, strict=True):
        want_pos, want_neg = malis_weights(*patch)
        np.testing.assert_array_equal(pos, want_pos)
        np.testing.assert_array_equal(neg, want_neg)
