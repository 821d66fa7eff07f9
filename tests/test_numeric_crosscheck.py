"""emrun's numbers against independent references on small random inputs: scores against
brute-force sums and scikit-image, streamed and blockwise scoring against in-memory, targets
against voxel-by-voxel loops and scipy filters, losses against their formulas, MALIS against
a threshold-connectivity search, and geometric augmentations against coordinate tracking.

Inputs mix what breaks code: odd shapes, one-voxel axes, anisotropic voxel sizes, label 0
present or absent, ids such as 2**40 and 2**64 - 2, negative ids, every integer dtype."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import cc3d
import numpy as np
import pytest
import torch
from pydantic import TypeAdapter
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from emrun.data.augment import Context, Pipeline, Sample
from emrun.data.lsd import local_shape_descriptors
from emrun.data.sampler import PatchSampler
from emrun.data.sources import Source
from emrun.data.targets import Affinity, Distance, Patch, relabel_components
from emrun.evaluate import score, score_volumes
from emrun.evaluate.blockwise import merge_blocks, prepare, write_block
from emrun.evaluate.metrics import scores_from_table
from emrun.evaluate.volumes import _checked
from emrun.geometry import box_of
from emrun.infer.tta import variants
from emrun.io import open_volume
from emrun.losses.base import BCE, MSE
from emrun.losses.dice import Dice
from emrun.losses.malis import Malis, malis_weights
from emrun.recipe.recipe import AugmentSpec

NEAREST = ((-1, 0, 0), (0, -1, 0), (0, 0, -1))
DTYPES = (np.uint64, np.int64, np.int32, np.uint32, np.uint16, np.int8)


def id_pool(dtype: type, zero: bool = True) -> np.ndarray:
    """Five ids of ``dtype`` that stress id handling: 0 (or 1), small, the largest but one,
    2**40 and 2**64 - 2 for uint64, a negative id for signed types."""
    info = np.iinfo(dtype)
    pool = [0 if zero else 1, 1, 7, info.max - 1, info.max // 3]
    if dtype == np.uint64:
        pool[3:] = [2**64 - 2, 2**40]
    if info.min < 0:
        pool[2] = -3
    return np.array(pool, dtype=dtype)


def blocky(rng: np.random.Generator, shape: tuple[int, ...], pool: np.ndarray,
           noise: float = 0.15) -> np.ndarray:
    """Ids from ``pool`` in 2-voxel blocks, a fraction of voxels redrawn (single-voxel
    objects)."""
    coarse = rng.integers(0, pool.size, tuple(-(-n // 2) for n in shape))
    for axis in range(len(shape)):
        coarse = coarse.repeat(2, axis)
    index = coarse[tuple(slice(0, n) for n in shape)]
    flip = rng.random(shape) < noise
    index[flip] = rng.integers(0, pool.size, int(flip.sum()))
    return pool[index]


# --------------------------------------------------------------------------- scores


def brute_scores(seg: np.ndarray, truth: np.ndarray, mask: np.ndarray | None,
                 min_overlap: int) -> dict[str, float]:
    """Every score from a dictionary of (seg, truth) pairs, self-pairs included (SNEMI3D),
    truth 0 unscored, seg 0 an ordinary segment."""
    keep = truth.ravel() != 0
    if mask is not None:
        keep &= mask.ravel() != 0
    pairs: dict[tuple[int, int], int] = {}
    for s, t in zip(seg.ravel()[keep].tolist(), truth.ravel()[keep].tolist(), strict=True):
        pairs[s, t] = pairs.get((s, t), 0) + 1
    seg_size: dict[int, int] = {}
    truth_size: dict[int, int] = {}
    for (s, t), n in pairs.items():
        seg_size[s] = seg_size.get(s, 0) + n
        truth_size[t] = truth_size.get(t, 0) + n
    total = sum(pairs.values())
    if total == 0:
        return {"voxels": 0}
    n2 = sum(n * n for n in pairs.values())
    s2 = sum(n * n for n in seg_size.values())
    t2 = sum(n * n for n in truth_size.values())
    voi_split = -sum(n / total * math.log2(n / truth_size[t]) for (_, t), n in pairs.items())
    voi_merge = -sum(n / total * math.log2(n / seg_size[s]) for (s, _), n in pairs.items())
    big = [(s, t) for (s, t), n in pairs.items() if n >= min_overlap]
    arand = 1 - 2 * n2 / (s2 + t2)
    return {"arand": arand, "rand_split": n2 / t2, "rand_merge": n2 / s2,
            "voi_split": max(0.0, voi_split), "voi_merge": max(0.0, voi_merge),
            "cremi_score": math.sqrt(max(0.0, arand) * (max(0.0, voi_split)
                                                        + max(0.0, voi_merge))),
            "splits": sum(1 for t in truth_size if sum(1 for b in big if b[1] == t) > 1),
            "merges": sum(1 for s in seg_size if sum(1 for b in big if b[0] == s) > 1),
            "voxels": total, "truth_objects": len(truth_size), "segments": len(seg_size)}


@pytest.mark.parametrize("seed", range(4))
def test_scores_equal_brute_force_sums_for_every_id_dtype(seed):
    rng = np.random.default_rng(seed)
    for case in range(12):
        shape = tuple(int(n) for n in rng.integers(1, 7, int(rng.integers(2, 4))))
        seg = blocky(rng, shape, id_pool(DTYPES[case % 6], zero=case % 3 != 0))
        truth = blocky(rng, shape, id_pool(DTYPES[(case + seed) % 6]))
        mask = (rng.random(shape) < 0.8).astype(np.uint8) if case % 2 else None
        want = brute_scores(seg, truth, mask, min_overlap=2)
        if want["voxels"] == 0:
            continue
        got = score(seg, truth, mask, min_overlap=2).as_dict()
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), (case, key)


def test_voi_equals_scikit_image_with_seg_zero_as_a_segment():
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(11)
    for _ in range(10):
        shape = tuple(int(n) for n in rng.integers(2, 9, 3))
        truth = blocky(rng, shape, np.arange(5))
        seg = blocky(rng, shape, np.arange(4))
        ours = score(seg, truth)
        split, merge = metrics.variation_of_information(truth, seg, ignore_labels=[0])
        assert (ours.voi_split, ours.voi_merge) == (pytest.approx(split, abs=1e-12),
                                                    pytest.approx(merge, abs=1e-12))


@pytest.mark.parametrize("connected_truth", [False, True])
def test_streamed_and_blockwise_tables_equal_in_memory_with_extreme_ids(
        tmp_path, connected_truth):
    rng = np.random.default_rng(3)
    shape = (5, 7, 6)
    truth = blocky(rng, shape, id_pool(np.uint64))
    seg = blocky(rng, shape, id_pool(np.int8))
    mask = (rng.random(shape) < 0.85).astype(np.uint8)
    volumes = {}
    for name, array in (("seg", seg), ("truth", truth), ("mask", mask)):
        np.save(tmp_path / f"{name}.npy", array)
        volumes[name] = open_volume(str(tmp_path / f"{name}.npy"))
    want = score(seg, truth, mask, min_overlap=1, connected_truth=connected_truth)
    for slab_voxels in (1, 13, 10**6):
        assert score_volumes(volumes["seg"], volumes["truth"], volumes["mask"], min_overlap=1,
                             slab_voxels=slab_voxels, connected_truth=connected_truth) == want
    checked = _checked([("segmentation", volumes["seg"]), ("truth", volumes["truth"]),
                        ("mask", volumes["mask"])])
    for block in ((1, 1, 1), (2, 3, 4), (5, 2, 6)):
        work = prepare(checked, block, connected_truth=connected_truth)
        folder = tmp_path / f"blocks-{'-'.join(map(str, block))}"
        folder.mkdir()
        for index in range(len(work.grid)):
            write_block(folder, work, index)
        assert scores_from_table(merge_blocks(folder, work), 1) == want


# --------------------------------------------------------------------------- targets


def brute_affinity(labels: np.ndarray, valid: np.ndarray | None,
                   offsets: tuple[tuple[int, int, int], ...], zero: str
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The README's definition, voxel by voxel: channel c at p compares p with p + o_c."""
    shape = labels.shape
    target = np.zeros((len(offsets), *shape), np.uint8)
    mask = np.zeros_like(target)
    for c, offset in enumerate(offsets):
        for p in itertools.product(*map(range, shape)):
            q = tuple(a + b for a, b in zip(p, offset, strict=True))
            if not all(0 <= a < n for a, n in zip(q, shape, strict=True)):
                continue
            if valid is not None and not (valid[p] and valid[q]):
                continue
            if zero == "mask" and (labels[p] == 0 or labels[q] == 0):
                continue
            mask[c][p] = 1
            target[c][p] = labels[p] == labels[q] and labels[p] != 0
    return target, mask


