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
from sdofm.finetuning.tasks import Task
from sdofm.finetuning.tasks.objective import HeadObjective, prefixed
from sdofm.models.heads import BaselineCNN, EncoderRegressor
from sdofm.tracking import pyplot

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
    |10^pred - true| / true, NaN exactly where missing; (L,) valid entries per line), the
    per-sample scores."""
    true_log, valid = log_irradiance(eve)
    rel = np.abs(10.0 ** (np.asarray(pred_log, np.float64) - true_log) - 1.0)
    # NaN marks a gap downstream: a NaN prediction of a valid entry is infinitely wrong
    rel = np.where(np.isnan(rel), np.inf, rel)
    return np.where(valid, rel, np.nan), valid.sum(axis=0)


def line_summary(rel: np.ndarray, lines: list[str] | None = None) -> dict[str, float]:
    """rel: (n, L) relative errors, NaN where missing -> ``rel_error_<line>`` (with ``lines``)
    the mean over the line's valid samples, ``rel_error`` the mean of those over the lines
    with any, ``rel_error_median`` and ``rel_error_worst`` their median and maximum, and
    ``masked`` the entries left out. The engine's evaluation and the scoreboard both score
    with this."""
    count = (~np.isnan(rel)).sum(axis=0)
    per_line = np.full(rel.shape[1], np.nan)
    np.divide(np.nansum(rel, axis=0), count, out=per_line, where=count > 0)
    out = {}
    if lines is not None:
        out = {f"rel_error_{ln}": float(v) for ln, v in zip(lines, per_line, strict=True)}
    scored = per_line[count > 0]
    if len(scored):
        out["rel_error"] = float(scored.mean())
        out["rel_error_median"] = float(np.median(scored))
        out["rel_error_worst"] = float(scored.max())
    out["masked"] = float(np.size(rel) - count.sum())
    return out


def eve_summary(rel: np.ndarray, clim: np.ndarray, lines: list[str]) -> dict[str, float]:
    """rel, clim: (n, L) relative errors of the prediction and of the climatology, NaN where
    missing -> :func:`line_summary` of ``rel`` per line, and ``climatology_rel_error[_median]``
    the same over the lines for ``clim``."""
    out = line_summary(rel, lines)
    c = line_summary(clim)
    out.update({f"climatology_{k}": c[k] for k in ("rel_error", "rel_error_median") if k in c})
    return out


def eve_metrics(
    pred_log: np.ndarray,
    eve: np.ndarray,
    lines: list[str],
    climatology_log: np.ndarray,
    prefix: str,
) -> dict[str, float]:
    """Predicted log10 irradiances ``pred_log`` (n, L) against the stored ``eve`` (n, L),
    and every line at its train mean ``climatology_log`` (L,): :func:`eve_summary` of their
    relative errors, as ``{prefix}/name``."""
    rel, _ = relative_errors(pred_log, eve)
    clim, _ = relative_errors(np.broadcast_to(climatology_log, np.shape(eve)), eve)
    return prefixed(eve_summary(rel, clim, lines), prefix)


def spectra_figure(
    pred_log: np.ndarray, eve: np.ndarray, lines: list[str], times: np.ndarray, title: str
):
    """Predicted and true spectra of the quietest, the median and the brightest sample (by
    total irradiance), lines by wavelength, and each line's median relative error."""
    plt = pyplot()

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
    score_keys = ("rel",)

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

    def score_batch(self, model, batch, split, device) -> dict[str, np.ndarray]:
        """-> ``rel`` and ``clim`` (the climatology's), (n, L) relative errors with NaN where
        missing; ``pred`` (n, L) log10 irradiance, ``eve`` (n, L) as stored, ``time`` (n,)."""
        z = model(torch.as_tensor(batch["image"], device=device).float()).float()
        pred = z.cpu().numpy() * self.std + self.mean
        eve = batch["eve"][:, :, -1]
        rel, _ = relative_errors(pred, eve)
        clim, _ = relative_errors(np.broadcast_to(self.mean, eve.shape), eve)
        return {"rel": rel, "clim": clim, "pred": pred, "eve": eve, "time": batch["time"][:, -1]}

    def empty(self) -> dict[str, np.ndarray]:
        L = len(self.lines)
        return {
            "rel": np.zeros((0, L)),
            "clim": np.zeros((0, L)),
            "pred": np.zeros((0, L), np.float32),
            "eve": np.zeros((0, L), np.float32),
            "time": np.zeros(0, np.int64),
        }

    def metrics(self, out: dict[str, np.ndarray]) -> dict[str, float]:
        """:func:`eve_summary`, and the loss of the standardised targets."""
        metrics = eve_summary(out["rel"], out["clim"], self.lines)
        z, valid = self.targets({"eve": out["eve"][:, :, None]})
        zp = (out["pred"] - self.mean) / self.std
        metrics["loss"] = float((((zp - z) ** 2) * valid).sum() / max(valid.sum(), 1))
        return metrics

    def figures(self, out, split):
        if not len(out["pred"]):
            return []
        title = f"{split}: predicted vs true EVE spectra ({self.cfg.finetune.head})"
        fig = spectra_figure(out["pred"], out["eve"], self.lines, out["time"], title)
        return [(f"spectra_{split}.png", fig)]


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

    def board(self, cfg: Config) -> tuple[tuple[str, bool], ...]:
        # Szenicer et al. (2019) report the median and worst line's relative error.
        return (("rel_error", False), ("rel_error_median", False), ("rel_error_worst", False))

    def metrics(self, cfg: Config, scores: dict[str, np.ndarray]) -> dict[str, float]:
        """``scores["rel"]``: (n, L) -> :func:`line_summary` over the lines."""
        return line_summary(scores["rel"])

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
