"""The driver side of the engine: one ``TorchTrainer`` set-up for pretraining, finetuning and
every trial of a sweep."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from sdofm import console
from sdofm.engine.checkpoint import Latest, latest_checkpoint
from sdofm.engine.loop import LoopConfig, train_loop_per_worker
from sdofm.engine.objective import Objective
from sdofm.storage import open_url
from sdofm.tracking import fallback_dir


@dataclass
class FitResult:
    """What one ``TorchTrainer.fit()`` left."""

    metrics: dict
    """The last metrics reported by rank 0."""
    checkpoint: str | None
    """The newest complete checkpoint: a folder, or a URL when the storage is remote."""


class RunFailedError(RuntimeError):
    """A run failed with no restarts left; the message says how to resume it."""


def storage_path(path: str) -> str:
    """A storage path as Ray wants it: a URI, or an absolute local path."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def ray_storage(storage: str, storage_options: dict | None):
    """``storage`` -> (``storage_path``, ``storage_filesystem``) for Ray's ``RunConfig``.

    With ``storage_options`` (an S3-compatible endpoint, keys) Ray writes through the same
    fsspec filesystem as sdofm, and wants the path without its scheme."""
    if "://" not in storage or not storage_options:
        return storage, None
    import pyarrow.fs

    fs, root = open_url(storage, storage_options)
    return root, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def root_cause(error: BaseException | str) -> str:
    """The last ``SomeError: message`` line of a (Ray-wrapped) error, without the wrappers'
    names (``RunFailedError: RuntimeError: x`` -> ``RuntimeError: x``)."""
    lines = str(error).splitlines()
    pattern = r"\s*[A-Za-z_][\w.]*(Error|Exception)\b"
    causes = [ln.strip() for ln in lines if re.match(pattern, ln)]
    line = causes[-1] if causes else lines[0] if lines else repr(error)
    while m := re.match(r"[\w.]+(?:Error|Exception): ([\w.]*(?:Error|Exception)\b.*)", line):
        line = m.group(1)
    return line[:200]


def _restarts_callback(name: str, storage: str, storage_options: dict, max_failures: int):
    import ray.train

    class Restarts(ray.train.UserCallback):
        """On Ray Train's controller: one console line per worker-group failure (which
        workers, restart k of n, from which step)."""

        def __init__(self):
            self.failures = 0

        def after_exception(self, run_context, worker_exceptions):
            self.failures += 1
            ranks = ", ".join(str(r) for r in sorted(worker_exceptions))
            cause = root_cause(next(iter(worker_exceptions.values()))) if worker_exceptions else ""
            latest = latest_checkpoint(storage, name, storage_options)
            step = latest.step if latest else 0
            n = "unlimited" if max_failures < 0 else str(max_failures)
            if max_failures < 0 or self.failures <= max_failures:
                console.say(
                    f"worker rank {ranks} failed ({cause}); restart {self.failures} of {n} "
                    f"from step {step}"
                )
            else:
                console.say(f"worker rank {ranks} failed ({cause}); no restarts left ({n})")

    return Restarts()


def _how_to_resume(name: str, storage: str, latest: Latest | None, max_failures: int, e) -> str:
    where = (
        f"its newest complete checkpoint is step {latest.step} ({latest.url})"
        if latest
        else "it has no checkpoint yet, so it starts again from step 0"
    )
    return (
        f"{root_cause(e)}\nrun {name!r} failed with no restarts left (train.max_failures="
        f"{max_failures}); {where}. Resume it by running the same command again (the same "
        f"train.run_name={name} and train.storage_path={storage}); a larger train.max_failures "
        "lets it restart by itself."
    )


def ingest_config(ordered: bool):
    """Ray Train's dataset split: every dataset split over the workers, with Ray Data's
    order preserved when ``ordered``: blocks then leave in the plan's order and each goes to
    the worker that has received the fewest rows so far, so the same blocks reach the same
    worker in the same order every run (otherwise whichever block is read first goes
    first, to whichever worker asks first)."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = ordered
    return ray.train.DataConfig(execution_options=options)


def resolve_use_gpu(use_gpu: bool | str) -> bool:
    """``scaling.use_gpu``, with ``auto`` meaning: the Ray cluster has GPUs."""
    import ray

    if use_gpu != "auto":
        return bool(use_gpu)
    return ray.cluster_resources().get("GPU", 0) > 0


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
    storage_options: dict | None = None,
) -> FitResult:
    """Train ``objective`` with Ray Train: ``scaling`` (the ``scaling`` config section) sets the
    workers; a run of the same ``name`` under ``storage`` (a folder or fsspec URL, reached
    with ``storage_options``) continues from its newest complete checkpoint."""
    import ray.train
    from ray.train.torch import TorchTrainer

    options = dict(storage_options or {})
    loop = replace(
        loop,
        run_name=name,
        storage=storage,
        storage_options=options,
        fallback_dir=loop.fallback_dir or fallback_dir(storage, name),
    )
    ray_path, ray_fs = ray_storage(storage, options)
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
            storage_path=ray_path,
            storage_filesystem=ray_fs,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints),
            # Ray Train's own per-report INFO lines would bury the loop's progress lines.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=[
                _restarts_callback(name, storage, options, max_failures),
                *(callbacks or []),
            ],
        ),
        datasets=datasets,
        dataset_config=ingest_config(loop.ordered),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        latest = latest_checkpoint(storage, name, options)
        raise RunFailedError(_how_to_resume(name, storage, latest, max_failures, e)) from e
    finally:
        console.flush()  # the workers' last lines before the caller's summary
    latest = latest_checkpoint(storage, name, options)
    return FitResult(dict(result.metrics or {}), latest.url if latest else None)
