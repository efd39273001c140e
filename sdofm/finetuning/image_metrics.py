"""Image quality of a reconstruction against the truth, per image: PSNR, SSIM (Wang et al.
2004, IEEE TIP 13, 600) and the pixel-to-pixel correlation (as Lim et al. 2021 report).

Images are ``(N, H, W)`` tensors in a channel's scaled units (log10 DN/s for AIA); the
``data_range`` is that channel's range (its clip values, scaled), so that the numbers do not
depend on the z-score. Computed in float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SSIM_K1, SSIM_K2 = 0.01, 0.03
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5


def psnr(x: Tensor, y: Tensor, data_range: float) -> Tensor:
    """x, y: (N, H, W) -> (N,) 10 log10(R^2 / MSE) in dB (inf where x == y)."""
    mse = ((x.double() - y.double()) ** 2).mean(dim=(-2, -1))
    return 10 * torch.log10(data_range**2 / mse)


def gaussian_window(size: int, sigma: float) -> Tensor:
    """(size,) float64 Gaussian weights summing to 1."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-(r**2) / (2 * sigma**2))
    return w / w.sum()


def _filter(x: Tensor, w: Tensor) -> Tensor:
    """(N, H, W) -> (N, H - k + 1, W - k + 1): separable 'valid' filtering with w: (k,)."""
    k = len(w)
    x = x[:, None]
    x = torch.nn.functional.conv2d(x, w.view(1, 1, k, 1))
    return torch.nn.functional.conv2d(x, w.view(1, 1, 1, k))[:, 0]


def ssim(
    x: Tensor, y: Tensor, data_range: float, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA
) -> Tensor:
    """x, y: (N, H, W) -> (N,) the mean structural similarity over every position of a
    Gaussian window (``window`` px, shrunk to the image when smaller; local statistics
    weighted by it, population covariances), constants (K1 R)^2 and (K2 R)^2."""
    x, y = x.double(), y.double()
    size = min(window, x.shape[-2], x.shape[-1])
    size -= 1 - size % 2  # odd
    w = gaussian_window(size, sigma).to(x.device)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mx, my = _filter(x, w), _filter(y, w)
    sxx = _filter(x * x, w) - mx * mx
    syy = _filter(y * y, w) - my * my
    sxy = _filter(x * y, w) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.mean(dim=(-2, -1))


def pixel_correlation(x: Tensor, y: Tensor) -> Tensor:
    """x, y: (N, H, W) -> (N,) Pearson correlation of the pixels (NaN for a constant image)."""
    x = x.double().flatten(1)
    y = y.double().flatten(1)
    x = x - x.mean(dim=1, keepdim=True)
    y = y - y.mean(dim=1, keepdim=True)
    den = torch.sqrt((x * x).sum(dim=1) * (y * y).sum(dim=1))
    return torch.where(den > 0, (x * y).sum(dim=1) / den, torch.full_like(den, math.nan))
