"""The finetuning driver: data, backbone and run set-up around one engine ``fit`` per head.

Shared by ``sdofm finetune TASK``, ``ray_jobs/finetune.py`` and every trial of a sweep
(``sdofm.finetuning.tune``); Ray must be initialised by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from sdofm.config import Config, ConfigError, dump_config
from sdofm.console import say
from sdofm.datasets.inputs import build_inputs
from sdofm.engine import fit, loop_config, storage_path
from sdofm.engine.checkpoint import MODEL_FILE
from sdofm.finetuning.backbone import Backbone, resolve_backbone
from sdofm.finetuning.tasks import Task, get_task
from sdofm.storage import join, open_url
from sdofm.tracking import log_model, log_skipped, section_params, tracked_run, tracking_uri

if TYPE_CHECKING:
    from sdofm.datasets.blocks import SkipReport


@dataclass
class Prepared:
    """What every run of one task and data config shares: statistics, backbone, splits."""

    sample_shape: tuple[int, int, int, int]
    stats: dict | None
    backbone: Backbone | None
    datasets: dict
    """split -> a Ray Dataset in the task's transform (materialised when small)."""
    counts: dict[str, int]
    """split -> samples delivered (those with an unusable frame are skipped)."""
    tracking_uri: str
    skipped: SkipReport | None = None
    """The unusable frames the readers skipped, each once, and the samples they cost
    (None while the splits stream: then each run reports its own)."""
    pipeline: Any = field(default=None, repr=False, compare=False)
    """The driver's pipeline while the datasets stream (its registry actors must live)."""

    def __getstate__(self):
        return {**self.__dict__, "pipeline": None}  # trials hold the datasets, not the pipeline


@dataclass
class FinetuneResult:
    run_id: str | None
    metrics: dict
    checkpoint: str | None
    model_uri: str | None = None
    skipped: SkipReport | None = field(default=None, repr=False)


def prepare(cfg: Config, task: Task) -> Prepared:
    """Index, statistics, backbone and the three splits in the task's transform (seeded
    subsets of train and val when ``finetune.max_{train,val}_samples`` cap them); materialised
    once when they fit ``finetune.materialize_max_gb`` (the trials of a sweep then share them
    through the object store), else streamed by every run."""
    task.check(cfg)
    d = cfg.data
    # Small sets, materialised once: transformed on the readers whatever transform.on says.
    transform = task.transform(cfg).model_copy(update={"on": "reader"})
    inputs = build_inputs(cfg, transform=transform)
    pipe, stats = inputs.pipeline, inputs.stats
    shape = pipe.sample_shape()
    uri = tracking_uri(cfg.tracking.uri)
    backbone = None
    if cfg.finetune.head != "baseline_cnn":
        backbone = resolve_backbone(
            cfg.finetune.backbone, uri, cfg.tracking.experiment, cfg.train.storage_options
        )
        backbone.check(cfg, shape)
    datasets, counts = {}, {}
    subsets = {}
    limits = {"train": cfg.finetune.max_train_samples, "val": cfg.finetune.max_val_samples}
    for split in ("train", "val", "test"):
        n = pipe.num_samples(split)
        if n == 0:
            raise ConfigError(f"the {split} split of {d.root} is empty: check data.split")
        subset = None
        limit = limits.get(split)
        if limit and limit < n:
            seed = cfg.finetune.dim_seed if split == "train" else [cfg.finetune.dim_seed, 1]
            subset = np.sort(np.random.default_rng(seed).permutation(n)[:limit])
            n = limit
        subsets[split] = subset
        counts[split] = n
    # float32 samples as the task's transform hands them over
    gb = sum(counts.values()) * int(np.prod(shape)) * 4 / 1e9
    materialize = gb <= cfg.finetune.materialize_max_gb
    for split in ("train", "val", "test"):
        ds = pipe.dataset(split, epoch=0, subset=subsets[split])
        if materialize:
            with pipe.frame_errors():
                ds = ds.materialize()
            counts[split] = ds.count()  # n, less the samples skipped
        datasets[split] = ds
    if not materialize:
        say(
            f"the splits take {gb:.1f} GB (> finetune.materialize_max_gb "
            f"{cfg.finetune.materialize_max_gb:g}): every run streams them from {d.root}"
        )
        return Prepared(shape, stats, backbone, datasets, counts, uri, None, pipe)
    return Prepared(shape, stats, backbone, datasets, counts, uri, pipe.skipped())


