"""The one checkpoint format of every run, and where runs keep them.

```
<storage>/<run name>/
  checkpoint_00000132/
    model.pt       the unwrapped model's state dict
    optimizer.pt   {optimiser name: state dict}
    metrics.jsonl  the metrics logged since the previous checkpoint (MLflow gets them once)
    state.json     TrainState (step, epoch, batch_in_epoch) + what the objective adds
                   (e.g. the encoder's constructor arguments and the channels)
```

``state.json`` is written last and atomically (a rename on local disks, one PUT on
object stores), so a folder with a ``state.json`` is complete: a run resumes from the
newest such folder, whatever Ray's own record of its checkpoints says. ``storage`` is a
local folder or any fsspec URL (``s3://bucket/prefix``), ``storage_options`` the fsspec
options that reach it (an S3-compatible endpoint and its keys).
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from sdofm.storage import join, open_url, write_atomic

MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "state.json"
_NAME = re.compile(r"checkpoint_(\d{8})$")


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
    path: str | Path,
    model: nn.Module,
    optimizers: dict[str, torch.optim.Optimizer],
    state: TrainState,
    meta: dict | None = None,
    metrics: list[dict] | None = None,
    storage_options: dict | None = None,
) -> None:
    """Write a checkpoint into the folder or URL ``path``; ``state.json`` last."""
    fs, root = open_url(path, storage_options)
    fs.makedirs(root, exist_ok=True)
    for name, obj in (
        (MODEL_FILE, unwrap(model).state_dict()),
        (OPTIMIZER_FILE, {k: o.state_dict() for k, o in optimizers.items()}),
    ):
        buf = io.BytesIO()
        torch.save(obj, buf)
        write_atomic(fs, f"{root}/{name}", buf.getvalue())
    if metrics is not None:
        write_atomic(
            fs, f"{root}/{METRICS_FILE}", "".join(json.dumps(m) + "\n" for m in metrics).encode()
        )
    state_json = json.dumps({**asdict(state), **(meta or {})}, indent=1).encode()
    write_atomic(fs, f"{root}/{STATE_FILE}", state_json)


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    storage_options: dict | None = None,
) -> TrainState:
    """Load a checkpoint folder or URL into ``model`` (and ``optimizers``) -> where training was."""
    fs, root = open_url(path, storage_options)
    with fs.open(f"{root}/{MODEL_FILE}", "rb") as f:
        model.load_state_dict(torch.load(f, map_location="cpu"))
    if optimizers:
        with fs.open(f"{root}/{OPTIMIZER_FILE}", "rb") as f:
            saved = torch.load(f, map_location="cpu")
        for name, opt in optimizers.items():
            opt.load_state_dict(saved[name])
    with fs.open(f"{root}/{STATE_FILE}") as f:
        raw = json.load(f)
    return TrainState(**{k: raw[k] for k in ("step", "epoch", "batch_in_epoch")})


def read_metrics(path: str, storage_options: dict | None = None) -> list[dict]:
    """The metrics a checkpoint recorded for its interval ([] when it has none)."""
    fs, root = open_url(path, storage_options)
    try:
        with fs.open(f"{root}/{METRICS_FILE}") as f:
            return [json.loads(line) for line in f.read().decode().splitlines() if line]
    except FileNotFoundError:
        return []


@dataclass
class Latest:
    """The newest complete checkpoint of a run."""

    url: str
    """The checkpoint folder, with the storage's scheme (``s3://...``) when it has one."""
    state: dict
    """Its ``state.json``."""

    @property
    def step(self) -> int:
        return int(self.state["step"])


def latest_checkpoint(
    storage: str, name: str, storage_options: dict | None = None
) -> Latest | None:
    """The newest complete checkpoint (one with a ``state.json``) of run ``name`` under
    ``storage``, or None when the run has none. The one answer to "where does this run
    resume": the driver, the workers and the restart messages all ask it."""
    run = join(storage, name)
    fs, root = open_url(run, storage_options)
    try:
        fs.invalidate_cache()
        entries = fs.ls(root, detail=False)
    except FileNotFoundError:
        return None
    steps = sorted((int(m.group(1)), e) for e in entries if (m := _NAME.search(e.rstrip("/"))))
    for _, entry in reversed(steps):
        folder = join(run, Path(entry.rstrip("/")).name)
        try:
            with fs.open(f"{entry.rstrip('/')}/{STATE_FILE}") as f:
                return Latest(folder, json.load(f))
        except (FileNotFoundError, json.JSONDecodeError):
            continue  # a checkpoint cut off mid-write: an older one is complete
    return None
