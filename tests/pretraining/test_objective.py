"""The pretraining objectives' per-sample reconstruction scores (what `sdofm evaluate` and
validation report): fixed draws per sample id, shared by every model of one architecture."""

from __future__ import annotations

import pytest
import torch

from sdofm.config import ConfigError, load_config
from sdofm.pretraining.objective import scoring_objective

CHANNELS = load_config().data.channels
KWARGS = {"img_size": 32, "in_chans": 12, "num_frames": 1}


def test_masks_follow_the_sample_id_not_the_batch_or_the_weights():
    objective = scoring_objective("mae", "mae_debug", KWARGS, CHANNELS, seed=3)
    a, b = (objective.build_model().eval() for _ in range(2))  # two random weight draws
    imgs = torch.randn(3, 12, 1, 32, 32)
    with torch.no_grad():
        one = objective.masked_forward(a, imgs, [7, 8, 9])["mask"]
        other = objective.masked_forward(b, imgs[[2, 0]], [9, 7])["mask"]
        assert torch.equal(other, one[[2, 0]])  # same id, same mask; batching plays no part
        assert one.sum(1).tolist() == [12.0] * 3 and not torch.equal(one[0], one[1])
        seed4 = scoring_objective("mae", "mae_debug", KWARGS, CHANNELS, seed=4)
        assert not torch.equal(seed4.masked_forward(a, imgs, [7, 8, 9])["mask"], one)
        # sample_errors is the loss on those masks, per sample and channel
        sums, weight = objective.sample_errors(a, imgs, [7, 8, 9])
        out = objective.masked_forward(a, imgs, [7, 8, 9])
    assert sums.shape == (3, 12) and weight.tolist() == [12.0] * 3
    torch.testing.assert_close((sums.sum(0) / weight.sum()).mean(), out["loss"])


def test_nvae_scores_are_the_reconstruction_term_per_channel_on_fixed_draws():
    """The per-channel score is the Gaussian NLL of that channel's frames under the decoder's
    output for the seeded posterior draw, computed here by hand in float64 from (mu, logsig);
    two frames per channel, so a slip between the (C * T) stacking and the channels shows."""
    import math

    import numpy as np

    from sdofm.pretraining.objective import draw_seed

    kwargs = {**KWARGS, "num_frames": 2}
    objective = scoring_objective("nvae", "nvae_debug", kwargs, CHANNELS, seed=0)
    model = objective.build_model().eval()
    gen = torch.Generator().manual_seed(1)
    imgs = torch.randn(2, 12, 2, 32, 32, generator=gen)
    err, weight = objective.sample_errors(model, imgs, [5, 6])
    again, _ = objective.sample_errors(model, imgs, [5, 6])
    assert err.shape == (2, 12) and weight.tolist() == [1.0, 1.0]
    assert torch.equal(err, again)  # the posterior draws are fixed by the seed and the ids

    torch.manual_seed(draw_seed(0, 5))  # the draw sample_errors makes for a batch led by id 5
    with torch.no_grad():
        mu, logsig, _, _ = model.decoder_net(model.bottom_up(imgs), 2)
    x = imgs.double().numpy()
    mu, logsig = mu.double().numpy(), logsig.double().numpy()
    want = np.empty((2, 12))
    for c in range(12):
        frames = [c * 2 + t for t in range(2)]  # stacked (B, C * T, H, W): index c * T + t
        z = (x[:, c] - mu[:, frames]) / np.exp(logsig[:, frames])
        want[:, c] = (0.5 * math.log(2 * math.pi) + logsig[:, frames] + 0.5 * z**2).mean((1, 2, 3))
    np.testing.assert_allclose(err.double().numpy(), want, rtol=1e-5)
    # The same draw through the model's loss: the scores average to its reconstruction term.
    torch.manual_seed(draw_seed(0, 5))
    with torch.no_grad():
        recon = model(imgs)["recon"]
    torch.testing.assert_close(err.mean(), recon, rtol=1e-5, atol=0)
    # Channel order: ruin one channel's frames and its score, not another's, is the worst.
    ruined = imgs.clone()
    ruined[:, 7] += 20.0
    worse, _ = objective.sample_errors(model, ruined, [5, 6])
    assert worse.argmax(dim=1).tolist() == [7, 7], worse
    assert (worse[:, 7] > 10 * err[:, 7]).all()


