"""Models in MLflow: a trained torch module logged as a model of the run that trained it,
and loaded back from its URI. Both go through a client of the given tracking store, so
the process's MLflow tracking URI (and ``MLFLOW_TRACKING_URI``) is never changed."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from sdofm.tracking.guard import check_reachable

MODELS_SCHEME = "models:/"


def model_code(dest: Path) -> Path:
    """A copy of the sdofm package (sources only) under ``dest``, shipped with a logged model
    so that it loads where sdofm is not installed (no registry serves ``sdofm``)."""
    source = Path(__file__).resolve().parents[1]  # sdofm/
    target = dest / "sdofm"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
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
    import cloudpickle
    import mlflow.pytorch
    import torch
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric
    from mlflow.models import Model, infer_signature

    with torch.no_grad():
        fn = getattr(model, "forward_features", model)
        out = fn(torch.from_numpy(example)).numpy()
    # Pickle is chosen knowingly (see below); MLflow's warning about it is noise here.
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    check_reachable(uri)
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    logged = client.create_logged_model(
        run.info.experiment_id, name=name, source_run_id=run_id, params=run.data.params
    )
    # Saved locally, then uploaded to the logged model: mlflow.pytorch.log_model would
    # reach the store through the process's tracking URI.
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "model"
            mlflow.pytorch.save_model(
                model,
                str(local),
                mlflow_model=Model(
                    artifact_path=logged.artifact_location,
                    model_uuid=logged.model_id,
                    model_id=logged.model_id,
                ),
                signature=infer_signature(example, out),
                serialization_format="pickle",  # the encoder's masking is not traceable by pt2
                code_paths=[str(model_code(Path(tmp)))],
                pip_requirements=[
                    f"torch=={torch.__version__.split('+')[0]}",
                    f"cloudpickle=={cloudpickle.__version__}",
                    f"numpy=={np.__version__}",
                ],
            )
            client.log_model_artifacts(logged.model_id, str(local))
    except Exception:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    final = final_metrics(client, run_id)
    step = max((m.step for m in final), default=0)
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=step)])
    # The same (key, value, time, step) as the run's: MLflow keeps one point per metric.
    linked = [Metric(m.key, m.value, m.timestamp, m.step, model_id=logged.model_id) for m in final]
    for i in range(0, len(linked), 1000):
        client.log_batch(run_id, metrics=linked[i : i + 1000])
    return f"{MODELS_SCHEME}{logged.model_id}"


def model_location(client, model_uri: str) -> str:
    """Where the artifacts of a ``models:/`` URI are: ``models:/<model id>`` (a logged
    model), ``models:/<name>/<version>``, ``models:/<name>@<alias>``,
    ``models:/<name>/latest`` or ``models:/<name>/<stage>`` (registered models). Other URIs
    (``runs:/``, a path) are returned as they are.

    Resolved with ``client`` because MLflow resolves ``models:/`` URIs through the process's
    tracking URI only."""
    if not model_uri.startswith(MODELS_SCHEME):
        return model_uri
    spec = model_uri[len(MODELS_SCHEME) :].strip("/")
    head, _, rest = spec.partition("/")
    if "@" in head:
        name, alias = head.split("@", 1)
        version = client.get_model_version_by_alias(name, alias).version
    elif not rest:
        return client.get_logged_model(head).artifact_location
    else:
        name, which = head, rest.split("/")[0]
        if which.isdigit():
            version = which
        elif which.lower() == "latest":
            found = client.search_model_versions(f"name = '{name}'")
            if not found:
                raise ValueError(f"{model_uri}: registered model {name!r} has no version")
            version = str(max(int(v.version) for v in found))
        else:
            (latest,) = client.get_latest_versions(name, stages=[which])
            version = latest.version
    return client.get_model_version_download_uri(name, version)


def load_model(uri: str, model_uri: str):
    """The torch module that ``model_uri`` (``models:/...``, ``runs:/...``) names on the
    tracking store ``uri``."""
    import mlflow.pytorch
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    location = model_location(MlflowClient(uri), model_uri)
    return mlflow.pytorch.load_model(download_artifacts(artifact_uri=location, tracking_uri=uri))
