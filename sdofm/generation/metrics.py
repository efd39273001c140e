"""Distances between a set of real frames and a set of generated ones, each read from the
two sets' :class:`~sdofm.generation.features.Summary`.

Every metric is named ``<kind>/<space>`` or ``<kind>``; ``HIGHER_IS_BETTER`` names those
where a larger value is better (precision and recall); for all others 0 is a perfect match.
"""

from __future__ import annotations

import numpy as np

from sdofm.generation.features import VALUE_BINS, VALUE_RANGE, Summary

PR_K = 3
"""Neighbours defining each point's radius in precision and recall (Kynkaanniemi et al.)."""
HIGHER_IS_BETTER = ("precision", "recall")


def higher_is_better(metric: str) -> bool:
    return metric.split("/")[0] in HIGHER_IS_BETTER


def gaussian_stats(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, d) -> mean (d,) and covariance (d, d) (unbiased)."""
    f = np.asarray(f, dtype=np.float64)
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """The Frechet (2-Wasserstein) distance between N(mu1, cov1) and N(mu2, cov2), squared:
    |mu1 - mu2|^2 + tr(cov1 + cov2 - 2 (cov1^1/2 cov2 cov1^1/2)^1/2) (FID's formula, with
    symmetric square roots so that singular covariances of few samples stay real)."""
    s1 = _sqrt_psd(cov1)
    w = np.linalg.eigvalsh(s1 @ cov2 @ s1)
    cross = np.sqrt(np.clip(w, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * cross)


def kernel_distance(x: np.ndarray, y: np.ndarray) -> float:
    """KID (Binkowski et al. 2018): the unbiased squared MMD between the sets with the cubic
    polynomial kernel k(a, b) = (a.b / d + 1)^3 (0 in expectation for one distribution)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    d, m, n = x.shape[1], len(x), len(y)
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    within_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    within_y = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(within_x + within_y - 2 * kxy.mean())


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d2 = (a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.clip(d2, 0, None))


def _radii(a: np.ndarray, k: int) -> np.ndarray:
    """Each point's distance to its k-th nearest other point of the same set."""
    d = _distances(a, a)
    np.fill_diagonal(d, np.inf)
    return np.sort(d, axis=1)[:, k - 1]


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = PR_K) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): precision is the share of
    fake points inside some real point's k-NN ball (fidelity), recall the share of real
    points inside some fake point's ball (coverage)."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    d = _distances(real, fake)  # (R, F)
    precision = (d <= _radii(real, k)[:, None]).any(0).mean()
    recall = (d <= _radii(fake, k)[None, :]).any(1).mean()
    return float(precision), float(recall)


def wasserstein_from_histograms(h1: np.ndarray, h2: np.ndarray) -> np.ndarray:
    """(..., B) counts over ``VALUE_RANGE`` -> (...) the 1-Wasserstein distance between the
    normalised histograms, in model units: the area between their CDFs."""
    width = (VALUE_RANGE[1] - VALUE_RANGE[0]) / VALUE_BINS
    c1 = np.cumsum(h1, -1) / np.maximum(h1.sum(-1, keepdims=True), 1)
    c2 = np.cumsum(h2, -1) / np.maximum(h2.sum(-1, keepdims=True), 1)
    return np.abs(c1 - c2).sum(-1) * width


def spectrum_log_ratio(real: np.ndarray, fake: np.ndarray) -> np.ndarray:
    """(N, C, K) spectra of each set -> (C, K - 1): log10 of the mean fake over the mean
    real power at each frequency k >= 1."""
    pr, pf = real.mean(0)[:, 1:], fake.mean(0)[:, 1:]
    return np.log10(np.maximum(pf, 1e-30) / np.maximum(pr, 1e-30))


