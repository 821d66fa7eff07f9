"""Synthetic EM-like volumes with dense neuron and mitochondria labels.

The embedded default data: `type: synthetic` recipe sources, `emrun demo` and the tests all
draw from :func:`synthesize`, so it has to be fast (64x256x256 in under a second on one core,
memory about 45 bytes a voxel at peak), deterministic from its seed (bitwise on one platform), and
hard enough that a naive threshold of the image segments badly.

How a volume is made (everything derives from ``np.random.default_rng(seed)``):

1. Neurites are seeded as wiggly curves (a few thick ones, most thin), most running roughly
   along z, some within the section plane, some ending inside the volume. On a coarse grid in
   physical units the space is split among them by nearest seed (an additively weighted Voronoi
   partition via one EDT), so cells are tubes that fill space and touch each other.
2. The full-resolution labels look the coarse partition up through a smooth random displacement
   field, which makes borders wavy; misalignment defects are a per-section shift of that lookup.
3. Membranes are the voxels within ``membrane_width`` of another cell (in-plane; in z too when
   sections are thin enough); they become 0 in the labels. Every id is one 6-connected component.
4. Mitochondria are ellipsoids along their neurite, clipped to it.
5. The image: bright cytoplasm with per-cell brightness and slow shading, fine texture and
   vesicle-like dots, dark membranes whose contrast varies (faint stretches merge cells under a
   threshold), grey smears where a border is oblique to the sections, dark mitochondria with
   darker outlines (they split cells under a threshold), blur, noise and optional defects.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cc3d
import numpy as np
from scipy import ndimage as ndi

__all__ = ["SynthVolume", "peak_memory", "synthesize"]


MEMORY_PER_VOXEL = 70
"""Peak bytes of memory ``synthesize`` takes per voxel (67 measured with tracemalloc on
16x256x256 and 32x512x512): the volume is made in memory, whole."""


MAX_ANISOTROPY = 1000.0
"""How many times larger one voxel size may be than another: serial-section EM is about 10
times; at 100000 times the curves' count made an 8 x 64 x 64 volume take minutes, and
1e308 nm overflowed."""


@dataclass(frozen=True)
class SynthVolume:
    """One synthetic volume: image, dense neuron ids, mitochondria ids, all (z, y, x)."""

    image: np.ndarray
    """uint8 EM-like image."""
    labels: np.ndarray
    """uint32 neuron ids, 1..n, consecutive; 0 on membranes (the gap between cells)."""
    mito: np.ndarray
    """uint32 mitochondrion ids, 1..m; 0 outside mitochondria, which lie inside cells."""
    synapse: np.ndarray
    """uint8 stand-in synaptic clefts, 1 on the membrane between about one in eight pairs of
    touching cells (drawn from the ids, not rendered into the image: enough for multi-task
    recipes to run and be measured on synthetic data, not to learn synapses from)."""
    voxel_size: tuple[float, float, float]
    """Voxel size in nm, z, y, x."""


def synthesize(
    shape: tuple[int, int, int],
    seed: int = 0,
    *,
    voxel_size: tuple[float, float, float] = (30.0, 6.0, 6.0),
    cell_size: float = 24.0,
    membrane_width: float = 2.0,
    noise: float = 0.08,
    blur: float = 0.8,
    defects: bool = False,
) -> SynthVolume:
    """Generate a synthetic EM volume; the same arguments give bitwise-identical arrays.

    ``cell_size`` is the typical in-plane cell diameter in pixels; ``membrane_width`` the width
    of the unlabelled gap in pixels; ``noise`` the standard deviation of the additive noise and
    ``blur`` the sigma of the in-plane blur (pixels), both for an image in [0, 1]. Anisotropy
    follows ``voxel_size``: with 30x6x6 nm, cells change slowly across sections and membranes are
    drawn in-plane only. ``defects`` adds missing, dimmed and blurred sections and a
    misalignment (a shift of all sections below some z; labels shift with the image).
    """
    zyx = _check_args(shape, voxel_size, cell_size, membrane_width, noise, blur)
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    rng = np.random.default_rng(seed)
    vs = (float(voxel_size[0]), float(voxel_size[1]), float(voxel_size[2]))
    grid = _Grid(zyx, vs, float(cell_size))
    seeds, directions, weights = _seed_curves(rng, grid)
    coarse = _nearest_seed(seeds, grid)
    del seeds
    shift = _misalignment(rng, zyx) if defects else None
    cells = _lookup(rng, coarse, grid, shift)  # cell ids before membranes are carved
    del coarse
    width_yx = max(1, round(membrane_width))
    width_z = int(membrane_width * (vs[1] / vs[0]) + 1e-6)  # thick sections: no z gap
    membrane = _band(cells, width_yx, width_z)
    labels = _components(cells, membrane, min_size=max(8, int(0.05 * cell_size**2)))
    mito, outline = _mitochondria(rng, labels, cells, directions, grid)
    image = _render(rng, grid, cells, membrane, width_z, mito, outline, weights, noise, blur)
    if defects:
        _section_defects(rng, image)
    image = np.clip(image * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)
    return SynthVolume(image=image, labels=labels, mito=mito,
                       synapse=_clefts(cells, labels == 0), voxel_size=vs)


def _clefts(cells: np.ndarray, membrane: np.ndarray) -> np.ndarray:
    """Membrane voxels where two cells chosen by a hash of their ids touch in-plane (uses no
    random numbers: every other array stays as it was)."""
    clefts = np.zeros(cells.shape, np.uint8)
    for axis in (1, 2):
        a = np.moveaxis(cells, axis, 0)
        first, second = a[:-1].astype(np.uint64), a[1:].astype(np.uint64)
        low, high = np.minimum(first, second), np.maximum(first, second)
        chosen = (first != second) & (((low * 73856093) ^ (high * 19349663)) % 8 == 0)
        out = np.moveaxis(clefts, axis, 0)
        out[:-1] |= chosen
        out[1:] |= chosen
    return clefts * membrane


def _check_args(shape: Sequence[int], voxel_size: Sequence[float], cell_size: float,
                membrane_width: float, noise: float, blur: float) -> tuple[int, int, int]:
    """Reject arguments that would silently give nonsense (a user can pass them via a recipe)."""
    if len(shape) != 3 or any(int(s) != s or s < 1 for s in shape):
        raise ValueError(f"shape must be three positive integers (z, y, x), got {shape!r}")
    if len(voxel_size) != 3 or not all(math.isfinite(v) and v > 0 for v in voxel_size):
        raise ValueError(f"voxel_size must be three positive numbers (nm), got {voxel_size!r}")
    if max(voxel_size) > MAX_ANISOTROPY * min(voxel_size):
        raise ValueError(f"voxel_size {list(voxel_size)!r}: sizes more than {MAX_ANISOTROPY:g} "
                         "times apart (the generator's work grows with the ratio)")
    if not 4 <= cell_size <= 1000:
        raise ValueError(f"cell_size must be in [4, 1000] pixels, got {cell_size!r}")
    if not 0.5 <= membrane_width <= cell_size / 3:
        raise ValueError(f"membrane_width must be in [0.5, cell_size/3], got {membrane_width!r}")
    if not (noise >= 0 and blur >= 0):
        raise ValueError(f"noise and blur must be >= 0, got {noise!r}, {blur!r}")
    z, y, x = (int(s) for s in shape)
    return z, y, x


def peak_memory(shape: Sequence[int], voxel_size: Sequence[float] = (30.0, 6.0, 6.0),
                cell_size: float = 24.0) -> int:
    """Bytes of memory :func:`synthesize` takes at its peak, about: `MEMORY_PER_VOXEL` a
    voxel, and the smooth fields' weight matrices, (axis length) x (lattice nodes) each,
    which grow with the square of an axis (100000 x 1 x 1 voxels needed 40 GB for them)."""
    scale = [float(voxel_size[0]) / float(voxel_size[1]), 1.0,
             float(voxel_size[2]) / float(voxel_size[1])]
    matrices = 0.0
    for corr in ([1.5 * cell_size / 2.5, cell_size / 2.5, cell_size / 2.5],
                 [cell_size, 0.8 * cell_size, 0.8 * cell_size]):  # _lookup's, _render's
        for n, c, s in zip(shape, corr, scale, strict=True):
            c = max(c / s, 0.3)
            matrices += float(n) * ((float(n) + 5.0 * c) / (0.7 * c) + 2.0)
    zyx = tuple(min(max(1, int(n)), 1 << 40) for n in shape)  # beyond: far too much anyway
    vs = (float(voxel_size[0]), float(voxel_size[1]), float(voxel_size[2]))
    coarse = math.prod(float(n) for n in _Grid(zyx, vs, cell_size).coarse_shape)
    # the coarse partition's EDT about 40 bytes a coarse voxel (a thin volume's grid has
    # margins thicker than itself); a matrix about 12 bytes an entry while it is made
    return int(math.prod(float(n) for n in shape) * MEMORY_PER_VOXEL + 40.0 * coarse
               + 12.0 * matrices)


class _Grid:
    """Full and coarse geometry in one place: physical units are in-plane (y) pixels."""

    def __init__(self, shape: tuple[int, int, int], voxel_size: tuple[float, ...], cell: float):
        self.shape = shape
        self.cell = cell
        # physical size of one voxel, in y-pixels: z is thick for ssEM
        self.scale = np.array([voxel_size[0] / voxel_size[1], 1.0, voxel_size[2] / voxel_size[1]])
        step = max(1.0, cell / 12.0)  # coarse spacing, physical: ~12 coarse voxels per cell
        self.factor = np.maximum(1, np.round(step / self.scale)).astype(int)
        margin_phys = cell * 0.75
        self.margin = np.ceil(margin_phys / (self.scale * self.factor)).astype(int)  # coarse
        self.coarse_shape = tuple(
            int(math.ceil(n / f) + 2 * m)
            for n, f, m in zip(shape, self.factor, self.margin, strict=True)
        )
        # full-resolution voxel coordinate of the first coarse voxel's corner
        self.origin = -self.margin * self.factor
        self.coarse_spacing = self.scale * self.factor


def _seed_curves(rng: np.random.Generator,
                 grid: _Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rasterise neurite centre curves on the coarse grid: the seeds of the partition.

    Returns the seed grid (uint32 ids, 0 = none), a unit direction per id (physical z, y, x) and a
    per-id brightness weight in [0, 1] (thick neurites are paler, like dendrites).
    """
    cshape = np.array(grid.coarse_shape)
    spacing = grid.coarse_spacing
    lo = grid.origin * grid.scale  # physical extent of the padded domain
    hi = lo + cshape * spacing
    extent = hi - lo
    centre = (lo + hi) / 2
    half_diag = float(np.linalg.norm(extent)) / 2
    d = grid.cell
    n_along_z = max(2, round(1.1 * extent[1] * extent[2] / (math.pi / 4 * d * d)))
    n_in_plane = round(0.12 * extent[0] * max(extent[1], extent[2]) / (d * d))
    n = n_along_z + n_in_plane
    seeds = np.zeros(grid.coarse_shape, np.uint32)
    directions = np.zeros((n + 1, 3))
    directions[0] = (1.0, 0.0, 0.0)
    weights = np.zeros(n + 1)
    step = float(spacing.min()) / 2
    for i in range(1, n + 1):
        if i <= n_along_z:
            tilt = min(abs(rng.normal(0.0, 0.4)), 1.1)  # radians from the z axis
            azimuth = rng.uniform(0, 2 * math.pi)
            u = np.array([math.cos(tilt), math.sin(tilt) * math.sin(azimuth),
                          math.sin(tilt) * math.cos(azimuth)])
            start = lo + rng.random(3) * extent
            start[0] = centre[0]
        else:
            elevation = rng.normal(0.0, 0.12)
            azimuth = rng.uniform(0, 2 * math.pi)
            u = np.array([math.sin(elevation), math.cos(elevation) * math.sin(azimuth),
                          math.cos(elevation) * math.cos(azimuth)])
            start = lo + rng.random(3) * extent
        # some neurites end inside the volume
        s0, s1 = -half_diag, half_diag
        if rng.random() < 0.3:
            s0, s1 = np.sort(rng.uniform(-half_diag, half_diag, 2))
            s1 = max(s1, s0 + 3 * d)
        thick = rng.random() < 0.15
        radius = (rng.uniform(0.15, 0.45) if thick else rng.uniform(0.0, 0.2)) * d
        weights[i] = rng.uniform(0.55, 1.0) if thick else rng.uniform(0.0, 0.8)
        directions[i] = u
        # two unit vectors perpendicular to u, for the wiggle
        e1 = np.cross(u, [0.0, 0.0, 1.0] if abs(u[2]) < 0.9 else [0.0, 1.0, 0.0])
        e1 /= np.linalg.norm(e1)
        e2 = np.cross(u, e1)
        waves = []  # (axis, wavelength, amplitude, phase), drawn in this order
        for k in range(2):
            for wavelength in (3.0 * d, 7.0 * d):
                amp = rng.uniform(0.0, 0.12) * wavelength
                waves.append((k, wavelength, amp, rng.uniform(0, 6.3)))
        # only the stretch that can reach the domain: a curve spans the domain's diagonal,
        # most of it outside a long thin volume (100000 x 1 x 1 took hours)
        reach = sum(w[2] for w in waves) + radius + spacing + 1.0  # per axis
        s = _steps_within(s0, s1, step, _span_in_box(start, u, lo - reach, hi + reach))
        wiggle = np.zeros((2, s.size))
        for k, wavelength, amp, phase in waves:
            wiggle[k] += amp * np.sin(2 * math.pi * s / wavelength + phase)
        pts = start + s[:, None] * u + wiggle[0][:, None] * e1 + wiggle[1][:, None] * e2
        _stamp(seeds, (pts - lo) / spacing, radius / spacing, i)
    return seeds, directions, weights


