"""The driver side of the engine: one ``TorchTrainer`` set-up and one MLflow run set-up for
pretraining, finetuning and every trial of a sweep."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sdofm.engine import progress
from sdofm.engine.loop import LoopConfig, train_loop_per_worker
from sdofm.engine.objective import Objective


@dataclass
class FitResult:
    """What one ``TorchTrainer.fit()`` left."""

    metrics: dict
    """The last metrics reported by rank 0."""
    checkpoint: str | None
    """The last checkpoint: a folder, or a URI when the storage is remote."""


def storage_path(path: str) -> str:
    """A storage path as Ray wants it: a URI, or an absolute local path."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def resolve_use_gpu(use_gpu: bool | str) -> bool:
    """``scaling.use_gpu``, with ``auto`` meaning: the Ray cluster has GPUs."""
    import ray

    if use_gpu != "auto":
        return bool(use_gpu)
    return ray.cluster_resources().get("GPU", 0) > 0


@contextmanager
def tracked_run(
    uri: str, experiment: str, name: str, storage: str, params: dict, tags: dict
) -> Iterator[str | None]:
    """The MLflow run of ``name`` (reopened when it exists), marked FINISHED when the block
    ends and FAILED (KILLED on Ctrl-C) when it raises. Yields the run id (None when the
    tracking store cannot be reached: the workers then keep metrics locally)."""
    from sdofm import tracking

    run_id = tracking.start_run(uri, experiment, name, storage, params, tags)
    try:
        yield run_id
    except KeyboardInterrupt:
        tracking.end_run(uri, run_id, "KILLED")
        raise
    except BaseException:
        tracking.end_run(uri, run_id, "FAILED")
        raise
    tracking.end_run(uri, run_id, "FINISHED")


def fit(
    name: str,
    storage: str,
    objective: Objective,
    loop: LoopConfig,
    datasets: dict,
    scaling,
    max_failures: int = 0,
    keep_checkpoints: int = 2,
    callbacks: list | None = None,
) -> FitResult:
    """Train ``objective`` with Ray Train: ``scaling`` (the ``scaling`` config section) sets the
    workers; a run of the same ``name`` under ``storage`` continues from its last checkpoint."""
    import ray.train
    from ray.train.torch import TorchTrainer

    use_gpu = resolve_use_gpu(scaling.use_gpu)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"loop": loop, "objective": objective},
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={
                "CPU": scaling.cpus_per_worker,
                **({"GPU": 1} if use_gpu else {}),
            },
            placement_strategy=scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints),
            # Ray Train's own per-report INFO lines would bury the loop's progress lines.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=callbacks or [],
        ),
        datasets=datasets,
    )
    try:
        result = trainer.fit()
    finally:
        progress.flush()  # the workers' last lines before the caller's summary
    checkpoint = result.checkpoint.path if result.checkpoint else None
    if checkpoint and "://" in storage and "://" not in checkpoint:
        checkpoint = f"{storage.split('://')[0]}://{checkpoint}"  # Ray drops the scheme
    return FitResult(dict(result.metrics or {}), checkpoint)
