"""MLflow: the tracking URI, run set-up on the driver, rank-0 logging, figures, models.

Logging never stops training. When the tracking server cannot be reached (at the
start or later) a warning is printed once and metrics, params and figures are kept
in a local folder instead (``metrics.jsonl``, ``params.json``, ``figures/``).
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_URI = "sqlite:///mlflow.db"
RUN_NAME_TAG = "sdofm.run_name"
STORAGE_TAG = "sdofm.storage"
CHECKPOINT_TAG = "sdofm.checkpoint"
MODEL_URI_TAG = "sdofm.model_uri"


def tracking_uri(configured: str | None = None) -> str:
    """``configured``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``.

    A relative sqlite or file path is made absolute: Ray workers run in other folders.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    if "://" not in uri:
        return str(Path(uri).resolve())
    return uri


def fallback_dir(storage: str, run_name: str) -> Path:
    """Where a run keeps its metrics when MLflow cannot be reached: beside its checkpoints
    for local storage, else under ``~/.sdofm/tracking``."""
    if "://" in storage:
        return Path.home() / ".sdofm" / "tracking" / run_name
    return Path(storage) / run_name / "tracking"


@contextmanager
def _quick_http():
    """Fail fast against an unreachable server instead of MLflow's minutes of retries."""
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def use_tracking_uri(uri: str):
    """MLflow's fluent API (log_model, load_model) pointed at ``uri`` for a while; the
    process's tracking URI and ``MLFLOW_TRACKING_URI`` are left as they were."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    old_env = os.environ.get("MLFLOW_TRACKING_URI")
    old_uri = utils._tracking_uri
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old_uri)
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env


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


def _search(client, exp_id: str, run_name: str, storage: str):
    return client.search_runs(
        [exp_id],
        filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}' and tags.`{STORAGE_TAG}` = '{storage}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )


def find_run(uri: str, experiment: str, run_name: str, storage: str) -> str | None:
    """The id of the run ``start_run`` made for (run_name, storage), or None."""
    from mlflow import MlflowClient

    try:
        with _quick_http():
            client = MlflowClient(uri)
            exp = client.get_experiment_by_name(experiment)
            found = _search(client, exp.experiment_id, run_name, storage) if exp else []
            return found[0].info.run_id if found else None
    except Exception:  # noqa: BLE001 - unreachable: nothing to find
        return None


def start_run(
    uri: str,
    experiment: str,
    run_name: str,
    storage: str,
    params: dict[str, Any],
    tags: dict[str, str] | None = None,
) -> str | None:
    """Create the MLflow run of ``run_name`` (or reopen it when resuming) -> run id.

    A run is reopened when one in ``experiment`` carries the same run name and storage
    tags. Returns None (after a warning) when the tracking store cannot be reached.
    """
    from mlflow import MlflowClient

    try:
        with _quick_http():
            client = MlflowClient(uri)
            exp = client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
            found = _search(client, exp_id, run_name, storage)
            if found:
                run_id = found[0].info.run_id
                client.update_run(run_id, status="RUNNING")
                client.set_tag(run_id, "sdofm.resumed", "true")
                return run_id
            run = client.create_run(
                exp_id,
                run_name=run_name,
                tags={RUN_NAME_TAG: run_name, STORAGE_TAG: storage, **(tags or {})},
            )
            items = sorted(params.items())
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                from mlflow.entities import Param

                client.log_batch(
                    run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in items[i : i + 100]]
                )
            return run.info.run_id
    except Exception as e:  # noqa: BLE001 - any failure to reach the store is the same to a user
        warnings.warn(
            f"MLflow tracking store {uri} cannot be reached ({type(e).__name__}: {e}); "
            "training goes on and metrics are kept locally",
            stacklevel=2,
        )
        return None


def set_tags(uri: str, run_id: str | None, tags: dict[str, str]) -> None:
    """Tag a run from the driver (quietly does nothing when unreachable)."""
    if run_id is None:
        return
    from mlflow import MlflowClient

    try:
        with _quick_http():
            client = MlflowClient(uri)
            for k, v in tags.items():
                client.set_tag(run_id, k, v)
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"could not tag MLflow run {run_id}: {e}", stacklevel=2)


def log_text(uri: str, run_id: str | None, text: str, artifact_file: str) -> None:
    """A text artifact from the driver (quietly does nothing when unreachable)."""
    if run_id is None:
        return
    from mlflow import MlflowClient

    try:
        with _quick_http():
            MlflowClient(uri).log_text(run_id, text, artifact_file)
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"could not log {artifact_file} to MLflow run {run_id}: {e}", stacklevel=2)


def log_metrics(uri: str, run_id: str | None, metrics: dict[str, float], step: int = 0) -> None:
    """Metrics from the driver in one batch (quietly does nothing when unreachable)."""
    if run_id is None or not metrics:
        return
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    try:
        with _quick_http():
            client = MlflowClient(uri)
            for i in range(0, len(items), 1000):
                client.log_batch(run_id, metrics=items[i : i + 1000])
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"could not log metrics to MLflow run {run_id}: {e}", stacklevel=2)


SKIPPED_TABLE = "skipped_frames.json"


def log_skipped(uri: str, run_id: str | None, report) -> None:
    """What a run's data readers skipped (a :class:`~sdofm.datasets.blocks.SkipReport`):
    metrics ``data/skipped_frames`` and ``data/skipped_samples`` (0 when nothing was) and,
    when something was, the table ``skipped_frames.json`` (store, year, channel, frame,
    reason). Quietly does nothing when the store is unreachable."""
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
    from mlflow import MlflowClient

    try:
        with _quick_http():
            MlflowClient(uri).log_table(run_id, pd.DataFrame(report.rows()), SKIPPED_TABLE)
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"could not log skipped frames to MLflow run {run_id}: {e}", stacklevel=2)


def end_run(uri: str, run_id: str | None, status: str = "FINISHED") -> None:
    """Mark the run FINISHED / FAILED / KILLED (a warning when the store is unreachable)."""
    if run_id is None:
        return
    from mlflow import MlflowClient

    try:
        with _quick_http():
            MlflowClient(uri).set_terminated(run_id, status=status)
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"could not mark MLflow run {run_id} {status}: {e}", stacklevel=2)


class Tracker:
    """Logging from one process (the rank-0 worker) into one MLflow run.

    ``run_id`` None, or any failure of the store, switches to local files under
    ``fallback_dir``; the switch is announced once.
    """

    def __init__(self, uri: str, run_id: str | None, fallback_dir: str | Path):
        self.uri, self.run_id = uri, run_id
        self.fallback_dir = Path(fallback_dir)
        self._client = None
        self._monitor = None
        if run_id is not None:
            from mlflow import MlflowClient

            self._client = MlflowClient(uri)

    @property
    def local(self) -> bool:
        return self._client is None

    def _fail(self, what: str, e: Exception) -> None:
        warnings.warn(
            f"MLflow ({self.uri}) failed while logging {what} ({type(e).__name__}: {e}); "
            f"from now on metrics are kept in {self.fallback_dir}",
            stacklevel=3,
        )
        self._client = None

    def _call(self, what: str, fn) -> bool:
        if self._client is None:
            return False
        try:
            with _quick_http():
                fn(self._client)
            return True
        except Exception as e:  # noqa: BLE001
            self._fail(what, e)
            return False

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if not self._call("metrics", lambda c: c.log_batch(self.run_id, metrics=items)):
            self.fallback_dir.mkdir(parents=True, exist_ok=True)
            with open(self.fallback_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "time": now, **metrics}) + "\n")

    def log_figure(self, fig, artifact_file: str) -> None:
        if not self._call("a figure", lambda c: c.log_figure(self.run_id, fig, artifact_file)):
            path = self.fallback_dir / "figures" / artifact_file
            path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=100)
        import matplotlib.pyplot as plt

        plt.close(fig)

    def set_tags(self, tags: dict[str, str]) -> None:
        def send(c):
            for k, v in tags.items():
                c.set_tag(self.run_id, k, v)

        if not self._call("tags", send):
            self.fallback_dir.mkdir(parents=True, exist_ok=True)
            with open(self.fallback_dir / "tags.jsonl", "a") as f:
                f.write(json.dumps(tags) + "\n")

    def start_system_metrics(self) -> None:
        """CPU, memory (and GPU when present) sampled every 10 s into the run."""
        if self.local:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(
                self.run_id, tracking_uri=self.uri, resume_logging=True
            )
            self._monitor.start()
        except Exception as e:  # noqa: BLE001 - system metrics are a convenience
            warnings.warn(f"system metrics are off: {e}", stacklevel=2)

    def close(self) -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None


# --------------------------------------------------------------------------- figures


def reconstruction_figure(
    image: np.ndarray,
    masked: np.ndarray | None,
    recon: np.ndarray,
    channels: list[str],
    title: str = "",
):
    """image, masked, recon: (C, H, W) -> a figure with one row per channel: input, masked
    input (left out when ``masked`` is None: a VAE sees all of it), reconstruction, |error|;
    each row on the input's colour scale.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    C = image.shape[0]
    names = ["input", *(["masked"] if masked is not None else []), "reconstruction", "|error|"]
    fig, axes = plt.subplots(C, len(names), figsize=(2 * len(names), 2 * C + 0.6), squeeze=False)
    for c in range(C):
        lo, hi = np.percentile(image[c], [1, 99])
        err = np.abs(recon[c] - image[c])
        panels = [
            (image[c], "gray", lo, hi),
            *([(masked[c], "gray", lo, hi)] if masked is not None else []),
            (recon[c], "gray", lo, hi),
            (err, "magma", 0, max(float(np.percentile(err, 99)), 1e-6)),
        ]
        for ax, (data, cmap, vmin, vmax) in zip(axes[c], panels, strict=True):
            ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[c, 0].set_ylabel(channels[c], fontsize=9)
    for ax, name in zip(axes[0], names, strict=True):
        ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))  # room for the title
    return fig


