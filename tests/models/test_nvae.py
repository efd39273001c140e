"""NVAE: the KL, the loss terms and their balancing, the prior, spectral regularisation,
active units and the encoder contract of the finetuning heads."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from sdofm.models import get_model
from sdofm.models.heads import EncoderRegressor
from sdofm.models.mae import count_parameters
from sdofm.models.nvae import (
    NVAE,
    Conv2d,
    NVAEEncoder,
    active_units,
    active_units_from_moments,
    kl_balance_coeffs,
    kl_normal,
    kl_warmup_weight,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def batch_for(model: NVAEEncoder, batch_size: int = 2) -> torch.Tensor:
    """-> (B, C, T, H, W) random images of the model's input shape."""
    return torch.randn(batch_size, model.in_chans, model.num_frames, *model.img_size)


# --------------------------------------------------------------------------------------------
# probability


def test_kl_normal_matches_monte_carlo() -> None:
    mu_q, mu_p = torch.randn(6), torch.randn(6)
    logsig_q, logsig_p = 0.5 * torch.randn(6), 0.5 * torch.randn(6)
    kl = kl_normal(mu_q, logsig_q, mu_p, logsig_p)
    assert kl.shape == (6,) and (kl >= 0).all()

    q, p = Normal(mu_q, logsig_q.exp()), Normal(mu_p, logsig_p.exp())
    z = q.sample((200_000,))
    mc = (q.log_prob(z) - p.log_prob(z)).mean(0)
    torch.testing.assert_close(kl, mc, rtol=0.03, atol=0.02)
    torch.testing.assert_close(kl, kl_divergence(q, p))
    assert kl_normal(mu_q, logsig_q, mu_q, logsig_q).abs().max() < 1e-6


def test_kl_balance_coeffs_follow_size_times_kl() -> None:
    kl = torch.tensor([0.0, 1.0, 1.0, 3.0])
    sizes = torch.tensor([1.0, 1.0, 4.0, 4.0])
    coeffs = kl_balance_coeffs(kl, sizes)
    torch.testing.assert_close(coeffs.sum(), torch.tensor(4.0))
    gamma = sizes * (kl + 0.01)
    torch.testing.assert_close(coeffs, 4 * gamma / gamma.sum())
    assert not kl_balance_coeffs(kl.requires_grad_(), sizes).requires_grad


def test_kl_warmup_weight() -> None:
    weights = [kl_warmup_weight(step, 100) for step in range(100)]
    assert weights[0] == 1e-4 and weights[15] == pytest.approx(0.5)
    assert all(a <= b for a, b in zip(weights, weights[1:], strict=False))
    assert weights[29] < 1.0 and set(weights[30:]) == {1.0}
    assert kl_warmup_weight(0, 100, warmup_portion=0.0) == 1.0


# --------------------------------------------------------------------------------------------
# the autoencoder


def test_forward_backward_debug() -> None:
    model = get_model("nvae_debug")
    assert isinstance(model, NVAE) and model.num_latent_groups == 4
    imgs = batch_for(model)
    out = model(imgs)
    assert out["x_hat"].shape == imgs.shape
    assert out["kl"].shape == (4,) and (out["kl"] >= 0).all()
    for key in ("loss", "recon", "elbo"):
        assert out[key].ndim == 0 and torch.isfinite(out[key]), key
    torch.testing.assert_close(out["elbo"], -(out["recon"] + out["kl"].sum()))

    out["loss"].backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name


def test_bf16_autocast_keeps_the_densities_in_float32() -> None:
    model = get_model("nvae_debug")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch_for(model))
    assert out["loss"].dtype == out["kl"].dtype == torch.float32
    assert torch.isfinite(out["loss"])
    out["loss"].backward()


def test_kl_balancing_during_warm_up_only() -> None:
    model = get_model("nvae_debug")
    imgs = batch_for(model, 4)
    G = model.num_latent_groups

    out = model(imgs, kl_weight=0.3)
    coeffs, kl = out["kl_coeffs"], out["kl"]
    torch.testing.assert_close(coeffs.sum(), torch.tensor(float(G)))
    assert not torch.allclose(coeffs, torch.ones(G))
    balanced = (coeffs * kl).sum()
    assert not torch.isclose(balanced, kl.sum())
    torch.testing.assert_close(out["loss"], out["recon"] + 0.3 * balanced)

    out = model(imgs, kl_weight=1.0)
    assert torch.equal(out["kl_coeffs"], torch.ones(G))
    torch.testing.assert_close(out["loss"], out["recon"] + out["kl"].sum())