def _span_in_box(start: np.ndarray, u: np.ndarray, lo: np.ndarray,
                 hi: np.ndarray) -> tuple[float, float]:
    """The range of s where the line ``start + s * u`` is inside the box [lo, hi] (first >
    last: never)."""
    first, last = -math.inf, math.inf
    for a, step, low, high in zip(start, u, lo, hi, strict=True):
        if abs(step) < 1e-12:
            if not low <= a <= high:
                return 1.0, 0.0
            continue
        p, q = (low - a) / step, (high - a) / step
        first, last = max(first, min(p, q)), min(last, max(p, q))
    return first, last


def _steps_within(s0: float, s1: float, step: float, span: tuple[float, float]) -> np.ndarray:
    """The values of ``np.arange(s0, s1, step)`` inside ``span``, without making the others.

    Made as numpy makes them (its first two values, then ``s0 + i * delta``), so the curves,
    and the volume, are bitwise what the whole range gave.
    """
    count = math.ceil((s1 - s0) / step)
    delta = (s0 + step) - s0
    if count <= 0 or not span[0] <= span[1] or delta <= 0:
        return np.empty(0)
    first = max(0, math.floor((span[0] - s0) / delta) - 1)
    last = min(count, math.ceil((span[1] - s0) / delta) + 2)
    if first >= last:
        return np.empty(0)
    s = s0 + np.arange(first, last) * delta
    if first <= 1 < last:
        s[1 - first] = s0 + step
    return s[(s >= span[0]) & (s <= span[1])]


