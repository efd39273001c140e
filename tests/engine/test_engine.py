"""Pieces of the engine that need no Ray: schedule, parameter groups, checkpoint round trip;
and the pretraining arithmetic around it (model set-up, steps)."""

from __future__ import annotations

import math

import pytest
import torch

from sdofm.config import ConfigError, load_config
from sdofm.engine.checkpoint import TrainState, load_checkpoint, save_checkpoint
from sdofm.engine.optim import lr_at, param_groups
from sdofm.models import get_model
from sdofm.pretraining.objective import model_kwargs
from sdofm.pretraining.run import plan_steps


def build_model(cfg, shape):
    return get_model(cfg.model.name, **model_kwargs(cfg.model, cfg.data.channels, shape))


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    peak, warmup, total = 1e-3, 10, 110
    lrs = [lr_at(s, peak, warmup, total, min_ratio=0.1) for s in range(total + 5)]
    assert lrs[0] == pytest.approx(peak / warmup) and lrs[9] == pytest.approx(peak)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10], strict=False))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[60] == pytest.approx(peak * (0.1 + 0.9 * 0.5))  # half way: cos = 0
    assert lrs[110] == pytest.approx(peak * 0.1) and lrs[-1] == pytest.approx(peak * 0.1)
    assert lr_at(0, peak, 0, total) == pytest.approx(peak)


def test_no_weight_decay_on_biases_norms_and_tokens():
    model = build_model(load_config(None, ["model.name=mae_debug"]), (12, 1, 32, 32))
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} >= {"cls_token", "mask_token", "norm.weight"}
    assert all(p.ndim == 2 or p.ndim == 5 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_model_follows_the_data_and_refuses_a_contradiction():
    cfg = load_config(None, ["model.name=mae_debug", "data.hmi_channels=[]"])
    model = build_model(cfg, (9, 2, 64, 64))
    assert (model.in_chans, model.num_frames, model.img_size) == (9, 2, (64, 64))
    bad = load_config(None, ["model.name=mae_debug", "model.overrides={in_chans: 12}"])
    with pytest.raises(ConfigError, match=r"in_chans = 12 but the data give 9"):
        build_model(bad, (9, 1, 32, 32))


def test_unknown_model_name_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model.name = 'mae_tny'.*did you mean 'mae_tiny'"):
        load_config(None, ["model.name=mae_tny"])


def test_steps_follow_workers_batch_and_accumulation():
    cfg = load_config(
        None,
        ["scaling.num_workers=2", "loader.batch_size=8", "train.grad_accum=2", "train.epochs=3"],
    )
    per_epoch, total = plan_steps(cfg, 100)  # 50 per worker -> 7 batches -> 3 steps
    assert (per_epoch, total) == (3, 9)
    cfg.train.max_steps = 4
    assert plan_steps(cfg, 100) == (3, 4)
    with pytest.raises(ValueError, match="no optimiser step"):
        plan_steps(cfg, 3)


def test_checkpoint_round_trip(tmp_path):
    cfg = load_config(None, ["model.name=mae_debug"])
    model = build_model(cfg, (12, 1, 32, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 12, 1, 32, 32))["loss"].backward()
    opt.step()
    save_checkpoint(tmp_path, model, {"model": opt}, TrainState(7, 1, 3), {"run_id": "abc"})
    fresh = build_model(cfg, (12, 1, 32, 32))
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    state = load_checkpoint(tmp_path, fresh, {"model": fresh_opt})
    assert state == TrainState(7, 1, 3)
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    assert fresh_opt.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    assert not math.isnan(float(fresh_opt.state_dict()["state"][0]["exp_avg"].sum()))


def test_every_job_takes_the_shared_loop_settings_from_the_config():
    """Pretraining and finetuning build their loop settings in one place: what the config
    says of clipping, accumulation, precision, compile, figures and system metrics
    reaches the loop whatever the job; the job's own settings are its own."""
    from sdofm.engine import loop_config

    cfg = load_config(
        None,
        [
            "train.grad_clip=0.5",
            "train.grad_accum=3",
            "train.compile=true",
            "train.seed=7",
            "tracking.figures=4",
            "tracking.system_metrics=true",
            "scaling.torch_threads=2",
        ],
    )
    lc = loop_config(cfg, epochs=2, schedule_steps=10, lr=0.1, batch_size=5)
    got = (lc.grad_clip, lc.grad_accum, lc.compile, lc.seed, lc.figures, lc.system_metrics)
    assert got == (0.5, 3, True, 7, 4, True)
    assert (lc.torch_threads, lc.epochs, lc.lr, lc.batch_size) == (2, 2, 0.1, 5)