def test_free_bits_floor_each_groups_kl() -> None:
    """Below `free_bits` nats per latent variable a group's KL costs nothing: with a floor
    above every group's KL the loss is the reconstruction plus the floors, counted by hand."""
    model = get_model("nvae_debug")
    imgs = batch_for(model, 4)
    out = model(imgs, free_bits=50.0)
    # latents per group (coarsest first): 4 channels x 8 x 8, 4 x 8 x 8, 4 x 16 x 16 twice
    floors = 50.0 * torch.tensor([256.0, 256.0, 1024.0, 1024.0]) / (12 * 32 * 32)
    assert (out["kl"] < floors).all()
    torch.testing.assert_close(out["loss"], out["recon"] + floors.sum())
    torch.testing.assert_close(out["elbo"], -(out["recon"] + out["kl"].sum()))  # the true KL

    out = model(imgs, free_bits=0.0)
    torch.testing.assert_close(out["loss"], out["recon"] + out["kl"].sum())


def test_top_group_prior_is_standard_normal() -> None:
    model = get_model("nvae_debug").eval()
    zs = model.decoder_net(None, 256)[3]
    z0 = zs[0]  # (256, 4, 8, 8): 65536 draws
    assert abs(float(z0.mean())) < 0.02 and abs(float(z0.std()) - 1.0) < 0.02
    assert torch.equal(model.decoder_net(None, 2, temperature=0.0)[3][0], torch.zeros(2, 4, 8, 8))
    # the group's KL is against N(0, 1): KL(q || N(0, 1)) from the posterior head by hand
    imgs = batch_for(model, 3)
    with torch.no_grad():
        feature = model.bottom_up(imgs)[-1]
        state = model.decoder_net.const.expand(3, -1, -1, -1)
        dmu, dlogsig = model.decoder_net.posterior[0](torch.cat([feature, state], 1)).chunk(2, 1)
        kl = kl_divergence(Normal(dmu, dlogsig.exp()), Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
        out = model(imgs)
    torch.testing.assert_close(out["kl"][0], kl.mean() / model.num_dims)


def test_recon_is_gaussian_nll_per_dimension() -> None:
    """With the output head zeroed the decoder predicts mean 0, log-scale 0 (then 5, clamped
    to 2) whatever the latents: the NLL per dim is known in closed form."""
    model = get_model("nvae_debug")
    imgs = batch_for(model, 3)
    head = model.decoder_net.out[-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        out = model(imgs)
        expected = 0.5 * math.log(2 * math.pi) + 0.5 * imgs.pow(2).mean()
        torch.testing.assert_close(out["recon"], expected)
        assert torch.equal(out["x_hat"], torch.zeros_like(imgs))
        per_channel = 0.5 * math.log(2 * math.pi) + 0.5 * imgs.pow(2).mean(dim=(2, 3, 4))
        torch.testing.assert_close(out["recon_channels"], per_channel)

        head.bias[model.in_chans :] = 5.0  # the log-scale half
        out = model(imgs)
        expected = 0.5 * math.log(2 * math.pi) + 2.0 + 0.5 * math.exp(-4.0) * imgs.pow(2).mean()
        torch.testing.assert_close(out["recon"], expected)
    assert model.num_dims == 12 * 32 * 32


def test_a_few_steps_lower_the_loss() -> None:
    """On white noise the NLL cannot fall below its entropy; a smooth pattern can be learnt."""
    model = get_model("nvae_debug")
    yy, xx = torch.meshgrid(torch.linspace(0, 3, 32), torch.linspace(0, 3, 32), indexing="ij")
    pattern = 2.0 * torch.sin(xx + torch.arange(12.0)[:, None, None] * yy)  # (12, 32, 32)
    imgs = pattern[None, :, None] + 0.1 * torch.randn(2, 12, 1, 32, 32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        out = model(imgs, kl_weight=0.1)
        loss = out["loss"] + 1e-4 * model.spectral_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < losses[0] - 0.12, losses


def test_prior_samples() -> None:
    model = get_model("nvae_debug").eval()
    x = model.sample(3)
    assert x.shape == (3, 12, 1, 32, 32) and torch.isfinite(x).all()
    assert torch.equal(model.sample(2, temperature=0.0), model.sample(2, temperature=0.0))
    assert not torch.equal(model.sample(2), model.sample(2))


def test_posterior_means_per_group() -> None:
    model = get_model("nvae_debug").eval()
    imgs = batch_for(model, 3)
    means = model.posterior_means(imgs)
    # coarsest first: 2 groups at 8 x 8, then 2 at 16 x 16
    assert [m.shape for m in means] == [(3, 4, 8, 8)] * 2 + [(3, 4, 16, 16)] * 2
    again = model.posterior_means(imgs)
    assert all(torch.equal(a, b) for a, b in zip(means, again, strict=True))
    assert active_units(means).shape == (4,)


def test_active_units_counts_varying_latent_variables() -> None:
    first = 1e-2 * torch.randn(100, 5, 3, 3)  # variance 1e-4: inactive
    first[:, [0, 2, 4]] += torch.randn(100, 3, 1, 1)  # variance ~1: 3 channels x 9 positions
    first[:, 1, 0, 2] += 0.5 * torch.randn(100)  # variance ~0.25 at one position only
    second = torch.ones(100, 4, 2, 2)
    assert active_units([first, second]).tolist() == [28, 0]
    assert active_units([first], threshold=10.0).tolist() == [0]

    # Running moments summed over batches (and workers) count as the whole set does.
    sums = [b.double().sum(0) for b in (first[:30], first[30:70], first[70:])]
    squares = [(b.double() ** 2).sum(0) for b in (first[:30], first[30:70], first[70:])]
    assert active_units_from_moments([sum(sums)], [sum(squares)], 100).tolist() == [28]
    variance = first.double().var(0, unbiased=False)  # by hand
    assert int((variance > 0.01).sum()) == 28 and variance[3].max() < 2e-4


def test_spectral_loss_estimates_the_largest_singular_values() -> None:
    model = get_model("nvae_debug").train()
    convs = [m for m in model.modules() if isinstance(m, Conv2d)]
    for _ in range(100):
        model.spectral_loss()
    exact = sum(
        torch.linalg.matrix_norm(m.weight.detach().reshape(m.out_channels, -1), ord=2)
        for m in convs
    )
    loss = model.spectral_loss()
    torch.testing.assert_close(loss.detach(), exact, rtol=0.02, atol=0.0)
    loss.backward()
    assert all(m.weight.grad is not None for m in convs)

    model.eval()  # evaluation leaves the power-iteration vectors alone
    u = [m.sr_u.clone() for m in convs]
    model.spectral_loss()
    assert all(torch.equal(a, m.sr_u) for a, m in zip(u, convs, strict=True))
    assert "stem.sr_u" in model.state_dict()  # persistent: resumed with the checkpoint


def test_rejects_bad_shapes() -> None:
    model = get_model("nvae_debug")
    with pytest.raises(ValueError):
        model(torch.randn(2, 12, 32, 32))  # no time axis
    with pytest.raises(ValueError):
        model(torch.randn(2, 12, 1, 16, 16))
    with pytest.raises(ValueError):
        get_model("nvae_debug", img_size=34)  # not divisible by 2^num_scales


def test_frames_are_stacked_as_channels() -> None:
    model = get_model("nvae_debug", num_frames=3)
    imgs = batch_for(model)
    assert model.stem.in_channels == 36
    out = model(imgs)
    assert out["x_hat"].shape == imgs.shape
    assert torch.equal(model.unstack_frames(model.stack_frames(imgs)), imgs)


def test_nvae_21m_has_21m_parameters() -> None:
    with torch.device("meta"):
        model = get_model("nvae_21m")
    n = count_parameters(model)
    assert abs(n - 21.4e6) <= 0.05 * 21.4e6, n
    assert model.img_size == (512, 512) and model.grid_size == (1, 32, 32)


# --------------------------------------------------------------------------------------------
# encoder alone


def test_encoder_loads_from_nvae_state_dict() -> None:
    model = get_model("nvae_debug", num_frames=2)
    encoder = NVAEEncoder(**model.encoder().encoder_config)
    result = encoder.load_state_dict(model.state_dict(), strict=False)
    assert result.missing_keys == []
    # the finetuning loader leaves only keys starting "decoder_" unused, as for the MAE
    assert result.unexpected_keys
    assert all(k.startswith("decoder_") for k in result.unexpected_keys)
    assert set(model.state_dict()) - set(result.unexpected_keys) == set(encoder.state_dict())

    model.eval(), encoder.eval()
    imgs = batch_for(encoder)
    torch.testing.assert_close(encoder.forward_features(imgs), model.forward_features(imgs))


def test_encoder_contract_of_the_heads() -> None:
    model = get_model("nvae_debug")
    encoder = model.encoder()
    assert type(encoder) is NVAEEncoder
    assert encoder.embed_dim == 32 and encoder.grid_size == (1, 8, 8)
    assert encoder.img_size == (32, 32) and encoder.in_chans == 12 and encoder.num_frames == 1
    assert isinstance(encoder.blocks, torch.nn.ModuleList) and len(encoder.blocks) == 6
    tokens = encoder.forward_features(batch_for(encoder, 3))
    assert tokens.shape == (3, 1 + 8 * 8, 32)
    torch.testing.assert_close(tokens[:, 0], tokens[:, 1:].mean(1))

    regressor = EncoderRegressor(encoder, 9, "conv", 16, "partial", 1)
    out = regressor(batch_for(encoder, 3))
    assert out.shape == (3, 9) and ((out > 0) & (out < 1)).all()
    out.sum().backward()
    assert all(p.grad is not None for p in encoder.blocks[-1].parameters())
    assert all(p.grad is None for p in encoder.blocks[0].parameters())
    assert encoder.stem.weight.grad is None

    with torch.no_grad():  # a copy: training it leaves the autoencoder alone
        encoder.stem.weight.add_(1.0)
    assert not torch.equal(encoder.stem.weight, model.stem.weight)