@pytest.mark.parametrize("seed", range(3))
def test_affinities_equal_a_loop_for_long_range_and_positive_offsets(seed):
    rng = np.random.default_rng(seed)
    for case in range(6):
        shape = tuple(int(n) for n in rng.integers(1, 6, 3))
        labels = blocky(rng, shape, id_pool(DTYPES[case], zero=case != 2), noise=0.1)
        valid = (rng.random(shape) < 0.8).astype(np.uint8) if case % 2 else None
        offsets = (*NEAREST, *(tuple(int(v) for v in rng.integers(-4, 5, 3)) for _ in range(3)))
        for zero, relabel in itertools.product(("mask", "boundary"), (False, True)):
            got = Affinity(offsets, relabel=relabel, zero=zero)(Patch(labels=labels,
                                                                      mask=valid))
            pieces = cc3d.connected_components(labels.astype(np.int64), connectivity=6)
            want = brute_affinity(pieces if relabel else labels,
                                  None if valid is None else valid != 0, offsets, zero)
            np.testing.assert_array_equal(got[0], want[0], err_msg=f"{case} {zero} target")
            np.testing.assert_array_equal(got[1], want[1], err_msg=f"{case} {zero} mask")


def test_relabel_keeps_top_half_uint64_ids_in_a_one_voxel_column():
    """cc3d raised OverflowError on ids of 2**63 and above in (n, 1, 1) patches."""
    for top in (2**63, 2**64 - 2):
        labels = np.array([top, top, 0, top, 5], np.uint64).reshape(5, 1, 1)
        np.testing.assert_array_equal(relabel_components(labels).ravel(), [1, 1, 0, 2, 3])
        target, mask = Affinity(((-1, 0, 0),))(Patch(labels=labels))
        np.testing.assert_array_equal(target.ravel(), [0, 1, 0, 0, 0])
        np.testing.assert_array_equal(mask.ravel(), [0, 1, 0, 0, 1])


