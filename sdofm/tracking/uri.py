"""Where runs go (the tracking URI) and where to see them (the runs page)."""

from __future__ import annotations

import os
from pathlib import Path

from sdofm.tracking.guard import guarded, ignore

DEFAULT_URI = "sqlite:///mlflow.db"


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


def runs_page(uri: str, experiment: str) -> str:
    """The address of an experiment's runs table in MLflow 3's UI (which opens on its GenAI
    pages): the server itself for an http URI, else the ``mlflow ui`` default."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    # Unreachable: the page without the experiment's id.
    exp = guarded(
        uri, "find the experiment", lambda c: c.get_experiment_by_name(experiment), on_error=ignore
    )
    where = f"experiments/{exp.experiment_id}/runs" if exp else "experiments"
    return f"{base}/#/{where}?workflowType=machine_learning"
