"""Ray Tune sweep of a task's head: ASHA, random search (or Optuna), MLflow parent/child runs.

Ray 2.60 runs Ray Train V2, so a trial is a Tune *function* that drives its own
``TorchTrainer(...).fit()``; ``TuneReportCallback`` hands each epoch's report to Tune
(ASHA stops weak trials early). The splits are materialised once by the driver and
shared by every trial through the object store.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray.tune

from sdofm.config import Config, ConfigError, dump_config
from sdofm.console import say
from sdofm.engine import storage_path
from sdofm.engine.trainer import ray_storage, root_cause
from sdofm.finetuning.run import Prepared, load_head, prepare, run_params, train_head
from sdofm.finetuning.tasks import get_task
from sdofm.storage import join
from sdofm.tracking import (
    MODEL_URI_TAG,
    end_run,
    fallback_dir,
    find_run,
    log_model,
    log_skipped,
    log_text,
    set_tags,
    start_run,
    tracked_run,
)

TRIAL_RUN_ID = "mlflow_run_id"


def trial_run_name(sweep_name: str, trial_id: str) -> str:
    """The MLflow run name of a trial (how its run is found again, e.g. on ``--resume``)."""
    return f"{sweep_name}_{trial_id}"


def search_space(cfg: Config) -> dict:
    """``tune.space`` as Ray Tune sampling objects."""
    from ray import tune

    make = {"uniform": tune.uniform, "loguniform": tune.loguniform}
    space = {}
    for key, spec in cfg.tune.space.items():
        ((kind, values),) = spec.items()
        space[key] = tune.choice(values) if kind == "choice" else make[kind](*values)
    return space


def head_trial(
    params: dict, base: dict, task_name: str, prepared: Prepared, parent: str | None, storage: str
) -> None:
    """One trial: the base config with ``params`` in ``finetune``, trained by Ray Train,
    recorded as a child MLflow run of the sweep."""
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = Config.model_validate({**base, "finetune": {**base["finetune"], **params}})
    trial_id = ray.tune.get_context().get_trial_id()
    name = trial_run_name(cfg.tune.name, trial_id)
    uri = prepared.tracking_uri
    run_id = start_run(
        uri,
        cfg.finetune.experiment,
        name,
        storage,
        run_params(cfg, prepared),
        config=dump_config(cfg),
        tags={
            "mlflow.parentRunId": parent or "",
            "sdofm.task": f"tune-{task_name}-trial",
            "sdofm.head": cfg.finetune.head,
            **{f"sdofm.hp.{k}": str(v) for k, v in params.items()},
        },
    )
    # The run is ended by the driver (TrialEnds) once Tune has ended the trial: a trial
    # that ASHA stops is killed with its Ray Train run before it could end the run itself.
    task = get_task(task_name)
    train_head(
        cfg,
        task,
        prepared,
        run_id,
        name,
        storage,
        callbacks=[TuneReportCallback()],
        label=f"trial {trial_id}",
    )


ENDED = ("TERMINATED", "ERROR")
_last_status: dict[str, dict[str, str]] = {}
"""Sweep path -> {trial id: Tune status} as of the sweep's last step (see TrialEnds)."""


class TrialEnds(ray.tune.Callback):
    """In the sweep's driver: ends a trial's MLflow child run when Tune ends the trial
    (FINISHED after its test evaluation; FINISHED too when ASHA stopped it, with the reason
    in the ``sdofm.stopped`` tag: an early stop is a result, not a crash; FAILED on an
    error), and keeps every trial's status as of the last step.

    That status is the one Tune saves for ``--resume``: on Ctrl-C Tune saves its state,
    then marks the trials it stops TERMINATED, so the result grid cannot tell an
    interrupted trial from a finished one.
    """

    def __init__(
        self,
        uri: str,
        experiment: str,
        sweep_name: str,
        storage: str,
        path: str,
        storage_options: dict | None = None,
    ):
        self.uri, self.experiment = uri, experiment
        self.sweep_name, self.storage, self.path = sweep_name, storage, path
        self.storage_options = storage_options

    def on_step_end(self, iteration, trials, **info):
        _last_status[self.path] = {t.trial_id: t.status for t in trials}

    def _end(self, trial, status: str, reason: str | None = None) -> None:
        name = trial_run_name(self.sweep_name, trial.trial_id)
        run_id = (trial.last_result or {}).get(TRIAL_RUN_ID) or find_run(
            self.uri, self.experiment, name, self.storage
        )
        folder = fallback_dir(self.storage, name)
        end_run(self.uri, run_id, status, reason, folder, self.storage_options)

    def on_trial_complete(self, iteration, trials, trial, **info):
        # Tune calls this when a trial's function returns or the scheduler stops it, not
        # for the trials an interruption stops (those are KILLED by ``sweep``).
        result = trial.last_result or {}
        finished = any(k.startswith("test/") for k in result)
        epochs = result.get("epoch", "?")
        stopped = None if finished else f"asha early stop at epoch {epochs}"
        self._end(trial, "FINISHED", stopped)
        say(
            f"trial {trial.trial_id} {'finished' if finished else 'stopped early'} after {epochs} epochs"
        )

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, "FAILED")
        say(f"trial {trial.trial_id} failed")


