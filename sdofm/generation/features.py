"""What the generation scores read from a set of frames: features in three spaces, on-disk
pixel-value histograms and radially averaged power spectra, per frame.

Frames are ``(N, C, H, W)`` float arrays in model units (the pipeline's scaled, z-scored
pixels, one time step), with the archive's orientation: row 0 is the south edge, solar
north at high row index, solar west at high column index (``sdofm.archive.synthetic.sun``).

The feature spaces (no ImageNet network anywhere):

* ``encoder``: a pretrained sdofm encoder's tokens, mean-pooled (:func:`encoder_features`);
* ``random_cnn``: a seeded, untrained convolutional network (:class:`RandomConvNet`), whose
  features respond to texture and structure at several scales without having learnt any;
* ``physical``: numbers a heliophysicist reads off a frame (:func:`physical_features`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from sdofm.constants import disk_radius_px

VALUE_RANGE = (-6.0, 6.0)
"""Model units the value histograms span (values outside fall in the end bins): a z-scored
AIA channel lies within it but for its most extreme pixels, HMI's fixed scaling in [-1, 1]."""
VALUE_BINS = 600
"""Histogram bins over ``VALUE_RANGE`` (0.02 model units each)."""
LIMB_ANNULI = (0.7, 0.9, 1.0, 1.1, 1.3)
"""Edges of the annuli, in solar radii, whose mean value per channel is the limb profile."""
AR_THRESHOLD = 0.35
"""|Bz| above which an on-disk pixel belongs to an active region, in model units: 100 G
under the default fixed magnetogram scaling, asinh(100 / 50) / asinh(1500 / 50)."""
AR_MIN_PIXELS = 2
"""Strong-field pixels an active region must hold to count."""
AR_JOIN_RADII = 0.08
"""Strong-field pixels closer than this (solar radii) belong to one region, so that a
bipole's two polarities are one region."""
RANDOM_CNN_WIDTHS = (16, 32, 64)
"""Channels of the random network's three stride-2 convolutions (features: each layer's
spatial mean, 112 numbers)."""
RANDOM_CNN_SEED = 0
"""The random network's weights: one fixed network, so that every run, validation and
scoreboard reads frames in the same feature space."""


