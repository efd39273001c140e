"""The forecasting objective: the Sun ``dt`` ahead, scored against persistence and rotation.

Samples are windows of ``data.num_frames`` frames ``data.frame_step`` apart: the model's
input frames, then its leads (``sdofm.models.forecast.Forecaster``). Training minimises the
squared error on the solar disk per channel and lead, in the model's normalised units, each
divided by persistence's error on the batch (so the loss is 1 - skill and a quiet channel,
whose frames barely change in an hour, weighs as much as a flaring one); validation reports
the loss and the raw error per channel, and the skill against the two baselines every
forecast must beat (``sdofm.datasets.skill``): persistence (the last input frame) and the
last input frame rotated differentially by the lead time (Snodgrass). Figures show the last
input, the forecast, the observed frame and their difference.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from sdofm.datasets.skill import BASELINES, baseline_forecasts
from sdofm.engine.objective import EvalContext, Evaluation, all_reduce_sum
from sdofm.engine.optim import autocast
from sdofm.models.mae import disk_radius
from sdofm.pretraining.objective import BackboneObjective
from sdofm.tracking import forecast_figure

FORECASTERS = ("model", *BASELINES)
"""Whose forecasts are scored: the model's, then each baseline's."""


def lead_label(lead: int, step_hours: float) -> str:
    """Lead ``lead`` (steps of ``step_hours``) as a metric suffix: ``1h``, ``30min``."""
    hours = lead * step_hours
    return f"{hours:g}h" if hours >= 1 else f"{hours * 60:g}min"


class Forecasting(BackboneObjective):
    """Next-frame forecasting with rollout over the model's leads (Surya's objective on the
    sdofm ViT): the squared error on the disk per channel and lead, in the model's normalised
    units, each divided by persistence's on the same batch (``normalise``)."""

    headline = ("val/loss", "val/skill_persistence_min", "val/skill_rotation_min")
    reconstructs = False
    forecasts = True
    score_name = "disk_mse"

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")

        normalise: Literal["persistence", "none"] = "persistence"
        """``persistence``: each channel's and lead's disk MSE over the batch is divided by
        persistence's on the same batch (the loss is 1 - skill, so a quiet channel counts
        as much as a busy one); ``none``: the plain disk MSE, averaged over channels."""

    def __init__(self, *args, step_hours: float = 1.0, normalise: str = "persistence", **kw):
        super().__init__(*args, **kw)
        self.step_hours = float(step_hours)
        """Hours between the frames of a window (``data.frame_step``): the lead time unit."""
        self.normalise = normalise

    @classmethod
    def from_config(cls, cfg, kwargs: dict[str, Any]) -> Forecasting:
        objective = super().from_config(cfg, kwargs)
        objective.step_hours = cfg.data.effective_frame_step.total_seconds() / 3600.0
        return objective

    def reduce(self, model_mse: torch.Tensor, persistence_mse: torch.Tensor) -> torch.Tensor:
        """(C, leads) disk MSE of the model and of persistence over the same samples -> the
        loss (:attr:`normalise`)."""
        if self.normalise == "none":
            return model_mse.mean()
        return (model_mse / persistence_mse.detach().clamp_min(1e-12)).mean()

    def loss(self, model, batch, info, optimizer, device) -> torch.Tensor:
        x = self.train_inputs(batch, device)
        out = model(x)
        core = getattr(model, "module", model)
        last = x[:, :, core.inputs - 1 : core.inputs]
        persistence = core.disk_errors(last.expand_as(out["pred"]), x[:, :, core.inputs :])
        return self.reduce(out["errors"].mean(0), persistence.mean(0))

    @torch.no_grad()
    def forecast_errors(self, model, imgs: torch.Tensor, precision: str = "fp32"):
        """imgs: (B, C, window, H, W) -> (errors, pred): ``errors[name]`` (B, leads, C) the
        squared error on the disk of the model's and each baseline's forecasts, summed over
        the disk's pixels; ``pred`` (B, C, leads, H, W) the model's forecasts."""
        inputs, target = imgs[:, :, : model.inputs], imgs[:, :, model.inputs :]
        with autocast(imgs.device, precision):
            pred = model.rollout(inputs).float()
        n_disk = int(model.disk.sum())
        errors = {"model": model.disk_errors(pred, target) * n_disk}
        last = inputs[:, :, -1].float().cpu().numpy()
        H = imgs.shape[-1]
        base = baseline_forecasts(last, model.leads, self.step_hours, disk_radius(H))
        for name in BASELINES:
            b = torch.as_tensor(np.moveaxis(base[name], 0, 2), device=imgs.device)  # B,C,L,H,W
            errors[name] = model.disk_errors(b, target) * n_disk
        return {k: v.transpose(1, 2).double() for k, v in errors.items()}, pred

    @torch.no_grad()
    def evaluate(self, model, shard, split: str, ctx: EvalContext) -> Evaluation:
        """Squared error on the disk per channel and lead of the model and both baselines,
        summed over every worker's shard; skills = 1 - MSE_model / MSE_baseline."""
        model.eval()
        C, leads = len(self.channels), model.leads
        sums = {
            k: torch.zeros(leads, C, dtype=torch.float64, device=ctx.device) for k in FORECASTERS
        }
        pixels = torch.zeros((), dtype=torch.float64, device=ctx.device)
        n_disk = int(model.disk.sum())
        examples = []
        for batch in shard.iter_torch_batches(
            batch_size=ctx.batch_size, prefetch_batches=ctx.prefetch_batches
        ):
            imgs = batch["image"].to(ctx.device).float()
            errors, pred = self.forecast_errors(model, imgs, ctx.precision)
            for k, v in errors.items():
                sums[k] += v.sum(0)
            pixels += len(imgs) * n_disk
            for i in range(min(ctx.figures - len(examples), len(imgs))):
                frames = (imgs[i, :, model.inputs - 1], pred[i, :, 0], imgs[i, :, model.inputs])
                examples.append((*(f.cpu().numpy() for f in frames), int(batch["time"][i, -1])))
        model.train()
        for t in (*sums.values(), pixels):
            all_reduce_sum(t)
        mse = {k: (v / pixels.clamp_min(1.0)).cpu() for k, v in sums.items()}
        metrics = {f"{split}/loss": float(self.reduce(mse["model"].T, mse["persistence"].T))}
        metrics[f"{split}/mse"] = float(mse["model"].mean())
        for c, name in enumerate(self.channels):
            per = self.reduce(mse["model"][:, c : c + 1].T, mse["persistence"][:, c : c + 1].T)
            metrics[f"{split}/loss_{name}"] = float(per)
            metrics[f"{split}/mse_{name}"] = float(mse["model"][:, c].mean())
        mse = {k: v.numpy() for k, v in mse.items()}
        for base in BASELINES:
            skill = 1.0 - mse["model"] / np.maximum(mse[base], 1e-30)  # (leads, C)
            for j in range(leads):
                suffix = "" if j == 0 else f"_{lead_label(j + 1, self.step_hours)}"
                for c, name in enumerate(self.channels):
                    metrics[f"{split}/skill_{base}_{name}{suffix}"] = float(skill[j, c])
                metrics[f"{split}/skill_{base}_min{suffix}"] = float(skill[j].min())
            metrics[f"{split}/mse_{base}"] = float(mse[base].mean())
        lead = lead_label(1, self.step_hours)
        figures = [self._figure(e, i, ctx.step, lead) for i, e in enumerate(examples)]
        return Evaluation(metrics, figures)

    def _figure(self, example: tuple, i: int, step: int, lead: str) -> tuple[str, Any]:
        last, pred, true, t = example
        when = np.datetime64(t, "ns").astype("datetime64[s]")
        title = f"step {step} | val sample {i} | forecast {lead} ahead, valid {when}"
        fig = forecast_figure(last, pred, true, self.channels, lead, title=title)
        return f"forecasts/step_{step:08d}_{i}.png", fig

    def tokens_per_sample(self, model) -> int:
        return model.num_patches * model.leads

    def checkpoint_meta(self, model) -> dict:
        return {**super().checkpoint_meta(model), "step_hours": self.step_hours}