def test_affinities_after_a_flip_or_transpose_are_the_moved_affinities():
    """Targets are computed after augmentation; computing them before and moving them gives
    the same maps, with each offset moved too: aff(T L, o) = T aff(L, T^-1 o)."""
    rng = np.random.default_rng(5)
    labels = blocky(rng, (4, 5, 6), id_pool(np.uint64))
    valid = (rng.random(labels.shape) < 0.85).astype(np.uint8)
    offsets = ((-1, 0, 0), (0, -2, 0), (1, 0, -3), (0, 2, 1))
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product((False, True), repeat=3):
            flip = tuple(slice(None, None, -1) if f else slice(None) for f in flips)

            def move(a: np.ndarray, flip=flip, perm=perm) -> np.ndarray:
                return np.ascontiguousarray(a[flip].transpose(perm))

            back = []
            for o in offsets:
                q = [0, 0, 0]
                for axis in range(3):
                    q[perm[axis]] = -o[axis] if flips[perm[axis]] else o[axis]
                back.append(tuple(q))
            after = Affinity(offsets)(Patch(labels=move(labels), mask=move(valid)))
            before = Affinity(tuple(back))(Patch(labels=labels, mask=valid))
            for c in range(len(offsets)):
                np.testing.assert_array_equal(after[0][c], move(before[0][c]))
                np.testing.assert_array_equal(after[1][c], move(before[1][c]))


