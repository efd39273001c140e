"""Skill against the baselines: closed forms (a perfect forecast, the baseline itself, a
forecast with a known share of the baseline's error) and intervals that resample days."""

from __future__ import annotations

import numpy as np
import pytest

from sdofm.datasets.skill import SkillSums, baseline_forecasts


def _disk(n=16):
    rr, cc = np.mgrid[0:n, 0:n]
    return (rr - 7.5) ** 2 + (cc - 7.5) ** 2 < 36


def test_skill_is_one_for_a_perfect_forecast_and_zero_for_the_baseline_itself():
    rng = np.random.default_rng(0)
    disk, sums = _disk(), SkillSums(("171A", "193A"), leads=2)
    for day in range(5):
        for _ in range(3):
            target = rng.random((2, 2, 16, 16))
            base = target + rng.normal(0, 0.1, target.shape)
            sums.add("model", day, target, target, disk)
            sums.add("persistence", day, base, target, disk)
            sums.add("rotation", day, base, target, disk)
    perfect = sums.skill("persistence")
    assert np.all(perfect["skill"] == 1) and np.all(perfect["low"] == 1)
    same = SkillSums(("171A", "193A"), leads=2)
    same.sse = {"model": sums.sse["persistence"], "persistence": sums.sse["persistence"]}
    same.count = sums.count
    assert np.all(same.skill("persistence")["skill"] == 0)


def test_half_the_baselines_error_is_a_skill_of_three_quarters_with_an_interval_over_days():
    """A forecast whose error is half the baseline's, pixel for pixel: MSE is a quarter,
    skill 1 - 1/4; the days' spread gives an interval, and it holds 0.75."""
    rng = np.random.default_rng(1)
    disk, sums = _disk(), SkillSums(("171A",), leads=1)
    for day in range(20):
        scale = rng.uniform(0.5, 2.0)  # days differ in how hard they are
        for _ in range(2):
            target = rng.random((1, 1, 16, 16))
            e = rng.normal(0, scale, target.shape)
            sums.add("model", day, target + 0.5 * e, target, disk)
            sums.add("persistence", day, target + e, target, disk)
    got = sums.skill("persistence", n_boot=500)
    assert got["skill"][0, 0] == pytest.approx(0.75, abs=1e-12)
    assert got["low"][0, 0] <= 0.75 <= got["high"][0, 0] and int(got["days"]) == 20


def test_baseline_forecasts_shapes_and_persistence():
    last = np.random.default_rng(2).random((3, 32, 32)).astype(np.float32)
    out = baseline_forecasts(last, leads=2, step_hours=1.0, radius_px=12.0)
    assert out["persistence"].shape == out["rotation"].shape == (2, 3, 32, 32)
    assert np.array_equal(out["persistence"][1], last)
    assert not np.array_equal(out["rotation"][1], last)  # the disk moved
