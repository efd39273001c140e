"""What every task's engine objective shares: the head on the prepared backbone, AdamW on its
trainable parameters, numpy batches, and the one evaluation path.

A head is scored in two places: the engine's evaluation on the workers (the ``val/...`` and
``test/...`` metrics in MLflow) and ``sdofm evaluate`` on the driver (the scoreboard, which
resamples per-sample scores for its bootstrap). Both go through :meth:`HeadObjective.predict`,
which gives every sample's scores in sample order, and then through the task module's one
summary function, with the thresholds of the config.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from sdofm.config import Config
from sdofm.engine.objective import EvalContext, Evaluation, Objective, all_gather


def prefixed(metrics: dict[str, float], split: str) -> dict[str, float]:
    """{name: value} -> {split/name: value}."""
    return {f"{split}/{k}": v for k, v in metrics.items()}


class HeadObjective(Objective):
    """A task's head; the subclass brings the loss, the per-sample scores of a batch
    (:meth:`score_batch`) and the metrics of a split's scores (:meth:`metrics`)."""

    batch_format = "numpy"
    score_keys: tuple[str, ...] = ()
    """The per-sample arrays of :meth:`score_batch` that ``sdofm evaluate`` resamples (the
    others feed the figures and worker-only metrics)."""

    def __init__(self, task, cfg: Config, prepared):
        # Only what the workers need travels with the objective: not the datasets.
        self.task, self.cfg = task, cfg
        self.sample_shape = tuple(prepared.sample_shape)
        self.backbone = prepared.backbone

    def build_model(self) -> nn.Module:
        return self.task.build_head(self.cfg, self.sample_shape, self.backbone)

    def optimizers(self, model: nn.Module) -> dict[str, torch.optim.Optimizer]:
        """AdamW on the trainable parameters; a trained encoder's at
        ``finetune.encoder_lr_scale`` times the head's learning rate."""
        fc = self.cfg.finetune
        encoder = getattr(model, "encoder", None)
        inside = {id(p) for p in encoder.parameters()} if encoder is not None else set()
        trained = [p for p in model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in trained if id(p) not in inside]},
            {"params": [p for p in trained if id(p) in inside], "lr_scale": fc.encoder_lr_scale},
        ]
        groups = [g for g in groups if g["params"]]
        return {"model": torch.optim.AdamW(groups, weight_decay=fc.weight_decay)}

    def score_batch(
        self, model: nn.Module, batch: dict, split: str, device: torch.device
    ) -> dict[str, np.ndarray]:
        """One numpy batch of ``split`` -> per-sample arrays (n, ...): the scores and what
        the figures need."""
        raise NotImplementedError

    def empty(self) -> dict[str, np.ndarray]:
        """:meth:`score_batch`'s arrays with no rows (a worker whose shard is empty)."""
        raise NotImplementedError

    def metrics(self, out: dict[str, np.ndarray]) -> dict[str, float]:
        """The metrics of a split, unprefixed, from :meth:`predict`'s arrays."""
        raise NotImplementedError

    def figures(self, out: dict[str, np.ndarray], split: str) -> list[tuple[str, object]]:
        """(artifact path, figure) of a split's last evaluation."""
        return []

    @torch.no_grad()
    def predict(
        self, model: nn.Module, batches: Iterable[dict], split: str, device: torch.device
    ) -> dict[str, np.ndarray]:
        """Every sample of ``batches`` (numpy batches of a split, or of this worker's shard
        of it), combined over the workers: :meth:`score_batch`'s arrays and ``sample`` (n,),
        rows in sample order. Sorting makes the metrics independent of the worker count and
        identical, bit for bit, on the driver and the workers for the same predictions."""
        parts = [
            {**self.score_batch(model, b, split, device), "sample": np.asarray(b["sample"])}
            for b in batches
        ]
        template = {**self.empty(), "sample": np.zeros(0, np.int64)}
        local = tuple(
            np.concatenate([p[k] for p in parts]) if parts else empty
            for k, empty in template.items()
        )
        out = dict(zip(template, all_gather(local), strict=True))
        order = np.argsort(out["sample"], kind="stable")
        return {k: v[order] for k, v in out.items()}

    def evaluate(self, model, shard, split: str, ctx: EvalContext) -> Evaluation:
        model.eval()
        batches = shard.iter_batches(batch_size=ctx.batch_size, batch_format="numpy")
        out = self.predict(model, batches, split, ctx.device)
        model.train()
        figures = self.figures(out, split) if ctx.final and ctx.figures else []
        return Evaluation(prefixed(self.metrics(out), split), figures)

    def test_scores(self, model: nn.Module, dataset) -> dict[str, np.ndarray]:
        """:attr:`score_keys` of every sample of the test split ``dataset`` (a Ray Dataset),
        scored on this process's CPU as the workers score it, rows in sample order."""
        model.eval()
        batches = dataset.iter_batches(
            batch_size=self.cfg.finetune.batch_size, batch_format="numpy"
        )
        out = self.predict(model, batches, "test", torch.device("cpu"))
        return {k: out[k] for k in self.score_keys}