@pytest.mark.parametrize("prob", [1.0, 0.5])
def test_dimming_augmentation_equals_dimming_in_physical_units_then_the_transform(prob):
    """train.augment_dim_min: the jitter on model inputs must equal transforms.dim on the
    physical image followed by the numpy Preprocessor (the dimming task's own path); with
    train.augment_dim_prob < 1 the samples not drawn keep their inputs bit for bit."""
    import numpy as np

    from sdofm.datasets.blocks import make_preprocessor
    from sdofm.datasets.transforms import DEFAULT_SCALING, dim
    from sdofm.pretraining.objective import make_objective

    overrides = ["train.augment_dim_min=0.05", f"train.augment_dim_prob={prob}"]
    cfg = load_config(None, [*overrides, "model.name=nvae_debug"])
    d = cfg.data
    rng = np.random.default_rng(0)
    stats = {
        "channels": {c: {"mean": rng.uniform(0, 3), "std": rng.uniform(0.2, 2)} for c in CHANNELS}
    }
    B, S = 8, 16
    x = np.empty((B, len(CHANNELS), 1, S, S), np.float32)
    for c, name in enumerate(CHANNELS):
        method, lo, hi = DEFAULT_SCALING[name]
        if method == "log":  # 20-40 % of the pixels below clip_min, the rest inside the clip
            x[:, c] = np.exp(rng.uniform(np.log(lo / 10), np.log(hi), size=(B, 1, S, S)))
        else:
            x[:, c] = rng.uniform(lo, hi, size=(B, 1, S, S))
    objective = make_objective(cfg, (len(CHANNELS), 1, S, S), stats)
    assert objective.augment is not None
    pre = make_preprocessor(CHANNELS, cfg.transform, S, stats)
    inputs = torch.from_numpy(np.stack([pre(img) for img in x]))
    torch.manual_seed(11)
    out = objective.train_inputs({"image": inputs}, torch.device("cpu"))
    torch.manual_seed(11)  # the same draws: (B, AIA channels) factors in [0.05, 1], then
    aia = [i for i, c in enumerate(CHANNELS) if c in d.aia_channels]  # which samples
    alpha = (torch.rand(B, len(aia)) * 0.95 + 0.05).numpy()
    chosen = (torch.rand(B) < prob).numpy() if prob < 1 else np.ones(B, bool)
    assert 0 < chosen.sum() <= B and (prob == 1) == chosen.all()  # both kinds when prob < 1
    for b in range(B):
        if not chosen[b]:
            assert torch.equal(out[b], inputs[b])
            continue
        factors = np.ones(len(CHANNELS), np.float32)
        factors[aia] = alpha[b]
        expect = pre(dim(x[b], factors))
        np.testing.assert_allclose(out[b].numpy(), expect, rtol=1e-5, atol=2e-5)
        assert (out[b, aia] < inputs[b, aia] - 1e-3).any()  # something was dimmed
    hmi = [i for i in range(len(CHANNELS)) if i not in aia]
    assert torch.equal(out[:, hmi], inputs[:, hmi])  # magnetograms are never dimmed
    assert torch.equal(inputs, torch.from_numpy(np.stack([pre(img) for img in x])))  # input kept
    # Without statistics (scoring only) there is no augmentation; off by default.
    assert make_objective(cfg, (len(CHANNELS), 1, S, S)).augment is None
    assert make_objective(load_config(), (len(CHANNELS), 1, S, S), stats).augment is None
    with pytest.raises(ConfigError, match="set augment_dim_min"):  # a share of nothing
        load_config(None, ["train.augment_dim_prob=0.5"])


def _dimmed_mae_objective(target: str):
    """(objective, shape, overrides) of mae_debug dimming its inputs, scoring ``target``."""
    import numpy as np

    from sdofm.pretraining.objective import make_objective

    shape = (len(CHANNELS), 1, 32, 32)
    rng = np.random.default_rng(0)
    stats = {
        "channels": {c: {"mean": rng.uniform(0, 3), "std": rng.uniform(0.2, 2)} for c in CHANNELS}
    }
    overrides = ["model.name=mae_debug", "train.augment_dim_min=0.05"]
    cfg = load_config(None, [*overrides, f"train.augment_dim_target={target}"])
    return make_objective(cfg, shape, stats), shape, stats, overrides


