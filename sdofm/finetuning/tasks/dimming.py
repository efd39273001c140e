"""AIA autocalibration ("dimming", Dos Santos et al. 2021, A&A 648, A53).

Each AIA channel c of a sample is dimmed by a factor alpha_c drawn from [alpha_min, 1]
in physical units (DN/s), before scaling and z-scoring; a head on the pretrained encoder
predicts alpha for every AIA channel. The channels are physically related, so the
factors are learnable from the image although one channel alone is ambiguous.

The Ray Data pipeline delivers images in physical units (resized, limb handled); the
objective dims them with factors that are a pure function of (seed, split, epoch, sample)
and applies the scaling and z-score of the pretraining transform.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from sdofm.config import Config, ConfigError, TransformConfig
from sdofm.datasets.blocks import make_preprocessor, physical_transform
from sdofm.datasets.transforms import dim, sample_dimming_factors
from sdofm.finetuning.tasks import Task
from sdofm.finetuning.tasks.objective import HeadObjective, prefixed
from sdofm.models.heads import BaselineCNN, EncoderRegressor
from sdofm.tracking import pyplot

SPLIT_CODE = {"train": 0, "val": 1, "test": 2}


def dimmed_channels(cfg: Config) -> list[int]:
    """Positions of the AIA channels (the ones dimmed and predicted) among the inputs."""
    idx = [i for i, c in enumerate(cfg.data.channels) if c in cfg.data.aia_channels]
    if not idx:
        raise ConfigError("dimming needs AIA channels: data.aia_channels is empty")
    return idx


class Dimming:
    """Physical images -> (dimmed, scaled, z-scored images, alpha).

    ``alphas`` are drawn from [alpha_min, 1] by a generator seeded with (seed, split, epoch,
    sample id): reproducible, fresh per epoch on train, fixed on val and test.
    """

    def __init__(self, cfg: Config, stats: dict | None, size: int):
        self.channels = dimmed_channels(cfg)
        self.n_channels = len(cfg.data.channels)
        self.alpha_min = cfg.finetune.alpha_min
        self.seed = cfg.finetune.dim_seed
        # no resize: images come at ``size``
        self.pre = make_preprocessor(cfg.data.channels, cfg.transform, size, stats)

    def alphas(self, sample_ids: np.ndarray, split: str, epoch: int) -> np.ndarray:
        """sample_ids: (n,) -> (n, K) float32 in [alpha_min, 1]."""
        code, k = SPLIT_CODE[split], len(self.channels)
        rngs = (np.random.default_rng([self.seed, code, epoch, int(s)]) for s in sample_ids)
        return np.stack([sample_dimming_factors(r, k, self.alpha_min) for r in rngs])

    def __call__(
        self, images: np.ndarray, sample_ids: np.ndarray, split: str, epoch: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """images: (n, C, T, H, W) physical -> ((n, C, T, H, W) model inputs, (n, K) alpha)."""
        alpha = self.alphas(sample_ids, split, epoch)
        factors = np.ones((len(images), self.n_channels), np.float32)
        factors[:, self.channels] = alpha  # HMI is never dimmed
        x = np.stack([self.pre.apply_(dim(img, f)) for img, f in zip(images, factors, strict=True)])
        return x, alpha


def success_name(tolerance: float) -> str:
    """The metric of the share within ``tolerance``: ``success_0.05``."""
    return f"success_{tolerance:g}"


def alpha_errors(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """pred, true: (n, K) alpha -> (n, K) absolute errors, the per-sample scores."""
    return np.abs(pred - true)


def alpha_summary(
    err: np.ndarray, names: list[str], tolerances: float | Sequence[float]
) -> dict[str, float]:
    """err: (n, K) absolute errors of alpha -> ``mae`` and ``success`` (the share within the
    first tolerance), ``success_<t>`` for every tolerance t, and ``mae_<c>``, ``success_<c>``
    per channel. The engine's evaluation and the scoreboard both score with this."""
    tols = [float(t) for t in np.atleast_1d(tolerances)]
    out = {"mae": float(err.mean()), "success": float((err < tols[0]).mean())}
    out.update({success_name(t): float((err < t).mean()) for t in tols})
    for k, c in enumerate(names):
        out[f"mae_{c}"] = float(err[:, k].mean())
        out[f"success_{c}"] = float((err[:, k] < tols[0]).mean())
    return out


def alpha_metrics(
    pred: np.ndarray,
    true: np.ndarray,
    names: list[str],
    tolerances: float | Sequence[float],
    prefix: str,
) -> dict[str, float]:
    """pred, true: (n, K) -> :func:`alpha_summary` of their errors, as ``{prefix}/name``."""
    return prefixed(alpha_summary(alpha_errors(pred, true), names, tolerances), prefix)


