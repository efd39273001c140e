"""Missing channel: reconstruct held-out channels (``finetune.held_out``, 94 A by default, or
Bz) from the others (Lim et al. 2021, SDOFMv2's missing-data reconstruction).

The held-out channels are set to 0 in the model input (their train mean, in z-scored
units: no information), so the backbone keeps its channel count; a dense head predicts
their z-scored images. Scored per held-out channel on every frame, in the channel's scaled
units (log10 DN/s for AIA): PSNR and SSIM over the channel's clip range, and the
pixel-to-pixel correlation; figures of true, reconstructed and difference images.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from sdofm.config import Config, ConfigError
from sdofm.datasets.blocks import make_preprocessor
from sdofm.datasets.stats import scaled_ranges
from sdofm.engine.objective import EvalContext, Evaluation
from sdofm.finetuning.image_metrics import pixel_correlation, psnr, ssim
from sdofm.finetuning.tasks import Task
from sdofm.finetuning.tasks.objective import HeadObjective, prefixed
from sdofm.models.heads import BaselineReconstructor, EncoderReconstructor
from sdofm.tracking import pyplot

FIGURE_SAMPLES = 3


def held_out_channels(cfg: Config) -> list[int]:
    """Positions of ``finetune.held_out`` among the input channels."""
    held, channels = cfg.finetune.held_out, cfg.data.channels
    missing = [c for c in held if c not in channels]
    if missing:
        raise ConfigError(
            f"finetune.held_out {missing} not among the data channels {channels} "
            "(data.aia_channels, data.hmi_channels)"
        )
    if not held or len(held) == len(channels):
        raise ConfigError(
            f"finetune.held_out {held}: hold out at least one channel and keep at least one"
        )
    return [channels.index(c) for c in held]


def withhold(image: np.ndarray, held: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """image: (n, C, T, H, W) -> ((n, C, T, H, W) input with the held channels at 0,
    (n, K, T, H, W) their true values)."""
    x = np.array(image, dtype=np.float32)
    y = x[:, held].copy()
    x[:, held] = 0
    return x, y


def image_scores(pred: torch.Tensor, true: torch.Tensor, data_range: np.ndarray) -> np.ndarray:
    """pred, true: (n, K, T, H, W) in scaled units -> (n, K, 3): PSNR, SSIM and pixel
    correlation of each sample and channel, averaged over its frames."""
    n, K, T, H, W = true.shape
    out = np.zeros((n, K, 3))
    for k in range(K):
        p = pred[:, k].reshape(n * T, H, W)
        t = true[:, k].reshape(n * T, H, W)
        r = float(data_range[k])
        for j, f in enumerate((psnr(p, t, r), ssim(p, t, r), pixel_correlation(p, t))):
            out[:, k, j] = f.reshape(n, T).mean(dim=1).cpu().numpy()
    return out


COLUMNS = ("psnr", "ssim", "corr")
"""The image scores of :func:`image_scores`, in its order."""


def image_summary(scores: np.ndarray, mse: np.ndarray, names: list[str]) -> dict[str, float]:
    """scores: (n, K, 3) :func:`image_scores`, mse: (n, K) squared error of the z-scored
    images -> ``psnr_<c>``, ``ssim_<c>``, ``corr_<c>``, ``mse_<c>`` each channel's mean over
    the samples (NaN scores left out) and ``psnr``, ``ssim``, ``corr``, ``mse`` their mean
    over the channels. The engine's evaluation and the scoreboard both score with this."""
    K = len(names)
    out: dict[str, float] = {}
    for j, col in enumerate(COLUMNS):
        per = np.nanmean(scores[:, :, j], axis=0) if len(scores) else np.full(K, np.nan)
        out.update({f"{col}_{c}": float(v) for c, v in zip(names, per, strict=True)})
        out[col] = float(np.mean(per))
    per = mse.mean(axis=0) if len(mse) else np.full(K, np.nan)
    out.update({f"mse_{c}": float(v) for c, v in zip(names, per, strict=True)})
    out["mse"] = float(np.mean(per))
    return out


def reconstruction_figure(true: np.ndarray, pred: np.ndarray, names: list[str], title: str):
    """true, pred: (S, K, H, W) scaled units -> rows of samples and channels: true,
    reconstructed (one colour scale) and true - reconstructed (symmetric)."""
    plt = pyplot()

    S, K = true.shape[:2]
    fig, axes = plt.subplots(S * K, 3, figsize=(8, 2.6 * S * K), squeeze=False)
    for s in range(S):
        for k in range(K):
            row = axes[s * K + k]
            lo, hi = np.percentile(true[s, k], [1, 99.5])
            diff = true[s, k] - pred[s, k]
            d = max(float(np.abs(diff).max()), 1e-6)
            for ax, img, label, kw in (
                (row[0], true[s, k], "true", {"vmin": lo, "vmax": hi, "cmap": "inferno"}),
                (row[1], pred[s, k], "reconstructed", {"vmin": lo, "vmax": hi, "cmap": "inferno"}),
                (row[2], diff, "true - reconstructed", {"vmin": -d, "vmax": d, "cmap": "RdBu_r"}),
            ):
                im = ax.imshow(img, origin="lower", **kw)
                ax.set_title(f"sample {s} {names[k]}: {label}", fontsize=8)
                ax.axis("off")
                fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


