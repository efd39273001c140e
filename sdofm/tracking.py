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

from sdofm.storage import exists, join, open_url

DEFAULT_URI = "sqlite:///mlflow.db"
RUN_NAME_TAG = "sdofm.run_name"
STORAGE_TAG = "sdofm.storage"
CHECKPOINT_TAG = "sdofm.checkpoint"
MODEL_URI_TAG = "sdofm.model_uri"
STOPPED_TAG = "sdofm.stopped"
"""Why a run that ended before its last epoch is FINISHED anyway (an early stop, not a crash)."""
CONFIG_ARTIFACT = "config.yaml"
"""The whole resolved config of a run (its params hold only the sections that shaped it)."""
SUMMARY_PREFIX = "test/"
"""One-off scores (the test split, once at the end): logged at step 0, where MLflow draws a
single value as a bar, not as a one-dot curve at the last step."""
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
"""Tells MLflow 3's UI that an experiment holds training runs (its Runs and Models tabs),
not GenAI traces."""


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


def fallback_dir(storage: str, run_name: str) -> str:
    """Where a run keeps its metrics and figures while MLflow cannot be reached: beside its
    checkpoints (a folder or URL that every node and ``sdofm mlflow sync`` can read)."""
    return join(storage, run_name, "tracking")


BOUNDED_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
"""MLflow's HTTP limits in a training worker, where the user set none: a dead server costs
seconds per call (MLflow's defaults retry for minutes, also in the system-metrics thread)."""


def bound_http_retries() -> None:
    """Apply :data:`BOUNDED_HTTP` to this process (a worker's, not the user's driver)."""
    for k, v in BOUNDED_HTTP.items():
        os.environ.setdefault(k, v)


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


def runs_page(uri: str, experiment: str) -> str:
    """The address of an experiment's runs table in MLflow 3's UI (which opens on its GenAI
    pages): the server itself for an http URI, else the ``mlflow ui`` default."""
    from mlflow import MlflowClient

    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    try:
        with _quick_http():
            exp = MlflowClient(uri).get_experiment_by_name(experiment)
    except Exception:  # noqa: BLE001 - unreachable: the page without the id
        exp = None
    where = f"experiments/{exp.experiment_id}/runs" if exp else "experiments"
    return f"{base}/#/{where}?workflowType=machine_learning"


def section_params(config: dict, sections: tuple[str, ...]) -> dict[str, str]:
    """The flattened params of the config ``sections`` that shaped a run (``config``: the
    whole config as ``dump_config`` gives it)."""
    return flatten({k: config[k] for k in sections if k in config})


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
    config: dict | None = None,
) -> str | None:
    """Create the MLflow run of ``run_name`` (or reopen it when resuming) -> run id.

    A run is reopened when one in ``experiment`` carries the same run name and storage
    tags. ``config``, the whole resolved config, is logged as ``config.yaml``. Returns None
    (after a warning) when the tracking store cannot be reached.
    """
    from mlflow import MlflowClient

    try:
        with _quick_http():
            client = MlflowClient(uri)
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
                if config is not None:
                    client.log_text(run_id, _yaml(config), CONFIG_ARTIFACT)
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
            if config is not None:
                client.log_text(run.info.run_id, _yaml(config), CONFIG_ARTIFACT)
            return run.info.run_id
    except Exception as e:  # noqa: BLE001 - any failure to reach the store is the same to a user
        warnings.warn(
            f"MLflow tracking store {uri} cannot be reached ({type(e).__name__}: {e}); "
            "training goes on and metrics are kept locally",
            stacklevel=2,
        )
        return None


def _yaml(config: dict) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False)


def set_tags(uri: str, run_id: str | None, tags: dict[str, str]) -> bool:
    """Tag a run from the driver (a warning when unreachable) -> whether it was tagged."""
    if run_id is None:
        return False
    from mlflow import MlflowClient

    try:
        with _quick_http():
            client = MlflowClient(uri)
            for k, v in tags.items():
                client.set_tag(run_id, k, v)
        return True
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"could not tag MLflow run {run_id}: {e}", stacklevel=2)
        return False


