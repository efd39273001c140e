"""What the engine trains: an objective owns the model, its loss and its evaluation; the
loop (``sdofm.engine.loop``) owns everything else.

A new backbone adds a model, an objective and a config, never a loop:

* MAE (``sdofm.pretraining.objectives.MaskedReconstruction``): one optimiser, the masked
  reconstruction loss, validation loss per channel and reconstruction figures.
* A VAE: one optimiser; ``loss`` returns the negative ELBO, with the KL weight warmed up
  from ``info.step / info.total_steps``.
* A GAN: ``optimizer_names = ("discriminator", "generator")``; ``loss`` is called once per
  name and step, in that order, and each loss reaches only its own optimiser's parameters.
* Finetuning heads (``sdofm.finetuning.tasks``): the head's loss and its science metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn


@dataclass
class StepInfo:
    """Where the loop is when it asks for a loss."""

    step: int
    """Optimiser steps done before this one."""
    epoch: int
    """Data epochs completed."""
    total_steps: int
    """Steps of the lr schedule (for warm-ups that follow it)."""


@dataclass
class EvalContext:
    """What an evaluation needs from the loop."""

    device: torch.device
    batch_size: int
    prefetch_batches: int
    precision: str
    rank: int
    step: int
    final: bool
    """The run's last evaluation (test split, summary figures)."""
    figures: int
    """Figures this worker should draw (0 except on rank 0)."""


@dataclass
class Evaluation:
    """Metrics of one split, summed over every worker, and rank 0's figures."""

    metrics: dict[str, float]
    figures: list[tuple[str, Any]] = field(default_factory=list)
    """(artifact path, matplotlib figure)."""


class Objective:
    """The interface between a model and the engine's loop (plain PyTorch, no Ray)."""

    batch_format: str = "torch"
    """How the loop hands batches over: ``torch`` (tensors) or ``numpy`` (arrays)."""
    optimizer_names: tuple[str, ...] = ("model",)
    """One optimiser per name, stepped in this order."""
    headline: tuple[str, ...] = ("val/loss",)
    """Metrics shown in the progress lines."""

    def build_model(self) -> nn.Module:
        """The model to train, on the CPU, with fresh weights."""
        raise NotImplementedError

    def optimizers(self, model: nn.Module) -> dict[str, torch.optim.Optimizer]:
        """One optimiser per name of ``optimizer_names`` (the loop sets their lr each step)."""
        raise NotImplementedError

    def loss(
        self, model: nn.Module, batch: dict, info: StepInfo, optimizer: str, device: torch.device
    ) -> torch.Tensor:
        """The scalar loss of ``batch`` for optimiser ``optimizer``."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, shard, split: str, ctx: EvalContext) -> Evaluation:
        """Metrics of ``split`` over this worker's ``shard`` (a Ray Data iterator), combined
        over every worker (``all_reduce_sum``, ``all_gather``)."""
        raise NotImplementedError

    def checkpoint_meta(self, model: nn.Module) -> dict:
        """What ``state.json`` records beside the train state (to rebuild the model alone)."""
        return {}

    def tokens_per_sample(self, model: nn.Module) -> int | None:
        """Tokens one sample makes (for tokens/s), or None."""
        return None

    def describe(self, batch: dict) -> str:
        """The samples of a batch, for error messages: ids and times."""
        times = np.asarray(batch["time"][:, -1]).astype("datetime64[ns]")
        return f"samples {np.asarray(batch['sample']).tolist()} at {times.tolist()}"


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over every worker, in place (nothing to do on one worker)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def all_gather(arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """Concatenate each array over every worker (in rank order)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return arrays
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, arrays)
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(len(arrays)))
