"""What the engine trains: an objective owns the model, its loss and its evaluation; the
loop (``sdofm.engine.loop``) owns everything else.

A new backbone adds a model, an objective and a config, never a loop:

* MAE (``sdofm.pretraining.objective.MaskedReconstruction``): one phase, the masked
  reconstruction loss, validation loss per channel and reconstruction figures.
* A VAE: one phase; ``loss`` returns the negative ELBO, with the KL weight warmed up
  from ``info.step / info.total_steps``.
* A GAN: phases ``discriminator`` (optimiser ``D``), a lazy regulariser on ``D`` every k
  steps, then ``generator`` (optimiser ``G``); each phase runs forward, backward and its
  optimiser's step before the next begins, so the generator trains against the
  discriminator's updated weights; ``after_step`` updates the EMA copy of the generator.
* Finetuning heads (``sdofm.finetuning.tasks``): the head's loss and its science metrics.

The model is one ``nn.Module`` holding every network (a GAN's ``G``, ``D`` and ``G_ema``),
so one state dict checkpoints all of them. A network is the set of parameters one
optimiser owns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from sdofm.engine.optim import lr_at


@dataclass(frozen=True)
class Phase:
    """One part of an optimiser step: a loss, and the optimiser it steps.

    The loop runs a phase to completion (forward and backward over every micro-batch, the
    gradients averaged over every worker, clip, step) before the next one starts. While a
    phase runs, only the parameters of its optimiser require gradients: the other
    networks' parameters are constants for it (their ``requires_grad`` is restored after).
    """

    name: str
    """The loss's name: ``Objective.loss(..., phase=name)``; metrics ``train/loss_{name}``."""
    optimizer: str
    """The optimiser this phase steps (a key of ``Objective.optimizers``)."""
    every: int = 1
    """Run at the steps where ``step % every == 0`` (a lazy regulariser: scale its loss by
    ``every`` in the objective to keep its weight)."""


@dataclass(frozen=True)
class Schedule:
    """One optimiser's learning rate over the steps and its gradient clip."""

    lr: float
    """Peak learning rate."""
    warmup_steps: int = 0
    """Linear warm-up steps from 0 to ``lr``."""
    total_steps: int = 0
    """Step at which the cosine decay reaches ``min_lr_ratio * lr``; 0: constant ``lr``."""
    min_lr_ratio: float = 0.0
    grad_clip: float | None = None
    """Clip this optimiser's global gradient norm to this; None: no clipping."""

    def lr_at(self, step: int) -> float:
        """The lr of optimiser step ``step`` (counted from 0)."""
        if self.total_steps <= 0 and step >= self.warmup_steps:
            return self.lr
        return lr_at(step, self.lr, self.warmup_steps, self.total_steps, self.min_lr_ratio)


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
    phases: tuple[Phase, ...] = (Phase("model", "model"),)
    """What one optimiser step runs, in order (discriminator before generator)."""
    headline: tuple[str, ...] = ("val/loss",)
    """Metrics shown in the progress lines."""

    def build_model(self) -> nn.Module:
        """The model to train, on the CPU, with fresh weights."""
        raise NotImplementedError

    def optimizers(self, model: nn.Module) -> dict[str, torch.optim.Optimizer]:
        """One optimiser per optimiser name of ``phases``, each over its network's
        parameters (the loop sets their lr each step from :meth:`schedules`, times a param
        group's ``lr_scale`` where it has one)."""
        raise NotImplementedError

    def schedules(self, default: Schedule) -> dict[str, Schedule]:
        """Each optimiser's lr schedule and clip; ``default`` is the run's (``train.lr``,
        warm-up, cosine, ``train.grad_clip``). A GAN gives its two networks their own."""
        return {p.optimizer: default for p in self.phases}

    def loss(
        self, model: nn.Module, batch: dict, info: StepInfo, phase: str, device: torch.device
    ) -> torch.Tensor:
        """The scalar loss of ``batch`` for phase ``phase``."""
        raise NotImplementedError

    def after_step(self, model: nn.Module, info: StepInfo) -> None:
        """Called on every worker after every phase of step ``info.step`` has stepped (an
        EMA of a network). ``model`` is the plain model, its weights equal on every worker."""

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