@dataclass
class SweepResult:
    parent_run_id: str | None
    table: list[dict]
    """One row per trial, best first: hyperparameters, val/test metrics, status, run id."""
    best: dict | None
    model_uri: str | None
    path: str
    interrupted: bool = False
    """Stopped (Ctrl-C) before every trial ended: continue it with ``resume=True``."""
    skipped: object = None
    """The unusable frames skipped while the splits were read (a ``SkipReport``)."""


def sweep(
    cfg: Config,
    task_name: str,
    num_samples: int | None = None,
    max_concurrent: int | None = None,
    resume: bool = False,
) -> SweepResult:
    """Sweep the hyperparameters of task ``task_name``'s head; ``resume`` continues an
    interrupted sweep of the same ``tune.name`` (finished trials are kept, not rerun)."""
    tc = cfg.tune
    if num_samples is not None or max_concurrent is not None:
        cfg = cfg.model_copy(
            update={
                "tune": tc.model_copy(
                    update={
                        "num_samples": num_samples or tc.num_samples,
                        "max_concurrent": max_concurrent or tc.max_concurrent,
                    }
                )
            }
        )
        tc = cfg.tune
    space = search_space(cfg)  # invalid ranges were refused when the config was loaded
    task = get_task(task_name)
    if tc.metric not in task.sweep_metrics:
        raise ConfigError(
            f"tune.metric {tc.metric!r} is not what a {task.name} sweep minimises: "
            f"one of {', '.join(task.sweep_metrics)}"
        )
    storage = storage_path(cfg.train.storage_path)
    path = join(storage, tc.name)
    ray_path, ray_fs = ray_storage(storage, cfg.train.storage_options)
    ray_sweep = join(ray_path, tc.name)
    if resume and not ray.tune.Tuner.can_restore(ray_sweep, storage_filesystem=ray_fs):
        raise ConfigError(
            f"--resume: no sweep {tc.name!r} under {storage} (tune.name, train.storage_path)"
        )

    prepared = prepare(cfg, task)
    uri = prepared.tracking_uri
    params = run_params(cfg, prepared, ("tune", "finetune"))
    with tracked_run(
        uri,
        cfg.finetune.experiment,
        tc.name,
        storage,
        params,
        {"sdofm.task": f"tune-{task.name}"},
        cfg.train.storage_options,
        dump_config(cfg),
    ) as run:
        log_skipped(uri, run.run_id, prepared.skipped)
        trainable = ray.tune.with_resources(
            ray.tune.with_parameters(
                head_trial,
                base=dump_config(cfg),
                task_name=task.name,
                prepared=prepared,
                parent=run.run_id,
                storage=storage,
            ),
            {"cpu": tc.trial_cpus},
        )
        if resume:
            say(f"resuming sweep {tc.name!r} from {path}: finished trials are kept")
            tuner = ray.tune.Tuner.restore(
                ray_sweep,
                trainable,
                resume_errored=False,
                restart_errored=False,
                storage_filesystem=ray_fs,
            )
        else:
            tuner = _new_tuner(cfg, trainable, space, ray_path, ray_fs, uri, storage, path)
        grid = tuner.fit()
        return _collect(cfg, task, prepared, run, grid, storage, path)


def _new_tuner(cfg: Config, trainable, space: dict, ray_path, ray_fs, uri, storage, path):
    """The Tuner of a new sweep: its search, ASHA, and the callback that ends trials' runs."""
    from ray.tune.schedulers import ASHAScheduler

    tc = cfg.tune
    if tc.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError(
                "tune.search=optuna needs Optuna: pip install -e '.[optuna]'"
            ) from None
        search_alg = OptunaSearch(metric=tc.metric, mode="min", seed=cfg.train.seed)
    else:  # seeded: the same config samples the same trials
        from ray.tune.search import BasicVariantGenerator

        search_alg = BasicVariantGenerator(
            random_state=cfg.train.seed, max_concurrent=tc.max_concurrent
        )
    ends = TrialEnds(
        uri, cfg.finetune.experiment, tc.name, storage, path, cfg.train.storage_options
    )
    return ray.tune.Tuner(
        trainable,
        param_space=space,
        tune_config=ray.tune.TuneConfig(
            num_samples=tc.num_samples,
            max_concurrent_trials=tc.max_concurrent,
            search_alg=search_alg,
            scheduler=ASHAScheduler(
                metric=tc.metric,
                mode="min",
                time_attr="epoch",
                # Past the last epoch: Tune would otherwise stop a trial on its final
                # report, before its Ray Train run has shut down and released its CPUs.
                max_t=cfg.finetune.epochs + 1,
                grace_period=min(tc.grace_period, cfg.finetune.epochs),
                reduction_factor=tc.reduction_factor,
            ),
        ),
        run_config=ray.tune.RunConfig(
            name=tc.name,
            storage_path=ray_path,
            storage_filesystem=ray_fs,
            failure_config=ray.tune.FailureConfig(max_failures=0),
            callbacks=[ends],
            verbose=0,  # the trials' progress lines and the final table say it all
        ),
    )


