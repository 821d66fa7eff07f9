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

Maximin edges are maximum-spanning-tree edges, so scipy's compiled MST finds the tree and a
Python loop runs only over its merges (Kruskal in decreasing affinity with union-find).
Objects are the connected components of the target's positive nearest-neighbour edges in
the patch (as ``relabel: true`` makes them); each such object is one label, so the pairs
joined by a merge are products of component sizes (the label histograms of the general
algorithm collapse to one count). A voxel with no valid incident edge (unlabelled under
``zero: mask``) is in no pair; masked edges are not in the graph.

The weights are constants computed on the CPU without gradient; the loss is
``sum_e w_e * BCE(logit_e, target_e) / sum_e w_e`` over the batch, so gradients flow through
the logits of the weighted MST edges only (positive-pass edges have target 1, negative-pass
edges target 0). The task's other (long-range) channels get the plain masked BCE of
:mod:`.base`, weighted ``long_range`` and added. ``LossResult.valid`` counts the valid
voxels of all channels, as the other losses do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components, minimum_spanning_tree
from torch import Tensor

from ..recipe.tasks import NEAREST, AffinityTarget, MalisLoss
from ..registry import losses
from .base import BCE, Loss, LossResult, _prepare

__all__ = ["Malis", "build_malis", "malis_weights", "nearest_channels"]


def nearest_channels(offsets: Sequence[Sequence[int]]) -> list[int]:
    """The channels of the (-1,0,0), (0,-1,0), (0,0,-1) offsets, in that order."""
    as_tuples = [tuple(o) for o in offsets]
    missing = [list(o) for o in NEAREST if o not in as_tuples]
    if missing:
        raise ValueError(f"malis needs the nearest-neighbour offsets; missing {missing}")
    return [as_tuples.index(o) for o in NEAREST]


def _edges(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every nearest-neighbour edge as (flat index into (3, z, y, x), voxel v, voxel v - e_c):
    channel c at v links v and v + NEAREST[c]."""
    n = int(np.prod(shape))
    voxel = np.arange(n, dtype=np.int64).reshape(shape)
    flat, u, w = [], [], []
    for c in range(3):
        here = [slice(None)] * 3
        there = [slice(None)] * 3
        here[c], there[c] = slice(1, None), slice(None, -1)
        v = voxel[tuple(here)].ravel()
        flat.append(c * n + v)
        u.append(v)
        w.append(voxel[tuple(there)].ravel())
    return np.concatenate(flat), np.concatenate(u), np.concatenate(w)


def _kruskal(n: int, u: np.ndarray, w: np.ndarray, aff: np.ndarray, count: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
    """Maximum spanning forest of the graph (n nodes, edges u-w of affinity ``aff``; at most
    one edge per node pair) walked in decreasing affinity: (indices into the edge arrays of
    the forest's edges, pairs joined by each = product of the two components' ``count``)."""
    if len(u) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    # 2 - a > 0 everywhere, so scipy keeps every edge and its minimum tree is our maximum one
    graph = coo_matrix((2.0 - aff.astype(np.float64), (u, w)), shape=(n, n)).tocsr()
    tree = minimum_spanning_tree(graph).tocoo()
    lo, hi = np.minimum(u, w), np.maximum(u, w)
    keys = lo * n + hi
    order = np.argsort(keys, kind="stable")
    found = order[np.searchsorted(keys[order],
                                  np.minimum(tree.row, tree.col).astype(np.int64) * n
                                  + np.maximum(tree.row, tree.col))]
    found = found[np.argsort(-aff[found], kind="stable")]
    parent = list(range(n))
    size = count.astype(np.int64).tolist()
    pairs = np.empty(len(found), np.float64)
    a_list, b_list = u[found].tolist(), w[found].tolist()
    for i in range(len(found)):
        a, b = a_list[i], b_list[i]
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        while parent[b] != b:
            parent[b] = parent[parent[b]]
            b = parent[b]
        pairs[i] = size[a] * size[b]
        if size[a] < size[b]:
            a, b = b, a
        parent[b] = a
        size[a] += size[b]
    return found, pairs


def malis_weights(aff: np.ndarray, target: np.ndarray, valid: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Per-edge pair counts of one patch: (positive, negative), each shaped like ``aff``.

    ``aff`` (3, z, y, x) holds predicted nearest-neighbour affinities in [0, 1] (channel c at
    v links v and v + NEAREST[c]); ``target`` and ``valid`` are boolean arrays of that shape.
    """
    shape = tuple(int(s) for s in aff.shape[1:])
    n = int(np.prod(shape))
    flat, u, w = _edges(shape)  # type: ignore[arg-type]
    a = np.nan_to_num(aff.reshape(-1)[flat].astype(np.float64), nan=0.5)
    a = np.clip(a, 0.0, 1.0)
    ok = valid.reshape(-1)[flat]
    inside = ok & target.reshape(-1)[flat]
    pos = np.zeros(3 * n, np.float64)
    neg = np.zeros(3 * n, np.float64)

    known = np.zeros(n, bool)
    known[u[ok]] = True
    known[w[ok]] = True
    # positive pass: the forest of within-object edges; every voxel counts 1
    sel = np.flatnonzero(inside)
    found, pairs = _kruskal(n, u[sel], w[sel], a[sel], np.ones(n))
    pos[flat[sel[found]]] = pairs
    # negative pass: objects contracted (their edges at 1), the other valid edges between them
    graph = coo_matrix((np.ones(len(sel)), (u[sel], w[sel])), shape=(n, n))
    m, comp = connected_components(graph, directed=False)
    count = np.bincount(comp, weights=known, minlength=m)
    between = np.flatnonzero(ok & ~inside)
    between = between[comp[u[between]] != comp[w[between]]]
    cu, cw = comp[u[between]], comp[w[between]]
    keys = np.minimum(cu, cw).astype(np.int64) * m + np.maximum(cu, cw)
    order = np.lexsort((-a[between], keys))  # per component pair, the strongest edge first
    first = order[np.r_[True, keys[order][1:] != keys[order][:-1]]] if len(order) else order
    edges = between[first]
    found, pairs = _kruskal(m, comp[u[edges]], comp[w[edges]], a[edges], count)
    neg[flat[edges[found]]] = pairs
    return pos.reshape(aff.shape), neg.reshape(aff.shape)


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
        for i in range(aff.shape[0]):
            pos, neg = malis_weights(aff[i], tgt[i], ok[i])
            weight[i] = pos + neg
        total = float(weight.sum())
        w = torch.from_numpy(weight).to(device=logits.device, dtype=torch.float32)
        chosen = w > 0
        safe = torch.where(chosen, nn_logits, 0.0)
        bce = F.binary_cross_entropy_with_logits(safe, nn_target, reduction="none")
        loss = torch.where(chosen, bce * w, 0.0).sum() / max(total, 1.0)
        others = [c for c in range(logits.shape[1]) if c not in nn]
        if others and self.long_range > 0:
            rest = BCE()(logits[:, others], target[:, others], valid[:, others])
            loss = loss + self.long_range * rest.loss
        return LossResult(loss=loss, valid=valid.sum(dtype=torch.float32).detach())


@losses.implement("malis")
def build_malis(spec: MalisLoss, *, target: object = None, **context: Any) -> Loss:
    """The ``malis`` loss of a task; needs the task's ``target`` (an affinity target with the
    nearest-neighbour offsets) to know which channels those are."""
    if not isinstance(target, AffinityTarget):
        raise ValueError("malis needs the task's affinity target (build it with target=...)")
    z, y, x = nearest_channels(target.offsets)
    return Malis(nearest=(z, y, x), long_range=spec.long_range)
