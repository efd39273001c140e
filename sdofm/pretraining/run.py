"""The pretraining driver: data, model and run set-up around one ``TorchTrainer.fit()``.

Shared by ``sdofm pretrain`` and ``ray_jobs/pretrain.py``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdofm.config import Config, dump_config
from sdofm.pretraining.loop import (
    CHECKPOINT_STATE,
    build_model,
    effective_batch,
    peak_lr,
    say,
    train_loop_per_worker,
)


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


def storage_path(cfg: Config) -> str:
    """``train.storage_path`` as Ray wants it: a URI, or an absolute local path."""
    path = cfg.train.storage_path
    return path if "://" in path else str(Path(path).expanduser().resolve())


def latest_checkpoint_state(storage: str, name: str) -> dict | None:
    """``state.json`` of the newest checkpoint of run ``name`` under ``storage`` (None: none)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(f"{storage.rstrip('/')}/{name}")
    found = sorted(fs.glob(f"{root}/checkpoint_*/{CHECKPOINT_STATE}"))
    if not found:
        return None
    with fs.open(found[-1]) as f:
        return json.load(f)


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
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from sdofm import tracking
    from sdofm.datasets.index import load_or_build_index
    from sdofm.datasets.pipeline import SDOMLPipeline
    from sdofm.datasets.stats import load_or_compute_stats
    from sdofm.models.mae import count_parameters
    from sdofm.runtime import init_ray, resolve_use_gpu
    from sdofm.tracking import CHECKPOINT_TAG, MODEL_URI_TAG

    init_ray(log_to_driver=True, dashboard=True)
    table, _ = load_or_build_index(cfg.data)
    stats = (
        load_or_compute_stats(cfg.data, cfg.transform, cfg.loader, table)
        if cfg.transform.zscore
        else None
    )
    pipe = SDOMLPipeline(cfg.data, cfg.transform, cfg.loader, table, stats)
    shape = pipe.sample_shape()
    model = build_model(cfg, shape)
    n_train, n_val = pipe.num_samples("train"), pipe.num_samples("val")
    per_epoch, total = plan_steps(cfg, n_train)

    sc, tc = cfg.scaling, cfg.train
    use_gpu = resolve_use_gpu(cfg)
    storage = storage_path(cfg)
    resume = latest_checkpoint_state(storage, tc.run_name)
    derived = {
        "derived.world_size": sc.num_workers,
        "derived.effective_batch": effective_batch(cfg),
        "derived.peak_lr": peak_lr(cfg),
        "derived.parameters": count_parameters(model),
        "derived.tokens_per_sample": model.num_patches,
        "derived.sample_shape": list(shape),
        "derived.train_samples": n_train,
        "derived.val_samples": min(n_val, tc.val_samples),
        "derived.steps_per_epoch": per_epoch,
        "derived.total_steps": total,
        "derived.use_gpu": use_gpu,
    }
    for k, v in derived.items():
        say(f"{k[len('derived.') :]}: {v}")
    uri = tracking.tracking_uri(cfg.tracking.uri)
    run_id = tracking.start_run(
        uri,
        cfg.tracking.experiment,
        tc.run_name,
        storage,
        params={**tracking.flatten(dump_config(cfg)), **derived},
        tags={"sdofm.task": "pretrain", "sdofm.model": cfg.model.name},
    )
    if resume:
        say(f"continuing run {tc.run_name!r} from step {resume['step']}")

    datasets = {"train": pipe.dataset("train", first_epoch=resume["epoch"] if resume else 0)}
    if n_val:
        subset = np.sort(
            np.random.default_rng(tc.seed).permutation(n_val)[: min(n_val, tc.val_samples)]
        )
        datasets["val"] = pipe.dataset("val", epoch=0, subset=subset)
    fallback = tracking.fallback_dir(storage, tc.run_name)
    resources = {"CPU": sc.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": dump_config(cfg),
            "sample_shape": list(shape),
            "total_steps": total,
            "tracking_uri": uri,
            "run_id": run_id,
            "fallback_dir": str(fallback),
            "has_val": bool(n_val),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=sc.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            placement_strategy=sc.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=tc.run_name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.keep_checkpoints),
            # Ray Train's own per-report INFO lines would bury the loop's progress lines.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        datasets=datasets,
    )
    try:
        result = trainer.fit()
    except BaseException:
        tracking.end_run(uri, run_id, "FAILED")
        raise
    if result.checkpoint is None:
        tracking.end_run(uri, run_id, "FAILED")
        raise RuntimeError(f"run {tc.run_name!r} finished without a checkpoint")

    model_uri = None
    if run_id is not None and cfg.tracking.log_model:
        import torch

        with result.checkpoint.as_directory() as d:
            model.load_state_dict(torch.load(Path(d) / "model.pt", map_location="cpu"))
        example = np.zeros((1, *shape), np.float32)
        try:
            model_uri = tracking.log_model(uri, run_id, model.encoder().eval(), example)
        except Exception as e:  # noqa: BLE001 - the checkpoint holds the weights anyway
            say(f"warning: could not log the encoder to MLflow: {e}")
    ckpt = result.checkpoint.path
    if "://" in storage and "://" not in ckpt:
        ckpt = f"{storage.split('://')[0]}://{ckpt}"
    # Finetuning finds the backbone of a run through these tags.
    tracking.set_tags(uri, run_id, {CHECKPOINT_TAG: ckpt, MODEL_URI_TAG: model_uri or ""})
    tracking.end_run(uri, run_id, "FINISHED")
    return PretrainResult(
        run_name=tc.run_name,
        checkpoint=ckpt,
        metrics=dict(result.metrics or {}),
        tracking_uri=uri,
        run_id=run_id,
        model_uri=model_uri,
    )