def _stamp(seeds: np.ndarray, pts: np.ndarray, radius: np.ndarray, value: int) -> None:
    """Paint balls of the given (per-axis, coarse-voxel) radius at points (coarse units)."""
    r = np.floor(radius).astype(int)
    offsets = np.stack(np.meshgrid(*(np.arange(-k, k + 1) for k in r), indexing="ij"), -1)
    offsets = offsets.reshape(-1, 3)
    norm = (offsets / np.maximum(radius, 1e-9)) ** 2
    offsets = offsets[norm.sum(1) <= 1.0 + 1e-9]
    idx = (np.floor(pts).astype(int)[:, None, :] + offsets[None, :, :]).reshape(-1, 3)
    inside = np.all((idx >= 0) & (idx < np.array(seeds.shape)), axis=1)
    idx = idx[inside]
    seeds[idx[:, 0], idx[:, 1], idx[:, 2]] = value


def _nearest_seed(seeds: np.ndarray, grid: _Grid) -> np.ndarray:
    """Label every coarse voxel with its nearest seed (physical distances): the partition."""
    if not seeds.any():
        seeds = seeds.copy()
        seeds[0, 0, 0] = 1
    index = ndi.distance_transform_edt(
        seeds == 0, sampling=grid.coarse_spacing, return_distances=False, return_indices=True
    )
    flat = np.ravel_multi_index(tuple(index), seeds.shape)
    return seeds.ravel()[flat].reshape(seeds.shape)


