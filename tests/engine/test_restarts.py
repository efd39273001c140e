"""Restarts that are exact: from the newest complete checkpoint, the data epoch and the
objective's draws following it, one MLflow value per step; and a tracking server that dies
mid-run, whose metrics are merged back with ``sdofm mlflow sync``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from functools import partial

import pytest
import torch
from mlflow import MlflowClient
from typer.testing import CliRunner

from sdofm.cli import app
from sdofm.engine.checkpoint import (
    TrainState,
    checkpoint_name,
    latest_checkpoint,
    read_metrics,
    save_checkpoint,
)
from sdofm.pretraining import pretrain
from tests.conftest import small_config
from tests.faults import call_at, fail_at, kill_server
from tests.s3 import _wait_listening, free_port


def test_the_newest_complete_checkpoint_is_the_one_with_a_state_file(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = {"model": torch.optim.SGD(model.parameters(), lr=0.1)}
    for step in (4, 8, 12):
        save_checkpoint(tmp_path / "run" / checkpoint_name(step), model, opt, TrainState(step))
    (tmp_path / "run" / checkpoint_name(12) / "state.json").unlink()  # cut off mid-write
    (tmp_path / "run" / checkpoint_name(16)).mkdir()  # begun, nothing written yet
    latest = latest_checkpoint(str(tmp_path), "run")
    assert latest.step == 8 and latest.url == f"{tmp_path}/run/checkpoint_00000008"
    assert latest_checkpoint(str(tmp_path), "other") is None
    # state.json is written through a temporary file: no partial state.json is ever seen.
    assert not list((tmp_path / "run").glob("*/*.tmp"))


def _cfg(root, tmp_path, *extra):
    return small_config(
        root,
        f"data.cache_dir={tmp_path.parent / 'cache'}",
        f"train.storage_path={tmp_path / 'runs'}",
        "model.name=mae_debug",
        "loader.readers=1",
        "loader.block_size=8",
        "loader.batch_size=16",
        "train.lr=2e-3",
        "train.lr_batch=16",
        "train.max_steps=12",
        "train.log_every=1",
        "train.checkpoint_every=4",
        "train.val_every=12",
        "train.val_samples=8",
        "scaling.cpus_per_worker=0.25",
        "tracking.system_metrics=false",
        "tracking.log_model=false",
        *extra,
    )


@pytest.fixture
def relay(ray_session):
    """Workers' and the controller's progress lines printed by this process (as the CLI does)."""
    from sdofm.console import start_relay

    start_relay()


def _history(uri, run_id, key="train/loss"):
    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key)]


@pytest.mark.usefixtures("relay")
def test_a_killed_worker_restarts_exactly_from_the_newest_checkpoint(
    synth_root, tmp_path, capfd, monkeypatch
):
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "killed"  # same config, one killed
    ref_dir.mkdir()
    run_dir.mkdir()
    ref = pretrain(_cfg(synth_root, ref_dir, f"tracking.uri=sqlite:///{ref_dir / 'mlflow.db'}"))
    # SIGKILL rank 0 at step 11: steps 9 and 10 were logged, not yet covered by a checkpoint.
    fail_at(monkeypatch, step=11, how="kill")
    killed = pretrain(
        _cfg(
            synth_root,
            run_dir,
            f"tracking.uri=sqlite:///{run_dir / 'mlflow.db'}",
            "train.max_failures=1",
        )
    )
    out = capfd.readouterr().out
    restarts = [line for line in out.splitlines() if "restart 1 of 1" in line]
    assert len(restarts) == 1 and restarts[0].endswith("from step 8"), out[-3000:]
    assert "worker rank 0 failed" in restarts[0]
    assert "resumed at step 8 (epoch" in out

    expected = _history(ref.tracking_uri, ref.run_id)
    got = _history(killed.tracking_uri, killed.run_id)
    assert [s for s, _ in expected] == list(range(1, 13))
    assert [s for s, _ in got] == list(range(1, 13))  # one value per step, in order
    # Bit for bit the uninterrupted run's losses: steps 1-10 repeat an independent run of
    # the same seeded config (the plan's data order), steps 9-12 were taken again from the
    # checkpoint of step 8 (weights, optimiser, data position and draws restored).
    assert got == expected
    tags = MlflowClient(killed.tracking_uri).get_run(killed.run_id).data.tags
    assert tags["sdofm.resumed_at_step"] == "8"


def _mlflow_server(db, artifacts, port, log):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{db}",
            "--artifacts-destination",
            str(artifacts),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    _wait_listening("127.0.0.1", port, proc, timeout=400)
    return proc


def _stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


@pytest.mark.usefixtures("relay")
def test_a_tracking_server_that_dies_mid_run_is_synced_once_it_is_back(
    synth_root, tmp_path, capfd, monkeypatch
):
    port = free_port()
    db, artifacts = tmp_path / "server.db", tmp_path / "artifacts"
    log = (tmp_path / "server.log").open("ab")
    uri = f"http://127.0.0.1:{port}"
    server = _mlflow_server(db, artifacts, port, log)
    run_dir = tmp_path / "runs" / "pretrain"
    # The server dies, with no goodbye, right after step 5 (the checkpoint of step 4 is
    # committed), from inside the run: a fast run cannot finish before it.
    call_at(monkeypatch, step=5, action=partial(kill_server, server.pid, port))
    try:
        result = pretrain(
            _cfg(
                synth_root,
                tmp_path,
                f"tracking.uri={uri}",
                "train.max_steps=16",
                "tracking.system_metrics=true",
                "train.val_every=8",
            )
        )
    finally:
        _stop(server)
    assert result.metrics["step"] == 16
    out = capfd.readouterr().out
    folder = str(run_dir / "tracking")
    assert f"sdofm mlflow sync {folder}" in out and "kept in" in out
    kept = json.loads((run_dir / "tracking" / "run.json").read_text())
    assert kept == {"tracking_uri": uri, "run_id": result.run_id, "status": "FINISHED"}

    server = _mlflow_server(db, artifacts, port, log)  # back, with the same database
    try:
        assert MlflowClient(uri).get_run(result.run_id).info.status == "RUNNING"
        res = CliRunner().invoke(app, ["mlflow", "sync", folder], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        client = MlflowClient(uri)
        run = client.get_run(result.run_id)
        assert run.info.status == "FINISHED"
        assert run.data.tags["sdofm.checkpoint"].endswith(checkpoint_name(16))
        assert [s for s, _ in _history(uri, result.run_id)] == list(range(1, 17))
        assert [s for s, _ in _history(uri, result.run_id, "val/loss")] == [8, 16]
        # The synced values are the run's own: each kept checkpoint recorded its interval's.
        kept_records = [
            r for step in (12, 16) for r in read_metrics(str(run_dir / checkpoint_name(step)))
        ]
        assert [r["step"] for r in kept_records] == list(range(9, 17))
        for key in ("train/loss", "val/loss"):
            synced = dict(_history(uri, result.run_id, key))
            for r in kept_records:
                if key in r:
                    assert synced[r["step"]] == r[key], (key, r["step"])
        figures = [a.path for a in client.list_artifacts(result.run_id, "reconstructions")]
        assert "reconstructions/step_00000016_0.png" in figures
        # A second sync sends nothing twice.
        again = CliRunner().invoke(app, ["mlflow", "sync", folder])
        assert again.exit_code == 2 and "no run.json" in again.output
        assert [s for s, _ in _history(uri, result.run_id)] == list(range(1, 17))
    finally:
        _stop(server)
        log.close()
