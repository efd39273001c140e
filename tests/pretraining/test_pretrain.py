"""Pretraining end to end on the synthetic store: DDP, resume, fault tolerance, MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from sdofm.engine import RunFailedError
from sdofm.pretraining import pretrain
from tests.conftest import small_config
from tests.faults import fail_at

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """Index and statistics shared by the runs of this module (they depend on the data only)."""
    return tmp_path_factory.mktemp("cache")


def _cfg(root, cache, tmp_path, *extra):
    return small_config(
        root,
        f"data.cache_dir={cache}",
        f"train.storage_path={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "model.name=mae_debug",
        "loader.readers=1",
        "loader.block_size=8",
        "loader.batch_size=8",
        "loader.shuffle_buffer=0",
        "train.lr=2e-3",
        "train.lr_batch=8",
        "train.epochs=5",
        "train.warmup_steps=3",
        "train.val_samples=16",
        "scaling.cpus_per_worker=0.25",
        "tracking.system_metrics=false",
        *extra,
    )


def _history(uri, run_id, key):
    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key)]


def test_ddp_run_learns_and_is_tracked(synth_root, cache_dir, tmp_path):
    cfg = _cfg(
        synth_root,
        cache_dir,
        tmp_path,
        "scaling.num_workers=2",
        "train.max_steps=36",
        "train.log_every=4",
        "train.checkpoint_every=12",
        "train.val_every=18",
        "transform.on=device",  # readers only decode; limb, scaling, z-score on the device
    )
    result = pretrain(cfg)
    assert result.metrics["step"] == 36

    loss = _history(result.tracking_uri, result.run_id, "train/loss")
    # Every log_every steps, and at validations.
    assert [s for s, _ in loss] == sorted({*range(4, 37, 4), 18})
    first, last = loss[0][1], min(v for _, v in loss[-3:])
    assert last < 0.8 * first, loss  # the masked reconstruction loss falls

    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["model.name"] == "mae_debug" and p["train.max_steps"] == "36"
    assert p["transform.on"] == "device"
    assert p["derived.world_size"] == "2" and p["derived.effective_batch"] == "16"
    assert int(p["derived.parameters"]) > 50_000
    # Only the sections that shape a pretraining run; the whole config is config.yaml.
    assert not [k for k in p if k.split(".")[0] in ("synth", "tune", "finetune", "tracking")]
    config = client.download_artifacts(result.run_id, "config.yaml", str(tmp_path))
    assert "synth:" in Path(config).read_text()
    val = _history(result.tracking_uri, result.run_id, "val/loss_171A")
    assert [s for s, _ in val] == [18, 36]
    # The encoder is a model of this run with its final metrics, not system samples.
    model = client.get_logged_model(result.model_uri.removeprefix("models:/"))
    assert model.name == "encoder" and model.source_run_id == result.run_id
    on_model = {m.key: (m.step, m.value) for m in model.metrics}
    assert on_model["val/loss_171A"] == val[-1]
    assert on_model["val/loss"] == _history(result.tracking_uri, result.run_id, "val/loss")[-1]
    assert model.params["model.name"] == "mae_debug"
    figures = [a.path for a in client.list_artifacts(result.run_id, "reconstructions")]
    assert figures == [
        "reconstructions/step_00000018_0.png",
        "reconstructions/step_00000036_0.png",
    ]
    # The final encoder is an MLflow model that loads as a plain module.
    import mlflow.pytorch
    import torch

    mlflow.set_tracking_uri(result.tracking_uri)
    encoder = mlflow.pytorch.load_model(result.model_uri)
    tokens = encoder.forward_features(torch.zeros(1, 12, 1, 32, 32))
    assert tokens.shape == (1, 1 + 16, 32)


def test_rerun_with_the_same_name_continues_from_the_last_checkpoint(
    synth_root, cache_dir, tmp_path, monkeypatch
):
    base = ["train.log_every=2", "train.checkpoint_every=4", "train.val_every=100"]
    crashing = _cfg(
        synth_root,
        cache_dir,
        tmp_path,
        *base,
        "train.max_steps=10",
        "train.max_failures=0",
    )
    fail_at(monkeypatch, step=6)
    with pytest.raises(RunFailedError, match="injected failure at step 6") as failed:
        pretrain(crashing)
    # The error says where the run stands and how to continue it.
    assert "newest complete checkpoint is step 4" in str(failed.value)
    assert "running the same command again" in str(failed.value)
    run_dir = tmp_path / "runs" / crashing.train.run_name
    assert sorted(p.name for p in run_dir.glob("checkpoint_0*")) == ["checkpoint_00000004"]

    again = _cfg(synth_root, cache_dir, tmp_path, *base, "train.max_steps=10")
    monkeypatch.undo()
    result = pretrain(again)
    assert result.metrics["step"] == 10
    state = json.loads((run_dir / "checkpoint_00000010" / "state.json").read_text())
    assert state["step"] == 10

    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.run_id)  # the same MLflow run, reopened
    assert run.data.tags["sdofm.resumed_at_step"] == "4"
    steps = [s for s, _ in _history(result.tracking_uri, result.run_id, "train/loss")]
    # Steps 2 and 4 from the first attempt; then 6..10 once, after resuming from step 4.
    assert steps == [2, 4, 6, 8, 10]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_injected_worker_crash_is_survived_with_max_failures(
    synth_root, cache_dir, tmp_path, monkeypatch
):
    cfg = _cfg(
        synth_root,
        cache_dir,
        tmp_path,
        "scaling.num_workers=2",
        "train.max_steps=8",
        "train.log_every=2",
        "train.checkpoint_every=3",
        "train.val_every=100",
        "train.max_failures=1",
    )
    fail_at(monkeypatch, step=5)
    result = pretrain(cfg)
    assert result.metrics["step"] == 8
    assert (tmp_path / "runs" / "pretrain" / "injected_failure").exists()
    run = MlflowClient(result.tracking_uri).get_run(result.run_id)
    assert run.data.tags["sdofm.resumed_at_step"] == "3"
    assert run.info.status == "FINISHED"


def test_unreachable_tracking_server_does_not_stop_training(synth_root, cache_dir, tmp_path):
    cfg = _cfg(
        synth_root,
        cache_dir,
        tmp_path,
        "tracking.uri=http://127.0.0.1:9",  # nothing listens on the discard port
        "train.max_steps=4",
        "train.log_every=2",
        "train.checkpoint_every=4",
        "train.val_every=4",
    )
    with pytest.warns(UserWarning, match="cannot be reached"):
        result = pretrain(cfg)
    assert result.run_id is None and result.metrics["step"] == 4
    local = tmp_path / "runs" / "pretrain" / "tracking"
    lines = [json.loads(x) for x in (local / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4] and "train/loss" in lines[0]
    assert "val/loss" in lines[1]
    assert list((local / "figures" / "reconstructions").glob("step_00000004_0.png"))


def best_constant_guess(head_cfg, prepared) -> float:
    """The dimming head's bar: the mean absolute error of the best constant guess, the
    median of the test split's own dimming factors (drawn from the seed and the sample ids;
    about (1 - 0.01) / 4)."""
    from sdofm.finetuning.tasks.dimming import Dimming

    ids = np.concatenate(
        [b["sample"] for b in prepared.datasets["test"].iter_batches(batch_format="numpy")]
    )
    alpha = Dimming(head_cfg, prepared.stats, prepared.sample_shape[-1]).alphas(ids, "test", 0)
    return float(np.abs(alpha - np.median(alpha)).mean())


def _active_units_by_hand(cfg, checkpoint) -> list[int]:
    """Active latent units per group of the NVAE at ``checkpoint`` over the run's validation
    subset: posterior means (eval mode) per sample, their variance over the samples > 0.01."""
    import torch

    from sdofm.datasets.index import load_or_build_index
    from sdofm.datasets.pipeline import SDOMLPipeline
    from sdofm.datasets.stats import load_or_compute_stats
    from sdofm.engine.checkpoint import load_checkpoint
    from sdofm.pretraining.objective import make_objective

    table, _ = load_or_build_index(cfg.data)
    stats = load_or_compute_stats(cfg.data, cfg.transform, cfg.loader, table)
    pipe = SDOMLPipeline(cfg.data, cfg.transform, cfg.loader, table, stats)
    n_val = pipe.num_samples("val")
    tc = cfg.train
    subset = np.sort(np.random.default_rng(tc.seed).permutation(n_val)[: tc.val_samples])
    batches = pipe.dataset("val", epoch=0, subset=subset).iter_batches(
        batch_size=64, batch_format="numpy"
    )
    images = np.concatenate([b["image"] for b in batches])
    assert len(images) == tc.val_samples == 64
    model = make_objective(cfg, pipe.sample_shape()).build_model()
    load_checkpoint(checkpoint, model)
    with torch.no_grad():
        means = model.eval().posterior_means(torch.from_numpy(images).float())
    return [int((m.double().numpy().var(axis=0) > 0.01).sum()) for m in means]


def test_nvae_pretrains_on_the_engine_and_serves_the_dimming_head(synth_root, cache_dir, tmp_path):
    from sdofm.finetuning.run import prepare, train_head
    from sdofm.finetuning.tasks import get_task
    from sdofm.models.nvae import NVAEEncoder

    cfg = _cfg(
        synth_root,
        cache_dir,
        tmp_path,
        # Active units are counted over the validation samples: the default val split is
        # one day, over which the Sun barely changes (AIA pixels vary across its samples by
        # 0.002 to 0.017 of their variance), so validate on two days four weeks apart.
        "data.split.val_months=[11,12]",
        "data.split.test_months=[7]",
        "model.name=nvae_debug",
        "model.objective.kl_warmup=0.5",
        "model.objective.free_bits=0.05",
        "train.run_name=nvae",
        "train.weight_decay=3e-4",
        "train.max_steps=80",
        "train.log_every=20",
        "train.checkpoint_every=40",
        "train.val_every=20",
        "train.val_samples=64",
    )
    result = pretrain(cfg)
    assert result.metrics["step"] == 80
    elbo = _history(result.tracking_uri, result.run_id, "val/elbo")
    assert [s for s, _ in elbo] == [20, 40, 60, 80]
    assert elbo[-1][1] > elbo[0][1], elbo  # the ELBO improves on the synthetic Sun

    client = MlflowClient(result.tracking_uri)
    metrics = client.get_run(result.run_id).data.metrics
    groups = 4  # nvae_debug: 2 scales x 2 groups
    active = [metrics[f"val/active_units_g{g}"] for g in range(groups)]
    # Counted again here: the final checkpoint's posterior means on the same 64 validation
    # samples (the run's fixed seeded subset), a unit active where their variance over the
    # samples exceeds 0.01 (Burda et al. 2016), computed in float64 with numpy.
    by_hand = _active_units_by_hand(cfg, tmp_path / "runs" / "nvae" / "checkpoint_00000080")
    assert active == by_hand, (active, by_hand)
    # No posterior collapse: in every group at least a tenth of the latent variables (of
    # 4 x 8 x 8 or 4 x 16 x 16) carry information about their sample (this run: 19, 32, 38
    # and 41 %); a collapsed group, whose posterior is its prior whatever the input, has none.
    sizes = [256, 256, 1024, 1024]
    assert all(n / 10 <= a <= n for a, n in zip(active, sizes, strict=True)), active
    for g in range(groups):
        assert metrics[f"val/kl_g{g}"] > 0
    assert sum(metrics[f"val/kl_g{g}"] for g in range(groups)) == pytest.approx(
        metrics["val/kl"], rel=1e-6
    )
    assert metrics["val/elbo"] == pytest.approx(-(metrics["val/recon"] + metrics["val/kl"]))
    paths = {
        a.path
        for d in ("reconstructions", "samples")
        for a in client.list_artifacts(result.run_id, d)
    }
    assert {"reconstructions/step_00000080_0.png", "samples/step_00000080.png"} <= paths
    state = json.loads(
        (tmp_path / "runs" / "nvae" / "checkpoint_00000080" / "state.json").read_text()
    )
    assert state["encoder_family"] == "nvae"

    import mlflow.pytorch
    import torch

    mlflow.set_tracking_uri(result.tracking_uri)
    encoder = mlflow.pytorch.load_model(result.model_uri)
    assert isinstance(encoder, NVAEEncoder)
    tokens = encoder.forward_features(torch.zeros(1, 12, 1, 32, 32))
    assert tokens.shape == (1, 1 + encoder.grid_size[1] * encoder.grid_size[2], encoder.embed_dim)

    # The encoder serves a finetuning head through the same backbone resolution as the MAE's.
    head_cfg = _cfg(
        synth_root,
        cache_dir,
        tmp_path,
        f"finetune.backbone={result.checkpoint}",
        "finetune.head=conv",
        "finetune.freeze=full",
        "finetune.epochs=2",
        "finetune.max_train_samples=64",
    )
    task = get_task("dimming")
    prepared = prepare(head_cfg, task)
    assert prepared.backbone.family == "nvae"
    fitted = train_head(head_cfg, task, prepared, None, "nvae_head", str(tmp_path / "runs"))
    assert fitted.metrics["epoch"] == 2
    assert fitted.metrics["test/mae"] < best_constant_guess(head_cfg, prepared)
