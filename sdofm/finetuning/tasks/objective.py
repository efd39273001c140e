"""What every task's engine objective shares: the head on the prepared backbone, AdamW on its
trainable parameters, numpy batches."""

from __future__ import annotations

import torch
from torch import nn

from sdofm.config import Config
from sdofm.engine.objective import Objective


class HeadObjective(Objective):
    """A task's head; the subclass brings the loss and the evaluation."""

    batch_format = "numpy"

    def __init__(self, task, cfg: Config, prepared):
        # Only what the workers need travels with the objective: not the datasets.
        self.task, self.cfg = task, cfg
        self.sample_shape = tuple(prepared.sample_shape)
        self.backbone = prepared.backbone

    def build_model(self) -> nn.Module:
        return self.task.build_head(self.cfg, self.sample_shape, self.backbone)

    def optimizers(self, model: nn.Module) -> dict[str, torch.optim.Optimizer]:
        params = [p for p in model.parameters() if p.requires_grad]
        return {"model": torch.optim.AdamW(params, weight_decay=self.cfg.finetune.weight_decay)}