def train_head(
    cfg: Config,
    task: Task,
    prepared: Prepared,
    run_id: str | None,
    name: str,
    storage: str,
    callbacks: list | None = None,
    label: str = "",
):
    """One Ray Train run of the task's head on the prepared splits: validated and
    checkpointed every epoch, scored on the test split at the end."""
    fc, sc = cfg.finetune, cfg.scaling
    per_epoch = -(-(prepared.counts["train"] // sc.num_workers) // fc.batch_size)
    loop = loop_config(
        cfg,
        epochs=fc.epochs,
        schedule_steps=per_epoch * fc.epochs,
        lr=fc.lr,
        warmup_steps=max(1, per_epoch // 10),
        log_every=None,  # train, val and checkpoint at each epoch's end
        val_every=None,
        checkpoint_every=None,
        splits=("train", "val", "test"),
        batch_size=fc.batch_size,
        tracking_uri=prepared.tracking_uri,
        run_id=run_id,
        label=label,
    )
    objective = task.objective(cfg, prepared)
    return fit(
        name,
        storage,
        objective,
        loop,
        prepared.datasets,
        sc,
        max_failures=cfg.train.max_failures,
        keep_checkpoints=1,
        callbacks=callbacks,
        storage_options=cfg.train.storage_options,
    )


HEAD_SECTIONS = ("data", "transform", "finetune", "scaling")
"""The config sections that shape a head's run (``train`` and ``model`` are pretraining's)."""


def run_params(cfg: Config, prepared: Prepared, sections: tuple[str, ...] = HEAD_SECTIONS) -> dict:
    """A head run's params: the config ``sections`` that shaped it, the two ``train``
    settings a head uses, and the backbone and sample counts it got (the whole config is
    the run's ``config.yaml``)."""
    b = prepared.backbone
    return {
        **section_params(dump_config(cfg), sections),
        "train.seed": cfg.train.seed,
        "train.precision": cfg.train.precision,
        "derived.sample_shape": list(prepared.sample_shape),
        "derived.backbone": b.source if b else "none (from scratch)",
        **{f"derived.{k}_samples": v for k, v in prepared.counts.items()},
    }


def load_head(cfg: Config, task: Task, prepared: Prepared, checkpoint: str) -> nn.Module:
    """The trained head of a finished run's checkpoint (a folder or URL on the storage)."""
    import torch

    model = task.build_head(cfg, prepared.sample_shape, prepared.backbone)
    fs, path = open_url(join(checkpoint, MODEL_FILE), cfg.train.storage_options)
    with fs.open(path, "rb") as f:
        model.load_state_dict(torch.load(f, map_location="cpu"))
    return model.eval()


def finetune(cfg: Config, task_name: str) -> FinetuneResult:
    """Train the task's head once, logged to MLflow as one run tagged with its backbone."""
    task = get_task(task_name)
    prepared = prepare(cfg, task)
    storage = storage_path(cfg.train.storage_path)
    b = prepared.backbone
    tags = {
        "sdofm.task": f"finetune-{task.name}",
        "sdofm.head": cfg.finetune.head,
        "sdofm.backbone_run_id": (b.run_id or "") if b else "",
        "sdofm.backbone": b.source if b else "none",
    }
    uri, name = prepared.tracking_uri, cfg.finetune.run_name
    params = run_params(cfg, prepared)
    options = cfg.train.storage_options
    config = dump_config(cfg)
    with tracked_run(
        uri, cfg.finetune.experiment, name, storage, params, tags, options, config
    ) as run:
        fitted = train_head(cfg, task, prepared, run.run_id, name, storage)
        result = FinetuneResult(run.run_id, fitted.metrics, fitted.checkpoint)
        result.skipped = prepared.skipped
        log_skipped(uri, run.run_id, prepared.skipped)
        if run.run_id is not None and fitted.checkpoint:
            model = load_head(cfg, task, prepared, fitted.checkpoint)
            example = np.zeros((1, *prepared.sample_shape), np.float32)
            result.model_uri = log_model(uri, run.run_id, model, example, "regressor")
    return result