def tag_run(
    uri: str,
    run_id: str | None,
    tags: dict[str, str],
    folder: str,
    storage_options: dict | None = None,
) -> None:
    """Tag a run from the driver; when the server is unreachable the tags wait in the run's
    tracking ``folder`` for ``sdofm mlflow sync``."""
    if run_id is not None and not set_tags(uri, run_id, tags):
        keep_for_sync(folder, uri, run_id, tags=tags, storage_options=storage_options)


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


def end_run(uri: str, run_id: str | None, status: str = "FINISHED") -> bool:
    """Mark the run FINISHED / FAILED / KILLED (a warning when the store is unreachable)
    -> whether it was marked."""
    if run_id is None:
        return False
    from mlflow import MlflowClient

    try:
        with _quick_http():
            MlflowClient(uri).set_terminated(run_id, status=status)
        return True
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"could not mark MLflow run {run_id} {status}: {e}", stacklevel=2)
        return False


def keep_for_sync(
    folder: str,
    uri: str,
    run_id: str,
    status: str | None = None,
    tags: dict[str, str] | None = None,
    storage_options: dict | None = None,
) -> None:
    """Record in a run's tracking folder what the driver could not tell MLflow (the final
    status, tags) for ``sdofm mlflow sync``."""
    fs, root = open_url(folder, storage_options)
    fs.makedirs(root, exist_ok=True)
    run = {"tracking_uri": uri, "run_id": run_id}
    if fs.exists(f"{root}/{LOCAL_RUN}"):
        with fs.open(f"{root}/{LOCAL_RUN}") as f:
            run.update(json.load(f))
    if status:
        run["status"] = status
    with fs.open(f"{root}/{LOCAL_RUN}", "w") as f:
        json.dump(run, f)
    if tags:
        kept = {}
        if fs.exists(f"{root}/{LOCAL_TAGS}"):
            with fs.open(f"{root}/{LOCAL_TAGS}") as f:
                kept = json.load(f)
        with fs.open(f"{root}/{LOCAL_TAGS}", "w") as f:
            json.dump({**kept, **tags}, f)


def kept_locally(folder: str, storage_options: dict | None = None) -> bool:
    """Whether a run's rank 0 switched to local files (its folder holds ``run.json``)."""
    return exists(join(folder, LOCAL_RUN), storage_options)


LOCAL_METRICS = "metrics.jsonl"
LOCAL_TAGS = "tags.json"
LOCAL_RUN = "run.json"
LOCAL_FIGURES = "figures"


