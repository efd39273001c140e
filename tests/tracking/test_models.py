"""Models are logged and loaded through a client of the given store: the process's MLflow
tracking URI and ``MLFLOW_TRACKING_URI`` stay as they were."""

from __future__ import annotations

import os

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient

from sdofm.models import get_model
from sdofm.tracking import load_model, log_model, start_run


def test_a_model_loads_by_id_version_alias_and_latest_from_another_store(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    before = (mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI"))
    encoder = get_model("mae_debug").encoder().eval()
    run_id = start_run(uri, "exp", "r", "/s", {})
    model_uri = log_model(uri, run_id, encoder, np.zeros((1, 12, 1, 32, 32), np.float32))
    client = MlflowClient(uri)
    logged = client.get_logged_model(model_uri.removeprefix("models:/"))
    assert logged.status == "READY"
    client.create_registered_model("enc")
    client.create_model_version("enc", logged.artifact_location, run_id, model_id=logged.model_id)
    client.set_registered_model_alias("enc", "best", "1")

    x = torch.randn(1, 12, 1, 32, 32)
    expected = encoder.forward_features(x)
    for spec in (model_uri, "models:/enc/1", "models:/enc@best", "models:/enc/latest"):
        got = load_model(uri, spec)
        torch.testing.assert_close(got.forward_features(x), expected, msg=spec)
    assert (mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")) == before
