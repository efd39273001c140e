"""The one checkpoint format of every run: a folder with the model, its optimisers and
where training was.

```
checkpoint_00000132/
  model.pt       the unwrapped model's state dict
  optimizer.pt   {optimiser name: state dict}
  state.json     TrainState (step, epoch, batch_in_epoch) + what the objective adds
                 (e.g. the encoder's constructor arguments and the channels)
```
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"


@dataclass
class TrainState:
    """Where training is: optimiser steps done, data epochs completed, batches consumed of
    the epoch under way."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint taken after ``step`` optimiser steps."""
    return f"checkpoint_{step:08d}"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP and torch.compile wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizers: dict[str, torch.optim.Optimizer],
    state: TrainState,
    meta: dict | None = None,
) -> None:
    """Write a checkpoint into the folder ``path`` (which exists)."""
    torch.save(unwrap(model).state_dict(), path / MODEL_FILE)
    torch.save({k: o.state_dict() for k, o in optimizers.items()}, path / OPTIMIZER_FILE)
    (path / STATE_FILE).write_text(json.dumps({**asdict(state), **(meta or {})}, indent=1))


def load_checkpoint(
    path: Path, model: nn.Module, optimizers: dict[str, torch.optim.Optimizer] | None = None
) -> TrainState:
    """Load a checkpoint folder into ``model`` (and ``optimizers``) -> where training was."""
    model.load_state_dict(torch.load(path / MODEL_FILE, map_location="cpu"))
    if optimizers:
        saved = torch.load(path / OPTIMIZER_FILE, map_location="cpu")
        for name, opt in optimizers.items():
            opt.load_state_dict(saved[name])
    raw = json.loads((path / STATE_FILE).read_text())
    return TrainState(**{k: raw[k] for k in ("step", "epoch", "batch_in_epoch")})


def latest_checkpoint_state(storage: str, name: str) -> dict | None:
    """``state.json`` of the newest checkpoint of run ``name`` under ``storage`` (a folder
    or URI), or None when the run has none."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(f"{storage.rstrip('/')}/{name}")
    found = sorted(fs.glob(f"{root}/checkpoint_*/{STATE_FILE}"))
    if not found:
        return None
    with fs.open(found[-1]) as f:
        return json.load(f)
