"""Generation metrics against closed forms, hand counts and scipy's own implementations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg, stats

from sdofm.generation.features import (
    VALUE_BINS,
    VALUE_RANGE,
    Summary,
    radial_spectra,
    value_histograms,
)
from sdofm.generation.metrics import (
    Standardiser,
    frechet_distance,
    gaussian_stats,
    kernel_distance,
    memorisation,
    precision_recall,
    scores,
    seams,
    spectrum_log_ratio,
    wasserstein_from_histograms,
)


def test_frechet_distance_closed_forms():
    # Diagonal Gaussians: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    fd = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert fd == pytest.approx(5.0 + 1.0 + 1.0 + 4.0)
    # Full covariances: scipy's matrix square root of the product, FID's usual formula.
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 6)), rng.normal(size=(150, 6)) @ rng.normal(size=(6, 6))
    (m1, c1), (m2, c2) = gaussian_stats(x), gaussian_stats(y)
    cross = linalg.sqrtm(c1 @ c2).real
    ref = ((m1 - m2) ** 2).sum() + np.trace(c1 + c2 - 2 * cross)
    assert frechet_distance(m1, c1, m2, c2) == pytest.approx(ref, rel=1e-8)
    assert frechet_distance(m1, c1, m1, c1) == pytest.approx(0.0, abs=1e-8)
    # Fewer samples than dimensions (singular covariances): still real and >= 0.
    s1, s2 = gaussian_stats(rng.normal(size=(5, 20))), gaussian_stats(rng.normal(size=(5, 20)))
    assert 0 < frechet_distance(*s1, *s2) < np.inf


def test_kernel_distance_is_the_unbiased_mmd_by_loops():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(7, 3)), rng.normal(1.0, 1.0, size=(5, 3))

    def k(a, b):
        return (a @ b / 3 + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    xy = sum(k(a, b) for a in x for b in y) / (7 * 5)
    assert kernel_distance(x, y) == pytest.approx(xx + yy - 2 * xy)
    # Unbiased: about 0 for one distribution (either sign), clearly positive for two.
    same = kernel_distance(rng.normal(size=(400, 4)), rng.normal(size=(400, 4)))
    shifted = kernel_distance(rng.normal(size=(400, 4)), rng.normal(0.5, 1, size=(400, 4)))
    assert abs(same) < 0.05 < shifted


def test_precision_and_recall_by_hand_count():
    # Real points on a line at 0..4: with k = 1 every radius is 1. Fakes at 0.5 (inside),
    # 1.9 (inside) and 10 (outside): precision 2/3.
    real = np.arange(5.0)[:, None]
    fake = np.array([[0.5], [1.9], [10.0]])
    # Fake radii (k = 1): 0.5 -> 1.4, 1.9 -> 1.4, 10 -> 8.1. Real 0..3 lie within 1.4 of
    # 0.5 or 1.9; real 4 lies within 8.1 of 10 (distance 6): recall 5/5.
    assert precision_recall(real, fake, k=1) == (pytest.approx(2 / 3), 1.0)
    # Without the outlier, recall drops: real 4 is 2.1 from 1.9, beyond its radius 1.4.
    assert precision_recall(real, fake[:2], k=1) == (1.0, pytest.approx(4 / 5))


def test_wasserstein_from_histograms_matches_scipy():
    rng = np.random.default_rng(2)
    a, b = rng.normal(0, 1, 5000), rng.normal(0.7, 1.5, 4000)
    lo, hi = VALUE_RANGE

    def hist(v):
        return np.histogram(v, VALUE_BINS, (lo, hi))[0]

    ours = wasserstein_from_histograms(hist(a), hist(b))
    width = (hi - lo) / VALUE_BINS
    assert abs(ours - stats.wasserstein_distance(a, b)) < 2 * width
    assert wasserstein_from_histograms(hist(a), hist(a)) == 0


def test_value_histograms_count_on_disk_pixels_per_channel():
    frames = np.zeros((2, 3, 32, 32), np.float32)
    frames[0, 1] = 1.0
    frames[1, 2] = -7.0  # beyond the range: the first bin
    h = value_histograms(frames)
    on_disk = h[0, 0].sum()
    assert h.shape == (2, 3, VALUE_BINS) and (h.sum(-1) == on_disk).all()
    assert on_disk == pytest.approx(np.pi * 12.75**2, rel=0.05)  # disk radius 204 / 16 px
    zero_bin = int((0 - VALUE_RANGE[0]) / (VALUE_RANGE[1] - VALUE_RANGE[0]) * VALUE_BINS)
    assert h[0, 0, zero_bin] == on_disk and h[0, 1, zero_bin + 50] == on_disk
    assert h[1, 2, 0] == on_disk


def test_radial_spectrum_of_a_cosine_and_parseval():
    H, k0 = 64, 5
    x = np.arange(H)
    wave = np.cos(2 * np.pi * k0 * x / H)[None, :] * np.ones((H, 1))
    frames = np.stack([wave, wave.T])[None].astype(np.float32)  # (1, 2, H, H)
    p = radial_spectra(frames)
    assert p.shape == (1, 2, H // 2 + 1)
    assert (p[0].argmax(-1) == k0).all()
    # Parseval: the rings' power times their pixel counts is sum |FFT|^2 = H^2 sum x^2.
    f = np.fft.fftfreq(H) * H
    k = np.rint(np.hypot(*np.meshgrid(f, f, indexing="ij")))
    counts = np.bincount(k[k <= H // 2].astype(int).ravel(), minlength=H // 2 + 1)
    assert (p[0, 0] * counts).sum() == pytest.approx(H * H * (wave**2).sum(), rel=1e-6)


def test_seams_read_power_at_the_window_period():
    lr = np.zeros((2, 32))  # log ratios for k = 1 .. 32 of 64 px frames
    assert seams(lr, 64, 8) == 0
    lr[:, 8 - 1] = 0.6  # k = 8: 1/8 cycles per pixel
    assert seams(lr, 64, 8) == pytest.approx(0.6 / 3)  # k = 8, 16, 24
    lr[:, 16 - 1] = -0.3  # a trough counts as well
    assert seams(lr, 64, 8) == pytest.approx(0.9 / 3)
    # Frames with a line every 8 px: the log ratio against plain frames peaks there.
    rng = np.random.default_rng(3)
    plain = rng.normal(size=(4, 1, 64, 64))
    lined = plain.copy()
    lined[..., ::8, :] += 1
    lined[..., :, ::8] += 1
    ratio = spectrum_log_ratio(radial_spectra(plain), radial_spectra(lined))
    assert seams(ratio, 64, 8) > 0.3 > 1e-6 > seams(ratio, 64, 6)  # k = 10, 20, 30


def test_memorisation_ratio():
    rng = np.random.default_rng(4)
    train, held, gen = (rng.normal(size=(300, 5)) for _ in range(3))
    assert memorisation(train, gen, held) == pytest.approx(1.0, abs=0.15)
    copies = train[:100] + rng.normal(0, 0.01, (100, 5))
    assert memorisation(train, copies, held) < 0.05


def test_standardiser_scales_physical_features_per_dimension_and_learned_ones_as_one():
    rng = np.random.default_rng(5)
    f = rng.normal(size=(100, 3)) * [1.0, 10.0, 100.0] + [0, 5, 0]
    f = np.concatenate([f, np.zeros((100, 1)), np.full((100, 1), -1.0)], axis=1)
    empty = np.zeros((100, 1, 1))
    ref = Summary({"physical": f, "random_cnn": f}, empty, empty)
    std = Standardiser(ref)
    z = std("physical", f)
    assert z.shape == (100, 4)  # the zero dimension dropped, the constant -1 kept
    np.testing.assert_allclose(z[:, :3].std(0), 1.0, rtol=1e-10)
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-10)
    flipped = f.copy()
    flipped[:, -1] = 1.0  # a law every reference frame obeys, broken: 200 floors away
    np.testing.assert_allclose(std("physical", flipped)[:, -1], 200.0)
    u = std("random_cnn", f)
    sd = f.std(0)  # one scale for the space: the dimensions keep their ratios
    np.testing.assert_allclose(u.std(0), sd / np.sqrt((sd**2).mean()), rtol=1e-10)


def test_scores_are_zero_between_identical_sets_and_grow_with_a_shift():
    rng = np.random.default_rng(6)
    feats = rng.normal(size=(60, 4))
    hist = np.zeros((60, 2, VALUE_BINS))
    hist[:, :, 300] = 10  # every on-disk pixel at 0
    spec = rng.uniform(1, 2, (60, 2, 33))
    real = Summary({"physical": feats}, hist, spec)
    std = Standardiser(real)
    same = scores(real, real, std)
    for m in ("fd/physical", "value_w1", "value_w1_max", "spectrum", "seams"):
        assert same[m] == pytest.approx(0.0, abs=1e-9), m
    assert same["precision/physical"] == same["recall/physical"] == 1.0
    moved = Summary({"physical": feats + 3.0}, np.roll(hist, 20, -1), spec * 4)  # 0 -> 0.4
    out = scores(real, moved, std)
    assert out["fd/physical"] == pytest.approx(9.0 * 4 / feats.std(0).mean() ** 2, rel=0.3)
    assert out["spectrum"] == pytest.approx(np.log10(4))
    assert out["value_w1"] == out["value_w1_max"] == pytest.approx(20 * 12 / VALUE_BINS)
    assert out["precision/physical"] < 0.5
