"""Figures a run logs: reconstructions and samples of images. Plain matplotlib (imported
when a figure is drawn), no MLflow: objectives import this at no cost."""

from __future__ import annotations

import numpy as np


def pyplot():
    """matplotlib's pyplot on the Agg backend (workers have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def panel_grid(rows: list[list[tuple]], names: list[str], channels: list[str], title: str = ""):
    """rows: per channel, its panels ``(image, cmap, vmin, vmax)`` -> a figure with one row
    per channel and one titled column per panel."""
    plt = pyplot()
    C, n = len(rows), len(names)
    fig, axes = plt.subplots(C, n, figsize=(2 * n, 2 * C + 0.6), squeeze=False)
    for c, panels in enumerate(rows):
        for ax, (data, cmap, vmin, vmax) in zip(axes[c], panels, strict=True):
            ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[c, 0].set_ylabel(channels[c], fontsize=9)
    for ax, name in zip(axes[0], names, strict=True):
        ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))  # room for the title
    return fig


def reconstruction_figure(
    image: np.ndarray,
    masked: np.ndarray | None,
    recon: np.ndarray,
    channels: list[str],
    title: str = "",
):
    """image, masked, recon: (C, H, W) -> a figure with one row per channel: input, masked
    input (left out when ``masked`` is None: a VAE sees all of it), reconstruction, |error|;
    each row on the input's colour scale.
    """
    names = ["input", *(["masked"] if masked is not None else []), "reconstruction", "|error|"]
    rows = []
    for c in range(image.shape[0]):
        lo, hi = np.percentile(image[c], [1, 99])
        err = np.abs(recon[c] - image[c])
        rows.append(
            [
                (image[c], "gray", lo, hi),
                *([(masked[c], "gray", lo, hi)] if masked is not None else []),
                (recon[c], "gray", lo, hi),
                (err, "magma", 0, max(float(np.percentile(err, 99)), 1e-6)),
            ]
        )
    return panel_grid(rows, names, channels, title)


def forecast_figure(
    last: np.ndarray,
    pred: np.ndarray,
    true: np.ndarray,
    channels: list[str],
    lead: str,
    title: str = "",
):
    """last, pred, true: (C, H, W) the last input frame, the forecast ``lead`` ahead and the
    observed frame -> a figure with one row per channel: last input, forecast, observed
    (on the observed frame's colour scale), forecast - observed and observed - last input
    (the change persistence misses) on one symmetric scale."""
    names = ["last input", f"forecast +{lead}", f"observed +{lead}"]
    names += ["forecast - observed", "observed - last input"]
    rows = []
    for c in range(true.shape[0]):
        lo, hi = np.percentile(true[c], [1, 99])
        err, change = pred[c] - true[c], true[c] - last[c]
        span = max(float(np.percentile(np.abs(change), 99)), 1e-6)
        rows.append(
            [
                (last[c], "gray", lo, hi),
                (pred[c], "gray", lo, hi),
                (true[c], "gray", lo, hi),
                (err, "RdBu_r", -span, span),
                (change, "RdBu_r", -span, span),
            ]
        )
    return panel_grid(rows, names, channels, title)


def samples_figure(samples: np.ndarray, channels: list[str], title: str = ""):
    """samples: (n, C, H, W) -> a figure with one row per channel and one column per sample,
    each row on one colour scale (draws from a generative model's prior)."""
    plt = pyplot()
    n, C = samples.shape[:2]
    fig, axes = plt.subplots(C, n, figsize=(1.6 * n, 1.6 * C + 0.6), squeeze=False)
    for c in range(C):
        lo, hi = np.percentile(samples[:, c], [1, 99])
        for i in range(n):
            axes[c, i].imshow(samples[i, c], cmap="gray", vmin=lo, vmax=hi, origin="lower")
            axes[c, i].set_xticks([])
            axes[c, i].set_yticks([])
        axes[c, 0].set_ylabel(channels[c], fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))
    return fig