def _masked_mse(pred, target, mask):
    """The masked MSE by hand: each patch's mean square error, averaged over masked patches."""
    err = (pred - target).pow(2).mean(-1)
    return (err * mask).sum() / mask.sum()


def test_restoring_reconstruction_scores_the_dimmed_input_against_the_undimmed_sample():
    """train.augment_dim_target=observed: the MAE sees the dimmed sample and its masked
    patches are scored against the sample as observed: the loss is the MSE, computed here by
    hand from the model's own prediction and mask, to the undimmed patches, not to the
    dimmed ones."""
    from sdofm.pretraining.objective import make_objective

    objective, shape, stats, overrides = _dimmed_mae_objective("observed")
    model = objective.build_model()
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(5)
    loss = objective.loss(model, {"image": x}, None, None, torch.device("cpu"))
    torch.manual_seed(5)  # the same draws: the dimming factors, then the masks
    dimmed = objective.augment(x)
    out = model(dimmed)
    assert (dimmed < x - 1e-3).any()  # the input was dimmed
    torch.testing.assert_close(loss, _masked_mse(out["pred"], model.patchify(x), out["mask"]))
    assert (loss - out["loss"]).abs().item() > 1e-3  # the dimmed target scores otherwise
    # Off by default; plain reconstruction scores the dimmed input against itself.
    plain = make_objective(load_config(None, overrides), shape, stats)
    torch.manual_seed(5)
    torch.testing.assert_close(plain.loss(model, {"image": x}, None, None, "cpu"), out["loss"])
    with pytest.raises(ConfigError, match="set augment_dim_min"):
        load_config(None, ["train.augment_dim_target=observed"])
    with pytest.raises(ConfigError, match="augment_dim_target"):  # a misspelt target
        load_config(None, [*overrides, "train.augment_dim_target=undimmed"])
    for target in ("observed", "both"):
        nvae = load_config(
            None, ["model.name=nvae_debug", *overrides[1:], f"train.augment_dim_target={target}"]
        )
        with pytest.raises(ConfigError, match=f"augment_dim_target='{target}': nvae backbones"):
            make_objective(nvae, shape, stats)


def test_both_targets_score_two_heads_against_the_dimmed_and_the_undimmed_sample():
    """train.augment_dim_target=both: one encoder pass, two predictions of each masked
    patch; the loss is the mean of the first head's MSE to the dimmed input and the second
    head's to the sample as observed (computed by hand from the model's outputs). The
    second head is part of the recorded model, and the encoder is the plain MAE's."""
    from sdofm.models import get_model

    objective, shape, _, _ = _dimmed_mae_objective("both")
    assert objective.kwargs["restore_head"] is True  # recorded in the checkpoint's meta
    assert objective.checkpoint_meta(objective.build_model())["model_config"]["restore_head"]
    model = objective.build_model()
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(5)
    loss = objective.loss(model, {"image": x}, None, None, torch.device("cpu"))
    torch.manual_seed(5)
    dimmed = objective.augment(x)
    out = model(dimmed, restored=x)
    assert (dimmed < x - 1e-3).any()
    first = _masked_mse(out["pred"], model.patchify(dimmed), out["mask"])
    second = _masked_mse(out["pred_restored"], model.patchify(x), out["mask"])
    torch.testing.assert_close(loss, (first + second) / 2)
    assert (first - second).abs().item() > 1e-3  # two heads, two targets
    assert not torch.equal(out["pred"], out["pred_restored"])
    # The encoder is the plain MAE's: the same weights load into a model without the head.
    plain = get_model(
        "mae_debug", **{k: v for k, v in objective.kwargs.items() if k != "restore_head"}
    )
    missing = set(model.state_dict()) - set(plain.state_dict())
    assert missing == {"decoder_pred_restored.weight", "decoder_pred_restored.bias"}
    with pytest.raises(ValueError, match="restore_head"):
        plain(dimmed, restored=x)