def scatter_figure(pred: np.ndarray, true: np.ndarray, names: list[str], title: str):
    """Predicted vs true alpha, one panel per channel, with the identity line."""
    plt = pyplot()

    K = len(names)
    cols = min(K, 3)
    rows = -(-K // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= K:
            ax.axis("off")
            continue
        mae = np.abs(pred[:, k] - true[:, k]).mean()
        ax.scatter(true[:, k], pred[:, k], s=6, alpha=0.6)
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{names[k]}  MAE {mae:.3f}", fontsize=9)
        ax.set_xlabel("true alpha", fontsize=8)
        ax.set_ylabel("predicted alpha", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


class DimmingObjective(HeadObjective):
    """Mean squared error of alpha; scored by its mean absolute error and the share of
    predictions within ``finetune.success_tolerance``, per channel (:func:`alpha_summary`)."""

    headline = ("val/mae", "val/success")
    score_keys = ("abs_err",)

    def __init__(self, task: Task, cfg: Config, prepared):
        super().__init__(task, cfg, prepared)
        self.dimming = Dimming(cfg, prepared.stats, self.sample_shape[2])
        self.names = [cfg.data.channels[i] for i in self.dimming.channels]

    def loss(self, model, batch, info, optimizer, device) -> torch.Tensor:
        x, alpha = self.dimming(batch["image"], batch["sample"], "train", info.epoch)
        pred = model(torch.from_numpy(x).to(device))
        return nn.functional.mse_loss(pred.float(), torch.from_numpy(alpha).to(device))

    def score_batch(self, model, batch, split, device) -> dict[str, np.ndarray]:
        """-> ``abs_err``, ``pred`` and ``true`` alpha: (n, K) each."""
        x, alpha = self.dimming(batch["image"], batch["sample"], split, 0)
        pred = model(torch.from_numpy(x).to(device)).float().cpu().numpy()
        return {"abs_err": alpha_errors(pred, alpha), "pred": pred, "true": alpha}

    def empty(self) -> dict[str, np.ndarray]:
        return dict.fromkeys(
            ("abs_err", "pred", "true"), np.zeros((0, len(self.names)), np.float32)
        )

    def metrics(self, out: dict[str, np.ndarray]) -> dict[str, float]:
        return self.task.metrics(self.cfg, out)

    def figures(self, out, split):
        title = f"{split}: predicted vs true alpha ({self.cfg.finetune.head})"
        return [
            (f"scatter_{split}.png", scatter_figure(out["pred"], out["true"], self.names, title))
        ]


class DimmingTask(Task):
    name = "dimming"
    summary = "AIA autocalibration: predict each AIA channel's dimming factor alpha"
    columns = ("mae", "success")
    sweep_metrics = ("val/mae",)

    def check(self, cfg: Config) -> None:
        dimmed_channels(cfg)

    def transform(self, cfg: Config) -> TransformConfig:
        return physical_transform(cfg.transform, cfg.data.channels)

    def targets(self, cfg: Config) -> list[str]:
        return [cfg.data.channels[i] for i in dimmed_channels(cfg)]

    def build_head(self, cfg, sample_shape, backbone) -> nn.Module:
        """The configured head on the backbone's encoder, or the from-scratch baseline CNN."""
        fc = cfg.finetune
        K = len(dimmed_channels(cfg))
        if fc.head == "baseline_cnn":
            C, T, _, _ = sample_shape
            return BaselineCNN(C, T, K, width=max(8, fc.hidden // 4))
        if backbone is None:
            raise ConfigError(f"finetune.head {fc.head!r} needs a backbone")
        return EncoderRegressor(
            backbone.encoder(), K, fc.head, fc.hidden, fc.freeze, fc.unfreeze_blocks
        )

    def objective(self, cfg: Config, prepared) -> DimmingObjective:
        return DimmingObjective(self, cfg, prepared)

    def board(self, cfg: Config) -> tuple[tuple[str, bool], ...]:
        # Dos Santos et al. (2021) report the share of predictions within 0.05 and 0.1 of
        # alpha: the default tolerances.
        return (("mae", False), *((success_name(t), True) for t in cfg.finetune.success_tolerance))

    def metrics(self, cfg: Config, scores: dict[str, np.ndarray]) -> dict[str, float]:
        """``scores["abs_err"]``: (n, K) -> :func:`alpha_summary` at the config's tolerances."""
        return alpha_summary(scores["abs_err"], self.targets(cfg), cfg.finetune.success_tolerance)
