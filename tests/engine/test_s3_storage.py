"""Runs whose checkpoints live in object storage: the test S3 endpoint (moto over HTTP),
reached by Ray and sdofm through ``train.storage_options``."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from sdofm.finetuning.run import finetune
from sdofm.finetuning.tune import sweep
from sdofm.pretraining import pretrain
from tests.conftest import small_config
from tests.faults import fail_at
from tests.s3 import storage_options

pytestmark = pytest.mark.usefixtures("ray_session")

BUCKET = "engine-storage"


def _keys(s3_server, prefix: str) -> set[str]:
    """Object keys under ``prefix``, listed by boto3 (not through sdofm's filesystem)."""
    pages = (
        s3_server.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    )
    return {o["Key"][len(prefix) :] for p in pages for o in p.get("Contents", [])}


def test_pretraining_finetuning_and_the_sweep_keep_their_state_on_s3(
    s3_server, synth_root, tmp_path, monkeypatch
):
    s3_server.create_bucket(BUCKET)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = [
        f"data.cache_dir={tmp_path / 'cache'}",
        f"train.storage_path=s3://{BUCKET}/runs",
        f"train.storage_options={json.dumps(storage_options(s3_server.url))}",
        f"tracking.uri={uri}",
        "tracking.system_metrics=false",
        "loader.readers=1",
        "loader.batch_size=8",
        "scaling.cpus_per_worker=0.25",
    ]
    cfg = small_config(
        synth_root,
        *common,
        "model.name=mae_debug",
        "train.lr_batch=8",
        "train.max_steps=4",
        "train.log_every=1",
        "train.checkpoint_every=2",
        "train.val_every=4",
        "train.val_samples=8",
        "train.max_failures=1",
    )
    fail_at(monkeypatch, step=3)  # the restart reads step 2's checkpoint back from S3
    result = pretrain(cfg)
    assert result.metrics["step"] == 4
    assert result.checkpoint == f"s3://{BUCKET}/runs/pretrain/checkpoint_00000004"
    assert {"model.pt", "optimizer.pt", "state.json", "metrics.jsonl"} <= _keys(
        s3_server, "runs/pretrain/checkpoint_00000004/"
    )
    assert "injected_failure" in _keys(s3_server, "runs/pretrain/")
    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["sdofm.resumed_at_step"] == "2"
    assert run.data.tags["sdofm.checkpoint"] == result.checkpoint and result.model_uri
    steps = [m.step for m in client.get_metric_history(result.run_id, "train/loss")]
    assert steps == [1, 2, 3, 4]  # step 3 was trained twice, logged once

    # A head on that backbone, its checkpoints on S3 too: trained, logged as a model, FINISHED.
    head = small_config(
        synth_root,
        *common,
        f"finetune.backbone={result.checkpoint}",
        "finetune.head=pool",
        "finetune.freeze=frozen",
        "finetune.epochs=1",
        "finetune.max_train_samples=16",
        "finetune.batch_size=8",
        "tune.space={lr: {choice: [1e-3]}}",
    )
    tuned = finetune(head, "dimming")
    assert tuned.checkpoint.startswith(f"s3://{BUCKET}/runs/") and tuned.model_uri
    assert client.get_run(tuned.run_id).info.status == "FINISHED"

    swept = sweep(head, "dimming", num_samples=1, max_concurrent=1)
    assert swept.best is not None and swept.best["checkpoint"].startswith(f"s3://{BUCKET}/runs/")
    assert swept.model_uri and client.get_run(swept.parent_run_id).info.status == "FINISHED"
    assert any(k.startswith("experiment_state") for k in _keys(s3_server, "runs/dimming_sweep/"))