def seams(log_ratio: np.ndarray, size: int, window: int) -> float:
    """(C, K - 1) log ratios -> how far the ratio at 1 / window cycles per pixel and its
    harmonics departs from its neighbours (k +- 1), in dex, in absolute value, averaged over
    those frequencies and channels: a generator whose attention windows leave seams (or any
    pattern) every ``window`` px puts power there, or takes it away (0 when none)."""
    lr = np.concatenate([np.zeros((len(log_ratio), 1)), log_ratio], axis=1)  # index = k
    ks = list(range(size // window, size // 2, size // window))
    if not ks:
        return 0.0
    return float(np.mean([np.abs(lr[:, k] - (lr[:, k - 1] + lr[:, k + 1]) / 2) for k in ks]))


def memorisation(train: np.ndarray, generated: np.ndarray, held_out: np.ndarray) -> float:
    """Median distance of generated frames to their nearest training frame over the same
    for held-out real frames (features): about 1 for a generator that does not copy its
    training set, well below 1 for one that does."""
    dg = _distances(generated, train).min(1)
    dh = _distances(held_out, train).min(1)
    return float(np.median(dg) / max(np.median(dh), 1e-12))


PER_DIMENSION = ("physical",)
"""Feature spaces whose dimensions carry different units (a count, degrees, a correlation),
each scaled by its own standard deviation; a learned space keeps its geometry and is scaled
by one number."""


class Standardiser:
    """Features in the units of a reference set of real frames, centred on its mean and
    scaled: in ``PER_DIMENSION`` spaces each dimension by its standard deviation, floored at
    ``REL_FLOOR`` of its mean's magnitude (a law that holds in every real frame, such as
    Hale's, makes its feature nearly constant, and breaking it must still register); in the
    others by one number, the root mean square of the dimensions' deviations (a learned
    space keeps its geometry, as FID compares raw features). Physical dimensions that are
    zero in every reference frame are dropped."""

    REL_FLOOR = 0.01

    def __init__(self, reference: Summary):
        self.stats = {}
        for space, f in reference.features.items():
            f = np.asarray(f, np.float64)
            mu, sd = f.mean(0), f.std(0)
            if space in PER_DIMENSION:
                sd = np.maximum(sd, self.REL_FLOOR * np.abs(mu))
                keep = sd > 1e-12
            else:
                keep = np.ones(len(sd), bool)
                sd = np.full_like(sd, max(float(np.sqrt((sd**2).mean())), 1e-12))
            self.stats[space] = (mu[keep], sd[keep], keep)

    def __call__(self, space: str, f: np.ndarray) -> np.ndarray:
        mu, sd, keep = self.stats[space]
        return (np.asarray(f, np.float64)[:, keep] - mu) / sd


def scores(real: Summary, fake: Summary, std: Standardiser, window: int = 8) -> dict[str, float]:
    """Every distance between the two sets: per feature space Frechet distance (``fd/``),
    KID (``kid/``), precision and recall; the on-disk value distributions' 1-Wasserstein
    distance (``value_w1``: mean over channels; ``value_w1_max``: the worst channel); the
    radially averaged power spectra (``spectrum``: mean |log10 fake / real| over channels
    and frequencies; ``seams``: :func:`seams`)."""
    out: dict[str, float] = {}
    for space in real.features:
        r, f = std(space, real.features[space]), std(space, fake.features[space])
        out[f"fd/{space}"] = frechet_distance(*gaussian_stats(r), *gaussian_stats(f))
        out[f"kid/{space}"] = kernel_distance(r, f)
        out[f"precision/{space}"], out[f"recall/{space}"] = precision_recall(r, f)
    w1 = wasserstein_from_histograms(real.hist.sum(0), fake.hist.sum(0))
    out["value_w1"] = float(w1.mean())
    out["value_w1_max"] = float(w1.max())
    lr = spectrum_log_ratio(real.spectrum, fake.spectrum)
    out["spectrum"] = float(np.abs(lr).mean())
    out["seams"] = seams(lr, 2 * (real.spectrum.shape[-1] - 1), window)
    return out
