"""MLflow helpers: the URI, run creation and reopening, logging that survives a dead store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from sdofm import tracking


def test_uri_from_config_then_environment_then_sqlite(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"  # absolute for workers
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking.tracking_uri() == "http://mlflow.example:5000"
    assert tracking.tracking_uri("sqlite:///runs/x.db") == f"sqlite:///{tmp_path}/runs/x.db"
    assert tracking.tracking_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"


def test_flatten_gives_dotted_string_params():
    flat = tracking.flatten({"train": {"lr": 0.001, "betas": [0.9, 0.95]}, "model": {"name": "m"}})
    assert flat == {"train.lr": "0.001", "train.betas": "[0.9, 0.95]", "model.name": "m"}


def test_a_run_is_reopened_by_name_and_storage(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    params = {f"p{i}": i for i in range(150)}  # more than one MLflow batch
    first = tracking.start_run(uri, "exp", "run-a", "/store", params)
    again = tracking.start_run(uri, "exp", "run-a", "/store", params)
    other = tracking.start_run(uri, "exp", "run-a", "/elsewhere", params)
    assert first == again != other
    run = MlflowClient(uri).get_run(first)
    assert run.data.params["p149"] == "149" and run.data.tags["sdofm.resumed"] == "true"
    tracking.end_run(uri, first, "FINISHED")
    assert MlflowClient(uri).get_run(first).info.status == "FINISHED"


def test_tracker_logs_to_mlflow_and_falls_back_to_files_when_the_store_dies(tmp_path, capfd):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = tracking.start_run(uri, "exp", "r", "/s", {})
    t = tracking.Tracker(uri, run_id, tmp_path / "local")
    t.log_metrics({"loss": 1.5}, step=1)
    img = np.random.default_rng(0).normal(size=(2, 8, 8))
    t.log_figure(tracking.reconstruction_figure(img, img * 0, img, ["171A", "Bz"]), "f/one.png")
    client = MlflowClient(uri)
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [1.5]
    assert [a.path for a in client.list_artifacts(run_id, "f")] == ["f/one.png"]

    (tmp_path / "mlflow.db").unlink()  # the store goes away mid-run
    (tmp_path / "mlflow.db").mkdir()  # ... and cannot come back as a file
    t.log_metrics({"loss": 1.0}, step=2)
    assert (
        f"from now on metrics and figures are kept in {tmp_path / 'local'}"
        in capfd.readouterr().out
    )
    t.log_metrics({"loss": 0.5}, step=3)
    t.log_figure(tracking.reconstruction_figure(img, img, img, ["171A", "Bz"]), "f/two.png")
    lines = [json.loads(x) for x in (tmp_path / "local" / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], x["loss"]) for x in lines] == [(2, 1.0), (3, 0.5)]
    assert (tmp_path / "local" / "figures" / "f" / "two.png").stat().st_size > 1000


def test_unreachable_server_is_a_warning_not_an_error():
    with pytest.warns(UserWarning, match="cannot be reached"):
        assert tracking.start_run("http://127.0.0.1:9", "exp", "r", "/s", {}) is None


LOAD_ELSEWHERE = """
import sys
# torch and mlflow, without site's .pth files: sdofm's editable install is not on the path
sys.path.append(sys.argv[4])
try:
    import sdofm
    raise SystemExit(f"sdofm is importable from {sdofm.__file__}")
except ModuleNotFoundError:
    pass
import mlflow.pytorch, numpy as np, torch
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pytorch.load_model(sys.argv[2])
x = torch.from_numpy(np.load(sys.argv[3] + "/x.npy"))
np.save(sys.argv[3] + "/y.npy", model.forward_features(x).detach().numpy())
print(type(model).__module__, sys.modules["sdofm"].__file__)
"""


def test_a_logged_model_loads_in_a_python_without_sdofm(tmp_path):
    import os
    import subprocess
    import sys
    import sysconfig

    import torch

    from sdofm.models import get_model

    encoder = get_model("mae_debug").encoder().eval()
    x = np.random.default_rng(0).normal(size=(1, 12, 1, 32, 32)).astype(np.float32)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = tracking.start_run(uri, "exp", "r", "/s", {})
    model_uri = tracking.log_model(uri, run_id, encoder, x)
    np.save(tmp_path / "x.npy", x)
    site = sysconfig.get_paths()["purelib"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", LOAD_ELSEWHERE, uri, model_uri, str(tmp_path), site],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    module, code = out.stdout.split()[-2:]
    assert module == "sdofm.models.mae" and "/code/sdofm/" in code  # the code shipped with it
    with torch.no_grad():
        expected = encoder.forward_features(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-5, atol=1e-6)
    import mlflow.artifacts

    location = tracking.model_location(MlflowClient(uri), model_uri)
    local = mlflow.artifacts.download_artifacts(
        location, dst_path=str(tmp_path / "model"), tracking_uri=uri
    )
    names = [line.split("==")[0] for line in (Path(local) / "requirements.txt").read_text().split()]
    assert "torch" in names and "sdofm" not in names


def test_a_logged_model_carries_its_runs_params_and_final_metrics_not_system_samples(tmp_path):
    from sdofm.models import get_model

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = tracking.start_run(uri, "exp", "r", "/s", {"finetune.lr": 8.4e-4})
    client = MlflowClient(uri)
    for step, cpu in enumerate([10.0, 20.0, 30.0]):  # what the system monitor logs from step 0
        client.log_metric(run_id, "system/cpu_utilization_percentage", cpu, step=step)
    records = [
        {"step": 5, "time": 1000, "val/loss": 2.0, "val/loss_171A": 3.0},
        {"step": 10, "time": 2000, "val/loss": 1.5, "val/loss_171A": 2.5, "test/mae": 0.25},
    ]
    tracking.send_records(client, run_id, records)
    encoder = get_model("mae_debug").encoder().eval()
    model_uri = tracking.log_model(uri, run_id, encoder, np.zeros((1, 12, 1, 32, 32), np.float32))

    model = client.get_logged_model(model_uri.removeprefix("models:/"))
    assert model.source_run_id == run_id and model.params == {"finetune.lr": "0.00084"}
    assert {m.key: (m.step, m.value) for m in model.metrics} == {
        "step": (10, 10.0),  # the step the model was made at
        "val/loss": (10, 1.5),
        "val/loss_171A": (10, 2.5),
        "test/mae": (0, 0.25),  # a one-off score: logged at step 0
    }
    assert [o.model_id for o in client.get_run(run_id).outputs.model_outputs] == [model.model_id]
    # Linking adds no point to the run's own curves.
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val/loss")] == [
        (5, 2.0),
        (10, 1.5),
    ]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "test/mae")] == [(0, 0.25)]


def test_runs_keep_the_whole_config_as_an_artifact_in_an_experiment_of_training_runs(tmp_path):
    import yaml

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = {"data": {"root": "x"}, "synth": {"days": 3}, "train": {"lr": 0.001}}
    params = tracking.section_params(config, ("data", "train"))
    assert params == {"data.root": "x", "train.lr": "0.001"}
    run_id = tracking.start_run(uri, "exp", "r", "/s", params, config=config)
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.data.params == params
    path = client.download_artifacts(run_id, tracking.CONFIG_ARTIFACT, str(tmp_path))
    assert yaml.safe_load(Path(path).read_text()) == config
    # MLflow 3's UI shows this experiment's runs, not a GenAI traces page
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    old = client.create_experiment("made-before")  # by an earlier sdofm: untagged
    tracking.start_run(uri, "made-before", "r", "/s", {})
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    assert tracking.runs_page(uri, "exp") == (
        f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
    )
