"""Virtual EVE (Szenicer et al. 2019, Sci. Adv. 5, eaaw6548): the EVE MEGS-A line
irradiances at a sample's time, predicted from its AIA (+HMI) images.

The head regresses each line's log10 irradiance, standardised with the train split's mean
and spread of that line, so that faint and bright lines weigh alike. EVE marks missing
values with -1 (and a damaged store may hold NaN): those entries are masked out of the
loss and the metrics, never filled. The score is the relative absolute error
|pred - true| / true in W m^-2, per line, with its median and worst line over the lines
(as Szenicer et al. report), beside a climatology: every line at its train-split mean.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from sdofm.config import Config, ConfigError
from sdofm.constants import EVE_LINE_TABLE
from sdofm.engine.objective import EvalContext, Evaluation, all_gather
from sdofm.finetuning.tasks import Task
from sdofm.finetuning.tasks.objective import HeadObjective
from sdofm.models.heads import BaselineCNN, EncoderRegressor

WAVELENGTH_NM = {name: wl for name, wl, _ in EVE_LINE_TABLE}


def log_irradiance(eve: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """eve: (n, L) W m^-2 as stored -> ((n, L) log10 irradiance, 0 where missing; (n, L)
    valid). Missing: negative (EVE's -1), zero or not finite."""
    eve = np.asarray(eve, np.float64)
    valid = np.isfinite(eve) & (eve > 0)
    return np.log10(np.where(valid, eve, 1.0)), valid


def line_statistics(eve: np.ndarray, lines: list[str], where: str) -> tuple[np.ndarray, np.ndarray]:
    """eve: (n, L) as stored -> per line (mean, std) of log10 irradiance over its valid
    entries; a line with none is refused, naming it and ``where`` the values came from."""
    logs, valid = log_irradiance(eve)
    count = valid.sum(axis=0)
    empty = [ln for ln, c in zip(lines, count, strict=True) if c == 0]
    if empty:
        raise ConfigError(
            f"EVE line(s) {', '.join(empty)} have no valid value in {where}: "
            "drop them from data.eve_lines"
        )
    mean = (logs * valid).sum(axis=0) / count
    var = (((logs - mean) ** 2) * valid).sum(axis=0) / count
    return mean, np.maximum(np.sqrt(var), 1e-6)


def relative_errors(pred_log: np.ndarray, eve: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pred_log: (n, L) predicted log10 irradiance, eve: (n, L) as stored -> ((n, L)
    |10^pred - true| / true, NaN where missing; (L,) valid entries per line)."""
    true_log, valid = log_irradiance(eve)
    rel = np.abs(10.0 ** (np.asarray(pred_log, np.float64) - true_log) - 1.0)
    return np.where(valid, rel, np.nan), valid.sum(axis=0)


def _line_means(rel: np.ndarray, count: np.ndarray) -> np.ndarray:
    """(n, L) with NaN where missing -> (L,) means over the valid entries (NaN for none)."""
    out = np.full(rel.shape[1], np.nan)
    return np.divide(np.nansum(rel, axis=0), count, out=out, where=count > 0)


def eve_metrics(
    pred_log: np.ndarray,
    eve: np.ndarray,
    lines: list[str],
    climatology_log: np.ndarray,
    prefix: str,
) -> dict[str, float]:
    """Relative absolute error of predicted log10 irradiances ``pred_log`` (n, L) against
    the stored ``eve`` (n, L), gaps masked:

    ``{prefix}/rel_error_<line>`` the mean over the line's valid samples, ``{prefix}/rel_error``
    the mean of those over the lines, ``..._median`` and ``..._worst`` their median and
    maximum; ``{prefix}/climatology_rel_error[_median]`` the same for every line at its
    train mean ``climatology_log`` (L,); ``{prefix}/masked`` the entries left out.
    """
    out: dict[str, float] = {}
    rel, count = relative_errors(pred_log, eve)
    clim, _ = relative_errors(np.broadcast_to(climatology_log, np.shape(eve)), eve)
    per_line, clim_line = _line_means(rel, count), _line_means(clim, count)
    for ln, v in zip(lines, per_line, strict=True):
        out[f"{prefix}/rel_error_{ln}"] = float(v)
    scored = per_line[count > 0]
    if len(scored):
        out[f"{prefix}/rel_error"] = float(scored.mean())
        out[f"{prefix}/rel_error_median"] = float(np.median(scored))
        out[f"{prefix}/rel_error_worst"] = float(scored.max())
        out[f"{prefix}/climatology_rel_error"] = float(clim_line[count > 0].mean())
        out[f"{prefix}/climatology_rel_error_median"] = float(np.median(clim_line[count > 0]))
    out[f"{prefix}/masked"] = float(np.size(eve) - count.sum())
    return out


def spectra_figure(
    pred_log: np.ndarray, eve: np.ndarray, lines: list[str], times: np.ndarray, title: str
):
    """Predicted and true spectra of the quietest, the median and the brightest sample (by
    total irradiance), lines by wavelength, and each line's median relative error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort([WAVELENGTH_NM.get(ln, i) for i, ln in enumerate(lines)])
    wl = np.array([WAVELENGTH_NM.get(ln, np.nan) for ln in lines])[order]
    true_log, valid = log_irradiance(eve)
    total = np.where(valid, 10.0**true_log, 0).sum(axis=1)
    ranked = np.argsort(total)
    picks = [
        ("quietest", ranked[0]),
        ("median", ranked[len(ranked) // 2]),
        ("brightest", ranked[-1]),
    ]
    rel, _ = relative_errors(pred_log, eve)
    fig, axes = plt.subplots(4, 1, figsize=(9, 11), sharex=True)
    for ax, (label, i) in zip(axes, picks, strict=False):
        ok = valid[i][order]
        when = np.datetime64(int(times[i]), "ns").astype("datetime64[s]")
        ax.semilogy(wl[ok], 10.0 ** true_log[i][order][ok], "ko", ms=4, label="EVE (true)")
        ax.semilogy(wl, 10.0 ** pred_log[i][order], "rx", ms=5, label="predicted")
        ax.set_title(f"{label} sample, {when}", fontsize=9)
        ax.set_ylabel("W m$^{-2}$", fontsize=8)
        ax.legend(fontsize=7)
    med = np.array([np.median(c[np.isfinite(c)]) if np.isfinite(c).any() else 0 for c in rel.T])
    med = med[order]
    axes[-1].bar(wl, 100 * med, width=0.8)
    axes[-1].set_ylabel("median |rel. error| %", fontsize=8)
    axes[-1].set_xlabel("wavelength (nm)", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


class EVEObjective(HeadObjective):
    """Masked mean squared error of the standardised log10 irradiance; scored by the
    relative error per line (:func:`eve_metrics`)."""

    headline = ("val/rel_error", "val/rel_error_worst")

    def __init__(self, task: Task, cfg: Config, prepared, mean: np.ndarray, std: np.ndarray):
        super().__init__(task, cfg, prepared)
        self.lines = list(cfg.data.eve_lines)
        self.mean, self.std = mean.astype(np.float32), std.astype(np.float32)

    def targets(self, batch: dict) -> tuple[np.ndarray, np.ndarray]:
        """-> ((n, L) standardised log10 irradiance at each sample's last frame, (n, L) valid)."""
        logs, valid = log_irradiance(batch["eve"][:, :, -1])
        z = np.where(valid, (logs - self.mean) / self.std, 0.0)
        return z.astype(np.float32), valid

    def loss(self, model, batch, info, optimizer, device) -> torch.Tensor:
        z, valid = self.targets(batch)
        pred = model(torch.as_tensor(batch["image"], device=device).float()).float()
        w = torch.from_numpy(valid.astype(np.float32)).to(device)
        return (((pred - torch.from_numpy(z).to(device)) ** 2) * w).sum() / w.sum().clamp_min(1)

    @torch.no_grad()
    def evaluate(self, model, shard, split: str, ctx: EvalContext) -> Evaluation:
        preds, eves, times = [], [], []
        model.eval()
        for batch in shard.iter_batches(batch_size=ctx.batch_size, batch_format="numpy"):
            z = model(torch.as_tensor(batch["image"], device=ctx.device).float()).float()
            preds.append(z.cpu().numpy() * self.std + self.mean)
            eves.append(batch["eve"][:, :, -1])
            times.append(batch["time"][:, -1])
        model.train()
        L = len(self.lines)
        pred, eve, t = all_gather(
            (
                np.concatenate(preds) if preds else np.zeros((0, L), np.float32),
                np.concatenate(eves) if eves else np.zeros((0, L), np.float32),
                np.concatenate(times) if times else np.zeros(0, np.int64),
            )
        )
        metrics = eve_metrics(pred, eve, self.lines, self.mean, split)
        z, valid = self.targets({"eve": eve[:, :, None]})
        zp = (pred - self.mean) / self.std
        metrics[f"{split}/loss"] = float((((zp - z) ** 2) * valid).sum() / max(valid.sum(), 1))
        figures = []
        if ctx.final and ctx.figures and len(pred):
            title = f"{split}: predicted vs true EVE spectra ({self.cfg.finetune.head})"
            figures.append(
                (f"spectra_{split}.png", spectra_figure(pred, eve, self.lines, t, title))
            )
        return Evaluation(metrics, figures)


class EVETask(Task):
    name = "eve"
    summary = "virtual EVE: the MEGS-A line irradiances from the images"
    columns = ("rel_error",)
    extra = ("rel_error_median", "rel_error_worst", "climatology_rel_error", "masked")
    sweep_metrics = ("val/rel_error", "val/rel_error_median", "val/rel_error_worst", "val/loss")

    def check(self, cfg: Config) -> None:
        if not cfg.data.eve_lines:
            raise ConfigError(
                "eve needs EVE lines: set data.eve_lines (`default` = the 38 SDO-FM lines)"
            )

    def targets(self, cfg: Config) -> list[str]:
        return list(cfg.data.eve_lines)

    def build_head(self, cfg, sample_shape, backbone) -> nn.Module:
        """The configured head (unbounded outputs) on the encoder, or the baseline CNN."""
        fc, L = cfg.finetune, len(cfg.data.eve_lines)
        if fc.head == "baseline_cnn":
            C, T, _, _ = sample_shape
            return BaselineCNN(C, T, L, width=max(8, fc.hidden // 4), squash=False)
        if backbone is None:
            raise ConfigError(f"finetune.head {fc.head!r} needs a backbone")
        return EncoderRegressor(
            backbone.encoder(), L, fc.head, fc.hidden, fc.freeze, fc.unfreeze_blocks, squash=False
        )

    # Szenicer et al. (2019) report the median and worst line's relative error.
    board = (("rel_error", False), ("rel_error_median", False), ("rel_error_worst", False))

    @torch.no_grad()
    def test_scores(self, cfg: Config, prepared, model: nn.Module) -> dict[str, np.ndarray]:
        """``rel``: (n, L) relative error of every test sample and line, NaN where missing."""
        obj = self.objective(cfg, prepared)
        model.eval()
        preds, eves, ids = [], [], []
        for batch in prepared.datasets["test"].iter_batches(batch_size=64, batch_format="numpy"):
            z = model(torch.as_tensor(batch["image"]).float()).float().numpy()
            preds.append(z * obj.std + obj.mean)
            eves.append(batch["eve"][:, :, -1])
            ids.append(batch["sample"])
        order = np.argsort(np.concatenate(ids))
        rel, _ = relative_errors(np.concatenate(preds)[order], np.concatenate(eves)[order])
        return {"rel": rel}

    def summarise(self, cfg: Config, scores: dict[str, np.ndarray]) -> dict[str, float]:
        rel = scores["rel"]
        per_line = _line_means(rel, np.isfinite(rel).sum(axis=0))
        per_line = per_line[np.isfinite(per_line)]
        return {
            "rel_error": float(per_line.mean()),
            "rel_error_median": float(np.median(per_line)),
            "rel_error_worst": float(per_line.max()),
        }

    def objective(self, cfg: Config, prepared) -> EVEObjective:
        """The objective, with each line's log statistics over the train split."""
        train = prepared.datasets["train"].select_columns(["eve"])
        eve = np.concatenate(
            [b["eve"][:, :, -1] for b in train.iter_batches(batch_size=1024, batch_format="numpy")]
        )
        mean, std = line_statistics(
            eve, list(cfg.data.eve_lines), f"the train split of {cfg.data.root}"
        )
        return EVEObjective(self, cfg, prepared, mean, std)
