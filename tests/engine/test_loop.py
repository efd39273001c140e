"""The engine's loop on Ray Train with a toy objective whose answer is known in closed form."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from sdofm.engine import Evaluation, LoopConfig, Objective, fit
from sdofm.engine.checkpoint import OPTIMIZER_FILE, STATE_FILE

pytestmark = pytest.mark.usefixtures("ray_session")


class TwoWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([2.0]))
        self.b = nn.Parameter(torch.tensor([3.0]))


class TwoOptimisers(Objective):
    """A GAN-shaped objective: loss ``first`` = a * b steps ``a``; loss ``second`` = b steps
    ``b``. Were ``first``'s gradient to reach ``b``, b would move by lr * (a + 1), not lr."""

    optimizer_names = ("first", "second")
    headline = ()

    def build_model(self):
        return TwoWeights()

    def optimizers(self, model):
        return {
            "first": torch.optim.SGD([model.a], lr=0.0),
            "second": torch.optim.SGD([model.b], lr=0.0),
        }

    def loss(self, model, batch, info, optimizer, device):
        m = model.module if hasattr(model, "module") else model
        return (m.a * m.b).sum() if optimizer == "first" else m.b.sum()

    def evaluate(self, model, shard, split, ctx):
        return Evaluation({f"{split}/a": float(model.a), f"{split}/b": float(model.b)})

    def describe(self, batch):
        return "toy"


def test_each_optimiser_steps_on_its_own_loss_and_the_checkpoint_holds_both(tmp_path):
    import ray.data

    data = ray.data.from_items([{"sample": i, "x": np.float32(i)} for i in range(4)])
    lr = 0.1
    loop = LoopConfig(
        epochs=1,
        schedule_steps=1,
        lr=lr,  # warm-up 0 and one step: the first step's lr is the peak
        max_steps=1,
        grad_clip=None,
        batch_size=4,
        splits=("train", "val"),
        fallback_dir=str(tmp_path / "tracking"),
    )
    scaling = SimpleNamespace(
        num_workers=1, use_gpu=False, cpus_per_worker=0.25, placement_strategy="PACK"
    )
    result = fit("toy", str(tmp_path), TwoOptimisers(), loop, {"train": data, "val": data}, scaling)
    assert result.metrics["step"] == 1
    assert result.metrics["val/a"] == pytest.approx(2.0 - lr * 3.0)  # d(ab)/da = b
    assert result.metrics["val/b"] == pytest.approx(3.0 - lr * 1.0)  # d(b)/db only
    assert result.metrics["train/loss_first"] == pytest.approx(6.0)
    state = json.loads((tmp_path / "toy" / "checkpoint_00000001" / STATE_FILE).read_text())
    assert (state["step"], state["epoch"]) == (1, 0)
    saved = torch.load(tmp_path / "toy" / "checkpoint_00000001" / OPTIMIZER_FILE)
    assert set(saved) == {"first", "second"}
