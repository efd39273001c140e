"""Models: registry, shapes, gradients, patchify, masking invariants, the loss, checkpoints."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sdofm
import sdofm.models as models_pkg
from sdofm.models import FAMILIES, FLAVOURS, get_model, list_models, resolve
from sdofm.models.mae import (
    MAEEncoder,
    active_latitude_weights,
    count_parameters,
    masked_loss,
    on_disk_patches,
    patch_latitudes,
)
from sdofm.models.vit import (
    Attention,
    Block,
    TubeletEmbed3D,
    sincos_pos_embed_2d,
    sincos_pos_embed_3d,
)

# Small enough for CPU seconds; everything but the image size keeps the registered config.
SMALL = {
    "mae_debug": {},
    "nvae_debug": {},
    "nvae_21m": {"img_size": 32},
    "styleswin_debug": {},
    "styleswin_256": {"img_size": 32},
    "styleswin_512": {"img_size": 32},
    # Masking on, so that every parameter (the mask token too) takes part.
    "forecast_debug": {"mask_ratio": 0.5},
    "forecast_tiny": {"img_size": 64, "mask_ratio": 0.5},
    "forecast_20m": {"img_size": 64, "mask_ratio": 0.5},
}
DEFAULT_SMALL = {"img_size": 64}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def small_model(name: str, **extra) -> torch.nn.Module:
    return get_model(name, **{**SMALL.get(name, DEFAULT_SMALL), **extra})


def batch_for(model: MAEEncoder, batch_size: int = 2) -> torch.Tensor:
    """-> (B, C, T, H, W) random images of the model's input shape (a forecaster's whole
    window: its inputs, then its leads)."""
    frames = getattr(model, "window", model.num_frames)
    return torch.randn(batch_size, model.in_chans, frames, *model.img_size)


def check_permutations(ids_keep, mask, ids_restore, len_keep: int) -> None:
    B, L = mask.shape
    arange = torch.arange(L).expand(B, L)
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    assert torch.equal(torch.sort(ids_restore, dim=1).values, arange)
    assert torch.equal(torch.gather(ids_restore, 1, ids_shuffle), arange)
    assert torch.equal(ids_shuffle[:, :len_keep], ids_keep)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(mask.sum(1), torch.full((B,), float(L - len_keep)))
    for b in range(B):
        kept = set(ids_keep[b].tolist())
        assert len(kept) == len_keep
        assert kept == set(torch.nonzero(mask[b] == 0).flatten().tolist())


# --------------------------------------------------------------------------------------------
# registry


def test_registry_lists_the_flavour_table() -> None:
    assert list_models() == list(FLAVOURS)
    assert {"mae_debug", "mae_tiny", "mae_32m", "mae_104m", "prithvi_temporal"} <= set(FLAVOURS)
    assert {f.family for f in FLAVOURS.values()} <= set(FAMILIES)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_family_row_names_its_model_encoder_objective_and_what_heads_ignore(family) -> None:
    """The debug flavour's encoder, loaded from the whole model's state dict, leaves unused
    exactly the keys that the row lets a head ignore, and needs every one of its own."""
    from sdofm.engine import Objective

    row = FAMILIES[family]
    assert issubclass(resolve(row.objective), Objective)
    model = get_model(f"{family}_debug")
    enc = model.encoder()
    assert type(enc) is resolve(row.encoder)
    fresh = resolve(row.encoder)(**enc.encoder_config)
    result = fresh.load_state_dict(model.state_dict(), strict=False)
    assert result.missing_keys == []
    assert result.unexpected_keys
    assert all(k.startswith(row.head_ignores) for k in result.unexpected_keys)
    for prefix in row.head_ignores:
        assert any(k.startswith(prefix) for k in result.unexpected_keys), prefix


def test_nothing_outside_the_registry_branches_on_a_family_name() -> None:
    """A new family is one FAMILIES row and its own files: no other module of sdofm compares
    with, defaults to or looks up a family by its name ("mae" is also a metric's name)."""
    root = Path(sdofm.__file__).parent
    own = {root / "models" / "flavours.py"}
    names = "|".join(FAMILIES)
    pattern = re.compile(rf"""(==|!=|family\W.*|\[)\s*(["'])({names})\2""")
    found = [
        f"{p.relative_to(root)}:{i}"
        for p in root.rglob("*.py")
        if p not in own
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not found, found


@pytest.mark.parametrize("name", list_models())
def test_every_flavour_builds_at_its_own_size(name: str) -> None:
    model = get_model(name)
    assert isinstance(model, resolve(FAMILIES[FLAVOURS[name].family].model))
    n = count_parameters(model)
    size = re.fullmatch(r".*_(\d+)m", name)
    if size:  # a flavour named for its size holds that many parameters, within 5 %
        assert abs(n / (int(size.group(1)) * 1e6) - 1) < 0.05, n
    else:
        assert n > 0


def test_config_and_the_flavour_table_import_no_torch() -> None:
    """Configs validate model names without torch (`sdofm --help` stays fast)."""
    code = "import sys, sdofm.config, sdofm.models; assert 'torch' not in sys.modules"
    env = {**os.environ, "PYTHONPATH": str(Path(sdofm.__file__).parents[1])}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


def test_get_model_unknown_name_lists_known() -> None:
    with pytest.raises(KeyError, match="mae_debug"):
        get_model("no_such_model")


def test_get_model_overrides_replace_config() -> None:
    model = get_model("mae_32m", img_size=64, depth=1, masking="disk", mask_ratio=0.5)
    assert model.img_size == (64, 64)
    assert len(model.blocks) == 1
    assert model.masking == "disk" and model.mask_ratio == 0.5
    assert model.embed_dim == 128  # not overridden
    with pytest.raises(TypeError):
        get_model("mae_debug", no_such_argument=1)


def test_models_import_neither_ray_nor_torch_distributed() -> None:
    for path in Path(models_pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                assert not name.startswith(("ray", "torch.distributed")), (path.name, name)


# --------------------------------------------------------------------------------------------
# every registered model, small


@pytest.mark.parametrize("name", list_models())
def test_forward_backward(name: str) -> None:
    model = small_model(name)
    imgs = batch_for(model)
    out = model(imgs)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    family = FLAVOURS[name].family
    if family == "mae":
        L, P = model.num_patches, model.patch_dim
        assert out["pred"].shape == (2, L, P)
        assert out["mask"].shape == (2, L)
        assert torch.equal(out["mask"].sum(1), torch.full((2,), float(L - model.num_keep(0.75))))
        assert not any(p is model.pos_embed for p in model.parameters())
    elif family == "nvae":
        assert out["x_hat"].shape == imgs.shape
        assert out["kl"].shape == (model.num_latent_groups,)
    elif family == "styleswin":
        assert out["fake"].shape == imgs.shape
        assert out["d_real"].shape == out["d_fake"].shape == (2,)
        torch.testing.assert_close(out["loss"], out["loss_D"] + out["loss_G"])
    elif family == "forecast":
        B, C, _, H, W = imgs.shape
        assert out["pred"].shape == (B, C, model.leads, H, W)
        assert out["errors"].shape == (B, C, model.leads)
        # Untrained, it forecasts persistence: every lead is the last input frame.
        last = imgs[:, :, model.inputs - 1 : model.inputs]
        torch.testing.assert_close(out["pred"], last.expand_as(out["pred"]))
        yy, xx = torch.meshgrid(
            torch.arange(H) - (H - 1) / 2, torch.arange(W) - (W - 1) / 2, indexing="ij"
        )
        disk = yy**2 + xx**2 < (0.3984375 * H) ** 2  # 204 px of 512
        want = (last - imgs[:, :, model.inputs :]).pow(2)[..., disk].mean()
        torch.testing.assert_close(out["loss"], want)
    else:
        raise AssertionError(f"no output checks for family {family!r}")

    # Only a GAN's EMA copy of its generator is frozen: it follows G, it is not trained.
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if n.startswith("G_ema.")}
    assert frozen == expected
    out["loss"].backward()
    for pname, param in model.named_parameters():
        if pname in frozen:
            assert param.grad is None, pname
            continue
        assert param.grad is not None, pname
        assert torch.isfinite(param.grad).all(), pname


@pytest.mark.parametrize("masking", ["random", "disk", "solar"])
@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_masking_strategies_train(masking: str, norm_pix_loss: bool) -> None:
    model = get_model("mae_debug", masking=masking, norm_pix_loss=norm_pix_loss)
    out = model(batch_for(model, 3))
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_temporal_tubelets() -> None:
    model = get_model("mae_debug", num_frames=4, tubelet_size=2, embed_dim=32, decoder_embed_dim=48)
    assert model.grid_size == (2, 4, 4)
    assert model.patch_dim == 2 * 8 * 8 * 12
    out = model(batch_for(model))
    assert out["pred"].shape == (2, 32, model.patch_dim)
    out["loss"].backward()


def test_loss_is_masked_mse_of_patches() -> None:
    model = get_model("mae_debug", norm_pix_loss=False)
    imgs = batch_for(model)
    out = model(imgs)
    expected = masked_loss(out["pred"], model.patchify(imgs), out["mask"])
    torch.testing.assert_close(out["loss"], expected)


def test_forward_rejects_bad_shapes_and_ratios() -> None:
    model = get_model("mae_debug")
    with pytest.raises(ValueError):
        model(torch.randn(2, 12, 32, 32))  # no time axis
    with pytest.raises(ValueError):
        model(torch.randn(2, 12, 1, 16, 16))
    with pytest.raises(ValueError):
        model(batch_for(model), mask_ratio=0.0)
    with pytest.raises(ValueError):
        get_model("mae_debug", masking="everywhere")


# --------------------------------------------------------------------------------------------
# patches and the loss


@pytest.mark.parametrize(
    "config",
    [{}, {"num_frames": 3}, {"num_frames": 4, "tubelet_size": 2}, {"img_size": (32, 48)}],
)
def test_patchify_round_trip(config: dict) -> None:
    model = get_model("mae_debug", **config)
    imgs = batch_for(model)
    patches = model.patchify(imgs)
    assert patches.shape == (2, model.num_patches, model.patch_dim)
    assert torch.equal(model.unpatchify(patches), imgs)


def test_patchify_order_matches_tokens() -> None:
    """Patch l holds the pixels that the embedding turns into token l."""
    model = get_model("mae_debug", num_frames=2)
    imgs = torch.zeros(1, 12, 2, 32, 32)
    imgs[0, :, 1, 8:16, 24:32] = 1.0  # frame 1, row 1, column 3
    patches = model.patchify(imgs)
    hot = torch.nonzero(patches.abs().sum(-1)[0]).flatten().tolist()
    assert hot == [1 * 16 + 1 * 4 + 3]


def test_masked_loss_ignores_unmasked_patches() -> None:
    pred, target = torch.randn(2, 16, 10), torch.randn(2, 16, 10)
    mask = torch.zeros(2, 16)
    mask[:, ::3] = 1.0
    loss = masked_loss(pred, target, mask)

    at_kept = pred.clone()
    at_kept[mask == 0] += 5.0
    torch.testing.assert_close(masked_loss(at_kept, target, mask), loss)

    at_masked = pred.clone()
    at_masked[mask == 1] += 5.0
    assert masked_loss(at_masked, target, mask) > loss + 1.0

    expected = ((pred - target) ** 2).mean(-1)[mask == 1].mean()
    torch.testing.assert_close(loss, expected)


# --------------------------------------------------------------------------------------------
# masking invariants


@pytest.mark.parametrize("masking", ["random", "disk", "solar"])
@pytest.mark.parametrize("mask_ratio", [0.1, 0.5, 0.75, 0.9])
def test_masking_is_a_permutation(masking: str, mask_ratio: float) -> None:
    model = get_model("mae_debug", img_size=64, masking=masking)
    ids_keep, mask, ids_restore = model.random_masking(64, mask_ratio)
    len_keep = model.num_keep(mask_ratio)
    n = model.num_patches if masking == "random" else int(model.on_disk.sum())
    assert len_keep == round(n * (1 - mask_ratio))
    assert ids_keep.shape == (64, len_keep)
    check_permutations(ids_keep, mask, ids_restore, len_keep)
    assert not torch.equal(ids_keep[0], ids_keep[1])  # drawn per sample


@pytest.mark.parametrize("masking", ["random", "disk", "solar"])
def test_encoder_masking_follows_ids_shuffle(masking: str) -> None:
    model = get_model("mae_debug", masking=masking)
    imgs = batch_for(model)
    ids_shuffle = torch.argsort(model.masking_noise(2), dim=1)
    latent, mask, ids_restore = model.forward_encoder(imgs, 0.75, ids_shuffle)
    len_keep = model.num_keep(0.75)
    assert latent.shape == (2, 1 + len_keep, model.embed_dim)
    assert torch.equal(ids_restore, torch.argsort(ids_shuffle, dim=1))
    check_permutations(ids_shuffle[:, :len_keep], mask, ids_restore, len_keep)
    again, _, _ = model.forward_encoder(imgs, 0.75, ids_shuffle)
    torch.testing.assert_close(latent, again)


def test_disk_geometry() -> None:
    # 4 x 4 patches of 8 px, disk radius 12.75 px: the four corner patches are off the disk.
    on_disk = on_disk_patches(32, 8).reshape(4, 4)
    expected = torch.ones(4, 4, dtype=torch.bool)
    expected[[0, 0, 3, 3], [0, 3, 0, 3]] = False
    assert torch.equal(on_disk, expected)


@pytest.mark.parametrize("masking", ["disk", "solar"])
def test_off_disk_patches_never_kept_nor_scored(masking: str) -> None:
    model = get_model("mae_debug", img_size=64, num_frames=2, masking=masking)
    off = ~model.on_disk
    assert off.any() and model.on_disk.any()
    for mask_ratio in (0.0, 0.3, 0.75):
        ids_keep, mask, _ = model.random_masking(256, mask_ratio)
        assert not off[ids_keep].any()
        assert (mask[:, off] == 1).all()
        weights = model.loss_weights(mask)
        assert (weights[:, off] == 0).all()
        assert torch.equal(weights[:, model.on_disk], mask[:, model.on_disk])

    imgs = batch_for(model)
    out = model(imgs)
    weights = model.loss_weights(out["mask"])
    changed = out["pred"].detach().clone()
    changed[:, off] += 100.0  # off-disk predictions do not count
    torch.testing.assert_close(
        masked_loss(changed, model.patchify(imgs), weights), out["loss"].detach()
    )


def test_solar_masking_prefers_active_latitudes() -> None:
    model = get_model("mae_debug", img_size=128, patch_size=4, masking="solar")
    lat = patch_latitudes(128, 4).abs().float()
    on = model.on_disk
    belt = on & (lat > 12) & (lat < 20)
    quiet = on & ((lat < 4) | (lat > 45))
    assert belt.sum() > 20 and quiet.sum() > 20

    _, mask, _ = model.random_masking(500, 0.5)
    rate = mask.mean(0)
    belt_rate, quiet_rate = rate[belt].mean().item(), rate[quiet].mean().item()
    assert belt_rate > quiet_rate + 0.1, (belt_rate, quiet_rate)

    # the uniform strategies show no such preference
    for masking in ("random", "disk"):
        uniform = get_model("mae_debug", img_size=128, patch_size=4, masking=masking)
        rate = uniform.random_masking(500, 0.5)[1].mean(0)
        assert abs(rate[belt].mean().item() - rate[quiet].mean().item()) < 0.03


def test_active_latitude_weights() -> None:
    w = active_latitude_weights(torch.tensor([0.0, 15.7, -15.7, 90.0]))
    torch.testing.assert_close(w[1:3], torch.tensor([2.0, 2.0]))
    assert 1.0 < w[0] < 1.1 and 1.0 <= w[3] < 1.001


# --------------------------------------------------------------------------------------------
# encoder alone


def test_encoder_loads_from_mae_state_dict() -> None:
    mae = get_model("mae_debug", num_frames=2)
    encoder = MAEEncoder(
        img_size=32, patch_size=8, num_frames=2, in_chans=12, embed_dim=32, depth=2, num_heads=2
    )
    result = encoder.load_state_dict(mae.state_dict(), strict=False)
    decoder_keys = {k for k in mae.state_dict() if k.startswith("decoder_") or k == "mask_token"}
    assert decoder_keys and result.missing_keys == []
    assert set(result.unexpected_keys) == decoder_keys

    imgs = batch_for(encoder)
    assert "pos_embed" not in encoder.state_dict()  # fixed: rebuilt from the config
    torch.testing.assert_close(encoder.forward_features(imgs), mae.forward_features(imgs))


def test_encoder_copy_holds_the_encoder_weights() -> None:
    mae = get_model("mae_debug", masking="disk", num_frames=2)
    encoder = mae.encoder()
    assert type(encoder) is MAEEncoder and encoder.masking == "disk"
    imgs = batch_for(encoder)
    torch.testing.assert_close(encoder.forward_features(imgs), mae.forward_features(imgs))
    with torch.no_grad():
        encoder.cls_token.add_(1.0)  # a copy: training it leaves the autoencoder alone
    assert not torch.equal(encoder.cls_token, mae.cls_token)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_channel_errors_add_up_to_the_loss(norm_pix_loss: bool) -> None:
    model = get_model("mae_debug", norm_pix_loss=norm_pix_loss, masking="disk")
    imgs = batch_for(model, 3)
    out = model(imgs)
    sums, weight = model.channel_errors(imgs, out["pred"], out["mask"])
    assert sums.shape == (3, model.in_chans) and weight.shape == (3,)
    torch.testing.assert_close((sums.sum(0) / weight.sum()).mean(), out["loss"])
    # Channel c's error only depends on channel c: corrupt the prediction of channel 3 only.
    pred = out["pred"].clone().reshape(*out["pred"].shape[:2], -1, model.in_chans)
    pred[..., 3] += 5.0
    sums2, _ = model.channel_errors(imgs, pred.reshape(out["pred"].shape), out["mask"])
    changed = torch.nonzero(~torch.isclose(sums, sums2))[:, 1].unique().tolist()
    assert changed == [3]


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_reconstruction_keeps_visible_patches_and_fills_masked_ones(norm_pix_loss: bool) -> None:
    model = get_model("mae_debug", norm_pix_loss=norm_pix_loss)
    imgs = batch_for(model)
    out = model(imgs)
    masked, recon = model.reconstruct(imgs, out["pred"], out["mask"])
    assert masked.shape == recon.shape == imgs.shape
    keep = model.unpatchify(
        (1 - out["mask"]).unsqueeze(-1).expand(-1, -1, model.patch_dim).contiguous()
    ).bool()
    torch.testing.assert_close(recon[keep], imgs[keep])
    torch.testing.assert_close(masked[keep], imgs[keep])
    assert (masked[~keep] == 0).all()
    # A perfect prediction of the targets reconstructs the input exactly.
    _, perfect = model.reconstruct(imgs, model.loss_target(imgs), out["mask"])
    torch.testing.assert_close(perfect, imgs, atol=1e-4, rtol=1e-4)


def test_encoder_without_masking_returns_every_token() -> None:
    encoder = MAEEncoder(img_size=32, patch_size=8, in_chans=12, embed_dim=32, depth=2, num_heads=2)
    imgs = torch.randn(3, 12, 1, 32, 32)  # the 2-D case: T = 1
    latent, mask, ids_restore = encoder(imgs)
    assert latent.shape == (3, 1 + 16, 32)
    assert torch.equal(mask, torch.zeros(3, 16))
    assert torch.equal(ids_restore, torch.arange(16).expand(3, 16))
    torch.testing.assert_close(encoder.forward_features(imgs), latent)
    assert encoder.pos_embed.shape == (1, 17, 32)
    assert "pos_embed" not in dict(encoder.named_parameters())

    latent, mask, _ = encoder(imgs, mask_ratio=0.75)
    assert latent.shape == (3, 1 + 4, 32)
    assert torch.equal(mask.sum(1), torch.full((3,), 12.0))


def test_mae_32m_has_32m_parameters() -> None:
    model = get_model("mae_32m")
    assert model.num_patches == 32 * 32
    n = count_parameters(model)
    assert 31_000_000 <= n <= 34_000_000, n


# --------------------------------------------------------------------------------------------
# ViT parts


def test_vit_blocks_keep_shapes() -> None:
    x = torch.randn(2, 7, 32)
    assert Attention(32, 4)(x).shape == (2, 7, 32)
    assert Block(32, 4, mlp_ratio=2.0)(x).shape == (2, 7, 32)
    with pytest.raises(ValueError):
        Attention(30, 4)


def test_tubelet_embedding() -> None:
    embed3d = TubeletEmbed3D(
        img_size=32, patch_size=8, num_frames=4, tubelet_size=2, in_chans=3, embed_dim=16
    )
    assert embed3d.grid_size == (2, 4, 4)
    assert embed3d(torch.randn(2, 3, 4, 32, 32)).shape == (2, 32, 16)
    with pytest.raises(ValueError):
        TubeletEmbed3D(img_size=30, patch_size=8)


def test_sincos_pos_embeds() -> None:
    pe2 = sincos_pos_embed_2d(32, 3, 5)
    assert pe2.shape == (15, 32) and pe2.dtype == torch.float32
    # position 0: sin = 0, cos = 1 on both axes
    torch.testing.assert_close(pe2[0], torch.tensor(([0.0] * 8 + [1.0] * 8) * 2))
    assert torch.unique(pe2, dim=0).shape[0] == 15

    pe3 = sincos_pos_embed_3d(32, 2, 3, 5)
    assert pe3.shape == (30, 32)
    assert torch.unique(pe3, dim=0).shape[0] == 30
    # time dimensions (the first 8) are constant within a frame
    assert torch.equal(pe3[:15, :8], pe3[:1, :8].expand(15, 8))
    with pytest.raises(ValueError):
        sincos_pos_embed_3d(24, 2, 3, 5)


def test_linear_probe_is_one_linear_map_of_the_standardised_token_mean() -> None:
    """finetune.head=linear (MAE's linear probe): W (m - mean) / sqrt(var + eps) + b of the
    patch-token mean m, standardised over the batch in training, with running statistics in
    inference; the frozen encoder receives no gradient."""
    import numpy as np

    from sdofm.models.heads import EncoderRegressor

    encoder = small_model("nvae_debug").encoder()
    probe = EncoderRegressor(encoder, out=3, head="linear", freeze="frozen", squash=False)
    x = torch.randn(6, encoder.in_chans, encoder.num_frames, *encoder.img_size)
    probe.train()  # a frozen encoder stays in inference mode
    assert not encoder.training
    with torch.no_grad():
        m = encoder.forward_features(x)[:, 1:].mean(dim=1).double().numpy()
    W, b = (p.detach().double().numpy() for p in (probe.head.fc.weight, probe.head.fc.bias))
    y = probe(x)
    z = (m - m.mean(0)) / np.sqrt(m.var(0) + 1e-6)  # biased batch variance, as BatchNorm's
    np.testing.assert_allclose(y.detach().numpy(), z @ W.T + b, rtol=1e-4, atol=1e-4)
    y.sum().backward()
    assert all(p.grad is None for p in encoder.parameters())
    assert probe.head.fc.weight.grad is not None
    probe.eval()  # running statistics: one update with momentum 0.1 from (0, 1)
    mean = 0.1 * m.mean(0)
    var = 0.9 + 0.1 * m.var(0, ddof=1)
    expect = (m - mean) / np.sqrt(var + 1e-6) @ W.T + b
    np.testing.assert_allclose(probe(x).detach().numpy(), expect, rtol=1e-4, atol=1e-4)