def disk_geometry(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (x, y, r), each (size, size): solar radii from the disk centre, x west (columns),
    y north (rows), r the distance; the disk radius of an SDOML frame of this size."""
    c = (size - 1) / 2
    R = disk_radius_px(size)
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
    x, y = (cols - c) / R, (rows - c) / R
    return x, y, np.hypot(x, y)


def physical_names(channels: Sequence[str]) -> list[str]:
    """The names of :func:`physical_features`' columns, in order."""
    names = []
    if "Bz" in channels:
        names += ["ar_count", "ar_lat_north", "ar_lat_south", "lead_north", "lead_south"]
    edges = LIMB_ANNULI
    for c in channels:
        names += [f"limb_{c}_{a:.1f}-{b:.1f}" for a, b in pairwise(edges)]
    names += [f"corr_{a}_{b}" for i, a in enumerate(channels) for b in channels[i + 1 :]]
    return names


def physical_features(images: np.ndarray, channels: Sequence[str]) -> np.ndarray:
    """images (N, C, H, W) -> (N, F) numbers read from each frame (:func:`physical_names`):

    * with ``Bz``: the count of active regions (on-disk pixels with |Bz| above
      ``AR_THRESHOLD``, joined within ``AR_JOIN_RADII``), their |Bz|-weighted mean |latitude| per hemisphere (deg; 0 with
      none), and the leading-polarity sign per hemisphere: sum Bz (x - x_AR) over sum |Bz|
      |x - x_AR| over its regions, x_AR each region's flux-weighted centre, in [-1, 1]
      (Hale's law, cycle 24: negative in the north, positive in the south);
    * the limb profile: each channel's mean in the annuli ``LIMB_ANNULI`` (solar radii);
    * the cross-channel correlation matrix over on-disk pixels (upper triangle).
    """
    images = np.asarray(images, dtype=np.float64)
    N, C, H, W = images.shape
    if H != W:
        raise ValueError(f"physical features need square frames, got {H} x {W}")
    x, y, r = disk_geometry(H)
    disk = r < 1
    parts = []
    if "Bz" in channels:
        parts.append(_magnetic(images[:, list(channels).index("Bz")], x, y, disk))
    edges = LIMB_ANNULI
    rings = [(r >= a) & (r < b) for a, b in pairwise(edges)]
    parts.append(np.stack([images[:, :, m].mean(-1) for m in rings], -1).reshape(N, -1))
    v = images[:, :, disk]  # (N, C, P)
    v = v - v.mean(-1, keepdims=True)
    v = v / np.maximum(np.sqrt((v**2).mean(-1, keepdims=True)), 1e-6)
    corr = np.einsum("ncp,ndp->ncd", v, v) / v.shape[-1]
    iu = np.triu_indices(C, 1)
    parts.append(corr[:, iu[0], iu[1]])
    return np.concatenate(parts, axis=1)


def _magnetic(bz: np.ndarray, x: np.ndarray, y: np.ndarray, disk: np.ndarray) -> np.ndarray:
    """bz (N, H, W) -> (N, 5): AR count, mean |lat| north and south, leading sign N and S."""
    lat = np.degrees(np.arcsin(np.clip(y, -1, 1)))
    out = np.zeros((len(bz), 5))
    eight = np.ones((3, 3), dtype=bool)
    join = max(1, round(AR_JOIN_RADII * disk_radius_px(bz.shape[-1]) / 2))
    for n, b in enumerate(bz):
        strong = disk & (np.abs(b) > AR_THRESHOLD)
        if not strong.any():
            continue
        grown = ndimage.binary_dilation(strong, eight, iterations=join)
        labels, k = ndimage.label(grown, structure=eight)
        labels[~strong] = 0  # regions joined through the dilation, of strong pixels only
        idx = np.arange(1, k + 1)
        flux = ndimage.sum(np.abs(b), labels, idx)
        size = ndimage.sum(np.ones_like(b), labels, idx)
        keep = (size >= AR_MIN_PIXELS) & (flux > 0)
        xc = ndimage.sum(np.abs(b) * x, labels, idx) / np.maximum(flux, 1e-12)
        yc = ndimage.sum(np.abs(b) * y, labels, idx) / np.maximum(flux, 1e-12)
        dx = x - np.concatenate([[0.0], xc])[labels]  # each pixel's offset from its region
        num = ndimage.sum(b * dx, labels, idx)
        den = ndimage.sum(np.abs(b * dx), labels, idx)
        alat = ndimage.sum(np.abs(b) * np.abs(lat), labels, idx)
        out[n, 0] = keep.sum()
        for h, side in enumerate((yc > 0, yc <= 0)):
            sel = keep & side
            if sel.any():
                out[n, 1 + h] = alat[sel].sum() / flux[sel].sum()
                out[n, 3 + h] = num[sel].sum() / max(den[sel].sum(), 1e-12)
    return out


class RandomConvNet(nn.Module):
    """A seeded, never-trained CNN: three 3x3 stride-2 convolutions (``RANDOM_CNN_WIDTHS``),
    leaky ReLU, He-normal weights drawn from ``seed`` alone; the features are each layer's
    spatial mean, concatenated (N, 112). Random convolutional features separate image
    distributions well without pretraining (Naeem et al. 2020)."""

    def __init__(self, in_chans: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        layers, c = [], in_chans
        for w in RANDOM_CNN_WIDTHS:
            conv = nn.Conv2d(c, w, 3, stride=2, padding=1)
            with torch.no_grad():
                conv.weight.normal_(0, math.sqrt(2 / (c * 9)), generator=g)
                conv.bias.zero_()
            layers.append(conv)
            c = w
        self.layers = nn.ModuleList(layers)
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        for conv in self.layers:
            x = nn.functional.leaky_relu(conv(x), 0.2)
            feats.append(x.mean((-2, -1)))
        return torch.cat(feats, dim=1)


def _batched(fn, images: np.ndarray, batch: int = 64) -> np.ndarray:
    return np.concatenate([fn(images[i : i + batch]) for i in range(0, len(images), batch)])


def random_cnn_features(images: np.ndarray) -> np.ndarray:
    """images (N, C, H, W) -> (N, 112) features of the :class:`RandomConvNet` of
    ``RANDOM_CNN_SEED``."""
    net = RandomConvNet(images.shape[1], RANDOM_CNN_SEED)
    return _batched(lambda b: net(torch.as_tensor(b, dtype=torch.float32)).numpy(), images)


def encoder_features(encoder: nn.Module, images: np.ndarray) -> np.ndarray:
    """images (N, C, H, W) -> (N, D): a pretrained encoder's patch tokens, mean-pooled (the
    encoder sees one time step)."""
    encoder = encoder.eval()

    def run(b: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            x = torch.as_tensor(b, dtype=torch.float32)[:, :, None]
            return encoder.forward_features(x)[:, 1:].mean(1).float().numpy()

    return _batched(run, images)


def value_histograms(images: np.ndarray) -> np.ndarray:
    """images (N, C, H, W) -> (N, C, VALUE_BINS) counts of on-disk pixel values."""
    N, C, H, _ = images.shape
    disk = disk_geometry(H)[2] < 1
    lo, hi = VALUE_RANGE
    v = images[:, :, disk]
    k = np.clip(((v - lo) / (hi - lo) * VALUE_BINS).astype(np.int64), 0, VALUE_BINS - 1)
    k += np.arange(N * C).reshape(N, C, 1) * VALUE_BINS
    return np.bincount(k.ravel(), minlength=N * C * VALUE_BINS).reshape(N, C, VALUE_BINS)


def radial_spectra(images: np.ndarray) -> np.ndarray:
    """images (N, C, H, W) -> (N, C, H // 2 + 1): the power |FFT|^2 of each channel (its mean
    removed), averaged over rings of integer spatial frequency k cycles per frame (k = 0 ..
    H // 2; k cycles per frame are k / H cycles per pixel)."""
    N, C, H, W = images.shape
    if H != W:
        raise ValueError(f"radial spectra need square frames, got {H} x {W}")
    x = np.asarray(images, dtype=np.float64)
    p = np.abs(np.fft.fft2(x - x.mean((-2, -1), keepdims=True))) ** 2
    f = np.fft.fftfreq(H) * H
    k = np.rint(np.hypot(*np.meshgrid(f, f, indexing="ij"))).astype(np.int64).ravel()
    keep = k <= H // 2
    counts = np.bincount(k[keep], minlength=H // 2 + 1)
    flat = p.reshape(N * C, -1)[:, keep]
    sums = np.stack([np.bincount(k[keep], weights=row, minlength=H // 2 + 1) for row in flat])
    return (sums / np.maximum(counts, 1)).reshape(N, C, H // 2 + 1)


@dataclass
class Summary:
    """What the scores read from N frames: ``features`` (space -> (N, d)), ``hist`` (N, C,
    VALUE_BINS) and ``spectrum`` (N, C, H // 2 + 1), row i from frame i."""

    features: dict[str, np.ndarray]
    hist: np.ndarray
    spectrum: np.ndarray
    channels: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.hist)

    def take(self, idx) -> Summary:
        """The frames ``idx`` (an index array)."""
        feats = {k: v[idx] for k, v in self.features.items()}
        return Summary(feats, self.hist[idx], self.spectrum[idx], self.channels)

    @staticmethod
    def concat(parts: Sequence[Summary]) -> Summary:
        spaces = parts[0].features
        return Summary(
            {k: np.concatenate([p.features[k] for p in parts]) for k in spaces},
            np.concatenate([p.hist for p in parts]),
            np.concatenate([p.spectrum for p in parts]),
            parts[0].channels,
        )


def summarise(
    images: np.ndarray, channels: Sequence[str], encoder: nn.Module | None = None
) -> Summary:
    """images (N, C, H, W) in model units -> their :class:`Summary` (the ``encoder`` space
    only when an encoder is given)."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1] != len(channels):
        raise ValueError(f"expected (N, {len(channels)}, H, W) frames, got {images.shape}")
    if not np.isfinite(images).all():
        raise ValueError("frames to score hold NaN or infinite values")
    N, C, H, _ = images.shape
    if N == 0:  # a worker with no frames of the split still joins the gather
        feats = {
            "random_cnn": np.zeros((0, sum(RANDOM_CNN_WIDTHS))),
            "physical": np.zeros((0, len(physical_names(channels)))),
        }
        if encoder is not None:
            raise ValueError("no frames to embed")
        hist = np.zeros((0, C, VALUE_BINS), np.int64)
        return Summary(feats, hist, np.zeros((0, C, H // 2 + 1)), list(channels))
    feats = {
        "random_cnn": random_cnn_features(images),
        "physical": physical_features(images, channels),
    }
    if encoder is not None:
        feats = {"encoder": encoder_features(encoder, images), **feats}
    return Summary(feats, value_histograms(images), radial_spectra(images), list(channels))
