"""One run life cycle: started or reopened, ended FINISHED, FAILED, KILLED or as the work
says (with its reason), and an end MLflow missed kept for ``sdofm mlflow sync``."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from sdofm.tracking import STOPPED_TAG, end_run, fallback_dir, tracked_run


def _status(uri, run_id):
    return MlflowClient(uri).get_run(run_id).info.status


def test_a_tracked_run_ends_with_how_its_block_ended(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    storage = str(tmp_path / "runs")
    with tracked_run(uri, "exp", "done", storage, {"a": 1}, {"sdofm.task": "t"}) as run:
        assert _status(uri, run.run_id) == "RUNNING"
    assert _status(uri, run.run_id) == "FINISHED"
    assert run.folder == fallback_dir(storage, "done")
    first = run.run_id

    for error, status in ((RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")):
        with pytest.raises(type(error)), tracked_run(uri, "exp", status, storage, {}) as run:
            raise error
        assert _status(uri, run.run_id) == status

    with tracked_run(uri, "exp", "stopped", storage, {}) as run:
        run.end_as("FINISHED", "asha early stop at epoch 2")
    got = MlflowClient(uri).get_run(run.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.tags[STOPPED_TAG] == "asha early stop at epoch 2"

    with tracked_run(uri, "exp", "done", storage, {}) as again:  # the same name and storage
        pass
    assert again.run_id == first


def test_an_end_the_store_missed_is_kept_for_sync(tmp_path, capfd):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    storage = str(tmp_path / "runs")
    with (
        pytest.warns(UserWarning, match="could not mark MLflow run"),
        tracked_run(uri, "exp", "r", storage, {}) as run,
    ):
        (tmp_path / "mlflow.db").unlink()  # the store goes away before the run ends
        (tmp_path / "mlflow.db").mkdir()
    folder = tmp_path / "runs" / "r" / "tracking"
    assert json.loads((folder / "run.json").read_text()) == {
        "tracking_uri": uri,
        "run_id": run.run_id,
        "status": "FINISHED",
    }
    assert f"sdofm mlflow sync {folder}" in capfd.readouterr().out
    # Written through a temporary file: none is left behind.
    assert sorted(p.name for p in folder.iterdir()) == ["run.json"]


def test_a_run_that_never_reached_mlflow_ends_quietly(tmp_path):
    assert end_run("http://127.0.0.1:9", None, "FINISHED", folder=str(tmp_path)) is False
    assert list(tmp_path.iterdir()) == []
