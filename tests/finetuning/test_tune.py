"""The dimming sweep: trials, MLflow parent/child runs, the best head, resume, bad spaces."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from sdofm.cli import app
from sdofm.config import ConfigError, load_config
from sdofm.finetuning.tune import format_table, sweep
from tests.conftest import SMALL
from tests.finetuning.test_dimming import _checkpoint

REPO = Path(__file__).resolve().parents[2]


def _overrides(root, tmp_path):
    return [
        *SMALL,
        f"data.root={root}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"train.storage_path={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"finetune.backbone={tmp_path / 'backbone'}",
        "finetune.freeze=partial",
        "finetune.epochs=2",
        "finetune.max_train_samples=96",
        "loader.readers=1",
        "scaling.cpus_per_worker=0.25",
        "tune.grace_period=1",
        "tune.space={lr: {loguniform: [1e-4, 3e-3]}, head: {choice: [pool, conv]}, "
        "unfreeze_blocks: {choice: [0, 1]}}",
    ]


def test_help_documents_every_option():
    out = CliRunner().invoke(app, ["tune", "dimming", "--help"], terminal_width=200).output
    for option in ("--backbone", "--num-samples", "--max-concurrent", "--resume"):
        assert option in out
    assert "ASHA" in out


def test_an_invalid_search_space_stops_before_any_trial():
    with pytest.raises(ConfigError, match="loguniform needs low > 0"):
        load_config(None, ["tune.space={lr: {loguniform: [0, 1e-3]}}"])
    with pytest.raises(ConfigError, match="'learning_rate' is not a finetune setting"):
        load_config(None, ["tune.space={learning_rate: {uniform: [1e-4, 1e-3]}}"])
    with pytest.raises(ConfigError, match="'mlp' is not a valid finetune.head"):
        load_config(None, ["tune.space={head: {choice: [pool, mlp]}}"])


def test_search_space_values_are_typed_as_the_settings_they_sweep():
    space = load_config(
        None, ["tune.space={lr: {choice: [1e-3, 3e-4]}, batch_size: {choice: ['8', 16]}}"]
    ).tune.space
    assert space == {"lr": {"choice": [1e-3, 3e-4]}, "batch_size": {"choice": [8, 16]}}


@pytest.mark.usefixtures("ray_session")
def test_sweep_logs_parent_and_child_runs_and_the_best_head(synth_root, tmp_path):
    _checkpoint(tmp_path / "backbone", channels=load_config().data.channels)
    cfg = load_config(None, _overrides(synth_root, tmp_path))
    result = sweep(cfg, "dimming", num_samples=3, max_concurrent=2)

    assert len(result.table) == 3 and result.best is not None
    assert result.best["status"] == "finished" and result.best["test/mae"] is not None
    finished = [r for r in result.table if r["status"] == "finished"]
    assert [r["val/mae"] for r in finished] == sorted(r["val/mae"] for r in finished)

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    exp = parent.info.experiment_id
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert len(children) == 3
    assert {c.info.run_id for c in children} == {r["run_id"] for r in result.table}
    for c in children:  # ASHA's early stops end FINISHED too, with the reason
        r = next(r for r in result.table if r["run_id"] == c.info.run_id)
        assert c.info.status == "FINISHED", r
        stopped = c.data.tags.get("sdofm.stopped")
        if r["status"] == "stopped early":
            assert stopped == f"asha early stop at epoch {r['epochs']}" and r["epochs"] < 2
        else:
            assert stopped is None and r["status"] == "finished"
    best = client.get_run(result.best["run_id"])
    assert "val/mae" in best.data.metrics and best.data.params["finetune.head"] in ("pool", "conv")
    assert [a.path for a in client.list_artifacts(best.info.run_id) if a.path.endswith(".png")] == [
        "scatter_test.png",
        "scatter_val.png",
    ]
    assert parent.data.tags["sdofm.best_run_id"] == result.best["run_id"]
    trials = client.download_artifacts(result.parent_run_id, "trials.txt", str(tmp_path))
    assert result.best["trial"][:20] in Path(trials).read_text()
    assert result.model_uri and result.model_uri.startswith("models:/")

    # The best head is a model of the winning trial's run: its settings and scores.
    assert parent.data.tags["sdofm.model_uri"] == result.model_uri
    model = client.get_logged_model(result.model_uri.removeprefix("models:/"))
    assert model.name == "best_head" and model.source_run_id == result.best["run_id"]
    assert model.params["finetune.head"] == result.best["params"]["head"]
    assert float(model.params["finetune.lr"]) == result.best["params"]["lr"]
    on_model = {m.key: (m.step, m.value) for m in model.metrics}
    assert on_model["test/mae"] == (0, pytest.approx(result.best["test/mae"]))  # Tune's report
    (last_val,) = [
        m
        for m in client.get_metric_history(best.info.run_id, "val/mae")
        if m.step == max(h.step for h in client.get_metric_history(best.info.run_id, "val/mae"))
    ]
    assert on_model["val/mae"] == (last_val.step, last_val.value)
    assert not [k for k in on_model if k.startswith("system/")]
    # A one-off score is one point at step 0 (a bar in MLflow's charts), not a dot at the end.
    assert [m.step for m in client.get_metric_history(best.info.run_id, "test/mae")] == [0]

    # Each run's params are the sections that shaped it; the whole config is config.yaml.
    for run in (best, parent):
        assert not [k for k in run.data.params if k.split(".")[0] in ("synth", "model", "tracking")]
        assert "finetune.head" in run.data.params
        config = client.download_artifacts(
            run.info.run_id, "config.yaml", str(tmp_path / run.info.run_id)
        )
        assert "synth:" in Path(config).read_text()
    assert not [k for k in best.data.params if k.startswith("tune.")]
    assert "tune.space.lr.loguniform" in parent.data.params
    assert not [k for k in parent.data.params if k.startswith("data.")]


def _ended_trials(client: MlflowClient, sweep_dir: Path) -> set[str]:
    """Trial folders whose child run the sweep's driver has ended FINISHED, i.e. trials that
    Tune itself has ended (a trial's last result alone does not make it finished to Tune)."""
    exp = client.get_experiment_by_name("sdofm-dimming")
    if exp is None:
        return set()
    runs = client.search_runs(
        [exp.experiment_id], "tags.`sdofm.task` = 'tune-dimming-trial' and status = 'FINISHED'"
    )
    ids = [r.info.run_name.removeprefix("dimming_sweep_") for r in runs]
    return {d.name for i in ids for d in sweep_dir.glob(f"*_{i}_*")}


@pytest.mark.ray  # its sweep starts Ray in a subprocess, then init_ray here
def test_resume_after_an_interruption_keeps_finished_trials(synth_root, tmp_path):
    _checkpoint(tmp_path / "backbone", channels=load_config().data.channels)
    overrides = _overrides(synth_root, tmp_path)
    code = (
        "import sys; from sdofm.config import load_config; from sdofm.finetuning.tune import sweep; "
        "from sdofm.runtime import init_ray; init_ray(); "
        "sweep(load_config(None, sys.argv[1:]), 'dimming', num_samples=3, max_concurrent=1)"
    )
    env = {**os.environ, "RAY_ADDRESS": ""}  # its own local Ray instance, as a user's run
    log = tmp_path / "sweep.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, *overrides],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    sweep_dir = tmp_path / "runs" / "dimming_sweep"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        deadline = time.time() + 300
        while not _ended_trials(client, sweep_dir) and time.time() < deadline:
            assert proc.poll() is None, "the sweep ended before it could be interrupted"
            time.sleep(1)
        before = _ended_trials(client, sweep_dir)
        assert before, "no trial finished within 5 minutes"
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: Tune saves its state and stops
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, log.read_text()[-3000:]  # an interruption is not a crash
    results_before = {t: (sweep_dir / t / "result.json").read_text() for t in before}
    (parent,) = client.search_runs(
        [client.get_experiment_by_name("sdofm-dimming").experiment_id],
        "tags.`sdofm.task` = 'tune-dimming'",
    )
    assert parent.info.status == "KILLED"  # the interrupted sweep is not recorded as finished

    import ray

    from sdofm.runtime import init_ray

    if not ray.is_initialized():
        init_ray(num_cpus=2)
    result = sweep(load_config(None, overrides), "dimming", resume=True)
    assert len(result.table) == 3
    assert {r["status"] for r in result.table} <= {"finished", "stopped early"}
    for t in before:  # finished trials were not run again
        assert (sweep_dir / t / "result.json").read_text() == results_before[t]
    assert result.parent_run_id == parent.info.run_id  # the sweep's run is reopened
    assert client.get_run(result.parent_run_id).info.status == "FINISHED"
    children = client.search_runs(
        [client.get_experiment_by_name("sdofm-dimming").experiment_id],
        f"tags.mlflow.parentRunId = '{result.parent_run_id}'",
    )
    assert len(children) == 3  # one child run per trial, reopened rather than duplicated
    assert {c.info.status for c in children} <= {"FINISHED", "KILLED"}


@pytest.mark.usefixtures("ray_session")
def test_a_failing_trial_is_recorded_failed_and_the_sweep_goes_on(synth_root, tmp_path):
    _checkpoint(tmp_path / "backbone", channels=load_config().data.channels)
    overrides = [
        *_overrides(synth_root, tmp_path),
        "finetune.epochs=1",
        "finetune.freeze=frozen",
        "train.max_failures=0",  # a deterministic failure: no restarts of its Ray Train run
        # lr 1e38 overflows AdamW's first step: that trial fails
        "tune.space={lr: {choice: [1e38, 1e-3]}}",
    ]
    result = sweep(load_config(None, overrides), "dimming", num_samples=4, max_concurrent=2)
    by_lr = {}
    for r in result.table:
        by_lr.setdefault(r["params"]["lr"], set()).add(r["status"])
    assert by_lr == {1e38: {"error"}, 1e-3: {"finished"}}, result.table
    error = next(r["error"] for r in result.table if r["status"] == "error")
    assert error.startswith("RuntimeError:") and "overflow" in error  # the cause, not Ray's wrapper
    assert f"failed: {error}" in format_table(result.table, "val/mae")
    assert result.best["params"]["lr"] == 1e-3 and result.model_uri

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(result.parent_run_id).info.status == "FINISHED"
    for r in result.table:
        expected = {"error": "FAILED", "finished": "FINISHED"}[r["status"]]
        assert client.get_run(r["run_id"]).info.status == expected


def test_an_early_stopped_trial_ends_finished_with_its_reason_a_crash_failed(tmp_path):
    from types import SimpleNamespace

    from sdofm import tracking
    from sdofm.finetuning.tune import TrialEnds

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ends = TrialEnds(uri, "sdofm-dimming", "sweep", "/s", str(tmp_path))
    runs = {n: tracking.start_run(uri, "sdofm-dimming", f"sweep_{n}", "/s", {}) for n in "abc"}
    stopped = SimpleNamespace(trial_id="a", last_result={"epoch": 1, "mlflow_run_id": runs["a"]})
    done = SimpleNamespace(
        trial_id="b", last_result={"epoch": 2, "test/mae": 0.1, "mlflow_run_id": runs["b"]}
    )
    crashed = SimpleNamespace(trial_id="c", last_result=None)  # found by its run name
    ends.on_trial_complete(0, [], stopped)
    ends.on_trial_complete(0, [], done)
    ends.on_trial_error(0, [], crashed)
    client = MlflowClient(uri)
    got = {n: client.get_run(r) for n, r in runs.items()}
    assert {n: r.info.status for n, r in got.items()} == {
        "a": "FINISHED",
        "b": "FINISHED",
        "c": "FAILED",
    }
    assert got["a"].data.tags["sdofm.stopped"] == "asha early stop at epoch 1"
    assert "sdofm.stopped" not in got["b"].data.tags | got["c"].data.tags
