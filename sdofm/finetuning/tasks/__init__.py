"""Finetuning tasks, by name: what a head predicts, from which inputs, scored how.

A task brings the data transform its pipeline needs, the head, and an engine objective;
``sdofm finetune TASK`` and ``sdofm tune TASK`` run any of them the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdofm.config import Config, ConfigError, TransformConfig
from sdofm.models import resolve

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

    from sdofm.finetuning.backbone import Backbone
    from sdofm.finetuning.run import Prepared
    from sdofm.finetuning.tasks.objective import HeadObjective


class Task:
    """The interface of a finetuning task (see ``dimming.py``)."""

    name: str = ""
    summary: str = ""
    """One line for ``--help``."""
    columns: tuple[str, ...] = ()
    """Per-target metrics, reported as ``{split}/{column}_{target}`` and ``{split}/{column}``."""
    extra: tuple[str, ...] = ()
    """Summary metrics beside the table, reported as ``{split}/{name}``."""
    sweep_metrics: tuple[str, ...] = ()
    """What a sweep may minimise (``tune.metric``)."""

    def check(self, cfg: Config) -> None:
        """Fail early, naming the setting, when the config cannot serve this task."""

    def transform(self, cfg: Config) -> TransformConfig:
        """The transform the Ray Data pipeline applies before the task's own."""
        return cfg.transform

    def targets(self, cfg: Config) -> list[str]:
        """Names of what the head predicts (rows of the metrics table)."""
        raise NotImplementedError

    def build_head(
        self, cfg: Config, sample_shape: tuple[int, int, int, int], backbone: Backbone | None
    ) -> nn.Module:
        """The head model on ``backbone`` (None: a from-scratch baseline)."""
        raise NotImplementedError

    def objective(self, cfg: Config, prepared: Prepared) -> HeadObjective:
        """The engine objective that trains and scores the head."""
        raise NotImplementedError

    def board(self, cfg: Config) -> tuple[tuple[str, bool], ...]:
        """The scoreboard's metrics as (name, higher is better); the first is the headline.
        Each is also logged by the engine's test evaluation as ``test/{name}``."""
        raise NotImplementedError

    def test_scores(
        self, cfg: Config, prepared: Prepared, model: nn.Module
    ) -> dict[str, np.ndarray]:
        """Per-sample scores of a trained head on the test split: name -> (n, ...) arrays,
        one row per test sample in the split's sample order (``sdofm evaluate`` resamples
        these rows for its bootstrap intervals), computed as the engine's evaluation does."""
        return self.objective(cfg, prepared).test_scores(model, prepared.datasets["test"])

    def metrics(self, cfg: Config, scores: dict[str, np.ndarray]) -> dict[str, float]:
        """The metrics of per-sample scores, by the function the engine's evaluation calls."""
        raise NotImplementedError

    def summarise(self, cfg: Config, scores: dict[str, np.ndarray]) -> dict[str, float]:
        """The :meth:`board` metrics of (a resample of) the per-sample scores."""
        metrics = self.metrics(cfg, scores)
        return {name: metrics.get(name, float("nan")) for name, _ in self.board(cfg)}


TASKS: dict[str, str] = {
    "dimming": "sdofm.finetuning.tasks.dimming:DimmingTask",
    "eve": "sdofm.finetuning.tasks.eve:EVETask",
    "missing-channel": "sdofm.finetuning.tasks.missing_channel:MissingChannelTask",
}
"""Task name -> where its class lives (imported on use: the CLI's help lists the names
without importing torch)."""

TASK_NAMES = tuple(TASKS)


def get_task(name: str) -> Task:
    """The task called ``name``."""
    if name not in TASKS:
        raise ConfigError(f"unknown finetuning task {name!r}; known: {', '.join(TASKS)}")
    return resolve(TASKS[name])()
