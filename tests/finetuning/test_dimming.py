"""The dimming task: the transform, heads and freezing, backbones, and a training run."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sdofm.config import ConfigError, load_config
from sdofm.datasets.blocks import make_preprocessor
from sdofm.datasets.inputs import build_inputs
from sdofm.engine.checkpoint import TrainState, save_checkpoint
from sdofm.finetuning.backbone import resolve_backbone
from sdofm.finetuning.run import prepare, train_head
from sdofm.finetuning.tasks import get_task
from sdofm.finetuning.tasks.dimming import Dimming, alpha_metrics, dimmed_channels
from sdofm.models import get_model
from sdofm.models.heads import BaselineCNN, EncoderRegressor
from tests.conftest import small_config

STATS = {
    "channels": {
        c: {"mean": 0.1 * i, "std": 1.0 + 0.1 * i}
        for i, c in enumerate(load_config().data.channels)
    }
}


def _physical(n=3, size=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(50, 500, size=(n, 12, 1, size, size)).astype(np.float32)
    x[:, 9:] = rng.normal(0, 300, size=(n, 3, 1, size, size))  # HMI in Gauss
    return x


def test_dimming_is_applied_in_physical_units_before_scaling():
    cfg = load_config(None, ["finetune.alpha_min=0.2"])
    dim = Dimming(cfg, STATS, 16)
    images, ids = _physical(), np.array([5, 9, 11])
    x, alpha = dim(images, ids, "train", epoch=3)
    assert alpha.shape == (3, 9) and (alpha >= 0.2).all() and (alpha <= 1).all()
    pre = make_preprocessor(cfg.data.channels, cfg.transform, 16, STATS)
    for j in range(3):
        by_hand = images[j].copy()
        by_hand[:9] *= alpha[j][:, None, None, None]  # AIA only; HMI is never dimmed
        np.testing.assert_allclose(x[j], pre(by_hand), rtol=1e-5, atol=1e-5)
    # Changing alpha changes only the AIA channels of the model input.
    x1, _ = dim(images, ids, "train", epoch=4)
    assert not np.allclose(x1[:, :9], x[:, :9]) and np.array_equal(x1[:, 9:], x[:, 9:])
    assert np.array_equal(images, _physical())  # the input is left alone


def test_dimming_factors_are_reproducible_fresh_per_epoch_and_fixed_for_evaluation():
    dim = Dimming(load_config(), STATS, 16)
    ids = np.arange(50)
    a = dim.alphas(ids, "train", 0)
    assert np.array_equal(a, Dimming(load_config(), STATS, 16).alphas(ids, "train", 0))
    assert np.array_equal(a[10:20], dim.alphas(ids[10:20], "train", 0))  # per sample
    assert not np.allclose(a, dim.alphas(ids, "train", 1))
    assert not np.allclose(dim.alphas(ids, "val", 0), dim.alphas(ids, "test", 0))
    other_seed = Dimming(load_config(None, ["finetune.dim_seed=1"]), STATS, 16)
    assert not np.allclose(a, other_seed.alphas(ids, "train", 0))
    assert abs(a.mean() - (0.01 + 1) / 2) < 0.05  # uniform on [alpha_min, 1]


def test_dimming_needs_aia_channels():
    with pytest.raises(ConfigError, match="needs AIA channels"):
        dimmed_channels(load_config(None, ["data.aia_channels=[]"]))
    cfg = load_config(None, ["data.aia_channels=[171A, 193A]"])
    assert dimmed_channels(cfg) == [0, 1]


def test_metrics_per_channel():
    true = np.array([[0.5, 0.2], [0.9, 0.4]])
    pred = np.array([[0.52, 0.5], [0.8, 0.41]])
    m = alpha_metrics(pred, true, ["171A", "193A"], 0.05, "val")
    assert m["val/mae_171A"] == pytest.approx(0.06) and m["val/mae_193A"] == pytest.approx(0.155)
    assert m["val/success_171A"] == 0.5 and m["val/success_193A"] == 0.5
    assert m["val/mae"] == pytest.approx(np.abs(pred - true).mean())


def test_success_tolerances_come_from_the_config():
    assert load_config().finetune.success_tolerance == [0.05, 0.1]  # Dos Santos et al.
    cfg = load_config(None, ["finetune.success_tolerance=0.2"])
    assert cfg.finetune.success_tolerance == [0.2]  # one number: a list of one
    assert get_task("dimming").board(cfg) == (("mae", False), ("success_0.2", True))
    with pytest.raises(ConfigError, match="listed twice"):
        load_config(None, ["finetune.success_tolerance=[0.1, 0.1]"])
    with pytest.raises(ConfigError, match="greater than 0"):
        load_config(None, ["finetune.success_tolerance=[0.1, 0]"])
    true = np.array([[0.5, 0.2], [0.9, 0.4]])
    pred = np.array([[0.52, 0.5], [0.8, 0.41]])  # errors 0.02, 0.3, 0.1, 0.01
    m = alpha_metrics(pred, true, ["171A", "193A"], [0.15, 0.05], "test")
    assert m["test/success"] == m["test/success_0.15"] == 0.75
    assert m["test/success_0.05"] == 0.5
    assert m["test/success_171A"] == 1.0 and m["test/success_193A"] == 0.5  # the first


@pytest.mark.parametrize(
    ("freeze", "blocks", "trainable_blocks"),
    [("frozen", 0, 0), ("partial", 1, 1), ("partial", 2, 2), ("full", 0, 2)],
)
def test_freezing(freeze, blocks, trainable_blocks):
    encoder = get_model("mae_debug").encoder()
    model = EncoderRegressor(encoder, 9, "conv", 16, freeze, blocks)
    n_blocks = len(encoder.blocks)
    trainable = [
        i for i, b in enumerate(encoder.blocks) if all(p.requires_grad for p in b.parameters())
    ]
    assert trainable == list(range(n_blocks - trainable_blocks, n_blocks))
    assert all(p.requires_grad for p in model.head.parameters())
    assert encoder.patch_embed.proj.weight.requires_grad == (freeze == "full")
    out = model(torch.randn(2, 12, 1, 32, 32))
    assert out.shape == (2, 9) and ((out > 0) & (out < 1)).all()
    out.sum().backward()
    grads = [p.grad is not None for p in encoder.parameters()]
    assert any(grads) == (trainable_blocks > 0)


@pytest.mark.parametrize("freeze", ["partial", "full"])
def test_a_trained_encoder_learns_at_its_share_of_the_head_lr(freeze):
    cfg = load_config(None, ["finetune.encoder_lr_scale=0.1"])
    encoder = get_model("mae_debug").encoder()
    model = EncoderRegressor(encoder, 9, "conv", 16, freeze, 1)
    prepared = SimpleNamespace(sample_shape=(12, 1, 32, 32), backbone=None, stats=None)
    opt = get_task("dimming").objective(cfg, prepared).optimizers(model)["model"]
    groups = {g.get("lr_scale", 1.0): {id(p) for p in g["params"]} for g in opt.param_groups}
    trained = {id(p) for p in encoder.parameters() if p.requires_grad}
    assert set(groups) == {1.0, 0.1} and groups[0.1] == trained and trained
    assert groups[1.0] == {id(p) for p in model.head.parameters()}
    # Scratch (no encoder) and the default: one group at the head's rate.
    head_only = get_task("dimming").objective(load_config(), prepared)
    (group,) = head_only.optimizers(BaselineCNN(12, 1, 9))["model"].param_groups
    assert group.get("lr_scale", 1.0) == 1.0


def test_baseline_cnn_stacks_frames_as_channels():
    out = BaselineCNN(12, 2, 9)(torch.randn(3, 12, 2, 32, 32))
    assert out.shape == (3, 9) and ((out > 0) & (out < 1)).all()


def _checkpoint(path, channels=None, **model_overrides):
    model = get_model("mae_debug", **model_overrides)
    opt = torch.optim.AdamW(model.parameters())
    path.mkdir(parents=True)
    extra = {
        "encoder_config": model.encoder_config,
        "encoder_family": "mae",
        "channels": channels,
    }
    save_checkpoint(path, model, {"model": opt}, TrainState(1, 0, 0), extra)
    return model


def test_backbone_from_a_checkpoint_loads_only_encoder_weights(tmp_path):
    model = _checkpoint(tmp_path / "ckpt", channels=load_config().data.channels)
    b = resolve_backbone(str(tmp_path / "ckpt"), f"sqlite:///{tmp_path}/m.db", "x")
    enc = b.encoder()
    x = torch.randn(1, 12, 1, 32, 32)
    torch.testing.assert_close(enc.forward_features(x), model.forward_features(x))
    cfg = load_config(None, ["finetune.head=pool"])
    b.check(cfg, (12, 1, 32, 32))
    reg = get_task("dimming").build_head(cfg, (12, 1, 32, 32), b)
    assert reg(x).shape == (1, 9)
    # A state dict without some encoder weights is refused, naming them.
    del b.state_dict["norm.weight"]
    with pytest.raises(ConfigError, match="norm.weight"):
        b.encoder()


def test_backbone_that_does_not_fit_the_data_is_refused_naming_both(tmp_path):
    _checkpoint(tmp_path / "c", channels=["171A", "193A"], in_chans=2, img_size=64)
    b = resolve_backbone(str(tmp_path / "c"), f"sqlite:///{tmp_path}/m.db", "x")
    with pytest.raises(ConfigError) as e:
        b.check(load_config(), (12, 1, 32, 32))
    msg = str(e.value)
    assert "['171A', '193A']" in msg and "'Bz'" in msg and "64 px" in msg and "32 px" in msg


def test_no_pretraining_run_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no finished pretraining run in MLflow experiment"):
        resolve_backbone(None, f"sqlite:///{tmp_path}/m.db", "sdofm-pretrain")
    with pytest.raises(ConfigError, match="no such MLflow run"):
        resolve_backbone("0123456789abcdef", f"sqlite:///{tmp_path}/m.db", "sdofm-pretrain")
    # A file of the run folder, or a folder that is not a checkpoint, is not a backbone
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")
    for path in (tmp_path / "checkpoint_manager_snapshot.json", tmp_path):
        with pytest.raises(ConfigError, match="not a pretraining checkpoint folder"):
            resolve_backbone(str(path), f"sqlite:///{tmp_path}/m.db", "sdofm-pretrain")


@pytest.mark.usefixtures("ray_session")
def test_the_head_beats_the_best_constant_guess_on_the_test_split(synth_root, tmp_path):
    _checkpoint(tmp_path / "backbone", channels=load_config().data.channels)
    cfg = small_config(
        synth_root,
        f"data.cache_dir={tmp_path / 'cache'}",
        f"train.storage_path={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"finetune.backbone={tmp_path / 'backbone'}",
        "finetune.head=conv",
        "finetune.freeze=full",
        "finetune.epochs=4",
        "finetune.batch_size=16",
        "finetune.max_val_samples=24",
        "loader.readers=1",
        "scaling.cpus_per_worker=0.25",
    )
    task = get_task("dimming")
    prepared = prepare(cfg, task)
    assert prepared.counts["train"] > 100 and prepared.counts["test"] > 10
    # Validation on a seeded subset of 24 samples spread over the val split; test whole.
    whole = build_inputs(cfg).pipeline

    def times(ds):
        return np.concatenate([b["time"][:, -1] for b in ds.iter_batches(batch_format="numpy")])

    val, every = times(prepared.datasets["val"]), np.sort(times(whole.dataset("val", epoch=0)))
    assert prepared.counts["val"] == 24 and len(set(val.tolist())) == 24
    assert set(val.tolist()) <= set(every.tolist()) and len(every) > 2 * 24
    assert val.max() > every[2 * 24]  # not the first samples of the split: drawn over it
    assert prepared.counts["test"] == whole.num_samples("test")

    # The test split's true factors, drawn as the task's spec says: U[alpha_min, 1] per
    # channel from a generator seeded with (dim_seed, split code 2 = test, epoch 0, sample).
    ids = np.concatenate(
        [b["sample"] for b in prepared.datasets["test"].iter_batches(batch_format="numpy")]
    )
    fc = cfg.finetune
    true = np.stack(
        [
            np.random.default_rng([fc.dim_seed, 2, 0, int(i)]).uniform(fc.alpha_min, 1.0, 9)
            for i in ids
        ]
    )
    # The best constant guess in hindsight: each channel's median on the test split itself.
    constant_mae = float(np.abs(true - np.median(true, axis=0)).mean())
    assert constant_mae == pytest.approx((1 - fc.alpha_min) / 4, rel=0.25)  # U[a, 1]: (1-a)/4

    result = train_head(cfg, task, prepared, None, "head", str(tmp_path / "runs"))
    m = result.metrics
    print({k: round(m[k], 4) for k in ("val/mae", "test/mae", "test/success")}, constant_mae)
    assert m["epoch"] == 4 and set(m) >= {"val/mae_171A", "test/mae_1700A", "test/success"}
    assert m["test/mae"] < 0.8 * constant_mae, (m["test/mae"], constant_mae)
    scatter = tmp_path / "runs" / "head" / "tracking" / "figures"  # no MLflow run: kept locally
    assert (scatter / "scatter_test.png").exists() and (scatter / "scatter_val.png").exists()


def test_backbone_from_an_mlflow_model_uri(tmp_path):
    from sdofm import tracking

    uri = f"sqlite:///{tmp_path}/m.db"
    run_id = tracking.start_run(uri, "sdofm-pretrain", "p", "/s", {})
    encoder = get_model("mae_debug").encoder().eval()
    model_uri = tracking.log_model(uri, run_id, encoder, np.zeros((1, 12, 1, 32, 32), np.float32))
    b = resolve_backbone(model_uri, uri, "sdofm-pretrain")
    x = torch.randn(1, 12, 1, 32, 32)
    torch.testing.assert_close(b.encoder().forward_features(x), encoder.forward_features(x))
    b.check(load_config(), (12, 1, 32, 32))
