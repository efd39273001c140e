"""StyleSwin: shapes, the double attention's windows in closed form, the Haar transform by
hand, spectral norm, the minibatch statistic, and parameter counts against the paper's."""

from __future__ import annotations

import math

import pytest
import torch

from sdofm.models import FLAVOURS, get_model
from sdofm.models.styleswin import (
    Discriminator,
    DoubleAttention,
    Generator,
    SNConv2d,
    StyleSwinEncoder,
    haar_dwt,
    haar_idwt,
    minibatch_stddev,
    relative_position_index,
)
from sdofm.models.vit import sincos_pos_embed_2d


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --------------------------------------------------------------------------------------------
# shapes


@pytest.mark.parametrize("num_frames", [1, 2])
def test_generator_discriminator_and_encoder_shapes(num_frames: int) -> None:
    model = get_model("styleswin_debug", num_frames=num_frames).eval()
    z = torch.randn(3, model.style_dim)
    fake = model.G(z).detach()
    assert fake.shape == (3, 12, num_frames, 32, 32)
    assert model.D(fake).shape == (3,)
    assert model.sample(2).shape == (2, 12, num_frames, 32, 32)

    enc = model.encoder().eval()
    assert isinstance(enc, StyleSwinEncoder)
    assert enc.grid_size == (1, 4, 4) and enc.embed_dim == 32
    tokens = enc.forward_features(fake)
    assert tokens.shape == (3, 1 + 16, 32)
    torch.testing.assert_close(tokens[:, 0], tokens[:, 1:].mean(dim=1))
    # The tokens are D's trunk map, normalised, row-major: token 1 + 4 i + j is (i, j).
    trunk = model.D.trunk(fake)  # (3, 32, 4, 4)
    ln = torch.nn.functional.layer_norm(trunk.permute(0, 2, 3, 1), (32,))
    torch.testing.assert_close(tokens[:, 1 + 4 * 2 + 3], ln[:, 2, 3])
    assert list(enc.blocks) == list(enc.D.blocks) and len(enc.blocks) == 2


def test_the_ema_copy_is_frozen_and_the_encoder_takes_the_trunk_only() -> None:
    model = get_model("styleswin_debug")
    assert not any(p.requires_grad for p in model.G_ema.parameters())
    for a, b in zip(model.G_ema.parameters(), model.G.parameters(), strict=True):
        assert torch.equal(a, b)
    enc = StyleSwinEncoder(**model.encoder_config)
    result = enc.load_state_dict(model.state_dict(), strict=False)
    assert result.missing_keys == []
    unused_d = {k for k in result.unexpected_keys if k.startswith("D.")}
    assert unused_d == {k for k in model.state_dict() if k.startswith("D.head.")}


@pytest.mark.parametrize("size", [24, 8, (32, 64)])
def test_sizes_must_be_square_powers_of_two_from_16(size) -> None:
    with pytest.raises(ValueError, match="power-of-two"):
        get_model("styleswin_debug", img_size=size)


def test_the_position_grid_starts_switched_off() -> None:
    G = get_model("styleswin_debug").G
    for stage in G.stages[:-1]:
        up = stage.upsample
        assert torch.equal(up.alpha.detach(), torch.zeros(1))
        r2 = 2 * stage.resolution
        torch.testing.assert_close(up.pos[0], sincos_pos_embed_2d(up.pos.shape[-1], r2, r2))
    assert G.stages[-1].upsample is None
    assert "pos" not in "".join(G.state_dict())  # fixed: rebuilt from the config


# --------------------------------------------------------------------------------------------
# double attention


