"""Deliberate corruptions of real frames, each a failure a generated Sun can show: a metric
is worth reading only where it tells these from two halves of real data.

Each takes ``(N, C, H, W)`` frames in model units and returns a corrupted copy (the input is
never modified). Channels are named as in the data config; a corruption whose channels are
absent raises ``ValueError`` (:func:`applicable` lists those that apply).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage

from sdofm.generation.features import disk_geometry

BLUR_SIGMA_PX = 1.0
"""Gaussian blur, in pixels of the scored frames."""
NOISE_STD = 0.25
"""White noise added, in units of each channel's standard deviation over the set."""
SEAM_PERIOD_PX = 8
"""Block seams: every ``SEAM_PERIOD_PX``-th row and column offset, as window borders."""
SEAM_STD = 0.5
"""The seams' offset, in units of each channel's standard deviation over the set."""
SWAP_PAIR = ("171A", "193A")
"""The AIA channels swapped: the two most alike (both coronal, Fe IX and Fe XII), so the
hardest swap to see; the first two AIA channels when these are absent."""
SCALED_CHANNEL, SCALE = "171A", 0.7
"""The channel scaled (in model units, its contrast 30 % low); the first AIA channel when
absent."""
MAGNETOGRAMS = ("Bx", "By", "Bz")


def _aia(channels: Sequence[str]) -> list[int]:
    return [i for i, c in enumerate(channels) if c not in MAGNETOGRAMS]


def _channel_std(x: np.ndarray) -> np.ndarray:
    return x.std(axis=(0, 2, 3)).reshape(1, -1, 1, 1)


def blur(x: np.ndarray, channels, rng) -> np.ndarray:
    return ndimage.gaussian_filter(x, sigma=(0, 0, BLUR_SIGMA_PX, BLUR_SIGMA_PX))


def noise(x: np.ndarray, channels, rng) -> np.ndarray:
    return x + NOISE_STD * _channel_std(x) * rng.standard_normal(x.shape).astype(x.dtype)


def block_seams(x: np.ndarray, channels, rng) -> np.ndarray:
    out = x.copy()
    d = SEAM_STD * _channel_std(x)  # (1, C, 1, 1)
    out[:, :, ::SEAM_PERIOD_PX, :] += d
    out[:, :, :, ::SEAM_PERIOD_PX] += d
    return out


def swap_channels(x: np.ndarray, channels, rng) -> np.ndarray:
    pair = [list(channels).index(c) for c in SWAP_PAIR if c in channels]
    if len(pair) < 2:
        pair = _aia(channels)[:2]
    if len(pair) < 2:
        raise ValueError(f"swapping two AIA channels needs two of them, got {list(channels)}")
    out = x.copy()
    out[:, pair] = x[:, pair[::-1]]
    return out


def flip_polarity(x: np.ndarray, channels, rng) -> np.ndarray:
    """The northern hemisphere's magnetic field reversed (Hale's law broken there)."""
    idx = [list(channels).index(c) for c in MAGNETOGRAMS if c in channels]
    if not idx:
        raise ValueError(f"a polarity flip needs a magnetogram channel, got {list(channels)}")
    out = x.copy()
    north = disk_geometry(x.shape[-1])[1] > 0
    for i in idx:
        out[:, i, north] = -x[:, i, north]
    return out


def scale_channel(x: np.ndarray, channels, rng) -> np.ndarray:
    i = list(channels).index(SCALED_CHANNEL) if SCALED_CHANNEL in channels else None
    if i is None:
        aia = _aia(channels)
        if not aia:
            raise ValueError(f"scaling an AIA channel needs one, got {list(channels)}")
        i = aia[0]
    out = x.copy()
    out[:, i] *= SCALE
    return out


Corruption = Callable[[np.ndarray, Sequence[str], np.random.Generator], np.ndarray]
CORRUPTIONS: dict[str, Corruption] = {
    "blur": blur,
    "noise": noise,
    "block_seams": block_seams,
    "swap_channels": swap_channels,
    "flip_polarity": flip_polarity,
    "scale_channel": scale_channel,
}


def applicable(channels: Sequence[str]) -> list[str]:
    """The corruptions that these channels allow."""
    names = list(CORRUPTIONS)
    if len(_aia(channels)) < 2:
        names.remove("swap_channels")
    if not _aia(channels):
        names.remove("scale_channel")
    if not any(c in channels for c in MAGNETOGRAMS):
        names.remove("flip_polarity")
    return names
