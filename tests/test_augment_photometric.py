"""Photometric augmentations: image only, shape kept, float32 in [0, 1], seeded, and each does
what it says (statistically)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage

import emrun.data.augment.photometric as photometric
from emrun.data.augment import Context, Pipeline, Sample
from emrun.recipe.augment import (
    BlurrySection,
    Box,
    ContrastCompression,
    Grayscale,
    MissingSection,
    Noise,
)
from emrun.registry import augmentations

SHAPE = (8, 48, 40)

SPECS = {
    "grayscale": Grayscale(),
    "grayscale_2d_partial": Grayscale(mode="2d", partial=True),
    "grayscale_extreme": Grayscale(contrast=10, brightness=10, gamma=4, partial=True),
    "missing_constant": MissingSection(max_sections=4, value=0.3, partial=True),
    "missing_random": MissingSection(max_sections=4, fill="random", consecutive=True,
                                     partial=True),
    "blurry": BlurrySection(max_sections=4, sigma_max=5.0, partial=True),
    "box": Box(size=(3, 12), modes=["fill", "noise", "blur"]),
    "noise": Noise(),
    "noise_poisson_strong": Noise(sigma_max=1.0, poisson=True),
    "contrast_compression": ContrastCompression(),
    "contrast_expansion": ContrastCompression(factor=(0.5, 3.0)),
}

CLASSES = {
    "grayscale": photometric.GrayscaleAugment,
    "missing_section": photometric.MissingSectionAugment,
    "blurry_section": photometric.BlurrySectionAugment,
    "box": photometric.BoxAugment,
    "noise": photometric.NoiseAugment,
    "contrast_compression": photometric.ContrastCompressionAugment,
}


def make_sample(shape=SHAPE, seed=0) -> Sample:
    rng = np.random.default_rng(seed)
    image = rng.random(shape, dtype=np.float32)
    labels = rng.integers(0, 2**40, size=shape, dtype=np.uint64)
    mask = (rng.random(shape) > 0.2).astype(np.uint8)
    semantic = {"mito": (rng.random(shape) > 0.9).astype(np.uint8)}
    return Sample(image=image, labels=labels, mask=mask, semantic=semantic)


def planned(spec, seed: int = 0, shape=SHAPE):
    """The step ``spec`` plans at probability 1 (the ImageOp is ``step.apply``)."""
    aug = augmentations.build(spec.model_copy(update={"p": 1.0}))
    return aug.prepare(np.random.default_rng(seed), shape, Context())


def test_builders_registered():
    for name, cls in CLASSES.items():
        spec = augmentations.entry(name).spec()
        assert isinstance(augmentations.build(spec), cls)


@pytest.mark.parametrize("key", list(SPECS))
def test_image_only_shape_dtype_range(key):
    sample = make_sample()
    before = {"image": sample.image.copy(), "labels": sample.labels.copy(),
              "mask": sample.mask.copy(), "mito": sample.semantic["mito"].copy()}
    for seed in range(6):
        step = planned(SPECS[key], seed)
        assert step.in_shape == SHAPE
        out = step.apply(sample)
        assert out.labels is sample.labels and out.mask is sample.mask
        assert out.semantic["mito"] is sample.semantic["mito"]
        assert out.image is not sample.image
        assert out.image.shape == SHAPE and out.image.dtype == np.float32
        assert np.isfinite(out.image).all()
        assert out.image.min() >= 0.0 and out.image.max() <= 1.0
    # nothing was modified in place
    np.testing.assert_array_equal(sample.image, before["image"])
    np.testing.assert_array_equal(sample.labels, before["labels"])
    np.testing.assert_array_equal(sample.mask, before["mask"])
    np.testing.assert_array_equal(sample.semantic["mito"], before["mito"])


@pytest.mark.parametrize("key", ["grayscale", "missing_constant", "blurry", "box", "noise",
                                 "contrast_compression"])
def test_probability(key):
    aug = augmentations.build(SPECS[key].model_copy(update={"p": 0.3}))
    rng = np.random.default_rng(123)
    sample = make_sample((2, 16, 16))
    draws = 2000
    applied = 0
    for _ in range(draws):
        step = aug.prepare(rng, (2, 16, 16), Context())
        changed = isinstance(step.apply, photometric.ImageOp)
        assert changed == (step.apply(sample) is not sample)
        applied += changed
    assert abs(applied / draws - 0.3) < 0.04  # 4 standard deviations


@pytest.mark.parametrize("key", list(SPECS))
def test_deterministic(key):
    sample = make_sample()
    a = planned(SPECS[key], 7).apply(sample).image
    b = planned(SPECS[key], 7).apply(sample).image
    np.testing.assert_array_equal(a, b)
    others = [planned(SPECS[key], seed).apply(sample).image for seed in (8, 9, 10)]
    assert any(not np.array_equal(a, o) for o in others)


def test_shape_mismatch_is_an_error():
    step = planned(Noise(), 0, (4, 16, 16))
    with pytest.raises(ValueError, match="planned for shape"):
        step.apply(make_sample((4, 16, 20)))


def test_pipeline_keeps_shape():
    pipeline = Pipeline(list(SPECS.values()))
    steps, in_shape = pipeline.prepare(np.random.default_rng(0), SHAPE)
    assert in_shape == SHAPE
    out = Pipeline.apply(steps, make_sample())
    assert out.image.shape == SHAPE and out.image.dtype == np.float32


# -- grayscale -------------------------------------------------------------------------------


def repeated_sections(shape=SHAPE) -> Sample:
    section = np.random.default_rng(3).random(shape[1:], dtype=np.float32)
    return Sample(np.repeat(section[None], shape[0], axis=0), None, None, {})


def test_grayscale_3d_one_transform_2d_per_section():
    sample = repeated_sections()
    for seed in range(5):
        out = planned(Grayscale(mode="3d"), seed).apply(sample).image
        for z in range(1, SHAPE[0]):
            np.testing.assert_array_equal(out[z], out[0])
        out = planned(Grayscale(mode="2d"), seed).apply(sample).image
        distinct = {out[z].tobytes() for z in range(SHAPE[0])}
        assert len(distinct) == SHAPE[0]


def test_grayscale_formula():
    sample = make_sample()
    x = sample.image.astype(np.float64)
    for mode in ("2d", "3d"):
        step = planned(Grayscale(mode=mode, contrast=1.0, brightness=0.4, gamma=1.0), 5)
        op = step.apply
        n = SHAPE[0] if mode == "2d" else 1
        assert op.contrast.shape == op.brightness.shape == op.gamma.shape == (n,)
        assert np.all(np.abs(op.contrast - 1) <= 0.5) and np.all(np.abs(op.brightness) <= 0.2)
        assert np.all((op.gamma >= 0.5) & (op.gamma <= 2))
        a, b, g = (v.astype(np.float64)[:, None, None] for v in (op.contrast, op.brightness,
                                                                   op.gamma))
        expected = np.clip(x * a + b, 0, 1) ** g
        np.testing.assert_allclose(step.apply(sample).image, expected, atol=2e-6)


def test_grayscale_partial_changes_one_region_per_section():
    sample = make_sample()
    seen_partial = 0
    for seed in range(20):
        step = planned(Grayscale(mode="2d", partial=True), seed)
        regions = step.apply.regions
        if regions is None:
            continue
        seen_partial += 1
        out = step.apply(sample).image
        for z, region in enumerate(regions):
            inside = np.zeros(SHAPE[1:], dtype=bool)
            inside[region] = True
            assert 0 < inside.sum() < inside.size
            np.testing.assert_array_equal(out[z][~inside], sample.image[z][~inside])
    assert 3 <= seen_partial <= 17  # "sometimes": about half of the samples


# -- missing sections ------------------------------------------------------------------------


@pytest.mark.parametrize("consecutive", [False, True])
def test_missing_sections_constant(consecutive):
    sample = make_sample()
    counts = set()
    for seed in range(60):
        spec = MissingSection(max_sections=3, value=0.25, consecutive=consecutive)
        out = planned(spec, seed).apply(sample).image
        missing = [z for z in range(SHAPE[0]) if np.all(out[z] == np.float32(0.25))]
        kept = [z for z in range(SHAPE[0]) if z not in missing]
        assert 1 <= len(missing) <= 3
        counts.add(len(missing))
        np.testing.assert_array_equal(out[kept], sample.image[kept])
        if consecutive:
            assert missing == list(range(missing[0], missing[0] + len(missing)))
    assert counts == {1, 2, 3}


def test_missing_sections_random_and_partial():
    sample = make_sample()
    step = planned(MissingSection(max_sections=4, fill="random"), 1)
    out = step.apply(sample).image
    zs = step.apply.sections
    assert not np.any(out[zs] == sample.image[zs])
    assert abs(out[zs].mean() - 0.5) < 0.02
    partial = 0
    for seed in range(10):
        step = planned(MissingSection(max_sections=4, value=0.0, partial=True), seed)
        out = step.apply(sample).image
        for z, region in zip(step.apply.sections, step.apply.regions, strict=True):
            if region is None:
                assert np.all(out[z] == 0)
                continue
            partial += 1
            inside = np.zeros(SHAPE[1:], dtype=bool)
            inside[region] = True
            assert np.all(out[z][inside] == 0)
            np.testing.assert_array_equal(out[z][~inside], sample.image[z][~inside])
    assert partial > 0


# -- blurry sections -------------------------------------------------------------------------


def high_frequency(section: np.ndarray) -> float:
    return float((np.diff(section, axis=0) ** 2).sum() + (np.diff(section, axis=1) ** 2).sum())


def test_blurry_sections_lose_high_frequencies():
    sample = make_sample()
    for seed in range(10):
        step = planned(BlurrySection(max_sections=3, sigma_max=3.0), seed)
        out = step.apply(sample).image
        zs = set(step.apply.sections.tolist())
        assert 1 <= len(zs) <= 3
        assert np.all((step.apply.sigmas > 0) & (step.apply.sigmas <= 3.0))
        sigmas = dict(zip(step.apply.sections.tolist(), step.apply.sigmas, strict=True))
        for z in range(SHAPE[0]):
            if z in zs and sigmas[z] >= 0.5:  # much smaller sigmas hardly blur at all
                assert high_frequency(out[z]) < 0.8 * high_frequency(sample.image[z])
            elif z in zs:
                assert high_frequency(out[z]) <= high_frequency(sample.image[z]) * (1 + 1e-6)
            else:
                np.testing.assert_array_equal(out[z], sample.image[z])


@pytest.mark.parametrize("sigma", [0.4, 1.0, 2.5, 5.0, 30.0])
def test_blur_sections_matches_scipy(sigma):
    sections = np.random.default_rng(0).random((2, 37, 50), dtype=np.float32)
    out = photometric.blur_sections(sections, [sigma, 0.0])
    assert out.dtype == np.float32
    expected = scipy.ndimage.gaussian_filter(sections[0].astype(np.float64), sigma)
    np.testing.assert_allclose(out[0], expected, atol=1e-6)
    np.testing.assert_allclose(out[1], sections[1], atol=1e-6)


# -- boxes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("density", [0.1, 0.3, 0.6])
def test_box_density(density):
    shape = (12, 96, 96)
    sample = make_sample(shape)
    fractions = []
    for seed in range(8):
        step = planned(Box(density=density, size=(5, 25), modes=["fill", "noise"]), seed, shape)
        covered = step.apply.coverage()
        fractions.append(covered.mean())
        out = step.apply(sample).image
        np.testing.assert_array_equal(out[~covered], sample.image[~covered])
        assert np.mean(out[covered] != sample.image[covered]) > 0.99
    assert abs(np.mean(fractions) - density) < 0.03


def test_box_kinds():
    shape = (6, 64, 64)
    sample = make_sample(shape)
    for modes, kind in [(["fill"], photometric.BOX_FILL), (["noise"], photometric.BOX_NOISE),
                        (["blur"], photometric.BOX_BLUR)]:
        step = planned(Box(density=0.05, size=(8, 8), z_size=(1, 1), modes=modes), 2, shape)
        assert np.all(step.apply.kinds == kind)
        out = step.apply(sample).image
        z0, z1, y0, y1, x0, x1 = step.apply.boxes[-1]  # the last box is not overwritten
        region = out[z0:z1, y0:y1, x0:x1]
        if kind == photometric.BOX_FILL:
            assert np.all(region == step.apply.values[-1])
        elif kind == photometric.BOX_NOISE:
            assert region.std() > 0.2  # uniform noise: std 0.29
        else:
            assert 0 < region.std() < 0.5 * sample.image[z0:z1, y0:y1, x0:x1].std()


# -- noise -----------------------------------------------------------------------------------


def test_standard_normal():
    z = photometric.standard_normal(np.random.default_rng(0), (101, 33, 33))
    assert z.shape == (101, 33, 33) and z.dtype == np.float32
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert abs((z**4).mean() - 3) < 0.1
    assert abs(np.mean(np.abs(z) > 1.96) - 0.05) < 0.005


def test_noise_sigma_statistic():
    image = np.full((8, 64, 64), 0.5, dtype=np.float32)
    sample = Sample(image, None, None, {})
    for seed in range(8):
        step = planned(Noise(sigma_max=0.1), seed, image.shape)
        op = step.apply
        assert 0 <= op.sigma < 0.1 and op.photons is None
        residual = step.apply(sample).image - 0.5
        assert abs(residual.mean()) < 0.003
        assert abs(residual.std() - op.sigma) < 0.03 * op.sigma + 1e-4


def test_noise_poisson_statistic():
    image = np.full((8, 64, 64), 0.5, dtype=np.float32)
    sample = Sample(image, None, None, {})
    for seed in range(5):
        step = planned(Noise(sigma_max=0.05, poisson=True), seed, image.shape)
        op = step.apply
        assert op.photons >= 0.5 / 0.05**2
        expected = np.sqrt(op.sigma**2 + 0.5 / op.photons)
        assert abs((step.apply(sample).image - 0.5).std() - expected) < 0.03 * expected


def test_noise_poisson_exact_in_the_dark():
    image = np.full((4, 64, 64), 0.005, dtype=np.float32)  # 5 photons expected at k = 1000
    op = photometric.NoiseOp(shape=image.shape, sigma=0.0, photons=1000.0, seed=3)
    counts = op.transform(image).astype(np.float64) * 1000
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-3)  # whole photon counts
    assert abs(counts.mean() - 5) < 0.1 and abs(counts.var() - 5) < 0.3


# -- contrast compression --------------------------------------------------------------------


def test_contrast_compression_scales_std():
    sample = make_sample()
    for seed in range(5):
        step = planned(ContrastCompression(factor=(0.3, 0.9)), seed)
        factor = step.apply.factor
        assert 0.3 <= factor <= 0.9
        out = step.apply(sample).image
        assert abs(out.std() / sample.image.std() - factor) < 1e-4
        assert abs(out.mean() - sample.image.mean()) < 1e-5