def _groups(n: int, window: int, shift: int) -> torch.Tensor:
    """(n,) the window of each position along one axis in the original coordinates: windows
    start at shift + k * window; positions before ``shift`` wrapped round and form their own."""
    i = torch.arange(n)
    return torch.where(i >= shift, (i - shift) // window, -1)


def _window_means(x: torch.Tensor, n: int, window: int, shift: int) -> torch.Tensor:
    """x: (n * n, c) -> (n * n, c): each token's mean over the tokens of its window."""
    g = _groups(n, window, shift)
    key = (g[:, None] * (n + 1) + g[None, :]).flatten()  # (n * n,) window id
    same = (key[:, None] == key[None, :]).float()
    return same @ x / same.sum(1, keepdim=True)


@pytest.mark.parametrize("resolution,window", [(4, 2), (8, 4), (4, 4)])
def test_double_attention_halves_attend_within_plain_and_shifted_windows(resolution, window):
    """With zero queries and keys (uniform attention), zero position biases and identity
    values and projection, each output token is the mean of the values it may attend to:
    the first half of the channels over its plain window, the second over its window
    shifted by half a window (and, where the cyclic shift wrapped round, only the tokens of
    its own side). At a map no larger than the window, neither half is shifted."""
    dim = 8
    attn = DoubleAttention(dim, num_heads=4, resolution=resolution, window=window)
    shift = window // 2 if resolution > window else 0
    assert attn.shift == shift
    with torch.no_grad():
        attn.qkv.weight.zero_()
        attn.qkv.weight[2 * dim :] = torch.eye(dim)  # v = x
        attn.qkv.bias.zero_()
        attn.proj.weight.copy_(torch.eye(dim))
        attn.proj.bias.zero_()
        attn.bias_plain.zero_()
        attn.bias_shifted.zero_()
    x = torch.randn(2, resolution * resolution, dim)
    out = attn(x)
    for b in range(2):
        plain = _window_means(x[b, :, : dim // 2], resolution, window, 0)
        shifted = _window_means(x[b, :, dim // 2 :], resolution, window, shift)
        torch.testing.assert_close(out[b, :, : dim // 2], plain)
        torch.testing.assert_close(out[b, :, dim // 2 :], shifted)
    if shift:  # a token's shifted window is not its plain one
        assert not torch.allclose(out[..., : dim // 2], out[..., dim // 2 :])


def test_each_half_has_its_own_relative_position_bias() -> None:
    """Raising one offset's bias in the shifted half's table changes that half's output only."""
    attn = DoubleAttention(8, num_heads=4, resolution=4, window=4)
    with torch.no_grad():
        attn.proj.weight.copy_(torch.eye(8))
        attn.proj.bias.zero_()
    x = torch.randn(1, 16, 8)
    before = attn(x).detach()
    with torch.no_grad():
        attn.bias_shifted[relative_position_index(4)[0, 1]] += 5.0
    after = attn(x).detach()
    torch.testing.assert_close(after[..., :4], before[..., :4])
    assert (after[..., 4:] - before[..., 4:]).abs().max() > 1e-3


def test_relative_position_index_counts_offsets() -> None:
    idx = relative_position_index(2)  # tokens (0,0), (0,1), (1,0), (1,1); table 3 x 3
    # offset (dy, dx) of token i from token j at (dy + 1) * 3 + (dx + 1)
    assert idx.tolist() == [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]]


# --------------------------------------------------------------------------------------------
# wavelets, spectral norm, minibatch statistic


def test_haar_transform_by_hand_and_its_inverse() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    # a b / c d = 1 2 / 3 4: LL (a+b+c+d)/2, LH (a+b-c-d)/2, HL (a-b+c-d)/2, HH (a-b-c+d)/2
    assert haar_dwt(x).flatten().tolist() == [5.0, -2.0, -1.0, 0.0]
    x = torch.randn(2, 3, 8, 16)
    y = haar_dwt(x)
    assert y.shape == (2, 12, 4, 8)
    torch.testing.assert_close(haar_idwt(y), x)
    torch.testing.assert_close(y.pow(2).sum(), x.pow(2).sum())  # orthonormal
    # Bands are grouped: channel c's LL is channel c, its HH channel 3 * C + c.
    torch.testing.assert_close(y[:, 1], haar_dwt(x[:, 1:2])[:, 0])
    torch.testing.assert_close(y[:, 9 + 2], haar_dwt(x[:, 2:3])[:, 3])


def test_spectral_norm_divides_by_the_largest_singular_value() -> None:
    conv = SNConv2d(6, 5, 3)
    with torch.no_grad():
        conv.weight.mul_(7.0)
    for _ in range(30):  # power iterations in training mode
        w = conv.normalised_weight()
    sigma = torch.linalg.matrix_norm(w.detach().flatten(1), ord=2)
    torch.testing.assert_close(sigma, torch.tensor(1.0), rtol=1e-3, atol=1e-3)
    u = conv.u.clone()
    conv.eval()
    conv.normalised_weight()
    assert torch.equal(conv.u, u)  # inference leaves the estimate alone


def test_minibatch_stddev_by_hand() -> None:
    x = torch.arange(6 * 2 * 1 * 1, dtype=torch.float32).reshape(6, 2, 1, 1)
    y = minibatch_stddev(x)  # B = 6: groups of gcd(6, 4) = 2, samples (b, b + 3)
    assert y.shape == (6, 3, 1, 1)
    torch.testing.assert_close(y[:, :2], x)
    # x[b] = (2b, 2b + 1); x[b + 3] - x[b] = 6 in both features: std 3 for every group.
    torch.testing.assert_close(y[:, 2].flatten(), torch.full((6,), 3.0))
    z = torch.randn(4, 3, 2, 2)
    expect = (z.var(0, unbiased=False) + 1e-8).sqrt().mean()
    torch.testing.assert_close(minibatch_stddev(z)[:, 3], expect.expand(4, 2, 2))


# --------------------------------------------------------------------------------------------
# parameter counts


def _official_widths(multiplier: int) -> dict[int, int]:
    """StyleSwin's channel table (``models/generator.py`` and ``discriminator.py``)."""
    m = multiplier
    return {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * m, 128: 128 * m, 256: 64 * m, 512: 32 * m}


def official_generator_count(size: int, multiplier: int = 2, style: int = 512, out: int = 3):
    """The official generator's parameters, counted from its widths: the mapping (8 linear
    layers), the constant, per resolution two blocks (two AdaIN style maps, qkv, proj, two
    relative-position tables of (2w - 1)^2 x heads / 2, the MLP), the upsampling (LayerNorm,
    linear without bias, alpha) and the to-RGB (1x1 conv from the next width, two biases)."""
    ch = _official_widths(multiplier)
    n = 8 * (style * style + style) + 512 * 16
    for r in (2**k for k in range(2, int(math.log2(size)) + 1)):
        c, heads, win = ch[r], max(ch[r] // 32, 4), min(r, 8)
        adain, qkv, proj = style * 2 * c + 2 * c, 3 * c * c + 3 * c, c * c + c
        mlp = 4 * c * c + 4 * c + 4 * c * c + c
        n += 2 * (2 * adain + qkv + proj + 2 * (2 * win - 1) ** 2 * (heads // 2) + mlp)
        nxt = ch[2 * r] if r < size else None
        n += (2 * c + c * nxt + 1 if nxt else 0) + (nxt or c) * out + 2 * out
    return n


def official_discriminator_count(size: int, multiplier: int = 2, inp: int = 3):
    """The official wavelet discriminator with spectral norm: per resolution a from-RGB 1x1
    (4 x 3 wavelet channels) and a block (3x3 in -> in, 3x3 in -> out, activation biases),
    the last from-RGB, the final 3x3 conv, and the two linear layers."""
    ch = _official_widths(multiplier)
    n, c = 0, ch[size]
    for i in range(int(math.log2(size)) - 1, 2, -1):
        out = ch[2 ** (i - 1)]
        n += 4 * inp * c + c + c * c * 9 + c + c * out * 9 + out
        c = out
    n += 4 * inp * 512 + 512 + (c + 1) * 512 * 9 + 512
    return n + 512 * 16 * 512 + 2 * 512 + 512 + 1


def test_the_reference_counts_follow_from_the_paper_widths() -> None:
    """StyleSwin at 256 px, channel multiplier 2: G 48.9 M, D 26.2 M parameters."""
    assert round(official_generator_count(256) / 1e5) == 489
    assert round(official_discriminator_count(256) / 1e5) == 262


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name,size", [("styleswin_256", 256), ("styleswin_512", 512)])
def test_flavours_have_the_paper_parameter_counts(name: str, size: int) -> None:
    """G and D within 10 % of the paper's 256 px model (48.9 M, 26.2 M), and within 5 % of
    the official code's count at their own size (12 channels in place of 3, and the residual
    skips of the discriminator's blocks, make the small differences)."""
    args = dict(FLAVOURS[name].args)
    n_g = _count(Generator(**args))
    n_d = _count(
        Discriminator(
            **{k: args[k] for k in ("img_size", "in_chans", "channel_base", "channel_max")}
        )
    )
    assert abs(n_g / 48.9e6 - 1) < 0.10, n_g
    assert abs(n_d / 26.2e6 - 1) < 0.10, n_d
    assert abs(n_g / official_generator_count(size) - 1) < 0.05, n_g
    assert abs(n_d / official_discriminator_count(size) - 1) < 0.05, n_d
