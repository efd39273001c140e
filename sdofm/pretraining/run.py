"""The pretraining driver: data, objective and run set-up around one engine ``fit``.

Shared by ``sdofm pretrain`` and ``ray_jobs/pretrain.py``; Ray must be initialised by the
caller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sdofm.config import Config, dump_config
from sdofm.console import say
from sdofm.datasets.device import device_transform
from sdofm.datasets.inputs import build_inputs
from sdofm.engine import fit, loop_config, storage_path
from sdofm.engine.checkpoint import MODEL_FILE, latest_checkpoint
from sdofm.engine.objective import Schedule
from sdofm.models.mae import count_parameters
from sdofm.pretraining.objective import make_objective
from sdofm.storage import open_url
from sdofm.tracking import (
    CHECKPOINT_TAG,
    MODEL_URI_TAG,
    guarded,
    log_model,
    log_skipped,
    section_params,
    set_tags,
    tracked_run,
    tracking_uri,
)

if TYPE_CHECKING:
    from sdofm.datasets.blocks import SkipReport


@dataclass
class PretrainResult:
    """Where a finished pretraining left its results."""

    run_name: str
    checkpoint: str
    """The last checkpoint (a folder or URI with model.pt, optimizer.pt, state.json)."""
    metrics: dict
    """The last metrics reported by rank 0."""
    tracking_uri: str
    run_id: str | None
    """The MLflow run (None when the tracking store could not be reached)."""
    model_uri: str | None
    """The encoder logged as an MLflow model."""
    skipped: SkipReport | None = None
    """The unusable frames the readers skipped, each once, and the samples they cost."""


PRETRAIN_SECTIONS = ("data", "transform", "loader", "model", "train", "scaling")
"""The config sections that shape a pretraining run: its params (the whole config is the
run's ``config.yaml``)."""


def effective_batch(cfg: Config) -> int:
    """Samples per optimiser step: batch per worker x workers x accumulation."""
    return cfg.loader.batch_size * cfg.scaling.num_workers * cfg.train.grad_accum


def peak_lr(cfg: Config) -> float:
    """MAE's rule: ``train.lr x effective batch / train.lr_batch``."""
    return cfg.train.lr * effective_batch(cfg) / cfg.train.lr_batch


def plan_steps(cfg: Config, n_train: int) -> tuple[int, int]:
    """-> (optimiser steps per epoch, total steps) for ``n_train`` samples.

    Each worker gets ``n_train // workers`` samples (shards are equalised) in batches of
    ``loader.batch_size``; ``grad_accum`` batches make one step.
    """
    world, lc, tc = cfg.scaling.num_workers, cfg.loader, cfg.train
    per_epoch = math.ceil(n_train // world / lc.batch_size) // tc.grad_accum
    if per_epoch == 0:
        raise ValueError(
            f"{n_train} train samples give no optimiser step with {world} workers x batch "
            f"{lc.batch_size} x grad_accum {tc.grad_accum}; lower loader.batch_size or train.grad_accum"
        )
    total = per_epoch * tc.epochs
    return per_epoch, min(total, tc.max_steps) if tc.max_steps else total


def pretrain(cfg: Config) -> PretrainResult:
    """Pretrain ``cfg.model`` on ``cfg.data`` with Ray Train; continue the run of the same
    name from its last checkpoint; log to MLflow; return where everything is."""
    import torch

    d, tc, sc = cfg.data, cfg.train, cfg.scaling
    inputs = build_inputs(cfg)
    pipe, stats = inputs.pipeline, inputs.stats
    shape = pipe.sample_shape()
    image_transform = device_transform(d, cfg.transform, shape[-1], stats)
    objective = make_objective(cfg, shape, stats)
    model = objective.build_model()
    n_train, n_val = pipe.num_samples("train"), pipe.num_samples("val")
    per_epoch, total = plan_steps(cfg, n_train)
    storage = storage_path(tc.storage_path)
    derived = {
        "derived.world_size": sc.num_workers,
        "derived.effective_batch": effective_batch(cfg),
        **{
            f"derived.peak_lr{'' if name == 'model' else '_' + name}": schedule.lr
            for name, schedule in objective.schedules(Schedule(peak_lr(cfg))).items()
        },
        "derived.parameters": count_parameters(model),
        "derived.tokens_per_sample": objective.tokens_per_sample(model),
        "derived.sample_shape": list(shape),
        "derived.train_samples": n_train,
        "derived.val_samples": min(n_val, tc.val_samples),
        "derived.steps_per_epoch": per_epoch,
        "derived.total_steps": total,
    }
    if d.num_frames > 1:  # steps that end no complete window (a gap within it, the split's start)
        for split in ("train", "val"):
            derived[f"derived.{split}_windows_dropped"] = pipe.dropped_windows(split)
    derived = {k: v for k, v in derived.items() if v is not None}
    items = [f"{k[len('derived.') :]} {v}" for k, v in derived.items()]
    say(" | ".join(items[:5]))
    say(" | ".join(items[5:]))
    options = tc.storage_options
    resume = latest_checkpoint(storage, tc.run_name, options)
    if resume:
        say(f"continuing run {tc.run_name!r} from step {resume.step} ({resume.url})")

    # The workers set the data's epoch from the checkpoint they resume from.
    datasets = {"train": pipe.dataset("train")}
    if n_val:
        subset = np.sort(
            np.random.default_rng(tc.seed).permutation(n_val)[: min(n_val, tc.val_samples)]
        )
        datasets["val"] = pipe.dataset("val", epoch=0, subset=subset)
    uri = tracking_uri(cfg.tracking.uri)
    config = dump_config(cfg)
    params = {**section_params(config, PRETRAIN_SECTIONS), **derived}
    tags = {"sdofm.task": "pretrain", "sdofm.model": cfg.model.name}
    with tracked_run(
        uri, cfg.tracking.experiment, tc.run_name, storage, params, tags, options, config
    ) as run:
        run_id = run.run_id
        loop = loop_config(
            cfg,
            epochs=tc.epochs,
            schedule_steps=total,
            max_steps=total,
            lr=peak_lr(cfg),
            warmup_steps=tc.warmup_steps,
            log_every=tc.log_every,
            val_every=tc.val_every,
            checkpoint_every=tc.checkpoint_every,
            splits=tuple(datasets),
            batch_size=cfg.loader.batch_size,
            tracking_uri=uri,
            run_id=run_id,
            epoch_registries={"train": pipe.registry("train")},
            image_transform=image_transform,
        )
        with pipe.frame_errors():
            result = fit(
                tc.run_name,
                storage,
                objective,
                loop,
                datasets,
                sc,
                max_failures=tc.max_failures,
                keep_checkpoints=tc.keep_checkpoints,
                storage_options=options,
            )
        skipped = pipe.skipped()
        log_skipped(uri, run_id, skipped)
        if result.checkpoint is None:
            raise RuntimeError(f"run {tc.run_name!r} finished without a checkpoint")
        model_uri = None
        if run_id is not None and cfg.tracking.log_model:
            fs, path = open_url(f"{result.checkpoint}/{MODEL_FILE}", options)
            with fs.open(path, "rb") as f:
                model.load_state_dict(torch.load(f, map_location="cpu"))
            encoder = model.encoder().eval()
            # The encoder's own frames (a forecaster's inputs are a window's first frames).
            C, _, *hw = shape
            example = np.zeros((1, C, encoder.encoder_config["num_frames"], *hw), np.float32)
            # The checkpoint holds the weights anyway: a failure is a warning.
            model_uri = guarded(
                uri,
                "log the encoder to MLflow",
                lambda _: log_model(uri, run_id, encoder, example),
                on_error=lambda e: say(f"warning: could not log the encoder to MLflow: {e}"),
            )
        # Finetuning finds the backbone of a run through these tags.
        set_tags(
            uri,
            run_id,
            {CHECKPOINT_TAG: result.checkpoint, MODEL_URI_TAG: model_uri or ""},
            run.folder,
            options,
        )
    return PretrainResult(
        run_name=tc.run_name,
        checkpoint=result.checkpoint,
        metrics=result.metrics,
        tracking_uri=uri,
        run_id=run_id,
        model_uri=model_uri,
        skipped=skipped,
    )