class MissingChannelObjective(HeadObjective):
    """Mean squared error of the held-out channels' z-scored images; scored per channel by
    PSNR, SSIM and pixel correlation in scaled units."""

    headline = ("val/psnr", "val/ssim", "val/corr")
    score_keys = ("scores", "mse")

    def __init__(self, task: Task, cfg: Config, prepared):

        super().__init__(task, cfg, prepared)
        self.held = held_out_channels(cfg)
        self.names = [cfg.data.channels[i] for i in self.held]
        size = self.sample_shape[2]
        pre = make_preprocessor(cfg.data.channels, cfg.transform, size, prepared.stats)
        K = len(self.held)
        self.mean = np.array([pre.mean[i] for i in self.held]) if pre.mean else np.zeros(K)
        self.std = np.array([pre.std[i] for i in self.held]) if pre.std else np.ones(K)
        ranges = scaled_ranges(pre)[self.held]
        self.data_range = ranges[:, 1] - ranges[:, 0]

    def scaled(self, z: torch.Tensor) -> torch.Tensor:
        """(n, K, T, H, W) z-scored -> scaled units."""
        shape = (1, -1, 1, 1, 1)
        std = torch.as_tensor(self.std, dtype=torch.float64, device=z.device).view(shape)
        mean = torch.as_tensor(self.mean, dtype=torch.float64, device=z.device).view(shape)
        return z.double() * std + mean

    def loss(self, model, batch, info, optimizer, device) -> torch.Tensor:
        x, y = withhold(batch["image"], self.held)
        pred = model(torch.from_numpy(x).to(device))
        return nn.functional.mse_loss(pred.float(), torch.from_numpy(y).to(device))

    def score_batch(self, model, batch, split, device) -> dict[str, np.ndarray]:
        """-> ``scores`` (n, K, 3) :func:`image_scores` in scaled units and ``mse`` (n, K) the
        squared error of the z-scored images, per sample and held-out channel."""
        x, y = withhold(batch["image"], self.held)
        z = model(torch.from_numpy(x).to(device)).float()
        true = torch.from_numpy(y).to(device)
        mse = ((z - true) ** 2).mean(dim=(2, 3, 4)).double().cpu().numpy()
        scores = image_scores(self.scaled(z), self.scaled(true), self.data_range)
        return {"scores": scores, "mse": mse}

    def empty(self) -> dict[str, np.ndarray]:
        K = len(self.held)
        return {"scores": np.zeros((0, K, 3)), "mse": np.zeros((0, K))}

    def metrics(self, out: dict[str, np.ndarray]) -> dict[str, float]:
        return self.task.metrics(self.cfg, out)

    @torch.no_grad()
    def evaluate(self, model, shard, split: str, ctx: EvalContext) -> Evaluation:
        """The shared evaluation, and at the end the reconstructions of this worker's first
        samples (drawn on rank 0)."""
        want = ctx.figures * FIGURE_SAMPLES if ctx.final else 0
        shown: list[np.ndarray] = []

        def keep(batches):
            for batch in batches:
                if (n := want - sum(map(len, shown))) > 0:
                    shown.append(batch["image"][:n])
                yield batch

        model.eval()
        batches = shard.iter_batches(batch_size=ctx.batch_size, batch_format="numpy")
        out = self.predict(model, keep(batches), split, ctx.device)
        figures = []
        if shown:
            x, y = withhold(np.concatenate(shown), self.held)
            z = model(torch.from_numpy(x).to(ctx.device)).float()
            true = self.scaled(torch.from_numpy(y).to(ctx.device))[:, :, -1].cpu().numpy()
            pred = self.scaled(z)[:, :, -1].cpu().numpy()
            title = f"{split}: held-out {', '.join(self.names)} ({self.cfg.finetune.head})"
            fig = reconstruction_figure(true, pred, self.names, title)
            figures.append((f"reconstruction_{split}.png", fig))
        model.train()
        return Evaluation(prefixed(self.metrics(out), split), figures)


class MissingChannelTask(Task):
    name = "missing-channel"
    summary = "reconstruct held-out channels (finetune.held_out) from the others"
    columns = COLUMNS
    extra = ("mse",)
    sweep_metrics = ("val/mse",)

    def check(self, cfg: Config) -> None:
        held_out_channels(cfg)
        if cfg.finetune.head in ("pool", "linear"):
            raise ConfigError(
                f"missing-channel reconstructs images: finetune.head {cfg.finetune.head} gives "
                "one vector per image; use conv (a dense head on the patch grid) or baseline_cnn"
            )

    def targets(self, cfg: Config) -> list[str]:
        return list(cfg.finetune.held_out)

    def build_head(self, cfg, sample_shape, backbone) -> nn.Module:
        """A dense head on the encoder, or the from-scratch U-Net baseline."""
        self.check(cfg)  # a sweep's trial may set the head
        fc = cfg.finetune
        K = len(held_out_channels(cfg))
        if fc.head == "baseline_cnn":
            C, T, _, _ = sample_shape
            return BaselineReconstructor(C, T, K, width=max(8, fc.hidden // 4))
        if backbone is None:
            raise ConfigError(f"finetune.head {fc.head!r} needs a backbone")
        return EncoderReconstructor(
            backbone.encoder(), K, sample_shape, fc.hidden, fc.freeze, fc.unfreeze_blocks
        )

    def board(self, cfg: Config) -> tuple[tuple[str, bool], ...]:
        return tuple((col, True) for col in COLUMNS)

    def metrics(self, cfg: Config, scores: dict[str, np.ndarray]) -> dict[str, float]:
        """``scores``: (n, K, 3) and ``mse``: (n, K) -> :func:`image_summary` per held-out
        channel."""
        return image_summary(scores["scores"], scores["mse"], self.targets(cfg))

    def objective(self, cfg: Config, prepared) -> MissingChannelObjective:
        return MissingChannelObjective(self, cfg, prepared)
