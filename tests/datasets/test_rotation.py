"""Differential rotation: the rate against the synthetic Sun's own law, and a rotated frame
against the closed form of where a feature at a known latitude goes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sdofm.archive.synthetic.sun import DAY_S, ActiveRegion
from sdofm.constants import disk_radius_px
from sdofm.datasets.rotation import rotate_frames, synodic_rate


def test_the_rate_is_the_synthetic_suns_own():
    for lat in (-35.0, -10.0, 0.0, 20.0, 60.0):
        ar = ActiveRegion(0, lat, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0)
        assert synodic_rate(lat) == pytest.approx(ar.longitude(DAY_S), rel=1e-12)
    # By hand: 14.713 - 0.9856 at the equator; at 60 degrees sin^2 = 0.75, so
    # 14.713 - 2.396 x 0.75 - 1.787 x 0.5625 - 0.9856.
    assert synodic_rate(0.0) == pytest.approx(13.7274, abs=1e-9)
    assert synodic_rate(60.0) == pytest.approx(10.9252125, abs=1e-9)


def _blob(size: int, radius: float, lat: float, lon: float, b0: float, sigma: float = 1.5):
    """A Gaussian spot (sigma px) where the point (lat, lon) is seen, and that position."""
    la, lo, b = (math.radians(v) for v in (lat, lon, b0))
    x = math.cos(la) * math.sin(lo)
    y = math.cos(b) * math.sin(la) - math.sin(b) * math.cos(la) * math.cos(lo)
    c = (size - 1) / 2
    row, col = c + y * radius, c + x * radius
    rr, cc = np.mgrid[0:size, 0:size]
    img = np.exp(-((rr - row) ** 2 + (cc - col) ** 2) / (2 * sigma**2))
    return img, (row, col)


@pytest.mark.parametrize(("lat", "b0"), [(0.0, 0.0), (30.0, 0.0), (-45.0, 0.0), (25.0, 6.0)])
def test_a_feature_moves_as_the_closed_form_says(lat, b0):
    size, hours = 256, 30.0
    radius = disk_radius_px(size)
    lon0 = -20.0
    img, _ = _blob(size, radius, lat, lon0, b0)
    lon1 = lon0 + synodic_rate(lat) * hours / 24
    want, (row, col) = _blob(size, radius, lat, lon1, b0)
    got = rotate_frames(img[None], hours, radius, b0)[0]
    win = (slice(int(row) - 8, int(row) + 9), slice(int(col) - 8, int(col) + 9))
    g = got[win]
    rr, cc = np.mgrid[win]
    centroid = ((g * rr).sum() / g.sum(), (g * cc).sum() / g.sum())
    # Within a tenth of a pixel of the closed form (the spot moved about 15-20 px).
    assert abs(centroid[0] - row) < 0.1 and abs(centroid[1] - col) < 0.1, (centroid, row, col)
    assert abs(col - _blob(size, radius, lat, lon0, b0)[1][1]) > 10  # it did move
    # Persistence would leave it where it was: the rotated frame is much nearer the truth.
    assert np.abs(got - want).sum() < 0.2 * np.abs(img - want).sum()


def test_off_disk_and_behind_the_limb_keep_their_values():
    size = 64
    radius = disk_radius_px(size)
    frame = np.random.default_rng(0).random((2, size, size)).astype(np.float32)
    got = rotate_frames(frame, 24.0, radius)
    c = (size - 1) / 2
    rr, cc = np.mgrid[0:size, 0:size]
    x, y = (cc - c) / radius, (rr - c) / radius
    off = x * x + y * y >= 1
    assert np.array_equal(got[:, off], frame[:, off])
    # The eastern limb rotates in from behind the disk: nothing to take there.
    lon = np.degrees(np.arctan2(x, np.sqrt(np.clip(1 - x * x - y * y, 0, None))))
    lat = np.degrees(np.arcsin(np.clip(y, -1, 1)))
    behind = ~off & (lon < -90 + synodic_rate(lat) - 0.5)
    assert behind.any() and np.array_equal(got[:, behind], frame[:, behind])
    assert got.dtype == frame.dtype and got.shape == frame.shape
