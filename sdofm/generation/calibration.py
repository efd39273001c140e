"""Calibrated generation scores: every metric read against what it gives for two halves of
real data (its noise floor) and for deliberate corruptions of real data.

The real held-out frames are split at random into halves A and B, ``splits`` times. For each
split, every metric compares A with:

* B itself: the **floor**, what the metric reads when nothing is wrong;
* B corrupted (``sdofm.generation.corruptions``): the same frames, so the only difference
  from the floor is the corruption;
* a random draw of |B| generated frames of each generator.

So every number compares |A| real frames with |B| others, whatever the metric's small-sample
bias. A corruption is **separated** by a metric when its value on every split is worse than
the floor on every split; a metric that separates no corruption is reported, not used.
A generator **improves** on another when its value on every split is better than the
other's on every split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from sdofm.generation.features import Summary
from sdofm.generation.metrics import Standardiser, higher_is_better, memorisation, scores

SPLITS = 5
"""Random halvings of the real frames (each metric's spread over them is its interval)."""
MEMORISATION_SPACE = "random_cnn"


def worse(metric: str, a: np.ndarray, b: np.ndarray) -> bool:
    """True when every value in ``a`` is worse than every value in ``b``."""
    if higher_is_better(metric):
        return bool(np.max(a) < np.min(b))
    return bool(np.min(a) > np.max(b))


@dataclass
class Calibration:
    """Each metric's values over the splits (metric -> (splits,)) for the floor, each
    corruption and each scored generator (``arms``)."""

    floor: dict[str, np.ndarray]
    corrupted: dict[str, dict[str, np.ndarray]]
    arms: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    memorisation: dict[str, np.ndarray] = field(default_factory=dict)
    """Memorisation ratio over the splits: ``floor`` (held-out A against held-out B),
    ``copies`` (noisy copies of training frames, the control that must read low), and each
    generator."""

    @property
    def metrics(self) -> list[str]:
        return list(self.floor)

    def separates(self, metric: str) -> list[str]:
        """The corruptions this metric tells from the floor on every split."""
        return [
            c for c, v in self.corrupted.items() if worse(metric, v[metric], self.floor[metric])
        ]

    def calibrated(self, metric: str) -> bool:
        return bool(self.separates(metric))

    def improves(self, metric: str, arm: str, over: str) -> bool:
        """True when ``arm`` beats ``over`` on every split."""
        return worse(metric, self.arms[over][metric], self.arms[arm][metric])

    def memorises(self, arm: str) -> bool:
        """True when the arm's frames lie nearer the training frames than held-out real
        frames do, on every split (its ratio below the floor's)."""
        return bool(np.max(self.memorisation[arm]) < np.min(self.memorisation["floor"]))


class Calibrator:
    """The splits of a set of real frames, and every metric against them."""

    def __init__(
        self,
        real: Summary,
        splits: int = SPLITS,
        seed: int = 0,
        window: int = 8,
        train: Summary | None = None,
    ):
        if len(real) < 8:
            raise ValueError(f"calibrating needs at least 8 real frames, got {len(real)}")
        self.real, self.window, self.train, self.seed = real, window, train, seed
        self.std = Standardiser(real)
        rng = np.random.default_rng(seed)
        half = len(real) // 2
        perms = [rng.permutation(len(real)) for _ in range(splits)]
        self.splits = [(p[:half], p[half : 2 * half]) for p in perms]

    def _rows(self, other: Summary, aligned: bool, split: int) -> np.ndarray:
        """The rows of ``other`` set against half A of ``split``: half B's frames when
        ``other`` is the real set (corrupted), else a draw of as many from the seed and the
        split alone (the same rows for every generator scored on the split)."""
        b = self.splits[split][1]
        if aligned:
            return b
        if len(other) < len(b):
            raise ValueError(f"need at least {len(b)} generated frames, got {len(other)}")
        return np.random.default_rng([self.seed, split]).choice(len(other), len(b), replace=False)

    def _score(self, other: Summary, aligned: bool) -> dict[str, np.ndarray]:
        rows = []
        for i, (a, _) in enumerate(self.splits):
            idx = self._rows(other, aligned, i)
            rows.append(scores(self.real.take(a), other.take(idx), self.std, self.window))
        return {m: np.array([r[m] for r in rows]) for m in rows[0]}

    def _memorisation(self, other: Summary, aligned: bool) -> np.ndarray:
        train = self.std(MEMORISATION_SPACE, self.train.features[MEMORISATION_SPACE])
        out = []
        for i, (a, _) in enumerate(self.splits):
            idx = self._rows(other, aligned, i)
            gen = self.std(MEMORISATION_SPACE, other.features[MEMORISATION_SPACE][idx])
            held = self.std(MEMORISATION_SPACE, self.real.features[MEMORISATION_SPACE][a])
            out.append(memorisation(train, gen, held))
        return np.array(out)

    def calibrate(
        self, corrupted: dict[str, Summary], copies: Summary | None = None
    ) -> Calibration:
        """``corrupted``: name -> Summary of the real frames corrupted, row for row;
        ``copies``: noisy copies of training frames (the memorisation control)."""
        for name, s in corrupted.items():
            if len(s) != len(self.real):
                raise ValueError(f"corruption {name}: {len(s)} frames for {len(self.real)} real")
        floor = self._score(self.real, aligned=True)
        cal = Calibration(
            floor, {name: self._score(s, aligned=True) for name, s in corrupted.items()}
        )
        if self.train is not None:
            cal.memorisation["floor"] = self._memorisation(self.real, aligned=True)
            if copies is not None:
                cal.memorisation["copies"] = self._memorisation(copies, aligned=False)
        return cal

    def add_arm(self, cal: Calibration, arm: str, generated: Summary) -> None:
        """Score a generator's frames on the same splits."""
        cal.arms[arm] = self._score(generated, aligned=False)
        if self.train is not None:
            cal.memorisation[arm] = self._memorisation(generated, aligned=False)


def summary_rows(cal: Calibration, arms: Sequence[str], baseline: str | None) -> list[dict]:
    """One row per metric: floor, corruptions separated, each arm's mean and range over the
    splits, whether it is calibrated, and (with a ``baseline`` arm) whether every other arm
    improves on it."""
    rows = []
    for m in cal.metrics:
        row = {
            "metric": m,
            "higher_is_better": higher_is_better(m),
            "floor": float(cal.floor[m].mean()),
            "floor_range": (float(cal.floor[m].min()), float(cal.floor[m].max())),
            "separates": cal.separates(m),
            "calibrated": cal.calibrated(m),
            "corrupted": {c: float(v[m].mean()) for c, v in cal.corrupted.items()},
        }
        for arm in arms:
            v = cal.arms[arm][m]
            row[arm] = float(v.mean())
            row[f"{arm}_range"] = (float(v.min()), float(v.max()))
            if baseline and arm != baseline:
                row[f"{arm}_improves"] = cal.improves(m, arm, baseline)
        rows.append(row)
    return rows
