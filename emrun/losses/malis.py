"""Constrained MALIS (registry ``losses``: ``malis``; Turaga et al. 2009, Funke et al. 2018).

MALIS scores an affinity prediction by the segmentation it would give: for every pair of
voxels, the *maximin edge* (the weakest edge on the strongest path between them) decides
whether single-linkage agglomeration joins them. The loss puts on each edge the number of
voxel pairs whose maximin edge it is, so edges that cause (or would prevent) many wrong
merges weigh most.

Constrained MALIS runs two passes per patch on the nearest-neighbour graph:

* positive pass: only edges inside objects (every other edge at 0), so only pairs of one
  object count, each on the weakest edge of its best path inside the object;
* negative pass: edges inside objects at 1 (objects are merged first), so pairs of
  different objects count on the edge where their components first meet.

Maximin edges are the merges of Kruskal's algorithm: edges in decreasing affinity (a radix
sort), joined with union-find, all in loops compiled by numba: 0.25 s per 20x256x256 patch
on one core of the development VM (with a numpy sort and gathers around the loop 0.48 s;
with the loop in Python 2 s). The negative pass starts from the positive
pass's union-find, whose components are then exactly the objects. Objects are the connected
components of the target's positive nearest-neighbour edges in the patch (as ``relabel:
true`` makes them); each such object is one label, so the pairs joined by a merge are
products of component sizes (the label histograms of the general algorithm collapse to one
count). A voxel with no valid incident edge (unlabelled under ``zero: mask``) is in no
pair; masked edges are not in the graph.

The weights are constants computed on the CPU without gradient; the loss is
``sum_e w_e * BCE(logit_e, target_e) / sum_e w_e`` over the batch, so gradients flow through
the logits of the weighted MST edges only (positive-pass edges have target 1, negative-pass
edges target 0). A NaN logit of a valid edge makes the loss NaN, on the trees or off
them, as with every loss (the trainer's sign of divergence). The task's other (long-range)
channels get the plain masked BCE of :mod:`.base`, weighted ``long_range`` and added.
``LossResult.valid`` counts the valid voxels of all channels, as the other losses do.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..devices import cpu_cores
from ..recipe.tasks import NEAREST, AffinityTarget, MalisLoss
from ..registry import losses
from ..unionfind import find
from .base import BCE, Loss, LossResult, _prepare

__all__ = ["Malis", "build_malis", "malis_weights", "nearest_channels"]


def nearest_channels(offsets: Sequence[Sequence[int]]) -> list[int]:
    """The channels of the (-1,0,0), (0,-1,0), (0,0,-1) offsets, in that order."""
    as_tuples = [tuple(o) for o in offsets]
    missing = [list(o) for o in NEAREST if o not in as_tuples]
    if missing:
        raise ValueError(f"malis needs the nearest-neighbour offsets; missing {missing}")
    return [as_tuples.index(o) for o in NEAREST]


def malis_weights(aff: np.ndarray, target: np.ndarray, valid: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Per-edge pair counts of one patch: (positive, negative), each shaped like ``aff``.

    ``aff`` (3, z, y, x) holds predicted nearest-neighbour affinities in [0, 1] (channel c at
    v links v and v + NEAREST[c]); ``target`` and ``valid`` are boolean arrays of that shape.
    An edge off the patch (v on the low face of its axis) is never in the graph.
    """
    shape = np.asarray(aff.shape[1:], np.int64)
    n = int(np.prod(shape))
    index = np.int32 if 3 * n < 2**31 else np.int64  # half the memory the loops walk
    a = np.clip(np.nan_to_num(np.asarray(aff, np.float32), nan=0.5), 0.0, 1.0)
    pos = np.zeros(aff.shape, np.float64)
    neg = np.zeros(aff.shape, np.float64)
    _pair_counts(np.ascontiguousarray(a).reshape(-1),
                 np.ascontiguousarray(target, bool).reshape(-1),
                 np.ascontiguousarray(valid, bool).reshape(-1), shape,
                 np.arange(n, dtype=index), pos.reshape(-1), neg.reshape(-1))
    return pos, neg