def test_tta_inversion_of_perfect_affinities_gives_the_original_target():
    labels = blocky(np.random.default_rng(2), (3, 6, 6), np.arange(1, 4, dtype=np.int64))
    offsets = [*NEAREST, (-2, 0, 0), (0, -3, 0), (0, 0, -3)]
    target = Affinity(tuple(map(tuple, offsets)), relabel=False, zero="boundary")
    want, known = target(Patch(labels=labels))
    for variant in variants(16):
        moved = variant.apply(torch.from_numpy(labels)).numpy()
        values, mask = target(Patch(labels=moved))
        seen = torch.from_numpy(np.where(mask, values, np.nan).astype(np.float32))
        back = variant.invert_affinity(seen, offsets).numpy()
        compared = ~np.isnan(back) & (known == 1)
        np.testing.assert_array_equal(back[compared], want[compared], err_msg=variant.name)


def brute_distance(labels: np.ndarray, size: tuple[float, ...], clip: float,
                   signed: bool) -> np.ndarray:
    """The distance target by exhaustive search over all voxels, in nm."""
    points = np.stack(np.meshgrid(*map(np.arange, labels.shape), indexing="ij"), -1)
    points = points.reshape(-1, 3) * np.asarray(size)
    flat = labels.ravel()
    out = np.zeros(flat.size)
    for i, v in enumerate(flat):
        if v == 0 and not signed:
            continue
        other = flat != v if v != 0 else flat != 0
        d = np.sqrt(((points[other] - points[i]) ** 2).sum(1)).min() if other.any() else np.inf
        out[i] = min(d, clip) / clip * (1 if v != 0 else -1)
    return out.reshape(labels.shape)


def test_distance_equals_exhaustive_search_with_anisotropic_voxels():
    rng = np.random.default_rng(7)
    for case in range(12):
        shape = tuple(int(n) for n in rng.integers(1, 7, 3))
        size = tuple(float(v) for v in rng.choice([4.0, 6.5, 30.0, 40.0], 3))
        labels = blocky(rng, shape, id_pool(DTYPES[case % 6], zero=case % 4 != 0))
        for signed in (False, True):
            got, mask = Distance(clip=50.0, signed=signed)(Patch(labels=labels,
                                                                 voxel_size=size))
            want = brute_distance(labels, size, 50.0, signed)
            assert np.abs(got[0].astype(np.float64) - want).max() < 1e-3, (case, signed)
            assert mask.all()


