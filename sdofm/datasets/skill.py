"""Forecast skill against the two honest baselines, with intervals over independent days.

A forecast of lead ``j`` (``j`` steps of ``dt`` ahead) is scored per channel by its mean
squared error over the solar disk; the baselines are persistence (the last input frame)
and the last input frame rotated forward by ``j dt`` (:func:`~sdofm.datasets.rotation.rotate_frames`).
Skill = 1 - MSE_model / MSE_baseline: 0 is the baseline's own error, 1 a perfect
forecast. Samples of one day share their Sun, so intervals resample whole days.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sdofm.datasets.rotation import rotate_frames

BASELINES = ("persistence", "rotation")
DAY_NS = 86_400 * 10**9
MIN_DAYS = 5
"""Test days below which intervals resample samples instead of days (and say so): a
handful of days cannot show how much a score varies from one Sun to the next."""


def baseline_forecasts(
    last: np.ndarray, leads: int, step_hours: float, radius_px: float, b0_deg: float = 0.0
) -> dict[str, np.ndarray]:
    """``last (..., H, W)`` the last input frames -> each baseline's forecasts
    ``(leads, ..., H, W)`` for leads 1..``leads``."""
    return {
        "persistence": np.stack([last] * leads),
        "rotation": np.stack(
            [rotate_frames(last, j * step_hours, radius_px, b0_deg) for j in range(1, leads + 1)]
        ),
    }


@dataclass
class SkillSums:
    """Squared errors summed per day, channel and lead, for the model and each baseline."""

    channels: tuple[str, ...]
    leads: int
    sse: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    """forecaster -> day (int, days since the epoch) -> (leads, C) summed squared error."""
    count: dict[int, np.ndarray] = field(default_factory=dict)
    """day -> (leads, C) pixels summed over."""

    def add(
        self, name: str, day: int, pred: np.ndarray, target: np.ndarray, disk: np.ndarray
    ) -> None:
        """``pred``, ``target``: (leads, C, H, W) of one sample; ``disk``: (H, W) bool."""
        err = ((pred - target)[..., disk].astype(np.float64) ** 2).sum(-1)  # (leads, C)
        self.add_errors(name, day, err, int(disk.sum()))

    def add_errors(self, name: str, day: int, sse: np.ndarray, pixels: int) -> None:
        """``sse``: (leads, C) one sample's squared error summed over its ``pixels`` disk
        pixels (the model's sample counts them for the day)."""
        per_day = self.sse.setdefault(name, {})
        per_day[day] = per_day.get(day, 0.0) + np.asarray(sse, np.float64)
        if name == "model":
            n = np.full(np.shape(sse), pixels, np.float64)
            self.count[day] = self.count.get(day, 0.0) + n

    def mse(self, name: str) -> np.ndarray:
        """(leads, C) the mean squared error of ``name`` over every day."""
        days = sorted(self.count)
        return sum(self.sse[name][d] for d in days) / sum(self.count[d] for d in days)

    def skill(
        self, baseline: str, n_boot: int = 1000, seed: int = 0, level: float = 0.95
    ) -> dict[str, np.ndarray]:
        """Skill of the model against ``baseline`` per (lead, channel): the value over all
        days and a bootstrap interval resampling days (``n_boot`` draws, seeded)."""
        days = sorted(self.count)
        model = np.stack([self.sse["model"][d] for d in days])  # (D, leads, C)
        base = np.stack([self.sse[baseline][d] for d in days])
        value = 1.0 - model.sum(0) / base.sum(0)
        rng = np.random.default_rng(seed)
        draws = rng.integers(0, len(days), size=(n_boot, len(days)))
        boot = 1.0 - model[draws].sum(1) / base[draws].sum(1)  # (n_boot, leads, C)
        lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2], axis=0)
        return {"skill": value, "low": lo, "high": hi, "days": np.array(len(days))}