@numba.njit(cache=True, nogil=True)
def _pair_counts(a: np.ndarray, target: np.ndarray, valid: np.ndarray, shape: np.ndarray,
                 parent: np.ndarray, pos: np.ndarray,
                 neg: np.ndarray) -> None:  # pragma: no cover - compiled
    """Both passes on flat (3, n) edge arrays: the valid edges split into within-object and
    the others, each set ordered strongest first (``_strongest_first``) and joined by
    Kruskal's algorithm (``_join``), which writes each merge's pair count at its edge.
    Inside, edge (c, v) is numbered ``3 v + c`` (dividing by 3, a constant, is cheap) and
    ``parent`` (the union-find, one node per voxel) sets the integer width."""
    n = parent.shape[0]
    stride = (shape[1] * shape[2], shape[2], 1)
    inside = np.empty(3 * n, parent.dtype)
    across = np.empty(3 * n, parent.dtype)
    known = np.zeros(n, parent.dtype)  # 1 for voxels with a valid edge: the ones in pairs
    n_in = 0
    n_across = 0
    for v in range(n):
        for c in range(3):
            if not valid[c * n + v] or (v // stride[c]) % shape[c] == 0:
                continue
            if target[c * n + v]:
                inside[n_in] = 3 * v + c
                n_in += 1
            else:
                across[n_across] = 3 * v + c
                n_across += 1
            known[v] = 1
            known[v - stride[c]] = 1
    # positive pass: within-object edges only; every voxel counts 1
    _join(_strongest_first(a, n, inside[:n_in]), n, stride, parent, np.ones_like(known), pos)
    # negative pass: objects joined (the positive pass left exactly them), then the other
    # valid edges; a component counts its voxels with a valid edge
    size = np.zeros_like(known)
    for v in range(n):
        size[find(parent, v)] += known[v]
    _join(_strongest_first(a, n, across[:n_across]), n, stride, parent, size, neg)


@numba.njit(cache=True, nogil=True)
def _join(edges: np.ndarray, n: int, stride: tuple[int, int, int], parent: np.ndarray,
          size: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """Kruskal over ``edges`` (``3 v + c``, in the order given) with union-find (path
    halving, union by ``size``): each merge writes the product of the two components' sizes
    at its edge in ``out`` (flat (3, n)); ``parent`` and ``size`` are updated in place."""
    for e in edges:
        v, c = e // 3, e % 3
        a = find(parent, v)
        b = find(parent, v - stride[c])
        if a == b:
            continue
        out[c * n + v] = float(size[a]) * float(size[b])
        if size[a] < size[b]:
            a, b = b, a
        parent[b] = a
        size[a] += size[b]


@numba.njit(cache=True, nogil=True)
def _strongest_first(a: np.ndarray, n: int, edges: np.ndarray
                     ) -> np.ndarray:  # pragma: no cover - compiled
    """``edges`` (``3 v + c``) by decreasing affinity ``a[c * n + v]``, ties in the order
    given: a radix sort of ``bits(1.0) - bits(a)`` (the float32 bits of values in [0, 1]
    order like the values), three stable counting passes over 10-bit digits that carry the
    keys along. Linear in the edges, where a comparison sort was half of a patch's cost."""
    bits = a.view(np.uint32)
    key = np.empty(edges.shape[0], np.uint32)
    for i in range(edges.shape[0]):
        e = edges[i]
        key[i] = np.uint32(0x3F800000) - bits[(e % 3) * n + e // 3]
    order = edges.copy()
    spare_key = np.empty_like(key)
    spare = np.empty_like(order)
    for shift in (0, 10, 20):
        count = np.zeros(1025, np.int64)
        for k in key:
            count[((k >> shift) & 1023) + 1] += 1
        for d in range(1, 1025):
            count[d] += count[d - 1]
        for i in range(key.shape[0]):
            d = (key[i] >> shift) & 1023
            spare_key[count[d]] = key[i]
            spare[count[d]] = order[i]
            count[d] += 1
        key, spare_key = spare_key, key
        order, spare = spare, order
    return order


@dataclass(frozen=True)
class Malis:
    """Constrained MALIS on the ``nearest`` channels plus ``long_range`` times masked BCE on
    the others (see the module docstring)."""

    nearest: tuple[int, int, int]
    long_range: float = 1.0

    def __call__(self, logits: Tensor, target: Tensor, mask: Tensor) -> LossResult:
        logits, target, valid = _prepare(logits, target, mask)
        nn = list(self.nearest)
        nn_logits, nn_target, nn_valid = logits[:, nn], target[:, nn], valid[:, nn]
        with torch.no_grad():
            aff = torch.sigmoid(nn_logits).cpu().numpy()
            tgt = (nn_target > 0.5).cpu().numpy()
            ok = nn_valid.cpu().numpy()
        weight = np.zeros(aff.shape, np.float64)
        for i, (pos, neg) in enumerate(_each_patch(aff, tgt, ok)):
            weight[i] = pos + neg
        total = float(weight.sum())
        w = torch.from_numpy(weight).to(device=logits.device, dtype=torch.float32)
        chosen = w > 0
        safe = torch.where(chosen, nn_logits, 0.0)
        bce = F.binary_cross_entropy_with_logits(safe, nn_target, reduction="none")
        loss = torch.where(chosen, bce * w, 0.0).sum() / max(total, 1.0)
        # a NaN logit where valid is a diverged network, as with the other losses, even off
        # the maximin trees (whose weights took it as 0.5): the loss is then NaN (no sync)
        hidden = (torch.isnan(nn_logits) & nn_valid).any()
        loss = loss + torch.where(hidden, float("nan"), 0.0)
        others = [c for c in range(logits.shape[1]) if c not in nn]
        if others and self.long_range > 0:
            rest = BCE()(logits[:, others], target[:, others], valid[:, others])
            loss = loss + self.long_range * rest.loss
        return LossResult(loss=loss, valid=valid.sum(dtype=torch.float32).detach())


def _each_patch(aff: np.ndarray, target: np.ndarray, valid: np.ndarray
                ) -> list[tuple[np.ndarray, np.ndarray]]:
    """``malis_weights`` of each patch of a batch, in order. The compiled pass releases the
    GIL, so patches run on threads at once, one core each (a batch of 2 on the 2-core
    development VM: 0.35 s, one patch 0.26 s)."""
    if aff.shape[0] == 1:
        return [malis_weights(aff[0], target[0], valid[0])]
    with ThreadPoolExecutor(max_workers=min(aff.shape[0], cpu_cores())) as pool:
        return list(pool.map(malis_weights, aff, target, valid))


@losses.implement("malis")
def build_malis(spec: MalisLoss, *, target: object = None, **context: Any) -> Loss:
    """The ``malis`` loss of a task; needs the task's ``target`` (an affinity target with the
    nearest-neighbour offsets) to know which channels those are."""
    if not isinstance(target, AffinityTarget):
        raise ValueError("malis needs the task's affinity target (build it with target=...)")
    z, y, x = nearest_channels(target.offsets)
    return Malis(nearest=(z, y, x), long_range=spec.long_range)
