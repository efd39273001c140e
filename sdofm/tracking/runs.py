"""One run life cycle, from the driver: a run is started (or reopened when resumed) with
its params, tags and config, logged to, and ended with a status (and the reason, when an
early stop ends it FINISHED anyway). Pretraining, a head, a sweep and its trials, the
scoreboard and embeddings all go through it; :func:`tracked_run` is the whole cycle around
a block of work.

Every call is guarded (:mod:`sdofm.tracking.guard`): an unreachable store is a warning,
and what the driver could not tell it waits in the run's tracking folder for
``sdofm mlflow sync`` (:mod:`sdofm.tracking.sync`).
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sdofm.console import say
from sdofm.tracking.guard import guarded, ignore
from sdofm.tracking.sync import fallback_dir, keep_for_sync, kept_locally

RUN_NAME_TAG = "sdofm.run_name"
STORAGE_TAG = "sdofm.storage"
CHECKPOINT_TAG = "sdofm.checkpoint"
MODEL_URI_TAG = "sdofm.model_uri"
STOPPED_TAG = "sdofm.stopped"
"""Why a run that ended before its last epoch is FINISHED anyway (an early stop, not a crash)."""
CONFIG_ARTIFACT = "config.yaml"
"""The whole resolved config of a run (its params hold only the sections that shaped it)."""
SKIPPED_TABLE = "skipped_frames.json"
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
"""Tells MLflow 3's UI that an experiment holds training runs (its Runs and Models tabs),
not GenAI traces."""


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"train.lr": "0.00015", ...} (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if not isinstance(v, str) else v
    return out


def section_params(config: dict, sections: tuple[str, ...]) -> dict[str, str]:
    """The flattened params of the config ``sections`` that shaped a run (``config``: the
    whole config as ``dump_config`` gives it)."""
    return flatten({k: config[k] for k in sections if k in config})


def _yaml(config: dict) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False)


def _search(client, exp_id: str, run_name: str, storage: str):
    return client.search_runs(
        [exp_id],
        filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}' and tags.`{STORAGE_TAG}` = '{storage}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )


def find_run(uri: str, experiment: str, run_name: str, storage: str) -> str | None:
    """The id of the run ``start_run`` made for (run_name, storage), or None (also when the
    store cannot be reached)."""

    def find(client):
        exp = client.get_experiment_by_name(experiment)
        found = _search(client, exp.experiment_id, run_name, storage) if exp else []
        return found[0].info.run_id if found else None

    return guarded(uri, "find a run", find, on_error=ignore)


def start_run(
    uri: str,
    experiment: str,
    run_name: str,
    storage: str,
    params: dict[str, Any],
    tags: dict[str, str] | None = None,
    config: dict | None = None,
) -> str | None:
    """Create the MLflow run of ``run_name`` (or reopen it when resuming) -> run id.

    A run is reopened when one in ``experiment`` carries the same run name and storage
    tags. ``config``, the whole resolved config, is logged as ``config.yaml``. Returns None
    (after a warning) when the tracking store cannot be reached.
    """

    def start(client) -> str:
        from mlflow.entities import Param

        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            exp_id = client.create_experiment(experiment, tags=EXPERIMENT_KIND)
        else:
            exp_id = exp.experiment_id
            for k, v in EXPERIMENT_KIND.items():  # an experiment made before sdofm set it
                if k not in exp.tags:
                    client.set_experiment_tag(exp_id, k, v)
        found = _search(client, exp_id, run_name, storage)
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            client.set_tag(run_id, "sdofm.resumed", "true")
        else:
            run_id = client.create_run(
                exp_id,
                run_name=run_name,
                tags={RUN_NAME_TAG: run_name, STORAGE_TAG: storage, **(tags or {})},
            ).info.run_id
            items = sorted(params.items())
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                batch = [Param(k, str(v)[:6000]) for k, v in items[i : i + 100]]
                client.log_batch(run_id, params=batch)
        if config is not None:
            client.log_text(run_id, _yaml(config), CONFIG_ARTIFACT)
        return run_id

    def unreachable(e: Exception) -> None:
        warnings.warn(
            f"MLflow tracking store {uri} cannot be reached ({type(e).__name__}: {e}); "
            "training goes on and metrics are kept locally",
            stacklevel=4,
        )

    return guarded(uri, "start a run", start, on_error=unreachable)


def set_tags(
    uri: str,
    run_id: str | None,
    tags: dict[str, str],
    folder: str | None = None,
    storage_options: dict | None = None,
) -> bool:
    """Tag a run from the driver -> whether it was tagged. When the store cannot be reached
    (a warning), the tags wait in the run's tracking ``folder``, when given, for
    ``sdofm mlflow sync``."""
    if run_id is None:
        return False

    def send(client) -> bool:
        for k, v in tags.items():
            client.set_tag(run_id, k, v)
        return True

    if guarded(uri, f"tag MLflow run {run_id}", send, default=False):
        return True
    if folder is not None:
        keep_for_sync(folder, uri, run_id, tags=tags, storage_options=storage_options)
    return False


def log_text(uri: str, run_id: str | None, text: str, artifact_file: str) -> None:
    """A text artifact from the driver (a warning when the store cannot be reached)."""
    if run_id is not None:
        guarded(
            uri,
            f"log {artifact_file} to MLflow run {run_id}",
            lambda c: c.log_text(run_id, text, artifact_file),
        )


def log_metrics(uri: str, run_id: str | None, metrics: dict[str, float], step: int = 0) -> None:
    """Metrics from the driver in one batch (a warning when the store cannot be reached)."""
    if run_id is None or not metrics:
        return
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()]

    def send(client) -> None:
        for i in range(0, len(items), 1000):
            client.log_batch(run_id, metrics=items[i : i + 1000])

    guarded(uri, f"log metrics to MLflow run {run_id}", send)


def log_skipped(uri: str, run_id: str | None, report) -> None:
    """What a run's data readers skipped (a :class:`~sdofm.datasets.blocks.SkipReport`):
    metrics ``data/skipped_frames`` and ``data/skipped_samples`` (0 when nothing was) and,
    when something was, the table ``skipped_frames.json`` (store, year, channel, frame,
    reason). A warning when the store cannot be reached."""
    if run_id is None:
        return
    counts = {
        "data/skipped_frames": report.num_frames,
        "data/skipped_samples": report.num_samples(),
    }
    log_metrics(uri, run_id, counts)
    if not report:
        return
    import pandas as pd

    guarded(
        uri,
        f"log skipped frames to MLflow run {run_id}",
        lambda c: c.log_table(run_id, pd.DataFrame(report.rows()), SKIPPED_TABLE),
    )


def end_run(
    uri: str,
    run_id: str | None,
    status: str = "FINISHED",
    reason: str | None = None,
    folder: str | None = None,
    storage_options: dict | None = None,
) -> bool:
    """Mark the run FINISHED / FAILED / KILLED, with ``reason`` as its ``sdofm.stopped`` tag
    when given -> whether it was marked (a warning when the store cannot be reached).

    ``folder``: the run's tracking folder. When the run's end could not be told, or its
    rank 0 lost the server during the run, the end is kept there with the metrics, and
    the console says how to merge them once the server is back."""
    if run_id is None:
        return False
    tags = {STOPPED_TAG: reason} if reason else {}

    def end(client) -> bool:
        for k, v in tags.items():
            client.set_tag(run_id, k, v)
        client.set_terminated(run_id, status=status)
        return True

    ended = guarded(uri, f"mark MLflow run {run_id} {status}", end, default=False)
    if folder is not None and (not ended or kept_locally(folder, storage_options)):
        keep_for_sync(folder, uri, run_id, status, tags, storage_options)
        say(
            f"MLflow ({uri}) was lost during the run: its metrics, figures and end "
            f"({status}) are kept in {folder}; once the server is back: "
            f"sdofm mlflow sync {folder}"
        )
    return ended


@dataclass
class Run:
    """A run of :func:`tracked_run` and how it will end."""

    uri: str
    run_id: str | None
    """None when the tracking store could not be reached: the workers keep metrics locally."""
    folder: str
    """Its tracking folder (:func:`~sdofm.tracking.sync.fallback_dir`)."""
    status: str = "FINISHED"
    """What the run ends with when the block ends without an error."""
    reason: str | None = None

    def end_as(self, status: str, reason: str | None = None) -> None:
        """End the run with ``status`` (e.g. KILLED: an interrupted sweep) when the block ends."""
        self.status, self.reason = status, reason


@contextmanager
def tracked_run(
    uri: str,
    experiment: str,
    name: str,
    storage: str,
    params: dict,
    tags: dict | None = None,
    storage_options: dict | None = None,
    config: dict | None = None,
) -> Iterator[Run]:
    """The MLflow run of ``name`` (reopened when it exists), ended when the block ends:
    FINISHED (or as :meth:`Run.end_as` says), FAILED when it raises, KILLED on Ctrl-C.
    ``config``: the whole resolved config, logged as ``config.yaml``.

    When the server was lost during the run, its end is kept with the metrics in the
    run's tracking folder (:func:`end_run`)."""
    run = Run(
        uri,
        start_run(uri, experiment, name, storage, params, tags, config),
        fallback_dir(storage, name),
    )
    try:
        yield run
    except KeyboardInterrupt:
        run.end_as("KILLED")
        raise
    except BaseException:
        run.end_as("FAILED")
        raise
    finally:
        end_run(uri, run.run_id, run.status, run.reason, run.folder, storage_options)