def samples_figure(samples: np.ndarray, channels: list[str], title: str = ""):
    """samples: (n, C, H, W) -> a figure with one row per channel and one column per sample,
    each row on one colour scale (draws from a generative model's prior)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, C = samples.shape[:2]
    fig, axes = plt.subplots(C, n, figsize=(1.6 * n, 1.6 * C + 0.6), squeeze=False)
    for c in range(C):
        lo, hi = np.percentile(samples[:, c], [1, 99])
        for i in range(n):
            axes[c, i].imshow(samples[i, c], cmap="gray", vmin=lo, vmax=hi, origin="lower")
            axes[c, i].set_xticks([])
            axes[c, i].set_yticks([])
        axes[c, 0].set_ylabel(channels[c], fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))
    return fig


def log_model(uri: str, run_id: str, model, example: np.ndarray, name: str = "encoder") -> str:
    """Log a torch module -> model URI. The signature maps ``example`` through
    ``model.forward_features`` when the model has one (encoders), else ``model``."""
    import mlflow
    import torch
    from mlflow.models import infer_signature

    with torch.no_grad():
        fn = getattr(model, "forward_features", model)
        out = fn(torch.from_numpy(example)).numpy()
    # Pickle is chosen knowingly (see below); MLflow's warning about it is noise here.
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    with use_tracking_uri(uri), _quick_http(), mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            model,
            name=name,
            signature=infer_signature(example, out),
            serialization_format="pickle",  # the encoder's masking is not traceable by pt2
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "sdofm"],
        )
    return info.model_uri