class Tracker:
    """Logging from one process (the rank-0 worker) into one MLflow run.

    ``run_id`` None, or any failure of the store, switches to files under ``fallback_dir``
    (a folder or URL, reached with ``storage_options``): ``metrics.jsonl``, ``tags.json``,
    ``figures/`` and ``run.json`` (which run they belong to), the input of
    ``sdofm mlflow sync``. The switch is announced once, on the driver's console.
    """

    def __init__(
        self,
        uri: str,
        run_id: str | None,
        fallback_dir: str | Path,
        storage_options: dict | None = None,
    ):
        self.uri, self.run_id = uri, run_id
        self.fallback_dir = str(fallback_dir)
        self.storage_options = storage_options or {}
        self._client = None
        self._monitor = None
        self._local: list[dict] | None = None  # records kept locally (read back once)
        if run_id is not None:
            from mlflow import MlflowClient

            bound_http_retries()
            self._client = MlflowClient(uri)

    @property
    def local(self) -> bool:
        return self._client is None

    def _fs(self):
        return open_url(self.fallback_dir, self.storage_options)

    def _fail(self, what: str, e: Exception) -> None:
        from sdofm.engine.progress import say

        say(
            f"warning: MLflow ({self.uri}) failed while logging {what} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:160]}); from now on metrics and figures are kept in "
            f"{self.fallback_dir}: `sdofm mlflow sync {self.fallback_dir}` sends them to the run "
            "once the server is back"
        )
        self._client = None
        self._write_json(LOCAL_RUN, {"tracking_uri": self.uri, "run_id": self.run_id})
        if self._monitor is not None:
            monitor, self._monitor = self._monitor, None
            monitor.finish()

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

    def _write_json(self, name: str, obj) -> None:
        fs, root = self._fs()
        fs.makedirs(root, exist_ok=True)
        with fs.open(f"{root}/{name}", "w") as f:
            json.dump(obj, f)

    def _keep_locally(self, records: list[dict]) -> None:
        fs, root = self._fs()
        if self._local is None:
            self._local = read_local_metrics(self.fallback_dir, self.storage_options)
        self._local.extend(records)
        fs.makedirs(root, exist_ok=True)
        with fs.open(f"{root}/{LOCAL_METRICS}", "w") as f:  # whole: object stores cannot append
            f.write("".join(json.dumps(r) + "\n" for r in self._local))

    def logged_steps(self) -> set[int]:
        """Steps the run already holds (MLflow's ``step`` metric, or the local file)."""
        if not self.local:
            got: set[int] = set()
            if self._call(
                "metrics",
                lambda c: got.update(m.step for m in c.get_metric_history(self.run_id, "step")),
            ):
                return got
        return {r["step"] for r in read_local_metrics(self.fallback_dir, self.storage_options)}

    def log_records(self, records: list[dict], missing: bool = False) -> None:
        """``records``: ``{"step": s, "time": ms, metric: value, ...}``; ``missing``: only
        the steps the run does not hold yet."""
        if missing and records:
            done = self.logged_steps()
            records = [r for r in records if r["step"] not in done]
        if not records:
            return
        if not self._call("metrics", lambda c: send_records(c, self.run_id, records)):
            self._keep_locally(records)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.log_records([{"step": step, "time": int(time.time() * 1000), **metrics}])

    def log_figure(self, fig, artifact_file: str) -> None:
        if not self._call("a figure", lambda c: c.log_figure(self.run_id, fig, artifact_file)):
            import io

            fs, root = self._fs()
            path = f"{root}/{LOCAL_FIGURES}/{artifact_file}"
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            buf = io.BytesIO()
            fig.savefig(buf, dpi=100, format=Path(artifact_file).suffix[1:] or "png")
            with fs.open(path, "wb") as f:
                f.write(buf.getvalue())
        import matplotlib.pyplot as plt

        plt.close(fig)

    def set_tags(self, tags: dict[str, str]) -> None:
        def send(c):
            for k, v in tags.items():
                c.set_tag(self.run_id, k, v)

        if not self._call("tags", send):
            fs, root = self._fs()
            kept = {}
            if fs.exists(f"{root}/{LOCAL_TAGS}"):
                with fs.open(f"{root}/{LOCAL_TAGS}") as f:
                    kept = json.load(f)
            self._write_json(LOCAL_TAGS, {**kept, **tags})

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