def _smooth_fields(rng: np.random.Generator, shape: tuple[int, int, int], corr: np.ndarray,
                   count: int) -> np.ndarray:
    """``count`` smooth Gaussian random fields with unit variance, shape (count, z, y, x).

    Separable Gaussian-kernel synthesis from a coarse noise lattice: three small matrix
    products, far cheaper than filtering full-resolution noise.
    """
    mats = []
    for n, c in zip(shape, corr, strict=True):
        c = max(float(c), 0.3)
        spacing = 0.7 * c
        nodes = np.arange(-2.5 * c, n + 2.5 * c + spacing, spacing)
        w = np.exp(-0.5 * ((np.arange(n)[:, None] - nodes[None, :]) / c) ** 2)
        w /= np.sqrt((w * w).sum(1, keepdims=True))
        mats.append(w.astype(np.float32))
    wz, wy, wx = mats
    lattice = rng.standard_normal((count, wz.shape[1], wy.shape[1], wx.shape[1]), np.float32)
    a = lattice @ wx.T  # (count, nz, ny, X)
    a = np.matmul(wy, a)  # (count, nz, Y, X)
    a = np.moveaxis(a, 1, 0).reshape(wz.shape[1], -1)
    out = (wz @ a).reshape(shape[0], count, shape[1], shape[2])
    return np.moveaxis(out, 1, 0)


