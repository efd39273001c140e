"""The scoreboard's forecast section: a forecasting backbone's forecasts of the test split
against the two baselines every forecast must beat, persistence and differential rotation
(``sdofm.datasets.skill``), per channel and lead time.

Skill = 1 - MSE_model / MSE_baseline on the solar disk, in the model's normalised units. The
intervals resample whole test days (a day's samples share their Sun: resampling samples
would pretend they are independent), and "beats" means the interval lies above zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from sdofm.config import Config, ConfigError
from sdofm.datasets.inputs import build_inputs
from sdofm.datasets.skill import BASELINES, DAY_NS, MIN_DAYS, SkillSums
from sdofm.finetuning.backbone import Backbone
from sdofm.pretraining.forecast import lead_label
from sdofm.pretraining.objective import scoring_objective


@dataclass
class ForecastSection:
    rows: list[dict]
    """One per (lead, channel): each forecaster's MSE, each baseline's skill, its interval
    and whether the model beats it."""
    samples: int
    days: int
    step_hours: float
    n_boot: int
    notes: list[str] = field(default_factory=list)


def forecast_config(cfg: Config, backbone: Backbone) -> tuple[Config, float]:
    """The data config of the forecaster's windows (its inputs then its leads, the config's
    frame step) and the frame step in hours; an error where the checkpoint recorded another."""
    _, kwargs = backbone.model
    step_hours = cfg.data.effective_frame_step.total_seconds() / 3600.0
    trained = backbone.recorded.get("step_hours")
    if trained is not None and abs(trained - step_hours) > 1e-9:
        raise ConfigError(
            f"the forecaster {backbone.source} was trained on frames {trained:g} h apart; "
            f"data.frame_step gives {step_hours:g} h: set data.frame_step to {trained:g}h"
        )
    data = cfg.data.model_copy(update={"num_frames": int(kwargs["num_frames"])})
    return cfg.model_copy(update={"data": data}), step_hours


def forecast_section(cfg: Config, backbone: Backbone, n_boot: int) -> ForecastSection:
    """Score the backbone's forecasts of every test sample against both baselines."""
    if backbone.model is None:
        raise ConfigError(
            f"the backbone {backbone.source} holds its encoder only: give its pretraining "
            "run id or checkpoint folder to score its forecasts"
        )
    fcfg, step_hours = forecast_config(cfg, backbone)
    transform = fcfg.transform.model_copy(update={"on": "reader"})
    pipe = build_inputs(fcfg, transform=transform).pipeline
    name, kwargs = backbone.model
    C, window, H, W = pipe.sample_shape()
    inputs = window - int(kwargs.get("leads", 1))
    backbone.check(fcfg, (C, inputs, H, W))
    if pipe.num_samples("test") == 0:
        raise ConfigError(
            f"the test split of {fcfg.data.root} holds no window of {window} frames "
            f"{step_hours:g} h apart: check data.split and the gaps of the archive"
        )
    channels = fcfg.data.channels
    objective = scoring_objective(backbone.family, name, kwargs, channels, cfg.train.seed)
    objective.step_hours = step_hours
    model = objective.build_model()
    model.load_state_dict(backbone.state_dict)
    model.eval()
    days, errors = [], {who: [] for who in ("model", *BASELINES)}
    with pipe.frame_errors():
        for batch in pipe.dataset("test", epoch=0).iter_batches(
            batch_size=cfg.finetune.batch_size, batch_format="numpy"
        ):
            imgs = torch.tensor(batch["image"], dtype=torch.float32)
            batch_errors, _ = objective.forecast_errors(model, imgs)
            days.append(np.asarray(batch["time"][:, inputs - 1], np.int64) // DAY_NS)
            for who, e in batch_errors.items():
                errors[who].append(e.numpy())
    days = np.concatenate(days)
    samples, n_days = len(days), len(np.unique(days))
    # Intervals resample days; with too few of them, samples (and the section says so).
    units = days if n_days >= MIN_DAYS else np.arange(samples)
    sums = SkillSums(tuple(channels), model.leads)
    pixels = int(model.disk.sum())
    for who, parts in errors.items():
        for unit, e in zip(units.tolist(), np.concatenate(parts), strict=True):
            sums.add_errors(who, unit, e, pixels)
    skills = {b: sums.skill(b, n_boot=n_boot, seed=cfg.train.seed) for b in BASELINES}
    mse = {who: sums.mse(who) for who in ("model", *BASELINES)}
    rows = []
    for j in range(model.leads):
        for c, channel in enumerate(channels):
            row = {"lead": lead_label(j + 1, step_hours), "channel": channel}
            row.update({f"mse_{who}": float(v[j, c]) for who, v in mse.items()})
            for b, s in skills.items():
                lo, hi = float(s["low"][j, c]), float(s["high"][j, c])
                row[f"skill_{b}"] = float(s["skill"][j, c])
                row[f"skill_{b}_ci"] = (lo, hi)
                row[f"beats_{b}"] = lo > 0
            rows.append(row)
    notes = []
    if n_days < MIN_DAYS:
        notes.append(
            f"only {n_days} test day{'s' if n_days != 1 else ''} (fewer than {MIN_DAYS}): the "
            "intervals resample windows, which share their day's Sun, so they are too narrow; "
            "use an archive with more test days"
        )
    return ForecastSection(rows, samples, n_days, step_hours, n_boot, notes)


def format_forecast(section: ForecastSection) -> str:
    """The forecast section as a plain-text table."""
    head = ["lead", "channel", "MSE model", "persistence", "rotation"]
    head += [f"skill vs {b}" for b in BASELINES] + ["beats both"]

    def skill(r, b):
        lo, hi = r[f"skill_{b}_ci"]
        return f"{r[f'skill_{b}']:+.3f} [{lo:+.3f}, {hi:+.3f}]"

    lines = [
        [
            r["lead"],
            r["channel"],
            *(f"{r[f'mse_{w}']:.3g}" for w in ("model", *BASELINES)),
            *(skill(r, b) for b in BASELINES),
            "yes" if all(r[f"beats_{b}"] for b in BASELINES) else "NO",
        ]
        for r in section.rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *lines, strict=True)]

    def join(cells):
        return "  ".join(x.ljust(w) for x, w in zip(cells, widths, strict=True)).rstrip()

    both = sum(all(r[f"beats_{b}"] for b in BASELINES) for r in section.rows)
    out = [
        f"-- forecast: the backbone's forecasts of {section.samples} test windows "
        f"({section.days} days) against persistence and differential rotation; MSE on the "
        "disk in normalised units, skill = 1 - MSE_model / MSE_baseline --",
        join(head),
        *(join(line) for line in lines),
        f"(95 % bootstrap intervals, {section.n_boot} resamples of the test "
        f"{'days' if section.days >= MIN_DAYS else 'windows'}; 'beats': the "
        f"interval lies above zero) beats both in {both} of {len(section.rows)} "
        "(lead, channel) cells",
        *section.notes,
    ]
    return "\n".join(out)
