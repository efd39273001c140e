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

import numpy as np
import torch
from torch import nn

from sdofm.config import Config, ConfigError, TransformConfig
from sdofm.datasets.blocks import make_preprocessor, physical_transform
from sdofm.datasets.transforms import dim, sample_dimming_factors
from sdofm.engine.objective import EvalContext, Evaluation, all_gather
from sdofm.finetuning.tasks import Task
from sdofm.finetuning.tasks.objective import HeadObjective
from sdofm.models.heads import BaselineCNN, EncoderRegressor

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


def alpha_metrics(pred: np.ndarray, true: np.ndarray, names: list[str], tol: float, prefix: str):
    """pred, true: (n, K) -> {prefix/mae, prefix/success, prefix/mae_<c>, prefix/success_<c>}."""
    err = np.abs(pred - true)
    out = {f"{prefix}/mae": float(err.mean()), f"{prefix}/success": float((err < tol).mean())}
    for k, c in enumerate(names):
        out[f"{prefix}/mae_{c}"] = float(err[:, k].mean())
        out[f"{prefix}/success_{c}"] = float((err[:, k] < tol).mean())
    return out


def scatter_figure(pred: np.ndarray, true: np.ndarray, names: list[str], title: str):
    """Predicted vs true alpha, one panel per channel, with the identity line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    predictions within ``finetune.success_tolerance``, per channel."""

    headline = ("val/mae", "val/success")

    def __init__(self, task: Task, cfg: Config, prepared):
        super().__init__(task, cfg, prepared)
        self.dimming = Dimming(cfg, prepared.stats, self.sample_shape[2])
        self.names = [cfg.data.channels[i] for i in self.dimming.channels]

    def loss(self, model, batch, info, optimizer, device) -> torch.Tensor:
        x, alpha = self.dimming(batch["image"], batch["sample"], "train", info.epoch)
        pred = model(torch.from_numpy(x).to(device))
        return nn.functional.mse_loss(pred.float(), torch.from_numpy(alpha).to(device))

    @torch.no_grad()
    def evaluate(self, model, shard, split: str, ctx: EvalContext) -> Evaluation:
        preds, trues = [], []
        model.eval()
        for batch in shard.iter_batches(batch_size=ctx.batch_size, batch_format="numpy"):
            x, alpha = self.dimming(batch["image"], batch["sample"], split, 0)
            preds.append(model(torch.from_numpy(x).to(ctx.device)).float().cpu().numpy())
            trues.append(alpha)
        model.train()
        empty = np.zeros((0, len(self.names)), np.float32)
        pred, true = all_gather(
            (np.concatenate(preds) if preds else empty, np.concatenate(trues) if trues else empty)
        )
        fc = self.cfg.finetune
        metrics = alpha_metrics(pred, true, self.names, fc.success_tolerance, split)
        figures = []
        if ctx.final and ctx.figures:
            title = f"{split}: predicted vs true alpha ({fc.head})"
            figures.append((f"scatter_{split}.png", scatter_figure(pred, true, self.names, title)))
        return Evaluation(metrics, figures)


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

    # Dos Santos et al. (2021) report the share of predictions within 0.05 and 0.1 of alpha.
    board = (("mae", False), ("success_0.05", True), ("success_0.1", True))

    @torch.no_grad()
    def test_scores(self, cfg: Config, prepared, model: nn.Module) -> dict[str, np.ndarray]:
        """``abs_err``: (n, K) |predicted - true alpha| of every test sample and AIA channel."""
        dimming = Dimming(cfg, prepared.stats, prepared.sample_shape[2])
        model.eval()
        errs, ids = [], []
        for batch in prepared.datasets["test"].iter_batches(batch_size=64, batch_format="numpy"):
            x, alpha = dimming(batch["image"], batch["sample"], "test", 0)
            errs.append(np.abs(model(torch.from_numpy(x)).float().numpy() - alpha))
            ids.append(batch["sample"])
        order = np.argsort(np.concatenate(ids))
        return {"abs_err": np.concatenate(errs)[order]}

    def summarise(self, cfg: Config, scores: dict[str, np.ndarray]) -> dict[str, float]:
        err = scores["abs_err"]
        return {
            "mae": float(err.mean()),
            "success_0.05": float((err < 0.05).mean()),
            "success_0.1": float((err < 0.1).mean()),
        }