def scipy_lsd(labels: np.ndarray, sigma: tuple[float, ...], size: tuple[float, ...]
              ) -> np.ndarray:
    """The LSDs as funkelab's lsd package builds them (Sheridan et al. 2022), per object in
    float64: scipy Gaussian filters (truncate 3, zero outside) of the object's indicator and
    its coordinate-weighted copies; offsets over sigma, variances over sigma**2, Pearson
    with variances below 1e-3 nm**2 taken as 1e-3, size the window fraction; clipped."""
    sig, vox = np.asarray(sigma), np.asarray(size)
    coords = np.stack(np.meshgrid(*(np.arange(n) * s for n, s in zip(labels.shape, vox,
                                                                      strict=True)),
                                  indexing="ij"))

    def window(a: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(a, sig / vox, mode="constant", truncate=3.0)

    out = np.zeros((10, *labels.shape))
    for label in np.unique(labels[labels != 0]):
        inside = (labels == label).astype(np.float64)
        mass = window(inside)
        mean = np.stack([window(c * inside) for c in coords]) / np.where(mass, mass, 1)
        cov = {(a, b): window(coords[a] * coords[b] * inside) / np.where(mass, mass, 1)
               - mean[a] * mean[b] for a in range(3) for b in range(a, 3)}
        var = [np.maximum(cov[a, a], 1e-3) for a in range(3)]
        channels = [*(0.5 + 0.5 * (mean[a] - coords[a]) / sig[a] for a in range(3)),
                    *(var[a] / sig[a] ** 2 for a in range(3)),
                    *(0.5 + 0.5 * cov[a, b] / np.sqrt(var[a] * var[b])
                      for a, b in ((0, 1), (0, 2), (1, 2))), mass]
        out += np.stack(channels) * inside
    return np.clip(out, 0.0, 1.0)


def test_lsd_equals_scipy_gaussian_windows_with_anisotropic_voxels_and_extreme_ids():
    rng = np.random.default_rng(4)
    for case, (shape, size) in enumerate((((6, 9, 11), (30.0, 6.0, 6.0)),
                                          ((7, 5, 8), (8.0, 40.0, 4.0)),
                                          ((3, 10, 10), (40.0, 4.0, 6.5)))):
        labels = blocky(rng, shape, id_pool(DTYPES[case], zero=case != 1), noise=0.0)
        sigma = tuple(float(s * rng.uniform(1.0, 3.0)) for s in size)
        got = local_shape_descriptors(labels, sigma, size, (1, 1, 1), np.float32)
        error = np.abs(got - scipy_lsd(labels, sigma, size)).reshape(10, -1).max(axis=1)
        # Pearson channels: float32 second moments, divided by variances near the 1e-3 nm^2
        # floor where an object is one voxel thick along an axis (up to 4e-4 on such labels)
        assert error[[0, 1, 2, 3, 4, 5, 9]].max() < 2e-5, (case, error)
        assert error[6:9].max() < 2e-3, (case, error)


# --------------------------------------------------------------------------- losses


def test_bce_mse_dice_equal_their_formulas_with_margins_balance_and_masks():
    rng = np.random.default_rng(0)
    for case in range(24):
        shape = (int(rng.integers(1, 3)), int(rng.integers(1, 4)), 3, 2, 4)
        logits = rng.normal(0.0, 3.0, shape).astype(np.float32)
        target = (rng.random(shape) < rng.random()).astype(np.float32)
        mask = (rng.random((shape[0], 1, *shape[2:]) if case % 2 else shape) < 0.7)
        m0, m1 = float(rng.choice([0.0, 0.1, 0.3])), float(rng.choice([0.0, 0.2]))
        mode, balance = ("inverse" if case % 3 == 0 else "mask"), case % 4 < 2
        x = logits.astype(np.float64)
        p = 1 / (1 + np.exp(-x))
        valid = np.broadcast_to(mask, shape).copy()
        positive = target > 0.5
        soft = target
        if mode == "mask":
            valid &= ~np.where(positive, p > 1 - m1, p < m0)
        else:
            soft = m0 + target * (1 - m0 - m1)
        weight = np.ones(shape)
        for c in range(shape[1]) if balance else ():
            n1 = (positive & valid)[:, c].sum()
            n0 = (~positive & valid)[:, c].sum()
            if n0 and n1:
                weight[:, c] = np.where(positive[:, c], n0, n1) / (n0 + n1)
        bce = np.maximum(x, 0) - x * soft + np.log1p(np.exp(-np.abs(x)))
        want = (bce * weight)[valid].sum() / max(valid.sum(), 1)
        tensors = torch.tensor(logits), torch.tensor(target), torch.tensor(mask)
        assert BCE(m0, m1, mode, balance)(*tensors).loss.item() == pytest.approx(want, rel=1e-5)

        plain = np.broadcast_to(mask, shape)
        mse = ((x - target) ** 2)[plain].sum() / max(plain.sum(), 1)
        assert MSE()(*tensors).loss.item() == pytest.approx(mse, rel=1e-5, abs=1e-7)
        pv, tv = np.where(plain, p, 0), np.where(plain, target, 0)
        dice = np.mean([1 - (2 * (pv * tv)[:, c].sum() + 1) / (pv[:, c].sum() + tv[:, c].sum()
                                                                + 1) for c in range(shape[1])])
        assert Dice(1.0)(*tensors).loss.item() == pytest.approx(dice, rel=1e-5, abs=1e-7)


def maximin_counts(aff: np.ndarray, target: np.ndarray, valid: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Constrained MALIS pair counts by definition: for each voxel pair, the edge of the
    largest threshold at which the pair is still connected (distinct affinities, so one
    edge), found by connectivity at every threshold; positive pass on within-object edges,
    negative pass with them at 2 (merged first), pairs of different objects only."""
    shape = aff.shape[1:]
    n = int(np.prod(shape))
    edges = []
    for c, offset in enumerate(NEAREST):
        for v in itertools.product(*map(range, shape)):
            u = tuple(a + b for a, b in zip(v, offset, strict=True))
            if min(u) >= 0 and valid[(c, *v)]:
                edges.append((c, v, np.ravel_multi_index(v, shape), np.ravel_multi_index(u,
                                                                                       shape)))

    def components(chosen: list[int]) -> np.ndarray:
        rows = [edges[i][2] for i in chosen]
        cols = [edges[i][3] for i in chosen]
        graph = coo_matrix((np.ones(len(chosen)), (rows, cols)), shape=(n, n))
        return connected_components(graph, directed=False)[1]

    inside = [i for i, (c, v, _, _) in enumerate(edges) if target[(c, *v)]]
    objects = components(inside)
    known = {e[k] for e in edges for k in (2, 3)}

    def count(chosen: list[int], weight: Callable[[int], float], same: bool) -> np.ndarray:
        out = np.zeros(aff.shape)
        levels = sorted({weight(i) for i in chosen}, reverse=True)
        joined = [components([i for i in chosen if weight(i) >= t]) for t in levels]
        for a, b in itertools.combinations(sorted(known), 2):
            if (objects[a] == objects[b]) != same:
                continue
            for t, comp in zip(levels, joined, strict=True):
                if comp[a] == comp[b]:
                    (i,) = [i for i in chosen if weight(i) == t]
                    out[(edges[i][0], *edges[i][1])] += 1
                    break
        return out

    def strength(i: int) -> float:
        return float(aff[(edges[i][0], *edges[i][1])])

    positive = count(inside, strength, same=True)
    negative = count(list(range(len(edges))),
                     lambda i: 2.0 if i in inside else strength(i), same=False)
    return positive, negative


def test_malis_pair_counts_and_loss_equal_the_maximin_definition():
    rng = np.random.default_rng(1)
    for case in range(8):
        shape = tuple(int(n) for n in rng.integers(1, 4, 3))
        labels = blocky(rng, shape, id_pool(np.uint64), noise=0.3)
        valid = rng.random(shape) < 0.85 if case % 2 else None
        zero = "boundary" if case % 3 == 0 else "mask"
        target, mask = Affinity(NEAREST, zero=zero)(Patch(labels=labels, mask=valid))
        aff = rng.permutation(np.linspace(0.01, 0.99, target.size)).reshape(target.shape)
        aff = aff.astype(np.float32)
        pos, neg = malis_weights(aff, target.astype(bool), mask.astype(bool))
        want_pos, want_neg = maximin_counts(aff, target.astype(bool), mask.astype(bool))
        np.testing.assert_array_equal(pos, want_pos)
        np.testing.assert_array_equal(neg, want_neg)
        w, t, a = want_pos + want_neg, target.astype(np.float64), aff.astype(np.float64)
        want = (w * -(t * np.log(a) + (1 - t) * np.log(1 - a))).sum() / max(w.sum(), 1)
        loss = Malis(nearest=(0, 1, 2))(torch.logit(torch.tensor(aff))[None],
                                        torch.tensor(target[None]).float(),
                                        torch.tensor(mask[None]).float())
        assert loss.loss.item() == pytest.approx(want, rel=1e-5)


# --------------------------------------------------------------------------- augmentation

GEOMETRIC = [{"type": "flip_rotate"}, {"type": "flip_rotate", "isotropic": True},
             {"type": "misalign", "displacement": [1, 6]},
             {"type": "lost_section", "max_sections": 3}]
WARP = {"type": "warp", "rot_max": 45, "twist_max": 10, "shear_max": 0.2,
        "scale": [0.8, 1.3], "stretch_max": 0.3}


@pytest.mark.parametrize("seed", range(3))
def test_geometric_chains_move_every_volume_like_the_image(seed):
    """Each input voxel carries its own id in labels, mask and a semantic volume, and the
    image is a linear function of its position: at every output voxel the three volumes
    name one input voxel, the image's value is that voxel's (within half a pixel after a
    warp's interpolation), the shape is the one asked for, and a seed repeats it."""
    specs = TypeAdapter(list[AugmentSpec])
    rng = np.random.default_rng(seed)
    slope = np.array([0.013, 0.011, 0.007])
    for _ in range(8):
        # before the warp only flips, which keep the image linear across every plane
        chosen = [*(dict(GEOMETRIC[i], p=1.0) for i in rng.integers(0, 2, rng.integers(3))),
                  dict(WARP, p=float(rng.random())),
                  *(dict(GEOMETRIC[i], p=1.0) for i in rng.integers(0, 4, rng.integers(4)))]
        pipeline = Pipeline(specs.validate_python(chosen))
        out = (int(rng.integers(3, 8)), int(rng.integers(5, 24)), int(rng.integers(5, 24)))
        draw = int(rng.integers(2**31))
        results = []
        for _ in range(2):
            steps, in_shape = pipeline.prepare(np.random.default_rng(draw), out,
                                               Context((30.0, 6.0, 6.0)))
            ids = np.arange(math.prod(in_shape), dtype=np.uint64).reshape(in_shape)
            ids += np.uint64(2**64 - 2**40)
            grid = np.stack(np.meshgrid(*map(np.arange, in_shape), indexing="ij"), -1)
            image = (0.05 + grid @ slope).astype(np.float32)
            scale = float(image.max()) + 0.01
            image /= np.float32(scale)
            results.append(Pipeline.apply(steps, Sample(image, ids, ids.copy(),
                                                        {"ids": ids.copy()})))
        moved = results[0]
        assert moved.shape == out and moved.labels.shape == out
        np.testing.assert_array_equal(moved.labels, moved.mask)
        np.testing.assert_array_equal(moved.labels, moved.semantic["ids"])
        where = np.unravel_index((moved.labels - np.uint64(2**64 - 2**40)).astype(np.int64),
                                 in_shape)
        pixel = (slope[0] + slope[1]) / scale  # most the image changes over a step in a plane
        assert np.abs(moved.image - image[where]).max() <= 0.5 * pixel + 1e-5, chosen
        np.testing.assert_array_equal(moved.image, results[1].image)
        np.testing.assert_array_equal(moved.labels, results[1].labels)


def test_min_labelled_is_checked_inside_a_transposed_crop(tmp_path):
    """A y/x transpose of a (1, 32, 64) patch reads (1, 64, 32): the old check read the
    output's box at x from -16, a strip of the crop without its labelled half, and refused
    a crop whose output is half labelled."""
    labels = np.zeros((1, 64, 32), np.uint32)
    labels[..., :16] = 1
    np.save(tmp_path / "labels.npy", labels)
    np.save(tmp_path / "image.npy", labels.astype(np.uint8))
    source = Source(name="s", image=open_volume(str(tmp_path / "image.npy")),
                    labels=open_volume(str(tmp_path / "labels.npy")), mask=None, semantic={},
                    box=box_of((1, 64, 32)), low=0.0, high=255.0, weight=None,
                    min_labelled=0.3)
    crop = PatchSampler([source], np.array([1.0])).draw(np.random.default_rng(0),
                                                        (1, 64, 32), (1, 32, 64))
    assert crop.labels.mean() == 0.5