def _misalignment(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """Per-section (dy, dx) shift: one step at a random section, like a misaligned stack."""
    shift = np.zeros((shape[0], 2), np.float32)
    if shape[0] >= 4:
        z = int(rng.integers(shape[0] // 4, shape[0] - shape[0] // 4 + 1))
        step = rng.uniform(3.0, 8.0) * rng.choice([-1.0, 1.0], 2)
        shift[z:] = np.round(step)
    return shift


def _lookup(rng: np.random.Generator, coarse: np.ndarray, grid: _Grid,
            shift: np.ndarray | None) -> np.ndarray:
    """Full-resolution cell ids: the coarse partition read through a smooth warp (wavy borders)."""
    z, y, x = grid.shape
    corr = grid.cell / 2.5
    fields = _smooth_fields(rng, grid.shape, corr * np.array([1.5, 1.0, 1.0]) / grid.scale, 2)
    amp = 0.3 * corr
    nz, ny, nx = coarse.shape
    fz, fy, fx = (int(f) for f in grid.factor)
    oz, oy, ox = (int(o) for o in grid.origin)
    itype = np.int32 if coarse.size < 2**31 else np.int64
    kz = np.clip((np.arange(z) - oz) // fz, 0, nz - 1).astype(itype)
    out = np.empty(grid.shape, itype)
    for axis, (n, f, o, size) in enumerate(((ny, fy, oy, y), (nx, fx, ox, x))):
        pos = fields[axis] * np.float32(amp)
        coord = np.arange(size, dtype=np.float32) - np.float32(o)
        pos += coord[:, None] if axis == 0 else coord[None, :]
        if shift is not None:
            pos += shift[:, axis, None, None]
        pos *= np.float32(1.0 / f)
        np.clip(pos, 0, n - 1, out=pos)
        k = pos.astype(itype)
        if axis == 0:
            out[...] = kz[:, None, None] * (ny * nx)
            k *= nx
        out += k
    return coarse.ravel()[out]


def _band(cells: np.ndarray, width_yx: int, width_z: int) -> np.ndarray:
    """Voxels within the given width (pixels) of a border between two cells."""
    band = np.zeros(cells.shape, bool)
    for axis, width in ((0, width_z), (1, width_yx), (2, width_yx)):
        n = cells.shape[axis]
        if width < 1 or n < 2:
            continue
        edge = _take(cells, axis, 0, n - 1) != _take(cells, axis, 1, n)  # between i and i+1
        for j in range(-(width // 2), width - width // 2):
            # voxel i is marked when there is an edge between i+j and i+j+1
            lo, hi = max(0, -j), min(n, n - 1 - j)
            if hi > lo:
                _take(band, axis, lo, hi)[...] |= _take(edge, axis, lo + j, hi + j)
    return band


def _take(a: np.ndarray, axis: int, start: int, stop: int) -> np.ndarray:
    """View of ``a[start:stop]`` along ``axis``."""
    index = [slice(None)] * a.ndim
    index[axis] = slice(start, stop)
    return a[tuple(index)]


def _components(cells: np.ndarray, membrane: np.ndarray, min_size: int) -> np.ndarray:
    """Carve membranes and give every 6-connected piece its own consecutive id; drop dust.
    A volume too small for any piece to pass as more than dust keeps its largest (all
    membrane: its largest cell, uncarved), so every volume has a cell: 1 x 1 x 1 made "0
    cells" (volumes with a cell are as they were)."""
    carved = np.where(membrane, np.uint32(0), cells)
    pieces = cc3d.connected_components(carved, connectivity=6, out_dtype=np.uint32)
    sizes = np.bincount(pieces.ravel())
    keep = sizes >= min_size
    keep[0] = False
    if not keep.any():
        if sizes.size == 1:  # nothing but membrane: the cells' own pieces
            pieces = cc3d.connected_components(cells, connectivity=6, out_dtype=np.uint32)
            sizes = np.bincount(pieces.ravel())
        keep = np.zeros(sizes.size, bool)
        if sizes.size > 1:  # every voxel has a cell: always
            keep[1 + int(np.argmax(sizes[1:]))] = True
    lut = np.zeros(sizes.size, np.uint32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint32)
    return lut[pieces]


def _mitochondria(rng: np.random.Generator, labels: np.ndarray, cells: np.ndarray,
                  directions: np.ndarray, grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
    """Ellipsoids along their neurite, clipped to its labelled voxels; plus their outlines."""
    mito = np.zeros(labels.shape, np.uint32)
    outline = np.zeros(labels.shape, bool)
    z, y, x = labels.shape
    d = grid.cell
    expected = 14.0 * y * x / (256.0 * 256.0) * (d / 24.0) ** -2 * z * grid.scale[0] / (0.9 * d)
    count = int(rng.poisson(expected))
    next_id = 1
    for _ in range(count * 10):
        if next_id > count:
            break
        c = rng.integers(0, [z, y, x])
        cid = labels[tuple(c)]
        if cid == 0:
            continue
        # as large as the cell allows (probed in-plane): big mitochondria in big neurites
        for radius in rng.uniform(0.2, 0.4) * d * np.array([1.0, 0.75, 0.55]):
            r = int(radius) + 1
            probes = [(c[0], c[1] + a, c[2] + b) for a, b in ((r, 0), (-r, 0), (0, r), (0, -r))]
            if all(0 <= p[1] < y and 0 <= p[2] < x and labels[p] == cid for p in probes):
                break
        else:
            continue
        half_length = rng.uniform(1.5, 4.0) * radius
        u = directions[cells[tuple(c)]]
        ext = np.ceil((np.abs(u) * half_length + radius) / grid.scale).astype(int) + 1
        lo = np.maximum(c - ext, 0)
        hi = np.minimum(c + ext + 1, [z, y, x])
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        offs = np.ogrid[box]
        dz, dy, dx = ((o - ci) * s for o, ci, s in zip(offs, c, grid.scale, strict=True))
        along = dz * u[0] + dy * u[1] + dx * u[2]
        perp2 = dz * dz + dy * dy + dx * dx - along * along
        inside = (along / half_length) ** 2 + perp2 / radius**2 <= 1.0
        inside &= (labels[box] == cid) & (mito[box] == 0)
        if inside.sum() < 8:
            continue
        mito[box][inside] = next_id
        cross = np.zeros((3, 3, 3), bool)
        cross[1, 1, :] = cross[1, :, 1] = True
        outline[box] |= inside & ~ndi.binary_erosion(inside, cross, border_value=1)
        next_id += 1
    return mito, outline


def _render(rng: np.random.Generator, grid: _Grid, cells: np.ndarray, membrane: np.ndarray,
            width_z: int, mito: np.ndarray, outline: np.ndarray, weights: np.ndarray,
            noise: float, blur: float) -> np.ndarray:
    """The float32 image in [0, 1] (before clipping): EM-like appearance of the labels."""
    shape = grid.shape
    d = grid.cell
    # per-cell brightness: thick neurites pale, a few cells dark (glia-like, dark axons)
    base = (0.62 + 0.2 * weights).astype(np.float32)
    dark = rng.random(base.size) < 0.08
    base[dark] -= rng.uniform(0.1, 0.2, int(dark.sum())).astype(np.float32)
    vesicle_rate = np.where(rng.random(base.size) < 0.2, 1.0, 0.05)
    shading, contrast = _smooth_fields(rng, shape, np.array([1.0, 0.8, 0.8]) * d / grid.scale, 2)
    image = base[cells]
    shading *= np.float32(0.05)
    image += shading
    # fine texture and vesicle-like dots: impulses in white noise, then a small blur
    texture = rng.standard_normal(shape, np.float32)
    texture *= np.float32(0.2)
    density = 0.012
    spots = rng.integers(0, cells.size, int(cells.size * density))
    spots = spots[rng.random(spots.size) < vesicle_rate[cells.ravel()[spots]]]
    texture.ravel()[spots] -= np.float32(3.2)
    sigma_z = 1.3 / grid.scale[0]
    if sigma_z >= 0.3:
        ndi.gaussian_filter1d(texture, sigma_z, axis=0, output=texture)
    ndi.gaussian_filter1d(texture, 1.3, axis=1, output=texture)
    ndi.gaussian_filter1d(texture, 1.3, axis=2, output=texture)
    image += texture
    # membranes: dark, with a contrast that fades in places (faint or broken membranes)
    strength = membrane.astype(np.float32)
    if width_z == 0 and shape[0] > 1:
        # a border oblique to the sections crosses a section's thickness where the cell
        # changes before the next section: that voxel holds some membrane, a grey smear
        oblique = cells[:-1] != cells[1:]
        np.maximum(strength[:-1], oblique * np.float32(0.3), out=strength[:-1])
        del oblique
    contrast *= np.float32(0.35)
    contrast += np.float32(0.85)
    np.clip(contrast, 0.15, 1.0, out=contrast)
    strength *= contrast
    darken = np.subtract(image, np.float32(0.12), out=texture)  # reuse the buffer
    darken *= strength
    image -= darken
    del strength, shading, contrast
    # mitochondria: darker, textured matrix and a dark double-membrane outline
    inner = mito > 0
    image[inner] = np.float32(0.34) + 0.8 * (image[inner] - np.float32(0.62))
    image[outline] = np.float32(0.12) + 0.3 * (image[outline] - np.float32(0.34))
    if blur > 0:
        if blur / grid.scale[0] >= 0.3:
            ndi.gaussian_filter1d(image, blur / grid.scale[0], axis=0, output=image)
        ndi.gaussian_filter1d(image, blur, axis=1, output=image)
        ndi.gaussian_filter1d(image, blur, axis=2, output=image)
    # section-to-section brightness and contrast jitter, then noise
    gain = (1.0 + rng.normal(0.0, 0.04, shape[0])).astype(np.float32)
    offset = rng.normal(0.0, 0.02, shape[0]).astype(np.float32)
    image *= gain[:, None, None]
    image += offset[:, None, None]
    if noise > 0:
        grain = rng.standard_normal(dtype=np.float32, out=texture)
        grain *= np.float32(noise)
        image += grain
    return image


def _section_defects(rng: np.random.Generator, image: np.ndarray) -> None:
    """Missing (black), dimmed and out-of-focus sections, as in real ssEM stacks."""
    z = image.shape[0]
    if z < 4:
        return
    count = max(1, z // 24)
    picks = rng.choice(z, size=min(z, 3 * count), replace=False)
    for i, s in enumerate(picks):
        kind = i % 3
        if kind == 0:
            image[s] = 0.0
        elif kind == 1:
            mean = image[s].mean()
            image[s] = mean * 0.7 + (image[s] - mean) * 0.35
        else:
            image[s] = ndi.gaussian_filter(image[s], 2.5)