def _collect(cfg: Config, task, prepared: Prepared, run, grid, storage: str, path: str):
    """The sweep's result from Tune's grid: the trials' table (logged to the parent run),
    and the best head logged as a model; an interrupted sweep ends its runs KILLED."""
    tc, uri, options = cfg.tune, prepared.tracking_uri, cfg.train.storage_options
    parent = run.run_id
    # Ctrl-C: Tune saved its state and returned with trials that have not ended.
    status = _last_status.pop(path, {})
    unended = {t for t, s in status.items() if s not in ENDED}
    interrupted = bool(unended)
    scores = [f"test/{c}" for c in task.columns]
    table = trial_table(grid, tc.metric, list(tc.space), scores, unended)
    for row in table:  # a trial that failed before its first report: find its run by name
        if not row["run_id"]:
            name = trial_run_name(tc.name, row["trial"])
            row["run_id"] = find_run(uri, cfg.finetune.experiment, name, storage) or ""
    text = format_table(table, tc.metric)
    log_text(uri, parent, text, "trials.txt")
    if interrupted:
        for row in table:  # the trials Tune had not ended; --resume reopens their runs
            if row["status"] == "unfinished":
                folder = fallback_dir(storage, trial_run_name(tc.name, row["trial"]))
                end_run(
                    uri, row["run_id"] or None, "KILLED", folder=folder, storage_options=options
                )
        run.end_as("KILLED")
        say(f"sweep {tc.name!r} interrupted; continue it with --resume (finished trials are kept)")
        return SweepResult(parent, table, None, None, path, True, prepared.skipped)
    best = next((r for r in table if r["status"] == "finished"), None)
    model_uri = None
    if best is not None and best["run_id"] and best.get("checkpoint"):
        best_cfg = Config.model_validate(
            {**dump_config(cfg), "finetune": {**dump_config(cfg.finetune), **best["params"]}}
        )
        model = load_head(best_cfg, task, prepared, best["checkpoint"])
        example = np.zeros((1, *prepared.sample_shape), np.float32)
        # From the winning trial's run: the model shows that trial's settings and scores.
        model_uri = log_model(uri, best["run_id"], model, example, "best_head")
        tags = {"sdofm.best_run_id": best["run_id"], MODEL_URI_TAG: model_uri}
        set_tags(uri, parent, tags, run.folder, options)
    return SweepResult(parent, table, best, model_uri, path, skipped=prepared.skipped)


def _trial_id(path: str | None) -> str:
    """``.../head_trial_ab123_00002_2_batch_size=8,...`` -> ``ab123_00002``."""
    parts = Path(path).name.split("_") if path else []
    return "_".join(parts[2:4]) if len(parts) >= 4 else "?"


def trial_table(
    grid, metric: str, keys: list[str], scores: list[str], unended: set[str] = frozenset()
) -> list[dict]:
    """Rows of a Tune result grid, the best finished trial first. ``keys``: the swept
    settings; ``scores``: the test metrics a finished trial reports; ``unended``: ids of the
    trials that an interruption left running or pending."""
    rows = []
    for r in grid:
        m = r.metrics or {}
        trial = m.get("trial_id") or _trial_id(r.path)
        if r.error is not None:
            status = "error"
        elif trial in unended:
            status = "unfinished"
        elif any(m.get(k) is not None for k in scores):
            status = "finished"
        else:
            status = "stopped early"  # ASHA ended it before its last epoch
        ckpt = m.get("checkpoint_url")  # with its scheme, unlike Tune's checkpoint_path
        rows.append(
            {
                "trial": trial,
                "params": {k: (r.config or {}).get(k) for k in keys},
                "epochs": m.get("epoch"),
                metric: m.get(metric),
                **{k: m.get(k) for k in scores},
                "status": status,
                "run_id": m.get(TRIAL_RUN_ID) or "",
                "checkpoint": ckpt if status == "finished" else None,
                "error": root_cause(r.error) if r.error is not None else "",
            }
        )

    def key(row):
        v = row[metric]
        return (row["status"] != "finished", math.inf if v is None else v)

    return sorted(rows, key=key)


def format_table(rows: list[dict], metric: str) -> str:
    """A plain-text table of the trials (printed and logged to the parent run)."""

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)

    keys = list(rows[0]["params"]) if rows else []
    scores = [k for k in rows[0] if k.startswith("test/")] if rows else []
    head = ["trial", *keys, "epochs", metric, *scores, "status"]
    body = [
        [
            r["trial"][:28],
            *(fmt(r["params"][k]) for k in keys),
            fmt(r["epochs"]),
            fmt(r[metric]),
            *(fmt(r[k]) for k in scores),
            r["status"],
        ]
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    failed = [f"trial {r['trial']} failed: {r['error']}" for r in rows if r["status"] == "error"]
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body), *failed])