def send_records(client, run_id: str, records: list[dict]) -> None:
    """Log metric records (``{"step", "time", metric: value}``) in MLflow's batches of 1000;
    one-off scores (``test/...``) at step 0."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [
        Metric(
            k,
            float(v),
            int(r.get("time", now)),
            0 if k.startswith(SUMMARY_PREFIX) else int(r["step"]),
        )
        for r in records
        for k, v in r.items()
        if k != "time" and isinstance(v, int | float)
    ]
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i : i + 1000])


def read_local_metrics(folder: str, storage_options: dict | None = None) -> list[dict]:
    """The records a run kept in ``folder`` while MLflow was unreachable."""
    fs, root = open_url(folder, storage_options)
    try:
        with fs.open(f"{root}/{LOCAL_METRICS}") as f:
            return [json.loads(x) for x in f.read().decode().splitlines() if x]
    except FileNotFoundError:
        return []


def sync(folder: str, storage_options: dict | None = None, uri: str | None = None) -> dict:
    """Send what a run kept in ``folder`` (its ``tracking`` folder) while MLflow was
    unreachable: the metrics of steps the run does not hold, the figures, the tags; then
    close the run with the status it ended with. -> what was sent."""
    from mlflow import MlflowClient

    fs, root = open_url(folder, storage_options)
    try:
        with fs.open(f"{root}/{LOCAL_RUN}") as f:
            run = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{folder} holds no {LOCAL_RUN}: not the tracking folder of a run that lost its "
            "MLflow server (<storage>/<run name>/tracking)"
        ) from None
    uri = uri or run["tracking_uri"]
    if not run.get("run_id"):
        raise ValueError(
            f"{folder}: the run never reached MLflow (no run id); nothing to merge into"
        )
    client = MlflowClient(uri)
    run_id = run["run_id"]
    done = {m.step for m in client.get_metric_history(run_id, "step")}
    records = [r for r in read_local_metrics(folder, storage_options) if r["step"] not in done]
    send_records(client, run_id, records)
    figures = 0
    fig_root = f"{root}/{LOCAL_FIGURES}"
    if fs.exists(fig_root):
        import tempfile

        for path in fs.find(fig_root):
            rel = path[len(fig_root) + 1 :]
            with tempfile.TemporaryDirectory() as tmp:
                local = Path(tmp) / Path(rel).name
                fs.get(path, str(local))
                parent = str(Path(rel).parent)
                client.log_artifact(run_id, str(local), None if parent == "." else parent)
            figures += 1
    tags = {}
    if fs.exists(f"{root}/{LOCAL_TAGS}"):
        with fs.open(f"{root}/{LOCAL_TAGS}") as f:
            tags = json.load(f)
        for k, v in tags.items():
            client.set_tag(run_id, k, v)
    status = run.get("status")
    if status:
        client.set_terminated(run_id, status=status)
    client.set_tag(run_id, "sdofm.synced_from", folder)
    fs.mv(f"{root}/{LOCAL_RUN}", f"{root}/{LOCAL_RUN}.synced")
    return {
        "run_id": run_id,
        "tracking_uri": uri,
        "metric_steps": len({r["step"] for r in records}),
        "figures": figures,
        "tags": len(tags),
        "status": status,
    }


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


def model_code(dest: Path) -> Path:
    """A copy of the sdofm package (sources only) under ``dest``, shipped with a logged model
    so that it loads where sdofm is not installed (no registry serves ``sdofm``)."""
    import shutil

    import sdofm

    target = dest / "sdofm"
    shutil.copytree(
        Path(sdofm.__file__).parent, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    return target


def final_metrics(client, run_id: str) -> list:
    """The last value of each of a run's metrics (MLflow's rule: highest step, then newest),
    as logged, without the system samples (``system/...``)."""
    run = client.get_run(run_id)
    out = []
    for key in sorted(run.data.metrics):
        if key.startswith("system/"):
            continue
        history = client.get_metric_history(run_id, key)
        if history:
            out.append(max(history, key=lambda m: (m.step, m.timestamp)))
    return out


def log_model(uri: str, run_id: str, model, example: np.ndarray, name: str = "encoder") -> str:
    """Log a torch module, with sdofm's code, as a model of the run that trained it -> model
    URI. The signature maps ``example`` through ``model.forward_features`` when the model has
    one (encoders), else ``model``.

    The model carries the run's params and the final value of each of its metrics. MLflow's
    own linking would take every metric logged at one step (by default step 0: the system
    samples), so the model is created here and its metrics are chosen.
    """
    import tempfile

    import cloudpickle
    import mlflow
    import torch
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelOutput, Metric
    from mlflow.models import infer_signature

    with torch.no_grad():
        fn = getattr(model, "forward_features", model)
        out = fn(torch.from_numpy(example)).numpy()
    # Pickle is chosen knowingly (see below); MLflow's warning about it is noise here.
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp, use_tracking_uri(uri), _quick_http():
        client = MlflowClient(uri)
        run = client.get_run(run_id)
        logged = client.create_logged_model(
            run.info.experiment_id, name=name, source_run_id=run_id, params=run.data.params
        )
        # No active run: MLflow would link the metrics of one step to the model itself.
        info = mlflow.pytorch.log_model(
            model,
            name=name,
            model_id=logged.model_id,
            signature=infer_signature(example, out),
            serialization_format="pickle",  # the encoder's masking is not traceable by pt2
            code_paths=[str(model_code(Path(tmp)))],
            pip_requirements=[
                f"torch=={torch.__version__.split('+')[0]}",
                f"cloudpickle=={cloudpickle.__version__}",
                f"numpy=={np.__version__}",
            ],
        )
        final = final_metrics(client, run_id)
        step = max((m.step for m in final), default=0)
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=step)])
        # The same (key, value, time, step) as the run's: MLflow keeps one point per metric.
        linked = [
            Metric(m.key, m.value, m.timestamp, m.step, model_id=logged.model_id) for m in final
        ]
        for i in range(0, len(linked), 1000):
            client.log_batch(run_id, metrics=linked[i : i + 1000])
    return info.model_uri
